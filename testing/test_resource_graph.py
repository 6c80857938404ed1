"""Azure Resource Graph as the discovery source: the real SDK pipeline against the HTTPS fake, which answers
POST /providers/Microsoft.ResourceGraph/resources in the documented shape, checks the query's tables, types
and columns against what Microsoft documents (resource_graph_schema.json) and keeps the per-user quota."""
import dataclasses
import time
from pathlib import Path

import pytest

import haproxy_azure_discovery as m
from fake_arm import GRAPH_SCHEMA, evaluate_graph_query, graph_table, make_estate, parse_graph_query
from test_haproxy_azure_discovery import make_config

SUB = "00000000-0000-0000-0000-000000000001"
SUB2 = "00000000-0000-0000-0000-000000000002"


def seen(arm_config, **azure) -> dict[str, tuple[str | None, str]]:
    """id -> (address, power state), as one discovery with these azure keys found them."""
    discovery = m.AzureSource(arm_config(azure=azure)).discover()
    return {i.id: (i.address, i.power_state) for i in discovery.instances}


def two_subscriptions_odd_nics_estate():
    """Two subscriptions; VMs, Uniform and Flexible members; stopped and deallocated machines; public
    addresses and IPv6 everywhere; second (non-primary) NICs on a VM, a Flexible member and a Uniform
    instance; a VM whose NIC is gone; an untagged Uniform set."""
    estate = make_estate(vms=9, uniform_sets=2, flexible_sets=2, per_set=3, subscriptions=(SUB, SUB2),
                         resource_groups=("rg-a", "rg-b"), ipv6_base="fd00::10", public_ip_base="20.0.0.4",
                         not_running=0.3, seed=7,
                         overrides={"vm-0003": {"second_nic_ip": "10.9.0.3"},
                                    "fvmss-01_2": {"second_nic_ip": "10.9.0.4", "power_state": "stopped"},
                                    "uvmss-00_1": {"second_nic_ip": "10.9.0.5"},
                                    "vm-0005": {"has_nic": False}, "uvmss-01": {"tags": {}}})
    return estate


@pytest.mark.parametrize("address, ip_version", [("private", "ipv4"), ("public", "ipv4"), ("private", "ipv6")])
def test_both_sources_find_the_same_instances(arm, arm_config, address, ip_version):
    arm.estate = two_subscriptions_odd_nics_estate()
    both = dict(subscription_ids=[SUB2], address=address, ip_version=ip_version)
    listed = seen(arm_config, **both)
    arm.reset_counts()
    graphed = seen(arm_config, source="resource_graph", **both)
    assert graphed == listed
    # ... and they are the estate's (Uniform instances of tagged sets only: no other can be served).
    assert not any("/uvmss-01/" in vid for vid in graphed)
    machines = {p.vm_id.lower(): p for p in arm.estate.machines()}
    for vid, (found_address, state) in graphed.items():
        p = machines[vid]
        want = {"public": p.inst.public_ip, "ipv6": p.inst.private_ipv6}.get(
            address if address == "public" else ip_version, p.inst.private_ip)
        assert found_address == (want if p.inst.has_nic else None) and state == p.inst.power_state
    assert {"stopped", "deallocated", "running"} <= {state for _, state in graphed.values()}
    assert graphed[arm.estate.resource_id("vm-0003").lower()][0] != "10.9.0.3"
    # Two queries, one page each (Resources; ComputeResources because a Uniform set is tagged): no listing.
    assert arm.counts["graph"] == 2 and arm.counts["total"] - arm.counts["token"] - arm.counts["metadata"] == 2
    assert arm.counts.get("graph_throttled", 0) == 0


def test_queries_name_only_documented_tables_types_and_columns():
    for table in m.GRAPH_TABLES:
        for groups, public in (((), True), (("rg-a", "rg-b"), False)):
            query = parse_graph_query(m.graph_query(table, groups, public))
            assert query.table == table
            types = dict(query.filters)["type"]
            assert any(t.endswith("/publicipaddresses") for t in types) == public
            assert {name for name, _ in query.columns} >= {"id", "name", "type", "location", "tags", "powerState"}
    assert set(m.GRAPH_TABLES) == set(GRAPH_SCHEMA["tables"])
    assert m.GRAPH_API in GRAPH_SCHEMA["api_versions"] and m.GRAPH_PAGE == GRAPH_SCHEMA["max_top"]


@pytest.mark.parametrize("query, problem", [
    ("Resourcez | project id", "table 'Resourcez'"),
    ("Resources | where type in~ ('microsoft.compute/virtualmachinescalesets/virtualmachines') | project id",
     "not documented in table Resources"),
    ("Resources | project id, powerState = properties.extended.instanceView.powerState.code, hostName",
     "column 'hostName'"),
    ("Resources | summarize count() | project id", "operator not modelled"),
    ("Resources | project id, n = array_sum(properties.networkProfile.networkInterfaces)",
     r"function array_sum\(\) is not modelled"),
    ("Resources | where type in~ ('microsoft.compute/virtualmachines')", "no project"),
])
def test_the_fake_refuses_undocumented_queries(query, problem):
    with pytest.raises(ValueError, match=problem):
        parse_graph_query(query)


def test_the_fake_answers_a_bad_query_with_400(arm, arm_config):
    import azure.core.exceptions
    source = m.AzureSource(arm_config(azure={"source": "resource_graph"}))
    source.discover()                              # connects (and reads the cloud metadata)
    request = source.pager.request("POST", f"{arm.url}/providers/Microsoft.ResourceGraph/resources?api-version=2022-10-01",
                              json={"subscriptions": [SUB], "query": "Resources | project id, vmSize"})
    response = source.pager._client.send_request(request)
    assert response.status_code == 400 and response.json()["error"]["details"][0]["code"] == "InvalidQuery"
    with pytest.raises(azure.core.exceptions.HttpResponseError):
        response.raise_for_status()


def test_resource_groups_become_a_where_and_roles_narrow_the_rows(arm, arm_config):
    arm.estate = two_subscriptions_odd_nics_estate()
    listed = seen(arm_config, subscription_ids=[SUB2], resource_groups=["rg-a"])
    graphed = seen(arm_config, subscription_ids=[SUB2], resource_groups=["rg-a"], source="resource_graph")
    assert graphed == listed and graphed
    assert all("/resourcegroups/rg-a/" in vid for vid in graphed)
    queries = [r for r in arm.requests if r.endpoint == "graph"]
    assert queries and all(r.method == "POST" for r in queries)
    # A Reader role on rg-a only: Resource Graph answers with what the principal may read, no 403.
    arm.reader_groups = {"rg-a"}
    assert seen(arm_config, subscription_ids=[SUB2], source="resource_graph") == graphed


def test_pages_follow_the_skip_token_and_the_quota_is_waited_for(arm, arm_config):
    """1,300 VMs: 2,600 rows of Resources, three pages of 1,000. With a quota of 2 queries a second, the
    third page waits for the window to reset instead of drawing a 429."""
    arm.estate = make_estate(vms=1300, not_running=0.1, seed=3)
    arm.graph_quota, arm.graph_window = 2, 1.0
    started = time.monotonic()
    found = seen(arm_config, source="resource_graph")
    assert time.monotonic() - started >= 0.5
    assert len(found) == 1300 and arm.counts["graph"] == 3 and arm.counts.get("graph_throttled", 0) == 0
    tokens = [r for r in arm.requests if r.endpoint == "graph"]
    assert len(tokens) == 3
    arm.graph_quota = 1000
    assert seen(arm_config) == found                # and the listings agree


def test_a_429_is_retried_and_a_failing_query_fails_the_discovery(arm, arm_config):
    arm.estate = make_estate(vms=5)
    arm.add_fault("429", endpoint="graph", retry_after=1)
    assert len(seen(arm_config, source="resource_graph")) == 5 and arm.counts["graph"] == 2
    arm.add_fault("500", endpoint="graph", times=None)
    with pytest.raises(m.AzureError, match="Resource Graph query of Resources failed: HTTP 500"):
        seen(arm_config, source="resource_graph")


def test_a_truncated_result_fails_rather_than_drains(arm, arm_config, monkeypatch):
    """Resource Graph cuts a result it cannot page (no id column) at $top and says so: that page must not
    pass for the whole estate."""
    arm.estate = make_estate(vms=600)
    monkeypatch.setattr(m, "GRAPH_QUERY", m.GRAPH_QUERY.replace("| project id, ", "| project ")
                        .replace("\n| order by id asc", ""))
    with pytest.raises(m.AzureError, match="result truncated"):
        seen(arm_config, source="resource_graph")


@pytest.mark.parametrize("headers, wait", [
    ({"x-ms-user-quota-remaining": "0", "x-ms-user-quota-resets-after": "00:00:03"}, 3.0),
    ({"x-ms-user-quota-remaining": "4", "x-ms-user-quota-resets-after": "00:00:03"}, None),
    ({"x-ms-user-quota-remaining": "0", "x-ms-user-quota-resets-after": "01:00:00"}, 60.0),
    ({"x-ms-user-quota-remaining": "0", "x-ms-user-quota-resets-after": "soon"}, None),
    ({}, None),
])
def test_quota_wait(headers, wait):
    assert m.quota_wait(headers) == wait


def test_the_daemon_hooks_reach_resource_graph_pages(arm, arm_config):
    """The keep-alive hears from every page, and a shutdown ends the discovery between pages, for
    Resource Graph as for the listings (one page loop)."""
    arm.estate = make_estate(vms=1300)                # 3 pages of Resources
    heard, stop = [], m.Flag()
    progress = [lambda: heard.append(1)]
    source = m.AzureSource(arm_config(azure={"source": "resource_graph"}), None, stop, lambda: progress[0]())
    assert len(source.discover().instances) == 1300 and len(heard) >= 3
    arm.reset_counts()
    progress[0] = stop.set                            # shutdown asked for after the first page
    with pytest.raises(m.Aborted):
        source.discover()
    assert arm.counts["graph"] == 1


# --- rows shaped page by page -------------------------------------------------------------
# The query and the shaping as they were before rows were shaped page by page, type by type: one
# shape for every type, every row held until the last page came. The reference the program's
# shaping must agree with.
FORMER_GRAPH_QUERY = """\
{table}
| where type in~ ({types})
| project id, name, type, location, tags,
    powerState = properties.extended.instanceView.powerState.code,
    provisioningState = properties.provisioningState,
    capacity = sku.capacity,
    networkInterfaces = properties.networkProfile.networkInterfaces,
    virtualMachineScaleSet = properties.virtualMachineScaleSet.id,
    orchestrationMode = properties.orchestrationMode,
    virtualMachine = properties.virtualMachine.id,
    primary = properties.primary,
    ipConfigurations = properties.ipConfigurations,
    ipAddress = properties.ipAddress
| order by id asc"""


def former_arm_shape(row):
    props = {}
    for column, key in (("networkInterfaces", "networkProfile"),
                        ("virtualMachineScaleSet", "virtualMachineScaleSet"),
                        ("virtualMachine", "virtualMachine")):
        if row.get(column):
            props[key] = ({"networkInterfaces": row[column]} if column == "networkInterfaces"
                          else {"id": row[column]})
    for column in ("orchestrationMode", "primary", "ipConfigurations", "ipAddress",
                   "provisioningState"):
        if row.get(column) is not None:
            props[column] = row[column]
    statuses = [{"code": row["powerState"]}] if row.get("powerState") else []
    if str(row.get("provisioningState") or "").lower() == "deleting":
        statuses.append({"code": "ProvisioningState/deleting"})
    if statuses:
        props["instanceView"] = {"statuses": statuses}
    shaped = {"id": row.get("id"), "name": row.get("name"), "location": row.get("location"),
              "tags": row.get("tags"), "properties": props}
    if row.get("capacity") is not None:
        shaped["sku"] = {"capacity": row["capacity"]}
    return shaped


def former_listing(estate, table):
    """AzureListing of one table as the former query and shaping gave it."""
    types = ", ".join(f"'{t}'" for t in m.GRAPH_TABLES[table])
    query = parse_graph_query(FORMER_GRAPH_QUERY.replace("{table}", table)
                              .replace("{types}", types))
    listing = m.AzureListing()
    into = {"microsoft.compute/virtualmachines": listing.vms,
            "microsoft.compute/virtualmachinescalesets": listing.scale_sets,
            "microsoft.network/networkinterfaces": listing.nics,
            "microsoft.network/publicipaddresses": listing.public_ips}
    into.update(zip(m.GRAPH_TABLES["ComputeResources"],
                    (listing.set_instances, listing.nics, listing.public_ips)))
    for row in evaluate_graph_query(estate, query, {SUB, SUB2}, None):
        into[row["type"]].append(former_arm_shape(row))
    return listing


def paged_listing(estate, table, page_size):
    """Inventory of one table as the program reads it from pages of `page_size` rows in table
    format; and the GraphListing."""
    query = parse_graph_query(m.graph_query(table, ()))
    columns = tuple(name for name, _ in query.columns)
    rows = evaluate_graph_query(estate, query, {SUB, SUB2}, None)
    shaped = m.GraphListing()
    for start in range(0, len(rows), page_size):
        shaped.add_table(graph_table(rows[start:start + page_size], columns))
    return shaped.inventory, shaped, len(rows)


def joined(resources, compute, cfg):
    """query_graph's merge of the two tables' inventories, then the join and the checks."""
    listing = dataclasses.replace(resources, nics=resources.nics + compute.nics,
                                  public_ips=resources.public_ips + compute.public_ips)
    tagged = {m._id(s.get("id")) for s in m.scale_sets_to_list(listing.scale_sets, cfg)}
    listing.set_instances = [i for i in compute.set_instances
                             if m._scale_set_of(m._id(i.id)) in tagged]
    instances = m.join(listing, cfg.azure, [])
    return sorted(instances), m.impossible(listing, instances, cfg, graph=True)


def shaping_estates():
    """The odd estate above; one with scale sets of every kind, machines being deleted (their own
    provisioning state, and a scale set's), a VM whose NIC is gone and a NIC's second address."""
    odd = two_subscriptions_odd_nics_estate()
    deleting = {"provisioning_state": "Deleting"}
    varied = make_estate(vms=40, uniform_sets=3, flexible_sets=2, per_set=4,
                         resource_groups=("rg-a", "rg-b"), ipv6_base="fd00::100",
                         public_ip_base="20.1.0.4", not_running=0.2, seed=11,
                         overrides={"vm-0004": deleting, "uvmss-01_2": deleting,
                                    "fvmss-00_1": {**deleting, "power_state": "stopped"},
                                    "vm-0007": {"has_nic": False},
                                    "vm-0009": {"second_nic_ip": "10.8.0.9"},
                                    "vm-0011": {"private_ip": ""}})
    return {"odd": odd, "varied": varied}


def test_every_type_queried_has_a_shape():
    assert set(m.GRAPH_KINDS) == {t for types in m.GRAPH_TABLES.values() for t in types}


# What scale_sets_to_list and impossible read of a scale set: keys of the item, of its properties.
READ_OF_SCALE_SET = (("id", "name", "tags", "sku"), ("orchestrationMode",))


def read_of_scale_sets(inventory):
    keys, property_keys = READ_OF_SCALE_SET
    return [{**{key: s.get(key) for key in keys},
             "properties": {key: s["properties"].get(key) for key in property_keys}}
            for s in inventory.scale_sets]


def one_configuration_unmarked(inventory):
    """The inventory with `primary` left out of every NIC's only IP configuration: the join reads
    a single configuration whether marked or not (Azure may omit it), and the query's flat columns
    leave it out."""
    return dataclasses.replace(inventory, scale_sets=[], nics=[
        nic._replace(configs=[nic.configs[0]._replace(primary=None)]) if len(nic.configs) == 1
        else nic for nic in inventory.nics])


@pytest.mark.parametrize("estate_name", ["odd", "varied"])
@pytest.mark.parametrize("page_size", [1, 7, 1000])
def test_rows_read_page_by_page_are_the_records_of_the_former_shaping(estate_name, page_size):
    """Rows read as they come give the records the listings' reading (inventory_of) gives of the
    Resource Manager objects the former shaping (whole IP configurations) made of the same
    resources; scale sets the same as far as they are read."""
    estate = shaping_estates()[estate_name]
    for table in m.GRAPH_TABLES:
        inventory, shaped, rows = paged_listing(estate, table, page_size)
        former = m.inventory_of(former_listing(estate, table))
        assert read_of_scale_sets(inventory) == read_of_scale_sets(former)
        assert one_configuration_unmarked(inventory) == one_configuration_unmarked(former)
        # ... NICs of two configurations among them (IPv4 and IPv6), power states of every kind
        assert any(len(nic.configs) > 1 for nic in inventory.nics)
        assert shaped.rows == rows and len(shaped.ids) == rows
    powers = {vm.power for vm in paged_listing(estate, "Resources", page_size)[0].vms}
    assert {"running", "deallocated"} <= powers
    assert ("deleting" in powers) == (estate_name == "varied")


def test_a_nic_with_one_addressed_configuration_comes_as_three_columns():
    """The query leaves out of a NIC's row what the join does not read: one IP configuration with
    an address comes as its address, version and public IP's id; two configurations, or one
    without an address, come whole, as Azure lists them. A VM's NICs come as their number."""
    estate = make_estate(vms=4, subscriptions=(SUB,), public_ip_base="20.2.0.4",
                         overrides={"vm-0001": {"private_ipv6": "fd00::5"},
                                    "vm-0002": {"private_ip": ""},
                                    "vm-0003": {"second_nic_ip": "10.9.0.3"}})
    query = parse_graph_query(m.graph_query("Resources", ()))
    rows = {row["id"].rsplit("/", 1)[-1]: row
            for row in evaluate_graph_query(estate, query, {SUB}, None)}
    flat = ("privateIPAddress", "privateIPAddressVersion", "publicIPAddress")
    vm0 = next(estate.machines())
    assert rows["vm-0000-nic"]["ipConfigurations"] is None
    private, version, public = (rows["vm-0000-nic"][c] for c in flat)
    assert (private, version, public.lower()) == (vm0.inst.private_ip, "IPv4",
                                                  vm0.public_ip_id.lower())
    for whole, configs in (("vm-0001-nic", 2), ("vm-0002-nic", 1)):
        assert len(rows[whole]["ipConfigurations"]) == configs
        assert [rows[whole][c] for c in flat] == [None, None, None]
    assert [rows[f"vm-000{n}"]["nics"] for n in range(4)] == [1, 1, 1, 2]
    assert rows["vm-0000-nic"]["nics"] is None
    # ... and read into the records the whole configurations give (the public IP's id lower-cased)
    nic = m._graph_nic(m.GraphRow(*(rows["vm-0000-nic"].get(c) for c in m.GraphRow._fields)))
    assert nic.configs == [m.IpConfiguration(None, vm0.inst.private_ip, "IPv4",
                                             vm0.public_ip_id.lower())]


def test_the_documented_query_is_the_one_sent():
    """docs/azure.md shows the query for one resource group and public addresses: as sent."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "azure.md").read_text()
    shown = text.split("```kusto\n", 1)[1].split("\n```", 1)[0]
    assert shown == m.graph_query("Resources", ("rg-a",), True)


@pytest.mark.parametrize("configs", [["a string"], [{"properties": "a string"}], [None],
                                     "a string", {"properties": {}}])
def test_an_ip_configuration_not_shaped_as_documented_fails_the_query(configs):
    """An IP configuration that is no object (or whose properties are none), or configurations
    that are no list: the query fails naming the row, as the join refuses such a NIC from the
    listings; leaving the NIC out would drain its VM."""
    vid = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
    good = {"properties": {"primary": True, "privateIPAddress": "10.0.0.4"}}
    rows = [{"id": vid, "name": "vm1", "type": "microsoft.compute/virtualmachines",
             "powerState": "PowerState/running"},
            {"id": vid + "-nic", "type": "microsoft.network/networkinterfaces",
             "virtualMachine": vid,
             "ipConfigurations": [*configs, good] if isinstance(configs, list) else configs}]
    with pytest.raises(m.AzureError, match=r"Resource Graph row 2 \(/subscriptions/.*/vm1-nic\) is "
                                           r"not shaped as Azure documents it"):
        m.GraphListing().add(m.GraphRow(*(row.get(c) for c in m.GraphRow._fields))
                             for row in rows)
    nic = {"id": vid + "-nic", "properties": {"virtualMachine": {"id": vid},
                                              "ipConfigurations": rows[1]["ipConfigurations"]}}
    with pytest.raises((AttributeError, TypeError)):
        m.inventory_of(m.AzureListing(nics=[nic]))


@pytest.mark.parametrize("estate_name", ["odd", "varied"])
@pytest.mark.parametrize("address, ip_version",
                         [("private", "ipv4"), ("public", "ipv4"), ("private", "ipv6")])
def test_rows_shaped_page_by_page_join_into_the_former_instances(estate_name, address, ip_version):
    estate = shaping_estates()[estate_name]
    cfg = make_config(azure={"address": address, "ip_version": ip_version})
    former = joined(m.inventory_of(former_listing(estate, "Resources")),
                    m.inventory_of(former_listing(estate, "ComputeResources")), cfg)
    for page_size in (1, 7, 1000):
        now = joined(paged_listing(estate, "Resources", page_size)[0],
                     paged_listing(estate, "ComputeResources", page_size)[0], cfg)
        assert now == former
    instances = former[0]
    assert {i.kind for i in instances} == {"vm", "flexible", "uniform"} and former[1] is None
    assert None in {i.address for i in instances}                       # a VM whose NIC is gone
    assert ("deleting" in {i.power_state for i in instances}) == (estate_name == "varied")


def test_a_bad_row_fails_the_discovery_on_its_own_page(arm, arm_config):
    """Pages are shaped as they come: a row without an id on page 2 ends the query there, counted
    among all the query's rows."""
    arm.estate = make_estate(vms=1300)                     # 2,600 rows: three pages
    arm.add_fault("item_without_id", endpoint="graph", page=2)
    with pytest.raises(m.AzureError, match=r"Resource Graph row 1001 has no id or no type"):
        m.AzureSource(arm_config(azure={"source": "resource_graph"})).discover()
    assert arm.counts["graph"] == 2


def test_a_table_row_has_the_columns_the_query_projects():
    for table in m.GRAPH_TABLES:
        for public in (True, False):
            query = parse_graph_query(m.graph_query(table, ("rg-a",), public))
            assert tuple(name for name, _ in query.columns) == m.GraphRow._fields


def test_table_columns_are_read_by_name():
    """Cells are taken by their column's name: another order, a column more or one less (null) read
    the same."""
    estate = shaping_estates()["varied"]
    query = parse_graph_query(m.graph_query("Resources", ()))
    columns = tuple(name for name, _ in query.columns)
    rows = evaluate_graph_query(estate, query, {SUB, SUB2}, None)
    shuffled = tuple(reversed(columns)) + ("zones",)
    shaped = m.GraphListing()
    shaped.add_table(graph_table([{**row, "zones": ["1"]} for row in rows], shuffled))
    assert shaped.inventory == paged_listing(estate, "Resources", 1000)[0]
    without, null = m.GraphListing(), m.GraphListing()
    without.add_table(graph_table(rows, tuple(c for c in columns if c != "ipAddress")))
    null.add_table(graph_table([{**row, "ipAddress": None} for row in rows], columns))
    assert without.inventory == null.inventory and without.inventory.public_ips


@pytest.mark.parametrize("data, error", [
    ([{"id": "x", "type": "y"}], r'malformed page 1 \(no "data" table\)'),
    ({"columns": [{"name": "id"}]}, r'malformed page 1 \(no "data" table\)'),
    ({"columns": [{"name": "id"}, {"name": "type"}], "rows": [["a", "b"], ["c"]]},
     r"malformed page 1 \(item 2 is a row of 1 cells, not a row of 2 cells\)"),
    ({"columns": [{"name": "id"}, {"name": "type"}], "rows": [{"id": "a", "type": "b"}]},
     r"malformed page 1 \(item 1 is an object, not a row of 2 cells\)"),
    ({"columns": [{"name": "id"}, {"name": "type"}], "rows": [["a", None]]},
     r"Resource Graph row 1 has no id or no type"),
])
def test_a_page_that_is_no_table_fails(data, error):
    with pytest.raises(m.AzureError, match=error):
        m.GraphListing("Resource Graph query of Resources").add_table(data)
