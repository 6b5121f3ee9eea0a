"""
Tools for the agent model: the action/observation format, a BM25 search index, an HTTP retrieval client, a safe
calculator, and the ToolRegistry that the rollout engine calls once per step with every paused row's action.

Format (SPEC section 2; every other script imports these strings from here): a tool call is an action type plus an
argument (paper Algorithm 1), `<begin_NAME> ARG </end_NAME>` inside <think> ... </think>, answered by
`<NAME_result> ... </NAME_result>` (search: `result 1: "Title"\ntext` lines); `search` is AutoCoA's exact spelling.

How this departs from the paper's setup and why:
- AutoCoA (like Search-R1) retrieves with a FlashRAG/Pyserini server over Wikipedia. We search a pure Python + numpy
  Okapi BM25 index, in process or behind the same two HTTP APIs (server.py): no Java, no FAISS. Pyserini's scoring
  (k1=0.9, b=0.4, Lucene's idf and stopwords) without Porter stemming and with exact document lengths: close to, not
  identical with, Pyserini's. 100k passages of ~100 words index in 5-10 s on one CPU core (~650 MB); for the
  21M-passage Wikipedia dump or a dense retriever, point `--url` at a real server.
- A calculator is the second tool (paper footnote 2: computation as well as information access). `^` is read as power.
- Failed calls become an error observation for that row (SPEC 2), never a crash, and are never cached. All that comes
  from outside is bounded (one unbounded thing sank a run): observations, replies, the server (server.py).

Commands (no torchrun: every rank builds its own registry; a shared server is usual):
    python tools.py search --corpus data/corpus.jsonl "who wrote hamlet"   # quick look (or --url URL)
    python tools.py calc "2023 - 1987"                                     # calculator -> 36
"""
import argparse
import ast
import json
import math
import operator
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from array import array
from collections import Counter, OrderedDict

import numpy as np

# -----------------------------------------------------------------------------
# Format: the one place that spells the tags

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_NAMES = ("search", "calculator")
LOCAL_TOOLS = ("calculator",)  # in-process, free: not the paper's "real calls" (retrievals)
LIMIT_MESSAGE = "Reach the limit of search times."  # AutoCoA's exact text past the action budget (SPEC 2)


def action_open(name):
    return f"<begin_{name}>"


def action_close(name):
    return f"</end_{name}>"


def result_open(name):
    return f"<{name}_result>"


def result_close(name):
    return f"</{name}_result>"


def special_tokens(names=TOOL_NAMES):
    """Think tags + every tool's four tags, in a fixed order (token ids depend on it)."""
    per_tool = (action_open, action_close, result_open, result_close)
    return [THINK_OPEN, THINK_CLOSE] + [tag(name) for name in names for tag in per_tool]


def format_observation(name, text):
    return f"\n{result_open(name)}\n{text}\n{result_close(name)}\n"


class ToolError(Exception):
    """Raised by a tool when its message IS the observation ("Retrieval failed: ..."); the registry never caches it."""


# -----------------------------------------------------------------------------
# File helpers every script uses (this module is the one they all import, and it needs no torch)

def read_jsonl(path):
    """-> [(where = "FILE:LINE", object)] for the non-blank lines of a JSONL file. A line that is not UTF-8 (decoded one
    by one: a text-mode read would not say which), not JSON or not a JSON object fails here, with its file and line."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                 f"line; re-save the file as UTF-8)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: invalid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    return rows


def write_atomic(path, text):
    """Write text to a temp file in the same folder, then rename: a reader or a crash never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# BM25 (Okapi), in-process

# Lucene's default English stop set, which Pyserini's default analyzer uses.
STOPWORDS = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then "
                      "there these they this to was will with".split())
WORD = re.compile(r"\w+")


def tokenize(text):
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


class BM25Index:
    """Okapi BM25 over passages [{"id", "contents"}]. Postings are flat numpy arrays sorted by (term, passage), so a
    query term is one slice: score[passages] += idf * impact, where impact = tf(k1+1) / (tf + k1(1 - b + b dl/avgdl))
    is precomputed per posting. Read-only after construction, so concurrent searches (the server's threads) are safe."""

    def __init__(self, passages, k1=0.9, b=0.4):
        if not passages:
            raise ValueError("BM25Index: empty corpus")
        self.passages, self.k1, self.b, self.vocab = passages, k1, b, {}
        N = len(passages)
        term_ids, lengths = array("q"), np.empty(N, dtype=np.int64)  # flat int64 buffer numpy views without a copy
        for i, p in enumerate(passages):
            ids = [self.vocab.setdefault(w, len(self.vocab)) for w in tokenize(p["contents"])]
            term_ids.extend(ids)
            lengths[i] = len(ids)
        # one key per token occurrence; np.unique sorts by (term, passage) and counts tf in one C pass
        keys = np.frombuffer(term_ids, dtype=np.int64) * N + np.repeat(np.arange(N, dtype=np.int64), lengths)
        keys, tf = np.unique(keys, return_counts=True)
        self.post_docs = (keys % N).astype(np.int32)  # (P,) passage of each posting; keys // N is its term
        self.starts = np.searchsorted(keys // N, np.arange(len(self.vocab) + 1))  # term t: [starts[t], starts[t+1])
        df = np.diff(self.starts)
        self.idf = np.log(1.0 + (N - df + 0.5) / (df + 0.5))  # (V,) Lucene's idf, always > 0
        avgdl = lengths.mean() if lengths.sum() else 1.0
        dl = lengths[self.post_docs]
        self.impact = (tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))).astype(np.float32)  # (P,)

    @classmethod
    def from_jsonl(cls, path, **kwargs):
        """Load a FlashRAG corpus: one {"id", "contents"} per line. Bad lines fail with file and line number."""
        passages = []
        for where, p in read_jsonl(path):
            for field in ("id", "contents"):
                if field not in p:
                    raise ValueError(f"{where}: missing field '{field}'")
            if not isinstance(p["contents"], str):
                raise ValueError(f"{where}: field 'contents' must be a string")
            passages.append(p)
        if not passages:
            raise ValueError(f"{path}: no passages")
        return cls(passages, **kwargs)

    def search(self, queries, k=3):
        """-> per query, up to k (passage, score) best first; ties go to the earlier passage; no match -> []."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out = []
        for q in queries:
            scores = np.zeros(len(self.passages))
            for w in tokenize(q):  # a repeated query word counts twice, as in Lucene's BooleanQuery
                t = self.vocab.get(w)
                if t is not None:
                    s, e = self.starts[t], self.starts[t + 1]
                    scores[self.post_docs[s:e]] += self.idf[t] * self.impact[s:e]
            hits = np.flatnonzero(scores)  # every matching passage has score > 0 (idf > 0, tf > 0)
            if len(hits) > k:  # keep everything tied with the k-th score, then sort exactly
                kth = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
                hits = hits[scores[hits] >= kth]
            order = np.lexsort((hits, -scores[hits]))[:k]  # by score desc, then passage order
            out.append([(self.passages[i], float(scores[i])) for i in hits[order]])
        return out


# -----------------------------------------------------------------------------
# HTTP retrieval client (SPEC 7: FlashRAG/AutoCoA `tok_k` and Search-R1/verl `topk`)

API_FIELDS = {"flashrag": ("query", "tok_k", "return_score"), "searchr1": ("queries", "topk", "return_scores")}


class RetrievalClient:
    """Same search() as BM25Index, over HTTP. Connection errors and 5xx are retried with backoff; 4xx are not. A reply
    is read up to max_reply_bytes and no further: a bigger one (a runaway server, a misrouted URL serving a file) is a
    ToolError, not retried, and never held whole in memory (a 200 MB reply used to be read, parsed and cached)."""

    def __init__(self, url, api="flashrag", timeout_s=10, retries=2, max_reply_bytes=8 << 20):
        if api not in API_FIELDS:
            raise ValueError(f"api must be 'flashrag' or 'searchr1', got {api!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        self.api, self.timeout_s, self.retries, self.max_reply_bytes = api, timeout_s, retries, max_reply_bytes

    def search(self, queries, k=3):
        q_field, k_field, s_field = API_FIELDS[self.api]
        data = json.dumps({q_field: list(queries), k_field: k, s_field: True}).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    length = response.headers.get("Content-Length", "").strip()
                    too_big = length.isdigit() and int(length) > self.max_reply_bytes
                    reply = b"" if too_big else response.read(self.max_reply_bytes + 1)
                if too_big or len(reply) > self.max_reply_bytes:  # a ToolError is not retried: the same reply again
                    raise ToolError(f"{self.url}: reply larger than max_reply_bytes ({self.max_reply_bytes} bytes); "
                                    "not read further")
                body = json.loads(reply)
                break
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read(200).decode(errors='replace')}"  # only what the message shows
                if e.code < 500:
                    raise ConnectionError(f"{self.url}: {last}") from None
            except (OSError, ValueError) as e:  # URLError, timeouts, resets are OSErrors; bad JSON is a ValueError
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        else:
            raise ConnectionError(f"{self.url} unreachable after {self.retries + 1} tries ({last})")
        try:
            if self.api == "flashrag":
                rows = [list(zip(r["documents"], r["scores"])) for r in body]
            else:
                rows = [[(hit["document"], hit["score"]) for hit in r] for r in body["result"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self.url}: reply is not the {self.api} shape ({type(e).__name__}: {e})") from None
        if len(rows) != len(queries):
            raise ValueError(f"{self.url}: {len(rows)} results for {len(queries)} queries")
        return rows


# -----------------------------------------------------------------------------
# Tools (batched callables list[str] -> list[str]) and the registry, the engine's one entry point

def search_tool(backend, k=3):
    """backend: anything with search(queries, k) (BM25Index, RetrievalClient). Renders AutoCoA's observation text."""
    def search(queries):
        try:
            rows = backend.search(queries, k)
        except Exception as e:  # server down, timeout, bad reply: one clear message for every row
            raise ToolError(f"Retrieval failed: {e}") from e
        return ["\n".join(f"result {i}: {p['contents']}" for i, (p, _) in enumerate(hits, 1)) or "No results found."
                for hits in rows]
    return search


CALC_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
            ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
CALC_MAX_EXPONENT = 100
CALC_MAX_BITS = 4096  # integers beyond ~1e1233 are refused: bounded memory and time per operation


def calc_eval(node):
    """Evaluate an arithmetic AST: numbers, + - * / // % **, unary +/-, parentheses. Anything else is refused."""
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # type(), not isinstance(): True is an int; refuse it and strings
            raise ValueError(f"unsupported constant {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        x = calc_eval(node.operand)
        return -x if isinstance(node.op, ast.USub) else x
    if isinstance(node, ast.BinOp) and type(node.op) in CALC_OPS:
        x, y = calc_eval(node.left), calc_eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(y) > CALC_MAX_EXPONENT:
                raise ValueError(f"exponent {y} too large (limit {CALC_MAX_EXPONENT})")
            if isinstance(x, int) and isinstance(y, int) and abs(x).bit_length() * abs(y) > CALC_MAX_BITS:
                raise ValueError("result too large")  # checked BEFORE computing it
        z = CALC_OPS[type(node.op)](x, y)
        if isinstance(z, complex) or (isinstance(z, int) and z.bit_length() > CALC_MAX_BITS):
            raise ValueError("result too large" if isinstance(z, int) else "complex result")
        return z
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def calculator(exprs):
    """Safe arithmetic. Integer-valued results print as ints ("2023 - 1987" -> "36", "10 / 4 * 2" -> "5")."""
    out = []
    for expr in exprs:
        try:
            x = calc_eval(ast.parse(expr.strip().replace("^", "**"), mode="eval").body)
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError("result is not finite")
            if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
                x = int(x)
            out.append(str(x) if isinstance(x, int) else f"{x:.12g}")
        except ZeroDivisionError:
            out.append("Error: division by zero.")
        except (SyntaxError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
            out.append(f"Error: cannot evaluate {expr.strip()!r}: {e.msg if isinstance(e, SyntaxError) else e}.")
    return out


TRUNCATED = "... [truncated]"  # ends every clipped observation: the model (and a reader) sees the cut


def clip_observation(text, max_chars):
    """text cut to max_chars + TRUNCATED when longer (None: no limit); idempotent, so a cached one can pass again."""
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars] + TRUNCATED


class ToolRegistry:
    """(tool name, argument) rows -> observation texts, one batched call per tool.

    Every failure is that row's observation, never an exception: unknown tool, empty or over-long argument, a tool that
    raises or runs past timeout_s (its thread is abandoned; Python cannot kill it). Every observation is clipped to
    max_obs_chars before it is cached, logged or returned: a 10 MB search result once made one rollout take 69 s and
    3.6 GB. Successes go into an LRU cache keyed by (tool, argument); repeats within one batch reach the tool once.
    Counters (reset_counts() zeroes, snapshot() copies them): counts[tool] requests; real_counts[tool] arguments that
    reached the tool, failed or not (real_calls: their sum); cache_hits (cache or batch duplicate); errors (rows).
    Set `log` to a list to have every successful real call appended as {"tool", "args", "observation"} (clipped: the
    rows world_model.py collect reads). Not thread-safe: one per rollout loop."""

    def __init__(self, tools, cache_size=4096, timeout_s=30, max_arg_chars=1000, max_obs_chars=4000):
        self.tools, self.cache_size, self.timeout_s = dict(tools), cache_size, timeout_s
        self.max_arg_chars, self.max_obs_chars = max_arg_chars, max_obs_chars
        self.cache, self.log = OrderedDict(), None
        self.reset_counts()

    @property
    def names(self):
        return list(self.tools)

    @property
    def paid_calls(self):
        """Arguments that reached a tool not in LOCAL_TOOLS: the paper's count of real calls."""
        return sum(n for name, n in self.real_counts.items() if name not in LOCAL_TOOLS)

    def reset_counts(self):
        self.counts, self.real_counts = Counter(), Counter()
        self.real_calls = self.cache_hits = self.errors = 0

    def snapshot(self):
        return {"reached": dict(self.real_counts), "cache_hits": self.cache_hits, "errors": self.errors,
                "requests": sum(self.counts.values())}

    def __call__(self, calls):
        out = [None] * len(calls)
        todo = {}  # tool -> {argument: [rows]}
        for row, (name, arg) in enumerate(calls):
            self.counts[name] += 1
            arg = arg.strip() if isinstance(arg, str) else arg
            if name not in self.tools:
                out[row] = clip_observation(f"Error: unknown tool '{name}'. Available tools: {', '.join(self.tools)}.",
                                            self.max_obs_chars)
                self.errors += 1
            elif not isinstance(arg, str) or not arg:
                out[row] = f"Error: empty argument for {name}."
                self.errors += 1
            elif len(arg) > self.max_arg_chars:
                out[row] = f"Error: argument too long for {name} ({len(arg)} characters, limit {self.max_arg_chars})."
                self.errors += 1
            elif (name, arg) in self.cache:
                self.cache.move_to_end((name, arg))
                out[row] = self.cache[(name, arg)]
                self.cache_hits += 1
            else:
                todo.setdefault(name, {}).setdefault(arg, []).append(row)
        # one thread per tool: tools run concurrently and a hung tool cannot hold the batch past the deadline
        results, threads = {}, {}

        def run(name, args):
            results[name] = self._call(name, args)

        for name, by_arg in todo.items():
            threads[name] = threading.Thread(target=run, args=(name, list(by_arg)), daemon=True)
            threads[name].start()
        deadline = time.monotonic() + self.timeout_s
        for name, by_arg in todo.items():
            threads[name].join(max(0.0, deadline - time.monotonic()))
            timed_out = [(f"Error: {name} timed out after {self.timeout_s} s.", False)] * len(by_arg)
            self.real_calls += len(by_arg)
            self.real_counts[name] += len(by_arg)
            for (arg, rows), (text, ok) in zip(by_arg.items(), results.get(name, timed_out)):
                text = clip_observation(text, self.max_obs_chars)
                for row in rows:
                    out[row] = text
                self.cache_hits += len(rows) - 1
                self.errors += 0 if ok else len(rows)
                if ok and self.log is not None:
                    self.log.append({"tool": name, "args": arg, "observation": text})
                if ok and self.cache_size > 0:  # failures are never cached: the next call tries again
                    self.cache[(name, arg)] = text
                    if len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
        return out

    def _call(self, name, args):
        """One tool on a batch -> [(observation, ok)]. A batch that raises is retried one argument at a time (a bad one
        costs only its row); a ToolError (e.g. server down) answers every row at once."""
        try:
            obs = self.tools[name](args)
            if not isinstance(obs, list) or len(obs) != len(args) or not all(isinstance(o, str) for o in obs):
                raise TypeError(f"returned {type(obs).__name__} for {len(args)} arguments, expected list[str]")
            return [(o, True) for o in obs]
        except ToolError as e:
            return [(str(e), False)] * len(args)
        except Exception as e:
            if len(args) > 1:
                return [result for arg in args for result in self._call(name, [arg])]
            return [(f"Error: {name} failed: {type(e).__name__}: {e}", False)]


def make_tools(corpus=None, url=None, api="flashrag", k=3, cache_size=4096, timeout_s=30, max_obs_chars=4000):
    """search (over a JSONL corpus path or a BM25Index, or a server at url) + calculator. With neither corpus nor url,
    only the calculator is registered (a search action then gets the unknown-tool observation)."""
    if corpus is not None and url is not None:
        raise ValueError("give corpus or url, not both")
    tools = {}
    if corpus is not None:
        tools["search"] = search_tool(corpus if isinstance(corpus, BM25Index) else BM25Index.from_jsonl(corpus), k)
    elif url is not None:
        tools["search"] = search_tool(RetrievalClient(url, api=api, timeout_s=min(10, timeout_s)), k)
    tools["calculator"] = calculator
    return ToolRegistry(tools, cache_size=cache_size, timeout_s=timeout_s, max_obs_chars=max_obs_chars)


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="AutoCoA tools: quick search, calculator (the server: server.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_search = sub.add_parser("search", help="print the observation for one or more queries")
    p_calc = sub.add_parser("calc", help="evaluate arithmetic with the calculator tool")
    p_search.add_argument("--corpus", help="JSONL corpus, one {\"id\", \"contents\"} per line (FlashRAG format)")
    p_search.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (Pyserini default)")
    p_search.add_argument("--b", type=float, default=0.4, help="BM25 b (Pyserini default)")
    p_search.add_argument("--url", help="query a retrieval server instead of a local corpus")
    p_search.add_argument("--api", choices=list(API_FIELDS), default="flashrag", help="request shape for --url")
    p_search.add_argument("-k", type=int, default=3, help="passages per query")
    p_search.add_argument("queries", nargs="+", help="search queries")
    p_calc.add_argument("exprs", nargs="+", help="arithmetic expressions")
    args = parser.parse_args()

    if args.command == "calc":
        print("\n".join(calculator(args.exprs)))
        sys.exit(0)
    if args.url:
        backend = RetrievalClient(args.url, api=args.api)
    elif not args.corpus:
        parser.error("--corpus is required (or --url)")
    else:
        t0 = time.time()
        backend = BM25Index.from_jsonl(args.corpus, k1=args.k1, b=args.b)
        print(f"indexed {len(backend.passages)} passages, {len(backend.vocab)} terms in {time.time() - t0:.1f} s",
              file=sys.stderr)
    registry = ToolRegistry({"search": search_tool(backend, args.k)})
    for q, obs in zip(args.queries, registry([("search", q) for q in args.queries])):
        print(f"{action_open('search')} {q} {action_close('search')}{format_observation('search', obs)}")
