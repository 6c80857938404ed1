#!/usr/bin/env python3
"""Where the CPU of an Azure discovery goes: the SDK pipeline per page, JSON decoding per page, the join.

Usage: python bench/cpu.py [--size 20000] [--runs 5]
(bench/bench.py runs it with the other parts and writes bench/RESULTS.md; alone it prints its section.)

One estate of --size instances (bench/azure_discovery.py's shape) served by testing/fake_arm.py in a
process of its own; the measuring child (this script with --child) builds `AzureSource`, warms it up
with one discovery, then measures, all as `time.process_time()` of its own process:

- whole discoveries (`AzureSource.discover()`, 8 workers), `--runs` of them: best and median CPU;
- the pages of the subscription's VM list fetched again one by one through the SDK client's pipeline
  as a discovery fetches them (`_ArmPager.fetch`: the listings' policies over the program's own
  urllib3 transport, then the body bytes): CPU per page; the same pages through the same policies
  over azure-core's own transport (requests), as the program fetched them before it had a transport
  of its own: CPU per page; and `json.loads` of the same bodies: CPU per page; all with the collector
  paused, as in a discovery, interleaved, median of `--runs`. Apart they say which one a discovery's
  CPU follows;
- the join alone (`join(inventory_of(...))` on the listed JSON), `--runs` times with the garbage collector
  off (it runs at random points of a cycle and would make the figure noisy): best and median.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "testing"), str(HERE)]

import azure_discovery  # noqa: E402


def child(runs: int) -> dict:
    import haproxy_azure_discovery as m
    cfg = m.parse_config({"azure": {"subscription_id": azure_discovery.SUBSCRIPTION,
                                    "workers": azure_discovery.WORKERS,
                                    "resource_manager_url": os.environ["FAKE_ARM_URL"]},
                          "haproxy": {"password": "x"}}, {})
    source = m.AzureSource(cfg)
    source.discover()                                   # warm-up: token, connections, lazy imports
    discovers = []
    for _ in range(runs):
        cpu = time.process_time()
        found = source.discover()
        discovers.append(time.process_time() - cpu)

    path, api_version, query = m.LISTINGS["VMs"]
    url = (f"{source.pager.base}/subscriptions/{azure_discovery.SUBSCRIPTION}{path}?"
           + urllib.parse.urlencode({"api-version": api_version, **query}))
    urls = []
    while url:
        urls.append(url)
        url = json.loads(source.pager._client.send_request(source.pager.request("GET", url)).body()).get("nextLink")
    from azure.core.pipeline import Pipeline
    from azure.core.pipeline.transport import RequestsTransport
    sdk = Pipeline(RequestsTransport(use_env_settings=False, connection_verify=os.environ["REQUESTS_CA_BUNDLE"]),
                   m._listing_policies(source.pager._credential, source.pager.scope, m._retry_policy(cfg.azure, source._check, lambda: None, m.Flag()),
                                       source.pager._count))
    pipelines, sdk_pipelines, decodings = [], [], []
    for _ in range(runs):                   # as a discovery fetches and decodes: _fetch, collector paused
        with m.collector_paused():
            cpu, bodies = time.process_time(), []
            for url in urls:
                bodies.append(source.pager.fetch(source.pager.request("GET", url)).body())
            pipelines.append((time.process_time() - cpu) / len(urls))
            cpu = time.process_time()
            for url in urls:
                response = sdk.run(source.pager.request("GET", url), stream=True).http_response
                response.read()
            sdk_pipelines.append((time.process_time() - cpu) / len(urls))
            cpu = time.process_time()
            for body in bodies:
                json.loads(body)
            decodings.append((time.process_time() - cpu) / len(urls))
    pipeline, decoding = statistics.median(pipelines), statistics.median(decodings)

    listing = azure_discovery.arm_listing(m, source, cfg)
    joins = []
    for _ in range(runs):
        gc.collect()
        gc.disable()
        cpu = time.process_time()
        m.join(m.inventory_of(listing), cfg.azure)
        joins.append(time.process_time() - cpu)
        gc.enable()
    return dict(instances=len(found.instances), requests=found.requests, discover_best_s=min(discovers),
                discover_median_s=statistics.median(discovers),
                pages=len(urls), page_bytes=round(statistics.mean(map(len, bodies))),
                pipeline_ms=pipeline * 1000, decoding_ms=decoding * 1000,
                sdk_pipeline_ms=statistics.median(sdk_pipelines) * 1000,
                join_best_s=min(joins), join_median_s=statistics.median(joins))


def run(size: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        estate = Path(tmp) / "estate.json"
        subprocess.run([sys.executable, azure_discovery.__file__, "--write-estate", str(size), str(estate)],
                       check=True, capture_output=True)
        fake = azure_discovery.Fake(estate, Path(tmp) / "fake", 100)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_"))}
            done = subprocess.run([sys.executable, __file__, "--child", "--runs", str(runs)],
                                  env={**env, **fake.env}, capture_output=True, text=True, timeout=1800)
        finally:
            fake.stop()
    if done.returncode != 0:
        raise SystemExit(f"bench/cpu.py child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def report(r: dict, runs: int) -> list[str]:
    ratio = r["pipeline_ms"] / r["decoding_ms"] if r["decoding_ms"] else float("inf")
    return [
        "## 5. Where an Azure discovery's CPU goes (bench/cpu.py)", "",
        f"{r['instances']:,} instances, {r['requests']} requests a discovery (part 1's estate, 100 items a "
        "page). CPU = `time.process_time()` of the measuring process; pipeline = one page of the VM list "
        "through the SDK client's pipeline as a discovery sends it (credential, retry and redirect policies, "
        "the program's urllib3 transport, TLS), body bytes read; requests' = the same pages through the same "
        "policies over azure-core's own transport (requests over urllib3); decoding = `json.loads` of the "
        "same bytes (both medians, collector paused as in a discovery); join = `join(inventory_of(...))` alone "
        f"on the listed JSON, garbage collector off (as in a discovery); {runs} runs of each.", "",
        "| discover CPU s, best / median | pages of the VM list | bytes a page | pipeline CPU ms a page "
        "| the same over requests' transport | JSON decoding CPU ms a page | pipeline / decoding "
        "| join CPU ms, best / median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['discover_best_s']:.2f} / {r['discover_median_s']:.2f} | {r['pages']} | {r['page_bytes']:,} "
        f"| {r['pipeline_ms']:.2f} | {r['sdk_pipeline_ms']:.2f} | {r['decoding_ms']:.2f} | {ratio:.0f}× "
        f"| {r['join_best_s'] * 1000:.0f} / {r['join_median_s'] * 1000:.0f} |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="instances in the estate (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="runs of the discovery and of the join (default 5)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.runs)))
        return
    print("\n".join(report(run(args.size, args.runs), args.runs)))


if __name__ == "__main__":
    main()
