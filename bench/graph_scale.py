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

--profile (needs pyinstrument: `pip install pyinstrument`): one more child at the largest size,
five Resource Graph discoveries in one fresh process: the first marks VmRSS at each stage of a
discovery (each query's pages, shaped as they come, the join, the checks) and samples it every
5 ms; the second marks the CPU at each stage, with the CPU of `_ArmPager.fetch` (a page through
the pipeline) and of the program's `json.loads` added up; the third marks the Python heap under
tracemalloc; the fourth runs under pyinstrument, the fifth under cProfile (call counts; its
per-call overhead makes its seconds no measure of the discovery's).

--instructions N: one Resource Graph discovery's instructions at N instances under callgrind (a child
running a warm-up and one discovery, minus one running the warm-up alone), printed as JSON; with
--from-json and --instructions-json the sections include them. About half an hour at 100,000.
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
def make_source(kind: str, deadline: float = 300.0):
    import haproxy_azure_discovery as m
    cfg = m.parse_config({"azure": {"subscription_id": azure_discovery.SUBSCRIPTION, "source": kind,
                                    "discovery_deadline_seconds": deadline,
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


class _Stages:
    """Marks at the stages of a Resource Graph discovery: each query's pages (shaped as they
    come), the join, the checks; with the process's CPU time, VmRSS and (when tracing) the Python
    heap (tracemalloc's current and the peak since the mark before). Also the CPU of
    `_ArmPager.fetch` (a page through the pipeline) and of `json.loads` in the program (the pages'
    decoding), added up."""

    def __init__(self, m, source):
        self.marks: list[dict] = []
        self.fetch_s = self.decode_s = 0.0
        self.t0 = time.perf_counter()
        listing_of, fetch = m._graph_listing, source.pager.fetch
        m._graph_listing = lambda pager, cfg, table: self.staged(
            listing_of, f"query of {table}")(pager, cfg, table)
        for name, label in (("join", "join"), ("impossible", "checks")):
            setattr(m, name, self.staged(getattr(m, name), label))

        def timed_fetch(request):
            cpu = time.process_time()
            try:
                return fetch(request)
            finally:
                self.fetch_s += time.process_time() - cpu
        source.pager.fetch = timed_fetch
        stages = self

        class Json:                                   # the program's `json`, loads timed
            def __getattr__(self, name):
                return getattr(json, name)

            def loads(self, *args, **kwargs):
                cpu = time.process_time()
                try:
                    return json.loads(*args, **kwargs)
                finally:
                    stages.decode_s += time.process_time() - cpu
        m.json = Json()

    def mark(self, label: str) -> None:
        import tracemalloc
        traced = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (None, None)
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
        self.marks.append(dict(at=time.perf_counter() - self.t0, label=label, cpu=time.process_time(),
                               rss=_rss_mb(), heap=traced[0], heap_peak=traced[1], fetch=self.fetch_s,
                               decode=self.decode_s))

    def staged(self, function, label):
        def wrapper(*args, **kwargs):
            self.mark(f"{label} begins")
            try:
                return function(*args, **kwargs)
            finally:
                self.mark(f"{label} ends")
        return wrapper

    def run(self, source) -> dict:
        self.marks, self.fetch_s, self.decode_s, self.t0 = [], 0.0, 0.0, time.perf_counter()
        self.mark("discover begins")
        found = source.discover()
        self.mark("discover ends")
        marks, self.marks = self.marks, []          # the profilers' discoveries after it leave these alone
        return dict(marks=marks, instances=len(found.instances))


def child_profile(top: int = 25) -> dict:
    """Resource Graph discoveries in one fresh process: the first (no warm-up) with an RSS timeline, then
    one with CPU marks, one under tracemalloc, one under pyinstrument, one under cProfile."""
    import tracemalloc
    from pyinstrument import Profiler
    m, cfg, source = make_source("resource_graph")
    stages = _Stages(m, source)
    out: dict = {}

    # 1. The first discovery of a fresh process: VmRSS at each stage and every 5 ms (later discoveries
    # reuse the memory the first one left to the allocator, so their VmRSS hardly moves).
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            samples.append((time.perf_counter() - stages.t0, _rss_mb()))
    stages.t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out["rss_idle_mb"] = _rss_mb()
    first = stages.run(source)
    done.set()
    sampler.join()
    out["first"] = first
    out["rss_peak_sampled"] = max(samples, key=lambda s: s[1]) if samples else None
    out["rss_samples"] = len(samples)
    out["rss_after_first_mb"] = _rss_mb()
    out["ru_maxrss_after_first_mb"] = azure_discovery.peak_rss_mb()

    # 2. CPU at each stage, the pipeline's and the decoding's share (a handful of timer calls a page).
    out["cpu"] = stages.run(source)

    # 3. The Python heap at each stage (tracemalloc: what is allocated, and the peak within each stage).
    gc.collect()
    tracemalloc.start()
    out["heap"] = stages.run(source)
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    out["heap_result_top"] = [[str(stat.traceback), stat.size, stat.count]
                              for stat in snapshot.statistics("lineno")[:12]]
    del snapshot

    # 4. pyinstrument: the call tree (wall clock: the quota's pauses and the server's answers show as waits).
    profiler = Profiler(interval=0.001)
    profiler.start()
    source.discover()
    profiler.stop()
    out["pyinstrument"] = profiler.output_text(unicode=False, color=False, show_all=False)
    del profiler

    # 5. cProfile: every call counted (its overhead inflates the per-item functions several times over).
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    source.discover()
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    total = stats.total_tt
    stats.sort_stats("tottime").print_stats(top)
    out["cprofile_total_s"] = total
    out["cprofile_functions"] = sorted(
        ([f"{Path(file).name}:{line}({name})", calls, own, cumulative]
         for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items()),
        key=lambda f: -f[2])[:60]
    out["cprofile_tottime"] = text.getvalue()
    return out


def child_discoveries(runs: int) -> dict:
    """A warm-up discovery, then `runs` more, nothing measured: under valgrind, the difference of runs=1 and
    runs=0 is one discovery's instructions. Under valgrind a discovery runs past the default deadline (300 s)."""
    m, cfg, source = make_source("resource_graph", deadline=3600.0)
    found = source.discover()
    for _ in range(runs):
        found = source.discover()
    return {"instances": len(found.instances), "requests": found.requests}


CHILDREN = {"graph": lambda runs: child_measure("resource_graph", runs), "arm": lambda runs: child_measure("arm", runs),
            "profile": lambda runs: child_profile(), "discoveries": child_discoveries}


def instructions(n: int) -> dict:
    """One Resource Graph discovery's instructions at n instances: `valgrind --tool=callgrind` over a child
    that runs a warm-up and one discovery, minus one that runs the warm-up alone (PYTHONHASHSEED=0, so
    that each count repeats); per function (callgrind_annotate, own instructions) the same difference."""
    import re
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory(prefix="bench-scale-vg-") as tmp:
        estate_file = Path(tmp) / "estate.json"
        subprocess.run([sys.executable, azure_discovery.__file__, "--write-estate", str(n), str(estate_file)],
                       check=True, capture_output=True)
        server = Server(estate_file, Path(tmp) / "server")
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_"))}
            env.update(server.env, PYTHONHASHSEED="0")
            jobs = {}
            for runs in (0, 1):
                target = Path(tmp) / f"callgrind.{runs}"
                jobs[runs] = (target, subprocess.Popen(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}", sys.executable, __file__,
                     "--child", "discoveries", "--runs", str(runs)], env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            per_function = {}
            for runs, (target, job) in jobs.items():
                stdout, stderr = job.communicate(timeout=7200)
                if job.returncode != 0:
                    raise SystemExit(f"valgrind child failed:\n{stderr[-3000:]}")
                out[f"total_{runs}"] = int(re.search(r"Collected : (\d+)", stderr)[1])
                out[f"child_{runs}"] = json.loads(stdout.splitlines()[-1])
                annotated = subprocess.run(["callgrind_annotate", "--threshold=100", str(target)],
                                           capture_output=True, text=True, check=True).stdout
                functions = {}
                for line in annotated.splitlines():
                    match = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.+)", line)
                    if match:
                        functions[match[2].strip()] = int(match[1].replace(",", ""))
                per_function[runs] = functions
        finally:
            server.stop()
    out["discovery"] = out["total_1"] - out["total_0"]
    diff = {name: ir - per_function[0].get(name, 0) for name, ir in per_function[1].items()}
    out["functions"] = sorted(([name, ir] for name, ir in diff.items() if ir > 0), key=lambda f: -f[1])[:25]
    return out


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
                row = dict(n=n, shape=shape, loadavg=[os.getloadavg()])
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
            row["loadavg"].append(os.getloadavg())
            rows.append(row)
    return rows


# === Report ===
def _best_median(values, fmt="{:.2f}") -> str:
    return f"{fmt.format(min(values))} / {fmt.format(statistics.median(values))}"


def _endpoints(served: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(served.items()))


def measured_table(rows: list[dict]) -> list[str]:
    head = ["instances", "source", "requests a discovery", "of which", "CPU s, best / median (runs)",
            "wall s, best / median", "peak RSS MB: one discovery / all runs (idle)", "instances found", "same result"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---:|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        for key, label in (("graph", "resource_graph"), ("arm", "arm")):
            x = r.get(key)
            if not x:
                continue
            same = "yes" if r.get("arm") and r["arm"]["digest"] == r["graph"]["digest"] else ("" if not r.get("arm") else "NO")
            stable = len(set(x["requests"])) == 1
            lines.append("| " + " | ".join([
                f"{r['n']:,}", f"`{label}`", f"{x['requests'][0]:,}" + ("" if stable else f" (varied: {sorted(set(x['requests']))})"),
                _endpoints(x["served"][0]), f"{_best_median(x['cpu_s'])} ({len(x['cpu_s'])})",
                _best_median(x["wall_s"], "{:.1f}"),
                f"{x['rss_first_mb']:.0f} / {x['rss_mb']:.0f} ({x['rss_idle_mb']:.0f})",
                f"{x['instances']:,}", same]) + " |")
    return lines


def goals(rows: list[dict]) -> list[str]:
    big = next((r for r in rows if r["n"] == 100_000), None)
    if not big:
        return []
    g = big["graph"]
    cpu_best, cpu_median = min(g["cpu_s"]), statistics.median(g["cpu_s"])
    rss = g["rss_mb"]
    return [f"Goals of issue 23 for 100,000 instances with Resource Graph: ≤ {GOAL_CPU_S:g} s of CPU a discovery: "
            f"{'met' if cpu_median <= GOAL_CPU_S else 'met by the best run only' if cpu_best <= GOAL_CPU_S else 'not met'} "
            f"({cpu_best:.2f} s best, {cpu_median:.2f} s median); ≤ {GOAL_RSS_MB:g} MB of peak RSS: "
            f"{'met' if rss <= GOAL_RSS_MB else 'not met'} ({g['rss_first_mb']:.0f} MB after one discovery, "
            f"{rss:.0f} MB after {len(g['cpu_s']) + 1} in one process).", ""]


def _segments(marks: list[dict]) -> list[tuple[str, dict, dict]]:
    """(stage, its first mark, its last mark) for each "X begins" … "X ends", in order, and "other" for
    the gaps between them (summed: a token check, the pool, ComputeResources' filter)."""
    out, other = [], None
    for a, b in zip(marks, marks[1:]):
        if a["label"].endswith(" begins") and b["label"] == a["label"].replace(" begins", " ends") \
                and a["label"] != "discover begins":
            out.append((a["label"][:-len(" begins")], a, b))
        else:
            other = (other or []) + [(a, b)]
    return out + [("other", other, None)] if other else out


def profile_section(p: dict, n: int) -> list[str]:
    cpu_marks, heap_marks, rss_marks = p["cpu"]["marks"], p["heap"]["marks"], p["first"]["marks"]
    whole = cpu_marks[-1]["cpu"] - cpu_marks[0]["cpu"]
    mb = 2 ** 20
    lines = [f"### Where one Resource Graph discovery of {n:,} instances goes", "",
             "One fresh process, five discoveries in a row: the first (no warm-up) marks the resident memory "
             "(VmRSS) at each stage; the second the CPU (`time.process_time()` at each stage, and the CPU of "
             "`_ArmPager.fetch` and of `json.loads` added up page by page); the third the "
             "Python heap under "
             "tracemalloc (what is allocated at the end of each stage, and the highest it reached within it); "
             "the fourth runs under pyinstrument and the fifth under cProfile (call counts; its overhead "
             "multiplies the per-item functions' time several times over, so its seconds are not the "
             f"discovery's). The marked discovery took {whole:.2f} s of CPU.", "",
             "| stage | CPU s | share | of which: pages through the pipeline / JSON decoding | Python heap at "
             "its end, MB (highest within) | VmRSS at its end, first discovery, MB |",
             "|---|---:|---:|---:|---:|---:|"]
    heap_segments = {i: seg for i, seg in enumerate(_segments(heap_marks))}
    rss_segments = {i: seg for i, seg in enumerate(_segments(rss_marks))}
    for i, (label, a, b) in enumerate(_segments(cpu_marks)):
        if label == "other":
            seconds = sum(y["cpu"] - x["cpu"] for x, y in a)
            lines.append(f"| other (mostly freeing the shaped listing as `_discover` returns; the token, the pool, the "
                         f"filters between the stages) | {seconds:.2f} | {seconds / whole:.0%} "
                         "| | | |")
            continue
        seconds = b["cpu"] - a["cpu"]
        fetch, decode = b["fetch"] - a["fetch"], b["decode"] - a["decode"]
        split = f"{fetch:.2f} / {decode:.2f}" if fetch or decode else ""
        heap = heap_segments.get(i)
        heap_text = (f"{heap[2]['heap'] / mb:.0f} ({heap[2]['heap_peak'] / mb:.0f})"
                     if heap and heap[2] and heap[2]["heap"] is not None else "")
        rss = rss_segments.get(i)
        rss_text = f"{rss[2]['rss']:.0f}" if rss and rss[2] else ""
        lines.append(f"| {label} | {seconds:.2f} | {seconds / whole:.0%} | {split} | {heap_text} | {rss_text} |")
    if p.get("rss_peak_sampled"):
        at, peak = p["rss_peak_sampled"]
        lines += ["", f"VmRSS: {p['rss_idle_mb']:.0f} MB before the first discovery, at most {peak:.0f} MB during it "
                  f"(sampled every 5 ms, {p['rss_samples']:,} samples), {p['rss_after_first_mb']:.0f} MB after it with "
                  f"its result alive; `ru_maxrss` then {p['ru_maxrss_after_first_mb']:.0f} MB."]
    total = p["cprofile_total_s"]
    lines += ["", f"The functions with the most own time under cProfile ({total:.1f} s in all under the profiler):", "",
              "| function | calls | own s | share | cumulative s |", "|---|---:|---:|---:|---:|"]
    for name, calls, own, cumulative in p["cprofile_functions"][:15]:
        lines.append(f"| `{name}` | {calls:,} | {own:.2f} | {own / total:.0%} | {cumulative:.2f} |")
    return lines + [""]


def instructions_lines(d: dict) -> list[str]:
    """--instructions' result as a short subsection."""
    import re

    def short(name: str) -> str:
        found = re.search(r"\s*\[([^\]]*)\]$", name)                  # the object file
        name = name[:found.start()] if found else name
        where, _, function = name.rpartition(":")
        if where == "???":                                            # no symbol: the library it is in
            return f"{Path(found[1]).name if found else '?'} ({function})"
        return f"{Path(where).name}:{function}" if where else name
    lines = [f"### Instructions of one Resource Graph discovery of {d['n']:,} instances (callgrind)", "",
             f"`python bench/graph_scale.py --instructions {d['n']}`: `valgrind --tool=callgrind` over a child that "
             "runs a warm-up discovery and one more, minus a child that runs the warm-up alone, `PYTHONHASHSEED=0`: "
             f"{d['discovery'] / 1e9:.2f} billion instructions for the one discovery "
             f"({d['child_1']['requests']} queries, {d['child_1']['instances']:,} instances). The C functions "
             "with the most own instructions in that difference:", "",
             "| function | instructions, millions | share |", "|---|---:|---:|"]
    for name, count in d["functions"][1:16]:
        lines.append(f"| `{short(name)}` | {count / 1e6:,.0f} | {count / d['discovery']:.0%} |")
    return lines + [""]


# === Fleet arithmetic: Microsoft's documented limits, the requests a discovery makes ===
INTERVAL = 30.0                   # polling.interval_seconds
ARM_PAGE, GRAPH_PAGE_ROWS = 100, 1000
# (what is counted, scope, bucket size, refill per second, source)
LIMITS = {
    "graph": ("Resource Graph queries (each page is a query)", "per user / principal", 15, 15 / 5,
              "\"Guidance for throttled requests in Azure Resource Graph\": at most 15 queries in every 5-second "
              "window, told by x-ms-user-quota-remaining / -resets-after (\"subject to change\")"),
    "highcost_vm": ("Compute \"High Cost Get VM\": VM List / List All (the VM list and the status-only list)",
                    "per subscription and region, every caller", 900, 300 / 60,
                    "\"Compute throttling limits\" (Microsoft.Compute), subscription level: 300 a minute refill, "
                    "900 bucket (x-ms-ratelimit-remaining-resource HighCostGet3Min)"),
    "highcost_vmss": ("Compute \"High Cost Get VMSS\": scale sets List / List All", "per subscription and region, "
                      "every caller", 1080, 360 / 60, "the same article: 360 a minute, 1,080 bucket "
                      "(HighCostGetVMScaleSet3Min)"),
    "vmss_views": ("Compute scale-set VM list (VMScaleSetVMViews)", "per subscription and region, every caller",
                   6000, 2000 / 60, "the same article: 2,000 a minute, 6,000 bucket (VMScaleSetVMViews3Min)"),
    "arm_reads": ("Resource Manager reads (every GET)", "per principal, subscription and region", 250, 25,
                  "\"Understand how Azure Resource Manager throttles requests\", the regional token bucket "
                  "(since 2024): 250 bucket, 25 a second refill; 15 times that for the subscription across "
                  "all principals"),
}
ALL_PRINCIPALS = 15               # Resource Manager's global subscription limit: 15 × one principal's


def model(n: int) -> dict:
    """Requests of one discovery of n instances (bench/azure_discovery.py's shape), per endpoint."""
    from math import ceil
    s = azure_discovery.shape(n)
    vms = s["vms"] + s["flexible_sets"] * s["per_set"]            # the VM list holds Flexible members too
    sets, uniform = s["uniform_sets"] + s["flexible_sets"], s["uniform_sets"]
    arm = {"vms": ceil(vms / ARM_PAGE), "vms_status": ceil(vms / ARM_PAGE), "nics": ceil(vms / ARM_PAGE),
           "vmss": ceil(sets / ARM_PAGE), "vmss_vms": uniform * ceil(s["per_set"] / ARM_PAGE),
           "vmss_nics": uniform * ceil(s["per_set"] / ARM_PAGE)}
    graph = {"Resources": ceil((2 * vms + sets) / GRAPH_PAGE_ROWS),                 # VMs, their NICs, the sets
             "ComputeResources": ceil(2 * uniform * s["per_set"] / GRAPH_PAGE_ROWS) if uniform else 0}
    return {"arm": arm, "graph": graph}


def uses(n: int) -> dict:
    """Per source, what one discovery takes from each bucket."""
    m = model(n)
    arm, graph = m["arm"], m["graph"]
    return {"arm": {"highcost_vm": arm["vms"] + arm["vms_status"], "highcost_vmss": arm["vmss"],
                    "vmss_views": arm["vmss_vms"], "arm_reads": sum(arm.values())},
            "graph": {"graph": sum(graph.values())}}


def per_cycle(bucket: str, interval: float = INTERVAL) -> float:
    return LIMITS[bucket][3] * interval


def hosts(source: str, n: int, principals: str) -> float:
    """HAProxy hosts that can each run a discovery of n instances every INTERVAL seconds in one
    subscription (one daemon per host); `principals`: "shared" (one identity) or "own" (one each)."""
    fits = []
    for bucket, used in uses(n)[source].items():
        if not used:
            continue
        cap = per_cycle(bucket)
        if bucket in ("graph", "arm_reads") and principals == "own":
            if used > cap:
                return 0                                  # one host alone is throttled
            if bucket == "graph":
                continue                                  # a quota per principal: documented as nothing more
            cap *= ALL_PRINCIPALS
        fits.append(cap // used)
    return min(fits) if fits else float("inf")


def fits(source: str, n: int, count: int = 1, principals: str = "shared") -> bool:
    """Whether `count` daemons, each discovering n instances every INTERVAL seconds in one subscription,
    stay within every bucket (one daemon: count 1)."""
    for bucket, used in uses(n)[source].items():
        cap = per_cycle(bucket)
        if bucket in ("graph", "arm_reads") and principals == "own":
            if used > cap or (bucket == "arm_reads" and used * count > cap * ALL_PRINCIPALS):
                return False
        elif used * count > cap:
            return False
    return True


def max_instances(source: str, count: int = 1, principals: str = "shared", limit: int = 400_000,
                  step: int = 50) -> int:
    best = 0
    for n in range(step, limit, step):
        if fits(source, n, count, principals):
            best = n
        elif n > 2 * best + 10_000:
            break
    return best


def min_interval(source: str, n: int) -> float:
    """The shortest polling interval at which one daemon's discoveries of n instances fit every refill."""
    return max(used / LIMITS[b][3] for b, used in uses(n)[source].items())


def fleet(rows: list[dict]) -> list[str]:
    measured = {r["n"]: r for r in rows}
    lines = [f"## 7. Fleet arithmetic: instances and HAProxy hosts within Azure's limits at {INTERVAL:.0f} s "
             "(bench/graph_scale.py)", "",
             "Computed, not measured, from Microsoft's documented limits and the requests one discovery makes "
             "(section 6 and section 1 measure them; the formulas below give exactly the measured counts at every "
             "size measured). A cycle is sustainable when what it takes from each bucket is at most what the "
             f"bucket refills in one interval ({INTERVAL:.0f} s); a bucket's burst only lets the first cycles "
             "run early. Every figure is for one subscription.", "",
             "| limit | scope | bucket | refill | per 30 s | source |", "|---|---|---:|---:|---:|---|"]
    for bucket, (what, scope, size, rate, source) in LIMITS.items():
        lines.append(f"| {what} | {scope} | {size:,} | {rate * 60:,.0f} a minute | {per_cycle(bucket):,.0f} | {source} |")
    shape = azure_discovery.shape(100_000)
    lines += ["", "Sources: https://learn.microsoft.com/azure/governance/resource-graph/concepts/guidance-for-throttled-requests, "
              "https://learn.microsoft.com/azure/virtual-machines/compute-throttling-limits, "
              "https://learn.microsoft.com/troubleshoot/azure/virtual-machines/windows/troubleshooting-throttling-errors, "
              "https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling. "
              "Resource Graph's POST goes to a tenant-level path; Resource Manager's tenant reads (250, 25 a second per "
              "principal) would allow 750 in 30 s, above Resource Graph's own 90, so they never bind here. Microsoft "
              "Network documents no per-operation buckets for the NIC list: only Resource Manager's reads count it. "
              "Compute's buckets are per region, and Microsoft does not say in which region's bucket a "
              "subscription-wide list counts; the figures assume one (the fake counts it in one), as a subscription "
              "whose VMs span regions would otherwise get more.",
              "", "Requests of one discovery of N instances in this estate's shape (V = standalone VMs + Flexible "
              "members ≈ 0.85 N, each with one NIC; S = Uniform scale sets of 50 with the service tag ≈ 0.003 N; "
              f"public IPs off; Resource Manager pages of {ARM_PAGE} items, as the fake serves them: Azure documents "
              "none, and users report 50 for the VM list, which would double every ARM page count below; Resource "
              f"Graph pages of {GRAPH_PAGE_ROWS:,} rows, its documented maximum):", "",
              "- `arm`: VM list ⌈V/100⌉ + status-only VM list ⌈V/100⌉ + NIC list ⌈V/100⌉ + scale-set list "
              "⌈(S+2)/100⌉ + per Uniform set its VM list and its NIC list, one page each (2 S). Compute's \"High "
              "Cost Get VM\" takes the two VM lists, 2 ⌈V/100⌉; Resource Manager's read bucket takes all of them.",
              "- `resource_graph`: Resources ⌈(2 V + S + 2)/1000⌉ (VMs, their NICs, the scale sets) + "
              "ComputeResources ⌈2 × 50 S/1000⌉ (Uniform instances and their NICs, asked only when a Uniform "
              "set carries the service tag). Only Resource Graph's per-principal quota counts them.", "",
              f"(At 100,000: V = {shape['vms'] + shape['flexible_sets'] * shape['per_set']:,}, "
              f"S = {shape['uniform_sets']}.) Checked against the measured counts:", "",
              "| instances | `arm` requests, formula / measured | `resource_graph` queries, formula / measured |",
              "|---:|---:|---:|"]
    for n in (1000, 5000, 10000, 20000, 50000, 100000):
        m = model(n)
        got = measured.get(n, {})
        arm = got.get("arm", {}).get("requests", [None])[0] if got.get("arm") else SECTION1.get(n, (None, None))[0]
        graph = got.get("graph", {}).get("requests", [None])[0] if got.get("graph") else SECTION1.get(n, (None, None))[1]
        lines.append(f"| {n:,} | {sum(m['arm'].values()):,} / {'–' if arm is None else f'{arm:,}'} | "
                     f"{sum(m['graph'].values()):,} / {'–' if graph is None else f'{graph:,}'} |")
    sizes = (1000, 5000, 10000, 20000, 50000, 100000)
    lines += ["", f"Polling every {INTERVAL:.0f} s. (a) one daemon feeding many targets (`haproxy.targets`: one "
              "discovery a cycle, however many HAProxy hosts it writes to): Azure sees one discoverer, so the "
              "hosts are not limited by Azure at all, and the instances by the row \"one daemon\". (b) one daemon "
              "per host, each discovering: the Compute buckets are the subscription's, shared by every caller; "
              "Resource Manager's read bucket and Resource Graph's quota are per principal, so it matters whether "
              "the hosts share one identity (a user-assigned managed identity or one service principal) or each "
              "has its own (system-assigned identities): with their own, Resource Manager still caps the "
              f"subscription at {ALL_PRINCIPALS} × one principal's reads, and Resource Graph documents nothing "
              "above the per-principal quota.", "",
              "| source | most instances one daemon can discover every 30 s (binding limit) | "
              + " | ".join(f"hosts at {n:,}" for n in sizes) + " |",
              "|---|---:|" + "---:|" * len(sizes)]
    for source in ("arm", "graph"):
        n_max = max_instances(source)
        binding = max(uses(n_max + 50)[source].items(), key=lambda kv: kv[1] / per_cycle(kv[0]))[0]
        label = "`arm`" if source == "arm" else "`resource_graph`"
        lines.append(f"| {label}, (a) one daemon, many targets | {n_max:,} ({LIMITS[binding][0].split(':')[0]}) | "
                     + " | ".join("any" if hosts(source, n, "shared") >= 1 else "0" for n in sizes) + " |")
        for principals, text in (("shared", "one identity"), ("own", "an identity each")):
            cells = []
            for n in sizes:
                h = hosts(source, n, principals)
                cells.append("no limit" if h == float("inf") else f"{int(h):,}")
            lines.append(f"| {label}, (b) one daemon per host, {text} | {n_max:,} for one host | " + " | ".join(cells) + " |")
    counts = (1, 2, 5, 10, 20, 50)
    lines += ["", "The other way round: the largest estate (instances, this shape) that H hosts can each discover every "
              "30 s, one daemon per host:", "",
              "| source | " + " | ".join(f"H = {h}" for h in counts) + " |", "|---|" + "---:|" * len(counts)]
    for source, label in (("arm", "`arm`"), ("graph", "`resource_graph`")):
        for principals, text in (("shared", "one identity"), ("own", "an identity each")):
            lines.append(f"| {label}, {text} | "
                         + " | ".join(f"{max_instances(source, h, principals):,}" for h in counts) + " |")
    lines += ["", "0 = even one discovery every 30 s is throttled: the shortest sustainable interval for one daemon "
              "(the largest of used ÷ refill over the buckets it draws from) is then:", "",
              "| source | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for source, label in (("arm", "`arm`"), ("graph", "`resource_graph`")):
        lines.append(f"| {label} | " + " | ".join(f"{min_interval(source, n):.0f} s" for n in sizes) + " |")
    arm_max, graph_max = max_instances("arm"), max_instances("graph")
    lines += ["", f"In short: at {INTERVAL:.0f} s one subscription can be discovered by the listings up to about "
              f"{arm_max:,} instances (Compute's \"High Cost Get VM\" bucket, shared by every caller of the "
              "subscription: two VM lists of ⌈V/100⌉ pages each cycle; Resource Manager's per-principal reads would "
              f"allow {max(n for n in range(50, 100_000, 50) if uses(n)['arm']['arm_reads'] <= per_cycle('arm_reads')):,}), "
              f"and by Resource Graph up to about {graph_max:,} (15 queries per 5 s: 90 pages of 1,000 rows, two rows "
              "an instance). One daemon feeding many targets costs Azure the same whatever the number of HAProxy "
              "hosts; a daemon per host multiplies the listings' Compute calls by the hosts, whatever identities "
              f"they run as, so the listings fit several hosts only for small estates ({hosts('arm', 1000, 'shared'):.0f} "
              f"hosts at 1,000 instances, {hosts('arm', 5000, 'shared'):.0f} at 5,000), and Resource Graph scales with hosts only when each host has an identity of its own "
              "(the quota is per principal; the estate is still capped at "
              f"{graph_max:,} for each). Past those sizes the daemon stretches its interval itself (azure_quota_"
              "remaining, the stretched interval): the last table is the interval it settles at.", ""]
    return lines + [""]


# Section 1's measured counts (bench/azure_discovery.py at 100 items a page): (arm, graph) requests.
SECTION1 = {1000: (33, 3), 5000: (159, 11), 10000: (315, 21), 20000: (630, 41)}


def report(rows: list[dict], instructions_result: dict | None = None) -> list[str]:
    load = rows[0].get("load", "")
    lines = ["## 6. Scale: 50,000 and 100,000 instances, Resource Graph and the listings (bench/graph_scale.py)", "",
             "Estate: bench/azure_discovery.py's shape at " + "; ".join(
                 f"{r['n']:,}: {r['shape']['vms']:,} standalone VMs + {r['shape']['flexible_sets']}×50 Flexible + "
                 f"{r['shape']['uniform_sets']}×50 Uniform" for r in rows)
             + " (all tagged, 10 services, 2 regions, 4 resource groups, one subscription, no public IPs, 5% "
             "stopped or deallocated). Served by testing/fake_arm.py in a process of its own, each sorted "
             "query's rows sorted once and its pages served from that order (the fake sorts every row again for "
             "every page; bench/graph_scale.py's docstring says what is kept and how it is checked), with "
             "Resource Graph's documented quota of 15 queries per 5 s: a discovery needing more waits for the "
             "window's reset, as the program does against Azure, so its wall time is mostly that wait. "
             "The program's defaults: `azure.workers` 8, `azure.address` private, 1,000 rows a Graph page, "
             "100 items an ARM page.", "",
             "CPU = `time.process_time()` of the measuring process (every thread) for the whole `discover()`: "
             "pipeline, JSON decoding, the rows' shaping, the join and the checks; a fresh process per size and "
             "source, one warm-up discovery first, the previous result alive while the next runs and freed once it "
             "returns, within the measured time (as in the daemon; 0.09 s at 100,000). Peak RSS = `ru_maxrss` after the warm-up discovery and after the last (idle: after imports "
             "and the client's construction). Requests: counted by the client and by the fake, equal in every run. "
             "Same result = both sources found the same (id, address, power state) for every instance."
             + (f" {load}" if load else ""), "",
             *measured_table(rows), "", *goals(rows)]
    big = next((r for r in rows if r.get("profile")), None)
    if big:
        lines += profile_section(big["profile"], big["n"])
    if instructions_result:
        lines += instructions_lines(instructions_result)
    return lines + fleet(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="instances in the estate")
    parser.add_argument("--runs", type=int, default=5, help="measured Graph discoveries per size (default 5)")
    parser.add_argument("--arm-runs", type=int, default=3, help="measured ARM discoveries per size (default 3)")
    parser.add_argument("--no-arm", action="store_true", help="leave out the arm source")
    parser.add_argument("--profile", action="store_true", help="profile one Graph discovery at the largest size")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--instructions", type=int, metavar="N",
                        help="only count one Resource Graph discovery's instructions at N instances under callgrind "
                             "(about half an hour at 100,000) and print them as JSON")
    parser.add_argument("--from-json", help="print the sections from raw results written earlier, measuring nothing")
    parser.add_argument("--instructions-json", help="with --from-json: --instructions' output, for its subsection")
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
    if args.instructions:
        print(json.dumps(instructions(args.instructions), indent=1))
        return
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = run([int(s) for s in args.sizes.split(",")], args.runs, 0 if args.no_arm else args.arm_runs,
                   args.profile)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    counted = json.loads(Path(args.instructions_json).read_text()) if args.instructions_json else None
    print("\n".join(report(rows, counted)))


if __name__ == "__main__":
    main()
