"""Resource-group and subscription scope, with and without subscription-level read, as Azure documents
them: the real SDK and DefaultAzureCredential against the HTTPS fake of Resource Manager, which refuses
`$expand=instanceView` on VM lists without a scale-set `$filter` (400) and answers 403
`AuthorizationFailed` where the principal's Reader role does not reach (`FakeArm.reader_groups`)."""
import logging

import pytest

import haproxy_azure_discovery as m
from fake_arm import make_estate


def two_groups_sets_in_rg_a_estate():
    """rg-a and rg-b: VMs, a Uniform and two Flexible sets. vm-0002 and vm-0004 carry no tags; fvmss-01
    (in rg-a with its members) has none either; vm-0000 is stopped, fvmss-00_1 deallocated, uvmss-00_0
    stopped."""
    estate = make_estate(vms=8, uniform_sets=1, flexible_sets=2, per_set=3, resource_groups=("rg-a", "rg-b"),
                         overrides={"vm-0000": {"power_state": "stopped"}, "vm-0002": {"tags": {}},
                                    "vm-0004": {"tags": {}}, "fvmss-00_1": {"power_state": "deallocated"},
                                    "uvmss-00_0": {"power_state": "stopped"}, "fvmss-01": {"tags": {}}})
    for ss in estate.scale_sets:       # every set in rg-a
        ss.resource_group = "rg-a"
    return estate


def run(arm_config, **azure):
    """One discovery with these azure keys over arm_config's: the source, the Discovery, the names served."""
    cfg = arm_config(azure=azure)
    source = m.AzureSource(cfg)
    discovery = source.discover()
    groups, _ = m.select_instances(discovery.instances, cfg)
    return source, discovery, {mb.label for members in groups.values() for mb in members}


def expected(arm, groups=None):
    """Running, tagged (own tags or their scale set's), in-scope instances, by name."""
    out = set()
    for p in arm.estate.machines():
        tags = {**(p.ss.tags if p.ss else {}), **p.inst.tags}
        in_scope = groups is None or p.home.resource_group in groups
        if in_scope and p.inst.power_state == "running" and "HAProxy:Service:Name" in tags:
            out.add(p.inst.name)
    return out


def tagged_vm_ids(arm, groups):
    """Instance-view paths the fallback may read: tagged VMs and Flexible members in scope."""
    return {p.vm_id.lower() for p in arm.estate.machines()
            if not p.uniform and p.home.resource_group in groups
            and "HAProxy:Service:Name" in {**(p.ss.tags if p.ss else {}), **p.inst.tags}}


@pytest.fixture
def estate_arm(arm):
    arm.estate = two_groups_sets_in_rg_a_estate()
    return arm


class TestSubscriptionScope:
    def test_with_subscription_read_lists_power_states_once(self, estate_arm, arm_config):
        arm = estate_arm
        _, discovery, served = run(arm_config)
        assert served == expected(arm) and "vm-0000" not in served and "vm-0002" not in served
        assert arm.counts["vms_status"] == 1 and arm.counts["vm_instance_view"] == 0
        assert all("$expand" not in r.query for r in arm.requests if r.endpoint in ("vms", "vms_rg"))

    def test_without_subscription_read_fails_clearly(self, estate_arm, arm_config):
        arm = estate_arm
        arm.reader_groups = {"rg-a"}
        with pytest.raises(m.AzureError, match=r"HTTP 403 AuthorizationFailed: .*does not have authorization"):
            run(arm_config)


class TestResourceGroupScope:
    def test_with_subscription_read_filters_the_status_list_to_the_groups(self, estate_arm, arm_config):
        arm = estate_arm
        _, discovery, served = run(arm_config, resource_groups=["RG-A"])
        assert served == expected(arm, {"rg-a"})
        assert arm.counts["vms_status"] == 1 and arm.counts["vms"] == 0 and arm.counts["vm_instance_view"] == 0
        assert all(i.power_state != "unknown" for i in discovery.instances)

    def test_reader_on_the_group_only(self, estate_arm, arm_config, caplog):
        """The issue's run: subscription-wide lists answer 403, `$expand` without `$filter` would answer
        400; exactly the running, tagged, in-scope instances are served, with one instance-view request
        per tagged VM and none for untagged ones, and one warning naming the cost and the remedy."""
        arm = estate_arm
        arm.reader_groups = {"rg-a"}
        caplog.set_level(logging.WARNING, logger="haproxy_azure_discovery")
        source, discovery, served = run(arm_config, resource_groups=["rg-a"])
        assert served == expected(arm, {"rg-a"})
        assert {"vm-0000", "fvmss-00_1", "uvmss-00_0"}.isdisjoint(served) and "vm-0006" in served
        views = {r.path.lower().removesuffix("/instanceview") for r in arm.requests
                 if r.endpoint == "vm_instance_view"}
        assert views == tagged_vm_ids(arm, {"rg-a"}) and len(views) == arm.counts["vm_instance_view"]
        assert not any("vm-0002" in v or "vm-0004" in v or "fvmss-01" in v for v in views)
        assert arm.counts["vms_status"] == 1 and arm.counts["vms"] == 0
        assert all("$expand" not in r.query for r in arm.requests if r.endpoint in ("vms", "vms_rg"))
        assert discovery.requests == arm.counts["total"] - arm.counts["token"] - arm.counts["metadata"]
        source.discover()
        warnings = [r for r in caplog.records if getattr(r, "event", "") == "azure_power_state_fallback"]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert "403" in message and "per tagged VM" in message and "Reader on the subscription" in message
        assert "resource_graph" in message

    def test_reader_on_the_group_only_and_power_states_not_wanted(self, estate_arm, arm_config):
        arm = estate_arm
        arm.reader_groups = {"rg-a"}
        _, discovery, served = run(arm_config, resource_groups=["rg-a"], running_only=False)
        assert "vm-0000" in served and arm.counts["vms_status"] == 0 and arm.counts["vm_instance_view"] == 0

    def test_a_group_outside_the_role_fails_the_discovery(self, estate_arm, arm_config):
        arm = estate_arm
        arm.reader_groups = {"rg-a"}
        with pytest.raises(m.AzureError, match="403 AuthorizationFailed"):
            run(arm_config, resource_groups=["rg-a", "rg-b"])
