"""Faults of the Resource Manager fake that change a real answer: Resource Graph's, items not shaped as
documented, links and redirects to elsewhere, a page that trickles. Driven by the real SDK where a client
would meet them, else by urllib."""
import http.client
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
from azure.core.exceptions import HttpResponseError

from fake_arm import DEFAULT_SUBSCRIPTION, ITEM_KINDS, FakeArm
from conftest import azure_env
from test_fake_arm import clients, graph_post, names, raw_get, small_estate

SUB = DEFAULT_SUBSCRIPTION
VMS = f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines?api-version=2026-04-01"
QUERY = ("Resources | where type in~ ('microsoft.compute/virtualmachines') | project id, name, type "
         "| order by id asc")


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


def bearer(fake) -> dict:
    return {"Authorization": f"Bearer {fake.token}"}


def graph(fake, top=100, token=None, query=QUERY, result_format="objectArray"):
    options = {"$top": top, "resultFormat": result_format,
               **({"$skipToken": token} if token else {})}
    return graph_post(fake, {"subscriptions": [SUB], "query": query, "options": options})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def raw_response(fake, path: str, headers: dict | None = None, body: dict | None = None):
    """(status, headers, body bytes) of a GET (a POST with `body`) that follows no redirect."""
    context = ssl.create_default_context(cafile=fake.ca_pem_path)
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(fake.url + path, headers={**(headers or {}), "Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- Resource Graph ---
class TestGraphFaults:
    def test_a_repeating_skip_token(self, fake):
        fake.add_fault("repeat_token", endpoint="graph", times=None)
        status, first, _ = graph(fake, top=2)
        token = first["$skipToken"]
        rows = []
        for _ in range(3):   # a client that does not notice would go on for ever
            status, page, _ = graph(fake, top=2, token=token)
            assert status == 200 and page["$skipToken"] == token
            rows.append([r["name"] for r in page["data"]])
        assert rows[0] == rows[1] == rows[2] == ["fvmss-00_2", "vm-0000"]

    def test_total_records_that_disagree_with_the_rows(self, fake):
        fake.add_fault("total_mismatch", endpoint="graph")
        _, page, _ = graph(fake)
        assert (page["totalRecords"], page["count"], len(page["data"])) == (7, 6, 6)
        assert graph(fake)[1]["totalRecords"] == 6   # once

    @pytest.mark.parametrize("kind, check", [
        ("item_without_id", lambda rows: "id" not in rows[0] and rows[0]["name"] == "fvmss-00_0"),
        ("item_without_type", lambda rows: "type" not in rows[0] and "id" in rows[0]),
        ("item_id_not_string", lambda rows: rows[0]["id"] == 12345),
        ("item_name_object", lambda rows: rows[0]["name"] == {"value": "fvmss-00_0"}),
        ("item_tags_string", lambda rows: isinstance(rows[0]["tags"], str)),
        ("null_item", lambda rows: rows[0] is None and len(rows) == 6),
        ("string_items", lambda rows: rows == ["a"]),
        ("empty", lambda rows: rows == []),
    ])
    def test_malformed_rows(self, fake, kind, check):
        fake.add_fault(kind, endpoint="graph")
        status, page, _ = graph(fake)
        assert status == 200 and check(page["data"]) and page["count"] == len(page["data"])
        assert page["totalRecords"] == (0 if kind == "empty" else 6)
        _, clean, _ = graph(fake)
        assert all(isinstance(row, dict) and "id" in row for row in clean["data"])

    @pytest.mark.parametrize("kind, check", [
        ("item_without_id", lambda rows: rows[0][0] is None and rows[0][1] == "fvmss-00_0"),
        ("null_item", lambda rows: rows[0] is None and len(rows) == 6),
        ("string_items", lambda rows: rows == ["a"]),
    ])
    def test_malformed_rows_of_a_table(self, fake, kind, check):
        """In resultFormat "table" the fault changes the rows before they become arrays: a row
        without an id has a null id cell."""
        fake.add_fault(kind, endpoint="graph")
        status, page, _ = graph(fake, result_format="table")
        rows = page["data"]["rows"]
        assert status == 200 and check(rows) and page["count"] == len(rows)
        assert [c["name"] for c in page["data"]["columns"]] == ["id", "name", "type"]

    def test_a_quota_header_that_is_not_ascii_digits(self, fake):
        fake.add_fault("quota_not_digits", endpoint="graph")
        status, page, headers = graph(fake)
        remaining = headers["x-ms-user-quota-remaining"]
        assert status == 200 and page["count"] == 6
        assert remaining == "¹" and remaining.isdigit() and not remaining.isascii()
        with pytest.raises(ValueError):
            int(remaining)

    @pytest.mark.parametrize("status", [408, 429, 500, 502])
    def test_plain_statuses_without_retry_after(self, fake, status):
        fake.add_fault(str(status), endpoint="graph", retry_after=None)
        got, body, headers = graph(fake)
        assert got == status and "Retry-After" not in headers and body["error"]["code"]
        assert graph(fake)[0] == 200

    def test_graph_faults_fit_graph_only(self, fake):
        with pytest.raises(ValueError):
            fake.add_fault("repeat_token", endpoint="vms")
        with pytest.raises(ValueError):
            fake.add_fault("self_link", endpoint="graph")
        fault = fake.add_fault("total_mismatch")       # unaimed: waits for a Graph answer
        compute, _ = clients(fake)
        list(compute.virtual_machines.list_all())
        assert fault.fired == 0 and graph(fake)[1]["totalRecords"] == 7 and fault.fired == 1


# --- items of Resource Manager listings not shaped as documented ---
class TestItemFaults:
    @pytest.mark.parametrize("kind", ITEM_KINDS)
    def test_the_first_item_of_a_page(self, fake, kind):
        fake.add_fault(kind, endpoint="vms", page=1)
        status, page = raw_get(fake, VMS, bearer(fake))
        items = page["value"]
        assert status == 200
        if kind == "empty":
            assert items == [] and "nextLink" not in page
            return
        assert page["nextLink"]
        first = items[0]
        assert {"item_without_id": lambda: "id" not in first and first["name"] == "vm-0000",
                "item_id_not_string": lambda: first["id"] == 12345,
                "item_without_type": lambda: "type" not in first,
                "item_name_object": lambda: first["name"] == {"value": "vm-0000"},
                "item_tags_string": lambda: isinstance(first["tags"], str),
                "item_properties_string": lambda: first["properties"] == "a string",
                "null_item": lambda: first is None and items[1]["name"] == "vm-0001",
                "string_items": lambda: items == ["a"]}[kind]()

    @pytest.mark.parametrize("endpoint, listing", [
        ("vms", lambda c, n: c.virtual_machines.list_all()),
        ("vms_status", lambda c, n: c.virtual_machines.list_all(status_only="true")),
        ("nics", lambda c, n: n.network_interfaces.list_all()),
        ("vmss_vms", lambda c, n: c.virtual_machine_scale_set_vms.list("rg-a", "uvmss-00")),
    ])
    def test_an_empty_answer_while_the_estate_is_not_empty(self, fake, endpoint, listing):
        compute, network = clients(fake)
        fake.add_fault("empty", endpoint=endpoint)
        assert list(listing(compute, network)) == []
        assert len(list(listing(compute, network))) >= 3

    def test_the_sdk_takes_a_vm_without_id(self, fake):
        compute, _ = clients(fake)
        fake.add_fault("item_without_id", endpoint="vms")
        vms = list(compute.virtual_machines.list_all())
        assert vms[0].name == "vm-0000" and vms[0].id is None and len(vms) == 6


# --- links and redirects ---
class TestLinks:
    def test_a_next_link_to_its_own_page(self, fake):
        fake.add_fault("self_link", endpoint="vms", page=2, times=None)
        _, first = raw_get(fake, VMS, bearer(fake))
        second_path = first["nextLink"].removeprefix(fake.url)
        _, second = raw_get(fake, second_path, bearer(fake))
        assert second["nextLink"] == first["nextLink"]
        compute, _ = clients(fake)
        pages = compute.virtual_machines.list_all().by_page()
        seen = [names(next(pages)) for _ in range(5)]   # the SDK follows it for ever
        assert seen[1:] == [["vm-0002", "fvmss-00_0"]] * 4

    def test_a_next_link_back_to_the_first_page(self, fake):
        fake.add_fault("loop_link", endpoint="vms", page=3, times=None)
        compute, _ = clients(fake)
        pages = compute.virtual_machines.list_all().by_page()
        seen = [name for _ in range(6) for name in names(next(pages))]
        assert seen[:6] == seen[6:] == ["vm-0000", "vm-0001", "vm-0002", "fvmss-00_0", "fvmss-00_1", "fvmss-00_2"]
        assert fake.requests[-1].query.get("$skiptoken") is not None

    @pytest.mark.parametrize("kind", ["foreign_link", "other_port_link", "http_link"])
    def test_a_next_link_to_another_origin(self, fake, kind):
        fake.add_fault(kind, endpoint="vms", page=1)
        _, page = raw_get(fake, VMS, bearer(fake))
        link = page["nextLink"]
        origin = {"foreign_link": fake.foreign_url, "other_port_link": fake.other_port_url,
                  "http_link": fake.url.replace("https://", "http://")}[kind]
        assert link.startswith(origin + "/subscriptions/") and "$skiptoken=" in link
        assert len({fake.url, fake.foreign_url, fake.other_port_url}) == 3
        assert fake.foreign_url.startswith("https://127.0.0.2:") and fake.other_port_url.startswith("https://127.0.0.1:")

    def test_the_other_origin_records_what_reaches_it(self, fake):
        """The SDK alone follows a nextLink anywhere and sends its bearer token along: what the product must
        not do. The other origin answers an empty page, so the listing ends there."""
        compute, _ = clients(fake)
        fake.add_fault("foreign_link", endpoint="vms", page=1)
        assert names(compute.virtual_machines.list_all()) == ["vm-0000", "vm-0001"]
        [arrived] = fake.foreign_requests
        assert arrived.origin == fake.foreign_url and arrived.method == "GET"
        assert arrived.path.startswith(f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines?")
        assert arrived.headers["Authorization"] == f"Bearer {fake.token}"
        assert fake.counts["vms"] == 1
        fake.reset_counts()
        assert fake.foreign_requests == []

    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    def test_a_listing_answered_with_a_redirect(self, fake, status):
        fake.add_fault(str(status), endpoint="vms")
        got, headers, body = raw_response(fake, VMS, bearer(fake))
        assert got == status and headers["Location"] == fake.foreign_url + VMS and body == b""

    def test_the_sdk_follows_a_redirect_without_its_token(self, fake):
        compute, _ = clients(fake)
        fake.add_fault("307", endpoint="vms", location=fake.other_port_url + "/elsewhere")
        assert list(compute.virtual_machines.list_all()) == []
        [arrived] = fake.foreign_requests
        assert arrived.origin == fake.other_port_url and arrived.path == "/elsewhere"
        assert "Authorization" not in arrived.headers   # azure-core's RedirectPolicy drops it

    def test_a_graph_query_answered_with_a_redirect(self, fake):
        fake.add_fault("308", endpoint="graph")
        path = "/providers/Microsoft.ResourceGraph/resources?api-version=2022-10-01"
        status, headers, _ = raw_response(fake, path, bearer(fake), {"subscriptions": [SUB], "query": QUERY})
        assert status == 308 and headers["Location"] == fake.foreign_url + path


# --- a page that trickles ---
class TestTrickle:
    def test_every_read_succeeds_and_the_page_never_ends(self, fake):
        fake.add_fault("trickle", endpoint="vmss", delay=0.2)
        connection = http.client.HTTPSConnection(
            fake.url.removeprefix("https://"), timeout=1,
            context=ssl.create_default_context(cafile=fake.ca_pem_path))
        connection.request("GET", f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachineScaleSets"
                                  "?api-version=2026-04-01", headers=bearer(fake))
        response = connection.getresponse()
        length = int(response.headers["Content-Length"])
        started = time.monotonic()
        got = b"".join(response.read(1) for _ in range(6))   # each read well within the 1 s timeout
        assert got == b'{"valu' and 0.8 < time.monotonic() - started < 3
        assert length > 500   # the whole page would take minutes
        started = time.monotonic()
        fake.stop()          # and stop() cuts it short
        with pytest.raises((http.client.IncompleteRead, OSError)):
            response.read()
        assert time.monotonic() - started < 2

    def test_the_sdk_read_timeout_does_not_end_it(self, sdk_env):
        """azure-core's read timeout bounds each read, not the page: only a deadline of the caller's own
        ends a trickle."""
        fake = FakeArm(small_estate()).start()
        sdk_env(fake)
        try:
            compute, _ = clients(fake, read_timeout=0.5, retry_total=0)
            fake.add_fault("trickle", endpoint="vmss", delay=0.1)
            outcome = []
            worker = threading.Thread(target=lambda: outcome.append(self._attempt(compute)), daemon=True)
            worker.start()
            worker.join(1.5)
            assert worker.is_alive() and not outcome
        finally:
            started = time.monotonic()
            fake.stop()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 3
        assert isinstance(outcome[0], Exception)

    @staticmethod
    def _attempt(compute):
        try:
            return list(compute.virtual_machine_scale_sets.list_all())
        except Exception as error:  # noqa: BLE001 (whatever the SDK makes of a connection closed mid-body)
            return error


def test_429_without_retry_after_on_a_listing(fake):
    fake.add_fault("429", endpoint="nics", retry_after=None)
    status, headers, body = raw_response(fake, f"/subscriptions/{SUB}/providers/Microsoft.Network/"
                                               "networkInterfaces?api-version=2026-03-01", bearer(fake))
    assert status == 429 and "Retry-After" not in headers and json.loads(body)["error"]["code"] == "TooManyRequests"
    _, network = clients(fake, retry_total=0)
    fake.add_fault("429", endpoint="nics", retry_after=None)
    with pytest.raises(HttpResponseError) as caught:
        list(network.network_interfaces.list_all())
    assert caught.value.status_code == 429
