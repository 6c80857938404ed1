#!/usr/bin/env python3
"""Data Plane half of the benchmark: what keeping HAProxy in sync costs.

Usage: python bench/dataplane.py [--sizes 1000,5000,10000,20000] [--repeats 3]
(bench/bench.py runs it with the other parts and writes bench/RESULTS.md; alone it prints its sections.)

Scenarios. For each estate size N: N running instances, 50 per service (N/100 service names in 2
regions: N/50 backends of 50 live servers in 70 slots with the default slots). The real planner and
client run in-process: `run_cycle(source, [TargetRun(name, cfg, DataPlane(cfg.haproxy), state)], stop)`,
with a source whose `discover()` returns a `Discovery` built directly (part 1 measures the Azure side). Five
scenarios in a row, on one State, against an emulator that starts empty: first sync; steady cycle;
one instance added (to a full service); one removed (from another service); 10% churn (10% of the
instances, drawn at random, replaced by new ones in the same services, as a rolling upgrade does).
After each change one more cycle runs and must be steady (one request), else the report says so.

The emulator (testing/fake_dataplane.py, `check_config=False`: `haproxy -c` on every write would
dominate every figure; its duration is measured once after the first sync, and reported, since
dataplaneapi runs it on every commit and plain write) runs in a process of its own, so the client's
CPU time (`time.process_time`) and peak RSS (/proc VmHWM) are the daemon's alone. Requests are
counted by the client and by the emulator (they must agree); transactions are the emulator's commits
(they must agree with the client's report); reloads are the emulator's count with dataplaneapi's
rules. Planning CPU is the time spent in `plan_cycle` (wrapped; a cycle that applies calls it twice:
plan, then the fixpoint check). Each (size, mode) sequence runs `--repeats` times, each in a fresh
process with a fresh emulator; CPU figures are medians, counts must be equal in every run. v3 in
both apply modes; v2 (transaction mode, one run) for its first sync and the per-cycle read cost.

Reloads on a real HAProxy: the scenario of testing/test_scaling.py without traffic: 3 instances in
one service (10 slots), 10 scale events within the slots (add and remove in turn), then growth past
the slots (to 11 instances in one cycle: 12 slots), against the emulator driving a real HAProxy (live
mode, with `haproxy -c`). Reloads counted by the emulator and by HAProxy's master (`show proc`).
"""
import argparse
import json
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "testing")]

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"
NAME_TAG, PORT_TAG = "HAProxy:Service:Name", "HAProxy:Service:Port"
PER_SERVICE = 50                       # instances a backend
REGIONS = ("eastus", "westeurope")
CHURN = 0.10
SCENARIOS = ("first sync", "steady cycle", "one instance added", "one instance removed", "10% churn")
MODES = ("transaction", "hybrid")
LIVE_EVENTS = 10


# === The emulator, in a process of its own ===
def _serve_emulator(conn, api: str, live: bool) -> None:
    """Run FakeDataPlane until told to stop (or the parent goes away); answer the parent's questions,
    asked between cycles (no request in flight): "counts", or "check" (seconds of one `haproxy -c` of
    the current configuration, best of 3)."""
    from fake_dataplane import FakeDataPlane, haproxy_check
    fake = FakeDataPlane(api=api, check_config=live, live=live or None, reload_delay=0.05).start()
    try:
        conn.send((fake.url, fake.password))
        with tempfile.TemporaryDirectory(prefix="bench-check-") as workdir:
            while (question := conn.recv()) != "stop":
                if question == "check":
                    conn.send(min(timed(haproxy_check, fake.haproxy_bin, fake.render(), workdir)
                                  for _ in range(3)))
                    continue
                counts = dict(requests=len(fake.requests), reloads=fake.reloads, commits=fake.commits,
                              problems=fake.violations + fake.errors)
                fake.reset_requests()
                if fake.live is not None:
                    counts["haproxy_reloads"] = fake.live.reload_count()
                conn.send(counts)
    except EOFError:
        pass
    finally:
        fake.stop()


def timed(function, *args) -> float:
    """Wall seconds of one call that must return (0, output)."""
    started = time.perf_counter()
    status, output = function(*args)
    if status != 0:
        raise RuntimeError(f"haproxy -c failed: {output[-2000:]}")
    return time.perf_counter() - started


class Emulator:
    """testing/fake_dataplane.py's FakeDataPlane in a spawned process: its CPU and memory are not the
    client's. `counts()` = requests since the last call, and the cumulative reloads and commits."""

    def __init__(self, api: str, live: bool = False):
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_serve_emulator, args=(theirs, api, live), daemon=True)
        self._process.start()
        self.url, self.password = self._conn.recv()

    def counts(self) -> dict:
        self._conn.send("counts")
        return self._conn.recv()

    def check_seconds(self) -> float:
        """What dataplaneapi spends on every commit and plain write: `haproxy -c` of the configuration."""
        self._conn.send("check")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._process.join(timeout=60)


# === Children: one measured sequence each ===
class Source:
    """A discovery source whose answer is set by the benchmark."""

    def __init__(self, m):
        self.m, self.instances = m, ()

    def discover(self):
        return self.m.Discovery(tuple(self.instances))


class PlanTimer:
    """Replaces the module's plan_cycle (reconcile looks it up at call time) and adds up its CPU."""

    def __init__(self, m):
        self.plan, self.seconds = m.plan_cycle, 0.0
        m.plan_cycle = self

    def __call__(self, *args, **kwargs):
        started = time.process_time()
        try:
            return self.plan(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - started


def instance(m, i: int, service: str, region: str, address: str | None = None):
    """Running VM number i of a service (its tags) in a region; by default at 10.x.y.z from i."""
    name = f"vm-{i:06d}"
    return m.Instance(f"/subscriptions/{SUBSCRIPTION}/resourcegroups/rg-app/providers/microsoft.compute/"
                      f"virtualmachines/{name}", name, region, {NAME_TAG: service, PORT_TAG: "8080"},
                      address or f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "running")


def scenarios(m, n: int):
    """(scenario, instances) in the order of SCENARIOS; new instances get numbers from n on."""
    backends = max(1, n // PER_SERVICE)
    base = [instance(m, i, f"svc-{i % backends // 2:03d}", REGIONS[i % backends % 2]) for i in range(n)]
    numbers = iter(range(n, 10 * n))

    def newcomer(like):                          # a new instance in the same service as `like`
        return instance(m, next(numbers), like.tags[NAME_TAG], like.region)

    added = [*base, newcomer(base[0])]           # base[0] and base[1] are in different backends
    removed = added[:1] + added[2:]
    victims = set(random.Random(1).sample(range(len(removed)), round(len(removed) * CHURN)))
    churned = [newcomer(inst) if k in victims else inst for k, inst in enumerate(removed)]
    return zip(SCENARIOS, (base, base, added, removed, churned))


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM; unlike ru_maxrss, not carried across exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def cycle(m, cfg, source, dp, state, emulator: Emulator, planning: PlanTimer) -> dict:
    """One measured cycle; the emulator's counters checked against the client's."""
    before = emulator.counts()
    plan_before, cpu = planning.seconds, time.process_time()
    (report,) = m.run_cycle(source, [m.TargetRun(cfg.haproxy.base_url, cfg, dp, state)], m.Flag())
    if report.failure is not None:
        raise report.failure
    cpu = time.process_time() - cpu
    after = emulator.counts()
    committed = after["commits"] - before["commits"]
    if after["requests"] != report.dataplane_requests or committed != report.transactions.get("committed", 0):
        raise SystemExit(f"client and emulator disagree: client {report.dataplane_requests} requests, "
                         f"{report.transactions}; emulator {after['requests']} requests, {committed} commits")
    if after["problems"]:
        raise SystemExit(f"emulator found problems: {after['problems'][:5]}")
    return dict(result=report.result, requests=report.dataplane_requests, transactions=committed,
                reloads=after["reloads"] - before["reloads"], plan_cpu_s=planning.seconds - plan_before,
                cycle_cpu_s=cpu, haproxy_reloads=after.get("haproxy_reloads", 0) - before.get("haproxy_reloads", 0),
                slots=report.plan.slots if report.plan else None)


def config(m, emulator: Emulator, api: str, mode: str):
    return m.parse_config({"azure": {"subscription_id": SUBSCRIPTION},
                           "haproxy": {"base_url": emulator.url, "password": emulator.password,
                                       "api_version": api, "apply_mode": mode}}, {})


def child_scenarios(n: int, mode: str, api: str) -> dict:
    import haproxy_azure_discovery as m
    idle = vm_hwm_mb()
    emulator = Emulator(api)
    try:
        cfg = config(m, emulator, api, mode)
        source, planning = Source(m), PlanTimer(m)
        dp, state = m.DataPlane(cfg.haproxy), m.State()
        rows, check_s = {}, None
        for scenario, instances in scenarios(m, n):
            source.instances = instances
            rows[scenario] = cycle(m, cfg, source, dp, state, emulator, planning)
            check_s = check_s or emulator.check_seconds()
            # The fixpoint: once a change is applied, the same discovery costs one request.
            then = cycle(m, cfg, source, dp, state, emulator, planning)
            rows[scenario]["then"] = f"{then['result']}, {then['requests']} request{'s' * (then['requests'] != 1)}"
    finally:
        emulator.stop()
    return dict(rows=rows, rss_mb=vm_hwm_mb(), idle_rss_mb=idle, check_s=check_s)


def child_live(mode: str, api: str) -> dict:
    """10 scale events within the slots, then growth past them, on a real HAProxy."""
    import haproxy_azure_discovery as m
    emulator = Emulator(api, live=True)
    try:
        cfg = config(m, emulator, api, mode)
        source, planning = Source(m), PlanTimer(m)
        dp, state = m.DataPlane(cfg.haproxy), m.State()
        numbers = iter(range(250))
        running = []

        def add() -> None:
            i = next(numbers)
            running.append(instance(m, i, "web", "eastus", f"127.0.0.{2 + i}"))

        def run() -> dict:
            source.instances = list(running)
            return cycle(m, cfg, source, dp, state, emulator, planning)

        for _ in range(3):
            add()
        run()                                    # first sync
        events = []
        for event in range(LIVE_EVENTS):
            if event % 2 == 0:
                add()
            else:
                running.pop(0)                   # the oldest instance goes
            events.append(run())
        while len(running) <= cfg.haproxy.server_slots.base:
            add()
        growth = run()
    finally:
        emulator.stop()
    return dict(events=events, growth=growth)


CHILDREN = {"scenarios": child_scenarios, "live": child_live}


def child(kind: str, *args) -> dict:
    """Run one child (this script with --child) in a fresh interpreter; its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"dataplane child {kind} {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# === Parent ===
COUNTS = ("result", "requests", "transactions", "reloads", "then")


def run(sizes: list[int], repeats: int) -> dict:
    """Every (size, mode) sequence `repeats` times (v3), v2 once, and the live reloads; progress on stderr."""
    started = time.monotonic()
    sequences = {}
    for n in sizes:
        for api, mode, times in (*(("v3", mode, repeats) for mode in MODES), ("v2", "transaction", 1)):
            runs = [child("scenarios", n, mode, api) for _ in range(times)]
            for other in runs[1:]:
                for scenario, row in other["rows"].items():
                    first = runs[0]["rows"][scenario]
                    if any(row[k] != first[k] for k in COUNTS):
                        raise SystemExit(f"{n} {api} {mode} {scenario}: counts differ between runs: {first} {row}")
            rows = {scenario: {**row, **{k: statistics.median(r["rows"][scenario][k] for r in runs)
                                         for k in ("plan_cpu_s", "cycle_cpu_s")}}
                    for scenario, row in runs[0]["rows"].items()}
            sequences[(n, api, mode)] = dict(rows=rows, rss_mb=max(r["rss_mb"] for r in runs),
                                             idle_rss_mb=runs[0]["idle_rss_mb"],
                                             check_s=statistics.median(r["check_s"] for r in runs))
            print(f"dataplane {n:>6} {api} {mode}: {times} run(s), {time.monotonic() - started:.0f} s so far",
                  file=sys.stderr)
    live = {(mode, api): child("live", mode, api) for mode in MODES for api in ("v3", "v2")}
    print(f"dataplane live: {time.monotonic() - started:.0f} s so far", file=sys.stderr)
    return dict(sizes=sizes, repeats=repeats, sequences=sequences, live=live)


def _pair(rows: tuple[dict, dict], key: str, scale: float = 1) -> str:
    """One figure of both apply modes: "transaction / hybrid"."""
    return " / ".join(f"{row[key] * scale:,.0f}" for row in rows)


def report(results: dict) -> list[str]:
    """The markdown sections of bench/RESULTS.md (parts 2 and 3)."""
    seqs, sizes = results["sequences"], results["sizes"]
    lines = [
        "## 2. Data Plane API: requests, transactions and reloads per scenario (bench/dataplane.py)", "",
        f"Estate: N running instances, {PER_SERVICE} per service (N/{2 * PER_SERVICE} service names in "
        f"{len(REGIONS)} regions = N/{PER_SERVICE} backends of {PER_SERVICE} live servers in 70 slots). The real "
        "planner and client (`run_cycle` with a source returning the instances directly) against "
        "testing/fake_dataplane.py in a process of its own, v3 API, the five scenarios in a row on one state; "
        "10% churn replaces 10% of the instances by new ones in the same services (below the 50% mass-drain "
        "guard; removing one instance is never held).",
        "",
        "Each cell is transaction mode / hybrid mode. Requests: counted by the client and by the emulator "
        "(checked equal); transactions: commits; reloads: the emulator's count with dataplaneapi's rules (every "
        "commit, every plain write but a runtime-capable server PUT). CPU = `time.process_time()` of the client "
        f"process, median of {results['repeats']} run(s) each in a fresh process with a fresh emulator; plan = "
        "`plan_cycle` alone (twice in a cycle that applies: plan, then the fixpoint check). Counts are exact and "
        "stable; CPU times are noisy on this shared 2-core machine. The emulator runs without `haproxy -c` "
        "(it would dominate every figure).",
        "",
        "| instances | scenario | requests | transactions | reloads | plan CPU ms | cycle CPU ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for scenario in SCENARIOS:
            rows = tuple(seqs[(n, "v3", mode)]["rows"][scenario] for mode in MODES)
            lines.append(f"| {n:,} | {scenario} | {_pair(rows, 'requests')} | {_pair(rows, 'transactions')} | "
                         f"{_pair(rows, 'reloads')} | {_pair(rows, 'plan_cpu_s', 1000)} | "
                         f"{_pair(rows, 'cycle_cpu_s', 1000)} |")
    unsettled = [f"{n:,} {api} {mode} {scenario}: {row['then']}" for (n, api, mode), seq in seqs.items()
                 for scenario, row in seq["rows"].items() if row["then"] != "steady, 1 request"]
    slots = {scenario: seqs[(sizes[0], "v3", "hybrid")]["rows"][scenario]["slots"]
             for scenario in ("first sync", "one instance added")}
    lines += [
        "",
        "After every scenario, in every run, the same discovery once more: " +
        (f"NOT steady at one request: {'; '.join(unsettled)}." if unsettled
         else "steady at one request (`GET …/configuration/version`) each time.") +
        f" Slots in all backends at {sizes[0]:,} instances: {slots['first sync']:,} after the first sync, "
        f"{slots['one instance added']:,} after one instance added.",
        "",
        "Per size: backends and slots after the first sync; the client's peak RSS (VmHWM of the fresh process "
        "that ran the sequence; idle = after imports); `haproxy -c` of the configuration after the first sync "
        "(wall, best of 3, median over runs): dataplaneapi runs it on every commit and on every plain write, "
        "each an implicit transaction (client-native `commitTransaction`), so a 10% churn sent as one plain "
        "server PUT per change would cost dataplaneapi writes × that in checks where one transaction pays one "
        "check and one reload (hence haproxy.hybrid_max_writes, past which hybrid mode uses a transaction); "
        "and the v2 API in transaction mode (one run): no full-section reads or writes, so a first "
        "sync writes every server and every cycle that reads reads each backend's servers.",
        "",
        "| instances | backends | slots | peak RSS MB transaction / hybrid (idle) | haproxy -c ms transaction / "
        "hybrid | 10% churn as plain PUTs: writes × haproxy -c, s | v2 first sync requests | v2 first sync cycle CPU ms "
        "| v2 one instance added requests | v2 10% churn requests |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        v3 = tuple(seqs[(n, "v3", mode)] for mode in MODES)
        hybrid, v2 = seqs[(n, "v3", "hybrid")], seqs[(n, "v2", "transaction")]["rows"]
        # every replaced instance is two server changes: its slot parked, a new one filled
        writes, check_ms = 2 * round(n * CHURN), hybrid["check_s"] * 1000
        lines.append(f"| {n:,} | {max(1, n // PER_SERVICE):,} | {v3[0]['rows']['first sync']['slots']:,} | "
                     f"{_pair(v3, 'rss_mb')} ({v3[0]['idle_rss_mb']:.0f}) | {_pair(v3, 'check_s', 1000)} | "
                     f"{writes:,} × {check_ms:.0f} ms = {writes * check_ms / 1000:,.0f} | "
                     f"{v2['first sync']['requests']:,} | {v2['first sync']['cycle_cpu_s'] * 1000:,.0f} | "
                     f"{v2['one instance added']['requests']:,} | {v2['10% churn']['requests']:,} |")
    lines += ["", *live_report(results["live"]), ""]
    return lines


def live_report(live: dict) -> list[str]:
    lines = [
        "## 3. Reloads on a real HAProxy: scale events within the slots, then growth (bench/dataplane.py)", "",
        "testing/test_scaling.py's scenario without the traffic checks: 3 instances in one service (10 slots), "
        f"{LIVE_EVENTS} scale events within the slots (add, remove, in turn), then one growth past them (from 3 "
        "to 11 instances in one cycle: 12 slots), against the emulator driving a real HAProxy in master-worker "
        "mode (reload through the master CLI, runtime `set server` for runtime-capable writes; `haproxy -c` on). "
        "Reloads: emulator's count (dataplaneapi's rules) / HAProxy master's own count (`show proc`).",
        "",
        f"| apply mode | API | reloads for {LIVE_EVENTS} events | per event | reloads for the growth | "
        f"requests for {LIVE_EVENTS} events | requests for the growth |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for (mode, api), r in live.items():
        events = r["events"]
        lines.append(f"| {mode} | {api} | {sum(e['reloads'] for e in events)} / "
                     f"{sum(e['haproxy_reloads'] for e in events)} | "
                     f"{' '.join(str(e['haproxy_reloads']) for e in events)} | "
                     f"{r['growth']['reloads']} / {r['growth']['haproxy_reloads']} | "
                     f"{sum(e['requests'] for e in events)} | {r['growth']['requests']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000,20000", help="estate sizes (instances in total)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each v3 sequence (CPU: the median)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        params = [int(rest[0]), *rest[1:]] if kind == "scenarios" else rest
        print(json.dumps(CHILDREN[kind](*params)))
        return
    print("\n".join(report(run([int(s) for s in args.sizes.split(",")], args.repeats))))


if __name__ == "__main__":
    main()
