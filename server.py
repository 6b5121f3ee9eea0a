"""
The retrieval server: a BM25 index (tools.BM25Index) behind the two HTTP APIs AutoCoA's and Search-R1's code speak, so
the same client (tools.RetrievalClient, `--url`) talks to it or to a real FlashRAG/Pyserini server. serve_tool() puts
any search tool behind the same API (world_model.py serve: the world model as a server).

API (SPEC 7): POST /retrieve with FlashRAG's {"query": [...], "tok_k": k, "return_score": true} (the field really is
`tok_k`) -> [{"documents": [...], "scores": [...]}] per query, or Search-R1's {"queries": [...], "topk": k,
"return_scores": true} -> {"result": [[{"document", "score"}, ...]]}; GET /health -> {"status": "ok", "passages": N}.
A bad request is a 4xx with {"error": "..."} (400 bad JSON or fields, 404 unknown path, 411 no Content-Length, 413
body too large), a search that raises is a 500; the server keeps serving either way. Everything from outside is
bounded (BoundedHTTPServer says how and why): --max-workers, --request-timeout, --max-body, --max-queries. Measured
here (100k passages of ~100 words, one shared CPU core): ~1,300 queries/s from 8 concurrent HTTP clients.

Commands (no torchrun: one server is usually shared by every rank's RetrievalClient):
    python server.py --corpus data/corpus.jsonl --host 127.0.0.1 --port 8080    # both APIs on /retrieve
    python server.py --corpus data/corpus.jsonl --port 0 --quiet                # a free port, printed at start (tests)
    python tools.py search --url http://127.0.0.1:8080 "who wrote hamlet"       # query it
"""
import argparse
import io
import json
import re
import selectors
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

from tools import API_FIELDS, BM25Index

# -----------------------------------------------------------------------------
# HTTP retrieval server: both APIs on POST /retrieve, GET /health

def parse_retrieve(body, max_queries, max_k):
    """Validate a /retrieve body -> (api, queries, k, with_scores). Raises ValueError with a client-facing message."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if ("query" in body) == ("queries" in body):
        raise ValueError("give exactly one of 'query' (FlashRAG, with 'tok_k') or 'queries' (Search-R1, with 'topk')")
    api = "flashrag" if "query" in body else "searchr1"
    q_field, k_field, s_field = API_FIELDS[api]
    queries, k = body[q_field], body.get(k_field, 3)
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise ValueError(f"'{q_field}' must be a non-empty list of strings")
    if len(queries) > max_queries:
        raise ValueError(f"too many queries ({len(queries)}, limit {max_queries})")
    if type(k) is not int or not 1 <= k <= max_k:
        raise ValueError(f"'{k_field}' must be an integer in [1, {max_k}]")
    return api, queries, k, bool(body.get(s_field, True))


class DeadlineIO(io.RawIOBase):
    """A socket as a raw stream in which every read and write gets only the time left before `deadline` (monotonic
    seconds). A per-recv socket timeout alone lets a client that sends or reads 1 byte/s hold a thread for ever."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def readable(self):
        return True

    def writable(self):
        return True

    def _arm(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)

    def readinto(self, buffer):
        self._arm()
        return self.sock.recv_into(buffer)

    def write(self, data):
        self._arm()
        self.sock.sendall(data)  # since Python 3.5 the timeout bounds the whole sendall, not each send
        return len(data)


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer with a fixed pool of max_workers threads (ThreadingHTTPServer's one per connection let 300 idle
    connections make 182 threads, 40 clients not reading a 5 MB answer take 582 MB). An idle connection waits in the
    selector (a file descriptor, not a thread), closed after request_timeout seconds of silence. A worker serves ONE
    request (Connection: close: a kept-alive one would hold it) under DeadlineIO: request_timeout to read the request,
    again to write the reply. Search time is not counted (a slow backend is not the client's fault)."""
    request_queue_size = 128  # listen backlog: a burst of clients waits in the kernel instead of being refused

    def __init__(self, address, handler, max_workers=16, request_timeout=30.0):
        if max_workers < 1 or request_timeout <= 0:
            raise ValueError(f"need max_workers >= 1 and request_timeout > 0, got {max_workers}, {request_timeout}")
        super().__init__(address, handler)
        self.max_workers, self.request_timeout = max_workers, request_timeout
        self.pool = ThreadPoolExecutor(max_workers, thread_name_prefix="retrieve")
        self.stopping = threading.Event()

    def serve_forever(self, poll_interval=0.5):
        waiting = {}  # connection -> (client address, monotonic time it is closed if still silent)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            try:
                while not self.stopping.is_set():
                    for key, _ in selector.select(poll_interval):
                        if key.fileobj is self.socket:
                            try:
                                conn, address = self.socket.accept()
                            except OSError:  # the client gave up already, or out of file descriptors: try later
                                continue
                            waiting[conn] = (address, time.monotonic() + self.request_timeout)
                            selector.register(conn, selectors.EVENT_READ)
                        else:  # bytes (or EOF) arrived: the request is a worker's now
                            conn = key.fileobj
                            selector.unregister(conn)
                            self.pool.submit(self.work, conn, waiting.pop(conn)[0])
                    now = time.monotonic()
                    for conn in [c for c, (_, deadline) in waiting.items() if deadline < now]:
                        selector.unregister(conn)
                        del waiting[conn]
                        self.shutdown_request(conn)
            finally:
                for conn in waiting:
                    self.shutdown_request(conn)

    def work(self, conn, address):
        try:
            self.finish_request(conn, address)  # the handler serves one request under its deadlines
        except OSError:  # reset, broken pipe: the client left; nothing to answer
            pass
        except Exception:
            self.handle_error(conn, address)
        finally:
            self.shutdown_request(conn)

    def shutdown(self):
        self.stopping.set()

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def serve(index, host="127.0.0.1", port=8080, max_body=1 << 20, max_queries=512, max_k=100, quiet=False,
          max_workers=16, request_timeout=30.0):
    """Serve index.search (index: anything with search(queries, k) and passages) on a BoundedHTTPServer until Ctrl-C.
    The socket listens before the "serving ... on http://HOST:PORT/retrieve" line is printed (tests parse it)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):  # StreamRequestHandler's, with DeadlineIO in place of its socket files
            self.connection = self.request
            self.io = DeadlineIO(self.connection, time.monotonic() + request_timeout)
            self.rfile, self.wfile = io.BufferedReader(self.io), self.io

        def handle(self):
            self.close_connection = True  # one request per connection (BoundedHTTPServer says why)
            self.handle_one_request()  # a TimeoutError in it is logged and ends the request

        def reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.io.deadline = time.monotonic() + request_timeout  # the reply's own deadline: search time is free
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok", "passages": len(index.passages)})
            else:
                self.reply(404, {"error": f"no such path {self.path}; use POST /retrieve or GET /health"})

        def do_POST(self):
            if self.path != "/retrieve":
                return self.reply(404, {"error": f"no such path {self.path}; use POST /retrieve"})
            length = self.headers.get("Content-Length", "").strip()
            if not length.isdigit():  # missing, negative or junk (chunked uploads are not supported)
                return self.reply(411, {"error": "a valid Content-Length header is required"})
            length = int(length)
            if length > max_body:  # refused before reading a byte of it
                return self.reply(413, {"error": f"body too large ({length} bytes, limit {max_body})"})
            try:
                api, queries, k, with_scores = parse_retrieve(json.loads(self.rfile.read(length)), max_queries, max_k)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
                return self.reply(400, {"error": f"bad request: {e}"})
            except RecursionError:  # e.g. 100k nested brackets: the decoder's recursion limit, not a server fault
                return self.reply(400, {"error": "bad request: JSON nested too deeply"})
            try:
                rows = index.search(queries, k)
            except Exception as e:  # a bug, not the client's fault: say so and keep serving
                return self.reply(500, {"error": f"search failed: {type(e).__name__}: {e}"})
            if api == "flashrag":
                result = [{"documents": [p for p, _ in hits],
                           **({"scores": [s for _, s in hits]} if with_scores else {})} for hits in rows]
            else:
                result = {"result": [[{"document": p, **({"score": s} if with_scores else {})} for p, s in hits]
                                     for hits in rows]}
            self.reply(200, result)

        def log_message(self, fmt, *args):
            if not quiet:
                super().log_message(fmt, *args)

    server = BoundedHTTPServer((host, port), Handler, max_workers=max_workers, request_timeout=request_timeout)
    print(f"serving {len(index.passages)} passages on http://{host}:{server.server_address[1]}/retrieve "
          f"(FlashRAG and Search-R1 APIs; {max_workers} workers, {request_timeout:g} s per request)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


RESULT_LINE = re.compile(r"^result \d+: ", re.M)


def split_results(observation):
    """'result 1: A\\nresult 2: B' -> ["A", "B"] (a passage may span several lines): search_tool's text, undone."""
    return [passage.strip() for passage in RESULT_LINE.split(observation)[1:]]


def serve_tool(registry, host="127.0.0.1", port=8080, tool="search"):
    """serve() with a ToolRegistry's `tool` as the index, passages parsed back out of its observations, ids "wm-RANK"
    (a simulated passage has none). One lock: the registry (its cache, a model behind it) is not thread-safe."""
    lock = threading.Lock()

    def search(queries, k=3):
        with lock:
            observations = registry([(tool, q) for q in queries])
        return [[({"id": f"wm-{i}", "contents": p}, float(k - i)) for i, p in enumerate(split_results(obs)[:k])]
                for obs in observations]
    serve(SimpleNamespace(search=search, passages=[]), host, port)


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a BM25 index over HTTP (FlashRAG and Search-R1 APIs)")
    parser.add_argument("--corpus", required=True, help="JSONL corpus, one {\"id\", \"contents\"} per line (FlashRAG)")
    parser.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (Pyserini default)")
    parser.add_argument("--b", type=float, default=0.4, help="BM25 b (Pyserini default)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = pick a free one, printed at start)")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (else 413)")
    parser.add_argument("--max-queries", type=int, default=512, help="most queries per request (else 400)")
    parser.add_argument("--max-workers", type=int, default=16,
                        help="worker threads, i.e. requests served at once (an idle connection takes none)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a client gets to send its request, and again to read the reply (else dropped)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args()

    t0 = time.time()
    index = BM25Index.from_jsonl(args.corpus, k1=args.k1, b=args.b)
    print(f"indexed {len(index.passages)} passages, {len(index.vocab)} terms in {time.time() - t0:.1f} s",
          file=sys.stderr)
    serve(index, args.host, args.port, max_body=args.max_body, max_queries=args.max_queries, quiet=args.quiet,
          max_workers=args.max_workers, request_timeout=args.request_timeout)
