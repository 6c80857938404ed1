"""Scaling without reloads (hybrid apply mode) and the mass-drain guard, on a real HAProxy.

Reloads are counted twice: by the emulator with dataplaneapi's rules, and by HAProxy's
own master (`show proc`); the two must agree.
"""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from fake_arm import DEFAULT_SUBSCRIPTION, Vm, make_estate, service_tags  # noqa: E402
from fake_dataplane import FakeDataPlane  # noqa: E402
from instances import Instances, hits  # noqa: E402
from live_haproxy import LiveHAProxy  # noqa: E402
from conftest import RELOAD_DELAY, free_port, one_cycle, wait_for  # noqa: E402


class Scaling:
    """In-process cycles (real SDK, real client) against a live HAProxy behind the emulator."""

    def __init__(self, arm, arm_config, mode: str, api: str = "v3", vms: int = 3, **sections):
        self.port, self.frontend = free_port(), free_port()
        self.arm = arm
        arm.estate = make_estate(vms=vms, ip_base="127.0.0.2", services=(("web", self.port),))
        self.live = LiveHAProxy()
        base = (f"frontend fe_main\n    mode http\n    bind 127.0.0.1:{self.frontend}\n"
                "    use_backend %[str(azure-web-" + str(self.port) + "-eastus)]\n")
        self.dp = FakeDataPlane(api=api, reload_delay=RELOAD_DELAY, base_config=base, live=self.live).start()
        self.instances = Instances(port=self.port)
        self.cfg = arm_config(haproxy={"base_url": self.dp.url, "password": self.dp.password, "apply_mode": mode,
                                       "server": {"params": {"inter": 300, "rise": 1, "fall": 1}}}, **sections)
        self.source, self.client = m.AzureSource(self.cfg), m.DataPlane(self.cfg.haproxy)
        self.state, self.stop = m.State(), m.Flag()
        self.next_ip = 2 + vms

    def add(self) -> None:
        name = f"vm-x{self.next_ip}"
        self.arm.estate.add_vm(Vm(name=name, private_ip=f"127.0.0.{self.next_ip}",
                                  tags=service_tags("web", self.port), subscription=DEFAULT_SUBSCRIPTION,
                                  resource_group="rg-app-0", location="eastus"))
        self.next_ip += 1

    def remove(self, name: str | None = None) -> None:
        self.arm.estate.remove(name or sorted(p.inst.name for p in self.arm.estate.machines())[0])

    def running(self) -> dict[str, str]:
        return {p.inst.name: p.inst.private_ip for p in self.arm.estate.machines()}

    def cycle(self) -> m.CycleReport:
        want = self.running()
        for name in set(self.instances.servers) - set(want):
            self.instances.remove(name)
        for name in sorted(set(want) - set(self.instances.servers)):
            self.instances.add(name, want[name])
        return one_cycle(self.cfg, self.source, self.client, self.state, self.stop)

    def answering(self, expected: set[str]) -> None:
        """Traffic through HAProxy reaches exactly `expected` (health checks settle first)."""
        def ok():
            got = hits(f"http://127.0.0.1:{self.frontend}/", 3 * max(1, len(expected)))
            return set(got) == expected
        wait_for(ok, 10, f"traffic to reach exactly {sorted(expected)}")

    def reloads(self) -> tuple[int, int]:
        """(the emulator's count by dataplaneapi's rules, HAProxy master's own count)"""
        return self.dp.reloads, self.live.reload_count()

    def close(self) -> None:
        self.instances.close()
        self.dp.stop()


@pytest.fixture
def scaling(arm, arm_config):
    beds = []

    def make(mode, **kw):
        beds.append(Scaling(arm, arm_config, mode, **kw))
        return beds[-1]
    yield make
    for bed in beds:
        assert bed.dp.violations == [] and bed.dp.errors == []
        bed.close()


@pytest.mark.parametrize("mode", ["hybrid", "transaction"])
@pytest.mark.parametrize("api", ["v3", "v2"])
def test_scale_events_and_reloads(scaling, mode, api):
    """10 scale events within the slots, then one growth past them."""
    bed = scaling(mode, api=api)
    assert bed.cycle().result == "applied"
    bed.answering({"vm-0000", "vm-0001", "vm-0002"})
    start = bed.reloads()
    assert start[0] == start[1]
    per_event = []
    for event in range(10):
        bed.add() if event % 2 == 0 else bed.remove()
        before = bed.reloads()
        report = bed.cycle()
        assert report.result == "applied"
        after = bed.reloads()
        assert after[0] - before[0] == after[1] - before[1], "emulator and HAProxy disagree on reloads"
        per_event.append(after[1] - before[1])
        bed.answering(set(bed.running()))
    assert per_event == ([0] * 10 if mode == "hybrid" else [1] * 10)
    while len(bed.running()) <= 10:         # growth past the 10 slots
        bed.add()
    before = bed.reloads()
    assert bed.cycle().result == "applied"
    growth = bed.reloads()[1] - before[1]
    assert growth == 1 and bed.reloads()[0] - before[0] == 1
    assert len(bed.dp.backends[f"azure-web-{bed.port}-eastus"]["servers"]) == 12
    bed.answering(set(bed.running()))
    print(f"\n{mode} {api}: {sum(per_event)} reloads for 10 scale events, {growth} for the growth")


def test_partial_listing_is_held_then_applied(scaling):
    """Azure answers 200 but lacks most instances: nothing parks in the first cycle; if the
    result persists (drain_confirm_seconds 0 here), the second cycle parks them. A few
    genuinely gone are never held."""
    bed = scaling("hybrid", vms=8, safety={"drain_confirm_seconds": 0})
    bed.cycle()
    everyone = set(bed.running())
    bed.answering(everyone)
    bed.remove("vm-0007")                                  # a genuine scale-in of one
    report = bed.cycle()
    assert report.result == "applied" and report.plan.held == ()
    bed.answering(everyone - {"vm-0007"})
    for name in ("vm-0001", "vm-0002", "vm-0003", "vm-0004", "vm-0005"):   # 5 of 7 vanish from
        bed.remove(name)                                                      # the listing, not in life
    report = one_cycle(bed.cfg, bed.source, bed.client, bed.state, bed.stop)
    assert report.result == "held" and len(report.plan.held) == 5
    bed.answering(everyone - {"vm-0007"})                   # they still get traffic
    report = one_cycle(bed.cfg, bed.source, bed.client, bed.state, bed.stop)
    assert report.result == "applied" and report.plan.held == ()
    bed.answering({"vm-0000", "vm-0006"})
