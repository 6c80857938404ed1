#!/usr/bin/env python3
"""CPU time of the pure core (filter, group, slots, plan) over a large estate.

Usage: python3 bench/core.py [INSTANCES] [SERVICES]   (default 10000 in 1000 services)
Prints the CPU seconds of a first sync, of an unchanged cycle, of a 10% churn cycle, and of one
instance added after the unchanged cycle (one backend changes; the others are as the cycle before
found them, settled). Each cycle runs REPEAT times from the same start, after a collection of the
garbage the runs before it left (a collection it would otherwise pay for), and the least CPU time
counts: machines here are shared and noisy.
"""
import gc
import dataclasses
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import haproxy_azure_discovery as m  # noqa: E402


REPEAT = 5


def estate(n: int, services: int, rng: random.Random) -> list:
    return [m.Instance(f"/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachines/vm{i}",
                       f"vm{i}", "eastus", {"HAProxy:Service:Name": f"svc{i % services}",
                                            "HAProxy:Service:Port": "8080"},
                       f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "running")
            for i in rng.sample(range(1, 10 * n), n)]


def cycle(instances, actual, state, cfg):
    groups, skipped = m.select_instances(instances, cfg)
    decision = m.plan_cycle(groups, skipped, actual, state, cfg)
    for b in decision.plan.backends:
        actual[b.name] = m.BackendState(b.name, b.fields, b.servers)
    state.assignments, state.settled = decision.assignments, decision.settled     # as the daemon records them
    return decision.plan


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    services = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
    rng = random.Random(1)
    cfg = m.parse_config({"azure": {"subscription_id": "00000000-0000-0000-0000-000000000001"},
                          "haproxy": {"password": "x"}, "safety": {"max_drain_percent": 100}}, {})
    instances = estate(n, services, rng)
    actual, state = {}, m.State()
    rows, settled = [], None
    for label, insts in [("first sync", instances), ("unchanged", instances),
                         ("10% churn", rng.sample(instances, n - n // 10) + estate(n // 10, services, rng)),
                         ("one added", instances + estate(1, services, random.Random(2)))]:
        if label == "one added":
            actual, state = settled       # after the unchanged cycle, not after the churn
        best = None
        for _ in range(REPEAT):
            a, s = dict(actual), dataclasses.replace(state)
            gc.collect()
            started = time.process_time()
            plan = cycle(insts, a, s, cfg)
            took = time.process_time() - started
            best = took if best is None else min(best, took)
        actual, state = a, s
        rows.append((label, best, len(plan.backends)))
        if label == "unchanged":
            settled = dict(actual), dataclasses.replace(state)
    print(f"pure core, {n} instances in {services} services")
    for label, seconds, backends in rows:
        print(f"  {label:<11} {seconds * 1000:8.0f} ms CPU  {backends:5d} backends changed")


if __name__ == "__main__":
    main()
