"""A fault-injecting HTTP proxy in front of the loopback S3 server (tests only).

Every ``period``-th request gets a fault instead of a reply, in rotation: ``503 SlowDown``, a connection
reset, or (at most ``max_timeouts`` times) a reply held back past the client's read timeout. Other requests
are forwarded to the real server. It listens on 127.0.0.1 only and stops when the test's fixture ends.
"""

from __future__ import annotations

import collections
import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, period: int = 4, delay: float = 3.0, max_timeouts: int = 2):
        self.upstream = urlsplit(upstream)
        self.period = period
        self.delay = delay  # seconds a "timeout" reply is held; more than the client's read timeout
        self.max_timeouts = max_timeouts
        self.injected: collections.Counter[tuple[str, str]] = collections.Counter()  # (kind, method)
        self._count = 0
        self._kinds = ["slowdown", "reset", "timeout"]
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._next_fault(self.command)
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                if fault == "reset":
                    # SO_LINGER 0 turns close() into a TCP RST: "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "timeout":
                    time.sleep(proxy.delay)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_fault(self, method: str) -> str | None:
        with self._lock:
            self._count += 1
            if self._count % self.period:
                return None
            for _ in range(len(self._kinds)):
                kind = self._kinds[(self._count // self.period) % len(self._kinds)]
                if (
                    kind != "timeout"
                    or sum(n for (k, _m), n in self.injected.items() if k == "timeout") < self.max_timeouts
                ):
                    self.injected[(kind, method)] += 1
                    return kind
                self._count += self.period  # timeouts used up: rotate to the next kind
            return None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
