"""The fault matrix and the soak: the daemon loop with the real Azure SDK and Data Plane
client against the fake Resource Manager and the emulator, faults injected on both sides.

For every fault: the cycle's outcome, backoff growth and its reset, zero servers drained by
a failed discovery, zero transactions left open, and convergence once the fault is gone.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import resource
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from fake_arm import DEFAULT_SUBSCRIPTION, Vm, make_estate, service_tags  # noqa: E402
from fake_dataplane import PATH_TRANSACTION, PATH_TRANSACTIONS, FakeDataPlane  # noqa: E402
from conftest import RELOAD_DELAY, one_cycle, steps  # noqa: E402

INTERVAL, BASE = 10.0, 1.0
WEB = "azure-web-8080-eastus"


def azure(kind, **kw):
    return lambda arm, dp: arm.add_fault(kind, **kw)


def dataplane(method, path, **kw):
    return lambda arm, dp: dp.add_fault(method, path, **kw)


def refused(arm, dp):
    """Point the client at a port nobody listens on (undone when the fault is cleared)."""
    return "refused"


# name, fault, outcome of cycles 2, 3 and 4 (F failed, O ok); cycle 1 syncs, cycle 5 runs clean
MATRIX = [
    ("azure 429 with Retry-After", azure("429", endpoint="vms", retry_after=1), "OOO"),
    ("azure 500", azure("500", endpoint="vms", times=None), "FFF"),
    ("azure slow past the timeout", azure("slow", endpoint="vmss", delay=2.5, times=None), "FFF"),
    ("azure malformed page", azure("bad_json", endpoint="vms_status", times=None), "FFF"),
    ("azure page without value", azure("no_value", endpoint="vms", page=2, times=None), "FFF"),
    ("azure page failing mid-listing", azure("500", endpoint="vms", page=2, times=None), "FFF"),
    ("azure NIC list failing", azure("500", endpoint="nics", times=None), "FFF"),
    ("azure token endpoint failing", azure("500", endpoint="token", times=None), "OOO"),  # token cached
    ("dataplane 401", dataplane("*", ".", status=401, message="unauthorized", times=None), "FFF"),
    ("dataplane 409 on start", dataplane("POST", PATH_TRANSACTIONS, status=409, times=1), "OOO"),
    ("dataplane 409 on commit x1", dataplane("PUT", PATH_TRANSACTION, status=409, times=1), "OOO"),
    ("dataplane 406 on commit x1", dataplane("PUT", PATH_TRANSACTION, status=406, times=1), "OOO"),
    ("dataplane 409 on commit x4", dataplane("PUT", PATH_TRANSACTION, status=409, times=4), "FOO"),
    ("dataplane 406 on commit x4", dataplane("PUT", PATH_TRANSACTION, status=406, times=4), "FOO"),
    ("dataplane 429 too many transactions", dataplane("POST", PATH_TRANSACTIONS, status=429, times=None), "FFF"),
    ("dataplane 500 on commit", dataplane("PUT", PATH_TRANSACTION, status=500, times=None), "FFF"),
    ("dataplane connection refused", refused, "FFF"),
    ("dataplane hang past the timeout", dataplane("GET", ".", delay=2.5, times=None), "FFF"),
]


def vm(name: str, address: str) -> Vm:
    return Vm(name=name, private_ip=address, tags=service_tags("web", 8080), subscription=DEFAULT_SUBSCRIPTION,
              resource_group="rg-app-0", location="eastus")


def live(dp) -> set[str]:
    return {s["address"] for s in dp.backends.get(WEB, {}).get("servers", {}).values()
            if s.get("maintenance") != "enabled"}


@pytest.fixture
def bed(arm):
    arm.estate, arm.page_size = make_estate(vms=4), 3
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        stream = io.StringIO()
        m.setup_logging("DEBUG", "json", [dp.password], stream)
        yield arm, dp, stream
        assert dp.violations == [] and dp.errors == [] and dp.check_failures == 0
        for line in stream.getvalue().splitlines():
            json.loads(line)
            for secret in (dp.password, arm.token, arm.identity_header):
                assert secret not in line
        logging_root = m.logging.getLogger()
        for handler in logging_root.handlers[:]:
            logging_root.removeHandler(handler)


def config(arm_config, dp, **sections):
    """arm_config's with 1.5 s timeouts on both sides, the emulator, and this module's polling (unless
    `polling` replaces it)."""
    sections.setdefault("polling", {"interval_seconds": INTERVAL, "jitter_seconds": 0, "backoff_base_seconds": BASE,
                                    "max_backoff_seconds": 100})
    return arm_config(azure={"timeout": 1.5}, haproxy={"base_url": dp.url, "password": dp.password, "timeout": 1.5},
                      **sections)


@pytest.mark.parametrize("name, fault, outcome", MATRIX, ids=[row[0] for row in MATRIX])
def test_fault_matrix(bed, arm_config, name, fault, outcome):
    arm, dp, _ = bed
    cfg = config(arm_config, dp)
    clients: list[m.DataPlane] = []
    seen: list[tuple[set, list]] = []

    def between_cycles(_delay):
        n = len(seen) + 1
        seen.append((live(dp), dp.open_transactions()))
        if n == 1:                       # the estate changes while the fault is on
            arm.estate.remove("vm-0000")
            arm.estate.add_vm(vm("vm-new", "10.0.1.1"))
            if fault(arm, dp) == "refused":
                clients[0].cfg = dataclasses.replace(cfg.haproxy, base_url="http://127.0.0.1:9")
        if n == 4:
            arm.clear_faults()
            dp.clear_faults()
            clients[0].cfg = cfg.haproxy

    def make_dataplane(c):
        clients.append(m.DataPlane(c.haproxy))
        return clients[0]

    sleeps = steps(m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), make_dataplane, rand=lambda: 0.0), 5,
                   between_cycles)
    before = {"10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"}
    after = {"10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.1.1"}
    assert seen[0] == (before, [])
    failures, expected_sleeps = 0, []
    for k, result in enumerate(outcome, start=2):
        failures = failures + 1 if result == "F" else 0
        expected_sleeps.append(m.next_delay(failures, cfg.polling, 0.0))
        assert seen[k - 1][1] == [], f"cycle {k} left a transaction open"
        if result == "F":
            assert seen[k - 1][0] == (after if "O" in outcome[:k - 2] else before), f"cycle {k} drained"
        else:
            assert seen[k - 1][0] == after, f"cycle {k} did not converge"
    assert sleeps == [INTERVAL, *expected_sleeps]   # growth 1, 2, 4 s; reset after success
    assert live(dp) == after and dp.open_transactions() == []
    print(f"\n{name}: cycles 2-4 {outcome}, sleeps {sleeps}")


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_soak(bed, arm_config):
    """200 cycles of seeded random churn with faults sprinkled in; at the end HAProxy equals
    the desired state, nothing is open, no backend was deleted, memory did not grow."""
    arm, dp, stream = bed
    rng = random.Random(2026)
    cfg = config(arm_config, dp, safety={"max_drain_percent": 100}, polling={
        "interval_seconds": 1, "jitter_seconds": 0, "backoff_base_seconds": 1, "max_backoff_seconds": 1})
    source, client, state, stop = m.AzureSource(cfg), m.DataPlane(cfg.haproxy), m.State(), m.Flag()
    names, counter, rss = ["vm-0000", "vm-0001", "vm-0002", "vm-0003"], 0, []
    results = {"failed": 0}
    for cycle in range(200):
        for _ in range(rng.randint(0, 3)):
            if names and rng.random() < 0.45:
                arm.estate.remove(names.pop(rng.randrange(len(names))))
            else:
                counter += 1
                name = f"vm-s{counter}"
                arm.estate.add_vm(vm(name, f"10.1.{counter // 200}.{counter % 200 + 1}"))
                names.append(name)
        if rng.random() < 0.1:
            arm.add_fault(rng.choice(["500", "bad_json", "429"]), endpoint=rng.choice(["vms", "nics", "vmss"]))
        if rng.random() < 0.1:
            dp.add_fault(rng.choice(["PUT", "POST"]), rng.choice([PATH_TRANSACTION, PATH_TRANSACTIONS]),
                         status=rng.choice([409, 406, 500]))
        try:
            report = one_cycle(cfg, source, client, state, stop)
            results[report.result] = results.get(report.result, 0) + 1
        except m.DiscoveryError:
            results["failed"] += 1
        dp.reset_requests()
        arm.reset_counts()
        stream.seek(0)
        stream.truncate()
        if cycle in (20, 199):
            rss.append(rss_kb())
    arm.clear_faults()
    dp.clear_faults()
    one_cycle(cfg, source, client, state, stop)
    one_cycle(cfg, source, client, state, stop)
    want = {p.inst.private_ip for p in arm.estate.machines()}
    assert live(dp) == want and dp.open_transactions() == [] and list(dp.backends) == [WEB]
    assert results["failed"] >= 10 and results.get("applied", 0) >= 100, results
    assert rss[1] - rss[0] < 8 * 1024, f"RSS grew from {rss[0]} kB to {rss[1]} kB"
    print(f"\nsoak: {results}, RSS {rss[0]} -> {rss[1]} kB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} kB")
