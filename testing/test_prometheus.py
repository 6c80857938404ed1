"""The Prometheus rules shipped in contrib/prometheus/, and the metrics they read.

1. `promtool check rules` accepts the rules; every alert has a description and a runbook that
   resolves in the docs, and reads only metrics the program exports.
2. `promtool test rules` runs their unit tests, in which every alert fires once and stays
   silent once.
3. `promtool check metrics` accepts a /metrics page the daemon serves while it runs against
   the fake Resource Manager and the Data Plane API emulator (a skipped instance, a drain).
4. A real Prometheus server scrapes the daemon (the program as a process), evaluates the
   shipped rules, and shows HAProxyAzureDiscoveryNoSuccessfulCycle pending once the Data Plane
   API answers 500 to everything.

`prometheus` and `promtool` come from the distribution's package: testing/setup.sh installs
them. Without them these tests fail (they do not skip): CI must run them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import RELOAD_DELAY, free_port, steps, wait_for  # noqa: E402
from fake_arm import SERVICE_PORT_TAG, make_estate  # noqa: E402
from fake_dataplane import FakeDataPlane  # noqa: E402
from test_docs import anchors  # noqa: E402

RULES_DIR = ROOT / "contrib" / "prometheus"
RULES = RULES_DIR / "haproxy-azure-discovery.rules.yml"
RULE_TESTS = RULES_DIR / "haproxy-azure-discovery.rules.test.yml"
PREFIX = "haproxy_azure_discovery_"
TIMEOUT = 60           # seconds any one promtool or Prometheus step may take at most


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./testing/setup.sh (apt-get install prometheus)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=RULES_DIR, check=False)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- 1. the rules ----------------------------------------------------------------------------
def test_promtool_checks_the_rules():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_says_what_it_means_and_where_its_runbook_is():
    assert len(alerts()) >= 7
    for rule in alerts():
        notes = rule.get("annotations", {})
        assert notes.get("description") and notes.get("summary"), rule["alert"]
        runbook = notes.get("runbook_url", "")
        doc, _, anchor = runbook.partition("#")
        assert anchor in anchors((ROOT / doc).read_text()), (rule["alert"], runbook)
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]


def test_the_rules_read_only_metrics_the_program_exports():
    text = RULES.read_text()
    used = set(re.findall(r"(?<![:\w])" + PREFIX + r"([a-z_]+)", text))    # not recorded rules
    unknown = {name for name in used if name not in m.Metrics.HELP and not (
        name.endswith(("_sum", "_count"))
        and m.Metrics.HELP.get(name.rpartition("_")[0], ("",))[0] == "summary")}
    assert used and not unknown, unknown


# --- 2. their unit tests -----------------------------------------------------------------------
def test_promtool_runs_the_rules_unit_tests():
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never silent"


# --- 3. a live /metrics page -------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def estate(leaving: bool = False):
    """Four VMs of the service and one skipped (a bad port tag); `leaving`: vm-0003 gone."""
    vms = make_estate(vms=5)
    vms.vms[4].tags[SERVICE_PORT_TAG] = "80x"
    if leaving:
        del vms.vms[3]
    return vms


def test_promtool_checks_a_live_metrics_page(arm, arm_config):
    """The daemon, in-process, against the fakes: a first sync, then one instance leaves and
    its server drains (it holds sessions). Both pages pass `promtool check metrics`."""
    arm.estate = estate()
    port = free_port()
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        cfg = arm_config(haproxy={"base_url": dp.url, "password": dp.password,
                                  "server_slots": {"base": 4}},
                         metrics={"listen": f"127.0.0.1:{port}"}, polling={"jitter_seconds": 0})
        pages = []

        def between(_delay):
            pages.append(scrape(port))
            for backend in dp.backends:
                for n in range(1, 5):
                    dp.sessions[(backend, f"srv{n}")] = 2
            arm.estate = estate(leaving=True)

        daemon = m.Daemon(lambda: cfg, lambda c: m.AzureSource(c), lambda c: m.DataPlane(c.haproxy),
                          rand=lambda: 0.0)
        steps(daemon, 3, between)
        target = f'target="{dp.url}"'
    first, draining = pages
    assert f"{PREFIX}servers_live{{{target}}} 4\n" in first
    assert f"{PREFIX}instances_skipped 1\n" in first
    assert f"{PREFIX}servers_draining{{{target}}} 1\n" in draining
    deadline = re.search(rf"^{PREFIX}drain_deadline_timestamp_seconds{{{target}}} (\S+)$",
                         draining, re.MULTILINE)
    assert deadline and float(deadline.group(1)) > time.time()     # due in safety.drain_seconds
    assert f"{PREFIX}azure_quota_remaining{{bucket=" in first
    for page in pages:
        families = set(re.findall(rf"^# TYPE {PREFIX}(\S+) ", page, re.MULTILINE))
        assert families <= set(m.Metrics.HELP), families - set(m.Metrics.HELP)   # no "untyped"
        result = promtool("check", "metrics", stdin=page)
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), page


# --- 4. a Prometheus server ----------------------------------------------------------------------
def api(port: int, path: str, **query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    return body["data"]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_prometheus_sees_the_no_success_alert_pending_when_the_data_plane_api_fails(
        arm, arm_config, tmp_path):
    """The daemon polls every 2 s; Prometheus scrapes it and evaluates the shipped rules
    every second. While cycles succeed no alert is active; once every Data Plane request
    answers 500, three intervals (6 s) pass without a success and the alert goes pending
    (its `for: 1m` keeps it from firing within the test)."""
    started = time.monotonic()
    prometheus = binary("prometheus")
    arm.estate = make_estate(vms=2)
    metrics_port, prometheus_port = free_port(), free_port()
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(arm_config.raw(
            haproxy={"base_url": dp.url, "password": dp.password, "timeout": 2},
            polling={"interval_seconds": 2, "jitter_seconds": 0, "backoff_base_seconds": 0.5,
                     "max_backoff_seconds": 1},
            metrics={"listen": f"127.0.0.1:{metrics_port}"}, logging={"format": "text"})))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "haproxy-azure-discovery",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
        env = {"PATH": os.environ["PATH"], **arm.env()}
        with open(tmp_path / "daemon.log", "w") as log:
            daemon = subprocess.Popen([sys.executable, str(ROOT / "haproxy_azure_discovery.py"),
                                       "-c", str(config)], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=log)
        with open(tmp_path / "prometheus.log", "w") as log:
            server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                      cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(lambda: ready(prometheus_port), 20, "Prometheus to be ready")

            def scraped_success():
                found = api(prometheus_port, "query",
                            query=f'{PREFIX}last_success_timestamp_seconds{{target="{dp.url}"}}')
                return found["result"]
            wait_for(scraped_success, 20, "Prometheus to scrape a successful cycle")

            shipped = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])

            def rules_evaluated():
                rules = [r for g in api(prometheus_port, "rules")["groups"] for r in g["rules"]]
                done = len(rules) == shipped and all(r["health"] != "unknown" for r in rules)
                return done and rules
            rules = wait_for(rules_evaluated, 10, "every rule evaluated")
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            assert api(prometheus_port, "alerts")["alerts"] == []

            dp.add_fault("*", r".*", status=500, times=None)

            def pending():
                return [a for a in api(prometheus_port, "alerts")["alerts"]
                        if a["labels"]["alertname"] == "HAProxyAzureDiscoveryNoSuccessfulCycle"]
            (alert,) = wait_for(pending, 20, "the alert to go pending")
            assert alert["state"] == "pending"
            assert alert["labels"]["target"] == dp.url and alert["labels"]["severity"] == "critical"
            assert alert["annotations"]["runbook_url"] == "docs/operations.md#troubleshooting"
            assert daemon.poll() is None
        finally:
            stop(server)
            stop(daemon)
            dp.clear_faults()
    assert time.monotonic() - started < TIMEOUT
