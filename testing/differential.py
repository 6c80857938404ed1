#!/usr/bin/env python3
"""The emulator against a real Data Plane API, compared on the program's own requests.

testing/test_conformance.py with CONFORMANCE_RECORD writes every request the program sent and
the answer it got, as JSON lines. Run the flows once against a real dataplaneapi and once
against the emulator playing that release, then:

    python3 testing/differential.py REAL.jsonl EMULATED.jsonl [--flow NAME]

It walks both records flow by flow, request by request, and prints where they part: another
request (the program decided differently, because an answer differed before), another status,
a header that matters present in one only (Reload-Id, Configuration-Version), another shape of
the answer (keys and types, not values), or another final state of the flow's backends. Ids
(transactions, reloads), ports and versions are normalised: they differ from run to run.
Exit 0 when the records agree, 1 when they differ.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RELOAD_ID = re.compile(r"\d{4}-\d{2}-\d{2}-\d+")
PORT_IN_NAME = re.compile(r"-\d{2,5}-eastus")


def normal(text: str) -> str:
    """A path or name with what differs between runs replaced by placeholders."""
    return PORT_IN_NAME.sub("-PORT-eastus", RELOAD_ID.sub("{reload}", UUID.sub("{id}", text)))


def shape(value, depth: int = 0, prefix: str = "azure"):
    """The keys and types of an answer, without its values (three levels deep). Of a list of
    named objects, only those of the flow (`prefix`) count: the beds hold other sections."""
    if isinstance(value, dict):
        return {normal(k): shape(v, depth + 1, prefix) for k, v in value.items()} if depth < 3 else "object"
    if isinstance(value, list):
        ours = [v for v in value if not (isinstance(v, dict) and isinstance(v.get("name"), str)
                                         and not v["name"].startswith(prefix))]
        return [shape(ours[0], depth + 1, prefix)] if ours else []
    return type(value).__name__


def prefix_of(flow: str) -> str:
    """The flow's backends' prefix, as testing/test_conformance.py names them."""
    return f"azure-{flow.replace('_', '')[:20]}-"


def settled(entries: list[dict]) -> list[dict]:
    """A flow's requests without the polls of a reload that was still in progress: how often the
    program asked depends on the reload delay (5 s on the real server, shortened in the emulator),
    not on what the server does."""
    return [e for n, e in enumerate(entries)
            if not (e["method"] == "GET" and "/reloads/" in e["path"] and n + 1 < len(entries)
                    and key(entries[n + 1]) == key(e) and (e.get("answer") or {}).get("status") == "in_progress")]


def state(servers: dict) -> dict:
    return {name: re.sub(r":\d+$", ":PORT", value) for name, value in (servers or {}).items()}


def read(path: str) -> dict[str, list[dict]]:
    flows: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            flows.setdefault(entry["flow"], []).append(entry)
    return flows


def key(entry: dict) -> str:
    """What the program sent, as it compares between runs."""
    query = ",".join(sorted(k for k in entry.get("query") or {}))
    return f"{entry['method']} {normal(entry['path'])}?{query}"


def differences(real: list[dict], emulated: list[dict], prefix: str = "azure") -> Iterator[str]:
    for n, (a, b) in enumerate(zip(real, emulated), 1):
        if key(a) != key(b):
            yield f"request {n}: the program sent {key(a)} to the real server, {key(b)} to the emulator"
            return                    # the sequences part: what follows is not comparable
        where = f"request {n} ({key(a)})"
        if a["method"] == "STATE":                # what the flow's backends hold at its end
            if state(a["answer"]) != state(b["answer"]):
                yield f"{where}: the backend ends as {state(a['answer'])} real, {state(b['answer'])} emulated"
            continue
        if a["status"] != b["status"]:
            yield f"{where}: status {a['status']} real, {b['status']} emulated"
        ha = {k.lower() for k in a.get("headers") or {}} - {"content-type"}
        hb = {k.lower() for k in b.get("headers") or {}} - {"content-type"}
        if ha != hb:
            yield f"{where}: headers {sorted(ha)} real, {sorted(hb)} emulated"
        sa, sb = shape(a.get("answer"), prefix=prefix), shape(b.get("answer"), prefix=prefix)
        if sa != sb:
            yield f"{where}: answer shaped {json.dumps(sa)[:300]} real, {json.dumps(sb)[:300]} emulated"
    if len(real) != len(emulated):
        yield f"{len(real)} requests real, {len(emulated)} emulated"


# Flows whose requests race (two writers at once, a peer's commit timed against ours): only how
# they end is compared.
RACING = ("two_writers_agree", "a_peer_commit_during_our_transaction_is_replanned")


def compare(real: dict[str, list[dict]], emulated: dict[str, list[dict]], flows: Iterable[str]) -> list[str]:
    out = []
    for flow in flows:
        a, b = settled(real.get(flow, [])), settled(emulated.get(flow, []))
        if flow in RACING:
            a, b = [e for e in a if e["method"] == "STATE"], [e for e in b if e["method"] == "STATE"]
        found = list(differences(a, b, prefix_of(flow)))
        out += [f"{flow}: {d}" for d in found]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("real")
    parser.add_argument("emulated")
    parser.add_argument("--flow", action="append", help="only this flow (repeatable)")
    args = parser.parse_args(argv)
    real, emulated = read(args.real), read(args.emulated)
    flows = args.flow or sorted(set(real) | set(emulated))
    found = compare(real, emulated, flows)
    for line in found:
        print(line)
    print(f"{len(flows)} flows, {sum(len(real.get(f, [])) for f in flows)} requests real, "
          f"{sum(len(emulated.get(f, [])) for f in flows)} emulated: {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
