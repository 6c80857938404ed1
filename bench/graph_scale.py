#!/usr/bin/env python3
"""Scale: one discovery of 50,000 and 100,000 instances, Resource Graph and Resource Manager listings.

Usage: python bench/graph_scale.py [--sizes 50000,100000] [--runs 5] [--arm-runs 3] [--no-arm]
                                   [--profile] [--json FILE]
(bench/bench.py keeps this script's sections of bench/RESULTS.md as they are, or reruns it with --scale.)

Per size N, an estate of N instances in bench/azure_discovery.py's shape (85% standalone VMs, 2 Flexible
scale sets, the rest Uniform sets of 50 carrying the service tags; one subscription, 4 resource groups,
2 regions; no public IPs; 5% stopped or deallocated) is served by testing/fake_arm.py in a process of
its own (this script with --serve), with one change: the fake sorts a sorted query's rows again for
every page it serves (`order_graph_rows`: a shuffle, then a sort of every row, 200 times for one
discovery of 100,000 instances), and this server keeps the sorted rows of each evaluation and serves
every page of that query from them. The first page of each query still evaluates it against the
estate (`graph_candidates`), as the fake does; the memo applies only to a query ordered first by `id`
(unique: the order is total, so a shuffle before the sort cannot change it), and each memoised order is
checked once against a second sort from another shuffle. Everything else is the fake's own: the
request parsing and checks, the rows' shapes, `totalRecords`, `count`, `$skipToken`, 1,000 rows a page
(the product's `$top`), the quota headers and the quota itself (15 queries per 5 s, as documented, so a
discovery that needs more waits for the window's reset, as against Azure), the request counters, the
Resource Manager listings (100 items a page) and the managed-identity token.

Each measurement runs in a fresh child process (this script with --child), so that its peak RSS is its
own: it builds `AzureSource` (azure.source "resource_graph" or "arm"), runs one discovery to warm up
(token, connections, lazy imports), then `--runs` discoveries, each measured as `time.process_time()`
of the whole process (every thread: pipeline, JSON decoding, join, checks) and wall time; the previous
discovery's result stays alive while the next one runs, as in the daemon. Requests are counted by the
client (`Discovery.requests`) and by the fake (`GET /_counts`), and must agree. Peak RSS is `ru_maxrss`
after the warm-up discovery and after the last one (checked against /proc's VmHWM: the parent stays
small, since Linux carries ru_maxrss across exec).

--profile: one more child at the largest size runs one Resource Graph discovery after the warm-up under
pyinstrument (the call tree, main thread: the Graph source pages in it), one under cProfile (flat:
each function's own time), and one with a sampler thread reading the process's VmRSS every 5 ms,
marked with the stages of a discovery (each query's pages, `listing_from_graph`, the join, the checks).
"""
import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "testing"), str(HERE)]

import azure_discovery  # noqa: E402

SIZES = (50_000, 100_000)
GOAL_CPU_S, GOAL_RSS_MB = 4.0, 600.0          # issue 23: 100,000 instances, one Graph discovery


# === The server: testing/fake_arm.py, each sorted query's order kept ===
def serve(estate_file: Path, state_dir: Path, page_size: int) -> None:
    import fake_arm
    original = fake_arm.order_graph_rows
    memo: dict[int, tuple] = {}
    stats = {"sorted": 0, "served_from_memo": 0}

    def order_graph_rows(candidates, query, rng):
        if not query.order or query.order[0][0] != ("id",):
            return original(candidates, query, rng)
        hit = memo.get(id(candidates))
        if hit is not None and hit[0] is candidates and hit[1] == query:
            stats["served_from_memo"] += 1
            return hit[2]
        rows = original(candidates, query, rng)
        ids = [row["id"] for row in rows]
        again = original(candidates, query, random.Random(len(rows)))
        if len(set(ids)) != len(ids) or [row["id"] for row in again] != ids:
            raise SystemExit("graph_scale: a query ordered by id has an order a shuffle changes: not memoised")
        stats["sorted"] += 1
        memo.clear()                 # the fake's own cache holds the candidates of the query being paged
        memo[id(candidates)] = (candidates, query, rows)
        return rows

    fake_arm.order_graph_rows = order_graph_rows
    estate = fake_arm.Estate.from_json(estate_file.read_text())
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with fake_arm.FakeArm(estate, page_size=page_size, state_dir=str(state_dir)) as fake:
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in fake.env().items()), flush=True)
        stop.wait()
    print(json.dumps(stats), file=sys.stderr, flush=True)


class Server:
    """This script's --serve as a subprocess; `env` is its printed export line."""

    def __init__(self, estate_file: Path, state_dir: Path, page_size: int = 100):
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(estate_file), str(state_dir),
                                         "--page-size", str(page_size)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("export "):
            self.stop()
            raise SystemExit(f"graph_scale server did not start (printed {line!r})")
        self.env = dict(word.split("=", 1) for word in shlex.split(line)[1:])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


# === Children ===
def make_source(kind: str):
    import haproxy_azure_discovery as m
    cfg = m.parse_config({"azure": {"subscription_id": azure_discovery.SUBSCRIPTION, "source": kind,
                                    "workers": azure_discovery.WORKERS,
                                    "resource_manager_url": os.environ["FAKE_ARM_URL"]},
                          "haproxy": {"password": "x"}}, {})
    return m, cfg, m.AzureSource(cfg)


def child_measure(kind: str, runs: int) -> dict:
    m, cfg, source = make_source(kind)
    rss_idle = azure_discovery.peak_rss_mb()
    wall = time.perf_counter()
    found = source.discover()                            # warm-up: token, connections, lazy imports
    warm_wall = time.perf_counter() - wall
    rss_first = azure_discovery.peak_rss_mb()
    cpus, walls, requests, served = [], [], [], []
    for _ in range(runs):
        before = azure_discovery.fake_counts()
        wall, cpu = time.perf_counter(), time.process_time()
        found = source.discover()                        # the previous result is freed only now, as in the daemon
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
        requests.append(found.requests)
        served.append(azure_discovery.served(before, azure_discovery.fake_counts()))
    return dict(kind=kind, instances=len(found.instances), skipped=len(found.skipped), cpu_s=cpus, wall_s=walls,
                warm_wall_s=warm_wall, requests=requests, served=served, rss_idle_mb=rss_idle,
                rss_first_mb=rss_first, rss_mb=azure_discovery.peak_rss_mb(),
                own_rss_mb=azure_discovery.own_peak_rss_mb(),
                digest=azure_discovery.digest((i.id, i.address, i.power_state) for i in found.instances))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child_profile(top: int = 25) -> dict:
    """One Graph discovery each under pyinstrument, cProfile and an RSS sampler, after a warm-up."""
    from pyinstrument import Profiler
    m, cfg, source = make_source("resource_graph")
    found = source.discover()
    out: dict = {"instances": len(found.instances)}
    del found
    gc.collect()

    profiler = Profiler(interval=0.001)
    profiler.start()
    found = source.discover()
    profiler.stop()
    out["pyinstrument"] = profiler.output_text(unicode=False, color=False, show_all=False)
    del found
    gc.collect()

    profile = cProfile.Profile(time.process_time)
    profile.enable()
    found = source.discover()
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    total = stats.total_tt
    stats.sort_stats("tottime").print_stats(top)
    out["cprofile_total_s"] = total
    out["cprofile_tottime"] = text.getvalue()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    out["cprofile_cumulative"] = text.getvalue()
    del found, profile, stats
    gc.collect()

    # The memory: a timeline of VmRSS, marked with the stages of one discovery.
    marks: list[tuple[float, str, float]] = []
    t0 = time.perf_counter()

    def mark(label: str) -> None:
        marks.append((time.perf_counter() - t0, label, _rss_mb()))

    def staged(function, label):
        def wrapper(*args, **kwargs):
            mark(f"{label} begins")
            try:
                return function(*args, **kwargs)
            finally:
                mark(f"{label} ends")
        return wrapper

    rows_of = source._graph_rows
    source._graph_rows = lambda table, groups: staged(rows_of, f"query of {table}")(table, groups)
    for name, label in (("listing_from_graph", "listing_from_graph"), ("instances_from_azure", "join"),
                        ("impossible", "checks")):
        setattr(m, name, staged(getattr(m, name), label))
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            samples.append((time.perf_counter() - t0, _rss_mb()))
    sampler = threading.Thread(target=sample, daemon=True)
    mark("discover begins (the previous discovery's result freed)")
    sampler.start()
    found = source.discover()
    done.set()
    sampler.join()
    mark("discover ends (its result alive)")
    out["rss_marks"] = marks
    out["rss_peak_sampled"] = max(samples, key=lambda s: s[1]) if samples else None
    out["rss_samples"] = len(samples)
    # What the result and one decoded page weigh, for scale.
    out["instances_after"] = len(found.instances)
    return out


CHILDREN = {"graph": lambda runs: child_measure("resource_graph", runs), "arm": lambda runs: child_measure("arm", runs),
            "profile": lambda runs: child_profile()}


def measure(kind: str, env_extra: dict, runs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_"))}
    env.update(env_extra)
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--runs", str(runs)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"graph_scale {kind} child failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    if kind == "profile":
        return result
    if result["own_rss_mb"] is not None and result["rss_mb"] - result["own_rss_mb"] > 2:
        raise SystemExit(f"{kind}: ru_maxrss {result['rss_mb']:.0f} MB is not this run's own peak")
    for sent, counted in zip(result["requests"], result["served"]):
        if sent != sum(counted.values()):
            raise SystemExit(f"{kind}: the client sent {sent} requests, the fake served {counted}")
    return result


def run(sizes, runs: int, arm_runs: int, profile: bool) -> list[dict]:
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sizes:
            estate_file = Path(tmp) / f"estate-{n}.json"
            shape = json.loads(subprocess.run([sys.executable, azure_discovery.__file__, "--write-estate", str(n),
                                               str(estate_file)], check=True, capture_output=True, text=True).stdout)
            server = Server(estate_file, Path(tmp) / f"server-{n}")
            try:
                row = dict(n=n, shape=shape)
                row["graph"] = measure("graph", server.env, runs)
                print(f"scale {n:>6}: Graph {row['graph']['requests'][0]} requests, CPU "
                      f"{min(row['graph']['cpu_s']):.2f} s best ({time.monotonic() - started:.0f} s so far)",
                      file=sys.stderr)
                if arm_runs:
                    row["arm"] = measure("arm", server.env, arm_runs)
                    print(f"scale {n:>6}: ARM {row['arm']['requests'][0]} requests, CPU "
                          f"{min(row['arm']['cpu_s']):.2f} s best ({time.monotonic() - started:.0f} s so far)",
                          file=sys.stderr)
                if profile and n == max(sizes):
                    row["profile"] = measure("profile", server.env, 1)
                    print(f"scale {n:>6}: profiled ({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
            finally:
                server.stop()
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="instances in the estate")
    parser.add_argument("--runs", type=int, default=5, help="measured Graph discoveries per size (default 5)")
    parser.add_argument("--arm-runs", type=int, default=3, help="measured ARM discoveries per size (default 3)")
    parser.add_argument("--no-arm", action="store_true", help="leave out the arm source")
    parser.add_argument("--profile", action="store_true", help="profile one Graph discovery at the largest size")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=2, metavar=("ESTATE", "STATE_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--page-size", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), args.page_size)
        return
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.runs)))
        return
    rows = run([int(s) for s in args.sizes.split(",")], args.runs, 0 if args.no_arm else args.arm_runs, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
