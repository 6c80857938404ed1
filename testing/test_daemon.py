"""The daemon systemd runs, while Azure is slow: the real program as a process, a real
sd_notify datagram socket, real signals, the fake Resource Manager's slow pages and the
Data Plane API emulator. In-process where the proof needs no process (token fetches,
Retry-After cap, socket count over 200 reloads, the start budget).

Run under `flock /tmp/e2e.lock`: the tests start daemons and time them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import haproxy_azure_discovery as m  # noqa: E402
from fake_arm import DEFAULT_SUBSCRIPTION, Vm, make_estate, service_tags  # noqa: E402
from fake_dataplane import FakeDataPlane  # noqa: E402
from conftest import RELOAD_DELAY, connections_to, free_port, log_lines, steps, wait_for  # noqa: E402




class Notifications:
    """A real NOTIFY_SOCKET: every datagram, with the monotonic time it arrived."""

    def __init__(self, path: str):
        self.path, self.got = path, []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self._open = True
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def keepalives(self) -> list[float]:
        return [t for t, message in self.got if "WATCHDOG=1" in message.splitlines()]

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self.sock.close()


class Daemon:
    """Fake Azure (6 VMs, 2 a page) + emulator + the daemon process with a notify socket."""

    def __init__(self, tmp_path, arm, arm_config, watchdog_usec: int = 0, interval: float = 0.5):
        self.tmp, self.arm, self.arm_config = tmp_path, arm, arm_config
        arm.estate, arm.page_size = make_estate(vms=6), 2
        self.dp = FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY).start()
        self.notify = Notifications(str(tmp_path / "notify"))
        self.config_path = str(tmp_path / "config.json")
        self.interval, self.watchdog_usec = interval, watchdog_usec
        self.write_config()
        self.proc: subprocess.Popen | None = None

    def write_config(self, haproxy=None, **sections) -> None:
        """arm_config's, the emulator with keys of `haproxy` over it, and this bed's polling and logging
        (unless `polling` or `logging` replaces them)."""
        sections.setdefault("polling", {"interval_seconds": self.interval, "jitter_seconds": 0,
                                        "backoff_base_seconds": 0.5, "max_backoff_seconds": 1})
        sections.setdefault("logging", {"level": "INFO", "format": "json"})
        raw = self.arm_config.raw(haproxy={"base_url": self.dp.url, "password": "${DP_PASSWORD}", "timeout": 3,
                                           "server_slots": {"base": 4}, **(haproxy or {})}, **sections)
        with open(self.config_path + ".tmp", "w") as f:
            json.dump(raw, f)
        os.replace(self.config_path + ".tmp", self.config_path)

    def start(self) -> None:
        env = {"PATH": os.environ["PATH"], "DP_PASSWORD": self.dp.password, **self.arm.env(),
               "NOTIFY_SOCKET": self.notify.path}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.log_path = self.tmp / "daemon.log"
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "haproxy_azure_discovery.py"),
                                      "-c", self.config_path], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"))

    def lines(self) -> list[str]:
        return log_lines(self.log_path)

    def events(self, event: str) -> list[dict]:
        out = []
        for line in self.lines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event:
                    out.append(record)
            elif f"event={event}" in line:      # text format
                out.append({"line": line})
        return out

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        self.dp.stop()
        text = self.log_path.read_text() if self.proc else ""
        for secret in (self.dp.password, self.arm.token, self.arm.identity_header):
            assert secret not in text
        assert "Traceback" not in text, text[-3000:]


@pytest.fixture
def daemon(tmp_path, arm, arm_config):
    beds = []

    def make(**kw) -> Daemon:
        beds.append(Daemon(tmp_path, arm, arm_config, **kw))
        return beds[-1]
    yield make
    for bed in beds:
        bed.close()


# --- watchdog and readiness ----------------------------------------------------------------------
def test_slow_pages_never_starve_the_watchdog(daemon):
    """WATCHDOG_USEC 2 s, VM pages of 1 s each (3 a listing): a keep-alive after every page and at
    each cycle's start, so no gap is longer than WATCHDOG_USEC/2 plus one page."""
    bed = daemon(watchdog_usec=2_000_000)
    page = 1.0
    bed.arm.add_fault("slow", endpoint="vms", delay=page, times=None)
    bed.start()
    wait_for(lambda: len(bed.events("cycle")) >= 3, 60, "three cycles")
    code, _ = bed.stop()
    assert code == 0
    times = bed.notify.keepalives()
    gaps = [b - a for a, b in zip(times, times[1:])]
    cycles = bed.events("cycle")
    assert all(c["duration_ms"] >= 3 * page * 1000 for c in cycles)     # the pages were slow
    assert max(gaps) <= 1.0 + page + 0.5, gaps
    messages = [message for _, message in bed.notify.got]
    assert sum("READY=1" in msg.splitlines() for msg in messages) == 1
    assert any("STATUS=ready after the first cycle" in msg for msg in messages)
    print(f"\nwatchdog: {len(times)} keep-alives over {len(cycles)} cycles of "
          f"{min(c['duration_ms'] for c in cycles)}-{max(c['duration_ms'] for c in cycles)} ms; "
          f"longest gap {max(gaps):.2f} s (WATCHDOG_USEC/2 = 1 s, a page {page} s)")


def test_ready_after_the_start_budget_when_the_first_cycle_is_slow(tmp_path, arm, arm_config, monkeypatch):
    """READY=1 comes at the start budget, with a STATUS saying so, while the first cycle lists."""
    notify = Notifications(str(tmp_path / "notify"))
    arm.estate = make_estate(vms=4)
    arm.page_size = 2
    arm.add_fault("slow", endpoint="vms", delay=1.0, times=None)
    cfg = arm_config()

    notifier = m.Notifier({"NOTIFY_SOCKET": notify.path})
    started = time.monotonic()
    try:
        with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
            cfg = dataclasses.replace(cfg, haproxy=dataclasses.replace(cfg.haproxy, base_url=dp.url,
                                                                       password=dp.password))
            m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), lambda c: m.DataPlane(c.haproxy),
                     notifier=notifier).run(m.Signals(), max_cycles=1, start_budget=0.5)
        time.sleep(0.3)
    finally:
        notify.close()
    (t_ready, ready), (t_cycle, after) = notify.got
    assert ready.splitlines()[0] == "READY=1" and "start budget; first cycle still running" in ready
    assert 0.4 < t_ready - started < 1.5 < t_cycle - started
    assert "READY=1" not in after.splitlines() and "STATUS=last cycle applied: 4 instances" in after


# --- stopping --------------------------------------------------------------------------------------
def test_sigterm_during_a_slow_listing_exits_within_two_seconds(daemon):
    """The second VM page takes 4 s: SIGTERM in the middle of it exits 0 within 2 s, requests no
    page after it, and leaves no transaction open."""
    bed = daemon()
    bed.arm.add_fault("slow", endpoint="vms", page=2, delay=4.0, times=None)
    bed.start()
    wait_for(lambda: any(r.endpoint == "vms" and "$skiptoken" in r.query for r in bed.arm.requests), 30,
             "the second VM page")
    time.sleep(0.5)
    requested = len(bed.arm.requests)
    code, took = bed.stop()
    time.sleep(4.0)                      # the slow page would be answered by now
    assert code == 0 and took < 2.0, (code, took)
    assert len(bed.arm.requests) == requested
    assert bed.dp.open_transactions() == [] and bed.dp.backends == {}
    assert bed.events("shutdown") and bed.events("stopped")
    print(f"\nSIGTERM during a 4 s page: exit {code} after {took:.2f} s, no request after it")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_is_told_to_systemd_before_the_daemon_finishes(daemon, sig):
    """SIGTERM or SIGINT during the sleep: STOPPING=1 reaches NOTIFY_SOCKET, after READY=1 and
    as the last message, and the daemon exits 0."""
    bed = daemon(interval=30)
    bed.start()
    wait_for(lambda: bed.events("cycle"), 30, "the first cycle")
    bed.proc.send_signal(sig)
    assert bed.proc.wait(timeout=10) == 0
    wait_for(lambda: any("STOPPING=1" in msg for _, msg in bed.notify.got), 5, "STOPPING=1")
    messages = [msg.splitlines() for _, msg in bed.notify.got]
    assert "READY=1" in messages[0] and messages[-1] == ["STOPPING=1", "STATUS=stopping"]
    assert sum("STOPPING=1" in msg for msg in messages) == 1
    assert bed.events("stopped")


def test_a_failed_listing_stops_its_siblings(arm, arm_config):
    """The NIC listing fails while the VM listing has slow pages left: discovery fails at once and
    the VM listing requests no further page."""
    arm.estate = make_estate(vms=6)
    arm.page_size = 2
    arm.add_fault("slow", endpoint="vms", delay=1.0, times=None)
    arm.add_fault("500", endpoint="nics", times=None)
    cfg = arm_config(azure={"retries": 0})
    source = m.AzureSource(cfg)
    started = time.monotonic()
    with pytest.raises(m.AzureError, match="network interfaces"):
        source.discover()
    assert time.monotonic() - started < 1.5
    time.sleep(1.5)                      # the VM worker reaches its next page boundary
    assert arm.counts["vms"] == 1
    source.close()


# --- signals and reloads ---------------------------------------------------------------------------
def sighups(proc, count: int = 50, spacing: float = 0.02) -> None:
    for _ in range(count):
        proc.send_signal(signal.SIGHUP)
        if spacing:
            time.sleep(spacing)


def test_sighup_storms_during_a_sleep_and_during_a_cycle(daemon):
    """50 SIGHUPs 20 ms apart while the daemon sleeps, then 50 while a (slow) cycle runs, then a
    burst of 2000: it still cycles, reloads, and stops on SIGTERM with 0."""
    bed = daemon(interval=3)
    bed.start()
    wait_for(lambda: bed.events("cycle"), 30, "the first cycle")
    sighups(bed.proc)                                      # the daemon sleeps 3 s meanwhile
    wait_for(lambda: bed.events("reloaded"), 10, "a reload")
    bed.arm.add_fault("slow", endpoint="vms", delay=1.0, times=None)
    before = len(bed.arm.requests)
    wait_for(lambda: len(bed.arm.requests) > before, 10, "the next cycle")
    sighups(bed.proc)                                      # the cycle takes 3 s
    cycles = len(bed.events("cycle"))
    wait_for(lambda: len(bed.events("cycle")) >= cycles + 2, 30, "two more cycles")
    bed.arm.clear_faults()
    sighups(bed.proc, 2000, 0)
    cycles = len(bed.events("cycle"))
    wait_for(lambda: len(bed.events("cycle")) >= cycles + 2, 20, "two more cycles after the burst")
    assert bed.proc.poll() is None
    code, took = bed.stop()
    assert code == 0 and took < 2.0, (code, took)
    assert len(bed.events("reloaded")) >= 3 and not bed.events("reload_failed")


def test_reload_with_a_missing_ca_file_keeps_the_daemon_running(daemon):
    bed = daemon()
    bed.start()
    wait_for(lambda: bed.events("cycle"), 30, "the first cycle")
    bed.write_config(haproxy={"ca_file": str(bed.tmp / "missing-ca.pem")})
    bed.proc.send_signal(signal.SIGHUP)
    failed = wait_for(lambda: bed.events("reload_failed"), 10, "the reload to fail")
    message = failed[0]["msg"]        # the configuration check may name the key; the SSL context the errno
    assert "keeping the old one" in message and ("ca_file" in message or "No such file" in message), message
    cycles = len(bed.events("cycle"))
    wait_for(lambda: len(bed.events("cycle")) >= cycles + 2, 10, "cycles after the failed reload")
    code, _ = bed.stop()
    assert code == 0


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_reload_applies_log_format_and_metrics_listen(daemon):
    first, second = free_port(), free_port()
    bed = daemon()
    bed.write_config(metrics={"listen": f"127.0.0.1:{first}"})
    bed.start()
    wait_for(lambda: bed.events("cycle"), 30, "the first cycle")
    assert get(f"http://127.0.0.1:{first}/healthz") == 200
    bed.write_config(metrics={"listen": f"127.0.0.1:{second}"}, logging={"level": "INFO", "format": "text"})
    bed.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(line.startswith("info: cycle ") or " info: cycle " in line for line in bed.lines()),
             10, "a text-format cycle line")
    assert get(f"http://127.0.0.1:{second}/healthz") == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{first}/metrics", timeout=2)
    code, _ = bed.stop()
    assert code == 0
    assert any("configuration reloaded" in line for line in bed.lines())


def test_two_hundred_reloads_leave_the_socket_count_flat(arm, arm_config):
    """Each reload builds a new Azure client and credential and closes the old ones: the connections
    this process holds to Azure and to the Data Plane API after 200 reloads (and cycles) are those
    after 10."""
    arm.estate = make_estate(vms=3)
    counts = {}
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        cfg = arm_config(haproxy={"base_url": dp.url, "password": dp.password})
        ports = (urllib.parse.urlsplit(arm.url).port, dp.port)

        def reload(_delay):
            reloads = counts["reloads"] = counts.get("reloads", 0) + 1
            if reloads in (10, 200):
                counts["in use", reloads] = connections_to(*ports)
            daemon.reload()
            if reloads in (10, 200):
                counts[reloads] = connections_to(*ports)

        daemon = m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), lambda c: m.DataPlane(c.haproxy))
        steps(daemon, 202, reload)
        assert dp.open_transactions() == []
    assert counts["in use", 10] >= 1, counts          # the count sees the daemon's own connections
    assert counts[200] - counts[10] <= 2, counts      # Azure clients left open: +25 (the rest collected)
    print(f"\n200 reloads: connections to the fakes {counts}")


# --- Azure: tokens, Retry-After, skips -------------------------------------------------------------
def test_one_token_for_the_first_fan_out(arm, arm_config):
    arm.estate = make_estate(vms=4, uniform_sets=3, per_set=2, resource_groups=("rg-a", "rg-b"))
    cfg = arm_config()
    source = m.AzureSource(cfg)
    source.discover()
    source.discover()
    listings = arm.counts["total"] - arm.counts["token"]
    assert arm.counts["token"] == 1 and listings >= 8, arm.counts
    source.close()


def test_retry_after_is_capped_at_the_azure_timeout(arm, arm_config):
    """A 429 asking for 100 s is retried after azure.timeout (1 s): one page cannot outlast the
    watchdog however long Resource Manager asks us to wait."""
    arm.estate = make_estate(vms=2)
    arm.add_fault("429", endpoint="vms", retry_after=100)
    cfg = arm_config(azure={"timeout": 1})
    source = m.AzureSource(cfg)
    started = time.monotonic()
    assert len(source.discover().instances) == 2
    assert 0.9 < time.monotonic() - started < 5 and arm.counts["vms"] == 2
    source.close()


def test_a_new_skip_in_a_steady_estate_is_warned_about_once(arm, arm_config, caplog):
    arm.estate = make_estate(vms=2)
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        cfg = arm_config(haproxy={"base_url": dp.url, "password": dp.password})
        results = []

        def hook(_delay):
            if len(results) == 1:
                arm.estate.add_vm(Vm(name="vm-bad-port", private_ip="10.0.9.9", tags=service_tags("web", "80x"),
                                     subscription=DEFAULT_SUBSCRIPTION, resource_group="rg-app-0",
                                     location="eastus"))
            results.append(None)

        with caplog.at_level("INFO", logger="haproxy_azure_discovery"):
            steps(m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), lambda c: m.DataPlane(c.haproxy)), 5, hook)
    cycles = [r.result for r in caplog.records if getattr(r, "event", "") == "cycle"]
    warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "skip"]
    assert cycles == ["applied", "steady", "steady", "steady", "steady"]
    assert len(warned) == 1 and "vm-bad-port" in warned[0] and "80x" in warned[0], warned


# --- reloads that fail ----------------------------------------------------------------------------
def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_daemon_makes_two_failed_reloads_good_and_shows_the_debt_meanwhile(daemon):
    """A change whose reload fails, and the reload that should make it good fails too: the daemon
    says so each cycle (an error line, /healthz 503 naming the target, haproxy_config_behind 1),
    backs off, and reloads until one succeeds; then HAProxy runs what the API shows."""
    bed = daemon()
    port = free_port()
    bed.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    bed.start()
    wait_for(lambda: any(e.get("result") == "applied" for e in bed.events("cycle")), 30, "the first sync")
    bed.dp.reload_fail(2)
    bed.arm.estate.add_vm(Vm(name="vm-new", private_ip="10.0.9.9", tags=service_tags("web", 8080)))
    seen = {"health": set(), "behind": set()}

    def watch():
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        seen["health"].add((status, body.strip()))
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        seen["behind"].update(line for line in metrics.splitlines()
                              if "haproxy_config_behind" in line and not line.startswith("#"))
        return bed.events("config_caught_up")
    wait_for(watch, 60, "the debt made good")
    wait_for(lambda: watch() and any("haproxy_config_behind" in x and x.endswith(" 0") for x in seen["behind"]),
             10, "the gauge back to 0")
    code, took = bed.stop()
    assert code == 0 and took < 2
    behind = bed.events("config_behind")
    assert len(behind) == 2 and all(e["level"] == "error" for e in behind)        # one each owing cycle
    assert any(s == 503 and "older configuration than the Data Plane API shows" in b and bed.dp.url in b
               for s, b in seen["health"]), seen["health"]
    assert {x.rsplit(" ", 1)[1] for x in seen["behind"]} == {"0", "1"}
    bed.dp.wait_reloads()
    assert bed.dp.running_backends == bed.dp.backends and bed.dp.reloads >= 4


def test_status_says_haproxy_runs_an_older_configuration(arm, arm_config, tmp_path, capsys):
    arm.estate = make_estate(vms=2)
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        dp.reload_fail(10)
        raw = arm_config.raw(azure={"timeout": 30}, haproxy={"base_url": dp.url, "password": dp.password, "timeout": 3},
                             logging={"format": "text"})
        path = tmp_path / "config.json"
        path.write_text(json.dumps(raw))
        assert m.main(["--once", "-c", str(path)]) == 1
        capsys.readouterr()
        assert m.main(["--status", "-c", str(path)]) == 0
        out = capsys.readouterr().out
        assert "in sync" in out and "!HAProxy runs an older configuration than the Data Plane API shows: reload " \
            in out and "failed at" in out and "(injected fault)" in out
        assert m.main(["--status", "--json", "-c", str(path)]) == 0
        view = json.loads(capsys.readouterr().out)
        assert view["targets"][0]["behind"].startswith("HAProxy runs an older configuration")


# --- a stop that waits for nothing ---------------------------------------------------------------
@pytest.mark.parametrize("where, mode", [("version", "transaction"), ("write", "transaction"),
                                         ("commit", "transaction"), ("version", "hybrid"), ("write", "hybrid")])
def test_sigterm_during_a_hung_data_plane_request_exits_within_two_seconds(daemon, where, mode):
    """The Data Plane API hangs (40 s, haproxy.timeout 60) in the version read, a write or the
    commit: SIGTERM cuts the request, deletes the transaction left open, and exits 0 within 2 s."""
    from fake_dataplane import PATH_TRANSACTION, PATH_VERSION
    bed = daemon()
    bed.write_config(haproxy={"timeout": 60, "apply_mode": mode, "server_slots": {"base": 4}},
                     safety={"drain_seconds": 0})
    bed.start()
    wait_for(lambda: any(e.get("result") == "applied" for e in bed.events("cycle")), 30, "the first sync")
    method, path = {"version": ("GET", PATH_VERSION), "commit": ("PUT", PATH_TRANSACTION),
                    "write": ("PUT", r"/servers/|/backends/azure")}[where]
    hang = bed.dp.add_fault(method, path, delay=40, times=None)
    if where != "version":
        bed.arm.estate.remove("vm-0001")          # a change: a write (and a commit) to send
    wait_for(lambda: hang.hits, 20, f"the hung {where}")
    time.sleep(0.3)
    code, took = bed.stop()
    assert code == 0 and took < 2, (code, took)
    bed.dp.clear_faults()
    assert bed.dp.open_transactions() == []
    assert any(e["event"] in ("shutdown", "stopped") for e in map(json.loads, filter(
        lambda line: line.startswith("{"), bed.lines())))
