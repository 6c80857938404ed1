#!/usr/bin/env python3
"""Azure half of the benchmark: what one discovery cycle costs against Resource Manager.

Usage: python bench/azure_discovery.py [--sizes 1000,5000,10000,20000] [--page-size 100]
(bench/bench.py runs it with the other parts and writes bench/RESULTS.md; alone it prints its section.)

For each estate size N (instances in total) the script writes an estate with `testing/fake_arm.py`'s
`make_estate` and serves it with the fake run as a subprocess (standalone mode, `--estate FILE`). Every
list answers `--page-size` items a page (default 100). Then two measurements, each in a fresh child
process (this script with `--child`), so that peak RSS belongs to that run alone:

ours     `haproxy_azure_discovery.AzureSource(cfg).discover()` with `azure.resource_manager_url` set to
         the fake. One discovery first (token, connections, lazy imports), then one measured cycle: its
         requests (`Discovery.requests`, the SDK's own request hook), wall time and CPU time
         (`time.process_time`, all threads). Then the same listing again through the private
         `AzureSource._list_all` (the pages as plain JSON), kept in memory, and the CPU time of the pure
         join alone (`join(inventory_of(...))` on it, best of 3). Peak RSS (`ru_maxrss`) is read after the
         measured cycle, before that extra listing.
per-VM   the peer approach (Prometheus's Azure SD, dataplaneapi-style lookups) with the same SDK clients
         options, the same credential (DefaultAzureCredential through the fake's managed identity) and a
         thread pool of the same size (8): list VMs and scale sets, list each tagged Uniform set's
         instances (with instance views), then one NIC GET and one instance-view GET per VM (standalone and
         Flexible members) and one NIC GET per Uniform instance. One warm-up call per client first
         (token, a connection), then one measured cycle.

Peak RSS is `ru_maxrss`, checked against /proc's VmHWM: Linux carries ru_maxrss across exec, so the
parent writes estates in a subprocess and stays smaller than any child.

Requests are counted twice: by the client (a `raw_request_hook` on every SDK request, retries included)
and by the fake (`GET /_counts` before and after the cycle, token requests excluded); the script stops
if they differ. Both strategies must find the same (id, address, power state) for every instance; the
table says whether they did.

Throttling: Resource Manager reads are a token bucket per principal, subscription and region: 250 burst,
refilled at 25/s. A cycle of R requests in one subscription therefore needs at
least max(0, (R - 250) / 25) seconds to run without a 429, starting from a full bucket. That is computed,
not measured: the fake does not throttle.

The fake runs on the same machine as the measured process, so wall times include its serving time
(Python, TLS) on the same cores; requests, CPU and RSS are the client's own.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import resource
import shlex
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAKE_ARM = ROOT / "testing" / "fake_arm.py"
sys.path[:0] = [str(ROOT), str(ROOT / "testing")]

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"
ARM_SCOPE = "https://management.azure.com/.default"
NAME_TAG = "HAProxy:Service:Name"
WORKERS = 8                       # AzureConfig.workers default; the per-VM pool gets the same
READ_BURST, READ_REFILL = 250, 25  # Resource Manager reads: bucket size, tokens per second

# Estate shape: 85% standalone VMs, 2 Flexible sets, the rest in Uniform sets; 50 instances a set.
STANDALONE_SHARE, FLEXIBLE_SETS, PER_SET = 0.85, 2, 50
SERVICES = tuple((f"svc-{i:02d}", 8000 + i) for i in range(10))
REGIONS = ("eastus", "westeurope")
RESOURCE_GROUPS = tuple(f"rg-app-{i}" for i in range(4))
NOT_RUNNING = 0.05


# === Estate ===
def shape(n: int) -> dict:
    """make_estate keywords for n instances in total."""
    uniform_sets = max(0, (n - round(n * STANDALONE_SHARE) - FLEXIBLE_SETS * PER_SET) // PER_SET)
    return dict(vms=n - (uniform_sets + FLEXIBLE_SETS) * PER_SET, uniform_sets=uniform_sets,
                flexible_sets=FLEXIBLE_SETS, per_set=PER_SET)


def write_estate(n: int, path: Path) -> dict:
    from fake_arm import make_estate
    counts = shape(n)
    estate = make_estate(**counts, subscriptions=(SUBSCRIPTION,), resource_groups=RESOURCE_GROUPS,
                         regions=REGIONS, services=SERVICES, not_running=NOT_RUNNING, seed=1)
    path.write_text(estate.to_json())
    return counts


class Fake:
    """fake_arm.py as a subprocess serving one estate file; `env` is its printed export line."""

    def __init__(self, estate_file: Path, state_dir: Path, page_size: int):
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_ARM), "--estate", str(estate_file), "--state-dir", str(state_dir),
             "--page-size", str(page_size)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("export "):
            self.stop()
            raise SystemExit(f"fake_arm.py did not start (printed {line!r})")
        self.env = dict(word.split("=", 1) for word in shlex.split(line)[1:])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# === Children: one measurement each ===
def fake_counts() -> dict:
    """The fake's request counters (GET /_counts, which is itself not counted)."""
    context = ssl.create_default_context(cafile=os.environ["REQUESTS_CA_BUNDLE"])
    with urllib.request.urlopen(os.environ["FAKE_ARM_URL"] + "/_counts", context=context, timeout=30) as reply:
        return json.loads(reply.read())


def served(before: dict, after: dict) -> dict:
    """Requests per endpoint between two /_counts snapshots; tokens apart, zeros left out."""
    return {k: after[k] - before.get(k, 0) for k in after
            if k not in ("total", "token") and after[k] != before.get(k, 0)}


def digest(rows) -> str:
    """One hash over every instance's (id, address, power state), to compare the two strategies."""
    return hashlib.sha256("\n".join(sorted(f"{i.lower()} {a} {p}" for i, a, p in rows)).encode()).hexdigest()[:16]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def own_peak_rss_mb() -> float | None:
    """VmHWM: the peak of this process's own memory. Linux carries ru_maxrss across exec, so a child
    started from a bigger parent would report the parent's peak; the parent stays small for that."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def child_ours(source_kind: str = "arm") -> dict:
    import haproxy_azure_discovery as m
    cfg = m.parse_config({"azure": {"subscription_id": SUBSCRIPTION, "workers": WORKERS, "source": source_kind,
                                    "resource_manager_url": os.environ["FAKE_ARM_URL"]},
                          "haproxy": {"password": "x"}}, {})
    source = m.AzureSource(cfg)
    rss_idle = peak_rss_mb()
    source.discover()                                   # warm-up: token, connections, lazy imports
    received = count_bytes(source)
    before = fake_counts()
    wall, cpu = time.perf_counter(), time.process_time()
    found = source.discover()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss, own_rss = peak_rss_mb(), own_peak_rss_mb()
    by_endpoint = served(before, fake_counts())
    body_bytes = sum(received)

    if source_kind == "arm":                            # the same listing once more, for the join alone
        listing, read = arm_listing(m, source, cfg), m.inventory_of     # its items read, then joined
    else:
        listing, read = m.query_graph(source.pager, source.cfg), None   # rows read as pages came
    joins = [join_cpu(m, listing, cfg, read) for _ in range(3)]
    return dict(requests=found.requests, served=by_endpoint, wall_s=wall, cpu_s=cpu, join_cpu_s=min(joins),
                rss_mb=rss, own_rss_mb=own_rss, rss_idle_mb=rss_idle, instances=len(found.instances),
                bytes=body_bytes, digest=digest((i.id, i.address, i.power_state) for i in found.instances))


def count_bytes(source) -> list[int]:
    """Response body bytes of every request the source sends from now on (one list item each)."""
    send, received = source.pager._client.send_request, []

    def counting(request, **kwargs):
        response = send(request, **kwargs)
        # read(): the program streams pages (and reads them next: the bytes are kept), so .content
        # is not there yet. list.append is atomic: the pool's threads share it.
        received.append(len(response.read()))
        return response
    source.pager._client.send_request = counting
    return received


def arm_listing(m, source, cfg):
    """The listings of one discovery, as the source's own pool fetches them, without the join."""
    listing = m.AzureListing()
    pool = m._Pool(cfg.azure.workers)
    try:
        source._list_all(pool, listing)
    finally:
        pool.close()
    return listing


def join_cpu(m, listing, cfg, read) -> float:
    """CPU of the join; with `read`, of reading the listing into records (inventory_of) too."""
    started = time.process_time()
    m.join(read(listing) if read else listing, cfg.azure)
    return time.process_time() - started


def segments(arm_id: str) -> dict:
    """/subscriptions/S/resourceGroups/R/.../networkInterfaces/N -> {"resourcegroups": "R", ...}."""
    parts = arm_id.strip("/").split("/")
    return {parts[i].lower(): parts[i + 1] for i in range(0, len(parts) - 1, 2)}


def primary(items):
    """The item marked primary, or the only one."""
    items = list(items or ())
    return items[0] if len(items) == 1 else next((i for i in items if i.primary), None)


def power(instance_view) -> str:
    codes = [s.code for s in (instance_view.statuses if instance_view else None) or () if s.code]
    return next((c.split("/", 1)[1].lower() for c in codes if c.startswith("PowerState/")), "unknown")


def child_per_vm() -> dict:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient

    lock, sent = threading.Lock(), [0]

    def count(_request) -> None:
        with lock:
            sent[0] += 1

    # The options AzureSource gives its clients (retries, timeouts), with a request counter.
    options = dict(base_url=os.environ["FAKE_ARM_URL"], credential_scopes=[ARM_SCOPE], retry_total=3,
                   connection_timeout=10, read_timeout=30, raw_request_hook=count, logging_enable=False)
    credential = DefaultAzureCredential()
    compute = ComputeManagementClient(credential, SUBSCRIPTION, **options)
    network = NetworkManagementClient(credential, SUBSCRIPTION, **options)
    rss_idle = peak_rss_mb()
    next(compute.virtual_machine_scale_sets.list_all().by_page())   # warm-up: token, a connection each
    next(network.network_interfaces.list_all().by_page())

    def nic_address(get, *args) -> str | None:
        try:
            nic = get(*args)
        except ResourceNotFoundError:                     # a missing NIC skips the instance, as ours
            return None
        config = primary(nic.ip_configurations)
        return config.private_ip_address if config else None

    def vm_lookups(vm) -> tuple:
        nic = segments(primary(vm.network_profile.network_interfaces).id)
        where = segments(vm.id)
        return (pool.submit(nic_address, network.network_interfaces.get, nic["resourcegroups"],
                            nic["networkinterfaces"]),
                pool.submit(compute.virtual_machines.instance_view, where["resourcegroups"], vm.name))

    def uniform_lookup(inst):
        nic = segments(primary(inst.network_profile.network_interfaces).id)
        return pool.submit(nic_address,
                           network.network_interfaces.get_virtual_machine_scale_set_network_interface,
                           nic["resourcegroups"], nic["virtualmachinescalesets"], nic["virtualmachines"],
                           nic["networkinterfaces"])

    before, count_before = fake_counts(), sent[0]
    wall, cpu = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        vms_job = pool.submit(lambda: list(compute.virtual_machines.list_all()))
        sets = {s.id.lower(): s for s in compute.virtual_machine_scale_sets.list_all()}
        uniform_jobs = [pool.submit(lambda s=s: list(compute.virtual_machine_scale_set_vms.list(
                            segments(s.id)["resourcegroups"], s.name, expand="instanceView")))
                        for s in sets.values()
                        if s.orchestration_mode == "Uniform" and NAME_TAG in (s.tags or {})]
        vm_jobs = []
        for vm in vms_job.result():
            owner = sets.get(vm.virtual_machine_scale_set.id.lower()) if vm.virtual_machine_scale_set else None
            if NAME_TAG in {**((owner.tags or {}) if owner else {}), **(vm.tags or {})}:
                vm_jobs.append((vm, *vm_lookups(vm)))
        set_jobs = [(inst, uniform_lookup(inst)) for job in uniform_jobs for inst in job.result()]
        rows = [(vm.id, nic.result(), power(view.result())) for vm, nic, view in vm_jobs]
        rows += [(inst.id, nic.result(), power(inst.instance_view)) for inst, nic in set_jobs]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(requests=sent[0] - count_before, served=served(before, fake_counts()), wall_s=wall, cpu_s=cpu,
                rss_mb=peak_rss_mb(), own_rss_mb=own_peak_rss_mb(), rss_idle_mb=rss_idle, instances=len(rows),
                digest=digest(rows))


CHILDREN = {"ours": child_ours, "graph": lambda: child_ours("resource_graph"), "per-vm": child_per_vm}


def measure(kind: str, fake_env: dict) -> dict:
    """Run one measurement in a fresh interpreter with the fake's environment (and no other Azure one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_"))}
    env.update(fake_env)
    done = subprocess.run([sys.executable, __file__, "--child", kind], env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{kind} measurement failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    if result["own_rss_mb"] is not None and result["rss_mb"] - result["own_rss_mb"] > 2:
        raise SystemExit(f"{kind}: ru_maxrss {result['rss_mb']:.0f} MB is not this run's own peak "
                         f"(VmHWM {result['own_rss_mb']:.0f} MB): inherited from a bigger parent")
    if result["requests"] != sum(result["served"].values()):
        raise SystemExit(f"{kind}: the client sent {result['requests']} requests, the fake served "
                         f"{result['served']}")
    return result


# === Report ===
def min_cycle_s(requests: int) -> float:
    return max(0.0, (requests - READ_BURST) / READ_REFILL)


def table(rows: list[dict]) -> list[str]:
    head = ["instances", "our requests", "per-VM requests", "ratio", "our wall s", "our discover CPU s",
            "our join CPU ms", "our peak RSS MB (idle)", "our min cycle under throttling s", "per-VM wall s",
            "per-VM CPU s", "per-VM min cycle under throttling s", "same result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + ":---:|"]
    for r in rows:
        ours, peer = r["ours"], r["per_vm"]
        lines.append("| " + " | ".join([
            f"{r['n']:,}", f"{ours['requests']:,}", f"{peer['requests']:,}",
            f"{peer['requests'] / ours['requests']:.0f}×", f"{ours['wall_s']:.2f}", f"{ours['cpu_s']:.2f}",
            f"{ours['join_cpu_s'] * 1000:.0f}", f"{ours['rss_mb']:.0f} ({ours['rss_idle_mb']:.0f})",
            f"{min_cycle_s(ours['requests']):.0f}", f"{peer['wall_s']:.1f}", f"{peer['cpu_s']:.1f}",
            f"{min_cycle_s(peer['requests']):,.0f}",
            "yes" if ours["digest"] == peer["digest"] and ours["instances"] == peer["instances"] else "NO"]) + " |")
    return lines


def breakdown(rows: list[dict]) -> list[str]:
    """Requests per endpoint, as the fake counted them."""
    lines = ["| instances | strategy | requests per endpoint (fake's counters) |", "|---:|---|---|"]
    for r in rows:
        for label, key in (("ours", "ours"), ("Graph", "graph"), ("per-VM", "per_vm")):
            if not r[key]:
                continue
            parts = ", ".join(f"{k} {v:,}" for k, v in sorted(r[key]["served"].items()))
            lines.append(f"| {r['n']:,} | {label} | {parts} |")
    return lines


def notes(rows: list[dict], page_size: int) -> list[str]:
    shapes = "; ".join(f"{r['n']:,}: {r['shape']['vms']:,} VMs + {r['shape']['flexible_sets']}×{PER_SET} Flexible "
                       f"+ {r['shape']['uniform_sets']}×{PER_SET} Uniform" for r in rows)
    return [
        f"Estate (testing/fake_arm.py `make_estate`, served over HTTPS by the fake): {STANDALONE_SHARE:.0%} "
        f"standalone VMs, {FLEXIBLE_SETS} Flexible scale sets, the rest in Uniform scale sets of {PER_SET}; all "
        f"tagged, {len(SERVICES)} services over {len(REGIONS)} regions, {len(RESOURCE_GROUPS)} resource groups, "
        f"one subscription, {NOT_RUNNING:.0%} stopped or deallocated; {page_size} items a page. Sizes: {shapes}.",
        "",
        "ours = `AzureSource.discover()` (list VMs, status-only VMs, NICs, scale sets; per Uniform set its "
        "instances and NICs). per-VM = list VMs, scale sets and each Uniform set's instances, then per VM one NIC "
        "GET and one instance-view GET, per Uniform instance one NIC GET (Prometheus's Azure SD, dataplaneapi-style "
        f"lookups). Both: the real Azure SDK, DefaultAzureCredential, {WORKERS} threads, one measured cycle after a "
        "warm-up, in a fresh process each. Requests are counted by the client and checked against the fake's "
        "counters; same result = both found the same (id, address, power state) for every instance.",
        "",
        "CPU = `time.process_time()` of the measuring process (the fake's excluded); wall time includes the fake's "
        "serving on the same 2 cores. Join = `join(inventory_of(...))` alone on the listed JSON, best of 3. Peak "
        "RSS = `ru_maxrss` of that process, checked against /proc VmHWM (idle: after imports and client "
        "construction). Min cycle under throttling = "
        f"max(0, (requests − {READ_BURST}) / {READ_REFILL}) s, Resource Manager's read bucket per principal, "
        "subscription and region: computed, not measured (the fake does not throttle). Azure documents no page "
        "size; users report 50 a page for the subscription-wide VM list (azure-xplat-cli#2961, "
        "apache/libcloud#1824), which would make our requests about 1.5× these and hardly change the per-VM ones.",
        "",
    ]


def run(sizes: list[int], page_size: int = 100, per_vm_too: bool = True) -> list[dict]:
    """Both strategies against one fake per size; progress on stderr."""
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-azure-") as tmp:
        for n in sizes:
            estate_file = Path(tmp) / f"estate-{n}.json"
            writer = [sys.executable, __file__, "--write-estate", str(n), str(estate_file)]
            counts = json.loads(subprocess.run(writer, check=True, capture_output=True, text=True).stdout)
            fake = Fake(estate_file, Path(tmp) / f"fake-{n}", page_size)
            try:
                ours = measure("ours", fake.env)
                print(f"azure {n:>6}: ours {ours['requests']} requests in {ours['wall_s']:.1f} s", file=sys.stderr)
                graph = measure("graph", fake.env)
                print(f"azure {n:>6}: Resource Graph {graph['requests']} requests in {graph['wall_s']:.1f} s",
                      file=sys.stderr)
                per_vm = measure("per-vm", fake.env) if per_vm_too else None
                if per_vm:
                    print(f"azure {n:>6}: per-VM {per_vm['requests']} requests in {per_vm['wall_s']:.1f} s "
                          f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
            finally:
                fake.stop()
            rows.append(dict(n=n, shape=counts, ours=ours, graph=graph, per_vm=per_vm))
    return rows


def sources_table(rows: list[dict]) -> list[str]:
    """Resource Manager listings and Azure Resource Graph, side by side."""
    head = ["instances", "requests ARM / Graph", "bytes received MB ARM / Graph", "discover CPU s ARM / Graph",
            "peak RSS MB ARM / Graph", "wall s ARM / Graph", "same result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + ":---:|"]
    for r in rows:
        arm, graph = r["ours"], r["graph"]
        lines.append("| " + " | ".join([
            f"{r['n']:,}", f"{arm['requests']:,} / {graph['requests']:,}",
            f"{arm['bytes'] / 1e6:.1f} / {graph['bytes'] / 1e6:.1f}", f"{arm['cpu_s']:.2f} / {graph['cpu_s']:.2f}",
            f"{arm['rss_mb']:.0f} / {graph['rss_mb']:.0f}", f"{arm['wall_s']:.1f} / {graph['wall_s']:.1f}",
            "yes" if arm["digest"] == graph["digest"] and arm["instances"] == graph["instances"] else "NO"]) + " |")
    return lines


def sources_notes() -> list[str]:
    return [
        "ARM = `azure.source: \"arm\"` (the listings above); Graph = `azure.source: \"resource_graph\"`: "
        "Azure Resource Graph queries of 1,000 rows a page over Resources (VMs, their NICs, scale sets) and, "
        "because Uniform sets are tagged, ComputeResources (Uniform instances and their NICs), answered by "
        "the fake from the same estate. Bytes = response bodies as the client received them (the fake does "
        "not compress; Azure does, with `Accept-Encoding: gzip`). The fake keeps Resource Graph's per-user "
        "quota of 15 queries per 5 s, and the warm-up cycle spends part of it: Graph's wall time includes "
        "waiting for the window's reset where a cycle needs more than the quota left. Same result = both "
        "sources found the same (id, address, power state) for every instance.",
        ""]


def report(rows: list[dict], page_size: int = 100) -> list[str]:
    """The markdown section of bench/RESULTS.md."""
    per_vm = [*table(rows), ""] if all(r["per_vm"] for r in rows) else []
    return ["## 1. Azure: requests and cost of one discovery cycle (bench/azure_discovery.py)", "",
            *notes(rows, page_size), *per_vm, "### Resource Manager listings and Azure Resource Graph", "",
            *sources_notes(), *sources_table(rows), "", *breakdown(rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000,20000", help="estate sizes (instances in total)")
    parser.add_argument("--page-size", type=int, default=100, help="items a list page (default 100)")
    parser.add_argument("--no-per-vm", action="store_true", help="leave out the per-VM strategy (the slow one)")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--write-estate", nargs=2, metavar=("N", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child]()))
        return
    if args.write_estate:   # in a subprocess of its own: the parent must stay smaller than any child
        print(json.dumps(write_estate(int(args.write_estate[0]), Path(args.write_estate[1]))))
        return
    rows = run([int(s) for s in args.sizes.split(",")], args.page_size, not args.no_per_vm)
    print("\n".join(report(rows, args.page_size)))


if __name__ == "__main__":
    main()
