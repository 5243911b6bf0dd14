"""One Raft node process with a key-value state machine, for real-process tests and bench/.

    python -m tests.raft.kvnode --id a --peers '{"a": "127.0.0.1:7001", ...}' \
        --data-dir DIR --http-port 8001 [--dial '{...}'] [--timings '{...}'] [--limits '{...}']

The cluster secret comes from the environment (RAFT_SECRET). A small HTTP API on
127.0.0.1 drives it: `GET /status`, `POST /put` `{"key", "value"}`, `GET /get?key=K`
(after a ReadIndex round), `POST /bench` `{"n", "concurrency", "size"}` (commit
latencies measured inside the process), `POST /stop`. It prints `READY` once started.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from controlplane.raft.errors import RaftError
from controlplane.raft.node import RaftNode
from controlplane.raft.settings import RaftLimits, RaftTimings


class KV:
    """A deterministic key-value map; `apply` returns (index, previous value)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()

    def apply(self, index: int, term: int, ctime: float, data: bytes) -> object:
        op = json.loads(data)
        with self.lock:
            previous = self.data.get(op["key"])
            self.data[op["key"]] = op["value"]
        return {"index": index, "previous": previous}

    def snapshot(self) -> bytes:
        with self.lock:
            return json.dumps(self.data, sort_keys=True).encode()

    def restore(self, data: bytes) -> None:
        with self.lock:
            self.data = json.loads(data) if data else {}


def make_handler(node: RaftNode, kv: KV, stop: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length", "0"))
            return json.loads(self.rfile.read(n)) if n else {}

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/status":
                st = dataclasses.asdict(node.status())
                st["keys"] = len(kv.data)
                self._json(200, st)
            elif url.path == "/get":
                key = parse_qs(url.query)["key"][0]
                try:
                    node.read_index().result(5)
                except RaftError as exc:
                    self._json(503, {"error": type(exc).__name__, "detail": str(exc)})
                    return
                self._json(200, {"value": kv.data.get(key)})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path == "/put":
                op = self._body()
                try:
                    result = node.propose(json.dumps(op).encode()).result(10)
                except RaftError as exc:
                    self._json(503, {"error": type(exc).__name__, "detail": str(exc)})
                    return
                self._json(200, result)
            elif url.path == "/bench":
                self._json(200, bench(node, **self._body()))
            elif url.path == "/stop":
                self._json(200, {"stopping": True})
                stop.set()
            else:
                self._json(404, {"error": "not found"})

    return Handler


def bench(node: RaftNode, n: int, concurrency: int, size: int = 100) -> dict[str, Any]:
    """`n` proposals, at most `concurrency` in flight; latency of each, and the total rate."""
    payload = json.dumps({"key": "bench", "value": "x" * size}).encode()
    latencies: list[float] = []
    errors = 0
    sem = threading.Semaphore(concurrency)
    done = threading.Event()
    remaining = [n]
    lock = threading.Lock()

    def finished(t0: float, fut: concurrent.futures.Future[object]) -> None:
        nonlocal errors
        with lock:
            if fut.exception() is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()
        sem.release()

    start = time.perf_counter()
    for _ in range(n):
        sem.acquire()
        t0 = time.perf_counter()
        node.propose(payload).add_done_callback(lambda f, t0=t0: finished(t0, f))
    done.wait(120)
    elapsed = time.perf_counter() - start
    return {
        "latencies_s": latencies,
        "errors": errors,
        "elapsed_s": elapsed,
        "rate": len(latencies) / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--dial", default="{}")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--timings", default="{}")
    parser.add_argument("--limits", default="{}")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    kv = KV()
    node = RaftNode(
        args.id,
        json.loads(args.peers),
        os.environ["RAFT_SECRET"].encode(),
        Path(args.data_dir),
        kv,
        timings=RaftTimings(**json.loads(args.timings)),
        limits=RaftLimits(**json.loads(args.limits)),
        dial=json.loads(args.dial),
    )
    node.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ThreadingHTTPServer(("127.0.0.1", args.http_port), make_handler(node, kv, stop))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("READY", flush=True)
    stop.wait()
    node.stop(transfer_leadership=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
