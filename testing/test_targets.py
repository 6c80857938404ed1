"""Several HAProxy hosts from one discovery (`haproxy.targets`): the real SDK against the fake
Resource Manager, read once per cycle, and a v2 and a v3 Data Plane API emulator, one of them
down (refusing connections, hanging, or answering errors). The healthy one converges and stays
steady at one request per cycle, the other backs off alone; `--once` names the one that failed;
`--status` and `--dry-run` cover both; metrics carry the target label.

Ordering, not wall-clock time, proves that a hanging target does not delay the other: the hang
holds until the test has seen the other target's commit.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request

import pytest
from fake_arm import make_estate
from fake_dataplane import FakeDataPlane

import haproxy_azure_discovery as m
from conftest import RELOAD_DELAY, free_port, steps, wait_for

WEB = "azure-web-8080-eastus"
TXN_COMMIT = r"/services/haproxy/transactions/[^/]+$"


@pytest.fixture
def pair(arm):
    """Three running VMs of one service, a v2 and a v3 emulator with passwords of their own."""
    arm.estate = make_estate(vms=3)
    with FakeDataPlane(api="v2", reload_delay=RELOAD_DELAY, password="v2-pass-word", port=free_port()) as v2, \
            FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY, password="v3-pass-word", port=free_port()) as v3:
        yield arm, v2, v3
        for fake in (v2, v3):
            assert fake.violations == [] and fake.errors == [] and fake.open_transactions() == []


def raw_config(arm_config, *targets, **sections) -> dict:
    """arm_config's, with these Data Plane API targets (and a top-level password none of them uses)."""
    return arm_config.raw(haproxy={"password": "unused-top", "timeout": 3, "server_slots": {"base": 4},
                                   "targets": list(targets)},
                          logging={"format": "json"}, **sections)


def target(fake: FakeDataPlane, name: str, **keys) -> dict:
    return {"name": name, "base_url": fake.url, "password": fake.password, **keys}


def live(fake: FakeDataPlane) -> dict[str, list[str]]:
    return {n: sorted(f"{s['address']}:{s['port']}" for s in b["servers"].values() if s.get("maintenance") != "enabled")
            for n, b in fake.backends.items()}


WANT = {WEB: ["10.0.0.4:8080", "10.0.0.5:8080", "10.0.0.6:8080"]}


class Holding:
    """A Data Plane API that accepts connections and never answers until released: a hung host."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.release.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.release.set()
        for conn in self.held:
            conn.close()
        self.sock.close()


# --- --once, --dry-run, --status ----------------------------------------------------------------
@pytest.mark.parametrize("down", ["refused", "timeout"])
def test_once_converges_the_healthy_target_and_names_the_down_one(pair, arm_config, tmp_path, capsys, down):
    arm, v2, v3 = pair
    if down == "refused":
        bad = {"name": "hap-down", "base_url": f"http://127.0.0.1:{free_port()}", "password": "p"}
    else:      # answers nothing within its timeout
        v3.add_fault("*", r".*", delay=5, times=None)
        bad = target(v3, "hap-down", timeout=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(arm_config, bad, target(v2, "hap-v2"))))
    assert m.main(["--once", "-c", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert live(v2) == WANT and v2.commits == 1
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: target hap-down: GET /"), err
    assert ("Connection refused" if down == "refused" else "timed out") in errors[0]
    cycles = [json.loads(line) for line in err if '"event": "cycle"' in line]
    assert [(c["target"], c["result"]) for c in cycles] == [("hap-v2", "applied")]
    assert arm.counts["vms"] == 1          # Azure read once for both


def test_a_hanging_target_does_not_delay_the_others_writes(pair, arm_config, tmp_path, capsys):
    """The hung host is listed first and holds its connection until the test has seen the other
    target's commit: a cycle that applied targets one after the other could never get there."""
    _, v2, _ = pair
    hung, seen, done = Holding(), {}, []

    def watch():
        try:
            wait_for(lambda: v2.count_requests("PUT", TXN_COMMIT) and hung.held, 30, "the v2 commit")
            seen.update(live=live(v2), once_running=not done)
        finally:
            hung.close()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(
        arm_config, {"name": "hap-hung", "base_url": hung.url, "password": "p", "timeout": 60}, target(v2, "hap-v2"))))
    threading.Thread(target=watch, daemon=True).start()
    code = m.main(["--once", "-c", str(path)])
    done.append(code)
    assert seen == {"live": WANT, "once_running": True}      # applied while the other target hung
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: target hap-hung: "), errors


def test_a_second_targets_password_is_masked_in_its_error_line(pair, arm_config, tmp_path, capsys):
    _, v2, v3 = pair
    basic = m.basic_credentials(m.HAProxyConfig(username=v3.username, password=v3.password))
    v3.add_fault("GET", r".*", status=500, message=f"bad login {v3.password} (Authorization: Basic {basic})",
                 times=None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(arm_config, target(v2, "hap-v2"), target(v3, "hap-v3"))))
    assert m.main(["--once", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: target hap-v3: GET /v3/info: HTTP 500 bad login *** (Authorization: Basic ***")
    assert v3.password not in err and basic not in err and v2.password not in err


def test_dry_run_prints_each_targets_plan_and_changes_nothing(pair, arm_config, tmp_path, capsys):
    _, v2, v3 = pair
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(arm_config, target(v2, "hap-v2"), target(v3, "hap-v3"))))
    assert m.main(["--once", "-c", str(path)]) == 0
    v3.edit_server(WEB, "srv2", maintenance="enabled")      # drift on one host only
    capsys.readouterr()
    assert m.main(["--dry-run", "-c", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "target hap-v2:", "1 services, 3 live servers, no changes",
        "target hap-v3:", f"backend {WEB} (4 slots, 3 live)", "  ~ srv2 parked -> 10.0.0.5:8080 (vm-0001)",
        "1 services, 3 live servers, 1 backends to change"]
    assert v3.server(WEB, "srv2")["maintenance"] == "enabled"


def test_status_shows_an_unreachable_target_beside_the_others(pair, arm_config, tmp_path, capsys):
    _, v2, _ = pair
    down = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(arm_config, target(v2, "hap-v2"), {"base_url": down, "password": "p"})))
    assert m.main(["--once", "-c", str(path)]) == 1
    capsys.readouterr()
    assert m.main(["--status", "-c", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[2] == "target hap-v2: 1 backends, in sync"
    assert lines[-1].startswith(f"target {down}: unreachable: GET /v3/info: ") and "refused" in lines[-1]
    assert err.splitlines()[-1].startswith(f"error: target {down}: GET /v3/info: ")
    assert m.main(["--status", "--json", "-c", str(path)]) == 1
    view = json.loads(capsys.readouterr().out)
    assert [(t["target"], t["ok"]) for t in view["targets"]] == [("hap-v2", True), (down, False)]
    assert view["discovery"]["instances"] == 3


# --- the daemon ---------------------------------------------------------------------------------
class Clock:
    """The daemon's clock, moved on by its sleeps: backoffs without waiting for them."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("down", ["refused", "hang"])
def test_the_healthy_target_stays_steady_while_the_other_backs_off(pair, arm_config, caplog, down):
    """Both converge; then the v3 host goes down (its port refuses connections, or it answers
    nothing within its 1 s timeout): the v2 host costs exactly one request per cycle, the v3 one
    is tried only as its backoff (5, 10, 20, 40, 80 s at a 30 s interval) allows, /healthz turns
    503 naming it, and it comes back steady."""
    arm, v2, v3 = pair
    port = free_port()
    cfg = m.parse_config(raw_config(arm_config, target(v2, "hap-v2"), target(v3, "hap-v3", timeout=1),
                                    polling={"interval_seconds": 30, "jitter_seconds": 0},
                                    metrics={"listen": f"127.0.0.1:{port}"}), {})
    clock, cycles, logged = Clock(), [], [0]

    def watch(seconds):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                health = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            health = e.code, e.read().decode()
        tried = {r.target for r in caplog.records[logged[0]:]
                 if getattr(r, "event", "") in ("cycle", "cycle_failed")}
        logged[0] = len(caplog.records)
        cycles.append({"sleep": seconds, "v2": v2.count_requests(), "v3": v3.count_requests(), "tried": tried,
                       "health": health, "metrics": metrics})
        v2.reset_requests()
        v3.reset_requests()
        clock.now += seconds
        if len(cycles) == 1:            # the v3 host goes down ...
            v3.stop() if down == "refused" else v3.add_fault("*", r".*", delay=5, times=None)
        if len(cycles) == 9:            # ... and comes back (on the same port)
            v3.start() if down == "refused" else v3.clear_faults()
    with caplog.at_level(logging.INFO, logger="haproxy_azure_discovery"):
        steps(m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), lambda c: m.DataPlane(c.haproxy),
                       clocks=m.Clocks(monotonic=clock), rand=lambda: 0.0), 12, watch)
    assert live(v2) == WANT and live(v3) == WANT
    assert [c["v2"] for c in cycles[1:]] == [1] * 10               # steady: GET configuration/version
    tried = ["hap-v3" in c["tried"] for c in cycles]
    # t = 0 ok; 30 fails (due 35), 60 (due 70), 90 (due 110), 120 (due 160), 150 skipped,
    # 180 (due 260), 210, 240 skipped, 270: up again, steady from then on.
    assert tried == [True, True, True, True, True, False, True, False, False, True, True], tried
    assert all("hap-v2" in c["tried"] for c in cycles)
    assert all(c["sleep"] == 30 for c in cycles)                  # the healthy host keeps the interval
    if down == "hang":                 # each try while it hangs is one request, cut at its timeout
        assert [c["v3"] for c in cycles[1:]] == [int(t) for t in tried[1:]]
    steady = [r for r in caplog.records if getattr(r, "event", "") == "cycle" and r.target == "hap-v3"]
    assert [r.result for r in steady] == ["applied", "steady", "steady", "steady"]
    assert cycles[0]["health"][0] == 200 and cycles[3]["health"] == (503, "no successful cycle recently for hap-v3\n")
    metrics = cycles[8]["metrics"]
    assert 'haproxy_azure_discovery_cycles_total{target="hap-v2",result="steady"} 8\n' in metrics
    assert 'haproxy_azure_discovery_cycles_total{target="hap-v3",result="failed"} 5\n' in metrics
    assert 'haproxy_azure_discovery_dataplane_requests_total{target="hap-v3"} ' in metrics
    assert 'haproxy_azure_discovery_servers_live{target="hap-v3"} 3\n' in metrics
    assert f'haproxy_azure_discovery_servers_live{{target="hap-v3",backend="{WEB}"}} 3\n' in metrics
    assert "haproxy_azure_discovery_azure_requests_total " in metrics       # once per cycle, no label
    assert arm.counts["vms"] == 12                                             # one discovery per cycle


def test_a_reload_puts_a_new_targets_list_to_use(pair, arm_config):
    _, v2, v3 = pair
    configs = [m.parse_config(raw_config(arm_config, target(v2, "hap-v2")), {}),
               m.parse_config(raw_config(arm_config, target(v3, "hap-v3")), {})]
    made, closed = [], []

    class Closing(m.DataPlane):
        def close(self):
            closed.append(self.cfg.base_url)

    def make(c):
        made.append(c.haproxy.base_url)
        return Closing(c.haproxy)

    daemon = m.Daemon(lambda: configs.pop(0), lambda c: m.AzureSource(c), make)
    steps(daemon, 2, lambda delay: daemon.reload())
    assert made == [v2.url, v3.url] and closed == [v2.url, v3.url]
    assert live(v2) == WANT and live(v3) == WANT


def test_each_target_drains_on_its_own(pair, arm_config):
    """A leaving instance drains on the target where it still has sessions, and is parked at
    once where it has none; each target keeps its own drains."""
    arm, v2, v3 = pair
    cfg = m.parse_config(raw_config(arm_config, target(v2, "hap-v2"), target(v3, "hap-v3"),
                                    safety={"drain_seconds": 30}), {})
    runs = [m.TargetRun(name, c, m.DataPlane(c.haproxy)) for name, c in m.target_configs(cfg)]
    source, stop = m.AzureSource(cfg), m.Flag()
    try:
        m.run_cycle(source, runs, stop)
        slot = next(n for n, s in v2.backends[WEB]["servers"].items() if s["address"] == "10.0.0.5")
        v2.sessions[(WEB, slot)] = 2
        arm.estate.remove("vm-0001")
        reports = m.run_cycle(source, runs, stop)
    finally:
        source.close()
    assert [(r.target, r.result) for r in reports] == [("hap-v2", "draining"), ("hap-v3", "applied")]
    assert live(v2) == WANT and live(v3) == {WEB: ["10.0.0.4:8080", "10.0.0.6:8080"]}
    assert list(runs[0].state.draining[WEB]) == [slot] and runs[1].state.draining == {}
    assert v2.admin_states == {(WEB, slot): "drain"} and v3.admin_states == {}
