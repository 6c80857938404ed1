"""Tests of the Resource Manager fake, driven by the real Azure SDK (azure-identity, azure-mgmt-*)."""
import json
import math
import os
import select
import shlex
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
from azure.core.exceptions import (ClientAuthenticationError, DecodeError, HttpResponseError,
                                   ResourceNotFoundError, ServiceResponseTimeoutError)
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from fake_arm import (ARM_SCOPE, AZURE_CHINA_COMPUTE_TYPES, DEFAULT_SUBSCRIPTION, ENDPOINTS, FLEXIBLE, SERVICE_NAME_TAG,
                      SERVICE_PORT_TAG, UNIFORM, Estate, FakeArm, Vm, evaluate_graph_query, make_estate,
                      parse_graph_query, service_tags)
from conftest import azure_env

HERE = os.path.dirname(os.path.abspath(__file__))
SUB = DEFAULT_SUBSCRIPTION


# --- helpers and fixtures ---
def small_estate(**kwargs) -> Estate:
    """3 VMs (rg-a, rg-b, rg-a), a Uniform and a Flexible set of 3 (rg-a), public IPs everywhere.

    vm-0001 is deallocated, vm-0002 has lost its NIC, uvmss-00_1 has an own port tag.
    """
    return make_estate(vms=3, uniform_sets=1, flexible_sets=1, per_set=3, resource_groups=("rg-a", "rg-b"),
                       public_ip_base="20.0.0.4",
                       overrides={"vm-0001": {"power_state": "deallocated"}, "vm-0002": {"has_nic": False},
                                  "uvmss-00_1": {"tags": {SERVICE_PORT_TAG: "9090"}}},
                       **kwargs)


@pytest.fixture
def sdk_env(monkeypatch):
    """Clears every variable that could steer DefaultAzureCredential; returns a setter for a fake's env."""
    azure_env(monkeypatch)
    return lambda fake: azure_env(monkeypatch, fake)


@pytest.fixture
def fake(sdk_env):
    with FakeArm(small_estate(), page_size=2) as fake:
        sdk_env(fake)
        yield fake


def clients(fake: FakeArm, **overrides):
    """Real SDK clients against the fake: fast retries and bounded timeouts unless overridden."""
    options = {"base_url": fake.url, "credential_scopes": [ARM_SCOPE], "retry_total": 1,
               "retry_backoff_factor": 0.01, "connection_timeout": 5, "read_timeout": 10, **overrides}
    credential = DefaultAzureCredential()
    return (ComputeManagementClient(credential, SUB, **options),
            NetworkManagementClient(credential, SUB, **options))


def raw_get(fake: FakeArm, path: str, headers: dict | None = None) -> tuple[int, dict]:
    """A GET with urllib that trusts the fake's CA: (status, JSON body)."""
    request = urllib.request.Request(fake.url + path, headers=headers or {})
    context = ssl.create_default_context(cafile=fake.ca_pem_path)
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def names(items) -> list[str]:
    return [item.name for item in items]


def power_state(instance_view) -> str:
    return next(s.code for s in instance_view.statuses if s.code.startswith("PowerState/"))


def graph_post(fake: FakeArm, body: dict, api_version: str = "2022-10-01") -> tuple[int, dict, dict]:
    """A Resource Graph query with urllib: (status, JSON body, headers)."""
    request = urllib.request.Request(
        f"{fake.url}/providers/Microsoft.ResourceGraph/resources?api-version={api_version}",
        data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {fake.token}", "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=fake.ca_pem_path)
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


# --- listings through the SDK ---
class TestListings:
    def test_vm_list_follows_next_links_one_request_per_page(self, fake):
        compute, _ = clients(fake)
        vms = list(compute.virtual_machines.list_all())
        assert names(vms) == ["vm-0000", "vm-0001", "vm-0002", "fvmss-00_0", "fvmss-00_1", "fvmss-00_2"]
        assert fake.counts["vms"] == math.ceil(6 / 2)
        pages = [r for r in fake.requests if r.endpoint == "vms"]
        assert all(r.query["api-version"] for r in pages)
        assert ["$skiptoken" in r.query for r in pages] == [False, True, True]
        assert vms[0].tags == service_tags("web", 8080)
        assert vms[0].location == "eastus"
        assert vms[3].virtual_machine_scale_set.id.lower() == fake.estate.resource_id("fvmss-00").lower()

    def test_status_only_list_has_power_states_and_nothing_else(self, fake):
        compute, _ = clients(fake)
        vms = list(compute.virtual_machines.list_all(status_only="true"))
        assert {vm.name: power_state(vm.instance_view) for vm in vms}["vm-0001"] == "PowerState/deallocated"
        assert all(vm.tags is None and vm.network_profile is None for vm in vms)
        assert fake.counts["vms_status"] == 3 and fake.counts["vms"] == 0

    def test_resource_group_list_ignores_path_case(self, fake):
        compute, _ = clients(fake)
        [vm] = compute.virtual_machines.list("RG-B")
        assert vm.name == "vm-0001" and vm.instance_view is None
        assert [vm.instance_view for vm in compute.virtual_machines.list("rg-a")] == [None] * 5
        assert fake.counts["vms_rg"] == 1 + 3

    @pytest.mark.parametrize("scope", ["subscription", "resource group"])
    def test_vm_lists_refuse_instance_view_expansion_without_a_documented_filter(self, fake, scope):
        compute, _ = clients(fake)
        listing = (compute.virtual_machines.list_all if scope == "subscription"
                   else lambda **kw: compute.virtual_machines.list("rg-a", **kw))
        for bad in ({"expand": "instanceView"}, {"expand": "instanceView", "filter": "name eq 'vm-0000'"}):
            with pytest.raises(HttpResponseError) as caught:
                list(listing(**bad))
            assert caught.value.status_code == 400 and caught.value.error.code == "InvalidParameter"
        set_id = fake.estate.resource_id("fvmss-00")
        members = list(listing(expand="instanceView", filter=f"virtualMachineScaleSet/id eq '{set_id}'"))
        assert names(members) == ["fvmss-00_0", "fvmss-00_1", "fvmss-00_2"]
        assert all(power_state(vm.instance_view) == "PowerState/running" for vm in members)

    def test_reader_on_some_resource_groups_only(self, fake):
        fake.reader_groups = {"RG-A"}
        compute, network = clients(fake)
        assert names(compute.virtual_machines.list("rg-a"))[0] == "vm-0000"
        assert len(list(network.network_interfaces.list("rg-a"))) == 4
        for denied in (lambda: compute.virtual_machines.list_all(status_only="true"),
                       lambda: network.network_interfaces.list_all(), lambda: compute.virtual_machines.list("rg-b")):
            with pytest.raises(HttpResponseError) as caught:
                list(denied())
            assert caught.value.status_code == 403 and caught.value.error.code == "AuthorizationFailed"
            assert "does not have authorization to perform action" in caught.value.error.message
        view = compute.virtual_machines.instance_view("rg-a", "vm-0000")
        assert power_state(view) == "PowerState/running"

    def test_scale_sets(self, fake):
        compute, _ = clients(fake)
        sets = {ss.name: ss for ss in compute.virtual_machine_scale_sets.list_all()}
        assert {name: (ss.orchestration_mode, ss.sku.capacity) for name, ss in sets.items()} == {
            "uvmss-00": (UNIFORM, 3), "fvmss-00": (FLEXIBLE, 3)}
        assert sets["uvmss-00"].tags == service_tags("web", 8080)
        assert list(compute.virtual_machine_scale_sets.list("rg-b")) == []
        assert fake.counts["vmss"] == 1 and fake.counts["vmss_rg"] == 1

    def test_uniform_instances_with_own_tags_and_instance_views(self, fake):
        compute, _ = clients(fake)
        fake.estate.update("uvmss-00_2", power_state="stopped")
        instances = list(compute.virtual_machine_scale_set_vms.list("rg-a", "uvmss-00", expand="instanceView"))
        assert [i.instance_id for i in instances] == ["0", "1", "2"]
        assert names(instances) == ["uvmss-00_0", "uvmss-00_1", "uvmss-00_2"]
        assert instances[0].id == fake.estate.resource_id("uvmss-00_0")
        assert instances[0].id.endswith("/virtualMachineScaleSets/uvmss-00/virtualMachines/0")
        assert [i.tags for i in instances] == [None, {SERVICE_PORT_TAG: "9090"}, None]
        assert [power_state(i.instance_view) for i in instances][2] == "PowerState/stopped"
        assert fake.counts["vmss_vms"] == 2

    def test_application_health_is_in_uniform_instance_views_only(self, fake):
        compute, _ = clients(fake)
        fake.estate.update("uvmss-00_0", health="Healthy")
        fake.estate.update("uvmss-00_1", health="Initializing")
        fake.estate.update("fvmss-00_0", health="Healthy")      # a Flexible member: never in a list
        scale_set_vms = compute.virtual_machine_scale_set_vms
        instances = list(scale_set_vms.list("rg-a", "uvmss-00", expand="instanceView"))
        health = [v.status.code if (v := i.instance_view.vm_health) else None for i in instances]
        assert health == ["HealthState/healthy", "HealthState/initializing", None]   # _2: none
        without = list(scale_set_vms.list("rg-a", "uvmss-00"))
        assert [i.instance_view for i in without] == [None] * 3
        fake.estate.update("uvmss-00_1", health="Unhealthy")
        view = scale_set_vms.get_instance_view("rg-a", "uvmss-00", "1")
        assert view.vm_health.status.code == "HealthState/unhealthy"
        statuses = list(compute.virtual_machines.list_all(status_only="true"))
        assert all(s.instance_view.vm_health is None for s in statuses)
        flexible = scale_set_vms.list("rg-a", "fvmss-00", expand="instanceView")
        assert all(i.instance_view.vm_health is None for i in flexible)

    def test_uniform_nics_and_public_ips_join_case_insensitively(self, fake):
        compute, network = clients(fake)
        [instance, *_] = compute.virtual_machine_scale_set_vms.list("rg-a", "uvmss-00")
        nics = list(network.network_interfaces.list_virtual_machine_scale_set_network_interfaces("rg-a", "uvmss-00"))
        pips = list(network.public_ip_addresses.list_virtual_machine_scale_set_public_ip_addresses("rg-a", "uvmss-00"))
        nic_reference = instance.network_profile.network_interfaces[0]
        assert nic_reference.primary is True
        assert nic_reference.id != nics[0].id and nic_reference.id.lower() == nics[0].id.lower()
        assert nics[0].virtual_machine.id != instance.id
        assert nics[0].virtual_machine.id.lower() == instance.id.lower()
        assert "/virtualMachines/0/networkInterfaces/" in nics[0].id
        assert [n.ip_configurations[0].private_ip_address for n in nics] == ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
        assert pips[0].ip_configuration.id.lower() == nics[0].ip_configurations[0].id.lower()
        assert pips[0].ip_address == "20.0.0.7"
        assert (fake.counts["vmss_nics"], fake.counts["vmss_pips"]) == (2, 2)

    def test_flexible_members_are_ordinary_vms_with_ordinary_nics(self, fake):
        compute, network = clients(fake)
        members = list(compute.virtual_machine_scale_set_vms.list("rg-a", "fvmss-00"))
        assert [(m.instance_id, m.network_profile) for m in members] == [
            ("fvmss-00_0", None), ("fvmss-00_1", None), ("fvmss-00_2", None)]
        assert members[0].id == fake.estate.resource_id("fvmss-00_0")
        assert list(network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(
            "rg-a", "fvmss-00")) == []
        assert "fvmss-00_0-nic" in names(network.network_interfaces.list_all())

    def test_standalone_nics_public_ips_and_a_missing_nic(self, fake):
        compute, network = clients(fake)
        vms = {vm.name: vm for vm in compute.virtual_machines.list_all()}
        nics = {nic.id.lower(): nic for nic in network.network_interfaces.list_all()}
        pips = {pip.id.lower(): pip for pip in network.public_ip_addresses.list_all()}
        assert len(nics) == 5 and len(pips) == 5 and fake.counts["nics"] == 3
        reference = vms["vm-0000"].network_profile.network_interfaces[0]
        assert reference.primary is None   # one NIC: Azure leaves `primary` out
        nic = nics[reference.id.lower()]
        assert nic.virtual_machine.id.lower() == vms["vm-0000"].id.lower() != nic.virtual_machine.id
        [config] = nic.ip_configurations
        assert (config.primary, config.private_ip_address, config.private_ip_address_version) == (
            True, "10.0.0.4", "IPv4")
        pip = pips[config.public_ip_address.id.lower()]
        assert pip.ip_address == "20.0.0.4" and pip.ip_configuration.id.lower() == config.id.lower()
        missing = vms["vm-0002"].network_profile.network_interfaces[0].id.lower()
        assert missing not in nics
        assert names(network.network_interfaces.list("rg-b")) == ["vm-0001-nic"]
        assert names(network.public_ip_addresses.list("rg-b")) == ["vm-0001-pip"]

    def test_ipv6_is_a_second_ip_configuration(self, sdk_env):
        with FakeArm(make_estate(vms=1, ipv6_base="fd00::4")) as fake:
            sdk_env(fake)
            _, network = clients(fake)
            [nic] = network.network_interfaces.list_all()
        assert [(c.private_ip_address, c.private_ip_address_version, c.primary) for c in nic.ip_configurations] == [
            ("10.0.0.4", "IPv4", True), ("fd00::4", "IPv6", False)]

    def test_unknown_scale_set_is_not_found(self, fake):
        compute, _ = clients(fake)
        with pytest.raises(ResourceNotFoundError):
            list(compute.virtual_machine_scale_set_vms.list("rg-a", "nope"))

    def test_changes_are_served_from_the_next_request(self, fake):
        compute, _ = clients(fake)
        fake.estate.scale("uvmss-00", 1)
        fake.estate.scale("uvmss-00", 3)
        fake.estate.remove("vm-0000")
        fake.estate.add_vm(Vm(name="vm-new", private_ip="10.9.9.9", tags=service_tags("api", 9000)))
        fake.estate.update("vm-0001", power_state="running", tags={})
        instances = compute.virtual_machine_scale_set_vms.list("rg-a", "uvmss-00")
        assert [i.instance_id for i in instances] == ["0", "3", "4"]   # indexes are never reused
        vms = {vm.name: vm for vm in compute.virtual_machines.list_all()}
        assert "vm-0000" not in vms and vms["vm-new"].tags == service_tags("api", 9000)
        assert vms["vm-0001"].tags is None

    def test_an_instance_being_deleted_shows_its_provisioning_state(self, fake):
        compute, _ = clients(fake)
        fake.estate.update("vm-0000", provisioning_state="Deleting")
        fake.estate.update("uvmss-00_1", provisioning_state="Deleting")
        vms = {vm.name: vm for vm in compute.virtual_machines.list_all()}
        assert vms["vm-0000"].provisioning_state == "Deleting" and vms["vm-0001"].provisioning_state == "Succeeded"
        statuses = {vm.name: [s.code for s in vm.instance_view.statuses]
                    for vm in compute.virtual_machines.list_all(status_only="true")}
        assert statuses["vm-0000"] == ["ProvisioningState/deleting", "PowerState/running"]
        assert statuses["vm-0001"][0] == "ProvisioningState/succeeded"
        [deleting] = [i for i in compute.virtual_machine_scale_set_vms.list("rg-a", "uvmss-00", expand="instanceView")
                      if i.provisioning_state == "Deleting"]
        assert deleting.instance_id == "1"
        assert [(s.code, s.display_status) for s in deleting.instance_view.statuses][0] == (
            "ProvisioningState/deleting", "Deleting")
        view = compute.virtual_machines.instance_view("rg-a", "vm-0000")
        assert view.statuses[0].code == "ProvisioningState/deleting"

    def test_listings_can_come_in_a_random_order(self, fake):
        compute, _ = clients(fake)
        in_order = names(compute.virtual_machines.list_all())
        fake.list_seed = 3
        orders = [names(compute.virtual_machines.list_all()) for _ in range(3)]
        assert all(sorted(order) == sorted(in_order) for order in orders) and len({tuple(o) for o in orders}) > 1
        fake.list_seed = 3
        assert names(compute.virtual_machines.list_all()) == orders[0]
        pages = compute.virtual_machines.list_all().by_page()      # one listing: one order across its pages
        first = names(next(pages))
        assert sorted(first + [n for page in pages for n in names(page)]) == sorted(in_order)

    def test_a_listing_is_a_snapshot_taken_at_its_first_page(self, fake):
        compute, _ = clients(fake)
        pages = compute.virtual_machines.list_all().by_page()
        first = names(next(pages))
        fake.estate.remove("vm-0000")
        rest = [name for page in pages for name in names(page)]
        assert first + rest == ["vm-0000", "vm-0001", "vm-0002", "fvmss-00_0", "fvmss-00_1", "fvmss-00_2"]
        assert "vm-0000" not in names(compute.virtual_machines.list_all())


# --- single-resource GETs (a per-VM-lookup strategy) ---
class TestSingleGets:
    def test_nic_gets_match_the_list_items_and_a_missing_nic_is_404(self, fake):
        _, network = clients(fake)
        listed = {nic.name: nic for nic in network.network_interfaces.list_all()}
        nic = network.network_interfaces.get("RG-A", "vm-0000-nic")
        assert nic.as_dict() == listed["vm-0000-nic"].as_dict()
        assert network.network_interfaces.get("rg-a", "fvmss-00_1-nic").ip_configurations[0].private_ip_address \
            == "10.0.0.11"
        for rg, name in [("rg-a", "vm-0002-nic"),    # lost its NIC
                         ("rg-b", "vm-0000-nic"),    # wrong resource group
                         ("rg-a", "uvmss-00-nic")]:  # Uniform NICs live under their scale set
            with pytest.raises(ResourceNotFoundError) as caught:
                network.network_interfaces.get(rg, name)
            assert caught.value.error.code == "ResourceNotFound"
        uniform = network.network_interfaces.get_virtual_machine_scale_set_network_interface(
            "rg-a", "uvmss-00", "1", "uvmss-00-nic")
        assert uniform.ip_configurations[0].private_ip_address == "10.0.0.8"
        assert uniform.virtual_machine.id.lower() == fake.estate.resource_id("uvmss-00_1").lower()
        with pytest.raises(ResourceNotFoundError):
            network.network_interfaces.get_virtual_machine_scale_set_network_interface(
                "rg-a", "uvmss-00", "7", "uvmss-00-nic")
        assert (fake.counts["nic_get"], fake.counts["vmss_nic_get"], fake.counts["nics"]) == (5, 2, 3)

    def test_instance_views_follow_the_estate(self, fake):
        compute, _ = clients(fake)
        assert power_state(compute.virtual_machines.instance_view("rg-b", "vm-0001")) == "PowerState/deallocated"
        fake.estate.update("vm-0001", power_state="running")
        assert power_state(compute.virtual_machines.instance_view("rg-b", "vm-0001")) == "PowerState/running"
        assert power_state(compute.virtual_machines.instance_view("rg-a", "fvmss-00_0")) == "PowerState/running"
        scale_set_vms = compute.virtual_machine_scale_set_vms
        assert power_state(scale_set_vms.get_instance_view("rg-a", "fvmss-00", "fvmss-00_0")) == \
            "PowerState/running"
        fake.estate.update("uvmss-00_2", power_state="stopped")
        assert power_state(scale_set_vms.get_instance_view("rg-a", "uvmss-00", "2")) == "PowerState/stopped"
        fake.estate.scale("uvmss-00", 1)
        fake.estate.scale("uvmss-00", 3)   # same size, instances 0, 3, 4
        with pytest.raises(ResourceNotFoundError):
            scale_set_vms.get_instance_view("rg-a", "uvmss-00", "1")
        assert power_state(scale_set_vms.get_instance_view("rg-a", "uvmss-00", "4")) == "PowerState/running"
        with pytest.raises(ResourceNotFoundError):
            compute.virtual_machines.instance_view("rg-a", "vm-9999")
        assert (fake.counts["vm_instance_view"], fake.counts["vmss_vm_instance_view"]) == (4, 4)

    def test_faults_aim_at_single_gets(self, fake):
        compute, _ = clients(fake, retry_backoff_factor=0)
        fake.add_fault("500", endpoint="vm_instance_view", page=1)
        assert power_state(compute.virtual_machines.instance_view("rg-a", "vm-0000")) == "PowerState/running"
        assert fake.counts["vm_instance_view"] == 2

    def test_counts_endpoint_needs_no_token_and_is_not_counted(self, fake):
        compute, _ = clients(fake)
        list(compute.virtual_machine_scale_sets.list_all())
        status, counts = raw_get(fake, "/_counts")
        assert status == 200 and counts == fake.counts
        assert (counts["vmss"], counts["token"], counts["total"], counts["compute_throttled"]) == (1, 1, 2, 0)
        assert fake.counts["total"] == 2 and len(fake.requests) == 2


# --- tokens and authentication ---
class TestResourceGraph:
    QUERY = ("Resources | where type in~ ('microsoft.compute/virtualmachines') "
             "| project id, name, powerState = properties.extended.instanceView.powerState.code")
    SORTED = QUERY + " | order by id asc"

    def test_pages_in_the_documented_shape_with_quota_headers(self, fake):
        status, page, headers = graph_post(fake, {"subscriptions": [SUB], "query": self.SORTED,
                                                  "options": {"$top": 4}})
        assert status == 200 and page["totalRecords"] == 6 and page["count"] == 4
        assert page["resultTruncated"] == "false" and page["facets"] == [] and page["$skipToken"]
        assert [r["name"] for r in page["data"]] == ["fvmss-00_0", "fvmss-00_1", "fvmss-00_2", "vm-0000"]
        assert page["data"][3] == {"id": fake.estate.resource_id("vm-0000"), "name": "vm-0000",
                                   "powerState": "PowerState/running"}
        assert headers["x-ms-user-quota-remaining"] == "14" and headers["x-ms-user-quota-resets-after"] == "00:00:05"
        assert "Retry-After" not in headers
        status, rest, _ = graph_post(fake, {"subscriptions": [SUB], "query": self.SORTED,
                                            "options": {"$top": 4, "$skipToken": page["$skipToken"]}})
        assert (rest["totalRecords"], rest["count"]) == (6, 2) and "$skipToken" not in rest
        assert [r["name"] for r in rest["data"]] == ["vm-0002", "vm-0001"]   # rg-a before rg-b in the id

    def test_a_table_names_the_columns_once_and_holds_the_same_rows(self, fake):
        """resultFormat "table" (the REST reference's Table): the projection's columns in its order,
        each row an array of cells in that order; the same rows, pages and counts as
        "objectArray"."""
        body = {"subscriptions": [SUB], "query": self.SORTED, "options": {"$top": 4}}
        _, objects, _ = graph_post(fake, body)
        body["options"]["resultFormat"] = "table"
        status, table, _ = graph_post(fake, body)

        def counts(page):
            return {k: v for k, v in page.items() if k not in ("data", "$skipToken")}
        assert status == 200 and counts(table) == counts(objects)
        assert table["data"]["columns"] == [{"name": "id", "type": "string"},
                                            {"name": "name", "type": "string"},
                                            {"name": "powerState", "type": "object"}]
        rows = [[r["id"], r["name"], r["powerState"]] for r in objects["data"]]
        assert table["data"]["rows"] == rows
        body["options"]["$skipToken"] = table["$skipToken"]
        _, rest, _ = graph_post(fake, body)
        assert [row[1] for row in rest["data"]["rows"]] == ["vm-0002", "vm-0001"]
        body["options"]["resultFormat"] = "csv"
        status, error, _ = graph_post(fake, body)
        assert status == 400 and error["error"]["details"][0]["code"] == "InvalidQuery"

    def test_unsorted_paging_loses_and_repeats_rows_sorted_paging_does_not(self, sdk_env):
        """"Without sorting, results are random and not repeatable" ("Guidance for pagination"): each page
        of an unsorted query is cut from a new order, so 3 pages of 1,000 out of 3,000 rows miss some and
        repeat others; sorted by id they are the 3,000 rows, each once, in order."""
        with FakeArm(make_estate(vms=3000)) as fake:
            fake.graph_seed = 11
            for query, complete in ((self.QUERY, False), (self.SORTED, True)):
                ids, token = [], None
                while True:
                    options = {"$top": 1000, **({"$skipToken": token} if token else {})}
                    status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query, "options": options})
                    assert status == 200 and page["totalRecords"] == 3000 and page["count"] == 1000
                    ids += [row["id"] for row in page["data"]]
                    token = page.get("$skipToken")
                    if not token:
                        break
                assert len(ids) == 3000 and fake.counts["graph"] in (3, 6)
                assert (len(set(ids)) == 3000) == complete
                if complete:
                    assert ids == sorted(ids)
                else:
                    assert len(set(ids)) < 2990   # 3 independent draws: about 1 row in 4.5 repeats

    def test_unsorted_rows_come_in_a_new_order_every_time_and_the_seed_repeats_them(self, fake):
        body = {"subscriptions": [SUB], "query": "Resources | project id, type"}
        fake.graph_seed = 5
        first, second = ([row["id"] for row in graph_post(fake, body)[1]["data"]] for _ in range(2))
        assert sorted(first) == sorted(second) and first != second
        fake.graph_seed = 5
        assert [row["id"] for row in graph_post(fake, body)[1]["data"]] == first

    def test_order_by_and_sort_by_directions_default_descending(self, fake):
        def names(query):
            status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query})
            assert status == 200, page
            return [row["name"] for row in page["data"]]

        base = "Resources | where type in~ ('microsoft.compute/virtualmachines') | project id, name, resourceGroup"
        assert names(base + " | order by name asc") == sorted(names(base))
        assert names(base + " | sort by name") == sorted(names(base), reverse=True)   # KQL: desc by default
        assert names(base + " | order by resourceGroup desc, name asc") == [
            "vm-0001", "fvmss-00_0", "fvmss-00_1", "fvmss-00_2", "vm-0000", "vm-0002"]
        before = ("Resources | where type in~ ('microsoft.compute/virtualmachines') | order by name asc "
                  "| project id, vm = name")
        status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": before})
        assert [row["vm"] for row in page["data"]] == sorted(names(base))
        for bad in (base + " | order by hostName asc", base + " | order by name upwards"):
            status, error, _ = graph_post(fake, {"subscriptions": [SUB], "query": bad})
            assert status == 400 and error["error"]["details"][0]["code"] == "InvalidQuery"

    def test_every_page_runs_the_query_again(self, fake):
        """A resource deleted between two pages shifts the rest: sorted by id, the row that moves onto the
        first page's place is never served ("Guidance for pagination", dynamic environments)."""
        body = {"subscriptions": [SUB], "query": self.SORTED, "options": {"$top": 3}}
        _, first, _ = graph_post(fake, body)
        assert [r["name"] for r in first["data"]] == ["fvmss-00_0", "fvmss-00_1", "fvmss-00_2"]
        fake.estate.remove("fvmss-00_0")
        body["options"]["$skipToken"] = first["$skipToken"]
        _, second, _ = graph_post(fake, body)
        assert second["totalRecords"] == 5 and [r["name"] for r in second["data"]] == ["vm-0002", "vm-0001"]

    def test_a_skip_token_belongs_to_its_query(self, fake):
        _, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": self.SORTED, "options": {"$top": 2}})
        for body in ({"subscriptions": [SUB], "query": self.QUERY},
                     {"subscriptions": [SUB, "00000000-0000-0000-0000-000000000002"], "query": self.SORTED},
                     {"subscriptions": [SUB], "query": self.SORTED, "skip": "garbage"}):
            token = "garbage" if "skip" in body else page["$skipToken"]
            body = {"subscriptions": body["subscriptions"], "query": body["query"],
                    "options": {"$top": 2, "$skipToken": token}}
            assert graph_post(fake, body)[0] == 400

    def test_rows_carry_the_provisioning_state(self, fake):
        fake.estate.update("vm-0002", provisioning_state="Deleting")
        query = ("Resources | where type in~ ('microsoft.compute/virtualmachines') "
                 "| project id, name, provisioningState = properties.provisioningState | order by name asc")
        _, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query})
        assert {r["name"]: r["provisioningState"] for r in page["data"]}["vm-0002"] == "Deleting"
        assert [r["provisioningState"] for r in page["data"]].count("Succeeded") == 5

    def test_a_cloud_whose_compute_resources_lack_the_uniform_types(self, fake):
        query = ("ComputeResources | where type in~ ('microsoft.compute/virtualmachinescalesets/virtualmachines',"
                 " 'microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces',"
                 " 'microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces/ipconfigurations/"
                 "publicipaddresses') | project id, type")
        fake.graph_compute_types = AZURE_CHINA_COMPUTE_TYPES
        status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query})
        assert status == 200 and page["totalRecords"] == 3
        assert {r["type"] for r in page["data"]} == set(AZURE_CHINA_COMPUTE_TYPES)
        fake.graph_compute_types = set()
        assert graph_post(fake, {"subscriptions": [SUB], "query": query})[1]["totalRecords"] == 0
        # A type no table lists is not an error in Resource Graph: it matches nothing.
        status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query":
                                            "Resources | where type in~ ('microsoft.compute/nosuchthing') | project id"})
        assert (status, page["totalRecords"], page["data"]) == (200, 0, [])

    def test_rows_carry_no_application_health(self, fake):
        fake.estate.update("uvmss-00_0", health="Unhealthy")
        query = ("ComputeResources | where type in~ "
                 "('microsoft.compute/virtualmachinescalesets/virtualmachines') "
                 "| project id, properties")
        _, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query})
        assert page["totalRecords"] == 3 and "Health" not in json.dumps(page["data"])

    def test_uniform_instances_and_their_nics_live_in_compute_resources(self, fake):
        query = ("ComputeResources | where type in~ ('microsoft.compute/virtualmachinescalesets/virtualmachines',"
                 " 'microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces') | project id, type")
        _, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": query})
        assert sorted(r["type"].rsplit("/", 1)[1] for r in page["data"]) == ["networkinterfaces"] * 3 + [
            "virtualmachines"] * 3

    def test_quota_window_then_429(self, fake):
        fake.graph_quota, fake.graph_window = 2, 30.0
        body = {"subscriptions": [SUB], "query": self.QUERY}
        assert [graph_post(fake, body)[0] for _ in range(3)] == [200, 200, 429]
        status, error, headers = graph_post(fake, body)
        assert status == 429 and error["error"]["code"] == "RateLimiting"
        assert error["error"]["details"][0]["code"] == "RateLimiting"
        assert headers["x-ms-user-quota-remaining"] == "0" and headers["x-ms-user-quota-resets-after"] == "00:00:30"
        assert "Retry-After" not in headers   # Microsoft documents the quota headers only
        assert fake.counts["graph_throttled"] == 2

    def test_the_quota_follows_the_fakes_clock(self, fake):
        now = [1000.0]
        fake.clock = lambda: now[0]
        fake.graph_quota, fake.graph_window = 1, 3725.0
        body = {"subscriptions": [SUB], "query": self.QUERY}
        assert graph_post(fake, body)[2]["x-ms-user-quota-resets-after"] == "01:02:05"
        now[0] += 3664.5
        status, _, headers = graph_post(fake, body)
        assert (status, headers["x-ms-user-quota-resets-after"]) == (429, "00:01:01")
        now[0] += 61
        assert graph_post(fake, body)[0] == 200

    def test_refusals(self, fake):
        body = {"subscriptions": [SUB], "query": self.QUERY}
        assert graph_post(fake, body, api_version="2018-09-01-preview")[0] == 400
        assert graph_post(fake, {**body, "options": {"$top": 5000}})[0] == 400
        status, error, _ = graph_post(fake, {**body, "query": "Resources | project id, vmSize"})
        assert status == 400 and error["error"]["details"][0]["code"] == "InvalidQuery"
        status, error, _ = graph_post(fake, {**body, "query": "Resources | project id, n = strlen(name)"})
        assert status == 400 and "function strlen() is not modelled" in error["error"]["details"][0]["message"]

    def test_rows_only_from_readable_groups_without_a_403(self, fake):
        fake.reader_groups = {"rg-b"}
        status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": self.QUERY})
        assert status == 200 and [r["name"] for r in page["data"]] == ["vm-0001"]


# --- Resource Graph: KQL expressions (extend, project NAME = EXPR) ---
# A query of the program's shape (its GRAPH_QUERY flattens a NIC's one addressed IP configuration
# the same way, with other names; testing/test_resource_graph.py runs the program's own).
FLATTENING_QUERY = """\
Resources
| where type in~ ('microsoft.compute/virtualmachines', 'microsoft.compute/virtualmachinescalesets',
    'microsoft.network/networkinterfaces', 'microsoft.network/publicipaddresses')
| where resourceGroup in~ ('rg-a')
| extend configs = properties.ipConfigurations
| extend flat = array_length(configs) == 1 and isnotempty(configs[0].properties.privateIPAddress)
| project id, name, type, capacity = sku.capacity,
    nics = array_length(properties.networkProfile.networkInterfaces),
    ipConfigurations = iff(flat, dynamic(null), configs),
    privateIPAddress = iff(flat, configs[0].properties.privateIPAddress, dynamic(null)),
    privateIPAddressVersion = iff(flat, configs[0].properties.privateIPAddressVersion, dynamic(null)),
    publicIPAddress = iff(flat, configs[0].properties.publicIPAddress.id, dynamic(null)),
    ipAddress = properties.ipAddress
| order by id asc"""
PROJECTED = ("id", "name", "type", "capacity", "nics", "ipConfigurations", "privateIPAddress",
             "privateIPAddressVersion", "publicIPAddress", "ipAddress")
FLAT = ("privateIPAddress", "privateIPAddressVersion", "publicIPAddress")


def graph_rows(estate: Estate, query: str) -> dict[str, dict]:
    """The query's rows over the estate (one subscription, every group), by name."""
    return {row["name"]: row for row in evaluate_graph_query(estate, parse_graph_query(query), {SUB}, None)}


class TestGraphExpressions:
    def test_one_addressed_configuration_comes_flat_others_whole(self):
        """iff(flat, ...): a NIC whose one configuration has an address gives its address, version and
        public IP id, with ipConfigurations null; two configurations, or one without an address ("" or
        none), come whole with the flat columns null. A VM's nics count its NICs; rows without the
        array (NICs, public IPs, scale sets) have nics null, as array_length of a non-array is."""
        estate = make_estate(vms=5, uniform_sets=1, per_set=1, resource_groups=("rg-a",), public_ip_base="20.2.0.4",
                             overrides={"vm-0001": {"private_ipv6": "fd00::5"}, "vm-0002": {"private_ip": ""},
                                        "vm-0003": {"private_ip": None}, "vm-0004": {"second_nic_ip": "10.9.0.3"}})
        query = parse_graph_query(FLATTENING_QUERY)
        assert tuple(name for name, _ in query.columns) == PROJECTED and query.order[0] == (("id",), False)
        rows = graph_rows(estate, FLATTENING_QUERY)
        assert all(tuple(row) == PROJECTED for row in rows.values())      # extend's columns are not answered
        vm0 = next(estate.machines())
        assert rows["vm-0000-nic"]["ipConfigurations"] is None
        assert [rows["vm-0000-nic"][c] for c in FLAT[:2]] == [vm0.inst.private_ip, "IPv4"]
        assert rows["vm-0000-nic"]["publicIPAddress"].lower() == vm0.public_ip_id.lower()
        for name, configs in (("vm-0001-nic", 2), ("vm-0002-nic", 1), ("vm-0003-nic", 1)):
            assert len(rows[name]["ipConfigurations"]) == configs, name
            assert [rows[name][c] for c in FLAT] == [None, None, None], name
        assert rows["vm-0001-nic"]["ipConfigurations"][1]["properties"]["privateIPAddressVersion"] == "IPv6"
        assert rows["vm-0004-nic2"]["privateIPAddress"] == "10.9.0.3"
        assert [rows[f"vm-000{n}"]["nics"] for n in range(5)] == [1, 1, 1, 1, 2]
        assert rows["uvmss-00"]["capacity"] == 1
        for name in ("vm-0000-nic", "vm-0000-pip", "uvmss-00"):
            assert rows[name]["nics"] is None and rows[name]["ipConfigurations"] is None, name
        assert rows["vm-0000-pip"]["ipAddress"] == "20.2.0.4"

    def test_through_the_endpoint_in_table_format(self, fake):
        status, page, _ = graph_post(fake, {"subscriptions": [SUB], "query": FLATTENING_QUERY,
                                            "options": {"resultFormat": "table"}})
        assert status == 200, page
        assert [c["name"] for c in page["data"]["columns"]] == list(PROJECTED)
        ids = [row[0] for row in page["data"]["rows"]]
        assert ids == sorted(ids) and all("/resourceGroups/rg-a/" in i for i in ids)
        nics = [dict(zip(PROJECTED, row)) for row in page["data"]["rows"] if row[2].endswith("/networkinterfaces")]
        assert nics and all(n["privateIPAddress"] and n["ipConfigurations"] is None for n in nics)

    def test_dynamic_values_as_kusto_reads_them(self):
        """array_length of a property bag or a string is null; isnotempty({}) is true (only null and ""
        are empty); a path past an array's end or through a non-object is null; == N of a string or a
        null is false; a later extend shadows an earlier one and may use it."""
        estate = make_estate(vms=2, overrides={"vm-0001": {"tags": {}}})
        rows = graph_rows(estate, (
            "Resources | where type in~ ('microsoft.compute/virtualmachines')"
            " | extend a = properties.networkProfile, b = a.networkInterfaces | extend a = array_length(b)"
            " | project name, a, bag = array_length(tags), text = array_length(properties.provisioningState),"
            " tagged = isnotempty(tags), nothing = isempty(properties.nothing),"
            " first = b[0].id, past = b[1], through = properties.provisioningState.code,"
            " one = a == 1, textIsOne = properties.provisioningState == 1, nullIsOne = properties.nothing == 1,"
            " both = (a == 1 and isnotempty(name)) and isempty(properties.nothing)"))
        vm = rows["vm-0001"]
        assert (vm["a"], vm["bag"], vm["text"]) == (1, None, None)
        assert (vm["tagged"], rows["vm-0000"]["tagged"], vm["nothing"]) == (True, True, True)
        assert vm["first"].endswith("/Microsoft.Network/networkInterfaces/vm-0001-nic")
        assert (vm["past"], vm["through"]) == (None, None)
        assert (vm["one"], vm["textIsOne"], vm["nullIsOne"], vm["both"]) == (True, False, False, True)

    def test_order_by_a_projected_expression_and_by_an_extended_column(self):
        """Descending puts nulls (rows without NICs of their own) last, ascending first; before project an
        order may name an extended column that project leaves out."""
        estate = make_estate(vms=3, overrides={"vm-0001": {"second_nic_ip": "10.9.0.3"}})
        base = ("Resources | where type in~ ('microsoft.compute/virtualmachines', "
                "'microsoft.network/networkinterfaces')")
        counted = base + " | project name, nics = array_length(properties.networkProfile.networkInterfaces)"

        def names(query):
            return [row["name"] for row in evaluate_graph_query(estate, parse_graph_query(query), {SUB}, None)]
        nics = ["vm-0000-nic", "vm-0001-nic", "vm-0001-nic2", "vm-0002-nic"]
        assert names(counted + " | order by nics desc, name asc") == ["vm-0001", "vm-0000", "vm-0002", *nics]
        assert names(counted + " | order by nics asc, name desc") == [*reversed(nics), "vm-0002", "vm-0000",
                                                                      "vm-0001"]
        extended = (base + " | extend n = array_length(properties.networkProfile.networkInterfaces)"
                    " | order by n desc, name asc | project name")
        assert names(extended) == ["vm-0001", "vm-0000", "vm-0002", *nics]
        assert parse_graph_query(counted + " | order by nics").order_projected

    @pytest.mark.parametrize("expression, problem", [
        ("tostring(properties.primary)", "function tostring"),
        ("properties.primary == 'true'", "non-negative integer literal"),
        ("array_length(properties.ipConfigurations) != 1", "'!='"),
        ("properties.ipConfigurations[-1].id", "non-negative integer literal"),
        ("array_length(properties.ipConfigurations) == 1 or isnotempty(id)", "'or'"),
        ("1 + 1", "'\\+'"),
        ("dynamic([1])", "dynamic literal"),
        ("iff(isnotempty(id), id, dynamic(null))", "iff\\(bool, string, dynamic\\)"),
        ("iff(properties.primary, 1, 2)", "iff\\(dynamic, long, long\\)"),
        ("array_length(id)", "array_length\\(\\) of a string"),
        ("id.segments", "'id' is a string"),
        ("hostName", "column 'hostName'"),
        ("iff(isnotempty(id), 1)", "2 argument"),
    ])
    def test_what_is_not_modelled_is_refused_by_name(self, expression, problem):
        with pytest.raises(ValueError, match=problem):
            parse_graph_query(f"Resources | project id, x = {expression}")

    @pytest.mark.parametrize("stages, problem", [
        ("| summarize count() by type", "operator not modelled"),
        ("| extend n | project id", "extend NAME = EXPR"),
        ("| project id | where type in~ ('microsoft.compute/virtualmachines')", "after project"),
        ("| project id | extend n = 1", "after project"),
        ("| extend type = 1 | where type in~ ('a') | project id", "extended column 'type'"),
        ("| order by id asc | extend n = 1 | project id", "extend after order by"),
        ("| project id, id", "twice"),
        ("| project id, properties.primary", "'\\.'"),
        ("| project id | order by name", "not a column of the projection"),
        ("| project id | order by id.segment", "'id' is a string"),
    ])
    def test_stages_the_fake_does_not_model_are_refused(self, stages, problem):
        with pytest.raises(ValueError, match=problem):
            parse_graph_query(f"Resources {stages}")


class TestIdentity:
    def test_default_credential_takes_the_managed_identity_token(self, fake):
        token = DefaultAzureCredential().get_token(ARM_SCOPE)
        assert token.token == fake.token and token.expires_on > time.time() + 3000
        [request] = fake.requests
        assert request.path == "/msi/token" and request.endpoint == "token"
        assert request.query == {"api-version": "2019-08-01", "resource": "https://management.azure.com"}

    def test_managed_identity_endpoint_checks_its_header(self, fake):
        status, _ = raw_get(fake, "/msi/token?api-version=2019-08-01&resource=x",
                            {"X-IDENTITY-HEADER": "wrong"})
        assert status == 401

    @pytest.mark.parametrize("authorization, code", [
        (None, "AuthenticationFailed"), ("Bearer forged", "InvalidAuthenticationToken")])
    def test_resource_manager_wants_the_bearer_token(self, fake, authorization, code):
        headers = {"Authorization": authorization} if authorization else {}
        status, body = raw_get(fake, f"/subscriptions/{SUB}/providers/Microsoft.Network/networkInterfaces"
                                     "?api-version=2026-03-01", headers)
        assert (status, body["error"]["code"]) == (401, code)

    def test_api_version_is_required_and_unknown_paths_are_404(self, fake):
        authorization = {"Authorization": f"Bearer {fake.token}"}
        status, body = raw_get(fake, f"/subscriptions/{SUB}/providers/Microsoft.Network/networkInterfaces",
                               authorization)
        assert (status, body["error"]["code"]) == (400, "MissingApiVersionParameter")
        status, body = raw_get(fake, f"/subscriptions/{SUB}/providers/Microsoft.Web/sites?api-version=1",
                               authorization)
        assert status == 404 and set(body["error"]) == {"code", "message"}
        assert fake.counts["total"] == 2 and fake.requests[-1].endpoint is None

    def test_client_secret_credential_against_the_fake_authority(self, fake):
        credential = ClientSecretCredential(fake.tenant_id, fake.client_id, fake.client_secret,
                                            authority=fake.url, disable_instance_discovery=True)
        assert credential.get_token(ARM_SCOPE).token == fake.token
        wrong = ClientSecretCredential(fake.tenant_id, fake.client_id, "wrong",
                                       authority=fake.url, disable_instance_discovery=True)
        with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
            wrong.get_token(ARM_SCOPE)
        assert fake.counts["openid"] == 2 and fake.counts["aad_token"] == 2
        # A tenant Entra ID does not know: its OpenID configuration is already refused.
        stranger = ClientSecretCredential("tenant-1", fake.client_id, fake.client_secret,
                                          authority=fake.url, disable_instance_discovery=True)
        with pytest.raises(ClientAuthenticationError):
            stranger.get_token(ARM_SCOPE)
        assert fake.counts["openid"] == 3 and fake.counts["aad_token"] == 2


# --- faults ---
class TestFaults:
    def test_429_is_retried_after_retry_after(self, fake):
        _, network = clients(fake)
        fault = fake.add_fault("429", endpoint="nics", retry_after=1)
        started = time.monotonic()
        assert len(list(network.network_interfaces.list_all())) == 5
        assert time.monotonic() - started >= 0.9
        assert fault.fired == 1 and fake.counts["nics"] == 3 + 1

    def test_persistent_500_fails_after_the_sdk_retries(self, fake):
        _, network = clients(fake)
        fake.add_fault("500", endpoint="nics", times=None)
        with pytest.raises(HttpResponseError) as caught:
            list(network.network_interfaces.list_all())
        assert caught.value.status_code == 500
        assert caught.value.error.code == "InternalServerError"
        assert fake.counts["nics"] == 2   # retry_total=1

    def test_a_later_page_can_fail(self, fake):
        compute, _ = clients(fake)
        fake.add_fault("503", endpoint="vms", page=2, times=None, retry_after=0)
        pages = compute.virtual_machines.list_all().by_page()
        assert names(next(pages)) == ["vm-0000", "vm-0001"]
        with pytest.raises(HttpResponseError):
            next(pages)
        assert fake.counts["vms"] == 3

    def test_slow_response_hits_the_read_timeout(self, fake):
        compute, _ = clients(fake, read_timeout=0.3)
        fake.add_fault("slow", endpoint="vmss", delay=5, times=None)
        started = time.monotonic()
        with pytest.raises(ServiceResponseTimeoutError):
            list(compute.virtual_machine_scale_sets.list_all())
        assert time.monotonic() - started < 3 and fake.counts["vmss"] == 2

    def test_one_slow_response_is_retried(self, fake):
        compute, _ = clients(fake, read_timeout=0.3)
        fake.add_fault("slow", endpoint="vmss", delay=1)
        assert len(list(compute.virtual_machine_scale_sets.list_all())) == 2

    def test_invalid_json_is_a_decode_error_and_not_retried(self, fake):
        _, network = clients(fake)
        fake.add_fault("bad_json", endpoint="pips")
        with pytest.raises(DecodeError):
            list(network.public_ip_addresses.list_all())
        assert fake.counts["pips"] == 1

    def test_a_page_without_value_silently_ends_the_listing(self, fake):
        """The SDK reads `value` with .get(): the caller cannot tell this from a short listing."""
        _, network = clients(fake)
        fake.add_fault("no_value", endpoint="nics", page=2)
        assert names(network.network_interfaces.list_all()) == ["vm-0000-nic", "vm-0001-nic"]

    def test_path_regex_aims_at_one_scale_set(self, fake):
        compute, network = clients(fake)
        fake.add_fault("500", path="/virtualMachineScaleSets/UVMSS-00/", times=None)
        assert len(list(compute.virtual_machine_scale_set_vms.list("rg-a", "fvmss-00"))) == 3
        with pytest.raises(HttpResponseError):
            list(network.network_interfaces.list_virtual_machine_scale_set_network_interfaces("rg-a", "uvmss-00"))

    def test_faults_are_validated(self, fake):
        with pytest.raises(ValueError):
            fake.add_fault("explode")
        with pytest.raises(ValueError):
            fake.add_fault("500", endpoint="nic")

    def test_stop_cuts_a_slow_response_short(self):
        fake = FakeArm(small_estate()).start()
        fake.add_fault("slow", endpoint="vmss", delay=30)
        outcome = []
        path = f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachineScaleSets?api-version=1"
        caller = threading.Thread(target=lambda: outcome.append(self._try_get(fake, path)))
        caller.start()
        while fake.counts["vmss"] == 0:
            time.sleep(0.01)
        started = time.monotonic()
        fake.stop()
        caller.join(timeout=5)
        assert time.monotonic() - started < 2
        assert outcome and isinstance(outcome[0], OSError)   # closed without an answer

    @staticmethod
    def _try_get(fake, path):
        try:
            return raw_get(fake, path, {"Authorization": f"Bearer {fake.token}"})
        except OSError as error:
            return error


# --- estate generator and JSON ---
class TestEstate:
    def test_generator_spreads_services_over_regions_with_unique_addresses(self):
        estate = make_estate(vms=4, uniform_sets=2, flexible_sets=1, per_set=2,
                             services=[("web", 80), ("api", 81)], regions=["eastus", "westus"],
                             subscriptions=["s1", "s2"], ip_base="127.0.0.2")
        placed = [(vm.tags[SERVICE_NAME_TAG], vm.location) for vm in estate.vms]
        assert placed == [("web", "eastus"), ("api", "eastus"), ("web", "westus"), ("api", "westus")]
        assert [vm.subscription for vm in estate.vms] == ["s1", "s2", "s1", "s2"]
        addresses = [p.inst.private_ip for p in estate.machines()]
        assert addresses[:2] == ["127.0.0.2", "127.0.0.3"] and len(set(addresses)) == len(addresses) == 10
        assert [ss.tags[SERVICE_NAME_TAG] for ss in estate.scale_sets] == ["web", "api", "web"]
        assert all(inst.tags == {} for ss in estate.scale_sets for inst in ss.instances)

    def test_power_states_are_drawn_from_the_seed(self):
        def states(seed):
            return [vm.power_state for vm in make_estate(vms=50, not_running=0.3, seed=seed).vms]
        assert states(1) == states(1) != states(2)
        assert set(states(1)) == {"running", "stopped", "deallocated"}

    def test_scaling_out_takes_the_next_free_addresses(self):
        estate = make_estate(vms=1, uniform_sets=1, per_set=1, public_ip_base="20.0.0.4")
        estate.scale("uvmss-00", 2)
        new = estate.find("uvmss-00_1")
        assert (new.private_ip, new.public_ip, new.private_ipv6) == ("10.0.0.6", "20.0.0.6", None)

    def test_new_instances_get_their_scale_sets_health(self):
        estate = make_estate(uniform_sets=1, per_set=1)
        estate.update("uvmss-00", health="Initializing")
        estate.scale("uvmss-00", 3)
        health = [i.health for i in estate.find("uvmss-00").instances]
        assert health == [None, "Initializing", "Initializing"]
        assert Estate.from_json(estate.to_json()) == estate

    def test_names_must_exist_and_be_unique(self):
        with pytest.raises(KeyError):
            make_estate(vms=1, overrides={"vm-9999": {"power_state": "stopped"}})
        estate = make_estate(vms=1)
        with pytest.raises(ValueError):
            estate.add_vm(Vm(name="vm-0000", private_ip="10.1.1.1"))
        with pytest.raises(TypeError):
            estate.update("vm-0000", colour="blue")

    def test_json_round_trip(self):
        estate = small_estate(ipv6_base="fd00::4")
        estate.scale("uvmss-00", 1)
        again = Estate.from_json(estate.to_json())
        assert again == estate
        assert again.scale_sets[0].next_index == 3


# --- standalone mode ---
def test_standalone_serves_and_reloads_its_estate_file(tmp_path, sdk_env, monkeypatch):
    estate_file = tmp_path / "estate.json"
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "fake_arm.py"), "--generate", "vms=3,uniform=1,per_set=2",
         "--estate", str(estate_file), "--state-dir", str(tmp_path), "--page-size", "2"],
        stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready, "no export line within 20 s"
        line = process.stdout.readline()
        assert line.startswith("export ")
        env = dict(word.split("=", 1) for word in shlex.split(line)[1:])
        assert set(env) >= {"REQUESTS_CA_BUNDLE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"}
        assert env["REQUESTS_CA_BUNDLE"] == str(tmp_path / "ca.pem")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        compute = ComputeManagementClient(DefaultAzureCredential(), SUB, base_url=env["FAKE_ARM_URL"],
                                          credential_scopes=[ARM_SCOPE], connection_timeout=5, read_timeout=10)
        assert len(list(compute.virtual_machines.list_all())) == 3

        (tmp_path / "next.json").write_text(make_estate(vms=5).to_json())
        (tmp_path / "next.json").replace(estate_file)
        deadline = time.monotonic() + 10
        while len(list(compute.virtual_machines.list_all())) != 5:
            assert time.monotonic() < deadline, "estate file not re-read within 10 s"
            time.sleep(0.1)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_endpoint_names_are_the_documented_counter_keys():
    assert set(ENDPOINTS) == {"vms", "vms_status", "vms_rg", "vmss", "vmss_rg", "vmss_vms", "nics", "nics_rg",
                              "vmss_nics", "pips", "pips_rg", "vmss_pips", "nic_get", "vmss_nic_get",
                              "vm_instance_view", "vmss_vm_instance_view", "token", "openid", "aad_token",
                              "metadata", "graph"}
