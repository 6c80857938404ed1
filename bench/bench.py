#!/usr/bin/env python3
"""The whole benchmark in one command: prints the tables and writes bench/RESULTS.md.

Usage: python bench/bench.py [--sizes 1000,5000,10000,20000] [--quick] [--repeats N] [--scale] [--out FILE]

  1. Azure: requests and cost of one discovery cycle, ours against per-VM lookups (bench/azure_discovery.py)
  2. Data Plane API: requests, transactions, reloads and CPU per scenario, both apply modes (bench/dataplane.py)
  3. Reloads on a real HAProxy: 10 scale events within the slots, then growth (bench/dataplane.py)
  4. The pure core: 10,000 instances in 1,000 services (bench/core.py)
  5. Where an Azure discovery's CPU goes at the largest size: SDK pipeline, JSON decoding, join (bench/cpu.py)
  6. and 7. Scale: 50,000 and 100,000 instances with Resource Graph and the listings, where that time and memory
     go, and the fleet arithmetic of Azure's limits (bench/graph_scale.py, about 25 minutes): only with --scale;
     without it these sections of the existing --out file are kept as they are.

--quick: sizes 1000,5000 (unless --sizes says otherwise) and one run of each sequence instead of three.
Every measurement runs in a child process; this one only orchestrates and stays small (the children's
peak RSS must not inherit its own).
"""
import argparse
import datetime
import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import azure_discovery
import cpu
import dataplane
import graph_scale

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROGRAM = ROOT / "haproxy_azure_discovery.py"
PACKAGES = ("azure-core", "azure-identity", "azure-mgmt-compute", "azure-mgmt-network", "jsonschema")


def core(repeats: int) -> list[str]:
    """Part 4: bench/core.py `repeats` times; the median CPU of each row."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, str(HERE / "core.py")], check=True, capture_output=True,
                             text=True).stdout
        runs.append(re.findall(r"^\s+(.+?)\s+(\d+) ms CPU\s+(\d+) backends changed$", out, re.M))
    if not runs[0] or any(len(r) != len(runs[0]) for r in runs):
        raise SystemExit(f"bench/core.py printed something unexpected:\n{out}")
    lines = [
        "## 4. The pure core (bench/core.py)", "",
        "`select_instances` and `plan_cycle` alone, no I/O, on 10,000 instances in 1,000 services (10 a service: "
        "the base slot count) on one region; 10% churn replaces 1,000 instances by new ones in random services. "
        f"CPU = `time.process_time()`, median of {repeats} run(s). The daemon reaches this code only when the "
        "configuration version or the discovery changed; an unchanged cycle in the daemon is part 2's steady cycle.",
        "",
        "| cycle | CPU ms | backends changed |", "|---|---:|---:|",
    ]
    for k, (label, _, backends) in enumerate(runs[0]):
        lines.append(f"| {label} | {statistics.median(int(r[k][1]) for r in runs):,.0f} | {int(backends):,} |")
    return lines + [""]


KEPT_FROM = "## 6. "       # bench/graph_scale.py's sections: kept from the last --out unless --scale reruns them


def kept_sections(path: Path) -> list[str]:
    """Sections 6 and 7 of an existing results file (everything from the heading of section 6 on), as they are."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    start = next((i for i, line in enumerate(lines) if line.startswith(KEPT_FROM)), None)
    return [] if start is None else lines[start:] + [""]


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    with open("/proc/meminfo") as f:
        memory = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 1024 ** 2
    haproxy = subprocess.run(["/usr/sbin/haproxy", "-v"], capture_output=True, text=True).stdout.split(" - ")[0]
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)
    return (f"{len(os.sched_getaffinity(0))} CPUs ({cpu}, {platform.machine()}), {memory:.0f} GiB, Linux "
            f"{platform.release()}; Python {platform.python_version()}; {versions}; {haproxy.strip()}")


def program() -> str:
    """The commit measured, and whether the program had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", PROGRAM.name)
    return f"{PROGRAM.name} at commit {git('rev-parse', '--short', 'HEAD')}" + \
        (" with uncommitted changes" if dirty else "")


def digest() -> str:
    return hashlib.sha256(PROGRAM.read_bytes()).hexdigest()


def header(args, measured: str, runtimes: dict[str, float]) -> list[str]:
    spent = ", ".join(f"{part} {seconds / 60:.1f}" for part, seconds in runtimes.items())
    return [
        "# Benchmark results", "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {measured}.", "",
        f"Machine: {machine()}.", "",
        f"Reproduce: `python bench/bench.py{' ' + ' '.join(map(shlex.quote, sys.argv[1:])) if sys.argv[1:] else ''}` "
        f"(sizes {', '.join(f'{n:,}' for n in args.sizes)}; {args.repeats} run(s) of each Data Plane sequence "
        "and of the core; `--quick`: sizes 1,000 and 5,000, one run). Everything runs on this machine against "
        "the fakes of testing/: the HTTPS fake of Resource Manager (testing/fake_arm.py) and the Data Plane "
        f"API emulator (testing/fake_dataplane.py), which shares the cores. Run time {sum(runtimes.values()) / 60:.1f} "
        f"min ({spent}).", "",
        "Request, transaction and reload counts and their ratios are exact and repeat from run to run; times "
        "are noisy on a shared 2-core machine: read them as orders of magnitude.", "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="estate sizes, instances in total (default 1000,5000,10000,20000)")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,5000 and one run of each sequence")
    parser.add_argument("--repeats", type=int, help="runs of each Data Plane sequence and of the core (default 3)")
    parser.add_argument("--scale", action="store_true",
                        help="rerun sections 6 and 7 (bench/graph_scale.py: 50,000 and 100,000 instances, about "
                             "25 minutes) instead of keeping them from --out")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("1000,5000" if args.quick else "1000,5000,10000,20000")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)

    measured, before = program(), digest()
    runtimes, sections = {}, []
    parts = [("Azure", lambda: azure_discovery.report(azure_discovery.run(args.sizes))),
             ("Data Plane", lambda: dataplane.report(dataplane.run(args.sizes, args.repeats))),
             ("core", lambda: core(args.repeats)),
             ("CPU", lambda: cpu.report(cpu.run(max(args.sizes), 5), 5))]
    if args.scale:
        parts.append(("scale", lambda: graph_scale.report(graph_scale.run(graph_scale.SIZES, 5, 3, True))))
    for part, measure in parts:
        started = time.monotonic()
        sections += measure()
        runtimes[part] = time.monotonic() - started
    if not args.scale:
        sections += kept_sections(Path(args.out))
    text = "\n".join(header(args, measured, runtimes) + sections)
    print(text)
    if digest() != before:
        raise SystemExit(f"{PROGRAM.name} changed during the run: the figures mix two programs; "
                         f"{args.out} left as it was, run again")
    Path(args.out).write_text(text)
    print(f"wrote {args.out} in {sum(runtimes.values()) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
