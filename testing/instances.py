#!/usr/bin/env python3
"""Stand-ins for Azure instances: small HTTP servers on loopback addresses (127.0.0.2, …),
each answering every GET with its own name, so a test can see through HAProxy which
instances get traffic. `GET /slow?seconds=N` answers after N seconds (at most 60): a
long-lived request, to watch a draining server finish it. Each server counts the
requests it began (`served`) and those in flight (`active`).

In tests::

    with Instances({"vm-0000": "127.0.0.2", "vm-0001": "127.0.0.3"}, port=18080) as inst:
        ...
        answers = hits("http://127.0.0.1:FRONTEND/", 40)   # Counter of names

Standalone::

    python3 testing/instances.py --port 18080 vm-0000=127.0.0.2 vm-0001=127.0.0.3   # until SIGTERM
    python3 testing/instances.py --hits http://127.0.0.1:18000/ 12                   # who answers
"""
from __future__ import annotations

import argparse
import collections
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        server = self.server
        with server.lock:
            server.served += 1
            server.active += 1
        try:
            self._answer()
        finally:
            with server.lock:
                server.active -= 1

    def _answer(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/slow":
            seconds = urllib.parse.parse_qs(url.query).get("seconds", ["1"])[0]
            time.sleep(min(max(float(seconds), 0.0), MAX_SLOW))
        body = self.server.instance_name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


MAX_SLOW = 60.0      # seconds a /slow request may ask for


class Instances:
    """One HTTP server per (name, address), all on the same port; add and remove freely."""

    def __init__(self, named_addresses: dict[str, str] | None = None, port: int = 18080):
        self.port = port
        self.servers: dict[str, ThreadingHTTPServer] = {}
        for name, address in (named_addresses or {}).items():
            self.add(name, address)

    def add(self, name: str, address: str) -> None:
        server = ThreadingHTTPServer((address, self.port), _Handler)
        server.daemon_threads = True
        server.instance_name = name
        server.lock, server.served, server.active = threading.Lock(), 0, 0
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.servers[name] = server

    def remove(self, name: str) -> None:
        server = self.servers.pop(name)
        server.shutdown()
        server.server_close()

    def close(self) -> None:
        for name in list(self.servers):
            self.remove(name)

    def __enter__(self) -> Instances:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hits(url: str, count: int, headers: dict | None = None, timeout: float = 2.0) -> collections.Counter:
    """Send `count` requests; count the answers by body ("<status>" for errors)."""
    answers: collections.Counter = collections.Counter()
    for _ in range(count):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
                answers[resp.read().decode()] += 1
        except urllib.error.HTTPError as exc:
            answers[f"<{exc.code}>"] += 1
        except OSError as exc:
            answers[f"<{type(exc).__name__}>"] += 1
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--hits", nargs=2, metavar=("URL", "COUNT"), help="send COUNT requests, print who answered")
    parser.add_argument("instances", nargs="*", metavar="NAME=ADDRESS")
    args = parser.parse_args(argv)
    if args.hits:
        for name, count in sorted(hits(args.hits[0], int(args.hits[1])).items()):
            print(f"    {name:<12} {count:3d} {'#' * count}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Instances(dict(pair.split("=", 1) for pair in args.instances), args.port):
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
