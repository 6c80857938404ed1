"""End to end: the daemon (the plain module and the built .pyz), the fake Resource Manager,
the Data Plane API emulator driving a real HAProxy, and real HTTP through HAProxy to
"instances" on 127.0.0.2, 127.0.0.3, ...

After each scenario the emulator's configuration must equal the desired state, and requests
through the HAProxy frontend must reach every live instance and nothing else.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from fake_arm import DEFAULT_SUBSCRIPTION, Vm, make_estate, service_tags  # noqa: E402
from fake_dataplane import PATH_SERVERS, FakeDataPlane  # noqa: E402
from instances import Instances, hits  # noqa: E402
from live_haproxy import LiveHAProxy  # noqa: E402
from conftest import PERSONALITIES, RELOAD_DELAY, free_port, log_lines, wait_for  # noqa: E402

DRAIN_TAG = {"maintenance": "drain"}




class Bed:
    """Fake Azure + emulator with a live HAProxy + instance servers + the daemon process."""

    def __init__(self, tmp_path, arm, arm_config, personality: str, command: list[str],
                 apply_mode: str = "transaction"):
        self.tmp, self.command, self.port = tmp_path, command, free_port()
        self.frontend = free_port()
        self.arm, self.arm_config = arm, arm_config
        arm.estate, arm.page_size = make_estate(vms=3, ip_base="127.0.0.2", services=(("web", self.port),)), 2
        base = (f"frontend fe_main\n    mode http\n    bind 127.0.0.1:{self.frontend}\n"
                "    use_backend %[req.hdr(x-backend)]\n")
        self.live = LiveHAProxy()
        self.dp = FakeDataPlane(personality=personality, reload_delay=RELOAD_DELAY, base_config=base,
                                live=self.live).start()
        self.instances = Instances(port=self.port)
        self.sync_instances()
        self.config_path = str(tmp_path / "config.json")
        self.write_config(apply_mode=apply_mode)
        self.proc: subprocess.Popen | None = None
        self.logs: list[str] = []

    # --- the estate ---
    def sync_instances(self) -> None:
        """Instance servers run for every machine in the estate that is running."""
        want = {p.inst.name: p.inst.private_ip for p in self.arm.estate.machines()
                if p.inst.power_state == "running"}
        for name in set(self.instances.servers) - set(want):
            self.instances.remove(name)
        for name in sorted(set(want) - set(self.instances.servers)):
            self.instances.add(name, want[name])

    def add_vm(self, name: str, address: str, service: str = "web") -> None:
        self.arm.estate.add_vm(Vm(name=name, private_ip=address, tags=service_tags(service, self.port),
                                  subscription=DEFAULT_SUBSCRIPTION, resource_group="rg-app-0", location="eastus"))
        self.sync_instances()

    def desired(self, denylist=None) -> dict[str, dict[str, str]]:
        """backend -> {address:port: instance name} of what must be live."""
        out: dict[str, dict[str, str]] = {}
        for p in self.arm.estate.machines():
            tags = {**(p.ss.tags if p.ss else {}), **p.inst.tags}
            if p.inst.power_state != "running" or "HAProxy:Service:Name" not in tags:
                continue
            if any(tags.get(k) == v for k, v in (denylist or {}).items()):
                continue
            backend = f"azure-{tags['HAProxy:Service:Name']}-{tags['HAProxy:Service:Port']}-{p.home.location}"
            out.setdefault(backend, {})[f"{p.inst.private_ip}:{tags['HAProxy:Service:Port']}"] = p.inst.name
        return out

    def live_servers(self) -> dict[str, set[str]]:
        """What HAProxy runs (the API may show a commit whose reload is still to come)."""
        return {name: {f"{s['address']}:{s['port']}" for s in b["servers"].values()
                       if s.get("maintenance") != "enabled"}
                for name, b in self.dp.running_backends.items()}

    def converged(self, denylist=None, timeout: float = 30) -> None:
        """Wait until HAProxy holds the desired state, then check real traffic."""
        want = self.desired(denylist)

        def done():
            have = self.live_servers()
            return all(have.get(b, set()) == set(e) for b, e in want.items()) and all(
                not servers for b, servers in have.items() if b not in want)
        wait_for(done, timeout, f"the desired state {want}; HAProxy holds {self.live_servers()}")
        assert self.dp.open_transactions() == []
        for backend in self.dp.backends:
            expected = set(want.get(backend, {}).values())
            answers = self.traffic(backend, max(6, 3 * len(expected)))
            if expected:
                assert set(answers) == expected, (backend, answers)
            else:
                assert set(answers) == {"<503>"}, (backend, answers)

    def traffic(self, backend: str, count: int) -> collections.Counter:
        return hits(f"http://127.0.0.1:{self.frontend}/", count, headers={"X-Backend": backend})

    # --- the daemon ---
    def write_config(self, **extra) -> None:
        raw = self.arm_config.raw(
            tags={"denylist": extra.pop("denylist", {})},
            haproxy={"base_url": self.dp.url, "password": "${DP_PASSWORD}", "timeout": 3,
                     "apply_mode": extra.pop("apply_mode", "transaction"), "server_slots": {"base": 4},
                     "server": {"params": {"inter": 500, "fall": 2, "rise": 1}}},
            polling={"interval_seconds": 0.3, "jitter_seconds": 0, "backoff_base_seconds": 0.3,
                     "max_backoff_seconds": 1},
            # the mass-drain guard confirms by cycles here, not by its 300 s: the scenarios are short
            safety={"drain_confirm_seconds": 0},
            logging={"level": "DEBUG", "format": "json"})
        with open(self.config_path + ".tmp", "w") as f:
            json.dump(raw, f)
        os.replace(self.config_path + ".tmp", self.config_path)

    def start(self) -> None:
        env = {"PATH": os.environ["PATH"], "DP_PASSWORD": self.dp.password, **self.arm.env(),
               "PEX_ROOT": str(self.tmp / "pex")}
        self.log_path = self.tmp / f"daemon-{len(self.logs)}.log"
        self.proc = subprocess.Popen([*self.command, "-c", self.config_path], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"))

    def stop(self, sig=signal.SIGTERM, timeout: float = 8) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.logs.append(self.log_path.read_text())
        return code, time.monotonic() - started

    def cycles(self) -> list[dict]:
        return [r for r in map(json.loads, log_lines(self.log_path)) if r.get("event") == "cycle"]

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop(signal.SIGKILL)
        self.instances.close()
        self.dp.stop()

    def secrets(self) -> list[str]:
        return [self.dp.password, self.arm.token, self.arm.identity_header]


def check_logs(bed: Bed) -> int:
    """Every line the daemon wrote is one JSON object with the stable keys and no secret."""
    lines = [line for text in bed.logs for line in text.splitlines()]
    for line in lines:
        record = json.loads(line)
        assert list(record)[:4] == ["ts", "level", "msg", "event"], line
        for secret in bed.secrets():
            assert secret not in line
    return len(lines)


# The plain module against every dataplaneapi release the emulator plays, the .pyz against the newest.
FLAVOURS = [*(("module", p) for p in PERSONALITIES), ("pyz", "3.4")]


@pytest.fixture(params=FLAVOURS, ids=[f"{a}-{b}" for a, b in FLAVOURS])
def bed(request, tmp_path):
    flavour, personality = request.param
    command = [sys.executable, os.path.join(ROOT, "haproxy_azure_discovery.py")] if flavour == "module" \
        else ["python3", str(request.getfixturevalue("pyz"))]
    # The fake Resource Manager only after the build: its environment (its own CA bundle) is not the build's.
    arm, arm_config = request.getfixturevalue("arm"), request.getfixturevalue("arm_config")
    bed = Bed(tmp_path, arm, arm_config, personality, command)
    yield bed
    bed.close()


def test_scenarios(bed):
    """First sync, scale out past the slots, scale in, deallocate, untag, denylist by SIGHUP,
    a vanishing service, a restart with zero writes, SIGTERM in the middle of a transaction."""
    bed.start()
    bed.converged()                                              # first sync: 3 of 4 slots
    web = f"azure-web-{bed.port}-eastus"
    assert len(bed.dp.backends[web]["servers"]) == 4

    for i in range(3, 7):                                        # scale out past base: growth
        bed.add_vm(f"vm-new-{i}", f"127.0.0.{i + 2}")
    bed.converged()
    assert len(bed.dp.backends[web]["servers"]) == 9             # 4 + ceil(3 x 1.5)

    for name in ("vm-new-5", "vm-new-6"):                        # scale in
        bed.arm.estate.remove(name)
    bed.sync_instances()
    bed.converged()

    bed.arm.estate.update("vm-0001", power_state="deallocated")  # stop a VM
    bed.sync_instances()
    bed.converged()

    bed.arm.estate.update("vm-0002", tags={"HAProxy:Service:Port": str(bed.port)})   # remove a tag
    bed.converged()

    bed.arm.estate.update("vm-new-3", tags={**service_tags("web", bed.port), **DRAIN_TAG})
    bed.write_config(denylist=DRAIN_TAG)                         # SIGHUP with a changed config
    bed.proc.send_signal(signal.SIGHUP)
    bed.converged(denylist=DRAIN_TAG)

    bed.add_vm("vm-api", "127.0.0.20", service="api")            # a second service ...
    bed.converged(denylist=DRAIN_TAG)
    bed.arm.estate.remove("vm-api")                              # ... vanishes: parked, kept
    bed.sync_instances()
    bed.converged(denylist=DRAIN_TAG)
    api = f"azure-api-{bed.port}-eastus"
    assert api in bed.dp.backends and len(bed.dp.backends[api]["servers"]) == 4

    code, seconds = bed.stop()                                   # restart: zero writes
    assert code == 0
    bed.dp.reset_requests()
    bed.start()
    wait_for(lambda: len(bed.cycles()) >= 2, 20, "two cycles after the restart")
    assert [r for r in bed.dp.requests if r.method != "GET"] == []
    assert bed.cycles()[0]["result"] == "unchanged" and bed.cycles()[1]["result"] == "steady"

    # SIGTERM while a transaction is open: a server write hangs, the daemon is told to stop
    before, version = bed.dp.backends, bed.dp.version
    for method in ("POST", "PUT"):
        bed.dp.add_fault(method, PATH_SERVERS + "|/backends(/[^/]+)?$", delay=20, times=None)
    bed.add_vm("vm-late", "127.0.0.21")
    wait_for(lambda: bed.dp.open_transactions(), 20, "a transaction to open")
    wait_for(lambda: bed.dp.count_requests(None, "/servers|/backends/azure"), 20, "a write in the transaction")
    code, seconds = bed.stop()
    assert code == 0 and seconds < 6
    bed.dp.clear_faults()
    assert bed.dp.open_transactions() == []
    assert bed.dp.backends == before and bed.dp.version == version
    assert not any(r.method == "DELETE" and "/backends/" in r.path and "/servers" not in r.path
                   for r in bed.dp.requests)
    assert check_logs(bed) > 20


def test_demo(tmp_path):
    """The newcomer's demo runs to the end and shows traffic following the estate."""
    done = subprocess.run(["bash", os.path.join(HERE, "demo.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert out.count("-- plan (haproxy-azure-discovery --dry-run):") == 3
    assert "mass-drain guard holds" in out and '"dataplane_requests": 1' in out
    status = out.split("(--status)", 1)[1].split("== 4.", 1)[0]
    assert "discovery: 1 services, 4 instances, 0 skipped" in status and ": 1 backends, in sync" in status
    assert re.search(r"srv1 +live +[\d.]+:\d+ +vm-0000", status) and status.count(" parked") >= 3
    four = out.split("== 4.", 1)[1].split("== 5.", 1)[0].rsplit("-- 12 requests through HAProxy answered by:", 1)[1]
    assert "vm-0000        6" in four and "vm-0001        6" in four and "<503>" not in out
    # 5. graceful draining: the long request finishes on the leaving instance, which gets no new one
    five = out.split("== 5.", 1)[1]
    assert re.search(r"srv\d+ +draining +[\d.]+:\d+ +since \S+Z, \d+ s left", five), five
    assert "sessions in flight on the backend (HAProxy's native stats): 2" in five, five
    assert "vm-0000       12" in five, five
    assert "the 8-second request answered (200) by vm-0001" in five, five
    after = five.split("-- its last session ended", 1)[1]
    assert "draining" not in after.split("\n    \"msg\"", 1)[0] and "1 live, 6 parked" in after
    assert "-- HAProxy reloads: 0 to drain, 1 to park" in five
