"""tools.py: format strings, BM25 (hand-computed score + naive oracle), corpus errors, calculator safety, registry
error rows / timeouts / cache counters, and a REAL retrieval server process on a free loopback port (both APIs, 4xx,
concurrent clients, client behaviour when the server is down)."""
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

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("srv") / "corpus.jsonl", CORPUS)
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools.py"), "serve", "--corpus", corpus,
                             "--port", str(port), "--max-body", "100000", "--max-queries", "8", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                assert json.loads(r.read()) == {"status": "ok", "passages": 5}
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    else:
        pytest.fail("server did not come up")
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


def test_server_concurrent_clients(server):
    url, idx = server
    queries = ["hamlet", "paris france", "berlin germany", "shakespeare 1564", "capital", "english playwright"]
    want = {q: [p["id"] for p, _ in idx.search([q], 3)[0]] for q in queries}
    errors = []

    def worker(i):
        try:
            client = tools.RetrievalClient(url, api="flashrag" if i % 2 else "searchr1")
            for j in range(5):
                qs = [queries[(i + j) % len(queries)], queries[(i * j) % len(queries)]]
                got = client.search(qs, 3)
                assert [[p["id"] for p, _ in h] for h in got] == [want[q] for q in qs]
        except Exception as e:  # surfaced below: an assert in a thread would be lost
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
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
