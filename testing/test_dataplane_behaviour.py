"""The program against the Data Plane API as it really behaves: one full-section write per
changed backend, stable server ids, the version read before the backends, a peer's commit
dropping our transaction, reloads confirmed (and failing), runtime writes that reload after
all, and unparking that never sends traffic to the parked address.

The real client and planner against testing/fake_dataplane.py (v2 and v3, bodies checked
against the specifications, every committed configuration checked by `haproxy -c`); the
unparking test drives a real HAProxy and runs under the e2e lock.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import PERSONALITIES, RELOAD_DELAY, _emulator, one_cycle  # noqa: E402
from fake_dataplane import FakeDataPlane  # noqa: E402
from live_haproxy import LiveHAProxy  # noqa: E402
from test_fake_dataplane import Api  # noqa: E402
from test_haproxy_azure_discovery import WEB, Harness, ScriptedSource, make_instance  # noqa: E402


def ScriptedDiscovery(instances):  # noqa: N802 - reads as the source it builds
    return ScriptedSource(m.Discovery(tuple(instances)))


@pytest.fixture(params=PERSONALITIES)
def dataplane(request):
    """Every test here runs against each dataplaneapi release the emulator plays."""
    yield from _emulator(request.param)


def estate(service: str, first: int, count: int) -> list[m.Instance]:
    """`count` instances of one service with distinct addresses, numbered from `first`."""
    return [make_instance(n, service=service, id=f"/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/"
                                                 f"virtualmachines/{service}{n}") for n in range(first, first + count)]


def server_lines(fake: FakeDataPlane, backend: str) -> list[list[str]]:
    """The `server` lines of one backend in the rendered haproxy.cfg, split into words."""
    lines, inside = [], False
    for line in fake.render().splitlines():
        if line.startswith("backend "):
            inside = line.split()[1] == backend
        elif inside and line.strip().startswith("server "):
            lines.append(line.split())
    return lines


def words_after(words: list[str], keyword: str) -> str | None:
    return words[words.index(keyword) + 1] if keyword in words else None


# --- writes ----------------------------------------------------------------------------
def test_forty_changes_in_four_backends_are_four_writes_and_one_commit():
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as fake:
        h = Harness(fake, haproxy={"server_slots": {"base": 20}})
        services = ("web", "api", "img", "auth")
        first = [i for s in services for i in estate(s, 1, 10)]
        assert h.cycle(first).result == "applied"
        # By hand: an ACL and a server of someone else's in one of our backends.
        backends = fake.backends
        backends[WEB]["acl_list"] = [{"acl_name": "is_admin", "criterion": "path_beg", "value": "/admin"}]
        backends[WEB]["servers"]["manual"] = {"name": "manual", "address": "10.9.9.9", "port": 81}
        fake.seed(backends)
        report = h.cycle(first + [i for s in services for i in estate(s, 11, 10)])
        assert report.result == "applied" and report.transactions == {"committed": 1}
        assert sum(len(b.changes) for b in report.plan.backends) == 40
        writes = [(r.method, r.path) for r in fake.requests if r.method != "GET"]
        assert writes[0] == ("POST", "/v3/services/haproxy/transactions") and writes[-1][0] == "PUT"
        assert sorted(writes[1:-1]) == sorted(("PUT", f"/v3/services/haproxy/configuration/backends/azure-{s}-8080-eastus")
                                              for s in services)
        web = fake.backends[WEB]
        assert web["acl_list"] == [{"acl_name": "is_admin", "criterion": "path_beg", "value": "/admin"}]
        assert web["servers"]["manual"] == {"name": "manual", "address": "10.9.9.9", "port": 81}
        assert "    acl is_admin path_beg /admin" in fake.render()
        assert sum(s["maintenance"] == "disabled" for s in web["servers"].values() if s["name"] != "manual") == 20
        assert h.cycle(first + [i for s in services for i in estate(s, 11, 10)]).result == "steady"
        assert fake.violations == [] and fake.check_failures == 0


def test_ids_stay_with_their_slots_through_growth_past_srv9(dataplane):
    h = Harness(dataplane, haproxy={"server_slots": {"base": 3}})
    h.cycle(estate("web", 1, 3))
    h.cycle(estate("web", 1, 12))                       # 3 + ceil(9 * 1.5) = 17 slots
    lines = server_lines(dataplane, WEB)
    assert len(lines) == 17
    # however the section is written (v3: rebuilt in string order srv1, srv10, srv11, ..., srv2),
    # every slot keeps HAProxy's id = its number
    assert {w[1]: words_after(w, "id") for w in lines} == {f"srv{i}": str(i) for i in range(1, 18)}
    if dataplane.traits.server_order == "name":          # 3.0: Go's map order, another each write
        assert [w[1] for w in lines][:3] == ["srv1", "srv10", "srv11"]


def test_a_foreign_server_keeps_its_id_and_our_slot_goes_without(dataplane, caplog):
    dataplane.seed({WEB: {"mode": "http", "servers": {"manual": {"address": "10.9.9.9", "port": 81, "id": 2}}}})
    h = Harness(dataplane)
    with caplog.at_level(logging.WARNING, logger="haproxy_azure_discovery"):
        h.cycle(estate("web", 1, 3))
        h.cycle(estate("web", 1, 4))
    ids = {w[1]: words_after(w, "id") for w in server_lines(dataplane, WEB)}
    assert ids["manual"] == "2" and ids["srv2"] is None and ids["srv1"] == "1" and ids["srv3"] == "3"
    warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "server_id_taken"]
    assert warned == [f"backend {WEB}: server manual holds id 2, so slot srv2 goes without an explicit id"]


# --- versions and transactions ----------------------------------------------------------
def test_a_change_between_the_version_and_the_backends_read_is_a_conflict(dataplane):
    h = Harness(dataplane)
    h.cycle(estate("web", 1, 2))
    original, edits = h.dp.read_backends, []

    def read_backends(prefix):
        if not edits:               # the version is read; now another client adds a server, once
            backends = dataplane.backends
            backends[WEB]["servers"]["manual"] = {"name": "manual", "address": "10.9.9.9", "port": 81}
            dataplane.seed(backends)
            edits.append(dataplane.version)
        return original(prefix)
    h.dp.read_backends = read_backends
    report = h.cycle(estate("web", 1, 3))
    assert report.result == "applied" and report.transactions == {"conflict": 1, "committed": 1}
    assert dataplane.backends[WEB]["servers"]["manual"]["address"] == "10.9.9.9"   # not overwritten
    paths = [r.path.split("/", 2)[2] for r in dataplane.requests]
    assert paths[:2] == ["services/haproxy/configuration/version", "services/haproxy/configuration/backends"]
    assert h.servers(WEB)["srv3"] != "parked" and dataplane.open_transactions() == []


def test_a_peer_commit_mid_transaction_drops_ours_and_we_replan(dataplane):
    h = Harness(dataplane)
    h.cycle(estate("web", 1, 2))
    original, peer = h.dp.request, Api(dataplane)

    def request(method, path, query=None, body=None, **kw):
        result = original(method, path, query, body, **kw)
        if method == "POST" and path == "/services/haproxy/transactions" and not peer_commits:
            status, _, txn = peer.call("POST", f"/services/haproxy/transactions?version={dataplane.version}")
            assert status == 201
            peer_commits.append(peer.call("PUT", f"/services/haproxy/transactions/{txn['id']}")[0])
        return result
    peer_commits: list[int] = []
    h.dp.request = request
    report = h.cycle(estate("web", 1, 3) + estate("api", 1, 1))
    assert peer_commits == [202]
    assert report.result == "applied" and report.transactions == {"conflict": 1, "committed": 1}
    rejected = [r for r in dataplane.requests if getattr(r, "status", 0) == 400]
    assert len(rejected) == 1 and "transaction_id" in rejected[0].query       # 400 "does not exist"
    assert h.servers(WEB)["srv3"] != "parked" and dataplane.open_transactions() == []


def test_twenty_leaked_transactions_that_can_never_commit_are_deleted_and_the_cycle_applies(dataplane, caplog):
    h = Harness(dataplane)
    h.cycle(estate("web", 1, 1))
    api = Api(dataplane)
    leaked = [api.call("POST", f"/services/haproxy/transactions?version={dataplane.version}")[2]["id"]
              for _ in range(dataplane.max_open_transactions)]
    dataplane.edit_server(WEB, "srv5", weight=7)        # a plain write elsewhere: none of them can commit now
    with caplog.at_level(logging.WARNING, logger="haproxy_azure_discovery"):
        report = h.cycle(estate("web", 1, 2))
    assert report.result == "applied" and h.servers(WEB)["srv2"] == "10.0.0.6:8080"
    assert not set(leaked) & set(dataplane.transactions()) and dataplane.open_transactions() == []
    assert [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "transactions_deleted"] == [
        f"the Data Plane API had too many open transactions: deleted 20 that could never commit (outdated, "
        f"failed or on a version older than {dataplane.version - 1})"]


def test_twenty_transactions_in_progress_on_the_current_version_are_left_alone(dataplane):
    h = Harness(dataplane)
    h.cycle(estate("web", 1, 1))
    api = Api(dataplane)
    leaked = {api.call("POST", f"/services/haproxy/transactions?version={dataplane.version}")[2]["id"]
              for _ in range(dataplane.max_open_transactions)}
    with pytest.raises(m.DataPlaneError, match=r"HTTP 429 .*20 transaction\(s\) in progress on version \d+, none of "
                                               r"them this program's.*not deleted here.*restart dataplaneapi"):
        h.cycle(estate("web", 1, 2))
    assert set(dataplane.open_transactions()) == leaked


# --- reloads ----------------------------------------------------------------------------
def test_the_version_is_recorded_only_once_the_reload_succeeded(dataplane):
    dataplane.reload_duration = 0.3                 # a reload that takes its time (the GET waits on it)
    h = Harness(dataplane)
    started = time.monotonic()
    report = h.cycle(estate("web", 1, 2))
    assert time.monotonic() - started >= 0.3        # the cycle waited for the reload
    assert report.result == "applied" and report.reloads == 1 and dataplane.reloads == 1
    polls = [r for r in dataplane.requests if "/services/haproxy/reloads/" in r.path]
    assert polls and h.state.version == dataplane.version
    assert dataplane.running_backends == dataplane.backends     # what HAProxy runs: what the API shows
    assert h.cycle(estate("web", 1, 2)).result == "steady"


def test_a_failed_reload_fails_the_cycle_and_the_next_one_reloads(dataplane):
    dataplane.fail_reloads = 1
    h = Harness(dataplane)
    with pytest.raises(m.ReloadFailed, match=r"older configuration than the Data Plane API shows: reload \S+ "
                                             r"failed at .*injected fault"):
        h.cycle(estate("web", 1, 2))
    assert h.state.version is None and h.state.fingerprint is None    # nothing recorded as applied
    assert h.state.debt is not None and dataplane.open_transactions() == []
    reloads = dataplane.reloads
    # the API already holds the backend: nothing to write, but HAProxy owes a reload
    report = h.cycle(estate("web", 1, 2))
    assert report.result == "applied" and report.reloads == 1 and dataplane.reloads == reloads + 1
    assert h.state.debt is None and report.behind is None
    assert h.cycle(estate("web", 1, 2)).result == "steady"


# --- hybrid mode ------------------------------------------------------------------------
def test_a_runtime_write_answered_202_is_counted_as_a_reload(dataplane, caplog):
    h = Harness(dataplane, haproxy={"apply_mode": "hybrid"})
    h.cycle(estate("web", 1, 1))
    dataplane.runtime_broken = True
    reloads = dataplane.reloads
    with caplog.at_level(logging.WARNING, logger="haproxy_azure_discovery"):
        report = h.cycle(estate("web", 1, 2))
    # the unpark's two plain writes each reloaded (reload_delay 0: no sharing), and say so
    assert report.transactions == {} and report.reloads == 2 == dataplane.reloads - reloads
    assert [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "runtime_reload"] == [
        f"server {WEB}/srv2: the Data Plane API reloaded HAProxy for a runtime write (answered 202)"] * 2


def test_unparking_moves_the_address_before_lifting_maintenance(dataplane):
    h = Harness(dataplane, haproxy={"apply_mode": "hybrid"})
    h.cycle(estate("web", 1, 1))
    dataplane.runtime_changes.clear()
    report = h.cycle(estate("web", 1, 2))
    assert report.reloads == 0 and h.servers(WEB)["srv2"] == "10.0.0.6:8080"
    assert dataplane.runtime_changes == [f"set server {WEB}/srv2 addr 10.0.0.6 port 8080",
                                         f"set server {WEB}/srv2 state ready"]


@pytest.mark.parametrize("weights", ["tag", "params"])
def test_hybrid_fill_park_fill_of_a_weighted_server_reloads_nothing(dataplane, weights):
    """dataplaneapi's runtime path panics on a nil weight where the server has one (and reloads):
    every body carries the weight, parked or live, so scale events of weighted servers stay runtime."""
    params = {"server": {"params": {"weight": 50}}} if weights == "params" else {}
    h = Harness(dataplane, haproxy={"apply_mode": "hybrid", **params},
                safety={"drain_seconds": 0, "max_drain_percent": 100})
    tags = {"HAProxy:Instance:Weight": "7"} if weights == "tag" else {}
    one, weighted = estate("web", 1, 1), make_instance(2, tags=tags)
    h.cycle(one)
    dataplane.wait_reloads()
    reloads = dataplane.reloads
    for served in (one + [weighted], one, one + [weighted]):          # fill, park, fill
        report = h.cycle(served)
        assert report.result == "applied" and report.transactions == {} and report.reloads == 0, report
    dataplane.wait_reloads()
    assert dataplane.reloads == reloads and h.servers(WEB)["srv2"] == "10.0.0.6:8080"
    assert dataplane.running_backends[WEB]["servers"]["srv2"]["weight"] == (7 if weights == "tag" else 50)


def test_a_fresh_once_after_a_failed_reload_reloads_and_exits_0(dataplane, tmp_path, capsys):
    """One failed reload, then `--once` with nothing changed in Azure: it finds the debt in the
    API's reload records, gets a reload that succeeds, and exits 0; HAProxy runs what the API shows."""
    from test_haproxy_azure_discovery import dp_config
    h = Harness(dataplane)
    dataplane.reload_fail(1)
    with pytest.raises(m.ReloadFailed):
        h.cycle(estate("web", 1, 2))
    assert dataplane.running_backends != dataplane.backends           # HAProxy is behind the API
    cfg = dp_config(dataplane)
    fresh = m.State()
    report = one_cycle(cfg, ScriptedDiscovery(estate("web", 1, 2)), m.DataPlane(cfg.haproxy), fresh, m.Flag())
    assert report.result == "applied" and report.reloads == 1 and fresh.debt is None
    dataplane.wait_reloads()
    assert dataplane.running_backends == dataplane.backends
    # and the next fresh process finds nothing owed: the records show the success after the failure
    again = m.State()
    assert one_cycle(cfg, ScriptedDiscovery(estate("web", 1, 2)), m.DataPlane(cfg.haproxy), again,
                       m.Flag()).result == "unchanged" and again.debt is None


def test_a_restart_between_commit_and_reload_is_made_good(dataplane):
    dataplane.reload_delay = 1.0
    h = Harness(dataplane)
    real_await = h.dp.await_reloads

    def restart_first(reloads, stop):             # dataplaneapi restarts before its ticker came
        dataplane.restart()
        return real_await(reloads, stop)
    h.dp.await_reloads = restart_first
    with pytest.raises(m.ReloadFailed, match="unknown to the Data Plane API"):
        h.cycle(estate("web", 1, 2))
    h.dp.await_reloads = real_await
    report = h.cycle(estate("web", 1, 2))
    assert report.result == "applied" and report.reloads == 1 and h.state.debt is None
    dataplane.wait_reloads()
    assert dataplane.running_backends == dataplane.backends


def test_two_daemons_on_one_haproxy_agree_without_a_leader(dataplane):
    """An operator's HA pair: two discovery daemons write to one HAProxy, with no election. The
    configuration version is the lock: whichever commits second finds the version moved, reads
    what the other wrote, and has nothing left to do. After each of five scale events both
    converge, no instance changes slot, and a quiet spell costs no write."""
    pair = [Harness(dataplane, haproxy={"server_slots": {"base": 4}}, safety={"drain_seconds": 0}),
            Harness(dataplane, haproxy={"server_slots": {"base": 4}}, safety={"drain_seconds": 0})]
    pool = estate("web", 1, 9)
    events = [pool[:3], pool[:5], pool[1:5], pool[1:8], pool[2:9]]
    slot_of: dict[str, str] = {}

    def cycle(h, instances):
        return one_cycle(h.cfg, ScriptedDiscovery(instances), h.dp, h.state, h.stop)
    for served in events:
        threads = [threading.Thread(target=cycle, args=(h, served)) for h in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for _ in range(4):              # until both see nothing to do
            if {cycle(h, served).result for h in pair} <= {"steady", "unchanged"}:
                break
        else:
            pytest.fail(f"no convergence for {len(served)} instances")
        live = {s["address"]: n for n, s in dataplane.backends[WEB]["servers"].items()
                if s.get("maintenance") != "enabled"}
        assert sorted(live) == sorted(i.address for i in served)
        for address, slot in live.items():                  # an instance keeps its slot while it lives
            assert slot_of.setdefault(address, slot) == slot, (address, slot, slot_of[address])
        for gone in set(slot_of) - set(live):
            del slot_of[gone]
    dataplane.reset_requests()
    for _ in range(10):                 # a quiet spell: one version read each, nothing written
        assert {cycle(h, events[-1]).result for h in pair} == {"steady"}
    assert [r for r in dataplane.requests if r.method != "GET"] == [] and len(dataplane.requests) == 20
    assert dataplane.open_transactions() == []


def test_a_value_only_haproxy_refuses_leaves_out_its_backend_alone(dataplane, caplog):
    """`source 999.1.1.1` passes every check of the program and the API's model, and fails
    `haproxy -c` at the commit, which would take every backend of the transaction with it: the
    backends go in halves until the one HAProxy refuses is named; the others are applied."""
    h = Harness(dataplane, services={"api": {"server": {"params": {"source": "999.1.1.1"}}}})
    served = [*estate("web", 1, 2), *estate("api", 1, 2), *estate("img", 1, 1)]
    with caplog.at_level(logging.ERROR, logger="haproxy_azure_discovery"):
        report = h.cycle(served)
    assert report.result == "partial" and list(report.refused) == ["azure-api-8080-eastus"]
    assert "HAProxy refuses the configuration with it" in report.refused["azure-api-8080-eastus"]
    assert sorted(dataplane.backends) == ["azure-img-8080-eastus", WEB]
    assert h.servers(WEB)["srv1"] != "parked" and dataplane.open_transactions() == []
    assert any("backend azure-api-8080-eastus refused" in r.getMessage() for r in caplog.records)
    dataplane.check_failures = 0                 # the emulator's own count of the checks that failed


@pytest.mark.parametrize("fault", ["hang", "fail"])
def test_a_drain_whose_calls_hang_or_fail_holds_nothing_else_up(dataplane, fault):
    from fake_dataplane import PATH_SERVERS
    h = Harness(dataplane, haproxy={"apply_mode": "hybrid"}, safety={"drain_seconds": 30})
    h.cycle(estate("web", 1, 2))
    kind = {"delay": 20} if fault == "hang" else {"status": 500, "message": "runtime API unavailable"}
    dataplane.add_fault("PUT", r"/runtime/.*" + PATH_SERVERS, times=None, **kind)
    dataplane.add_fault("GET", r"/stats/native", times=None, **kind)
    started = time.monotonic()
    report = h.cycle([*estate("web", 2, 1), make_instance(9)])          # web1 leaves, vm9 comes
    took = time.monotonic() - started
    assert report.result == "applied" and "10.0.0.13:8080" in h.servers(WEB).values()   # vm9 added
    assert [d.server for d in report.plan.draining] == ["srv1"]         # web1 drains by its timer
    assert took < m.DRAIN_CALL_TIMEOUT + 3, took
    dataplane.clear_faults()


def _listener(address: str, port: int) -> tuple[socket.socket, list[int]]:
    """A TCP listener that counts the connections it gets."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    sock.settimeout(0.2)
    seen: list[int] = []

    def serve():
        while sock.fileno() != -1:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            seen.append(1)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return sock, seen


def test_no_request_reaches_the_parked_address_while_a_slot_is_unparked():
    """A real HAProxy, hybrid mode, traffic all the while: 127.0.0.1:80 never gets a connection."""
    from instances import Instances, hits
    from conftest import RELOAD_DELAY, free_port
    try:
        parked, seen = _listener("127.0.0.1", 80)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:80: {exc}")
    port, frontend = free_port(), free_port()
    base = (f"frontend fe_main\n    mode http\n    bind 127.0.0.1:{frontend}\n"
            "    use_backend %[str(azure-web-" + str(port) + "-eastus)]\n")   # resolved at run time
    try:
        with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY, base_config=base, live=LiveHAProxy()) as fake, \
                Instances({"vm1": "127.0.0.2"}, port=port) as instances:
            fake.runtime_gap = 0.3           # widen the moment between two runtime commands
            h = Harness(fake, haproxy={"apply_mode": "hybrid", "server_slots": {"base": 3}})
            served = [make_instance(n, port=str(port), address=f"127.0.0.{n + 1}") for n in (1, 2, 3)]
            h.cycle(served[:1])
            assert hits(f"http://127.0.0.1:{frontend}/", 3) == {"vm1": 3}
            instances.add("vm2", "127.0.0.3")
            instances.add("vm3", "127.0.0.4")
            stop, answers = threading.Event(), []

            def traffic():
                while not stop.is_set():
                    answers.append(hits(f"http://127.0.0.1:{frontend}/", 1))
            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            try:
                report = h.cycle(served)
                time.sleep(0.3)
            finally:
                stop.set()
                thread.join(10)
            assert report.reloads == 0 and fake.reloads == 1 == fake.live.reload_count()
            assert len(answers) > 10 and seen == []
    finally:
        parked.close()


# --- models ---------------------------------------------------------------------------
@pytest.mark.parametrize("sections, key", [
    ({"haproxy": {"backend": {"params": {"http_proxy": "enabled"}}}}, "backend field http_proxy"),
    ({"services": {"web": {"backend": {"params": {"http_proxy": "enabled"}}}}}, "backend field http_proxy")])
def test_a_backend_field_the_api_in_use_dropped_is_ignored_with_one_warning(sections, key, caplog):
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as fake:                 # claims dataplaneapi v3.4
        h = Harness(fake, **sections)
        with caplog.at_level(logging.WARNING, logger="haproxy_azure_discovery"):
            assert h.cycle(estate("web", 1, 1)).result == "applied"
            assert h.cycle(estate("web", 1, 2)).result == "applied"
        warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "field_ignored"]
        assert len(warned) == 1 and key in warned[0] and "3.3.6" in warned[0]
        sent = [r.body for r in fake.requests if r.method in ("POST", "PUT") and "backends" in r.path]
        assert sent and all("http_proxy" not in body for body in sent)
        assert fake.violations == []
