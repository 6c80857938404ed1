"""Azure answers that cannot be true, links that never end or lead away, pages that trickle,
items not shaped as documented: the real SDK pipeline and the real client against the fake
Resource Manager (and Resource Graph) and the Data Plane API emulator. Nothing may be parked
because of them, no token may leave for another origin, no cycle may run unbounded, and no
traceback may come out.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import one_cycle  # noqa: E402
from fake_arm import make_estate  # noqa: E402
from test_haproxy_azure_discovery import dp_section  # noqa: E402

WEB = "azure-web-8080-eastus"


class Cycles:
    """The daemon's cycles, in-process: AzureSource against the fake, DataPlane against the emulator."""

    def __init__(self, arm, arm_config, dataplane, **safety):
        self.arm, self.dp = arm, dataplane
        self.cfg = arm_config(azure={"timeout": 2}, haproxy=dp_section(dataplane), safety=safety)
        self.source, self.client = m.AzureSource(self.cfg), m.DataPlane(self.cfg.haproxy)
        self.state = m.State()

    def run(self) -> m.CycleReport | Exception:
        try:
            return one_cycle(self.cfg, self.source, self.client, self.state, m.Flag())
        except m.DiscoveryError as exc:
            return exc

    def live(self) -> int:
        return sum(s.get("maintenance") != "enabled" for s in self.dp.backends[WEB]["servers"].values())


@pytest.fixture
def cycles(arm, arm_config, dataplane):
    arm.estate = make_estate(vms=4)
    made = Cycles(arm, arm_config, dataplane)
    assert made.run().result == "applied" and made.live() == 4
    return made


# --- answers that cannot be true ------------------------------------------------------------------
@pytest.mark.parametrize("rounds", [2, 5, 10])
@pytest.mark.parametrize("fault, endpoint, failing", [
    ("empty", "vms", False),                 # everything gone between two polls: held, not parked
    ("empty", "vms_status", True),           # no power state for any VM: impossible
    ("empty", "nics", True),                 # VMs referencing NICs, none listed: impossible
    ("item_tags_string", "vms", False),      # no tags readable: every instance skipped, held
])
def test_empty_answers_park_nothing(cycles, rounds, fault, endpoint, failing):
    cycles.arm.add_fault(fault, endpoint=endpoint, times=None)
    if fault == "item_tags_string":              # on every item of every page
        cycles.arm.page_size = 1
    for _ in range(rounds):
        result = cycles.run()
        if failing:
            assert isinstance(result, m.AzureError) and "cannot be true" in str(result), result
        else:
            assert result.result == "held" and len(result.plan.held) == 4, result
    assert cycles.live() == 4


def test_an_empty_nic_list_names_what_cannot_be(cycles):
    cycles.arm.add_fault("empty", endpoint="nics", times=None)
    result = cycles.run()
    assert isinstance(result, m.AzureError)
    assert str(result) == ("Azure's answers cannot be true: 4 VMs reference network interfaces, and the network "
                           "interface listing has none; nothing is applied this cycle")


def test_an_estate_really_emptied_is_parked_after_the_confirm_seconds(arm, arm_config, dataplane):
    arm.estate = make_estate(vms=3)
    cycles = Cycles(arm, arm_config, dataplane, drain_confirm_seconds=1.5, drain_seconds=0)
    cycles.run()
    for name in ("vm-0000", "vm-0001", "vm-0002"):
        arm.estate.remove(name)
    started = time.monotonic()
    while time.monotonic() - started < 1.3:
        report = cycles.run()
        assert report.result == "held" and cycles.live() == 3
        time.sleep(0.2)
    time.sleep(0.4)
    assert cycles.run().result == "applied" and cycles.live() == 0


def test_a_uniform_set_with_capacity_and_no_instance_cannot_be(arm, arm_config):
    arm.estate = make_estate(vms=1, uniform_sets=1, per_set=2)
    arm.add_fault("empty", endpoint="vmss_vms", times=None)
    with pytest.raises(m.AzureError, match=r"scale set \S+ has capacity 2, and its instance listing is empty"):
        m.AzureSource(arm_config()).discover()


# --- links that never end or lead away ------------------------------------------------------------
@pytest.mark.parametrize("fault", ["self_link", "loop_link"])
def test_a_next_link_loop_fails_at_once(arm, arm_config, fault):
    arm.estate = make_estate(vms=5)
    arm.page_size = 2
    arm.add_fault(fault, endpoint="vms", page=2, times=None)
    started = time.monotonic()
    with pytest.raises(m.AzureError, match=r"listing VMs of subscriptions/\S+ failed: nextLink \S+ came twice"):
        m.AzureSource(arm_config()).discover()
    assert time.monotonic() - started < 10 and arm.counts["vms"] <= 4


def test_a_repeating_skip_token_fails_at_once(arm, arm_config):
    arm.estate = make_estate(vms=2500)
    arm.add_fault("repeat_token", endpoint="graph", times=None)
    with pytest.raises(m.AzureError, match=r"Resource Graph query of Resources failed: \$skipToken \S+ came twice"):
        m.AzureSource(arm_config(azure={"source": "resource_graph"})).discover()
    assert arm.counts["graph"] <= 3


def test_the_page_bound_ends_a_listing_that_goes_on(arm, arm_config):
    arm.estate = make_estate(vms=9)
    arm.page_size = 2
    with pytest.raises(m.AzureError, match=r"more than azure.max_pages \(3\) pages"):
        m.AzureSource(arm_config(azure={"max_pages": 3})).discover()


@pytest.mark.parametrize("fault", ["foreign_link", "other_port_link", "http_link", "301", "302", "307", "308"])
def test_no_token_leaves_for_another_origin(arm, arm_config, fault):
    arm.estate = make_estate(vms=5)
    arm.page_size = 2
    arm.add_fault(fault, endpoint="vms", page=1 if fault[0].isdigit() else 2, times=None)
    with pytest.raises(m.AzureError, match=r"leads away from|redirect to .* not followed"):
        m.AzureSource(arm_config()).discover()
    assert all("authorization" not in {k.lower() for k in r.headers} for r in arm.foreign_requests)


def test_a_trickled_page_is_cut_at_its_deadline(arm, arm_config):
    arm.estate = make_estate(vms=3)
    arm.add_fault("trickle", endpoint="vms", delay=0.05, times=None)      # 3 VMs: some 10 kB, 500 s
    heard = []
    source = m.AzureSource(arm_config(azure={"timeout": 1, "retries": 1}), None, None, lambda: heard.append(1))
    started = time.monotonic()
    with pytest.raises(m.AzureError, match=r"no whole answer within 1 s \(azure.timeout\)"):
        source.discover()
    took = time.monotonic() - started
    assert took < 2 * 1 + 1 + 3                     # two tries of 1 s and a wait between them
    arm.clear_faults()
    assert len(source.discover().instances) == 3 and heard        # the next cycle is whole again


def test_the_discovery_deadline_ends_a_slow_discovery(arm, arm_config):
    arm.estate = make_estate(vms=6)
    arm.page_size = 1
    arm.add_fault("slow", endpoint="vms", delay=0.4, times=None)
    with pytest.raises(m.AzureError, match=r"longer than azure.discovery_deadline_seconds \(1 s\)"):
        m.AzureSource(arm_config(azure={"discovery_deadline_seconds": 1})).discover()


# --- items not shaped as documented ---------------------------------------------------------------
@pytest.mark.parametrize("fault, endpoint, error", [
    ("item_without_id", "vms", r"the VM listing holds an item without an id"),
    ("item_id_not_string", "vms", r"the VM listing holds an item without an id"),
    ("item_without_id", "vmss_vms", r"the scale-set instance listing holds an item without an id"),
    ("null_item", "vms", r"malformed page 1 \(item 1 is null, not an object\)"),
    ("string_items", "nics", r"malformed page 1 \(item 1 is a string, not an object\)"),
    ("null_item", "graph", rf"malformed page 1 \(item 1 is null, not a row of {len(m.GraphRow._fields)} cells\)"),
    ("string_items", "graph", rf"malformed page 1 \(item 1 is a string, not a row of {len(m.GraphRow._fields)} cells\)"),
    ("item_without_id", "graph", r"Resource Graph row 1 has no id or no type"),
    ("item_without_type", "graph", r"Resource Graph row 1 has no id or no type"),
    ("total_mismatch", "graph", r"the pages do not add up"),
])
def test_an_item_that_breaks_its_listing_is_a_clear_error(arm, arm_config, fault, endpoint, error):
    arm.estate = make_estate(vms=3, uniform_sets=1, per_set=2)
    arm.add_fault(fault, endpoint=endpoint, times=None)
    source = "resource_graph" if endpoint == "graph" else "arm"
    with pytest.raises(m.AzureError, match=error):
        m.AzureSource(arm_config(azure={"source": source})).discover()


@pytest.mark.parametrize("endpoint", ["vms", "vms_status", "nics", "vmss_vms", "vmss_nics"])
def test_an_item_whose_properties_are_no_object_fails_the_discovery(arm, arm_config, endpoint):
    """Read into the join's records, an item whose properties are a string fails the discovery
    by name, no traceback: leaving it out would drain its instance."""
    arm.estate = make_estate(vms=3, uniform_sets=1, per_set=2)
    arm.add_fault("item_properties_string", endpoint=endpoint, times=None)
    with pytest.raises(m.AzureError, match=r"joining the listings failed: an item is not shaped as "
                                           r"Azure documents it \('str' object has no attribute 'get'\)"):
        m.AzureSource(arm_config()).discover()


def test_items_not_shaped_as_documented_but_usable_are_served_or_skipped_by_name(arm, arm_config, caplog):
    arm.estate = make_estate(vms=3)
    arm.page_size = 1
    arm.add_fault("item_name_object", endpoint="vms", page=1)
    arm.add_fault("item_tags_string", endpoint="vms", page=2)
    discovery = m.AzureSource(arm_config()).discover()
    names = sorted(i.name for i in discovery.instances)
    assert names == ["vm-0000", "vm-0002"]                      # the name from the id
    assert [(s.instance, s.reason.split(":")[0]) for s in discovery.skipped] == [
        ("vm-0001", "its tags are not an object (as Azure lists them)")]


def test_a_quota_header_that_is_no_number_is_ignored(arm, arm_config):
    arm.estate = make_estate(vms=2)
    arm.add_fault("quota_not_digits", endpoint="graph", times=None)
    assert len(m.AzureSource(arm_config(azure={"source": "resource_graph"})).discover().instances) == 2


def test_a_rejected_discovery_is_logged_without_a_traceback(arm, arm_config, tmp_path, capsys):
    import json
    arm.estate = make_estate(vms=2)
    arm.add_fault("empty", endpoint="nics", times=None)
    raw = arm_config.raw(azure={"timeout": 30}, logging={"format": "text"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    assert m.main(["--once", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: Azure's answers cannot be true: 2 VMs reference network interfaces" in err
    assert "Traceback" not in err and logging.getLogger("haproxy_azure_discovery") is not None


def test_once_confirm_drain_applies_what_the_guard_holds(arm, arm_config, dataplane, tmp_path, capsys):
    import json
    arm.estate = make_estate(vms=4)
    raw = arm_config.raw(azure={"timeout": 30},
                         haproxy={"base_url": dataplane.url, "password": dataplane.password, "timeout": 3},
                         safety={"drain_seconds": 0}, logging={"format": "text"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    assert m.main(["--once", "-c", str(path)]) == 0
    for name in ("vm-0001", "vm-0002", "vm-0003"):
        arm.estate.remove(name)

    def live():
        return sum(s.get("maintenance") != "enabled" for s in dataplane.backends[WEB]["servers"].values())
    assert m.main(["--once", "-c", str(path)]) == 0 and live() == 4          # held: 3 of 4 at once
    assert "--once --confirm-drain" in capsys.readouterr().err
    assert m.main(["--once", "--confirm-drain", "-c", str(path)]) == 0 and live() == 1
    assert m.main(["--dry-run", "--confirm-drain", "-c", str(path)]) == 2
