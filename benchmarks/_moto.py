"""A moto S3 server on 127.0.0.1 in a child process, for the S3 benchmarks.

A child process keeps the server's memory and CPU out of the measured process. ``setup(port)`` runs in
the child before the server starts (e.g. to insert keys straight into moto's backend).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable

BENCH_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _serve(port: int, ready, setup: Callable[[], None] | None) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if setup is not None:
        setup()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ready.set()
    while True:
        time.sleep(3600)


def start_server(setup: Callable[[], None] | None = None, timeout: float = 3600) -> tuple[mp.Process, str]:
    """Start the server, point this process's AWS clients at it, and return (process, endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(port, ready, setup), daemon=True)
    proc.start()
    if not ready.wait(timeout):
        proc.terminate()
        raise SystemExit("the moto server did not come up")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(BENCH_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    return proc, endpoint
