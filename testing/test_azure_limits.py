"""Azure as it pages, throttles and differs by cloud: Resource Graph serving unsorted rows in a
new order every page, its quota and errors, Compute's buckets and their headers, a Uniform scale
set a cloud's ComputeResources lacks, instances being deleted, credentials in private clouds and
workload identity. The real SDK pipeline and credentials against the fake Resource Manager.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import haproxy_azure_discovery as m  # noqa: E402
from conftest import azure_env, one_cycle, steps  # noqa: E402
from fake_arm import AZURE_CHINA_COMPUTE_TYPES, make_estate  # noqa: E402
from test_haproxy_azure_discovery import dp_section  # noqa: E402


def graph(arm_config, **azure) -> m.AzureSource:
    return m.AzureSource(arm_config(azure={"source": "resource_graph", **azure}))


# --- Resource Graph ------------------------------------------------------------------------------
def test_shuffled_pages_lose_no_row(arm, arm_config):
    """3,200 rows (1,600 VMs and their NICs) paged 1,000 at a time, the fake serving an unsorted
    query in a new order on every page, as Azure may: sorted by id, every running instance is
    served, and four discoveries are identical."""
    arm.estate = make_estate(vms=1600, not_running=0.25, seed=3)
    arm.graph_seed = 11
    running = {p.inst.name for p in arm.estate.machines() if p.inst.power_state == "running"}
    seen = []
    for _ in range(4):
        discovery = graph(arm_config).discover()
        seen.append(sorted((i.name, i.address, i.power_state) for i in discovery.instances))
    assert all(s == seen[0] for s in seen)
    assert {name for name, _, state in seen[0] if state == "running"} == running and len(running) > 1000
    assert arm.counts["graph"] == 4 * 4                  # 3,200 rows + 1,600 NICs' ... in pages of 1,000


def test_without_the_sort_the_same_pages_lose_rows(arm, arm_config, monkeypatch):
    """The test above can fail: the same estate, the query without its `order by`, loses or
    repeats rows, and the row count check refuses it (nothing is applied)."""
    arm.estate = make_estate(vms=1600, seed=3)
    arm.graph_seed = 11
    monkeypatch.setattr(m, "GRAPH_QUERY", m.GRAPH_QUERY.replace("\n| order by id asc", ""))
    with pytest.raises(m.AzureError, match=r"the pages do not add up"):
        graph(arm_config).discover()


@pytest.mark.parametrize("status", ["502", "408", "429", "503"])
def test_a_graph_query_answered_an_error_without_retry_after_is_retried(arm, arm_config, status):
    arm.estate = make_estate(vms=3)
    arm.add_fault(status, endpoint="graph", retry_after=None)
    assert len(graph(arm_config).discover().instances) == 3
    assert arm.counts["graph"] == 2


def test_a_uniform_set_this_clouds_compute_resources_lacks_is_a_clear_error(arm, arm_config):
    arm.estate = make_estate(vms=2, uniform_sets=1, per_set=3)
    arm.graph_compute_types = AZURE_CHINA_COMPUTE_TYPES
    with pytest.raises(m.AzureError, match=r"scale set \S+ has capacity 3, and Resource Graph's ComputeResources "
                                           r"table has no instance of it .*use azure.source \"arm\" in this cloud"):
        graph(arm_config).discover()
    arm.graph_compute_types = None
    assert len(graph(arm_config).discover().instances) == 5


def test_an_instance_being_deleted_drains_under_resource_graph(arm, arm_config, dataplane):
    arm.estate = make_estate(vms=3)
    cfg = arm_config(azure={"source": "resource_graph", "timeout": 30}, haproxy=dp_section(dataplane),
                     safety={"drain_seconds": 30})
    source, client, state = m.AzureSource(cfg), m.DataPlane(cfg.haproxy), m.State()
    assert one_cycle(cfg, source, client, state, m.Flag()).result == "applied"
    for backend, b in dataplane.backends.items():          # sessions at every server: it must drain
        for server in b["servers"]:
            dataplane.sessions[(backend, server)] = 1
    arm.estate.update("vm-0001", provisioning_state="Deleting")
    assert {i.name: i.power_state for i in source.discover().instances}["vm-0001"] == "deleting"
    report = one_cycle(cfg, source, client, state, m.Flag())
    assert [d.address for d in report.plan.draining] == [next(
        p.inst.private_ip for p in arm.estate.machines() if p.inst.name == "vm-0001")]


# --- throttling ----------------------------------------------------------------------------------
def test_the_read_buckets_are_read_from_every_answer():
    assert m.quota_headers({"x-ms-ratelimit-remaining-resource":
                            "Microsoft.Compute/HighCostGet3Min;159,Microsoft.Compute/HighCostGet30Min;799",
                            "x-ms-ratelimit-remaining-subscription-reads": "11987",
                            "x-ms-user-quota-remaining": "¹"}) == {
        "HighCostGet3Min": 159, "HighCostGet30Min": 799, "subscription-reads": 11987}
    # 10 VM list pages a cycle, 4 left, 300 a minute refill: 1.2 s is within a 30 s interval; 1,000
    # pages against 40 left want 192 s.
    assert m.quota_wait_seconds({"HighCostGet3Min": 4}, {"HighCostGet3Min": 10}, 30) == (0.0, "")
    assert m.quota_wait_seconds({"HighCostGet3Min": 40}, {"HighCostGet3Min": 1000}, 30) == (192.0, "HighCostGet3Min")
    assert m.quota_wait_seconds({"Unknown3Min": 0}, {"Unknown3Min": 1000}, 30) == (0.0, "")


def test_a_throttled_compute_bucket_shows_and_stretches_the_interval(arm, arm_config, caplog):
    """A cycle of 200 VM list pages (VMs and power states, a VM a page) against a bucket of 230
    that refills 300 a minute, as Compute documents "High Cost Get VM": 30 left, so the next
    cycle must wait (200 - 30) / 300 minutes, 34 s, more than the 30 s interval; then the
    buckets are full again."""
    arm.estate = make_estate(vms=100)
    arm.page_size = 1
    arm.compute_buckets = {**arm.compute_buckets, "HighCostGet3Min": (230.0, 0.0)}
    source = m.AzureSource(arm_config())
    with caplog.at_level("INFO", logger="haproxy_azure_discovery"):
        first = source.discover()
        assert first.quota["HighCostGet3Min"] == 30 and first.wait == pytest.approx(34)
        arm.compute_buckets = {**arm.compute_buckets, "HighCostGet3Min": (10000.0, 0.0)}     # refilled
        assert source.discover().wait == 0
    events = [r.event for r in caplog.records if r.event in ("azure_quota_stretch", "azure_quota_normal")]
    assert events == ["azure_quota_stretch", "azure_quota_normal"]
    assert "HighCostGet3Min has 30 requests left and a cycle takes 200" in next(
        r.getMessage() for r in caplog.records if r.event == "azure_quota_stretch")
    metrics = m.Metrics(30)
    metrics.record([m.CycleReport(target="t", azure_quota=first.quota, azure_wait=first.wait)], time.time())
    assert 'haproxy_azure_discovery_azure_quota_remaining{bucket="HighCostGet3Min"} 30' in metrics.render()


def test_the_daemon_sleeps_as_long_as_the_buckets_ask():
    from test_haproxy_azure_discovery import EmptyDataPlane, make_config

    class Waiting:
        def discover(self):
            return m.Discovery((), (), 3, {"HighCostGet3Min": 2}, 200.0)
    cfg = make_config(polling={"interval_seconds": 30, "jitter_seconds": 0})
    assert steps(m.Daemon(lambda: cfg, lambda c: Waiting(), lambda c: EmptyDataPlane()), 2) == [200.0]


def test_a_429_waits_its_retry_after_with_keepalives(arm, arm_config):
    arm.estate = make_estate(vms=2)
    arm.add_fault("429", endpoint="vms", retry_after=3)
    heard = []
    source = m.AzureSource(arm_config(azure={"timeout": 10}), None, None, lambda: heard.append(time.monotonic()))
    started = time.monotonic()
    assert len(source.discover().instances) == 2
    assert 3 <= time.monotonic() - started < 8 and len([t for t in heard if t - started < 3]) >= 2


# --- credentials in every cloud ------------------------------------------------------------------
def test_default_credentials_with_a_client_secret_log_in_at_the_clouds_own_endpoint(arm, arm_config, monkeypatch):
    arm.estate = make_estate(vms=2)
    arm.cloud_audiences = ["https://management.stack.example/"]
    azure_env(monkeypatch)                               # no managed identity: the client secret only
    for key, value in arm.env_client_secret().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", arm.ca_pem_path)
    source = m.AzureSource(arm_config(azure={"credential_type": "default"}))
    assert len(source.discover().instances) == 2
    tokens = [t for t in arm.token_requests if t.endpoint == "aad_token"]
    assert tokens and {t.authority for t in tokens} == {arm.url} and {t.status for t in tokens} == {200}
    assert {t.credential for t in tokens} == {"secret"}


def test_workload_identity_gets_its_token_from_the_clouds_endpoint(arm, arm_config, monkeypatch, tmp_path):
    arm.estate = make_estate(vms=2)
    azure_env(monkeypatch)
    for key, value in arm.env_workload_identity(tmp_path / "token").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", arm.ca_pem_path)
    cfg = arm_config(azure={"credential_type": "workload_identity",
                            "token_audience": "https://management.azure.com/", "login_endpoint": arm.url})
    assert len(m.AzureSource(cfg).discover().instances) == 2
    tokens = [t for t in arm.token_requests if t.endpoint == "aad_token"]
    assert tokens and tokens[-1].credential == "assertion" and tokens[-1].status == 200


def test_a_cloud_that_serves_only_the_old_metadata_version_is_read_too(arm, arm_config):
    arm.estate = make_estate(vms=2)
    arm.metadata_versions = ("2015-01-01",)              # Azure Stack Hub
    arm.cloud_audiences = ["https://management.stack.example/", "https://management.azure.com/"]
    assert len(m.AzureSource(arm_config()).discover().instances) == 2
    asked = [r.query["api-version"] for r in arm.requests if r.endpoint == "metadata"]
    assert asked == ["2022-09-01", "2015-01-01"]


@pytest.mark.parametrize("command", [[], ["--once"], ["--dry-run"], ["--status"], ["--explain", "vm-0000"]],
                         ids=["daemon", "once", "dry-run", "status", "explain"])
def test_sigterm_during_a_long_retry_after_ends_the_program_within_two_seconds(command, arm, arm_config, tmp_path):
    """A 429 with Retry-After: 20 is waited out, and SIGTERM still ends the daemon, or a one-shot
    command, at once with exit 0; a one-shot command says `stopped:` and prints no status or plan (its
    discovery never finished)."""
    import signal
    import subprocess
    arm.estate = make_estate(vms=2)
    arm.add_fault("429", endpoint="vms", retry_after=20, times=None)
    raw = arm_config.raw(azure={"retries": 3, "timeout": 30}, logging={"format": "json"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    env = {"PATH": os.environ["PATH"], **arm.env()}
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "haproxy_azure_discovery.py"),
                             *command, "-c", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while not arm.counts.get("vms") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0 and time.monotonic() - started < 2, (proc.returncode, err)
        if command:
            assert out == "" and [line for line in err.splitlines() if line.startswith("stopped: ")], err
    finally:
        if proc.poll() is None:
            proc.kill()
