"""The documentation: README.md, docs/*.md and bench/RESULTS.md.

1. Links. Every relative link points at a file of the repository, and every `#anchor` it names (in the
   same file or in another Markdown file) is a heading there. Anchors follow GitHub's rules, kept simple:
   lower-case; every character that is not a letter, a digit, '_', '-' or a space removed; each space
   turned into '-' (so "A … B" gives "a--b"); a heading seen before gets "-1", "-2", … Only `#` headings
   are anchors (no setext headings, no HTML `id`s). Links inside code (fenced blocks, `code spans`) are
   not links. A link to a file that is not Markdown may name only a GitHub line anchor (`#L10`, `#L10-L20`).

2. The README's quick start, as written. Its fenced blocks are read line by line: `install` lines name
   files of the repository, `systemctl` lines are checked but not run (no systemd here), the line that
   reads the unit's environment file is run before each command, and each
   `python3 …/haproxy-azure-discovery.pyz ARGS` line is run as `python3 haproxy_azure_discovery.py ARGS`
   (no .pyz build) against the fake Resource Manager and the Data Plane API emulator, with the paths under
   /etc/haproxy-azure-discovery/ moved to a temporary directory, config.example.json edited the way the
   quick start says (the Data Plane URL, the Resource Manager URL) and the environment file holding what
   the example's `${VAR}`s and the fake's managed identity need. `systemctl enable --now` is stood in for by
   one `--once` cycle, the daemon's first.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


# --- Markdown, as much of it as the links need ---

def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif match.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (see the module docstring)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a Markdown text give, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str):
    """(line number, target) of every link outside code."""
    for number, line in prose_lines(text):
        reference = REFERENCE_LINK.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        for match in INLINE_LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the relative links of one Markdown file, one line each."""
    problems = []
    for number, target in links(path.read_text()):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(root)}:{number}: {target}"
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where}: outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text()):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
        elif anchor and not (dest.is_file() and LINE_ANCHOR.fullmatch(anchor)):
            problems.append(f"{where}: an anchor into something that is not Markdown")
    return problems


# --- 1. links ---

@pytest.mark.parametrize("heading, expected", [
    ("Apply modes, and what they cost HAProxy", "apply-modes-and-what-they-cost-haproxy"),
    ('Azure Resource Graph (`azure.source: "resource_graph"`)', "azure-resource-graph-azuresource-resource_graph"),
    ("2. Data Plane API: requests, transactions and reloads per scenario (bench/dataplane.py)",
     "2-data-plane-api-requests-transactions-and-reloads-per-scenario-benchdataplanepy"),
    ("Assigned once, settled backends remembered (47028b8 … 445bbdc)",
     "assigned-once-settled-backends-remembered-47028b8--445bbdc"),
    ("The fakes in testing/", "the-fakes-in-testing"),
    ("Network: proxies and CA bundles", "network-proxies-and-ca-bundles"),
    ("See [the guard](haproxy.md#x)", "see-the-guard"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_anchors_number_duplicates_and_skip_code():
    text = "# Setup\n\n```sh\n# not a heading\n```\n\n## Setup\n### Setup ###\n"
    assert anchors(text) == {"setup", "setup-1", "setup-2"}


def test_broken_links_are_found(tmp_path):
    """The checker itself: each kind of broken link is reported, good ones and code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Known heading\n")
    (tmp_path / "tool.py").write_text("print()\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#known-heading) [ok](#top) [ok](tool.py#L1) [web](https://example.com/x)\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#unknown) [bad local](#nowhere)\n"
        "[out](../elsewhere.md) [anchor in code](tool.py#main)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link either](nowhere.md)\n```\n")
    problems = broken_links(readme, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/missing.md", "docs/a.md#unknown", "#nowhere", "../elsewhere.md", "tool.py#main"], problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert path.exists(), path
    assert broken_links(path) == []


def test_docs_are_all_listed():
    """Every docs/ file is reachable from the README's table of contents."""
    readme = ROOT / "README.md"
    targets = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme.read_text())}
    assert [p.name for p in DOCS if p.parent.name == "docs" and p.resolve() not in targets] == []


# --- 2. the README's quick start ---

PYZ = re.compile(r"^python3 (\S*haproxy-azure-discovery\.pyz)( .*)$")
ENV_LINE = re.compile(r"^set -a; \. (\S+); set \+a$")


def section(text: str, title: str) -> str:
    """The text under a `##` heading, up to the next heading of the same or a higher level."""
    out, inside = [], False
    for line in text.splitlines():
        match = re.match(r"^(#{1,2})\s+(.*)$", line)
        if match:
            if inside:
                break
            inside = match.group(2).strip() == title
            continue
        if inside:
            out.append(line)
    assert out, f"no section {title!r}"
    return "\n".join(out)


def quick_start_commands() -> list[str]:
    """The command lines of the quick start's fenced blocks, comments dropped."""
    commands, fenced = [], False
    for line in section((ROOT / "README.md").read_text(), "Quick start").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        if fenced and line and not line.startswith("#"):
            commands.append(line)
    return commands


def unit_setting(key: str) -> str:
    """A setting of the systemd unit in the repository (the first one)."""
    text = (ROOT / "haproxy-azure-discovery.service").read_text()
    return re.search(rf"^{key}=(.*)$", text, re.M).group(1).strip()


def test_quick_start_matches_the_unit():
    """The quick start names the paths the unit uses, and its steps are all there."""
    commands = quick_start_commands()
    exec_start = shlex.split(unit_setting("ExecStart"))      # python3 PYZ -c CONFIG
    env_file = unit_setting("EnvironmentFile").lstrip("-")
    runs = [m for m in map(PYZ.match, commands) if m]
    assert {m.group(1) for m in runs} == {exec_start[1]}
    assert all(f"-c {exec_start[3]}" in m.group(2) for m in runs)
    assert [m.group(2).split()[0] for m in runs] == ["--validate", "--dry-run", "--status"]
    assert [c for c in commands if ENV_LINE.match(c)] == [f"set -a; . {env_file}; set +a"]
    assert "systemctl daemon-reload && systemctl enable --now haproxy-azure-discovery" in commands
    for command in commands:
        if command.startswith("install "):
            source = shlex.split(command)[-2]
            assert source == "/dev/null" or (ROOT / source).is_file(), command
            assert shlex.split(command)[-1].startswith(("/etc/haproxy-azure-discovery/", "/etc/systemd/system/"))
        else:
            assert command.startswith("systemctl ") or ENV_LINE.match(command) or PYZ.match(command), \
                f"a quick-start line this test does not know how to check: {command}"


@pytest.fixture
def fakes():
    """The fake Resource Manager (3 VMs of service web, port 8080) and a v3 Data Plane API emulator."""
    from fake_arm import FakeArm, make_estate
    from conftest import RELOAD_DELAY
    from fake_dataplane import FakeDataPlane
    with FakeArm(make_estate(vms=3)) as arm, FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        yield arm, dp
        assert dp.violations == [] and dp.errors == []


def test_quick_start_runs_as_written(fakes, tmp_path):
    from fake_arm import DEFAULT_SUBSCRIPTION
    arm, dp = fakes
    etc = tmp_path / "etc"
    etc.mkdir()
    # install -D -m 0644 config.example.json /etc/haproxy-azure-discovery/config.json, then edit it
    config = json.loads((ROOT / "config.example.json").read_text())
    config["haproxy"]["base_url"] = dp.url
    config["azure"]["resource_manager_url"] = arm.url
    (etc / "config.json").write_text(json.dumps(config, indent=2))
    # install -m 0600 /dev/null /etc/haproxy-azure-discovery/env, then DATAPLANE_PASSWORD=..., AZURE_*=...
    env = {k: v for k, v in arm.env().items() if k != "FAKE_ARM_URL"}
    env.update(DATAPLANE_PASSWORD=dp.password, AZURE_SUBSCRIPTION_ID=DEFAULT_SUBSCRIPTION)
    (etc / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))

    def local(command: str) -> str:
        command = command.replace("/etc/haproxy-azure-discovery/", f"{etc}/")
        return PYZ.sub(lambda m: f"{shlex.quote(sys.executable)} haproxy_azure_discovery.py{m.group(2)}", command)

    def run(command: str) -> subprocess.CompletedProcess:
        script = "\n".join(filter(None, [local(env_line), local(command)]))
        result = subprocess.run(["bash", "-euc", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"})
        for secret in (dp.password, arm.token, arm.identity_header):
            assert secret not in result.stdout + result.stderr
        return result

    env_line, outputs = "", {}
    for command in quick_start_commands():
        if ENV_LINE.match(command):
            env_line = command
        elif "enable --now" in command:        # the daemon's first cycle
            result = run("python3 haproxy-azure-discovery.pyz --once -c /etc/haproxy-azure-discovery/config.json")
            assert result.returncode == 0, result.stderr[-3000:]
        elif PYZ.match(command):
            result = run(command)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            outputs[PYZ.match(command).group(2).split()[0]] = result.stdout
            if "--dry-run" in command:
                assert dp.backends == {}, "--dry-run changed HAProxy"

    assert outputs["--validate"].strip() == f"{etc}/config.json: configuration ok"
    plan = outputs["--dry-run"]
    assert "backend azure-web-8080-eastus (create" in plan, plan
    for address in ("10.0.0.4:8080", "10.0.0.5:8080", "10.0.0.6:8080"):
        assert address in plan and address in outputs["--status"]
    status = outputs["--status"]
    assert status.startswith("discovery: 1 services, 3 instances, 0 skipped"), status
    assert "1 backends, in sync" in status, status
