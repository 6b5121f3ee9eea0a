"""tools.py: format strings, BM25 (hand-computed score + naive oracle), corpus errors, calculator safety, registry
error rows / timeouts / cache counters; and server.py: a REAL retrieval server process on a free loopback port (both
APIs, 4xx, concurrent clients, client behaviour when the server is down)."""
import http.client
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import server as server_mod  # noqa: E402  (not `server`: a fixture below has that name)
import tools  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    {"id": "d0", "contents": '"Hamlet"\nHamlet is a tragedy written by William Shakespeare around 1600.'},
    {"id": "d1", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "d2", "contents": '"William Shakespeare"\nWilliam Shakespeare was an English playwright born in 1564.'},
    {"id": "d3", "contents": '"France"\nFrance is a country in Western Europe. Its capital is Paris.'},
    {"id": "d4", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# Format

def test_format_strings_match_contract():
    assert tools.format_observation("search", "X") == "\n<search_result>\nX\n</search_result>\n"
    assert (tools.action_open("search"), tools.action_close("search")) == ("<begin_search>", "</end_search>")
    tags = tools.special_tokens()
    assert tags[:2] == ["<think>", "</think>"] and len(tags) == len(set(tags)) == 2 + 4 * len(tools.TOOL_NAMES)
    assert "</calculator_result>" in tags


# -----------------------------------------------------------------------------
# BM25

def test_bm25_hand_computed_score():
    idx = tools.BM25Index([{"id": 0, "contents": "apple banana"}, {"id": 1, "contents": "apple apple cherry"},
                           {"id": 2, "contents": "banana cherry date"}])
    # N=3, df(apple)=2 -> idf = ln(1 + 1.5/2.5); avgdl = 8/3; doc 1: tf=2, dl=3
    idf = math.log(1 + 1.5 / 2.5)
    s1 = idf * 2 * 1.9 / (2 + 0.9 * (0.6 + 0.4 * 3 / (8 / 3)))
    s0 = idf * 1 * 1.9 / (1 + 0.9 * (0.6 + 0.4 * 2 / (8 / 3)))
    hits = idx.search(["Apple!"], k=3)[0]
    assert [p["id"] for p, _ in hits] == [1, 0]  # higher tf wins; doc 2 has no match and is not returned
    assert hits[0][1] == pytest.approx(s1, rel=1e-6) and hits[1][1] == pytest.approx(s0, rel=1e-6)


def test_bm25_relevant_first_and_stopwords():
    idx = tools.BM25Index(CORPUS)
    top = idx.search(["who wrote hamlet", "capital of France", "Shakespeare birth year", "the of is"], k=2)
    assert top[0][0][0]["id"] == "d0"
    assert {top[1][0][0]["id"], top[1][1][0]["id"]} == {"d1", "d3"}
    assert top[2][0][0]["id"] == "d2"
    assert top[3] == []  # only stopwords: nothing matches


def test_bm25_ties_break_by_passage_order():
    idx = tools.BM25Index([{"id": i, "contents": "same words here"} for i in range(7)])
    assert [p["id"] for p, _ in idx.search(["words"], k=3)[0]] == [0, 1, 2]


def test_bm25_matches_naive_oracle():
    """Vectorised postings == a direct loop over every (query term, passage), top-k and scores."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    passages = [{"id": i, "contents": " ".join(rng.choices(vocab, k=rng.randint(1, 30)))} for i in range(200)]
    idx = tools.BM25Index(passages, k1=1.2, b=0.75)
    docs = [tools.tokenize(p["contents"]) for p in passages]
    N, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    for _ in range(20):
        q = tools.tokenize(" ".join(rng.choices(vocab, k=3)))
        scores = []
        for d in docs:
            s = 0.0
            for w in q:
                df = sum(w in e for e in docs)
                tf = d.count(w)
                if tf:
                    idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
                    s += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(d) / avgdl))
            scores.append(s)
        want = sorted((i for i in range(N) if scores[i] > 0), key=lambda i: (-round(scores[i], 4), i))[:5]
        got = idx.search([" ".join(q)], k=5)[0]
        assert [p["id"] for p, _ in got] == want
        assert [s for _, s in got] == pytest.approx([scores[i] for i in want], rel=1e-5)


def test_corpus_errors_name_file_and_line(tmp_path):
    good = json.dumps(CORPUS[0])
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, '{"id": "x", "contents": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: invalid JSON"):
        tools.BM25Index.from_jsonl(path)
    path = write_jsonl(tmp_path / "nofield.jsonl", [good, '{"id": "x", "text": "t"}'])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: missing field 'contents'"):
        tools.BM25Index.from_jsonl(path)
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        tools.BM25Index.from_jsonl(path)
    assert len(tools.BM25Index.from_jsonl(write_jsonl(tmp_path / "ok.jsonl", CORPUS + [""])).passages) == 5


def test_search_tool_observation_text():
    obs = tools.search_tool(tools.BM25Index(CORPUS), k=2)(["hamlet shakespeare", "zzz"])
    assert obs[0].startswith('result 1: "Hamlet"\nHamlet is a tragedy') and "\nresult 2: " in obs[0]
    assert obs[0].count("result ") == 2 and obs[1] == "No results found."


# -----------------------------------------------------------------------------
# Calculator

def test_calculator_arithmetic():
    exprs = ["2023 - 1987", "10 / 4 * 2", "7 // 2", "7 % 3", "-(3 + 4) ^ 2", "2 ** -2", "1 / 3", "2**100", "1.5e3"]
    assert tools.calculator(exprs) == ["36", "5", "3", "1", "-49", "0.25", "0.333333333333", str(2 ** 100), "1500"]


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "x + 1", "(1).real", "abs(-1)", "[1, 2]",
                                  "'a' * 3", "True + 1", "2 ** 1000", "9 ** 9 ** 9", "(10 ** 90) ** 90", "1 / 0",
                                  "1e308 * 10", "(-8) ** 0.5", "1 +", "", "lambda: 1", "2 << 3"])
def test_calculator_refuses(expr):
    out = tools.calculator([expr])[0]
    assert out.startswith("Error: "), out


# -----------------------------------------------------------------------------
# Registry

def test_registry_error_rows_do_not_crash_batch():
    def broken(args):  # fails on one argument only: the batch is retried row by row, the others survive
        if "bad" in args:
            raise RuntimeError("boom")
        return [a + "!" for a in args]

    def wrong_length(args):
        return ["only one"] * (len(args) + 1)

    reg = tools.ToolRegistry({"search": tools.search_tool(tools.BM25Index(CORPUS)), "calculator": tools.calculator,
                              "broken": broken, "wrong": wrong_length}, max_arg_chars=50)
    out = reg([("search", "hamlet"), ("nope", "x"), ("calculator", "  "), ("search", "a" * 51), ("broken", "bad"),
               ("calculator", "6*7"), ("wrong", "x"), ("calculator", "import os"), ("broken", "ok")])
    assert out[0].startswith('result 1: "Hamlet"')
    assert out[1].startswith("Error: unknown tool 'nope'")
    assert out[2] == "Error: empty argument for calculator."
    assert out[3].startswith("Error: argument too long for search (51 characters, limit 50)")
    assert out[4] == "Error: broken failed: RuntimeError: boom"
    assert out[5] == "42"
    assert out[6].startswith("Error: wrong failed: TypeError")
    assert out[7].startswith("Error: cannot evaluate")
    assert out[8] == "ok!"
    assert reg([("broken", "bad")]) == [out[4]] and reg.real_counts["broken"] == 3  # error rows are not cached


def test_registry_timeout_is_an_error_row():
    release = threading.Event()

    def slow(args):
        release.wait(5)
        return ["late"] * len(args)

    reg = tools.ToolRegistry({"slow": slow, "calculator": tools.calculator}, timeout_s=0.2)
    assert reg([("slow", "a"), ("calculator", "1+1")]) == ["Error: slow timed out after 0.2 s.", "2"]
    release.set()
    assert reg([("slow", "a")]) == ["late"]  # the timeout was not cached


def test_registry_cache_and_counters():
    seen = []

    def echo(args):
        seen.extend(args)
        return [a.upper() for a in args]

    reg = tools.ToolRegistry({"echo": echo}, cache_size=2)
    assert reg([("echo", "a"), ("echo", " a "), ("echo", "b")]) == ["A", "A", "B"]  # arguments are stripped
    assert (reg.real_calls, reg.cache_hits, reg.counts["echo"], seen) == (2, 1, 3, ["a", "b"])
    assert reg([("echo", "a"), ("echo", "c")]) == ["A", "C"]  # a: hit; c: miss evicts b (least recent)
    assert (reg.real_calls, reg.cache_hits) == (3, 2)
    reg([("echo", "b")])
    assert (reg.real_calls, reg.real_counts["echo"], list(reg.cache)) == (4, 4, [("echo", "c"), ("echo", "b")])
    reg.reset_counts()
    assert (reg.real_calls, reg.cache_hits, sum(reg.counts.values())) == (0, 0, 0)


def test_make_tools(tmp_path):
    reg = tools.make_tools(corpus=write_jsonl(tmp_path / "c.jsonl", CORPUS))
    assert reg.names == ["search", "calculator"]
    assert tools.make_tools().names == ["calculator"]
    with pytest.raises(ValueError):
        tools.make_tools(corpus="x", url="http://127.0.0.1:1")


def test_client_server_down_gives_error_observation():
    port = free_port()  # nothing listens there any more
    reg = tools.make_tools(url=f"http://127.0.0.1:{port}", timeout_s=5)
    reg.tools["search"] = tools.search_tool(tools.RetrievalClient(f"http://127.0.0.1:{port}", retries=1, timeout_s=1))
    out = reg([("search", "hamlet"), ("calculator", "1+2"), ("search", "paris")])
    assert out[0].startswith("Retrieval failed: ") and "unreachable after 2 tries" in out[0]
    assert out[2].startswith("Retrieval failed: ") and out[1] == "3"
    reg([("search", "hamlet")])
    assert reg.real_counts["search"] == 3  # failures are never cached


# -----------------------------------------------------------------------------
# A real server process

def health(url):
    with urllib.request.urlopen(url + "/health", timeout=1) as r:
        return json.loads(r.read())


def wait_for_health(proc, port, tries):
    """-> the URL of a server.py process once its /health answers; fails with its stderr if it dies first."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        try:
            health(url)
            return url
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    pytest.fail("server did not come up")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("srv") / "corpus.jsonl", CORPUS)
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--corpus", corpus,
                             "--port", str(port), "--max-body", "100000", "--max-queries", "8", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = wait_for_health(proc, port, tries=200)
    assert health(url) == {"status": "ok", "passages": 5}
    yield url, tools.BM25Index(CORPUS)
    proc.terminate()
    proc.wait(5)


def post(url, body, headers=None):
    """-> (status, parsed JSON). body: bytes sent as is, anything else JSON-encoded."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/retrieve", body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_server_both_apis(server):
    url, idx = server
    want = idx.search(["who wrote hamlet", "capital of france"], k=2)
    status, flash = post(url, {"query": ["who wrote hamlet", "capital of france"], "tok_k": 2, "return_score": True})
    assert status == 200 and len(flash) == 2
    assert [[d["id"] for d in r["documents"]] for r in flash] == [[p["id"] for p, _ in h] for h in want]
    assert flash[0]["scores"] == pytest.approx([s for _, s in want[0]])
    status, sr1 = post(url, {"queries": ["who wrote hamlet", "capital of france"], "topk": 2, "return_scores": True})
    assert status == 200
    assert [[(h["document"]["id"], h["score"]) for h in r] for r in sr1["result"]] == \
        [[(p["id"], pytest.approx(s)) for p, s in h] for h in want]
    # our client speaks both shapes and gets the same answer as the in-process index
    for api in ("flashrag", "searchr1"):
        got = tools.RetrievalClient(url, api=api).search(["who wrote hamlet", "capital of france"], 2)
        assert [[(p["id"], s) for p, s in h] for h in got] == \
            [[(p["id"], pytest.approx(s)) for p, s in h] for h in want]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"\xff\xfe", 400), ([1, 2], 400), ({"query": []}, 400), ({"queries": "x"}, 400),
    ({"query": [1, 2]}, 400), ({"query": ["a"], "queries": ["a"]}, 400), ({"topk": 3}, 400),
    ({"query": ["a"], "tok_k": 0}, 400), ({"queries": ["a"], "topk": "3"}, 400),
    ({"queries": ["a"], "topk": True}, 400), ({"query": ["a"], "tok_k": 101}, 400),
    ({"query": ["q"] * 9}, 400),  # --max-queries 8
    ({"query": ["x" * 200_000]}, 413),  # --max-body 100000
])
def test_server_rejects_bad_requests_and_keeps_serving(server, body, status):
    url, _ = server
    got, reply = post(url, body)
    assert got == status and "error" in reply
    assert post(url, {"query": ["hamlet"], "tok_k": 1})[0] == 200


def test_server_lying_content_length_and_unknown_path(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/retrieve")
    conn.putheader("Content-Length", str(10 ** 9))  # claims 1 GB, sends nothing: refused before reading
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "too large" in json.loads(r.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/retrieve")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nope", timeout=5)
    assert e.value.code == 404


def concurrent_searches(url, idx, clients, join_s, together=False, **client_args):
    """`clients` threads, each a RetrievalClient (the two APIs alternating) making 5 two-query searches checked against
    idx (together: all start at once) -> (errors, ids of the clients that finished); an assert inside a thread would be
    lost, so failures come back as errors."""
    queries = ["hamlet", "paris france", "berlin germany", "shakespeare 1564", "capital", "english playwright"]
    want = {q: [p["id"] for p, _ in idx.search([q], 3)[0]] for q in queries}
    errors, done = [], []
    start = threading.Barrier(clients) if together else None

    def worker(i):
        try:
            client = tools.RetrievalClient(url, api="flashrag" if i % 2 else "searchr1", **client_args)
            if start:
                start.wait(10)
            for j in range(5):
                qs = [queries[(i + j) % len(queries)], queries[(i * j) % len(queries)]]
                got = client.search(qs, 3)
                assert [[p["id"] for p, _ in h] for h in got] == [want[q] for q in qs]
            done.append(i)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    return errors, done


def test_server_concurrent_clients(server):
    url, idx = server
    errors, _ = concurrent_searches(url, idx, 8, 20)
    assert errors == []


def test_client_4xx_is_not_retried(server):
    url, _ = server
    client = tools.RetrievalClient(url, retries=5)
    with pytest.raises(ConnectionError, match="HTTP 400"):
        client.search([], 3)  # empty list: the server says 400 once, no backoff loop


def test_client_rejects_reply_of_the_wrong_shape():
    """A server that answers with another API's shape is a clear error, not a KeyError deep in the rollout."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Other(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"result": [[]]}).encode()  # Search-R1 shape
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ValueError, match="not the flashrag shape"):
            tools.RetrievalClient(url, api="flashrag", retries=0).search(["q"], 3)
        assert tools.RetrievalClient(url, api="searchr1").search(["q"], 3) == [[]]
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# Issue 13: bad input files, unbounded observations and replies, registry counters, a server that slow clients cannot
# exhaust


def test_read_jsonl_non_utf8_and_deep_lines_name_file_and_line(tmp_path):
    """A non-UTF-8 byte used to surface as a bare UnicodeDecodeError (no file, no line) and a deeply nested line as a
    RecursionError; both are now a ValueError naming FILE:LINE."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CORPUS[0]).encode() + b"\n\n" + b'{"id": "x", "contents": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:3: not valid UTF-8 \(byte 0xe9"):
        tools.read_jsonl(path)
    with pytest.raises(ValueError, match=r"latin1\.jsonl:3: not valid UTF-8"):
        tools.BM25Index.from_jsonl(path)
    path = write_jsonl(tmp_path / "deep.jsonl", [json.dumps(CORPUS[0]), "[" * 100_000 + "]" * 100_000])
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: invalid JSON \(nested too deeply\)"):
        tools.read_jsonl(path)
    path = tmp_path / "crlf.jsonl"  # Windows line ends and UTF-8 text still read as before
    path.write_bytes(b'{"id": "a", "contents": "\xc3\xa9t\xc3\xa9"}\r\n\r\n{"id": "b", "contents": "x"}\r\n')
    assert [(w.rsplit(":", 1)[1], o["id"]) for w, o in tools.read_jsonl(path)] == [("1", "a"), ("3", "b")]
    assert tools.read_jsonl(path)[0][1]["contents"] == "été"


def test_registry_clips_long_observations():
    """A tool that returns 10 MB gives an observation of at most max_obs_chars + the visible marker, and the clipped
    text (not the 10 MB) is what gets cached and logged. Before: the whole 10 MB went into the rollout (69 s, 3.6 GB)."""
    calls = []

    def huge(args):
        calls.extend(args)
        return ["y" * 10_000_000 if a == "big" else a for a in args]

    def loud(args):
        raise RuntimeError("z" * 100_000)  # a failure's own message is an observation too

    reg = tools.ToolRegistry({"huge": huge, "loud": loud})
    assert reg.max_obs_chars == 4000  # the default
    reg.log = []
    big, small, err = reg([("huge", "big"), ("huge", "small"), ("loud", "x")])
    assert len(big) <= 4000 + len(tools.TRUNCATED) and big.endswith("... [truncated]") and big.startswith("yyy")
    assert small == "small"
    assert len(err) <= 4000 + len(tools.TRUNCATED) and err.endswith(tools.TRUNCATED)
    assert reg.cache[("huge", "big")] == big and reg.log[0]["observation"] == big
    assert reg([("huge", "big")]) == [big] and calls == ["big", "small"]  # a cache hit returns the same clipped text
    reg = tools.make_tools(max_obs_chars=10)
    assert reg.max_obs_chars == 10
    assert reg([("calculator", "2 ** 100")]) == [str(2 ** 100)[:10] + tools.TRUNCATED]
    assert tools.clip_observation(tools.clip_observation("a" * 50, 10), 10) == "a" * 10 + tools.TRUNCATED


class Streamer:
    """A loopback http.server whose every POST answer is a flood of bytes: close-delimited (no Content-Length), or
    announcing content_length and then sending nothing. Counts what it managed to send."""

    def __init__(self, content_length=None, limit=200 << 20):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        outer = self
        self.sent = 0

        class Flood(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                if content_length is not None:
                    self.send_header("Content-Length", str(content_length))
                self.end_headers()
                if content_length is not None:
                    time.sleep(3)  # says 1 GB is coming, sends none of it: the client must not wait for it
                    return
                chunk = b"[" * 65536
                try:
                    while outer.sent < limit:
                        self.wfile.write(chunk)
                        outer.sent += len(chunk)
                except OSError:  # the client hung up: what we want
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Flood)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content_length", [None, 10 ** 9])
def test_client_refuses_huge_reply_without_reading_it(content_length):
    """A server answering with an endless (or a 1 GB announced) body: the client stops after max_reply_bytes, the
    observation is a clear error, nothing is cached. Before: the reply was read whole, then parsed and cached."""
    streamer = Streamer(content_length)
    try:
        client = tools.RetrievalClient(streamer.url, retries=3, timeout_s=5, max_reply_bytes=100_000)
        t0 = time.monotonic()
        with pytest.raises(tools.ToolError, match=r"reply larger than max_reply_bytes \(100000 bytes\)"):
            client.search(["q"], 3)
        assert time.monotonic() - t0 < 2.5  # no retries, no waiting for the announced body
        assert streamer.sent < 50 << 20  # far from the 200 MB it would send to a client that read everything
        reg = tools.ToolRegistry({"search": tools.search_tool(client)})
        [out] = reg([("search", "q")])
        assert out.startswith("Retrieval failed: ") and "larger than max_reply_bytes" in out
        assert reg.cache == {} and reg.errors == 1
        assert tools.RetrievalClient(streamer.url).max_reply_bytes == 8 << 20  # the default
    finally:
        streamer.close()


def test_registry_counters_and_snapshot():
    """One batch with a cache hit, a duplicate, an unknown tool, an empty argument, an over-long argument, a failing
    tool and calculator calls: `reached` counts only the arguments that reached a tool, `errors` every error row, and
    the old attributes keep their meaning. snapshot() is a copy: a trainer diffs two of them around a step."""
    seen = []

    def echo(args):
        seen.extend(args)
        return [a.upper() for a in args]

    def broken(args):
        raise RuntimeError("down")

    reg = tools.ToolRegistry({"echo": echo, "calculator": tools.calculator, "broken": broken}, max_arg_chars=20)
    reg([("echo", "warm")])
    before = reg.snapshot()
    assert before == {"reached": {"echo": 1}, "cache_hits": 0, "errors": 0, "requests": 1}
    out = reg([("echo", "warm"),          # cache hit
               ("echo", "new"), ("echo", " new "),  # one real call + a duplicate in the batch
               ("nope", "x"),             # unknown tool: an error, reaches nothing
               ("echo", "   "),           # empty argument: an error, reaches nothing
               ("echo", "x" * 21),        # over-long argument: an error, reaches nothing
               ("broken", "a"), ("broken", "a"),  # reaches the tool once, two error rows
               ("calculator", "6*7"), ("calculator", "1/0")])  # a calculator "Error:" is its answer, not a failure
    assert out[:3] == ["WARM", "NEW", "NEW"] and out[8:] == ["42", "Error: division by zero."]
    assert all(o.startswith("Error: ") for o in out[3:8])
    after = reg.snapshot()
    assert after == {"reached": {"echo": 2, "broken": 1, "calculator": 2}, "cache_hits": 3, "errors": 5,
                     "requests": 11}
    assert before["reached"] == {"echo": 1}  # not aliased to the live counters
    diff = {tool: n - before["reached"].get(tool, 0) for tool, n in after["reached"].items()}
    assert diff == {"echo": 1, "broken": 1, "calculator": 2} and seen == ["warm", "new"]
    assert (reg.real_calls, reg.cache_hits, reg.errors) == (5, 3, 5)
    assert reg.real_counts == {"echo": 2, "broken": 1, "calculator": 2} and sum(reg.counts.values()) == 11
    assert reg.counts["nope"] == 1 and "nope" not in reg.real_counts
    slow = tools.ToolRegistry({"slow": lambda args: time.sleep(2) or args}, timeout_s=0.1)
    assert slow([("slow", "a")])[0].startswith("Error: slow timed out") and slow.snapshot() == \
        {"reached": {"slow": 1}, "cache_hits": 0, "errors": 1, "requests": 1}
    reg.reset_counts()
    assert reg.snapshot() == {"reached": {}, "cache_hits": 0, "errors": 0, "requests": 0}


BIG_PASSAGE = {"id": "big", "contents": "bigpassage " + "x" * 10_000_000}  # one huge reply, one cheap token


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory):
    """`server.py --max-workers 4 --request-timeout 1.5`: the process, its URL and the limits."""
    corpus = write_jsonl(tmp_path_factory.mktemp("bounded") / "corpus.jsonl", CORPUS + [BIG_PASSAGE])
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--corpus", corpus,
                             "--port", str(port), "--max-workers", "4", "--request-timeout", "1.5", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            # numpy's BLAS starts OMP_NUM_THREADS - 1 threads of its own: count only the server's
                            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    url = wait_for_health(proc, port, tries=400)
    assert health(url)["passages"] == 6
    yield proc, url, 4, 1.5
    proc.terminate()
    proc.wait(5)


def server_threads(proc):
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])
    except OSError:
        pytest.skip("no /proc: cannot count a process's threads here")


def closed_by_peer(sock, wait):
    """True when the peer closes sock within `wait` seconds (EOF or reset); reads and drops whatever arrives."""
    sock.settimeout(wait)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_server_nested_json_is_400(bounded_server):
    """100k nested brackets: a RecursionError in the JSON decoder used to drop the connection with no answer."""
    _, url, _, _ = bounded_server
    status, reply = post(url, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and reply["error"] == "bad request: JSON nested too deeply"
    status, reply = post(url, b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and "nested too deeply" in reply["error"]
    assert post(url, {"query": ["hamlet"], "tok_k": 1})[0] == 200


def test_server_idle_connections_take_no_thread_and_are_closed(bounded_server):
    """50 idle sockets: the server's thread count stays within its worker bound, a normal client is answered at once,
    and the idle sockets are closed after --request-timeout. Before: one thread per connection, each kept 30 s per
    recv (300 idle connections made 182 threads)."""
    proc, url, workers, timeout = bounded_server
    idle = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) for _ in range(50)]
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        for _ in range(3):
            assert tools.RetrievalClient(url, retries=0, timeout_s=5).search(["hamlet"], 1)[0][0][0]["id"] == "d0"
        assert time.monotonic() - t0 < timeout  # not queued behind the idle sockets
        assert server_threads(proc) <= workers + 1  # the workers + the accept loop
        assert all(closed_by_peer(s, timeout + 3) for s in idle)
    finally:
        for s in idle:
            s.close()
    assert post(url, {"query": ["paris"], "tok_k": 1})[0] == 200


def test_server_drops_slow_client_at_the_deadline(bounded_server):
    """A client sending its request at 4 bytes/s is dropped once --request-timeout has passed since it started, not
    kept while each byte arrives within the socket timeout (1 byte/s used to hold a thread for 45 s and more)."""
    _, url, _, timeout = bounded_server
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
    request = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    t0, closed_at = time.monotonic(), None
    try:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            if closed_by_peer(sock, 0.25):
                closed_at = time.monotonic()
                break
    finally:
        sock.close()
    assert closed_at is not None, "the server kept a client that took 20 s to send its headers"
    assert timeout - 0.3 < closed_at - t0 < timeout + 2.5


def test_server_drops_client_that_does_not_read(bounded_server):
    """Clients that request a 10 MB answer and never read it hold a worker for --request-timeout at most: then they are
    dropped (the answer cut short) and a normal client is served. Before: each held a thread (and its answer) for as
    long as the socket timeout allowed per send (40 such clients: 582 MB)."""
    proc, url, workers, timeout = bounded_server
    body = json.dumps({"query": ["bigpassage"], "tok_k": 1}).encode()
    stuck = []
    for _ in range(workers + 2):  # more than the workers: some wait for a free one
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        stuck.append(s)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        assert tools.RetrievalClient(url, retries=0, timeout_s=15).search(["hamlet"], 1)[0][0][0]["id"] == "d0"
        assert time.monotonic() - t0 < 2 * timeout + 3
        assert server_threads(proc) <= workers + 1
        time.sleep(timeout + 0.5)
        for s in stuck:
            received = 0
            s.settimeout(5)
            try:
                while chunk := s.recv(1 << 20):
                    received += len(chunk)
            except (ConnectionResetError, socket.timeout):
                pass
            assert received < 10_000_000, "a client that did not read still got the whole answer: not dropped"
    finally:
        for s in stuck:
            s.close()


def test_server_16_concurrent_clients(bounded_server):
    """16 clients at once against 4 workers: every request is queued (listen backlog sized for it) and answered."""
    _, url, _, _ = bounded_server
    assert server_mod.BoundedHTTPServer.request_queue_size >= 16
    errors, done = concurrent_searches(url, tools.BM25Index(CORPUS), 16, 30, together=True, retries=0, timeout_s=10)
    assert errors == [] and sorted(done) == list(range(16))
