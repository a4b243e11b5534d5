"""A corpus served over HTTP on loopback, counting every byte it sends: what the data benchmark and
the remote-data tests read through, so read amplification is measured outside the reader.

Serves the files under ``root`` with ``HEAD``, ``GET`` and single ``Range: bytes=a-b`` requests
(206). ``faults`` makes a path misbehave, for tests: ``{"/x.tar": "404"}``, ``"403"``, ``"500"``
(every time), ``"500-once"`` (the first request only), ``"slow"`` (answers after ``slow_s``),
``"no-range"`` (ignores Range, sends the whole file).

Usage::

    with CorpusServer("/data/shar") as server:
        url = server.url("train")                 # http://127.0.0.1:<port>/train
        ...
        print(server.bytes_sent, server.bytes_by_path, server.requests)
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class CorpusServer:
    def __init__(self, root: str | Path, faults: dict | None = None, slow_s: float = 5.0):
        self.root = Path(root).resolve()
        self.faults = dict(faults or {})
        self.slow_s = slow_s
        self.bytes_sent = 0
        self.bytes_by_path: dict[str, int] = {}
        self.requests = 0
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: tests read counters, not logs
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = self.path.split("?")[0]
                with server._lock:
                    server.requests += 1
                    first = path not in server._seen
                    server._seen.add(path)
                fault = server.faults.get(path)
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault in ("403", "404", "500") or (fault == "500-once" and first):
                    self.send_response(int(fault[:3]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = (server.root / path.lstrip("/")).resolve()
                if server.root not in file.parents or not file.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                span = self.headers.get("Range")
                if span and fault != "no-range" and span.startswith("bytes="):
                    lo, hi = span[len("bytes="):].split("-")
                    lo, hi = int(lo), min(int(hi) if hi else len(data) - 1, len(data) - 1)
                    if lo >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    data = data[lo:hi + 1]
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    # Counted before the write: once the client holds the bytes, the counters hold them
                    # too (counted after, a reader that finished could look before this thread counts).
                    with server._lock:
                        server.bytes_sent += len(data)
                        server.bytes_by_path[path] = server.bytes_by_path.get(path, 0) + len(data)
                    self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, relative: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{relative.lstrip('/')}"

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent = self.requests = 0
            self.bytes_by_path.clear()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
