#!/usr/bin/env python3
"""A local HTTPS fake of Azure Resource Manager for the haproxy-azure-discovery test bed.

The real Azure SDK talks to it: `DefaultAzureCredential` gets its token from the fake's App Service
managed-identity endpoint (or, as a workload identity or a service principal, from its Microsoft Entra ID
token endpoint), and `ComputeManagementClient` / `NetworkManagementClient` list the estate through the
same list endpoints as in Azure, in the shapes of Azure's own examples (`testing/azure-examples/`), with
paging; the single-resource GETs of a per-VM-lookup strategy (one NIC and one instance view per VM) are
served too, for comparison. Runs on the standard library plus `trustme`.

It is meant to be at least as strict and as disorderly as Azure, never more lenient: Resource Graph
serves unsorted rows in a new order every page, tokens are bound to a tenant, a client and an audience,
and throttling, links elsewhere, redirects and malformed answers are at hand as options and faults.

In tests::

    estate = make_estate(vms=3, uniform_sets=1, flexible_sets=1, per_set=2)
    with FakeArm(estate, page_size=2) as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)        # and clear every AZURE_* variable
        compute = ComputeManagementClient(DefaultAzureCredential(), DEFAULT_SUBSCRIPTION,
                                          base_url=fake.url, credential_scopes=[ARM_SCOPE])
        network = NetworkManagementClient(...the same arguments...)
        fake.estate.update("vm-0001", power_state="deallocated")   # served from the next request on
        fake.add_fault("429", endpoint="nics", retry_after=1)
        list(network.network_interfaces.list_all())                # the SDK waits 1 s and retries
        assert fake.counts["nics"] == 1 + 1                        # one page, one retry

Public API:

    parse_graph_query(text, *, known_types_only=True) -> GraphQuery(table, filters, columns, order,
        extends, order_projected),
        graph_candidates(estate, query, subscriptions, readable, compute_types=None),
        order_graph_rows(candidates, query, rng), evaluate_graph_query(estate, query, subscriptions,
        readable, *, rng=None, compute_types=None), graph_table(rows, columns),
        GRAPH_SCHEMA (testing/resource_graph_schema.json),
        AZURE_CHINA_COMPUTE_TYPES
    make_estate(*, vms, uniform_sets, flexible_sets, per_set, subscriptions, resource_groups, regions,
                services, ip_base, ipv6_base, public_ip_base, not_running, seed, overrides) -> Estate
    service_tags(name, port) -> {SERVICE_NAME_TAG: name, SERVICE_PORT_TAG: str(port)}
    Estate(vms=[Vm], scale_sets=[ScaleSet(instances=[Instance])]): machines(), find(name),
        resource_id(name), add_vm(vm), remove(name), update(name, **fields), scale(name, capacity),
        to_json(), Estate.from_json(text). Instance fields: name, private_ip, tags, power_state,
        private_ipv6, public_ip, has_nic, second_nic_ip, provisioning_state ("Succeeded"; "Deleting",
        "Creating", "Updating", "Failed"...), health (None; "Healthy", "Unhealthy", "Initializing",
        "Unknown"); a ScaleSet has a provisioning_state too, and a health its new instances get.
    FakeArm(estate=None, *, page_size=100, port=0, state_dir=None): start(), stop(), context manager;
        url, foreign_url, other_port_url, ca_pem_path, env(), env_workload_identity(token_file),
        env_client_secret(), estate, page_size;
        credentials: token, identity_header, tenant_id, client_id, client_secret, federated_token,
            cloud_audiences, metadata_versions;
        Resource Graph: graph_quota / graph_window, graph_seed, graph_compute_types;
        Resource Manager: reader_groups, list_seed, subscription_reads, compute_buckets, arm_region,
            documented_limits(), clock;
        observation: counts, requests (RequestRecord: method, path, query, endpoint, host),
            foreign_requests (ForeignRequest: origin, method, path, headers), token_requests
            (TokenRequest: endpoint, authority, tenant, grant_type, client_id, audience, status, credential),
            reset_counts();
        add_fault(kind, *, endpoint, path, page, times=1, retry_after=1, delay=1.0, location=None) -> Fault,
            clear_faults()

Standalone (until SIGTERM or SIGINT; prints one line of shell `export` statements)::

    python3 testing/fake_arm.py --port 8443 --estate estate.json [--page-size N] [--state-dir DIR]
    python3 testing/fake_arm.py --generate vms=100,uniform=2,flexible=1,per_set=5 [--estate estate.json]

`--generate` takes `make_estate` keywords with scalar values (`uniform`/`flexible` are short for
`uniform_sets`/`flexible_sets`); with `--estate` as well, the generated estate is written to that file.
The estate file is re-read whenever it changes (write it to a temporary name and rename it over).

Endpoints (GET; `api-version` required; paths match case-insensitively) and their counter keys:

    vms         /subscriptions/S/providers/Microsoft.Compute/virtualMachines   virtual_machines.list_all()
    vms_status  the same with statusOnly=true             virtual_machines.list_all(status_only="true")
    vms_rg      .../resourceGroups/R/providers/Microsoft.Compute/virtualMachines  virtual_machines.list(R)
    vmss        .../providers/Microsoft.Compute/virtualMachineScaleSets    virtual_machine_scale_sets.list_all()
    vmss_rg     the same under resourceGroups/R                            virtual_machine_scale_sets.list(R)
    vmss_vms    .../virtualMachineScaleSets/V/virtualMachines          virtual_machine_scale_set_vms.list(R, V)
    nics        .../providers/Microsoft.Network/networkInterfaces          network_interfaces.list_all()
    nics_rg     the same under resourceGroups/R                            network_interfaces.list(R)
    vmss_nics   .../virtualMachineScaleSets/V/networkInterfaces
                                network_interfaces.list_virtual_machine_scale_set_network_interfaces(R, V)
    pips        .../providers/Microsoft.Network/publicIPAddresses          public_ip_addresses.list_all()
    pips_rg     the same under resourceGroups/R                            public_ip_addresses.list(R)
    vmss_pips   .../virtualMachineScaleSets/V/publicipaddresses
                        public_ip_addresses.list_virtual_machine_scale_set_public_ip_addresses(R, V)
  single resources (no paging):
    nic_get     .../resourceGroups/R/providers/Microsoft.Network/networkInterfaces/N
                                                                        network_interfaces.get(R, N)
    vmss_nic_get  .../virtualMachineScaleSets/V/virtualMachines/I/networkInterfaces/N
                        network_interfaces.get_virtual_machine_scale_set_network_interface(R, V, I, N)
    vm_instance_view  .../resourceGroups/R/providers/Microsoft.Compute/virtualMachines/M/instanceView
                                                                        virtual_machines.instance_view(R, M)
    vmss_vm_instance_view  .../virtualMachineScaleSets/V/virtualMachines/I/instanceView
                                                  virtual_machine_scale_set_vms.get_instance_view(R, V, I)
  Azure Resource Graph (POST; api-version one of resource_graph_schema.json's):
    graph       /providers/Microsoft.ResourceGraph/resources   body {subscriptions, query, options: {$top,
                $skipToken, resultFormat}}; see "Resource Graph" below.
  credentials and the cloud:
    token       /msi/token (App Service managed identity; X-IDENTITY-HEADER checked)
    metadata    /metadata/endpoints (no token; api-version one of `metadata_versions`): the cloud's
                endpoints document, naming the fake as resourceManager and authentication.loginEndpoint,
                `fake.cloud_audiences` as audiences
    openid      /{tenant}/v2.0/.well-known/openid-configuration   } Microsoft Entra ID at authority fake.url
    aad_token   POST /{tenant}/oauth2/v2.0/token                  } (see "Credentials" below)

`counts` also has `total` (every request, unknown paths included) and the refusals `graph_throttled`,
`arm_throttled`, `compute_throttled`. ARM endpoints need the `Authorization: Bearer {fake.token}` header
(401 otherwise); unknown paths get 404. Errors are ARM-shaped: `{"error": {"code": ..., "message": ...}}`.
`GET /_counts` (no token needed; neither counted nor logged) returns `counts` as JSON, for a standalone
fake's client.

What is served:

- Standalone VMs and Flexible members come from the VM and NIC lists; Uniform instances, their NICs and
  public IPs only from the scale-set lists. The status-only list has ids, names, locations and instance
  views, no tags and no network profile. `$expand=instanceView` adds instance views: on `vmss_vms` always;
  on both VM lists (`vms`, `vms_rg`) only with the one documented `$filter`
  (`virtualMachineScaleSet/id eq '<scale set id>'`, which narrows the list to that set's members), and
  without it the answer is 400 `InvalidParameter`, as Azure's REST reference says. A Flexible set's
  `vmss_vms` members have no network profile, and their `instanceId` is the VM name.
- Provisioning state: `estate.update(name, provisioning_state="Deleting")` shows as
  `properties.provisioningState` ("Deleting") in the VM and scale-set VM lists and Resource Graph rows,
  and as the instance views' first status `ProvisioningState/deleting` (displayStatus "Deleting";
  `ProvisioningState/succeeded` "Provisioning succeeded" otherwise, level Error for "Failed").
- Application Health: `estate.update(name, health="Unhealthy")` gives a Uniform instance's view (in
  `vmss_vms` with `$expand=instanceView` and its single GET) `vmHealth.status.code`
  `HealthState/unhealthy`; None (the default) is an instance without the extension: no `vmHealth`.
  Standalone and Flexible VMs, the status-only list and Resource Graph rows never carry one.
- Role scope: `fake.reader_groups = {"rg-a"}` models a principal whose Reader role covers only those
  resource groups: subscription-wide lists and every other group answer 403 `AuthorizationFailed` (in
  Azure's words); the default `None` reads the whole subscription.
- Tags are omitted when empty. A Uniform instance carries only its own tags; its set's tags are on the set.
- Casing: a resource's own `id` spells the resource group as stored (`/resourceGroups/rg-app-0/`); every
  id that points at another resource (VM -> NIC, NIC -> VM, NIC -> public IP, public IP -> IP
  configuration, Flexible VM -> scale set) and every id in the status-only list spells it
  `/resourcegroups/RG-APP-0/`. Join ids case-insensitively.
- `second_nic_ip` gives a machine a second, non-primary NIC (`primary: false` on the VM's reference and on
  the NIC itself); the IPv6 and public addresses stay on the primary one.
- A missing NIC (`has_nic=False`) is still referenced by its VM but absent from every NIC and public IP list
  (its GET is a 404).
- Single GETs return what the matching list item shows: a NIC as in the NIC lists, an instance view as in
  `$expand=instanceView` (statuses only). Uniform NICs are found only under their scale set, standalone and
  Flexible NICs only under `Microsoft.Network/networkInterfaces`; a Flexible member's instance view under
  `virtualMachines/{name}`, and under its set's `virtualMachines/{instanceId}` as well. Anything else: 404
  `ResourceNotFound`. Faults aim at them with `page=1` (or no page).
- Paging: `value` plus `nextLink` (back to the fake, query kept, `$skiptoken` added) while items remain.
  A listing is a snapshot taken at its first page, like a server cursor, so scaling mid-listing shows in
  the next listing; field changes (power state, tags) show on every page rendered after them. Items come
  in the estate's order; `fake.list_seed = N` serves each listing in a random order drawn from N instead
  (Azure documents no order; one order per listing, across its pages).

Resource Graph (sources: "Guidance for pagination", "Guidance for throttled requests in Azure Resource
Graph", "Working with large Azure resource data sets", the table and resource type reference; for KQL,
the Kusto reference pages resource_graph_schema.json's `_sources.kql_expressions` names):

- The query is checked against the tables and columns Microsoft documents (resource_graph_schema.json) and
  evaluated as far as the fake models KQL: `Table | where COLUMN in~ ('a', ...) | extend NAME = EXPR, ...
  | project column, NAME = EXPR, ... | order by COL [asc|desc], ...` (where, extend and order by in any
  order before project, but no extend after an order by; after project only order by, or `sort by`; an
  order names a documented or extended column or a path in one before project, a projected column after
  it; KQL's default direction is DESCENDING; nulls first ascending, last descending). EXPR: a column
  (documented or extended; a later extend shadows), a path in a dynamic one (`.member`, `[N]`, N a
  non-negative integer literal; null where a member or index finds nothing), an integer literal, `X == N`
  (false for a null X), `A and B` (false if either is false, else null if either is null), parentheses,
  dynamic(null), array_length(X) (null for a non-array), isnotempty(X) and isempty(X) (null and "" are
  empty, [] and {} are not), iff(C, A, B) (B when C is false or null), type-checked as Kusto does (string
  columns, long, bool, dynamic). Only project's columns are answered, in its order. Rows are the estate's
  resources (VMs with properties.extended.instanceView.powerState and properties.provisioningState;
  Uniform instances, their NICs and public IPs in ComputeResources), only from `reader_groups` when set
  (no 403). A `type` no table lists matches no row (no error, as in Resource Graph; parse_graph_query's
  default still refuses it, as a check of a query's text). Anything else the fake does not model (another
  operator, function or literal): 400 with details[0].code InvalidQuery, its message naming what.
- Answers {totalRecords (all rows), count (rows in this page), data, facets: [], resultTruncated ("true"
  only for a query without `id` cut at $top), $skipToken (while rows remain)}. `data` is the rows as
  objects (options.resultFormat "objectArray", the default), or with "table" a Table: {columns:
  [{name, type}] in the projection's order, rows: [[cell, ...]]} (graph_table; item faults change
  the rows first, so a row without an id has a null id cell, a null row stays null).
- Every page request runs the query again against the estate as it is then (changes through Estate
  methods between pages shift rows: a deleted one makes a later one missed, a new one repeats one).
  Unsorted rows come in a NEW RANDOM ORDER on every request (so paging an unsorted query skips and
  repeats rows, as Azure warns: "Without sorting, results are random and not repeatable"); rows equal in
  every sort column are in random order among themselves; `fake.graph_seed = N` makes the sequence of
  orders reproducible (setting it again restarts it). A $skipToken belongs to its query and
  subscriptions: with another, 400 InvalidSkipToken.
- Quota: `graph_quota` queries per `graph_window` seconds (defaults 15 and 5.0, as documented), a fixed
  window from its first query, on `fake.clock`; every answer has x-ms-user-quota-remaining (int) and
  x-ms-user-quota-resets-after ("hh:mm:ss", whole seconds rounded up); past it, 429 `RateLimiting` (with
  details[0].code RateLimiting, as Azure words it) and no Retry-After (none is documented).
- `fake.graph_compute_types`: None (default) = all of ComputeResources' documented types; a set = only
  those exist in this cloud (AZURE_CHINA_COMPUTE_TYPES: Azure China's reference lists only the Uniform
  public IP type), rows of the others are absent.

Throttling (sources: "Understand how Azure Resource Manager throttles requests", "Compute throttling
limits", "Troubleshooting API throttling errors"). Every bucket is a token bucket on `fake.clock`, starts
full, and starts full again when its setting changes; all are UNTHROTTLED (a million tokens) by default,
reported but never empty; `fake.documented_limits()` sets the documented numbers.

- Resource Manager reads: `fake.subscription_reads = (size, refill per second)` per subscription and
  principal (documented: 250, 25/s), and 15 times that per subscription for all principals. Every
  authenticated ARM answer carries x-ms-ratelimit-remaining-subscription-reads and
  -subscription-global-reads. Empty: 429 `SubscriptionRequestsThrottled` ("Number of 'read' requests for
  subscription '...' actor '...' exceeded. Please try again after 'N' seconds ...") with Retry-After N,
  the time to the next token; a refused read takes no token.
- Compute: `fake.compute_buckets = {label: (size, refill per minute)}` per subscription and region, for the
  labels of COMPUTE_POLICIES: HighCostGet3Min and HighCostGet30Min count VM List / List All (vms, vms_rg,
  vms_status; documented 900, 300/min); HighCostGetVMScaleSet3Min/30Min the scale-set lists (1,080,
  360/min); VMScaleSetVMViews3Min a set's VM list and instance views (6,000, 2,000/min); LowCostGet3Min/30Min
  a VM's instance view (24,000, 8,000/min); the 30-minute labels have no documented numbers. Region: the
  scale set's or VM's location for requests about one, `fake.arm_region` (eastus) for subscription and
  group lists. Each Compute answer carries x-ms-ratelimit-remaining-resource, one comma-separated value
  ("Microsoft.Compute/HighCostGet3Min;159,Microsoft.Compute/HighCostGet30Min;799"); a label left out of
  compute_buckets is neither counted nor reported. Empty: 429 `OperationNotAllowed` ("The server rejected
  the request because too many requests have been received for this subscription.", details
  [{code TooManyRequests, target label, message JSON {operationGroup, startTime, endTime,
  allowedRequestCount, measuredRequestCount}}]) with Retry-After; a refused call still takes its token
  (down to minus the size), so a request before Retry-After elapses is refused again with a later one.

Credentials (Microsoft Entra ID at authority fake.url; `token_requests` records each request with the
authority it came to: https:// and its Host header):

- The tenant is `fake.tenant_id`; any other: 400 invalid_tenant AADSTS90002 (its openid configuration too).
- POST /{tenant}/oauth2/v2.0/token takes client credentials only (grant_type=client_credentials, a scope
  ending in /.default, client_id == fake.client_id) with either client_secret == fake.client_secret, or
  client_assertion_type urn:ietf:params:oauth:client-assertion-type:jwt-bearer and client_assertion ==
  fake.federated_token (what azure-identity's WorkloadIdentityCredential posts: the contents of
  AZURE_FEDERATED_TOKEN_FILE, without discovery). Refusals as Entra ID words them: 400
  unsupported_grant_type 70003, invalid_scope 1002012, unauthorized_client 700016, invalid_request 700002
  (assertion type); 401 invalid_client 70021 (no federation for the assertion), 7000215 (secret),
  7000218 (neither). `env_workload_identity(token_file)` writes the federated token and returns
  AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST (= fake.url);
  `env_client_secret()` returns AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET (no authority).
- Tokens are bound to an audience: a token for one of `cloud_audiences` (trailing "/" ignored) is
  `fake.token`; for any other resource the fake issues a token of its own, which Resource Manager refuses
  with 401 InvalidAuthenticationTokenAudience. The managed-identity endpoint does the same with `resource`.
- /metadata/endpoints answers the api-versions in `fake.metadata_versions` (default ("2015-01-01",
  "2022-09-01"); Azure Stack Hub documents 2015-01-01 only: set ("2015-01-01",)), others 400
  InvalidApiVersionParameter. 2022-09-01: one object (resourceManager, authentication {loginEndpoint,
  audiences, ...}, ...); 2015-01-01: {galleryEndpoint, graphEndpoint, portalEndpoint, authentication
  {loginEndpoint, audiences}}.

Faults (`add_fault(kind, *, endpoint, path, page, times=1, retry_after=1, delay=1.0, location=None)`):
aimed by `endpoint` (a counter key), `path` (regex searched in the request path, case-insensitively) and
`page` (1-based; a Graph page is offset // $top + 1); fire `times` times (None: every time); one fires per
request at most, the first added first; a fault fires only on an answer it can act on (an unaimed Graph
fault waits for a Graph request). `fault.fired` counts.

- Whole answers: any status >= 400 as an ARM error (429 and 503 with `Retry-After: retry_after`, none when
  retry_after=None); a redirect "301"/"302"/"303"/"307"/"308" with an empty body and Location `location`
  (default: the same path and query at `foreign_url`); "bad_json" (200 with a truncated body),
  "no_value" (200 with `{}`), "bad_item" (200 with items Azure's schema does not allow: one whose
  properties are a string, then a string).
- Delays: "slow" (waits `delay` seconds, then answers normally; stop() cuts the wait short); "trickle"
  (the real answer, its headers at once and its body one byte every `delay` seconds, so every read
  succeeds and the page takes len(body) * delay; stop() closes it unfinished). Any endpoint.
- Items of a Resource Manager listing's `value` or a Graph answer's `data` (its rows; in a Table,
  the rows so changed; count follows): "empty" (no items, no nextLink / $skipToken; Graph
  totalRecords 0), and on the page's first item:
  "item_without_id", "item_id_not_string" (12345), "item_without_type", "item_name_object" ({"value":
  name}), "item_tags_string" (a string), "item_properties_string" (its properties a string; a
  Graph row has none: unchanged), "null_item" (null), "string_items" (the list is ["a"]).
- Links of a Resource Manager listing (nextLink set even on a last page): "self_link" (this page's own
  URL: a loop), "loop_link" (the listing's first page), "foreign_link" (the next page's path and query at
  `foreign_url`: https://127.0.0.2 on another port), "other_port_link" (at `other_port_url`: 127.0.0.1 on
  another port), "http_link" (the fake's own host and port over http). Both other origins answer every
  request with an empty page (`{"value": []}`; a Graph answer for a POST) and record it with its headers
  in `foreign_requests`, so a test can see whether a token went there.
- Resource Graph: "repeat_token" (every page's $skipToken is the same one, the second page's),
  "total_mismatch" (totalRecords one more than the rows), "quota_not_digits" (x-ms-user-quota-remaining
  is "¹": str.isdigit() but not an ASCII digit, and int() refuses it).
"""
# === Imports (stdlib + trustme) ===
from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import functools
import hashlib
import ipaddress
import itertools
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import trustme

# === Constants ===
ARM_SCOPE = "https://management.azure.com/.default"
DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"
DEFAULT_RESOURCE_GROUP = "rg-app-0"
DEFAULT_LOCATION = "eastus"
DEFAULT_IP_BASE = "10.0.0.4"          # Azure keeps .0 to .3 of every subnet for itself
SERVICE_NAME_TAG = "HAProxy:Service:Name"
SERVICE_PORT_TAG = "HAProxy:Service:Port"
UNIFORM, FLEXIBLE = "Uniform", "Flexible"
VM_SIZE = "Standard_D2s_v5"
TOKEN_LIFETIME = 3600                 # seconds; a fresh token per credential is plenty for any test
IDLE_TIMEOUT = 30                     # seconds a keep-alive connection may idle before its thread quits
MAX_CURSORS = 256                     # listings remembered between pages; older ones are recomputed
RELOAD_INTERVAL = 0.5                 # seconds between checks of the standalone estate file
FAKE_PRINCIPAL = "11111111-2222-3333-4444-555555555555"   # the object id 403 messages name
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# === Estate model ===
@dataclass(kw_only=True)
class Instance:
    """A machine as its NIC and instance view describe it: a scale-set instance, or the base of a Vm."""
    name: str
    private_ip: str
    tags: dict[str, str] = field(default_factory=dict)
    power_state: str = "running"      # running, stopped, deallocated, starting, ...: PowerState/{it}
    private_ipv6: str | None = None   # a second, non-primary IP configuration on the same NIC
    public_ip: str | None = None      # attached to the primary IP configuration
    has_nic: bool = True              # False: the VM names a NIC that no NIC list returns
    second_nic_ip: str | None = None  # a second, non-primary NIC with this private IPv4 address
    provisioning_state: str = "Succeeded"   # Creating, Updating, Deleting, Failed...: properties.provisioningState
    # Application Health (Healthy, Unhealthy, Initializing, Unknown): a Uniform instance view's
    # vmHealth, HealthState/{lower-cased}; None: no extension
    health: str | None = None


@dataclass(kw_only=True)
class Vm(Instance):
    """A standalone VM: an instance with its own place in the estate."""
    subscription: str = DEFAULT_SUBSCRIPTION
    resource_group: str = DEFAULT_RESOURCE_GROUP
    location: str = DEFAULT_LOCATION


def _index_of(inst: Instance) -> str:
    """A scale-set instance's index: what follows the last `_` of its name."""
    return inst.name.rpartition("_")[2]


@dataclass(kw_only=True)
class ScaleSet:
    """A VM scale set; its instances share its subscription, resource group and location.

    Instance names are `{set}_{index}` (a Uniform instance's id is its index); `next_index` only grows,
    so an index is never reused, as in Azure.
    """
    name: str
    orchestration: str = UNIFORM
    subscription: str = DEFAULT_SUBSCRIPTION
    resource_group: str = DEFAULT_RESOURCE_GROUP
    location: str = DEFAULT_LOCATION
    tags: dict[str, str] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    next_index: int = 0
    provisioning_state: str = "Succeeded"
    health: str | None = None          # the Application Health new instances (scale) start with

    def __post_init__(self):
        if self.orchestration not in (UNIFORM, FLEXIBLE):
            raise ValueError(f"scale set {self.name}: orchestration must be {UNIFORM!r} or {FLEXIBLE!r}")
        used = [int(index) + 1 for index in map(_index_of, self.instances) if index.isdigit()]
        self.next_index = max([self.next_index, *used])


def _group_id(place: Vm | ScaleSet) -> str:
    return f"/subscriptions/{place.subscription}/resourceGroups/{place.resource_group}"


def scale_set_id(ss: ScaleSet) -> str:
    return f"{_group_id(ss)}/providers/Microsoft.Compute/virtualMachineScaleSets/{ss.name}"


class Placed(NamedTuple):
    """An instance with its scale set (None for a standalone VM), which together fix its ids."""
    inst: Instance
    ss: ScaleSet | None

    @property
    def home(self) -> Vm | ScaleSet:
        """Whichever carries the subscription, resource group and location."""
        return self.ss or self.inst

    @property
    def uniform(self) -> bool:
        return self.ss is not None and self.ss.orchestration == UNIFORM

    @property
    def vm_id(self) -> str:
        if self.uniform:
            return f"{scale_set_id(self.ss)}/virtualMachines/{_index_of(self.inst)}"
        return f"{_group_id(self.home)}/providers/Microsoft.Compute/virtualMachines/{self.inst.name}"

    @property
    def nic_id(self) -> str:
        return self.nic_id_of(0)

    def nic_id_of(self, n: int) -> str:
        """The id of NIC n: 0 is the primary NIC, 1 the second one (`second_nic_ip`)."""
        suffix = "-nic" if n == 0 else f"-nic{n + 1}"
        if self.uniform:
            return f"{self.vm_id}/networkInterfaces/{self.ss.name}{suffix}"
        return f"{_group_id(self.home)}/providers/Microsoft.Network/networkInterfaces/{self.inst.name}{suffix}"

    @property
    def nic_numbers(self) -> tuple[int, ...]:
        return (0, 1) if self.inst.second_nic_ip else (0,)

    @property
    def ip_config_id(self) -> str:
        """The primary (IPv4) IP configuration of the NIC."""
        return f"{self.nic_id}/ipConfigurations/ipconfig1"

    @property
    def public_ip_id(self) -> str:
        if self.uniform:
            return f"{self.ip_config_id}/publicIPAddresses/{self.ss.name}-pip"
        return f"{_group_id(self.home)}/providers/Microsoft.Network/publicIPAddresses/{self.inst.name}-pip"


@dataclass
class Estate:
    """Everything the fake serves. Public methods hold `lock`; the fake renders under it too.

    Names are unique across the estate (VMs, instances and scale sets), and methods find things by name.
    """
    vms: list[Vm] = field(default_factory=list)
    scale_sets: list[ScaleSet] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.RLock()   # not a field, so asdict() and the JSON leave it out
        self.generation = 0             # bumped by every change through a method (the fake's lookups)

    def machines(self) -> Iterator[Placed]:
        """Every VM and scale-set instance: VMs first, then each set's instances, in order."""
        for vm in self.vms:
            yield Placed(vm, None)
        for ss in self.scale_sets:
            for inst in ss.instances:
                yield Placed(inst, ss)

    def find(self, name: str) -> Instance | ScaleSet:
        """The VM, scale-set instance or scale set called `name`."""
        found = self._locate(name)
        return found.inst if isinstance(found, Placed) else found

    def resource_id(self, name: str) -> str:
        """The canonical ARM id of a VM, instance or scale set, as its own listing spells it."""
        found = self._locate(name)
        return found.vm_id if isinstance(found, Placed) else scale_set_id(found)

    def add_vm(self, vm: Vm) -> None:
        with self.lock:
            if self._named(vm.name):
                raise ValueError(f"the estate already has something called {vm.name!r}")
            self.vms.append(vm)
            self.generation += 1

    def remove(self, name: str) -> None:
        """Delete a VM, a scale-set instance or a whole scale set."""
        with self.lock:
            found = self._locate(name)
            if isinstance(found, ScaleSet):
                self.scale_sets.remove(found)
            elif found.ss is None:
                self.vms.remove(found.inst)
            else:
                found.ss.instances.remove(found.inst)
            self.generation += 1

    def update(self, name: str, **changes) -> None:
        """Set fields of a VM, instance or scale set: power_state="stopped", tags={...}, has_nic=False."""
        with self.lock:
            target = self.find(name)
            unknown = set(changes) - {f.name for f in dataclasses.fields(target)}
            if unknown:
                raise TypeError(f"{name}: no field(s) {', '.join(sorted(unknown))}")
            for key, value in changes.items():
                setattr(target, key, value)
            self.generation += 1

    def scale(self, name: str, capacity: int) -> None:
        """Scale a set in (highest indexes go first, as Azure's default policy) or out.

        New instances get the next private IPv4 address after the highest one in the estate, and an
        IPv6 or public address the same way when the set's last instance has one; no own tags.
        """
        with self.lock:
            ss = self.find(name)
            if not isinstance(ss, ScaleSet):
                raise KeyError(f"{name!r} is not a scale set")
            del ss.instances[capacity:]
            while len(ss.instances) < capacity:
                ss.instances.append(self._new_instance(ss))
            self.generation += 1

    def to_json(self) -> str:
        with self.lock:
            return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Estate:
        raw = json.loads(text)
        return cls(vms=[Vm(**vm) for vm in raw.get("vms", [])],
                   scale_sets=[ScaleSet(**{**ss, "instances": [Instance(**i) for i in ss.get("instances", [])]})
                               for ss in raw.get("scale_sets", [])])

    def _named(self, name: str) -> list[Placed | ScaleSet]:
        return ([p for p in self.machines() if p.inst.name == name]
                + [ss for ss in self.scale_sets if ss.name == name])

    def _locate(self, name: str) -> Placed | ScaleSet:
        with self.lock:
            hits = self._named(name)
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} things in the estate are called {name!r}")
        return hits[0]

    def _new_instance(self, ss: ScaleSet) -> Instance:
        last = ss.instances[-1] if ss.instances else None
        inst = Instance(name=f"{ss.name}_{ss.next_index}",
                        private_ip=self._next_address("private_ip"), health=ss.health)
        for attr in ("private_ipv6", "public_ip"):
            if last is not None and getattr(last, attr):
                setattr(inst, attr, self._next_address(attr))
        ss.next_index += 1
        return inst

    def _next_address(self, attr: str) -> str:
        used = [ipaddress.ip_address(value) for p in self.machines() if (value := getattr(p.inst, attr))]
        return str(max(used) + 1) if used else DEFAULT_IP_BASE


# === Estate generator ===
def service_tags(name: str, port: int) -> dict[str, str]:
    """The two tags that make an instance part of a service."""
    return {SERVICE_NAME_TAG: name, SERVICE_PORT_TAG: str(port)}


def make_estate(*, vms: int = 0, uniform_sets: int = 0, flexible_sets: int = 0, per_set: int = 2,
                subscriptions=(DEFAULT_SUBSCRIPTION,), resource_groups=(DEFAULT_RESOURCE_GROUP,),
                regions=(DEFAULT_LOCATION,), services=(("web", 8080),),
                ip_base: str = DEFAULT_IP_BASE, ipv6_base: str | None = None,
                public_ip_base: str | None = None, not_running: float = 0.0, seed: int = 0,
                overrides: dict[str, dict] | None = None) -> Estate:
    """Build an estate deterministically.

    Names: VMs `vm-0000`..., Uniform sets `uvmss-00`..., Flexible sets `fvmss-00`..., instances
    `{set}_{n}`. The i-th VM (and j-th set of each mode) takes services[i % len], then regions cycling
    once per round of services (so every service reaches every region), and (subscription, resource
    group) pairs cycling on their own. VMs carry the service tags; scale sets carry them on the set and
    their instances none. Addresses count up from `ip_base` (and `ipv6_base`, `public_ip_base` when
    given) in the order VMs, Uniform instances, Flexible instances. A `not_running` share of machines,
    drawn with `seed`, is stopped or deallocated. `overrides` maps names to `Estate.update` changes.
    """
    places = list(itertools.product(subscriptions, resource_groups))
    rng = random.Random(seed)
    counter = itertools.count()

    def spread(i: int) -> tuple[dict, dict[str, str]]:
        subscription, resource_group = places[i % len(places)]
        region = regions[(i // len(services)) % len(regions)]
        return (dict(subscription=subscription, resource_group=resource_group, location=region),
                service_tags(*services[i % len(services)]))

    def machine(cls: type[Instance], name: str, **fields) -> Instance:
        k = next(counter)
        power = rng.choice(("stopped", "deallocated")) if rng.random() < not_running else "running"
        return cls(name=name, private_ip=_address(ip_base, k), private_ipv6=_address(ipv6_base, k),
                   public_ip=_address(public_ip_base, k), power_state=power, **fields)

    estate = Estate()
    for i in range(vms):
        place, tags = spread(i)
        estate.vms.append(machine(Vm, f"vm-{i:04d}", tags=tags, **place))
    for mode, count, prefix in ((UNIFORM, uniform_sets, "uvmss"), (FLEXIBLE, flexible_sets, "fvmss")):
        for j in range(count):
            place, tags = spread(j)
            name = f"{prefix}-{j:02d}"
            instances = [machine(Instance, f"{name}_{n}") for n in range(per_set)]
            estate.scale_sets.append(ScaleSet(name=name, orchestration=mode, tags=tags,
                                              instances=instances, **place))
    for name, changes in (overrides or {}).items():
        estate.update(name, **changes)
    return estate


def _address(base: str | None, offset: int) -> str | None:
    return None if base is None else str(ipaddress.ip_address(base) + offset)


# === Rendering: ARM JSON shapes (testing/azure-examples) ===
_RESOURCE_GROUP_SEGMENT = re.compile(r"/resourceGroups/([^/]+)", re.IGNORECASE)


def _shout(arm_id: str) -> str:
    """How Azure often spells a reference to another resource: `/resourcegroups/RG-NAME/`."""
    return _RESOURCE_GROUP_SEGMENT.sub(lambda m: f"/resourcegroups/{m[1].upper()}", arm_id, count=1)


def _guid(arm_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, arm_id.lower()))


def _resource(arm_id: str, rtype: str, location: str | None, tags: dict | None, properties: dict,
              name: str | None = None) -> dict:
    """The envelope every ARM resource shares; `name` defaults to the id's last segment."""
    item = {"name": name or arm_id.rpartition("/")[2], "id": arm_id, "type": rtype}
    if location:
        item["location"] = location
    if tags:
        item["tags"] = dict(tags)
    item["properties"] = properties
    return item


def _federated_token() -> str:
    """A JWT as Kubernetes projects a service account token for workload identity (never checked as one)."""
    def part(document: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")
    return ".".join((part({"alg": "RS256", "kid": "fake"}),
                     part({"aud": ["api://AzureADTokenExchange"], "iss": "https://oidc.fake.example/",
                           "sub": "system:serviceaccount:default:haproxy-azure-discovery"}),
                     secrets.token_urlsafe(32)))


def _provisioning_status(state: str) -> dict:
    """The instance view's provisioning status: `ProvisioningState/succeeded` ("Provisioning succeeded"),
    `ProvisioningState/deleting` ("Deleting") while an operation runs, `ProvisioningState/failed` (Error)."""
    code = state.lower()
    display = {"succeeded": "Provisioning succeeded", "failed": "Provisioning failed"}.get(code, state.capitalize())
    return {"code": f"ProvisioningState/{code}", "level": "Error" if code == "failed" else "Info",
            "displayStatus": display}


def _instance_view(inst: Instance, uniform: bool = False) -> dict:
    """Statuses; for a Uniform instance with the Application Health extension, its vmHealth too
    (VirtualMachineScaleSetVMInstanceView.vmHealth; the status-only VM list never carries one)."""
    view = {"statuses": [
        _provisioning_status(inst.provisioning_state),
        {"code": f"PowerState/{inst.power_state}", "level": "Info", "displayStatus": f"VM {inst.power_state}"},
    ]}
    if uniform and inst.health is not None:
        code = f"HealthState/{inst.health.lower()}"
        view["vmHealth"] = {"status": {"code": code, "level": "Info", "displayStatus": inst.health,
                                       "time": "2026-01-01T00:00:00+00:00"}}
    return view


def _nic_references(p: Placed) -> list[dict]:
    references = []
    for n in p.nic_numbers:
        reference = {"id": _shout(p.nic_id_of(n))}
        if p.ss is not None or len(p.nic_numbers) > 1:   # a standalone VM with a single NIC leaves it out
            reference["properties"] = {"primary": n == 0, "deleteOption": "Delete"}
        references.append(reference)
    return references


def _vm_json(p: Placed, *, instance_view: bool = False) -> dict:
    properties = {"vmId": _guid(p.vm_id), "hardwareProfile": {"vmSize": VM_SIZE},
                  "networkProfile": {"networkInterfaces": _nic_references(p)},
                  "provisioningState": p.inst.provisioning_state}
    if p.ss is not None:
        properties["virtualMachineScaleSet"] = {"id": _shout(scale_set_id(p.ss))}
    if instance_view:
        properties["instanceView"] = _instance_view(p.inst)
    return _resource(p.vm_id, "Microsoft.Compute/virtualMachines", p.home.location, p.inst.tags, properties)


def _vm_status_json(p: Placed) -> dict:
    return _resource(_shout(p.vm_id), "Microsoft.Compute/virtualMachines", p.home.location, None,
                     {"instanceView": _instance_view(p.inst)})


def _scale_set_json(ss: ScaleSet) -> dict:
    item = _resource(scale_set_id(ss), "Microsoft.Compute/virtualMachineScaleSets", ss.location, ss.tags,
                     {"orchestrationMode": ss.orchestration, "provisioningState": ss.provisioning_state,
                      "uniqueId": _guid(scale_set_id(ss))})
    item["sku"] = {"name": VM_SIZE, "tier": "Standard", "capacity": len(ss.instances)}
    return item


def _scale_set_vm_json(p: Placed, *, instance_view: bool) -> dict:
    properties = {"latestModelApplied": True, "vmId": _guid(p.vm_id), "hardwareProfile": {"vmSize": VM_SIZE},
                  "provisioningState": p.inst.provisioning_state}
    if p.uniform:   # Azure gives a Flexible member's network profile only in the VM list
        properties["networkProfile"] = {"networkInterfaces": _nic_references(p)}
    if instance_view:
        properties["instanceView"] = _instance_view(p.inst, p.uniform)
    item = _resource(p.vm_id, "Microsoft.Compute/virtualMachines", p.ss.location, p.inst.tags, properties,
                     name=p.inst.name)   # a Uniform instance's id ends in its index, not its name
    item["instanceId"] = _index_of(p.inst) if p.uniform else p.inst.name
    return item


def _ip_config_json(p: Placed, config_id: str, address: str, version: str, public: bool) -> dict:
    home = p.home
    subnet = (f"{_group_id(home)}/providers/Microsoft.Network/virtualNetworks/"
              f"{home.resource_group}-vnet/subnets/default")
    properties = {"provisioningState": "Succeeded", "privateIPAddress": address,
                  "privateIPAllocationMethod": "Dynamic", "privateIPAddressVersion": version,
                  "primary": version == "IPv4", "subnet": {"id": subnet}}
    if public:
        properties["publicIPAddress"] = {"id": _shout(p.public_ip_id)}
    return {"name": config_id.rpartition("/")[2], "id": config_id,
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations", "properties": properties}


def _nic_json(p: Placed, n: int = 0) -> dict:
    """NIC n of a machine: the primary one (0) carries the IPv6 and public addresses."""
    if n:
        configs = [_ip_config_json(p, f"{p.nic_id_of(n)}/ipConfigurations/ipconfig1", p.inst.second_nic_ip,
                                   "IPv4", False)]
    else:
        configs = [_ip_config_json(p, p.ip_config_id, p.inst.private_ip, "IPv4", bool(p.inst.public_ip))]
    if p.inst.private_ipv6 and not n:
        configs.append(_ip_config_json(p, f"{p.nic_id}/ipConfigurations/ipconfig-v6",
                                       p.inst.private_ipv6, "IPv6", False))
    properties = {"provisioningState": "Succeeded", "ipConfigurations": configs, "primary": n == 0,
                  "enableAcceleratedNetworking": False, "enableIPForwarding": False,
                  "virtualMachine": {"id": _shout(p.vm_id)}}
    # Uniform scale-set NICs and public IPs have no location (VmssNetworkInterfaceList.json).
    location = None if p.uniform else p.home.location
    return _resource(p.nic_id_of(n), "Microsoft.Network/networkInterfaces", location, None, properties)


def _public_ip_json(p: Placed) -> dict:
    properties = {"provisioningState": "Succeeded", "ipAddress": p.inst.public_ip,
                  "publicIPAddressVersion": "IPv4", "publicIPAllocationMethod": "Static",
                  "idleTimeoutInMinutes": 4, "ipConfiguration": {"id": _shout(p.ip_config_id)}}
    location = None if p.uniform else p.home.location
    return _resource(p.public_ip_id, "Microsoft.Network/publicIPAddresses", location, None, properties)


def _in_scope(place: Vm | ScaleSet, subscription: str, resource_group: str | None) -> bool:
    return (place.subscription.lower() == subscription.lower()
            and (resource_group is None or place.resource_group.lower() == resource_group.lower()))


Listing = tuple[list, Callable[[object], dict]]


def _listing(estate: Estate, endpoint: str, groups: dict, params: dict) -> Listing | None:
    """What an ARM list endpoint returns, unrendered, and how to render one item; None: no such set."""
    subscription, resource_group = groups["sub"], groups.get("rg")
    instance_view = params.get("$expand", "").lower() == "instanceview"
    if endpoint in ("vmss", "vmss_rg"):
        return [ss for ss in estate.scale_sets if _in_scope(ss, subscription, resource_group)], _scale_set_json
    if "vmss" in groups:
        wanted = groups["vmss"].lower()
        ss = next((ss for ss in estate.scale_sets
                   if ss.name.lower() == wanted and _in_scope(ss, subscription, resource_group)), None)
        if ss is None:
            return None
        members = [Placed(inst, ss) for inst in ss.instances]
        if endpoint == "vmss_vms":
            return members, partial(_scale_set_vm_json, instance_view=instance_view)
        machines = members if ss.orchestration == UNIFORM else []   # Flexible NICs are ordinary NICs
    else:
        machines = [p for p in estate.machines()
                    if not p.uniform and _in_scope(p.home, subscription, resource_group)]
    if endpoint == "vms_status":
        return machines, _vm_status_json
    if endpoint in ("vms", "vms_rg"):
        if "$filter" in params:   # checked by _refused_by_documentation: one scale set's members
            wanted = _FILTER.fullmatch(params["$filter"])[1].lower()
            machines = [p for p in machines if p.ss is not None and scale_set_id(p.ss).lower() == wanted]
        return machines, partial(_vm_json, instance_view=instance_view)
    with_nic = [p for p in machines if p.inst.has_nic]
    if endpoint in ("nics", "nics_rg", "vmss_nics"):
        return [(p, n) for p in with_nic for n in p.nic_numbers], lambda pn: _nic_json(*pn)
    return [p for p in with_nic if p.inst.public_ip], _public_ip_json


class _Lookup(NamedTuple):
    """Machines by the lower-cased path of their single GETs: VMs (instance views) and NICs."""
    vms: dict[str, Placed]
    nics: dict[str, tuple[Placed, int]]   # (machine, NIC number)


def _build_lookup(estate: Estate) -> _Lookup:
    vms, nics = {}, {}
    for p in estate.machines():
        vms[p.vm_id.lower()] = p
        if p.ss is not None and not p.uniform:   # a Flexible member also under its set, by instanceId
            vms[f"{scale_set_id(p.ss)}/virtualMachines/{p.inst.name}".lower()] = p
        for n in p.nic_numbers:
            nics[p.nic_id_of(n).lower()] = (p, n)
    return _Lookup(vms, nics)


def _lookup_stamp(estate: Estate) -> tuple:
    """Changes whenever a lookup built earlier may be stale (also after direct list edits)."""
    return estate.generation, len(estate.vms), tuple(len(ss.instances) for ss in estate.scale_sets)


def _single(lookup: _Lookup, endpoint: str, path: str) -> dict | None:
    """What a single-resource GET returns; None: not found."""
    key = path.lower()
    if endpoint in ("nic_get", "vmss_nic_get"):
        found = lookup.nics.get(key)
        return _nic_json(*found) if found is not None and found[0].inst.has_nic else None
    p = lookup.vms.get(key.removesuffix("/instanceview"))
    return _instance_view(p.inst, p.uniform) if p is not None else None


def _not_found(endpoint: str, groups: dict) -> str:
    resource = {"nic_get": "Microsoft.Network/networkInterfaces/{nic}",
                "vmss_nic_get": "Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/{index}/"
                                "networkInterfaces/{nic}",
                "vm_instance_view": "Microsoft.Compute/virtualMachines/{vm}",
                "vmss_vm_instance_view": "Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/{index}",
                }.get(endpoint, "Microsoft.Compute/virtualMachineScaleSets/{vmss}").format_map(groups)
    return f"The Resource '{resource}' under resource group '{groups['rg']}' was not found."


# === Resource Graph ===
# What the fake knows of Resource Graph's schema, with its sources: resource_graph_schema.json.
GRAPH_SCHEMA = json.loads((Path(__file__).resolve().parent / "resource_graph_schema.json").read_text())
_TABLES = {table.lower(): table for table in GRAPH_SCHEMA["tables"]}
_COLUMNS = frozenset(GRAPH_SCHEMA["columns"])
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
GRAPH_TENANT = "00000000-0000-0000-0000-0000000000aa"
# Azure China's "Azure Resource Graph table and resource type reference" (docs.azure.cn, governance/
# resource-graph/reference/supported-tables-resources) lists one type under computeresources, where the
# public cloud's lists three: set `fake.graph_compute_types = AZURE_CHINA_COMPUTE_TYPES` to serve that.
AZURE_CHINA_COMPUTE_TYPES = frozenset(
    {"microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces/ipconfigurations/publicipaddresses"})


class GraphQuery(NamedTuple):
    """The subset of KQL the fake evaluates: a table, `where COLUMN in~ ('a', ...)` filters, `extend`s
    and one `project` of compiled expressions ((name, evaluate(row)) pairs, evaluate reading a document
    with the extended columns so far), and `order by` / `sort by` (the last one given wins, as in KQL):
    (path, descending?) per term, first term first, the path read from the projected row when the order
    comes after `project` (`order_projected`), else from the document with its extended columns."""
    table: str
    filters: tuple[tuple[str, frozenset[str]], ...]
    columns: tuple[tuple[str, Callable[[dict], object]], ...]
    order: tuple[tuple[tuple[str, ...], bool], ...] = ()
    extends: tuple[tuple[str, Callable[[dict], object]], ...] = ()
    order_projected: bool = False


_ORDER = re.compile(r"(?:order|sort)\s+by\s+(.+)", re.DOTALL)
_ORDER_TERM = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?:\s+(asc|desc))?", re.IGNORECASE)
_ASSIGNING = re.compile(r"(extend|project)\s+(.+)", re.DOTALL)


# One parse per query text: the same text gives the same GraphQuery (its compiled expressions
# included), so a query paged again compares equal to the one before.
@functools.lru_cache(maxsize=64)
def parse_graph_query(text: str, *, known_types_only: bool = True) -> GraphQuery:
    """ValueError naming the first thing Microsoft does not document (or the fake does not model).

    `known_types_only` (the default, a check of a query's text) also refuses a `where type in~` value
    that the table reference does not list for the table. Resource Graph itself does not: a string
    that names no type simply matches no row, and the fake's endpoint parses with False.
    """
    stages = [stage.strip() for stage in text.split("|")]
    table = _TABLES.get(stages[0].lower())
    if table is None:
        raise ValueError(f"table {stages[0]!r} is not a documented Resource Graph table the fake serves")
    filters, extends, extended, columns, projected, order, after = [], [], {}, None, {}, (), False
    for stage in stages[1:]:
        where = re.fullmatch(r"where\s+(\w+)\s+in~\s*\((.*)\)", stage, re.DOTALL)
        assigning = _ASSIGNING.fullmatch(stage)
        ordered = _ORDER.fullmatch(stage)
        if columns is not None and not ordered:
            raise ValueError(f"operator not modelled by the fake after project: {stage[:60]!r}")
        if where:
            column, values = where[1], frozenset(v.lower() for v in re.findall(r"'([^']*)'", where[2]))
            if column in extended:
                raise ValueError(f"where on the extended column {column!r} is not modelled by the fake")
            _check_column(column)
            known = {t.lower() for t in GRAPH_SCHEMA["tables"][table]}
            unknown = sorted(values - known) if column == "type" and known_types_only else []
            if unknown:
                raise ValueError(f"type(s) {', '.join(unknown)} are not documented in table {table}")
            filters.append((column, values))
        elif assigning and assigning[1] == "extend":
            if order:
                raise ValueError("extend after order by is not modelled by the fake")
            extends += _Expressions(assigning[2], extended).assignments(extending=True)
        elif assigning:
            items = _Expressions(assigning[2], extended).assignments(extending=False)
            projected = {name: kind for name, _, kind in items}
            if len(projected) < len(items):
                raise ValueError(f"project names a column twice: {stage[:60]!r}")
            columns = tuple((name, evaluate) for name, evaluate, _ in items)
        elif ordered:
            known = projected if columns is not None else extended
            order = tuple(_order_term(term.strip(), known, columns is not None) for term in ordered[1].split(","))
            after = columns is not None
        else:
            raise ValueError(f"operator not modelled by the fake: {stage[:60]!r}")
    if not columns:
        raise ValueError("no project: the fake wants the columns named")
    return GraphQuery(table, tuple(filters), columns, order,
                      tuple((name, evaluate) for name, evaluate, _ in extends), after)


def _order_term(term: str, known: dict[str, str], projected: bool) -> tuple[tuple[str, ...], bool]:
    """One `COLUMN [asc|desc]` of an order by: (path, descending?). KQL sorts descending unless told
    `asc` ("sort operator", Kusto Query Language reference). Before `project` a term names a documented
    or extended column (or a path in one); after it, a projected column (or a path in one)."""
    match = _ORDER_TERM.fullmatch(term)
    if not match:
        raise ValueError(f"order by term {term!r} is not `column [asc|desc]`")
    first, *rest = match[1].split(".")
    if projected and first not in known:
        raise ValueError(f"order by {first!r}: not a column of the projection")
    kind = known[first] if first in known else _documented_kind(first)
    if rest and kind != _DYNAMIC:
        raise ValueError(f"order by {match[1]!r}: {first!r} is a {kind}, not a dynamic value")
    return (first, *rest), (match[2] or "desc").lower() == "desc"


def _check_column(name: str) -> None:
    if name not in _COLUMNS:
        raise ValueError(f"column {name!r} is not a documented Resource Graph column")


def _dig(document: dict, path: tuple[str | int, ...]):
    """A dynamic path as KQL reads it: case-sensitive members, array indexes from 0, null where
    anything is missing (a member of a non-object, an index of a non-array or past its end)."""
    value = document
    for step in path:
        if type(step) is int:
            value = value[step] if type(value) is list and step < len(value) else None
        elif type(value) is dict:
            value = value.get(step)
        else:
            return None
    return value


# KQL expressions: the types the fake tells apart, and the functions it models. Sources, in
# resource_graph_schema.json (`_sources.kql_expressions`): Resource Graph supports KQL's scalar functions
# and operators ("Understanding the Azure Resource Graph query language"); each function's Kusto page.
_DYNAMIC, _LONG, _BOOL, _STRING = "dynamic", "long", "bool", "string"
# The documented columns whose cells are strings (ids, names, places); the others hold dynamic values.
_STRING_COLUMNS = frozenset({"id", "name", "type", "tenantId", "kind", "location", "resourceGroup",
                             "subscriptionId", "managedBy"})
_TOKEN = re.compile(r"\s*(\d+|[A-Za-z_][A-Za-z0-9_]*|'[^']*'|\"[^\"]*\"|==|!=|=~|!~|<=|>=|\S)")
_Compiled = tuple[Callable[[dict], object], str]   # (evaluate(row), its KQL type)


def _documented_kind(name: str) -> str:
    _check_column(name)
    return _STRING if name in _STRING_COLUMNS else _DYNAMIC


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _array_length(array: _Compiled) -> _Compiled:
    """array_length(): "the number of elements in array, or null if array isn't an array" (a dynamic
    parameter)."""
    evaluate, kind = array
    if kind != _DYNAMIC:
        raise ValueError(f"array_length() of a {kind}: its parameter is dynamic")
    return (lambda row: len(value) if type(value := evaluate(row)) is list else None), _LONG


def _isnotempty(value: _Compiled) -> _Compiled:
    """isnotempty(): "true if the argument isn't an empty string, and it isn't null"; an empty array or
    property bag is not empty (isempty's examples: parsejson("[]") and parsejson("{}") are not)."""
    evaluate = value[0]
    return (lambda row: (v := evaluate(row)) is not None and v != ""), _BOOL


def _isempty(value: _Compiled) -> _Compiled:
    """isempty(): "true if the argument is an empty string or is null"."""
    evaluate = value[0]
    return (lambda row: (v := evaluate(row)) is None or v == ""), _BOOL


def _iff(condition: _Compiled, then: _Compiled, otherwise: _Compiled) -> _Compiled:
    """iff(): "the then value when the if condition evaluates to true, otherwise ... the else value"
    (so for a null condition too); the fake wants both of one type."""
    (test, test_kind), (yes, kind), (no, other_kind) = condition, then, otherwise
    if test_kind != _BOOL or kind != other_kind:
        raise ValueError(f"iff({test_kind}, {kind}, {other_kind}) is not modelled by the fake: it wants "
                         "a bool condition and two values of one type")
    return (lambda row: yes(row) if test(row) else no(row)), kind


_FUNCTIONS = {"array_length": _array_length, "isnotempty": _isnotempty, "isempty": _isempty, "iff": _iff}


class _Expressions:
    """One stage's `NAME = EXPR, ...` items, parsed by recursive descent into closures over a row.

    expression := comparison ('and' comparison)*;  comparison := primary ('==' INTEGER)?;
    primary := INTEGER | '(' expression ')' | dynamic(null) | FUNCTION '(' expression, ... ')'
             | COLUMN ('.' MEMBER | '[' INTEGER ']')*
    Anything else is a ValueError naming it. `extended` maps the extended columns so far to their types.
    """

    def __init__(self, text: str, extended: dict[str, str]):
        self.text, self.extended, self.at = text, extended, 0
        self.tokens = _TOKEN.findall(text.strip())

    def assignments(self, *, extending: bool) -> list[tuple[str, Callable, str]]:
        """(name, evaluate, type) per item. Project's items may be bare columns, extend's may not;
        an extend's columns are known to its later items (and stages) as they are defined."""
        items = []
        while True:
            name = self.take()
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"{name!r} in {self.text!r}: not a column name")
            if self.peek() == "=":
                self.take()
                evaluate, kind = self.expression()
            elif extending:
                raise ValueError(f"extend {name!r}: the fake models only `extend NAME = EXPR`")
            else:
                evaluate, kind = self.column(name, ())
            items.append((name, evaluate, kind))
            if extending:
                self.extended[name] = kind     # a later definition shadows an earlier one, as in KQL
            if self.peek() is None:
                return items
            self.take(",")

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or expected not in (None, token):
            found = "the end" if token is None else repr(token)
            raise ValueError(f"{found} in {self.text!r} (where {expected or 'more'!r} would do): not modelled "
                             "by the fake, which knows columns, paths, == N, and, iff, array_length, "
                             "isnotempty, isempty and dynamic(null)")
        self.at += 1
        return token

    def expression(self) -> _Compiled:
        evaluate, kind = self.comparison()
        while self.peek() == "and":
            self.take()
            right, right_kind = self.comparison()
            if kind != _BOOL or right_kind != _BOOL:
                raise ValueError(f"`and` of a {kind} and a {right_kind} in {self.text!r}: not modelled")
            evaluate = _and(evaluate, right)
        return evaluate, kind

    def comparison(self) -> _Compiled:
        evaluate, kind = self.primary()
        if self.peek() != "==":
            return evaluate, kind
        self.take()
        number = self.integer("==")
        if kind not in (_LONG, _DYNAMIC):
            raise ValueError(f"a {kind} == {number} in {self.text!r}: not modelled by the fake")
        # "Applying the equality operator to a null value and a non-null value yields bool(false)."
        return (lambda row: _is_number(value := evaluate(row)) and value == number), _BOOL

    def primary(self) -> _Compiled:
        token = self.take()
        if token.isdigit():
            number = int(token)
            return (lambda row: number), _LONG
        if token == "(":
            inner = self.expression()
            self.take(")")
            return inner
        if not _IDENTIFIER.fullmatch(token) or token == "and":
            raise ValueError(f"{token!r} in {self.text!r}: not modelled by the fake (string literals only "
                             "in `where COLUMN in~ (...)`; no operators but == N and `and`)")
        if self.peek() == "(":
            return self.call(token)
        steps = []
        while self.peek() in (".", "["):
            if self.take() == ".":
                steps.append(self.take())
                if not _IDENTIFIER.fullmatch(steps[-1]):
                    raise ValueError(f"member {steps[-1]!r} in {self.text!r}: not modelled by the fake")
            else:
                steps.append(self.integer("["))
                self.take("]")
        return self.column(token, tuple(steps))

    def integer(self, after: str) -> int:
        token = self.take()
        if not token.isdigit():
            raise ValueError(f"{token!r} after {after!r} in {self.text!r}: the fake models only a "
                             "non-negative integer literal there")
        return int(token)

    def column(self, name: str, steps: tuple) -> _Compiled:
        kind = self.extended[name] if name in self.extended else _documented_kind(name)
        if steps and kind != _DYNAMIC:
            raise ValueError(f"{name!r} is a {kind}: a path in it ({self.text!r}) is not modelled")
        if not steps:
            return (lambda row: row.get(name)), kind
        path = (name, *steps)
        return (lambda row: _dig(row, path)), _DYNAMIC

    def call(self, name: str) -> _Compiled:
        self.take("(")
        if name == "dynamic":
            if self.take() != "null" or self.take() != ")":
                raise ValueError(f"a dynamic literal other than dynamic(null) in {self.text!r}: not modelled")
            return (lambda row: None), _DYNAMIC
        function = _FUNCTIONS.get(name)
        if function is None:
            raise ValueError(f"function {name}() is not modelled by the fake")
        arguments = [] if self.peek() == ")" else [self.expression()]
        while self.peek() == ",":
            self.take()
            arguments.append(self.expression())
        self.take(")")
        try:
            return function(*arguments)
        except TypeError:
            raise ValueError(f"{name}() with {len(arguments)} argument(s) in {self.text!r}") from None


def _and(left: Callable, right: Callable) -> Callable:
    """KQL's `and` as "Null values" states it: false if either side is false, else null if either is
    null. ("Logical (binary) operators" tabulates `bool(null) and true` as false; no expression the fake
    models yields a null bool, and iff and where read null as false either way.)"""
    def both(row):
        a = left(row)
        if a is False:
            return False
        b = right(row)
        return False if b is False else (None if a is None or b is None else True)
    return both


def _graph_row(item: dict, rtype: str, p_home: Vm | ScaleSet, power: str | None = None, sku=None) -> dict:
    """An ARM item as a Resource Graph row: its columns, the type lower-cased, the power state as an
    extended property."""
    properties = dict(item["properties"])
    if power is not None:
        properties["extended"] = {"instanceView": {"powerState": {
            "code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}}}
    return {"id": item["id"], "name": item["name"], "type": rtype, "tenantId": GRAPH_TENANT, "kind": "",
            "location": item.get("location") or p_home.location, "resourceGroup": p_home.resource_group.lower(),
            "subscriptionId": p_home.subscription, "managedBy": "", "sku": sku, "plan": None,
            "properties": properties, "tags": item.get("tags") or {}, "identity": None, "zones": None,
            "extendedLocation": None}


_UNIFORM_PREFIX = "microsoft.compute/virtualmachinescalesets/virtualmachines"
_GRAPH_TYPES = {  # (table is ComputeResources, kind) -> type
    (False, "vm"): "microsoft.compute/virtualmachines", (True, "vm"): _UNIFORM_PREFIX,
    (False, "nic"): "microsoft.network/networkinterfaces", (True, "nic"): f"{_UNIFORM_PREFIX}/networkinterfaces",
    (False, "pip"): "microsoft.network/publicipaddresses",
    (True, "pip"): f"{_UNIFORM_PREFIX}/networkinterfaces/ipconfigurations/publicipaddresses",
}


def graph_documents(estate: Estate, table: str, types: set[str] | frozenset[str] | None = None) -> list[dict]:
    """Every row of `table` the estate holds, before any filter; only rows of `types` (lower-cased)
    when given (the others are not even rendered)."""
    rows = []
    uniform_table = table == "ComputeResources"
    vm_type, nic_type, pip_type = (_GRAPH_TYPES[uniform_table, kind] for kind in ("vm", "nic", "pip"))

    def wanted(rtype: str) -> bool:
        return types is None or rtype in types

    for p in estate.machines():
        if p.uniform != uniform_table:
            continue
        if wanted(vm_type):
            item = _scale_set_vm_json(p, instance_view=False) if uniform_table else _vm_json(p)
            rows.append(_graph_row(item, vm_type, p.home, p.inst.power_state))
        if p.inst.has_nic:
            if wanted(nic_type):
                rows += [_graph_row(_nic_json(p, n), nic_type, p.home) for n in p.nic_numbers]
            if p.inst.public_ip and wanted(pip_type):
                rows.append(_graph_row(_public_ip_json(p), pip_type, p.home))
    if not uniform_table and wanted("microsoft.compute/virtualmachinescalesets"):
        for ss in estate.scale_sets:
            item = _scale_set_json(ss)
            rows.append(_graph_row(item, "microsoft.compute/virtualmachinescalesets", ss, sku=item["sku"]))
    return rows


GraphCandidate = tuple[tuple, dict]   # (the order-by values, the projected row)


def graph_candidates(estate: Estate, query: GraphQuery, subscriptions: set[str], readable: set[str] | None,
                     compute_types: set[str] | frozenset[str] | None = None) -> list[GraphCandidate]:
    """The query's rows before ordering, each with its order-by values: in the given subscriptions, in
    resource groups the principal may read (Resource Graph leaves out what the caller cannot read), of
    the types the cloud has (`compute_types`: those of ComputeResources; None, all documented ones),
    filtered, extended and projected (only project's columns, in its order)."""
    types = next((values for column, values in query.filters if column == "type"), None)
    if query.table == "ComputeResources" and compute_types is not None:
        present = {t.lower() for t in compute_types}
        types = present if types is None else set(types) & present
    candidates = []
    for document in graph_documents(estate, query.table, types):
        if document["subscriptionId"].lower() not in subscriptions:
            continue
        if readable is not None and document["resourceGroup"] not in readable:
            continue
        if not all(str(document.get(column) or "").lower() in values for column, values in query.filters):
            continue
        row = document
        if query.extends:
            row = dict(document)
            for name, evaluate in query.extends:
                row[name] = evaluate(row)
        projected = {name: evaluate(row) for name, evaluate in query.columns}
        sorted_on = projected if query.order_projected else row
        candidates.append((tuple(_dig(sorted_on, path) for path, _ in query.order), projected))
    return candidates


def _sort_value(value) -> tuple:
    """A total order over what a column can hold: nulls apart, numbers, strings (ordinal), the rest."""
    if isinstance(value, (bool, int, float)):
        return 0, float(value), ""
    if isinstance(value, str):
        return 1, 0.0, value
    return 2, 0.0, json.dumps(value, sort_keys=True)


def order_graph_rows(candidates: list[GraphCandidate], query: GraphQuery, rng: random.Random | None) -> list[dict]:
    """The rows as one request serves them. Without `order by` Resource Graph's order is "random and not
    repeatable" ("Guidance for pagination"): `rng` draws a new one. With it, rows are sorted by each term
    (nulls first ascending, last descending, as KQL's sort does); rows equal in every term keep the
    random order, as that article warns for non-unique sort columns."""
    rows = list(candidates)
    if rng is not None:
        rng.shuffle(rows)
    for index in reversed(range(len(query.order))):
        descending = query.order[index][1]
        rows.sort(key=lambda c: (c[0][index] is not None, _sort_value(c[0][index])), reverse=descending)
    return [row for _, row in rows]


def evaluate_graph_query(estate: Estate, query: GraphQuery, subscriptions: set[str],
                         readable: set[str] | None, *, rng: random.Random | None = None,
                         compute_types: set[str] | frozenset[str] | None = None) -> list[dict]:
    """The query's rows in the order one request would serve them (see order_graph_rows; without `rng`,
    unsorted rows stay in the estate's order)."""
    return order_graph_rows(graph_candidates(estate, query, subscriptions, readable, compute_types), query, rng)


def _graph_request(body) -> dict:
    """The QueryRequest body as documented (subscriptions, query, options): KeyError/TypeError/ValueError."""
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise ValueError("the body must be an object with a query string")
    subscriptions = body["subscriptions"]
    if not (isinstance(subscriptions, list) and subscriptions and all(isinstance(s, str) for s in subscriptions)):
        raise ValueError("subscriptions must be a non-empty list of subscription ids")
    options = body.get("options") or {}
    top = options.get("$top", 100)
    if not isinstance(top, int) or not 1 <= top <= GRAPH_SCHEMA["max_top"]:
        raise ValueError(f"options.$top must be 1..{GRAPH_SCHEMA['max_top']}, got {top!r}")
    formats = GRAPH_SCHEMA["result_formats"]
    if options.get("resultFormat", "objectArray") not in formats:
        raise ValueError(f"options.resultFormat must be one of {formats}, got "
                         f"{options['resultFormat']!r}")
    return body


def _table_columns(query: GraphQuery, options: dict) -> tuple[str, ...] | None:
    """The columns of an answer asked for in resultFormat "table"; None for one of objects."""
    if options.get("resultFormat") != "table":
        return None
    return tuple(name for name, _ in query.columns)


def graph_table(rows: list, columns: tuple[str, ...]) -> dict:
    """Rows (objects, as resultFormat "objectArray" has them) in resultFormat "table" (the REST
    reference's Table: `columns` [{name, type}] once, `rows` as arrays of cells in the columns'
    order). A row that is no object (as a fault makes it) stays what it is. Column types are the
    fake's choice: "string" for the documented string columns, "object" for the rest."""
    strings = {"id", "name", "type", "location"}
    return {"columns": [{"name": c, "type": "string" if c in strings else "object"}
                        for c in columns],
            "rows": [[row.get(c) for c in columns] if isinstance(row, dict) else row
                     for row in rows]}


# === What Azure documents, and refuses ===
# VirtualMachines_ListAll and VirtualMachines_List (Compute REST reference, every api-version since
# 2021-03-01): "$expand: The expand expression to apply on operation. 'instanceView' enables fetching run
# time status of all Virtual Machines, this can only be specified if a valid $filter option is specified";
# "$filter: ... Allowed value is 'virtualMachineScaleSet/id' eq
# /subscriptions/{subId}/resourceGroups/{rgName}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmssName}".
_FILTER = re.compile(r"\s*virtualMachineScaleSet/id\s+eq\s+'(/subscriptions/[^/']+/resourceGroups/[^/']+"
                     r"/providers/Microsoft\.Compute/virtualMachineScaleSets/[^/']+)'\s*", re.IGNORECASE)
# The permission each endpoint needs (Reader grants all of them), for 403 AuthorizationFailed.
_ACTIONS = {"vms": "Microsoft.Compute/virtualMachines/read", "vmss": "Microsoft.Compute/virtualMachineScaleSets/read",
            "vmss_vms": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
            "nics": "Microsoft.Network/networkInterfaces/read", "pips": "Microsoft.Network/publicIPAddresses/read",
            "nic_get": "Microsoft.Network/networkInterfaces/read", "vmss_nic_get": "Microsoft.Network/networkInterfaces/read",
            "vm_instance_view": "Microsoft.Compute/virtualMachines/read",
            "vmss_vm_instance_view": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
            "graph": "Microsoft.ResourceGraph/resources/read"}


def _refused_by_documentation(endpoint: str, params: dict) -> _Reply | None:
    """400 for what the REST reference rules out: `$expand` on a VM list without a valid `$filter`."""
    if endpoint not in ("vms", "vms_rg", "vms_status"):
        return None
    if "$filter" in params and not _FILTER.fullmatch(params["$filter"]):
        return _arm_error(400, "InvalidParameter", f"The value of parameter '$filter' is invalid: "
                          f"{params['$filter']!r}. Allowed: virtualMachineScaleSet/id eq '<scale set id>'.",
                          target="$filter")
    if params.get("$expand", "").lower() == "instanceview" and "$filter" not in params:
        return _arm_error(400, "InvalidParameter", "$expand=instanceView can only be specified together with "
                          "a valid $filter (virtualMachineScaleSet/id eq '<scale set id>').", target="$expand")
    return None


def _authorization_failed(endpoint: str, scope: str) -> _Reply:
    action = _ACTIONS.get(endpoint.removesuffix("_rg").removesuffix("_status"), "*/read")
    return _arm_error(403, "AuthorizationFailed",
                      f"The client '{FAKE_PRINCIPAL}' with object id '{FAKE_PRINCIPAL}' does not have "
                      f"authorization to perform action '{action}' over scope '{scope}' or the scope is "
                      "invalid. If access was recently granted, please refresh your credentials.")


# === Throttling ===
# Resource Manager ("Understand how Azure Resource Manager throttles requests", regional throttling and
# token bucket algorithm): reads are counted per subscription and principal in a bucket of 250 tokens
# refilled at 25 a second, and per subscription for all principals together at 15 times that; every answer
# tells what is left in x-ms-ratelimit-remaining-subscription-reads (and -global-reads, as ARM sends
# it, e.g. Azure/azure-powershell#26256), and a 429 SubscriptionRequestsThrottled says when to come back
# (its words: velero-io/velero#9171).
DOCUMENTED_SUBSCRIPTION_READS = (250.0, 25.0)        # (bucket size, refill per second)
GLOBAL_READS_FACTOR = 15
# Compute ("Compute throttling limits"; "Troubleshooting API throttling errors" for the headers and the
# 429): token buckets per subscription and region, per policy; each answer of Microsoft.Compute carries
# x-ms-ratelimit-remaining-resource with every bucket that counted it, one comma-separated value as Azure
# sends it ("Microsoft.Compute/HighCostGet3Min;139,Microsoft.Compute/HighCostGet30Min;699"). The labels
# are those Azure answers with; which endpoints each counts follows the limits article's policy table.
COMPUTE_POLICIES = {
    "HighCostGet3Min": ("vms", "vms_rg", "vms_status"),          # High Cost Get VM: List, List All
    "HighCostGet30Min": ("vms", "vms_rg", "vms_status"),
    "HighCostGetVMScaleSet3Min": ("vmss", "vmss_rg"),            # High Cost Get (scale sets): List, List All
    "HighCostGetVMScaleSet30Min": ("vmss", "vmss_rg"),
    "VMScaleSetVMViews3Min": ("vmss_vms", "vmss_vm_instance_view"),   # Get scale set VMs
    "LowCostGet3Min": ("vm_instance_view",),                     # Low Cost Get VM: Get, Instance View
    "LowCostGet30Min": ("vm_instance_view",),
}
# The subscription-level numbers of the limits article, as (bucket size, refill per minute). It gives one
# pair per policy; the 30-minute labels have none there, and keep whatever they were set to.
DOCUMENTED_COMPUTE_BUCKETS = {
    "HighCostGet3Min": (900.0, 300.0), "HighCostGetVMScaleSet3Min": (1080.0, 360.0),
    "VMScaleSetVMViews3Min": (6000.0, 2000.0), "LowCostGet3Min": (24000.0, 8000.0),
}
UNTHROTTLED = (1_000_000.0, 1_000_000.0)   # the default of every bucket: reported, never empty in a test


class _Bucket:
    """A token bucket: `size` tokens at most, `rate` more a second. `debt`: a refused request still takes
    its token (down to -size), so asking again before Retry-After pushes the next token further out."""

    def __init__(self, size: float, rate: float, now: float):
        self.size, self.rate, self.tokens, self.stamp = size, rate, size, now
        self.refused = 0

    def take(self, now: float, debt: bool) -> bool:
        self.tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.refused += 1
        if debt:
            self.tokens = max(-self.size, self.tokens - 1)
        return False

    @property
    def remaining(self) -> int:
        return max(0, int(self.tokens))

    def wait(self) -> int:
        """Whole seconds until a token is there (at least 1): Retry-After."""
        return max(1, math.ceil((1 - self.tokens) / self.rate)) if self.rate > 0 else 3600


# === Routes ===
_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = r"/resourcegroups/(?P<rg>[^/]+)"
_COMPUTE = r"/providers/microsoft\.compute"
_NETWORK = r"/providers/microsoft\.network"
_VMSS = _SUB + _RG + _COMPUTE + r"/virtualmachinescalesets/(?P<vmss>[^/]+)"
_ROUTES = [(endpoint, method, re.compile(pattern, re.IGNORECASE)) for endpoint, method, pattern in (
    ("vms", "GET", _SUB + _COMPUTE + "/virtualmachines"),
    ("vms_rg", "GET", _SUB + _RG + _COMPUTE + "/virtualmachines"),
    ("vmss", "GET", _SUB + _COMPUTE + "/virtualmachinescalesets"),
    ("vmss_rg", "GET", _SUB + _RG + _COMPUTE + "/virtualmachinescalesets"),
    ("vmss_vms", "GET", _VMSS + "/virtualmachines"),
    ("nics", "GET", _SUB + _NETWORK + "/networkinterfaces"),
    ("nics_rg", "GET", _SUB + _RG + _NETWORK + "/networkinterfaces"),
    ("vmss_nics", "GET", _VMSS + "/networkinterfaces"),
    ("pips", "GET", _SUB + _NETWORK + "/publicipaddresses"),
    ("pips_rg", "GET", _SUB + _RG + _NETWORK + "/publicipaddresses"),
    ("vmss_pips", "GET", _VMSS + "/publicipaddresses"),
    ("nic_get", "GET", _SUB + _RG + _NETWORK + "/networkinterfaces/(?P<nic>[^/]+)"),
    ("vmss_nic_get", "GET", _VMSS + "/virtualmachines/(?P<index>[^/]+)/networkinterfaces/(?P<nic>[^/]+)"),
    ("vm_instance_view", "GET", _SUB + _RG + _COMPUTE + "/virtualmachines/(?P<vm>[^/]+)/instanceview"),
    ("vmss_vm_instance_view", "GET", _VMSS + "/virtualmachines/(?P<index>[^/]+)/instanceview"),
    ("token", "GET", "/msi/token"),
    ("metadata", "GET", "/metadata/endpoints"),
    ("graph", "POST", "/providers/microsoft\\.resourcegraph/resources"),
    ("openid", "GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration"),
    ("aad_token", "POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token"),
)]
ENDPOINTS = ("vms_status",) + tuple(endpoint for endpoint, _, _ in _ROUTES)
_IDENTITY_ENDPOINTS = ("token", "openid", "aad_token", "metadata")
_SINGLE_ENDPOINTS = ("nic_get", "vmss_nic_get", "vm_instance_view", "vmss_vm_instance_view")
COUNTS_PATH = "/_counts"
THROTTLE_COUNTERS = ("graph_throttled", "arm_throttled", "compute_throttled")   # refusals, in `counts`


def _route(method: str, path: str, params: dict) -> tuple[str | None, dict]:
    """The endpoint (counter key) a request is for, with the path's named parts."""
    for endpoint, route_method, pattern in _ROUTES:
        match = pattern.fullmatch(path)
        if match and method == route_method:
            if endpoint == "vms" and params.get("statusonly", "").lower() == "true":
                endpoint = "vms_status"
            return endpoint, {k: v for k, v in match.groupdict().items() if v is not None}
    return None, {}


# === Faults ===
# Whole answers instead of the real one ("bad_json", "no_value", "bad_item" and statuses: >= 400, or a
# redirect), a delay before the real one ("slow"), or a change to the real page (the rest). Link faults
# act on Resource Manager listings, Graph faults on Resource Graph answers, item faults on both (the first
# item of the page's `value` or `data`), "trickle" on any answer.
REPLY_KINDS = ("bad_json", "no_value", "bad_item")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
LINK_KINDS = ("self_link", "loop_link", "foreign_link", "other_port_link", "http_link")
GRAPH_KINDS = ("repeat_token", "total_mismatch", "quota_not_digits")
ITEM_KINDS = ("empty", "item_without_id", "item_id_not_string", "item_without_type", "item_name_object",
              "item_tags_string", "item_properties_string", "null_item", "string_items")
FAULT_ACTIONS = ("slow", "trickle", *REPLY_KINDS, *LINK_KINDS, *GRAPH_KINDS, *ITEM_KINDS)
_LIST_ENDPOINTS = ("vms", "vms_status", "vms_rg", "vmss", "vmss_rg", "vmss_vms", "nics", "nics_rg", "vmss_nics",
                   "pips", "pips_rg", "vmss_pips")


def _fits(kind: str, endpoint: str) -> bool:
    """Whether a fault of `kind` can act on an answer of `endpoint`."""
    if kind in LINK_KINDS:
        return endpoint in _LIST_ENDPOINTS
    if kind in GRAPH_KINDS:
        return endpoint == "graph"
    if kind in ITEM_KINDS:
        return endpoint in _LIST_ENDPOINTS or endpoint == "graph"
    return True


@dataclass
class Fault:
    """One injected failure; see the module docstring. `fired` counts how often it has fired."""
    kind: str
    endpoint: str | None = None
    path: str | None = None
    page: int | None = None
    times: int | None = 1
    retry_after: int | None = 1
    delay: float = 1.0
    location: str | None = None
    fired: int = 0

    def __post_init__(self):
        status = int(self.kind) if self.kind.isdigit() else 0
        if self.kind not in FAULT_ACTIONS and not (status >= 400 or status in REDIRECT_STATUSES):
            raise ValueError(f"fault kind {self.kind!r}: want an HTTP status >= 400, a redirect "
                             f"{REDIRECT_STATUSES} or one of {FAULT_ACTIONS}")
        if self.endpoint not in (None, *ENDPOINTS):
            raise ValueError(f"fault endpoint {self.endpoint!r}: want one of {ENDPOINTS}")
        if self.endpoint is not None and not _fits(self.kind, self.endpoint):
            raise ValueError(f"fault kind {self.kind!r} does not act on endpoint {self.endpoint!r}")

    @property
    def status(self) -> int | None:
        """The HTTP status of a status fault (an error or a redirect); None for the others."""
        return int(self.kind) if self.kind.isdigit() else None

    def applies(self, endpoint: str, path: str, page: int) -> bool:
        return ((self.times is None or self.fired < self.times)
                and self.endpoint in (None, endpoint)
                and _fits(self.kind, endpoint)
                and (self.path is None or re.search(self.path, path, re.IGNORECASE) is not None)
                and self.page in (None, page))


def _mutated_items(kind: str, items: list) -> list:
    """The page's items with the first one (or all) no longer shaped as the REST reference documents."""
    if kind == "empty":
        return []
    if kind == "string_items":
        return ["a"]
    if not items:
        return items
    first = items[0]
    if kind == "null_item":
        return [None, *items[1:]]
    first = dict(first) if isinstance(first, dict) else {}
    if kind == "item_without_id":
        first.pop("id", None)
    elif kind == "item_id_not_string":
        first["id"] = 12345
    elif kind == "item_without_type":
        first.pop("type", None)
    elif kind == "item_name_object":
        first["name"] = {"value": first.get("name")}
    elif kind == "item_tags_string":
        first["tags"] = f"{SERVICE_NAME_TAG}=web;{SERVICE_PORT_TAG}=8080"
    elif kind == "item_properties_string" and "properties" in first:
        first["properties"] = "a string"
    return [first, *items[1:]]


# === HTTP plumbing ===
class _Reply(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    trickle: float | None = None   # seconds between the body's bytes ("trickle"); None: all at once


def _json_reply(document: dict, status: int = 200, headers: tuple = ()) -> _Reply:
    return _Reply(status, json.dumps(document).encode(), headers)


def _arm_error(status: int, code: str, message: str, headers: tuple = (), target: str | None = None,
               details: list | None = None) -> _Reply:
    error = {"code": code, "message": message, **({"target": target} if target else {}),
             **({"details": details} if details else {})}
    return _Reply(status, json.dumps({"error": error}).encode(), headers)


def _fault_reply(fault: Fault, location: str) -> _Reply:
    if fault.kind == "bad_json":
        return _Reply(200, b'{"value": [{"name": "truncated", "id": "/subscr')
    if fault.kind == "no_value":
        return _Reply(200, b"{}")
    if fault.kind == "bad_item":
        return _Reply(200, json.dumps({"value": [{
            "id": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/odd",
            "name": "odd", "properties": "not an object"}, "not an object"]}).encode())
    status = HTTPStatus(fault.status)
    if status in REDIRECT_STATUSES:
        return _Reply(status, b"", (("Location", fault.location or location),))
    headers = ((("Retry-After", str(fault.retry_after)),)
               if status in (429, 503) and fault.retry_after is not None else ())
    return _arm_error(status, status.phrase.replace(" ", ""), f"Injected fault: {status.phrase}.", headers)


class RequestRecord(NamedTuple):
    method: str
    path: str                 # unquoted, as sent
    query: dict[str, str]
    endpoint: str | None      # a counter key; None for unknown paths
    host: str = ""            # the Host header: which origin the client meant


class ForeignRequest(NamedTuple):
    """A request that reached one of the fake's other origins (`foreign_url`, `other_port_url`)."""
    origin: str               # the listener's URL
    method: str
    path: str                 # as sent, query included
    headers: dict[str, str]   # every header as sent (Authorization included, if a client sent it)


class TokenRequest(NamedTuple):
    """A request for a token, as the fake's token endpoints saw it."""
    endpoint: str             # "token" (managed identity) or "aad_token" (Microsoft Entra ID)
    authority: str            # https:// and the Host header: the login authority the client used
    tenant: str | None        # the tenant in the path (aad_token)
    grant_type: str | None
    client_id: str | None
    audience: str | None      # the resource asked for (scope without ".default", or `resource`)
    status: int               # what the fake answered
    credential: str | None    # what was presented: "secret", "assertion", "managed_identity", None


class _TlsServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that does each TLS handshake in its connection's thread; `serve(handler)`
    answers each request."""
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, serve: Callable[[_Handler], None]):
        self.context, self.serve = context, serve
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address):
        # Wrapping the listening socket instead would handshake in the accept loop, where one stalled
        # client holds up every other.
        request.settimeout(IDLE_TIMEOUT)
        # http.server writes headers and body separately; with Nagle's algorithm the body then waits
        # for the client's delayed ACK, 40 ms a page.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.context.wrap_socket(request, server_side=True) as tls:
            self.RequestHandlerClass(tls, client_address, self)

    def handle_error(self, request, client_address):
        # Clients that hang up (read timeouts, refused certificates) are part of the tests.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the SDK's connection pool expects
    server_version = "FakeARM"

    def do_GET(self):
        self.server.serve(self)

    do_POST = do_GET

    def log_message(self, format, *args):
        pass   # FakeArm.requests is the log


# === The fake ===
class FakeArm:
    """The HTTPS fake of Resource Manager on 127.0.0.1; see the module docstring.

    `estate` may be mutated (through its methods) or replaced at any time. `token` is what every ARM
    request must carry; `identity_header` what the managed-identity endpoint wants; `tenant_id`,
    `client_id` and `client_secret` or `federated_token` what the Entra ID token endpoint wants. `url`,
    `foreign_url`, `other_port_url`, `ca_pem_path` and `env()` exist once started. Every option is a
    plain attribute, read at each request.
    """

    def __init__(self, estate: Estate | None = None, *, page_size: int = 100, port: int = 0,
                 state_dir: str | None = None):
        self.estate = estate if estate is not None else Estate()
        self.page_size = page_size
        # None: the principal reads the whole subscription. A set of resource-group names: its Reader role
        # covers only those groups, so subscription-wide lists and other groups answer 403.
        self.reader_groups: set[str] | None = None
        # What GET /metadata/endpoints names as token audiences (those of Azure's public cloud by default).
        self.cloud_audiences = ["https://management.core.windows.net/", "https://management.azure.com/"]
        # Resource Graph's per-user quota: `graph_quota` queries per `graph_window` seconds (Azure: 15 per 5 s).
        self.graph_quota, self.graph_window = 15, 5.0
        self._graph_window_start, self._graph_used = -math.inf, 0
        # The types ComputeResources holds in this cloud: None, all the public cloud's; a set (e.g.
        # AZURE_CHINA_COMPUTE_TYPES), only those: rows of the others are absent (a query naming them gets none).
        self.graph_compute_types: set[str] | frozenset[str] | None = None
        self.graph_seed = None            # the seed of unsorted Resource Graph rows' order (None: os entropy)
        # Resource Manager documents no order of a listing's items either: with a seed, every listing
        # (taken at its first page) comes in a random order drawn from it; None keeps the estate's order.
        self.list_seed = None
        self._graph_cache: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        # Seconds, for every quota and bucket: time.monotonic unless a test drives its own clock.
        self.clock: Callable[[], float] = time.monotonic
        # Resource Manager's read bucket per subscription and principal, (size, refill per second); the
        # one of all principals together is 15 times it. Compute's buckets per subscription and region,
        # {label: (size, refill per minute)}, for the labels of COMPUTE_POLICIES (a label left out is
        # neither counted nor reported). All of them UNTHROTTLED until a test (or documented_limits())
        # sets them; a changed setting starts its buckets full.
        self.subscription_reads: tuple[float, float] = UNTHROTTLED
        self.compute_buckets: dict[str, tuple[float, float]] = dict.fromkeys(COMPUTE_POLICIES, UNTHROTTLED)
        self.arm_region = DEFAULT_LOCATION   # the region of subscription-wide and group-wide Compute lists
        self._buckets: dict[tuple, tuple[tuple, _Bucket]] = {}
        self.token = secrets.token_urlsafe(24)
        self.identity_header = secrets.token_urlsafe(16)
        self.tenant_id = str(uuid.uuid4())        # the only tenant Entra ID knows here
        self.client_id = str(uuid.uuid4())
        self.client_secret = secrets.token_urlsafe(16)
        # What a workload identity's AZURE_FEDERATED_TOKEN_FILE holds (a service account token's shape).
        self.federated_token = _federated_token()
        # The api-versions GET /metadata/endpoints answers: Azure's public cloud both; Azure Stack Hub
        # documents 2015-01-01 only, so ("2015-01-01",) models it.
        self.metadata_versions: tuple[str, ...] = ("2015-01-01", "2022-09-01")
        self._other_tokens: dict[str, str] = {}   # tokens issued for other audiences: token -> audience
        self._token_log: list[TokenRequest] = []
        self._port, self._state_dir = port, state_dir
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._log: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._cursors: collections.OrderedDict[str, Listing] = collections.OrderedDict()
        self._cursor_ids = itertools.count()
        self._lookup: tuple[Estate, tuple, _Lookup] | None = None   # (estate, its stamp, lookup)
        self._stopping = threading.Event()
        self._server: _TlsServer | None = None
        self._thread: threading.Thread | None = None
        self._foreign: list[_TlsServer] = []
        self._foreign_log: list[ForeignRequest] = []
        self._owns_state_dir = False

    @property
    def list_seed(self) -> int | None:
        return self._list_seed

    @list_seed.setter
    def list_seed(self, seed: int | None) -> None:
        self._list_seed = seed
        self._list_rng = random.Random(seed)

    @property
    def graph_seed(self) -> int | None:
        return self._graph_seed

    @graph_seed.setter
    def graph_seed(self, seed: int | None) -> None:
        """Setting it (again) restarts the sequence of orders unsorted Resource Graph queries are served in."""
        self._graph_seed = seed
        self._graph_rng = random.Random(seed)

    # --- lifecycle ---
    def start(self) -> FakeArm:
        """Write the CA certificate, bind 127.0.0.1 and serve in a daemon thread; open the other origins."""
        ca = trustme.CA()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost", "127.0.0.2").configure_cert(context)
        self._owns_state_dir = self._state_dir is None
        state_dir = Path(self._state_dir or tempfile.mkdtemp(prefix="fake-arm-")).absolute()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.ca_pem_path = str(state_dir / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_pem_path)
        self._server = _TlsServer(("127.0.0.1", self._port), context, self._serve)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-arm", daemon=True)
        self._thread.start()
        # Two other origins, trusted through the same CA, that answer every request with an empty page
        # and record it: another host and port (127.0.0.2, all of 127/8 is loopback on Linux; 127.0.0.1
        # where it cannot be bound), and the same host on another port.
        self.foreign_url = self._listen_foreign(context, "127.0.0.2")
        self.other_port_url = self._listen_foreign(context, "127.0.0.1")
        return self

    def _listen_foreign(self, context: ssl.SSLContext, host: str) -> str:
        try:
            server = _TlsServer((host, 0), context, None)
        except OSError:
            host, server = "127.0.0.1", _TlsServer(("127.0.0.1", 0), context, None)
        origin = f"https://{host}:{server.server_address[1]}"
        server.serve = partial(self._serve_foreign, origin)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-arm-foreign",
                         daemon=True).start()
        self._foreign.append(server)
        return origin

    def stop(self) -> None:
        """Stop serving: requests in flight (also slow ones) and later ones get the connection closed."""
        if self._server is None:
            return
        self._stopping.set()
        servers = (self._server, *self._foreign)
        stoppers = [threading.Thread(target=server.shutdown) for server in servers]   # each waits a poll
        for stopper in stoppers:
            stopper.start()
        for stopper, server in zip(stoppers, servers):
            stopper.join()
            server.server_close()
        self._thread.join()
        self._server, self._foreign = None, []
        if self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> FakeArm:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for the SDK: trust the CA, take tokens from the fake's managed identity."""
        return {"REQUESTS_CA_BUNDLE": self.ca_pem_path, "SSL_CERT_FILE": self.ca_pem_path,
                "IDENTITY_ENDPOINT": f"{self.url}/msi/token", "IDENTITY_HEADER": self.identity_header,
                "FAKE_ARM_URL": self.url}

    def env_workload_identity(self, token_file: str | os.PathLike) -> dict[str, str]:
        """Writes `federated_token` to `token_file`; the variables azure-identity's WorkloadIdentityCredential
        (and DefaultAzureCredential) read, with the fake as the login authority."""
        Path(token_file).write_text(self.federated_token)
        return {"AZURE_TENANT_ID": self.tenant_id, "AZURE_CLIENT_ID": self.client_id,
                "AZURE_FEDERATED_TOKEN_FILE": str(token_file), "AZURE_AUTHORITY_HOST": self.url}

    def env_client_secret(self) -> dict[str, str]:
        """A service principal's variables (EnvironmentCredential's), without any authority host: where the
        token is asked for is the client's choice, and `token_requests` shows it."""
        return {"AZURE_TENANT_ID": self.tenant_id, "AZURE_CLIENT_ID": self.client_id,
                "AZURE_CLIENT_SECRET": self.client_secret}

    def documented_limits(self) -> None:
        """Resource Manager's and Compute's documented numbers instead of UNTHROTTLED (see the constants)."""
        self.subscription_reads = DOCUMENTED_SUBSCRIPTION_READS
        self.compute_buckets = {**self.compute_buckets, **DOCUMENTED_COMPUTE_BUCKETS}

    # --- observation and faults ---
    @property
    def counts(self) -> dict[str, int]:
        """Requests per endpoint (every key of ENDPOINTS, zero included) and `total`."""
        with self._lock:
            return {**dict.fromkeys(ENDPOINTS, 0), "total": 0, **dict.fromkeys(THROTTLE_COUNTERS, 0), **self._counts}

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    @property
    def foreign_requests(self) -> list[ForeignRequest]:
        """Every request that reached `foreign_url` or `other_port_url`, with its headers."""
        with self._lock:
            return list(self._foreign_log)

    @property
    def token_requests(self) -> list[TokenRequest]:
        """Every request of the token endpoints (managed identity and Entra ID), with where it came to."""
        with self._lock:
            return list(self._token_log)

    def reset_counts(self) -> None:
        """Forget counts and the request logs (requests, foreign_requests, token_requests)."""
        with self._lock:
            self._counts.clear()
            self._log.clear()
            self._foreign_log.clear()
            self._token_log.clear()

    def add_fault(self, kind: str, *, endpoint: str | None = None, path: str | None = None,
                  page: int | None = None, times: int | None = 1, retry_after: int | None = 1,
                  delay: float = 1.0, location: str | None = None) -> Fault:
        """Inject a fault; faults are tried in the order added, and one fires per request at most.

        `retry_after`: the Retry-After of a 429 or 503 (None: none sent). `delay`: seconds of "slow", and
        between the bytes of "trickle". `location`: where a redirect points (default: the same path and
        query at `foreign_url`)."""
        fault = Fault(kind, endpoint, path, page, times, retry_after, delay, location)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # --- serving ---
    def _serve(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        params = {key.lower(): value for key, value in query.items()}
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if handler.command == "GET" and path == COUNTS_PATH:
            self._send(handler, _json_reply(self.counts))
            return
        endpoint, groups = _route(handler.command, path, params)
        with self._lock:
            self._counts["total"] += 1
            if endpoint is not None:
                self._counts[endpoint] += 1
            self._log.append(RequestRecord(handler.command, path, query, endpoint, handler.headers.get("Host", "")))
        if endpoint is None:
            reply = _arm_error(404, "NotFound", f"The fake has no {handler.command} {path}.")
        elif endpoint in _IDENTITY_ENDPOINTS:
            fault = self._fault(endpoint, path, 1, handler.path)
            reply = fault if isinstance(fault, _Reply) else self._mutate(
                fault, self._identity(endpoint, groups, handler, params, body))
        elif endpoint == "graph":
            reply = self._unauthorized(handler, params) or self._graph(path, params, body, handler.path)
        else:
            reply = self._arm(endpoint, groups, handler, split.path, query, params)
        self._send(handler, reply)

    def _serve_foreign(self, origin: str, handler: _Handler) -> None:
        """Another origin: record the request with its headers, answer an empty page (a listing's for a
        GET, a Resource Graph answer's for a POST)."""
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            self._foreign_log.append(ForeignRequest(origin, handler.command, handler.path, dict(handler.headers)))
        empty = ({"value": []} if handler.command == "GET" else
                 {"totalRecords": 0, "count": 0, "data": [], "facets": [], "resultTruncated": "false"})
        self._send(handler, _json_reply(empty))

    def _send(self, handler: _Handler, reply: _Reply) -> None:
        if self._stopping.is_set():
            handler.close_connection = True   # a stopped fake answers nothing
            return
        handler.send_response(reply.status)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        handler.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            handler.send_header(name, value)
        handler.end_headers()
        if reply.trickle is None:
            handler.wfile.write(reply.body)
            return
        # One byte, then a pause: every read the client makes succeeds, the whole body takes
        # len(body) * trickle seconds. stop() ends it (the connection is closed, the body unfinished).
        handler.close_connection = True
        for offset in range(len(reply.body)):
            handler.wfile.write(reply.body[offset:offset + 1])
            handler.wfile.flush()
            if self._stopping.wait(reply.trickle):
                return

    def _fault(self, endpoint: str, path: str, page: int, here: str) -> _Reply | Fault | None:
        """Fire the first matching fault: a whole reply; the fault, for one that changes the real answer;
        or None (none matched, or "slow", after its delay). `here`: the request's path and query."""
        with self._lock:
            fault = next((f for f in self._faults if f.applies(endpoint, path, page)), None)
            if fault is None:
                return None
            fault.fired += 1
        if fault.kind == "slow":
            self._stopping.wait(fault.delay)
            return None
        if fault.status is not None or fault.kind in REPLY_KINDS:
            return _fault_reply(fault, f"{self.foreign_url}{here}")
        return fault

    def _mutate(self, fault: Fault | None, reply: _Reply, document: dict | None = None, key: str = "value",
                table: tuple[str, ...] | None = None, **links: str) -> _Reply:
        """The answer: `document` (the page, when there is one) as `reply`'s body, changed by `fault`.
        `table`: a Graph answer's columns when it was asked for in resultFormat "table" (its `data`
        becomes a Table once the fault has changed its rows). `links`: for link faults, `here` (this
        page's path and query) and `first` (the first page's); for "repeat_token",
        `repeat_token`."""
        kind = fault.kind if fault is not None else None
        headers = reply.headers
        if document is not None:
            if kind in ITEM_KINDS:
                document[key] = _mutated_items(kind, document[key])
                if kind == "empty":
                    document.pop("nextLink", None)
                    document.pop("$skipToken", None)
                if key == "data":
                    document["count"] = len(document["data"])
                    if kind == "empty":
                        document["totalRecords"] = 0
            elif kind in LINK_KINDS:
                here = links["here"]
                following = urlsplit(document.get("nextLink") or here)
                following = following.path + (f"?{following.query}" if following.query else "")
                document["nextLink"] = {
                    "self_link": f"{self.url}{here}", "loop_link": f"{self.url}{links['first']}",
                    "foreign_link": f"{self.foreign_url}{following}",
                    "other_port_link": f"{self.other_port_url}{following}",
                    "http_link": f"http://{urlsplit(self.url).netloc}{following}"}[kind]
            elif kind == "repeat_token":
                document["$skipToken"] = links["repeat_token"]
            elif kind == "total_mismatch":
                document["totalRecords"] += 1
            elif kind == "quota_not_digits":
                # "¹" is str.isdigit() and not int(): superscript one, not an ASCII digit
                headers = tuple((n, "¹" if n == "x-ms-user-quota-remaining" else v) for n, v in headers)
            if table is not None:
                document[key] = graph_table(document[key], table)
            reply = reply._replace(body=json.dumps(document).encode())
        return reply._replace(headers=headers, trickle=fault.delay if kind == "trickle" else None)


    def _identity(self, endpoint: str, groups: dict, handler: _Handler, params: dict, body: bytes) -> _Reply:
        if endpoint == "metadata":
            return self._metadata(params)
        authority = f"https://{handler.headers.get('Host', '')}"
        if endpoint == "token":
            reply, audience = self._managed_identity(handler, params)
            self._record_token(TokenRequest("token", authority, None, None, None, audience, reply.status,
                                            "managed_identity"))
            return reply
        tenant = groups["tenant"]
        if tenant != self.tenant_id:
            reply = _entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to make sure "
                                 "you have the correct tenant ID and are signing into the correct cloud.", authority)
        elif endpoint == "openid":
            tenant_url = f"{authority}/{tenant}"
            return _json_reply({"issuer": f"{tenant_url}/v2.0",
                                "authorization_endpoint": f"{tenant_url}/oauth2/v2.0/authorize",
                                "token_endpoint": f"{tenant_url}/oauth2/v2.0/token"})
        else:
            reply = None
        form = dict(parse_qsl(body.decode(errors="replace"))) if endpoint == "aad_token" else {}
        scopes = [s for s in form.get("scope", "").split() if s.endswith("/.default")]
        audience = scopes[0].removesuffix(".default") if scopes else None
        if reply is None:
            reply = self._entra_token(form, audience, authority)
        if endpoint == "aad_token":
            presented = ("assertion" if "client_assertion" in form else "secret" if "client_secret" in form
                         else None)
            self._record_token(TokenRequest(endpoint, authority, tenant, form.get("grant_type"),
                                            form.get("client_id"), audience, reply.status, presented))
        return reply

    def _managed_identity(self, handler: _Handler, params: dict) -> tuple[_Reply, str | None]:
        """App Service's managed identity endpoint (api-version 2019-08-01)."""
        if handler.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            return _arm_error(401, "Unauthorized", "The X-IDENTITY-HEADER header is missing or wrong."), None
        resource = params.get("resource")
        if not resource:
            return _arm_error(400, "BadRequest", "The resource query parameter is required."), None
        return _json_reply({"access_token": self._token_for(resource), "resource": resource,
                            "expires_on": str(int(time.time()) + TOKEN_LIFETIME), "token_type": "Bearer"}), resource

    def _entra_token(self, form: dict, audience: str | None, authority: str) -> _Reply:
        """POST {authority}/{tenant}/oauth2/v2.0/token, client credentials as Microsoft Entra ID takes them:
        a client secret, or a client assertion (workload identity federation: the federated token itself
        as a jwt-bearer assertion). Its refusals: AADSTS codes as Entra ID words them."""
        if form.get("grant_type") != "client_credentials":
            return _entra_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant "
                                f"type '{form.get('grant_type')}'.", authority)
        if audience is None:
            return _entra_error(400, "invalid_scope", 1002012, f"The provided value for scope "
                                f"{form.get('scope', '')} is not valid. Client credential flows must have a scope "
                                "value with /.default suffixed to the resource identifier (application ID URI).",
                                authority)
        if form.get("client_id") != self.client_id:
            return _entra_error(400, "unauthorized_client", 700016, f"Application with identifier "
                                f"'{form.get('client_id')}' was not found in the directory '{self.tenant_id}'.",
                                authority)
        if "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != JWT_BEARER:
                return _entra_error(400, "invalid_request", 700002, "Unsupported client_assertion_type "
                                    f"'{form.get('client_assertion_type')}'.", authority)
            if form.get("client_assertion") != self.federated_token:
                # Azure/azure-workload-identity#340, external-secrets/external-secrets#2783
                return _entra_error(401, "invalid_client", 70021, "No matching federated identity record found "
                                    "for presented assertion.", authority)
        elif "client_secret" not in form:
            return _entra_error(401, "invalid_client", 7000218, "The request body must contain the following "
                                "parameter: 'client_assertion' or 'client_secret'.", authority)
        elif form["client_secret"] != self.client_secret:
            return _entra_error(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret "
                                "being sent in the request is the client secret value, not the client secret ID.",
                                authority)
        return _json_reply({"token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "ext_expires_in": TOKEN_LIFETIME,
                            "access_token": self._token_for(audience)})

    def _token_for(self, audience: str) -> str:
        """`token` for one of the cloud's audiences; for any other resource, a token of its own, which
        Resource Manager refuses (InvalidAuthenticationTokenAudience), as Entra ID issues tokens for any
        resource it knows and Resource Manager takes only its own audiences."""
        wanted = audience.rstrip("/")
        if wanted in {a.rstrip("/") for a in self.cloud_audiences}:
            return self.token
        with self._lock:
            for token, known in self._other_tokens.items():
                if known == wanted:
                    return token
            token = secrets.token_urlsafe(24)
            self._other_tokens[token] = wanted
            return token

    def _record_token(self, record: TokenRequest) -> None:
        with self._lock:
            self._token_log.append(record)

    def _metadata(self, params: dict) -> _Reply:
        """The cloud's endpoints document, naming the fake as Resource Manager and login endpoint, with
        `cloud_audiences`, in the api-versions of `metadata_versions`: 2022-09-01 as management.azure.com
        serves it (one object), 2015-01-01 in its older shape (galleryEndpoint, graphEndpoint,
        portalEndpoint, authentication {loginEndpoint, audiences}), the only one Azure Stack Hub documents
        ("Make API requests to Azure Stack Hub")."""
        if "api-version" not in params:
            return _arm_error(400, "MissingApiVersionParameter",
                              "The api-version query parameter (?api-version=) is required for all requests.")
        version = params["api-version"]
        if version not in self.metadata_versions:
            return _arm_error(400, "InvalidApiVersionParameter", f"The api-version '{version}' is invalid. The "
                              f"supported versions are '{','.join(self.metadata_versions)}'.")
        if version == "2015-01-01":
            return _json_reply({"galleryEndpoint": f"{self.url}/", "graphEndpoint": f"{self.url}/",
                                "portalEndpoint": f"{self.url}/",
                                "authentication": {"loginEndpoint": f"{self.url}/",
                                                   "audiences": list(self.cloud_audiences)}})
        return _json_reply({
            "portal": f"{self.url}/", "name": "FakeCloud", "resourceManager": f"{self.url}/",
            "authentication": {"loginEndpoint": f"{self.url}/", "audiences": list(self.cloud_audiences),
                               "tenant": "common", "identityProvider": "AAD"},
            "graph": f"{self.url}/", "graphAudience": f"{self.url}/", "media": f"{self.url}/",
            "batch": f"{self.url}/", "sqlManagement": f"{self.url}/", "vmImageAliasDoc": "",
            "activeDirectoryDataLake": "", "microsoftGraphResourceId": f"{self.url}/",
            "suffixes": {"storage": "core.fake.example", "keyVaultDns": "vault.fake.example",
                         "sqlServerHostname": "database.fake.example", "acrLoginServer": "azurecr.fake.example"}})

    def _unauthorized(self, handler: _Handler, params: dict) -> _Reply | None:
        authorization = handler.headers.get("Authorization")
        if authorization is None:
            return _arm_error(401, "AuthenticationFailed",
                              "Authentication failed. The 'Authorization' header is missing.")
        if authorization != f"Bearer {self.token}":
            audience = self._other_tokens.get(authorization.removeprefix("Bearer "))
            if audience is not None:
                allowed = ",".join(f"'{a}'" for a in self.cloud_audiences)
                return _arm_error(401, "InvalidAuthenticationTokenAudience", "The access token has been obtained "
                                  f"for wrong audience or resource '{audience}'. It should exactly match with one "
                                  f"of the allowed audiences {allowed}.")
            return _arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if "api-version" not in params:
            return _arm_error(400, "MissingApiVersionParameter",
                              "The api-version query parameter (?api-version=) is required for all requests.")
        return None

    def _graph(self, path: str, params: dict, body: bytes, here: str) -> _Reply:
        """POST /providers/Microsoft.ResourceGraph/resources: a query over the estate, paged by `$skipToken`,
        with the per-user quota headers (a 429 past `graph_quota` queries in `graph_window` seconds).

        Every page request runs the query again, as Resource Graph does ("Guidance for pagination": a
        resource deleted between pages shifts the rest, one created repeats one), over what the estate
        holds then: a continuation page reuses the evaluation of the same query while the estate has not
        changed through its methods. Unsorted rows come in a new random order every time."""
        if params["api-version"] not in GRAPH_SCHEMA["api_versions"]:
            return _arm_error(400, "InvalidApiVersionParameter",
                              f"The api-version '{params['api-version']}' is invalid. The supported versions "
                              f"are '{', '.join(GRAPH_SCHEMA['api_versions'])}'.")
        throttled, quota_headers = self._graph_quota()
        if throttled:
            with self._lock:
                self._counts["graph_throttled"] += 1
            return _Reply(429, json.dumps({"error": {
                "code": "RateLimiting", "message": _support_message(), "details": [{
                    "code": "RateLimiting", "message": "Client application has been throttled and should not "
                    "attempt to repeat the request until an amount of time has elapsed. Please see "
                    "https://aka.ms/resourcegraph-throttling for help."}]}}).encode(), quota_headers)
        try:
            request = _graph_request(json.loads(body or b"null"))
            query = parse_graph_query(request["query"], known_types_only=False)
        except (ValueError, KeyError, TypeError) as exc:
            return _Reply(400, json.dumps({"error": {"code": "BadRequest", "message": _support_message(),
                          "details": [{"code": "InvalidQuery", "message": str(exc)}]}}).encode(), quota_headers)
        options = request.get("options") or {}
        subscriptions = frozenset(sub.lower() for sub in request["subscriptions"])
        query_key = hashlib.sha256(json.dumps([request["query"], sorted(subscriptions)]).encode()).hexdigest()[:16]
        try:
            offset = _read_graph_token(options.get("$skipToken"), query_key)
        except ValueError:
            return _arm_error(400, "InvalidSkipToken", "The $skipToken is not one this server issued for "
                              "this query.", quota_headers)
        top = int(options.get("$top") or 100)
        fault = self._fault("graph", path, offset // top + 1, here)
        if isinstance(fault, _Reply):
            return fault
        readable = None if self.reader_groups is None else frozenset(g.lower() for g in self.reader_groups)
        compute_types = (None if self.graph_compute_types is None
                         else frozenset(t.lower() for t in self.graph_compute_types))
        estate = self.estate
        with estate.lock:
            key = (query_key, readable, compute_types, id(estate), _lookup_stamp(estate))
            with self._lock:
                candidates = self._graph_cache.get(key) if offset else None
            if candidates is None:
                candidates = graph_candidates(estate, query, subscriptions, readable, compute_types)
                with self._lock:
                    self._graph_cache[key] = candidates
                    while len(self._graph_cache) > MAX_CURSORS:
                        self._graph_cache.popitem(last=False)
        with self._lock:
            rows = order_graph_rows(candidates, query, self._graph_rng)
        page = rows[offset:offset + top]
        more = offset + top < len(rows)
        # Resource Graph pages only queries that return `id`; others are cut at $top.
        pageable = "id" in dict(query.columns)
        document = {"totalRecords": len(rows), "count": len(page), "data": page, "facets": [],
                    "resultTruncated": "true" if more and not pageable else "false"}
        if more and pageable:
            document["$skipToken"] = _write_graph_token(query_key, offset + top)
        return self._mutate(fault, _Reply(200, b"", quota_headers), document, "data",
                            _table_columns(query, options),
                            repeat_token=_write_graph_token(query_key, top))

    def _graph_quota(self) -> tuple[bool, tuple]:
        """(throttled?, the x-ms-user-quota-* headers) for one more query in the current window.

        "Guidance for throttled requests in Azure Resource Graph": a quota per user and time window ("at
        most 15 queries within every 5-second window"), told in every response by x-ms-user-quota-remaining
        (int) and x-ms-user-quota-resets-after (hh:mm:ss). Microsoft documents no Retry-After for it, and
        the fake sends none."""
        now = self.clock()
        with self._lock:
            if now - self._graph_window_start >= self.graph_window:
                self._graph_window_start, self._graph_used = now, 0
            throttled = self._graph_used >= self.graph_quota
            if not throttled:
                self._graph_used += 1
            left = math.ceil(max(0.0, self._graph_window_start + self.graph_window - now))
            remaining = self.graph_quota - self._graph_used
        resets = f"{left // 3600:02d}:{left % 3600 // 60:02d}:{left % 60:02d}"
        return throttled, (("x-ms-user-quota-remaining", str(remaining)), ("x-ms-user-quota-resets-after", resets))

    def _arm(self, endpoint: str, groups: dict, handler: _Handler, raw_path: str, query: dict,
             params: dict) -> _Reply:
        """A Resource Manager GET: authentication, Resource Manager's read bucket, the role, Compute's
        buckets, then the answer; every answer past authentication with the buckets' headers."""
        unauthorized = self._unauthorized(handler, params)
        if unauthorized is not None:
            return unauthorized
        now = self.clock()
        throttled, headers = self._subscription_reads(groups["sub"], now)
        reply = (throttled or self._forbidden(endpoint, groups)
                 or self._compute_throttled(endpoint, groups, now, headers)
                 or self._arm_answer(endpoint, groups, handler, raw_path, query, params))
        return reply._replace(headers=(*reply.headers, *headers))

    def _subscription_reads(self, subscription: str, now: float) -> tuple[_Reply | None, list]:
        """Draw one read from the principal's and the subscription's buckets: (a 429 if either is empty, the
        x-ms-ratelimit-remaining-subscription-* headers)."""
        size, rate = self.subscription_reads
        with self._lock:
            mine = self._bucket(("reads", subscription.lower(), FAKE_PRINCIPAL), (size, rate), now)
            everyone = self._bucket(("global-reads", subscription.lower()),
                                    (size * GLOBAL_READS_FACTOR, rate * GLOBAL_READS_FACTOR), now)
            granted = mine.take(now, debt=False) and everyone.take(now, debt=False)
            wait = max(mine.wait() if mine.tokens < 1 else 0, everyone.wait() if everyone.tokens < 1 else 0)
            headers = [("x-ms-ratelimit-remaining-subscription-reads", str(mine.remaining)),
                       ("x-ms-ratelimit-remaining-subscription-global-reads", str(everyone.remaining))]
            if not granted:
                self._counts["arm_throttled"] += 1
        if granted:
            return None, headers
        return _arm_error(429, "SubscriptionRequestsThrottled",
                          f"Number of 'read' requests for subscription '{subscription}' actor '{FAKE_PRINCIPAL}' "
                          f"exceeded. Please try again after '{wait}' seconds after additional tokens are "
                          "available. Refer to https://aka.ms/arm-throttling for additional information.",
                          (("Retry-After", str(wait)),)), headers

    def _compute_throttled(self, endpoint: str, groups: dict, now: float, headers: list) -> _Reply | None:
        """Draw one call from each Compute bucket that counts `endpoint` (in its subscription and region):
        the x-ms-ratelimit-remaining-resource header goes into `headers`; a 429 OperationNotAllowed (the
        troubleshooting article's example) if one is empty."""
        labels = [label for label, endpoints in COMPUTE_POLICIES.items()
                  if endpoint in endpoints and label in self.compute_buckets]
        if not labels:
            return None
        region = self._region(endpoint, groups).lower()
        with self._lock:
            buckets = [(label, self._bucket(("compute", label, groups["sub"].lower(), region),
                                            self.compute_buckets[label], now, per=60.0)) for label in labels]
            empty = [(label, bucket) for label, bucket in buckets if not bucket.take(now, debt=True)]
            headers.append(("x-ms-ratelimit-remaining-resource",
                            ",".join(f"Microsoft.Compute/{label};{bucket.remaining}" for label, bucket in buckets)))
            if not empty:
                return None
            self._counts["compute_throttled"] += 1
            label, bucket = empty[0]
            wait = max(b.wait() for _, b in empty)
            allowed, measured = int(bucket.size), int(bucket.size) + bucket.refused
        start = time.time()
        detail = json.dumps({"operationGroup": label, "startTime": _iso(start), "endTime": _iso(start + wait),
                             "allowedRequestCount": allowed, "measuredRequestCount": measured})
        return _arm_error(429, "OperationNotAllowed", "The server rejected the request because too many requests "
                          "have been received for this subscription.", (("Retry-After", str(wait)),),
                          details=[{"code": "TooManyRequests", "target": label, "message": detail}])

    def _bucket(self, key: tuple, setting: tuple[float, float], now: float, per: float = 1.0) -> _Bucket:
        """The bucket of `key` (under _lock): full at first, and again whenever its setting changes."""
        known = self._buckets.get(key)
        if known is None or known[0] != tuple(setting):
            known = (tuple(setting), _Bucket(float(setting[0]), float(setting[1]) / per, now))
            self._buckets[key] = known
        return known[1]

    def _region(self, endpoint: str, groups: dict) -> str:
        """Where Compute counts a request: the scale set's or VM's location for requests about one,
        `arm_region` for the lists of a subscription or resource group."""
        estate = self.estate
        with estate.lock:
            if "vmss" in groups:
                for ss in estate.scale_sets:
                    if ss.name.lower() == groups["vmss"].lower() and _in_scope(ss, groups["sub"], groups.get("rg")):
                        return ss.location
            elif "vm" in groups:
                for p in estate.machines():
                    if (p.ss is None or not p.uniform) and p.inst.name.lower() == groups["vm"].lower() \
                            and _in_scope(p.home, groups["sub"], groups.get("rg")):
                        return p.home.location
        return self.arm_region

    def _arm_answer(self, endpoint: str, groups: dict, handler: _Handler, raw_path: str, query: dict,
                    params: dict) -> _Reply:
        refused = _refused_by_documentation(endpoint, params)
        if refused is not None:
            return refused
        if endpoint in _SINGLE_ENDPOINTS:
            fault = self._fault(endpoint, unquote(raw_path), 1, handler.path)
            if isinstance(fault, _Reply):
                return fault
            return self._mutate(fault, self._get_one(endpoint, groups, unquote(raw_path)))
        try:
            cursor, offset = _read_skiptoken(params.get("$skiptoken"))
        except ValueError:
            return _arm_error(400, "InvalidSkipToken", "The $skiptoken is not one this server issued.")
        page_size = self.page_size
        fault = self._fault(endpoint, unquote(raw_path), offset // page_size + 1, handler.path)
        if isinstance(fault, _Reply):
            return fault
        estate = self.estate
        with estate.lock:
            listing = self._recall(cursor)
            if listing is None:
                listing = _listing(estate, endpoint, groups, params)
                if listing is None:
                    return _arm_error(404, "ResourceNotFound", _not_found(endpoint, groups))
                if self.list_seed is not None:
                    with self._lock:
                        listing = (self._list_rng.sample(listing[0], len(listing[0])), listing[1])
            items, render = listing
            document = {"value": [render(item) for item in items[offset:offset + page_size]]}
        pairs = [(k, v) for k, v in query.items() if k.lower() != "$skiptoken"]
        if offset + page_size < len(items):
            cursor = cursor or self._remember(listing)
            following = [*pairs, ("$skiptoken", _write_skiptoken(cursor, offset + page_size))]
            document["nextLink"] = f"{self.url}{raw_path}?{urlencode(following, safe='$')}"
        elif cursor:
            with self._lock:
                self._cursors.pop(cursor, None)
        return self._mutate(fault, _Reply(200, b""), document, "value", here=handler.path,
                            first=f"{raw_path}?{urlencode(pairs, safe='$')}")

    def _forbidden(self, endpoint: str, groups: dict) -> _Reply | None:
        """403 AuthorizationFailed where the principal's Reader role does not reach (`reader_groups`)."""
        readable = self.reader_groups
        if readable is None:
            return None
        scope = f"/subscriptions/{groups['sub']}"
        if "rg" not in groups:
            return _authorization_failed(endpoint, scope)
        if groups["rg"].lower() not in {g.lower() for g in readable}:
            return _authorization_failed(endpoint, f"{scope}/resourceGroups/{groups['rg']}")
        return None

    def _get_one(self, endpoint: str, groups: dict, path: str) -> _Reply:
        estate = self.estate
        with estate.lock:
            stamp = _lookup_stamp(estate)
            if self._lookup is None or self._lookup[0] is not estate or self._lookup[1] != stamp:
                self._lookup = (estate, stamp, _build_lookup(estate))
            document = _single(self._lookup[2], endpoint, path)
        if document is None:
            return _arm_error(404, "ResourceNotFound", _not_found(endpoint, groups))
        return _json_reply(document)

    def _remember(self, listing: Listing) -> str:
        cursor = str(next(self._cursor_ids))
        with self._lock:
            self._cursors[cursor] = listing
            while len(self._cursors) > MAX_CURSORS:
                self._cursors.popitem(last=False)
        return cursor

    def _recall(self, cursor: str | None) -> Listing | None:
        """The snapshot a listing's first page took; None if unknown or forgotten (then recomputed)."""
        with self._lock:
            return self._cursors.get(cursor) if cursor else None


def _write_graph_token(query_key: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"query": query_key, "skip": offset}).encode()).decode()


def _read_graph_token(token, query_key: str) -> int:
    """The offset a Resource Graph `$skipToken` stands for (0: none); ValueError if it is not one this fake
    issued for the same query and subscriptions."""
    if token is None:
        return 0
    decoded = json.loads(base64.urlsafe_b64decode(str(token).encode()))
    if not isinstance(decoded, dict) or decoded.get("query") != query_key or not isinstance(decoded.get("skip"), int):
        raise ValueError(token)
    return decoded["skip"]


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))


def _entra_error(status: int, error: str, code: int, description: str, authority: str) -> _Reply:
    """A Microsoft Entra ID error answer: `error`, `error_description` ("AADSTS<code>: ..."), `error_codes`..."""
    trace, correlation = uuid.uuid4(), uuid.uuid4()
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return _json_reply({"error": error, "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
                        f"Correlation ID: {correlation} Timestamp: {stamp}", "error_codes": [code],
                        "timestamp": stamp, "trace_id": str(trace), "correlation_id": str(correlation),
                        "error_uri": f"{authority}/error?code={code}"}, status)


def _support_message() -> str:
    """How Resource Graph's errors begin (azure-cli-extensions#3325, a RateLimiting answer)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())
    return f"Please provide below info when asking for support: timestamp = {stamp}, correlationId = {uuid.uuid4()}."


def _write_skiptoken(cursor: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{cursor}:{offset}".encode()).decode()


def _read_skiptoken(token: str | None) -> tuple[str | None, int]:
    """(cursor, offset) of a `$skiptoken`; (None, 0) for a listing's first page. ValueError if bad."""
    if token is None:
        return None, 0
    cursor, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
    return cursor, int(offset)


# === Standalone ===
_GENERATE_ALIASES = {"uniform": "uniform_sets", "flexible": "flexible_sets"}


def _generate_arguments(spec: str) -> dict:
    """`vms=100,uniform=2,ip_base=127.0.0.2` -> make_estate keywords (ints and floats converted)."""
    arguments = {}
    for part in spec.split(","):
        key, _, text = part.partition("=")
        key = key.strip()
        for convert in (int, float, str):
            try:
                arguments[_GENERATE_ALIASES.get(key, key)] = convert(text.strip())
                break
            except ValueError:
                continue
    return arguments


def _file_stamp(path: str | None) -> tuple[int, int] | None:
    """(mtime, size) of the estate file; None when there is none."""
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="HTTPS fake of Azure Resource Manager: prints one line of shell export statements, "
                    "serves until SIGTERM or SIGINT, and re-reads --estate whenever the file changes.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--estate", help="estate JSON; re-read whenever it changes")
    parser.add_argument("--generate", metavar="K=V,...",
                        help="generate an estate with make_estate keywords (written to --estate if given)")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--state-dir", help="where ca.pem goes (default: a temporary directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.generate:
            estate = make_estate(**_generate_arguments(args.generate))
            if args.estate:
                Path(args.estate).write_text(estate.to_json())
        else:
            estate = Estate.from_json(Path(args.estate).read_text()) if args.estate else Estate()
    except (OSError, TypeError, ValueError) as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with FakeArm(estate, page_size=args.page_size, port=args.port, state_dir=args.state_dir) as fake:
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in fake.env().items()), flush=True)
        seen = _file_stamp(args.estate)
        while not stop.wait(RELOAD_INTERVAL):
            stamp = _file_stamp(args.estate)
            if stamp == seen:
                continue
            seen = stamp
            try:
                fake.estate = Estate.from_json(Path(args.estate).read_text())
            except (OSError, TypeError, ValueError) as exc:
                print(f"fake_arm: keeping the previous estate: {exc}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
