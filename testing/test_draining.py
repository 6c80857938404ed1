"""Graceful draining on a real HAProxy, end to end: the daemon (the plain module), the fake
Resource Manager, the Data Plane API emulator driving a real HAProxy (runtime `set server
... state drain`, `show stat`), and instances on 127.0.0.x answering through HAProxy.

An instance leaves while a long request to it is in flight: the request finishes, no new
request reaches the instance once the drain began, its slot is parked after
safety.drain_seconds (or as soon as its last session ends), and in hybrid mode the program
never reloads HAProxy. A reload by someone else in the middle of a drain loses nothing.
Every port is a free one; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from fake_arm import make_estate
from fake_dataplane import FakeDataPlane
from instances import Instances, hits
from live_haproxy import LiveHAProxy

from conftest import RELOAD_DELAY, free_port, log_lines, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRAIN_SECONDS = 3


class LongRequest(threading.Thread):
    """One GET /slow?seconds=N through the HAProxy frontend; its answer, status and end time."""

    def __init__(self, url: str, seconds: float):
        super().__init__(daemon=True)
        self.url, self.seconds = f"{url}/slow?seconds={seconds}", seconds
        self.answer, self.error, self.ended = None, None, None

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=self.seconds + 20) as resp:
                self.answer = (resp.status, resp.read().decode())
        except Exception as exc:  # noqa: BLE001 - the test reports whatever happened
            self.error = repr(exc)
        self.ended = time.monotonic()


class DrainBed:
    """Three instances of service web behind a real HAProxy, and the daemon in hybrid mode."""

    def __init__(self, tmp_path, arm, arm_config, api: str):
        self.arm = arm
        self.dp = self.instances = self.log = self.proc = None
        try:
            self._start(tmp_path, arm_config, api)
        except BaseException:
            self.close()                      # what started before the failure stops with it
            raise

    def _start(self, tmp_path, arm_config, api: str) -> None:
        self.port, self.frontend = free_port(), free_port()
        self.arm.estate = make_estate(vms=3, ip_base="127.0.0.2", services=(("web", self.port),))
        self.backend = f"azure-web-{self.port}-eastus"
        base = (f"frontend fe_main\n    mode http\n    bind 127.0.0.1:{self.frontend}\n"
                f"    use_backend %[str({self.backend})]\n")
        self.dp = FakeDataPlane(api=api, reload_delay=RELOAD_DELAY, base_config=base, live=LiveHAProxy()).start()
        self.instances = Instances({p.inst.name: p.inst.private_ip for p in self.arm.estate.machines()},
                                   port=self.port)
        config = arm_config.raw(
            haproxy={"base_url": self.dp.url, "password": "${DP_PASSWORD}", "timeout": 5, "apply_mode": "hybrid",
                     "server_slots": {"base": 4}, "server": {"params": {"inter": 500, "fall": 2, "rise": 1}}},
            # the last instance leaving is drained at once here: the guard is not what is tested
            safety={"drain_seconds": DRAIN_SECONDS, "drain_confirm_cycles": 1, "drain_confirm_seconds": 0},
            polling={"interval_seconds": 0.5, "jitter_seconds": 0},
            logging={"level": "INFO", "format": "json"})
        self.config_path, self.log_path = tmp_path / "config.json", tmp_path / "daemon.log"
        self.config_path.write_text(json.dumps(config))
        env = {"PATH": os.environ["PATH"], "DP_PASSWORD": self.dp.password, **self.arm.env()}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the daemon's stderr, closed in close()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "haproxy_azure_discovery.py"),
                                      "-c", str(self.config_path)], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.frontend}"

    def slot_of(self, name: str) -> str:
        address = next(p.inst.private_ip for p in self.arm.estate.machines() if p.inst.name == name)
        return next(n for n, s in self.dp.backends[self.backend]["servers"].items()
                    if s["address"] == address and s.get("maintenance") != "enabled")

    def parked(self, slot: str) -> bool:
        return self.dp.backends[self.backend]["servers"][slot].get("maintenance") == "enabled"

    def drain_sent(self, slot: str, times: int = 1) -> bool:
        return self.dp.runtime_changes.count(f"set server {self.backend}/{slot} state drain") >= times

    def long_request_to(self, name: str, seconds: float) -> LongRequest:
        """A long request that HAProxy sent to instance `name` (roundrobin: a few tries)."""
        server = self.instances.servers[name]
        for _ in range(6):
            before = server.served
            request = LongRequest(self.url(), seconds)
            request.start()
            wait_for(lambda before=before, request=request: server.served > before or request.ended
                     or self._busy_elsewhere(name), 5, "the request to land")
            if server.served > before:
                return request
            request.join(seconds + 5)
        raise AssertionError(f"no long request reached {name}")

    def _busy_elsewhere(self, name: str) -> bool:
        return any(s.active for n, s in self.instances.servers.items() if n != name)

    def live_reloads(self) -> int:
        """HAProxy's own count of reloads (its master CLI is away for a moment during one)."""
        def count():
            try:
                return (self.dp.live.reload_count(),)
            except OSError:
                return None
        return wait_for(count, 10, "HAProxy's master CLI")[0]

    def cycles(self) -> list[dict]:
        return [r for r in map(json.loads, log_lines(self.log_path)) if r.get("event") == "cycle"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for part, stop in ((self.log, "close"), (self.instances, "close"), (self.dp, "stop")):
            if part is not None:
                getattr(part, stop)()


@pytest.fixture(params=["v3", "v2"])
def bed(request, tmp_path, arm, arm_config):
    bed = DrainBed(tmp_path, arm, arm_config, request.param)
    yield bed
    bed.close()


def test_a_leaving_instance_finishes_its_requests_and_gets_no_new_ones(bed):
    wait_for(lambda: set(hits(bed.url(), 9)) == {"vm-0000", "vm-0001", "vm-0002"}, 30,
             "all three instances to answer through HAProxy")
    bed.dp.wait_reloads()                 # the first sync's reload came (HAProxy may have started with it)
    reloads, live_reloads = bed.dp.reloads, bed.live_reloads()

    # 1. vm-0001 leaves with a request of twice drain_seconds in flight: parked at the deadline.
    slot = bed.slot_of("vm-0001")
    long = bed.long_request_to("vm-0001", 2 * DRAIN_SECONDS)
    bed.arm.estate.remove("vm-0001")
    wait_for(lambda: bed.drain_sent(slot), 10, f"the drain of {slot}")
    drained_at, served = time.monotonic(), bed.instances.servers["vm-0001"].served
    answers = hits(bed.url(), 20)
    assert set(answers) == {"vm-0000", "vm-0002"}, answers                # no new request reaches it
    wait_for(lambda: bed.parked(slot), DRAIN_SECONDS + 5, f"{slot} to be parked")
    parked_after = time.monotonic() - drained_at
    assert DRAIN_SECONDS - 1 <= parked_after <= DRAIN_SECONDS + 3, parked_after
    assert long.ended is None                                            # parked while it still runs ...
    long.join(3 * DRAIN_SECONDS)
    assert long.answer == (200, "vm-0001") and long.error is None        # ... and it finishes
    assert bed.instances.servers["vm-0001"].served == served

    # 2. vm-0002 leaves with a short request in flight: parked once its last session ended.
    slot2 = bed.slot_of("vm-0002")
    short = bed.long_request_to("vm-0002", 1)
    bed.arm.estate.remove("vm-0002")
    wait_for(lambda: bed.drain_sent(slot2), 10, f"the drain of {slot2}")
    drained_at = time.monotonic()
    wait_for(lambda: bed.parked(slot2), DRAIN_SECONDS + 5, f"{slot2} to be parked")
    assert time.monotonic() - drained_at < DRAIN_SECONDS, "parked early: no session left"
    short.join(5)
    assert short.answer == (200, "vm-0002")
    assert set(hits(bed.url(), 6)) == {"vm-0000"}

    # Neither the drains nor the parks reloaded HAProxy.
    assert bed.dp.reloads == reloads and bed.live_reloads() == live_reloads, (bed.dp.reload_history, bed.dp.runtime_changes)

    # 3. Someone else reloads HAProxy while vm-0000 drains: the old process finishes the request
    # it holds, the new one (which forgot the drain, and holds no session) parks the slot.
    slot0 = bed.slot_of("vm-0000")
    last = bed.long_request_to("vm-0000", 2 * DRAIN_SECONDS)
    bed.arm.estate.remove("vm-0000")
    wait_for(lambda: bed.drain_sent(slot0), 10, f"the drain of {slot0}")
    drained_at = time.monotonic()
    bed.dp.seed({}, replace=False)           # another client's change: the live HAProxy reloads
    assert bed.dp.external_reloads == 1 and last.ended is None
    # The next cycle drains the new process again, which holds no session: parked then, well
    # before the drain's time is up (the old process still serves the long request).
    wait_for(lambda: bed.drain_sent(slot0, times=2), DRAIN_SECONDS, f"the drain of {slot0} sent again")
    wait_for(lambda: bed.parked(slot0), DRAIN_SECONDS + 5, f"{slot0} to be parked")
    assert time.monotonic() - drained_at < DRAIN_SECONDS - 0.5, "parked by its sessions, not by its time"
    last.join(3 * DRAIN_SECONDS)
    assert last.answer == (200, "vm-0000") and last.error is None
    assert bed.dp.reloads == reloads                                     # ours: still none
    assert bed.dp.violations == [] and bed.dp.errors == [] and bed.dp.open_transactions() == []
    wait_for(lambda: bed.cycles()[-1]["result"] == "steady", 10, "a steady cycle: nothing left to do")
    assert all(s.get("maintenance") == "enabled" for s in bed.dp.backends[bed.backend]["servers"].values())
    results = [c["result"] for c in bed.cycles()]
    per_cycle = sorted({c["dataplane_requests"] for c in bed.cycles() if c["result"] == "draining"})
    assert per_cycle                          # cycles that drained, with their request counts
    print(f"\n{bed.dp.api} drain figures: reloads during the drains: {bed.dp.reloads - reloads}; "
          f"{slot} parked {parked_after:.1f} s after its drain began (drain_seconds {DRAIN_SECONDS}); "
          f"cycles: {len(results)}, of them draining: {results.count('draining')}, Data Plane requests "
          f"in a draining cycle: {per_cycle}; drain commands sent to HAProxy: "
          f"{sum('state drain' in c for c in bed.dp.runtime_changes)}")
