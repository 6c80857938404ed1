"""azure.require_healthy: a Uniform scale-set instance is served only while its Application Health
extension reports Healthy. Initializing and Unknown wait (not added; a live server the instance
already holds stays), Unhealthy drains as if the instance were gone (the graceful drain, under the
mass-drain guard), and an instance without the extension is served as before.

First the rule and the planner on scripted instances, then the real SDK against the fake Resource
Manager and the real client against the Data Plane API emulator, cycle by cycle.
"""
from __future__ import annotations

import logging
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import one_cycle  # noqa: E402
from fake_arm import make_estate  # noqa: E402
from test_haproxy_azure_discovery import (WEB, apply_to, dp_section, make_config,  # noqa: E402
                                          make_instance, run_plan)

T = 1_800_000_000.0


def uniform(n: int, health: str | None, **kw) -> m.Instance:
    """Instance n of a Uniform scale set, reporting this Application Health."""
    return make_instance(n, kind="uniform", health=health,
                         id=f"/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/"
                            f"virtualmachinescalesets/web/virtualmachines/{n}", **kw)


def requiring(**sections) -> m.Config:
    """A Config with azure.require_healthy on; the mass-drain guard waits no seconds."""
    sections["safety"] = {"drain_confirm_seconds": 0, **sections.get("safety", {})}
    return make_config(azure={"require_healthy": True}, **sections)


def slots(plan: m.Plan, actual: dict) -> dict[str, str]:
    """The web backend once `plan` is applied: slot -> "address" or "parked"."""
    servers = apply_to(actual, plan)[WEB].servers
    return {n: "parked" if s["maintenance"] == "enabled" else s["address"]
            for n, s in servers.items()}


# --- the rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("health, kind, reason", [
    ("healthy", "uniform", None),
    (None, "uniform", None),                               # no extension: served as before
    ("initializing", "uniform", "Application Health initializing: not added until Healthy"),
    ("unknown", "uniform", "Application Health unknown: not added until Healthy"),
    ("unhealthy", "uniform", "Application Health unhealthy: not served (its server drains)"),
    ("unhealthy", "flexible", None),                       # the option covers Uniform sets only
    ("unhealthy", "vm", None),
])
def test_health_blocks_says_why(health, kind, reason):
    inst = make_instance(1, kind=kind, health=health)
    blocked = m.health_blocks(inst, requiring())
    assert blocked == reason if reason is None else blocked.startswith(reason)
    assert m.health_blocks(inst, make_config()) is None    # off: health is never a reason


def test_select_marks_waiting_members_and_leaves_unhealthy_out_without_a_skip():
    instances = [uniform(1, "healthy"), uniform(2, "initializing"), uniform(3, "unknown"),
                 uniform(4, "unhealthy"), uniform(5, None),
                 uniform(6, "unhealthy", state="stopped")]
    groups, skipped = m.select_instances(instances, requiring())
    assert [(mb.label, mb.waits) for mb in groups[m.ServiceKey("web", 8080, "eastus")]] == [
        ("vm1", False), ("vm2", True), ("vm3", True), ("vm5", False)]
    assert skipped == []
    groups, _ = m.select_instances(instances, make_config())
    assert [mb.waits for ms in groups.values() for mb in ms] == [False] * 5


def test_a_waiting_instance_changes_the_fingerprint():
    cfg = requiring()
    waiting, _ = m.select_instances([uniform(1, "initializing")], cfg)
    healthy, _ = m.select_instances([uniform(1, "healthy")], cfg)
    assert m.fingerprint(waiting) != m.fingerprint(healthy)


# --- the planner ------------------------------------------------------------------------------
class TestPlanner:
    def synced(self, instances, cfg):
        d = run_plan(instances, cfg=cfg)
        return apply_to({}, d.plan), m.State(assignments=d.assignments), d

    def test_initializing_is_not_added_then_healthy_is(self):
        cfg = requiring(haproxy={"password": "p", "server_slots": {"base": 2}})
        actual, state, d = self.synced([uniform(1, "healthy"), uniform(2, "initializing")], cfg)
        assert slots(d.plan, {}) == {"srv1": "10.0.0.5", "srv2": "parked"}
        assert d.plan.live == 1 and d.assignments[WEB] == {uniform(1, None).id: "srv1"}
        again = run_plan([uniform(1, "healthy"), uniform(2, "initializing")], actual, state, cfg)
        assert again.plan.empty and again.plan.live == 1
        ready = run_plan([uniform(1, "healthy"), uniform(2, "healthy")], actual, state, cfg)
        assert slots(ready.plan, actual) == {"srv1": "10.0.0.5", "srv2": "10.0.0.6"}

    @pytest.mark.parametrize("health", ["initializing", "unknown"])
    def test_a_served_instance_that_turns_initializing_or_unknown_keeps_its_slot(self, health):
        cfg = requiring()
        actual, state, _ = self.synced([uniform(1, "healthy"), uniform(2, "healthy")], cfg)
        turned = [uniform(1, "healthy"), uniform(2, health)]
        d = run_plan(turned, actual, state, cfg, drain=30, now=T)
        assert d.plan.empty and d.plan.draining == () and d.plan.live == 2
        assert d.assignments == state.assignments
        # ... also after a restart, found by address:port
        d = run_plan(turned, actual, m.State(), cfg, drain=30)
        assert d.plan.empty and d.assignments == state.assignments

    def test_unhealthy_drains_gracefully_as_if_gone(self):
        cfg = requiring()
        actual, state, _ = self.synced([uniform(1, "healthy"), uniform(2, "healthy")], cfg)
        sick = [uniform(1, "healthy"), uniform(2, "unhealthy")]
        d = run_plan(sick, actual, state, cfg, drain=30, now=T)
        gone = run_plan([uniform(1, "healthy")], actual, state, cfg, drain=30, now=T)
        assert d.plan == gone.plan and d.draining == gone.draining
        drains = [(x.server, x.address, x.until) for x in d.plan.draining]
        assert drains == [("srv2", "10.0.0.6", T + 30)]
        # Unknown during the drain does not end it; parked when its time is up, and stays out.
        during = m.State(assignments=d.assignments, draining=d.draining)
        unknown = [uniform(1, "healthy"), uniform(2, "unknown")]
        d2 = run_plan(unknown, actual, during, cfg, drain=30, now=T + 10)
        assert [x.server for x in d2.plan.draining] == ["srv2"] and d2.plan.ready == ()
        d3 = run_plan(unknown, actual, m.State(assignments=d2.assignments, draining=d2.draining),
                      cfg, drain=30, now=T + 30)
        assert slots(d3.plan, actual)["srv2"] == "parked" and d3.plan.live == 1
        after = apply_to(actual, d3.plan)
        d4 = run_plan(unknown, after, m.State(assignments=d3.assignments), cfg, drain=30,
                      now=T + 40)
        assert d4.plan.empty and d4.plan.live == 1

    def test_the_mass_drain_guard_holds_a_fleet_turned_unhealthy(self):
        cfg = requiring(haproxy={"password": "p"},
                        safety={"drain_confirm_cycles": 2, "drain_confirm_seconds": 0})
        fleet = [uniform(n, "healthy") for n in range(1, 5)]
        actual, state, _ = self.synced(fleet, cfg)
        sick = [uniform(n, "unhealthy") for n in range(1, 5)]
        d = run_plan(sick, actual, state, cfg, drain=30, now=T)
        assert len(d.plan.held) == 4 and d.plan.draining == ()

    def test_off_serves_every_health(self):
        instances = [uniform(1, "unhealthy"), uniform(2, "initializing"), uniform(3, "unknown")]
        d = run_plan(instances, cfg=make_config())
        assert d.plan.live == 3


# --- the real SDK against the fake Resource Manager, the real client against the emulator ---------
DRAIN = 30


class Bed:
    """The daemon's cycles in-process on a clock: AzureSource against the fake (a Uniform set of
    four: _0 Healthy, _1 Initializing, _2 Unhealthy, _3 without the extension), DataPlane
    against the emulator."""

    def __init__(self, arm, arm_config, dataplane, **azure):
        arm.estate = make_estate(uniform_sets=1, per_set=4)
        for n, health in enumerate(("Healthy", "Initializing", "Unhealthy", None)):
            arm.estate.update(f"uvmss-00_{n}", health=health)
        self.arm, self.dp, self.now = arm, dataplane, T
        self.cfg = arm_config(azure={"timeout": 2, **azure}, haproxy=dp_section(dataplane),
                              safety={"drain_seconds": DRAIN, "drain_confirm_seconds": 0})
        self.source, self.client = m.AzureSource(self.cfg), m.DataPlane(self.cfg.haproxy)
        self.state = m.State()

    def cycle(self, seconds: float = 1.0) -> m.CycleReport:
        self.now += seconds
        return one_cycle(self.cfg, self.source, self.client, self.state, m.Flag(),
                           m.Clocks(wall=lambda: self.now))

    def served(self) -> dict[str, str]:
        """Instance name -> the slot that serves it (live servers only)."""
        names = {p.inst.private_ip: p.inst.name for p in self.arm.estate.machines()}
        return {names[s["address"]]: n for n, s in self.dp.backends[WEB]["servers"].items()
                if s.get("maintenance") != "enabled"}

    def set(self, n: int, health: str | None) -> None:
        self.arm.estate.update(f"uvmss-00_{n}", health=health)


@pytest.fixture
def bed(arm, arm_config, dataplane):
    return Bed(arm, arm_config, dataplane, require_healthy=True)


def no_health_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "azure_no_health"]


def test_healthy_served_initializing_waits_unhealthy_drains_none_served_with_a_warning(bed, caplog):
    caplog.set_level(logging.WARNING, logger="haproxy_azure_discovery")
    assert bed.cycle().result == "applied"
    assert set(bed.served()) == {"uvmss-00_0", "uvmss-00_3"}
    (warning,) = no_health_warnings(caplog)
    assert warning.count == 1 and "scale set uvmss-00: 1 running instances" in warning.getMessage()
    assert warning.scale_set.endswith("/virtualmachinescalesets/uvmss-00")
    # Initializing turns Healthy: added. One warning per scale set, whatever the cycles.
    bed.set(1, "Healthy")
    assert bed.cycle().result == "applied"
    assert set(bed.served()) == {"uvmss-00_0", "uvmss-00_1", "uvmss-00_3"}
    assert len(no_health_warnings(caplog)) == 1
    # A served instance that turns Unknown (or Initializing) keeps its slot: nothing is written.
    before, version = bed.served(), bed.dp.version
    bed.set(1, "Unknown")
    assert bed.cycle().result == "unchanged" and bed.served() == before
    assert bed.dp.version == version and bed.dp.admin_states == {}
    assert bed.cycle().result == "steady"
    # A served instance that turns Unhealthy drains as if gone: live while its sessions finish,
    # no new ones (runtime drain), parked when drain_seconds are up.
    slot = before["uvmss-00_0"]
    bed.dp.sessions[(WEB, slot)] = 2
    bed.set(0, "Unhealthy")
    report = bed.cycle()
    assert report.result == "draining" and bed.dp.admin_states == {(WEB, slot): "drain"}
    assert [d.server for d in report.plan.draining] == [slot] and "uvmss-00_0" in bed.served()
    assert bed.cycle(DRAIN / 2).result == "draining"
    assert bed.cycle(DRAIN / 2).result == "applied"
    assert set(bed.served()) == {"uvmss-00_1", "uvmss-00_3"}
    # Once parked, Healthy again is a new arrival; Unhealthy _2 never served.
    bed.set(0, "Healthy")
    assert bed.cycle().result == "applied"
    assert set(bed.served()) == {"uvmss-00_0", "uvmss-00_1", "uvmss-00_3"}
    assert bed.dp.open_transactions() == []


def test_scale_out_joins_once_healthy(bed):
    bed.cycle()
    bed.arm.estate.update("uvmss-00", health="Initializing")     # what new instances report
    bed.arm.estate.scale("uvmss-00", 6)
    assert bed.cycle().result == "unchanged" and "uvmss-00_4" not in bed.served()
    bed.set(4, "Healthy")
    bed.cycle()
    assert "uvmss-00_4" in bed.served() and "uvmss-00_5" not in bed.served()


@pytest.mark.parametrize("address", ["private", "public"])
def test_no_request_is_added(arm, arm_config, address, caplog):
    """The health is in the instance views the scale sets' listings already carry: the same
    requests, endpoint by endpoint, with the option on and off. Off, nothing is said of the
    instances without the extension; on, once per scale set."""
    caplog.set_level(logging.WARNING, logger="haproxy_azure_discovery")
    arm.estate = make_estate(vms=3, uniform_sets=2, flexible_sets=1, per_set=3,
                             public_ip_base="20.0.0.4")
    arm.estate.update("uvmss-00_0", health="Unhealthy")
    arm.estate.update("uvmss-01_1", health="Initializing")
    counts, served = {}, {}
    for on in (False, True):
        arm.reset_counts()
        cfg = arm_config(azure={"address": address, "require_healthy": on})
        discovery = m.AzureSource(cfg).discover()
        counts[on] = ({k: v for k, v in arm.counts.items() if k not in ("token", "total")},
                      discovery.requests)
        groups, _ = m.select_instances(discovery.instances, cfg)
        served[on] = {mb.label for ms in groups.values() for mb in ms if not mb.waits}
        warned = [r.scale_set.rsplit("/", 1)[1] for r in no_health_warnings(caplog)]
        assert warned == (["uvmss-00", "uvmss-01"] if on else [])
    assert counts[True] == counts[False] and counts[True][1] > 0
    assert served[False] - served[True] == {"uvmss-00_0", "uvmss-01_1"}
