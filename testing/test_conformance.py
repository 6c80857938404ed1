"""Conformance: the program's flows against a Data Plane API and the HAProxy under it.

By default against the emulator, once per dataplaneapi release it plays, with a real HAProxy
(master-worker) under it; against any Data Plane API when these are set:

    CONFORMANCE_URL            http://127.0.0.1:5555 (the API's root, without /v2 or /v3)
    CONFORMANCE_USER           (default admin)
    CONFORMANCE_PASSWORD
    CONFORMANCE_MASTER_SOCKET  HAProxy's master CLI socket: reloads are counted by HAProxy
                               (`show proc`), never taken from the API's word
    CONFORMANCE_FRONTEND       HOST:PORT of a frontend that routes by a request header:
                                   use_backend %[req.hdr(x-backend)] if { req.hdr(x-backend) -m found }
    CONFORMANCE_RECORD         a file: every request of the program and its answer, as JSON
                               lines (testing/differential.py compares two such files)
    CONFORMANCE_REPORT         a file: one JSON line per flow that passed, with the requests
                               it cost and the reloads HAProxy's master counted

Each flow uses backends of its own (azure-<flow>-...), so the flows share one HAProxy. The
Azure side is scripted: the instances are what each flow says, served on loopback addresses
where traffic goes through HAProxy.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import PERSONALITIES, free_port, one_cycle, wait_for  # noqa: E402
from instances import Instances, hits  # noqa: E402

EXTERNAL = os.environ.get("CONFORMANCE_URL")
BED_RELOAD_DELAY = 0.2            # the emulator's ticker here: a real HAProxy reloads under it
SUB = "00000000-0000-0000-0000-000000000001"


# === The bed: a Data Plane API, the HAProxy under it, and a way to reach its frontend ===
def _master(path: str, command: str) -> str:
    """One command on HAProxy's master CLI (it refuses connections while it re-executes)."""
    for _ in range(100):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            try:
                sock.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.1)
                continue
            sock.sendall(command.encode() + b"; quit\n")          # the master CLI keeps a connection open
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data.decode()
    raise AssertionError(f"HAProxy's master socket {path} does not answer")


def master_reloads(path: str) -> int:
    text = _master(path, "show proc")
    return next(int(line.split()[2]) for line in text.splitlines() if line.split()[1:2] == ["master"])


class Bed:
    """What every flow needs of the server under test."""
    name: str
    url: str
    username = "admin"
    password: str
    frontend: tuple[str, int]

    def reloads(self) -> int:                                          # HAProxy's own count
        raise NotImplementedError

    def settle(self) -> None:
        """Until no reload is pending or running (the API's reload records say none is)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, _, records = self.raw("GET", "/services/haproxy/reloads")
            if not any(r.get("status") == "in_progress" for r in records or []):
                time.sleep(0.3)          # HAProxy's master finishes re-executing
                return
            time.sleep(0.1)
        raise AssertionError("a reload stays in_progress")

    def break_reloads(self) -> None:                                   # a foreign write HAProxy refuses
        raise NotImplementedError

    def mend_reloads(self) -> None:
        raise NotImplementedError

    def raw(self, method: str, path: str, body=None, api: str | None = None, **query):
        """(status, headers, JSON) of one request, as another client of the API sends it."""
        api = api or self._probe()
        url = f"{self.url}/{api}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
        request.add_header("Authorization", "Basic " + base64.b64encode(
            f"{self.username}:{self.password}".encode()).decode())
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                status, headers, raw = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            status, headers, raw = exc.code, dict(exc.headers), exc.read()
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        if api == "v2" and isinstance(payload, dict) and "data" in payload and method == "GET" \
                and not path.startswith("/services/haproxy/reloads"):
            payload = payload["data"]
        return status, headers, payload

    def _probe(self) -> str:
        if getattr(self, "_api", None) is None:
            self._api = next((api for api in ("v3", "v2") if self.raw("GET", "/info", api=api)[0] == 200), None)
            assert self._api, f"{self.url} is no Data Plane API"
        return self._api

    def version(self) -> int:
        return self.raw("GET", "/services/haproxy/configuration/version")[2]

    def close(self) -> None:
        pass


class EmulatorBed(Bed):
    """The emulator as one dataplaneapi release, a real HAProxy under it."""

    def __init__(self, personality: str):
        from fake_dataplane import FakeDataPlane
        from live_haproxy import LiveHAProxy
        port = free_port()
        base = (f"frontend conformance\n    mode http\n    bind 127.0.0.1:{port}\n"
                "    use_backend %[req.hdr(x-backend)] if { req.hdr(x-backend) -m found }\n")
        self.fake = FakeDataPlane(personality=personality, base_config=base, live=LiveHAProxy(),
                                  reload_delay=BED_RELOAD_DELAY).start()
        self.name, self.url, self.password = f"emulator {personality}", self.fake.url, self.fake.password
        self.frontend = ("127.0.0.1", port)

    def reloads(self) -> int:
        return self.fake.live.reload_count()

    def break_reloads(self) -> None:
        self.fake.fail_reloads = 10 ** 6

    def mend_reloads(self) -> None:
        self.fake.fail_reloads = 0

    def close(self) -> None:
        assert self.fake.errors == [], self.fake.errors
        self.fake.stop()


class ExternalBed(Bed):
    """Any Data Plane API, by environment (see the module's docstring)."""

    def __init__(self):
        self.name, self.url = f"external {EXTERNAL}", EXTERNAL.rstrip("/")
        self.username = os.environ.get("CONFORMANCE_USER", "admin")
        self.password = os.environ["CONFORMANCE_PASSWORD"]
        self.socket = os.environ["CONFORMANCE_MASTER_SOCKET"]
        host, _, port = os.environ["CONFORMANCE_FRONTEND"].rpartition(":")
        self.frontend = (host, int(port))
        self._held: socket.socket | None = None

    def reloads(self) -> int:
        return master_reloads(self.socket)

    def break_reloads(self) -> None:
        """A frontend binding a port another process holds: `haproxy -c` passes, the reload fails."""
        self._held = socket.create_server(("127.0.0.1", 0))
        port = self._held.getsockname()[1]
        self._foreign("POST", "/services/haproxy/configuration/frontends", {"name": "conformance_broken",
                                                                           "mode": "http"})
        binds = ("/services/haproxy/configuration/frontends/conformance_broken/binds" if self._probe() == "v3"
                 else "/services/haproxy/configuration/binds")
        query = {} if self._probe() == "v3" else {"frontend": "conformance_broken"}
        self._foreign("POST", binds, {"name": "held", "address": "127.0.0.1", "port": port}, **query)

    def mend_reloads(self) -> None:
        self._foreign("DELETE", "/services/haproxy/configuration/frontends/conformance_broken")
        if self._held is not None:
            self._held.close()

    def _foreign(self, method: str, path: str, body=None, **query) -> None:
        status, _, payload = self.raw(method, path, body, version=self.version(), **query)
        assert status < 300, (method, path, status, payload)


@pytest.fixture(scope="module", params=["external"] if EXTERNAL else PERSONALITIES)
def bed(request):
    made = ExternalBed() if request.param == "external" else EmulatorBed(request.param)
    try:
        yield made
    finally:
        made.close()


# === What the program sends, recorded ===
class Recorder:
    """A loopback HTTP proxy in front of the API: forwards every request of the program and
    writes it with its answer to CONFORMANCE_RECORD (for testing/differential.py)."""

    def __init__(self, upstream: str, flow: str, path: str | None):
        recorder, self.flow, self.path = self, flow, path
        self.upstream = urllib.parse.urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, headers, raw = recorder.forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.lock = threading.Lock()

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={k: v for k, v in headers.items()
                                                           if k.lower() not in ("host", "connection")})
            resp = conn.getresponse()
            status, reply, raw = resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()
        if self.path:
            split = urllib.parse.urlsplit(path)
            try:
                answer = json.loads(raw) if raw.strip() else None
            except ValueError:
                answer = raw.decode("utf-8", "replace")[:200]
            entry = {"flow": self.flow, "method": method, "path": split.path,
                     "query": dict(urllib.parse.parse_qsl(split.query)),
                     "body": json.loads(body) if body else None, "status": status,
                     "headers": {k: v for k, v in reply.items()
                                 if k.lower() in ("reload-id", "configuration-version", "content-type")},
                     "answer": answer}
            with self.lock, open(self.path, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
        return status, reply, raw

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flow(bed, request):
    """One flow's program against the bed (through the recorder), and its report line."""
    name = request.node.originalname.removeprefix("test_")
    recorder = Recorder(bed.url, name, os.environ.get("CONFORMANCE_RECORD"))
    run = Flow(bed, name, recorder.url)
    try:
        yield run
    finally:
        recorder.close()
        with contextlib.suppress(Exception):
            bed.settle()
        if recorder.path:
            run.record_state(recorder.path)
    if (report := os.environ.get("CONFORMANCE_REPORT")) and run.passed:
        with open(report, "a") as f:
            f.write(json.dumps({"bed": bed.name, "flow": name, "requests": run.requests,
                                "reloads": run.reloads, "cycles": run.cycles, **run.notes}) + "\n")


class Flow:
    """The program (real DataPlane client, scripted discovery) as a flow runs it."""

    def __init__(self, bed: Bed, name: str, url: str):
        self.bed, self.name, self.url = bed, name, url
        self.requests = self.reloads = self.cycles = 0
        self.passed, self.notes = False, {}
        self._start = bed.reloads()

    def config(self, **sections) -> m.Config:
        given = sections.pop("haproxy", {})
        haproxy = {"base_url": self.url, "username": self.bed.username, "password": self.bed.password,
                   "timeout": 30, **given,
                   "backend": {"name_prefix": f"azure-{self.name.replace('_', '')[:20]}", **given.get("backend", {})}}
        return m.parse_config({"azure": {"subscription_id": SUB}, "haproxy": haproxy, **sections}, {})

    def daemon(self, **sections) -> Daemon:
        return Daemon(self, self.config(**sections))

    def backend(self, service: str, port: int = 8080) -> str:
        return f"azure-{self.name.replace('_', '')[:20]}-{service}-{port}-eastus"

    def servers(self, backend: str) -> dict[str, str]:
        """slot -> "address:port" or "parked", as the API shows the backend."""
        path = (f"/services/haproxy/configuration/backends/{backend}/servers" if self.bed._probe() == "v3"
                else "/services/haproxy/configuration/servers")
        status, _, servers = self.bed.raw("GET", path, **({} if self.bed._probe() == "v3" else {"backend": backend}))
        assert status == 200, (status, servers)
        return {s["name"]: "parked" if s.get("maintenance") == "enabled" else f"{s['address']}:{s['port']}"
                for s in servers}

    def record_state(self, path: str) -> None:
        """The flow's backends as the API shows them at its end, for testing/differential.py."""
        prefix = f"azure-{self.name.replace('_', '')[:20]}-"
        status, _, backends = self.bed.raw("GET", "/services/haproxy/configuration/backends")
        with open(path, "a") as f:
            for b in sorted(x["name"] for x in backends or [] if x["name"].startswith(prefix)):
                f.write(json.dumps({"flow": self.name, "method": "STATE", "path": b, "query": {}, "status": 0,
                                    "headers": {}, "answer": self.servers(b)}, sort_keys=True) + "\n")

    def traffic(self, backend: str, count: int = 6, path: str = "/") -> dict[str, int]:
        host, port = self.bed.frontend
        return dict(hits(f"http://{host}:{port}{path}", count, headers={"x-backend": backend}, timeout=10))

    def reloads_now(self) -> int:
        """HAProxy's reloads since the flow began, once nothing is pending."""
        self.bed.settle()
        self.reloads = self.bed.reloads() - self._start
        return self.reloads


class Daemon:
    """One discovery daemon's memory and client, cycled by hand."""

    def __init__(self, flow: Flow, cfg: m.Config):
        self.flow, self.cfg = flow, cfg
        self.dp, self.state, self.stop = m.DataPlane(cfg.haproxy), m.State(), m.Flag()

    def cycle(self, instances) -> m.CycleReport:
        before = self.dp.requests
        try:
            return one_cycle(self.cfg, Scripted(instances), self.dp, self.state, self.stop)
        finally:
            self.flow.requests += self.dp.requests - before
            self.flow.cycles += 1


class Scripted:
    def __init__(self, instances):
        self.instances = tuple(instances)

    def discover(self) -> m.Discovery:
        return m.Discovery(self.instances)


def instance(n: int, service: str, address: str | None = None, port: int = 8080, **tags) -> m.Instance:
    return m.Instance(f"/subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/virtualmachines/{service}{n}",
                      f"{service}{n}", "eastus", {"HAProxy:Service:Name": service, "HAProxy:Service:Port": str(port),
                                                  **tags}, address or f"127.0.1.{n}", "running", "vm")


def served_by(flow: Flow, backend: str) -> set[str]:
    return {v for v in flow.servers(backend).values() if v != "parked"}


# === The flows ===
def test_first_sync_and_steady_cycles(flow):
    d = flow.daemon(haproxy={"server_slots": {"base": 4}})
    estate = [instance(n, s) for s in ("web", "api") for n in (1, 2, 3)]
    report = d.cycle(estate)
    assert report.result == "applied" and report.transactions == {"committed": 1}
    flow.notes["first_sync_requests"] = report.dataplane_requests
    assert flow.reloads_now() == 1
    for _ in range(3):
        report = d.cycle(estate)
        assert report.result == "steady" and report.dataplane_requests == 1
    assert flow.reloads_now() == 1
    assert served_by(flow, flow.backend("web")) == {f"127.0.1.{n}:8080" for n in (1, 2, 3)}
    flow.passed = True


def test_ten_percent_churn(flow):
    d = flow.daemon()
    estate = [instance(n, "web") for n in range(1, 21)]
    d.cycle(estate)
    first = flow.reloads_now()
    churned = estate[2:] + [instance(n, "web") for n in (31, 32)]
    report = d.cycle(churned)
    assert report.result == "applied" and report.transactions == {"committed": 1}
    flow.notes["churn_requests"] = report.dataplane_requests
    assert flow.reloads_now() - first == 1
    assert served_by(flow, flow.backend("web")) == {f"{i.address}:8080" for i in churned}
    flow.passed = True


def test_hybrid_scale_events_cost_no_reload(flow):
    port = free_port()
    names = {f"hy{n}": f"127.0.2.{n}" for n in (1, 2, 3)}
    with Instances(names, port=port):
        d = flow.daemon(haproxy={"apply_mode": "hybrid", "server_slots": {"base": 4}},
                        safety={"drain_seconds": 0, "max_drain_percent": 100})
        two, three = [instance(n, "hy", f"127.0.2.{n}", port) for n in (1, 2)], \
            [instance(n, "hy", f"127.0.2.{n}", port) for n in (1, 2, 3)]
        d.cycle(two)
        before = flow.reloads_now()
        for served in (three, two, three):                    # fill, park, fill: runtime writes
            report = d.cycle(served)
            assert report.result == "applied" and report.transactions == {}, report
        assert flow.reloads_now() == before, "HAProxy reloaded for a hybrid scale event"
        backend = flow.backend("hy", port)
        wait_for(lambda: set(flow.traffic(backend, 9)) == {"hy1", "hy2", "hy3"}, 15, "traffic to all three")
    flow.passed = True


def test_growth_past_the_slots(flow):
    port = free_port()
    names = {f"gr{n}": f"127.0.3.{n}" for n in range(1, 6)}
    with Instances(names, port=port):
        d = flow.daemon(haproxy={"server_slots": {"base": 2}})
        d.cycle([instance(n, "gr", f"127.0.3.{n}", port) for n in (1, 2)])
        before = flow.reloads_now()
        report = d.cycle([instance(n, "gr", f"127.0.3.{n}", port) for n in range(1, 6)])
        assert report.result == "applied" and report.plan.backends[0].slots >= 5
        assert flow.reloads_now() - before == 1
        backend = flow.backend("gr", port)
        wait_for(lambda: len(flow.traffic(backend, 15)) == 5, 15, "traffic to all five")
    flow.passed = True


def test_a_vanished_service_is_parked_not_deleted(flow):
    d = flow.daemon(safety={"drain_seconds": 0, "max_drain_percent": 100})
    keep = [instance(1, "stay")]
    d.cycle(keep + [instance(n, "gone") for n in (1, 2, 3)])
    report = d.cycle(keep)
    assert report.result == "applied"
    assert set(flow.servers(flow.backend("gone")).values()) == {"parked"}
    flow.passed = True


def test_a_graceful_drain_lets_a_long_request_finish(flow):
    port = free_port()
    with Instances({"dr1": "127.0.4.1", "dr2": "127.0.4.2"}, port=port) as inst:
        d = flow.daemon(haproxy={"backend": {"balance": "first"}}, safety={"drain_seconds": 20,
                                                                              "max_drain_percent": 100})
        both = [instance(n, "dr", f"127.0.4.{n}", port) for n in (1, 2)]
        d.cycle(both)
        backend = flow.backend("dr", port)
        wait_for(lambda: flow.traffic(backend, 2) == {"dr1": 2}, 15, "srv1 (dr1) taking the traffic")
        answer: dict = {}
        slow = threading.Thread(target=lambda: answer.update(flow.traffic(backend, 1, "/slow?seconds=3")))
        slow.start()
        wait_for(lambda: inst.servers["dr1"].active, 5, "the long request at dr1")
        report = d.cycle(both[1:])                        # dr1 leaves: it drains
        assert [x.server for x in report.plan.draining] == ["srv1"]
        assert flow.traffic(backend, 3) == {"dr2": 3}     # no new request for the draining one
        slow.join(10)
        assert answer == {"dr1": 1}                       # the long request finished there
        wait_for(lambda: d.cycle(both[1:]).plan.draining == (), 15, "the drain to end (0 sessions)")
        assert flow.servers(backend)["srv1"] == "parked"
    flow.passed = True


def test_a_failed_reload_is_owed_until_one_succeeds(flow):
    d = flow.daemon()
    d.cycle([instance(1, "fr")])
    flow.bed.settle()
    flow.bed.break_reloads()
    try:
        with pytest.raises(m.ReloadFailed):               # our change's reload fails, or the one owed
            for _ in range(3):
                d.cycle([instance(1, "fr"), instance(2, "fr")])
        with pytest.raises(m.ReloadFailed):               # still owed: never steady meanwhile
            d.cycle([instance(1, "fr"), instance(2, "fr")])
    finally:
        flow.bed.mend_reloads()
    report = d.cycle([instance(1, "fr"), instance(2, "fr")])
    assert report.result == "applied" and d.state.debt is None
    assert d.cycle([instance(1, "fr"), instance(2, "fr")]).result in ("steady", "unchanged")
    flow.reloads_now()
    flow.passed = True


def test_a_peer_commit_during_our_transaction_is_replanned(flow):
    d = flow.daemon()
    d.cycle([instance(1, "peer")])
    flow.bed.settle()
    original, peer = d.dp.request, []

    def request(method, path, query=None, body=None, **kw):
        result = original(method, path, query, body, **kw)
        if method == "POST" and path == "/services/haproxy/transactions" and not peer:
            status, _, txn = flow.bed.raw("POST", "/services/haproxy/transactions", version=flow.bed.version())
            peer.append(flow.bed.raw("PUT", f"/services/haproxy/transactions/{txn['id']}")[0])
        return result
    d.dp.request = request
    report = d.cycle([instance(1, "peer"), instance(2, "peer")])
    assert peer and peer[0] in (200, 202)
    assert report.result == "applied" and report.transactions == {"conflict": 1, "committed": 1}
    assert len(served_by(flow, flow.backend("peer"))) == 2
    flow.passed = True


def test_two_writers_agree(flow):
    pair = [flow.daemon(safety={"drain_seconds": 0, "max_drain_percent": 100}) for _ in range(2)]
    pool = [instance(n, "tw") for n in range(1, 8)]
    for served in (pool[:3], pool[1:6], pool[2:7]):
        threads = [threading.Thread(target=d.cycle, args=(served,)) for d in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for _ in range(4):
            if {d.cycle(served).result for d in pair} <= {"steady", "unchanged"}:
                break
        else:
            pytest.fail("the two writers do not converge")
        assert served_by(flow, flow.backend("tw")) == {f"{i.address}:8080" for i in served}
    assert {d.cycle(pool[2:7]).result for d in pair} == {"steady"}
    flow.passed = True


def test_twenty_leaked_transactions(flow):
    d = flow.daemon()
    d.cycle([instance(1, "leak")])
    version = flow.bed.version()
    leaked = [flow.bed.raw("POST", "/services/haproxy/transactions", version=version)[2]["id"] for _ in range(20)]
    status, _, _ = flow.bed.raw("POST", "/services/haproxy/configuration/backends",
                                {"name": "conformance_elsewhere", "mode": "http"}, version=version)
    assert status < 300                                 # a plain write elsewhere: they can never commit
    report = d.cycle([instance(1, "leak"), instance(2, "leak")])
    assert report.result == "applied"
    status, _, listed = flow.bed.raw("GET", "/services/haproxy/transactions")
    assert not {t["id"] for t in listed or []} & set(leaked)
    flow.bed.raw("DELETE", "/services/haproxy/configuration/backends/conformance_elsewhere",
                 version=flow.bed.version())
    flow.passed = True


def test_a_field_the_release_drops_is_ignored(flow):
    probe = m.DataPlane(flow.config().haproxy)
    if "backend.http_proxy" not in probe.dropped_fields():
        pytest.skip("this release keeps http_proxy (and HAProxy 2.6 refuses `option http_proxy`)")
    d = flow.daemon(haproxy={"backend": {"params": {"http_proxy": "enabled"}}})
    assert d.cycle([instance(1, "drop")]).result == "applied"
    assert d.cycle([instance(1, "drop"), instance(2, "drop")]).result == "applied"
    assert d.cycle([instance(1, "drop"), instance(2, "drop")]).result == "steady"
    assert d.state.unkept >= {"backend.http_proxy"}
    flow.passed = True


# === testing/differential.py, on records made up for it ===
def test_the_differential_finds_where_two_records_part(tmp_path):
    import differential
    txn = "0a1b2c3d-0000-4000-8000-00000000000a"
    base = [{"flow": "f", "method": "GET", "path": "/v3/services/haproxy/configuration/version", "query": {},
             "status": 200, "headers": {"Configuration-Version": "3"}, "answer": 3},
            {"flow": "f", "method": "PUT", "path": f"/v3/services/haproxy/transactions/{txn}", "query": {},
             "status": 202, "headers": {"Reload-Id": "2026-12-07-1"}, "answer": {"id": txn, "status": "success"}},
            {"flow": "f", "method": "STATE", "path": "azure-f-web-41234-eastus", "query": {}, "status": 0,
             "headers": {}, "answer": {"srv1": "127.0.2.1:41234"}}]
    other = json.loads(json.dumps(base))
    other[1]["path"] = "/v3/services/haproxy/transactions/99999999-0000-4000-8000-000000000000"
    other[1]["headers"] = {"Reload-Id": "2026-12-07-7"}
    other[2]["path"], other[2]["answer"] = "azure-f-web-50000-eastus", {"srv1": "127.0.2.1:50000"}
    same = differential.compare({"f": base}, {"f": other}, ["f"])
    assert same == []                              # ids, reload ids and ports are not differences
    other[1]["status"], other[1]["headers"] = 200, {}
    other[2]["answer"] = {"srv1": "parked"}
    found = differential.compare({"f": base}, {"f": other}, ["f"])
    assert [d.split(": ", 2)[2].split(" ")[0] for d in found] == ["status", "headers", "the"], found
    other.insert(1, dict(base[0]))
    assert "the program sent PUT" in differential.compare({"f": base}, {"f": other}, ["f"])[0]
