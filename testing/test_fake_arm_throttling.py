"""Throttling of the Resource Manager fake: Resource Manager's read bucket per subscription and principal,
Compute's buckets per subscription, region and kind of request, with the headers Azure answers with."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
from azure.core.exceptions import HttpResponseError

from fake_arm import COMPUTE_POLICIES, DEFAULT_SUBSCRIPTION, DOCUMENTED_COMPUTE_BUCKETS, FakeArm, Instance, ScaleSet
from conftest import azure_env
from test_fake_arm import clients, graph_post, raw_get, small_estate
from test_fake_arm_faults import raw_response

SUB = DEFAULT_SUBSCRIPTION
SUB2 = "00000000-0000-0000-0000-000000000002"
VMS = "/subscriptions/{sub}/providers/Microsoft.Compute/virtualMachines?api-version=2026-04-01"
VMSS = f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachineScaleSets?api-version=2026-04-01"
NICS = f"/subscriptions/{SUB}/providers/Microsoft.Network/networkInterfaces?api-version=2026-03-01"
SET_VMS = "/subscriptions/{sub}/resourceGroups/rg-a/providers/Microsoft.Compute/virtualMachineScaleSets/{name}" \
          "/virtualMachines?api-version=2026-04-01"


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


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(fake):
    fake.clock = Clock()
    return fake.clock


def get(fake, path: str, sub: str = SUB):
    """(status, headers, JSON body) of a GET with the fake's token."""
    status, headers, body = raw_response(fake, path.format(sub=sub), {"Authorization": f"Bearer {fake.token}"})
    return status, headers, json.loads(body)


def resource(headers) -> dict[str, int]:
    """x-ms-ratelimit-remaining-resource as {label: remaining}."""
    return {part.rsplit(";", 1)[0]: int(part.rsplit(";", 1)[1])
            for part in headers["x-ms-ratelimit-remaining-resource"].split(",")}


class TestHeaders:
    def test_every_answer_carries_the_read_bucket_and_compute_answers_their_buckets(self, fake, clock):
        _, headers, _ = get(fake, VMS)
        assert resource(headers) == {"Microsoft.Compute/HighCostGet3Min": 999999,
                                     "Microsoft.Compute/HighCostGet30Min": 999999}
        assert headers["x-ms-ratelimit-remaining-resource"].count(",") == 1   # one header, as Azure sends it
        assert headers["x-ms-ratelimit-remaining-subscription-reads"] == "999999"
        assert headers["x-ms-ratelimit-remaining-subscription-global-reads"] == "14999999"
        _, headers, _ = get(fake, VMSS)
        assert set(resource(headers)) == {"Microsoft.Compute/HighCostGetVMScaleSet3Min",
                                          "Microsoft.Compute/HighCostGetVMScaleSet30Min"}
        _, headers, _ = get(fake, NICS)   # Microsoft.Network: Resource Manager's bucket only
        assert "x-ms-ratelimit-remaining-resource" not in headers
        assert headers["x-ms-ratelimit-remaining-subscription-reads"] == "999997"
        status, headers, _ = get(fake, SET_VMS.replace("{name}", "nope"))
        assert status == 404 and "Microsoft.Compute/VMScaleSetVMViews3Min" in resource(headers)
        assert "x-ms-ratelimit-remaining-subscription-reads" not in graph_post(
            fake, {"subscriptions": [SUB], "query": "Resources | project id"})[2]
        status, headers = raw_get(fake, VMS.format(sub=SUB))[0], raw_response(fake, VMS.format(sub=SUB))[1]
        assert status == 401 and "x-ms-ratelimit-remaining-subscription-reads" not in headers

    def test_documented_limits(self, fake):
        fake.documented_limits()
        _, headers, _ = get(fake, VMS)
        assert headers["x-ms-ratelimit-remaining-subscription-reads"] == "249"
        assert headers["x-ms-ratelimit-remaining-subscription-global-reads"] == "3749"
        assert resource(headers)["Microsoft.Compute/HighCostGet3Min"] == 899
        assert fake.compute_buckets["HighCostGet30Min"] == (1_000_000.0, 1_000_000.0)   # no documented numbers
        assert DOCUMENTED_COMPUTE_BUCKETS["HighCostGetVMScaleSet3Min"] == (1080.0, 360.0)
        assert set(DOCUMENTED_COMPUTE_BUCKETS) < set(COMPUTE_POLICIES)


class TestResourceManagerReads:
    def test_the_bucket_empties_refills_and_says_when(self, fake, clock):
        fake.subscription_reads = (3, 0.25)            # 3 tokens, one more every 4 s
        assert [get(fake, NICS)[1]["x-ms-ratelimit-remaining-subscription-reads"] for _ in range(3)] == ["2", "1", "0"]
        status, headers, body = get(fake, VMS)
        assert (status, headers["Retry-After"], body["error"]["code"]) == (429, "4", "SubscriptionRequestsThrottled")
        assert body["error"]["message"].startswith(f"Number of 'read' requests for subscription '{SUB}' actor ")
        assert "Please try again after '4' seconds" in body["error"]["message"]
        assert "x-ms-ratelimit-remaining-resource" not in headers   # refused before Compute saw it
        clock.now += 2
        status, headers, _ = get(fake, VMS)
        assert (status, headers["Retry-After"]) == (429, "2")       # a refused read takes no token
        clock.now += 2
        assert get(fake, VMS)[0] == 200
        assert fake.counts["arm_throttled"] == 2

    def test_one_bucket_per_subscription(self, fake, clock):
        fake.subscription_reads = (1, 0.01)
        assert [get(fake, VMS, sub)[0] for sub in (SUB, SUB, SUB2)] == [200, 429, 200]

    def test_the_sdk_waits_for_retry_after(self, fake):
        fake.subscription_reads = (1, 1.0)
        _, network = clients(fake)
        started = time.monotonic()
        assert len(list(network.network_interfaces.list_all())) == 5   # 3 pages, each after the first waits 1 s
        assert time.monotonic() - started >= 1.8 and fake.counts["arm_throttled"] >= 2


class TestCompute:
    def test_a_bucket_per_kind_of_request(self, fake, clock):
        fake.compute_buckets["HighCostGet3Min"] = (2, 6)   # 2 tokens, one more every 10 s
        remaining = [resource(get(fake, path)[1])["Microsoft.Compute/HighCostGet3Min"]
                     for path in (VMS, VMS.replace("virtualMachines?", "virtualMachines?statusOnly=true&"))]
        assert remaining == [1, 0]                         # the status-only list counts as a List All
        status, headers, body = get(fake, VMS)
        error = body["error"]
        assert (status, error["code"], error["details"][0]["code"]) == (429, "OperationNotAllowed", "TooManyRequests")
        assert error["message"] == ("The server rejected the request because too many requests have been "
                                    "received for this subscription.")
        assert error["details"][0]["target"] == "HighCostGet3Min"
        detail = json.loads(error["details"][0]["message"])
        assert (detail["operationGroup"], detail["allowedRequestCount"], detail["measuredRequestCount"]) == (
            "HighCostGet3Min", 2, 3)
        assert headers["Retry-After"] == "20" and resource(headers)["Microsoft.Compute/HighCostGet3Min"] == 0
        assert headers["x-ms-ratelimit-remaining-subscription-reads"] == "999997"   # the third read
        # Other kinds of request are counted apart.
        assert get(fake, VMSS)[0] == 200 and get(fake, NICS)[0] == 200
        # Asked again before Retry-After: refused, and told to wait longer.
        clock.now += 4
        status, headers, _ = get(fake, VMS)
        assert (status, headers["Retry-After"]) == (429, "26")
        clock.now += 26
        assert get(fake, VMS)[0] == 200
        assert fake.counts["compute_throttled"] == 2

    def test_buckets_per_subscription_and_region(self, fake, clock):
        fake.estate.scale_sets.append(ScaleSet(name="west", location="westus", resource_group="rg-a",
                                               instances=[Instance(name="west_0", private_ip="10.9.0.1")]))
        fake.compute_buckets["VMScaleSetVMViews3Min"] = (1, 1)
        east = SET_VMS.replace("{name}", "uvmss-00")
        assert [get(fake, path)[0] for path in (east, east, SET_VMS.replace("{name}", "west"))] == [200, 429, 200]
        assert get(fake, east, SUB2)[0] == 404   # another subscription's bucket (and no such set there)

    def test_every_documented_label_counts_its_endpoints(self):
        assert {endpoint for endpoints in COMPUTE_POLICIES.values() for endpoint in endpoints} == {
            "vms", "vms_rg", "vms_status", "vmss", "vmss_rg", "vmss_vms", "vmss_vm_instance_view",
            "vm_instance_view"}

    def test_a_label_left_out_is_neither_counted_nor_reported(self, fake):
        del fake.compute_buckets["HighCostGet30Min"]
        assert resource(get(fake, VMS)[1]) == {"Microsoft.Compute/HighCostGet3Min": 999999}

    def test_the_sdk_retries_after_retry_after(self, fake):
        fake.compute_buckets["HighCostGetVMScaleSet3Min"] = (1, 120)   # a token every 0.5 s
        compute, _ = clients(fake)
        assert len(list(compute.virtual_machine_scale_sets.list_all())) == 2
        started = time.monotonic()
        assert len(list(compute.virtual_machine_scale_sets.list_all())) == 2
        assert time.monotonic() - started >= 0.9 and fake.counts["vmss"] == 3

    def test_a_persistent_throttle_fails_the_sdk(self, fake, clock):
        fake.compute_buckets["HighCostGet3Min"] = (1, 0.1)
        compute, _ = clients(fake, retry_total=0)
        list(compute.virtual_machines.list("rg-b"))
        with pytest.raises(HttpResponseError) as caught:
            list(compute.virtual_machines.list("rg-b"))
        assert caught.value.status_code == 429 and caught.value.error.code == "OperationNotAllowed"
