"""Tests of the Data Plane API emulator, driven over HTTP with urllib like a client.

Run: python -m pytest testing/test_fake_dataplane.py
"""
import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fake_dataplane as fdp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = "/services/haproxy/configuration"
TX = "/services/haproxy/transactions"
HAVE_HAPROXY = os.access(fdp.HAPROXY_BIN, os.X_OK)
pytestmark = pytest.mark.skipif(not HAVE_HAPROXY, reason="haproxy binary not installed")


# --- helpers ---

class Api:
    """A minimal urllib client for one emulator."""

    def __init__(self, fake, user=fdp.DEFAULT_USERNAME, password=fdp.DEFAULT_PASSWORD):
        self.fake = fake
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None, *, auth=True, base=None, timeout=10, content_type=True):
        """(status, headers, decoded body) of one request; path is relative to /v2 or /v3."""
        url = self.fake.url + (self.fake.base if base is None else base) + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, method=method, data=data)
        if body is not None and content_type:
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                status, headers, raw = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            status, headers, raw = exc.code, exc.headers, exc.read()
        text = raw.decode()
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return status, headers, payload

    def data(self, method, path, body=None):
        """The answer body, unwrapped from v2's {"_version", "data"}."""
        status, _, payload = self.call(method, path, body)
        assert status == 200, payload
        return payload["data"] if self.fake.api == "v2" else payload

    def start(self):
        status, _, payload = self.call("POST", f"{TX}?version={self.fake.version}")
        assert status == 201, payload
        return payload["id"]

    def commit(self, tid):
        return self.call("PUT", f"{TX}/{tid}")


def q(path, **params):
    """Append query parameters to a path that may already have some."""
    return path + ("&" if "?" in path else "?") + urlencode(params)


def servers_path(api, backend, name=None):
    if api == "v2":
        return f"{CFG}/servers" + (f"/{name}" if name else "") + f"?backend={backend}"
    return f"{CFG}/backends/{backend}/servers" + (f"/{name}" if name else "")


def backend_body(name="be_app", **extra):
    return {"name": name, "mode": "http", "balance": {"algorithm": "roundrobin"}, **extra}


def server_body(name="srv1", address="10.0.0.4", port=8080, **extra):
    return {"name": name, "address": address, "port": port, **extra}


ALL = list(fdp.PERSONALITIES)
PARKED = {"address": "127.0.0.1", "port": 80, "maintenance": "enabled", "check": "disabled"}


DELAY = 0.05                                    # the reload ticker's period in these tests


@pytest.fixture(params=ALL)
def fake(request):
    with fdp.FakeDataPlane(personality=request.param, reload_delay=DELAY) as emulator:
        yield emulator
        assert emulator.errors == []


# The reload agent is the same code in every release (v2.9.27 haproxy/reload_agent.go and v3.4.2
# reload_agent/reload_agent.go differ in imports only): its tests run on one release per API.
AGENT = ["2.9", "3.4"]


@pytest.fixture(params=AGENT)
def agent_fake(request):
    with fdp.FakeDataPlane(personality=request.param, reload_delay=DELAY) as emulator:
        yield emulator
        assert emulator.errors == []


def settle(fake):
    """Let the pending reload (if any) run at the next tick."""
    assert fake.wait_reloads(timeout=5)


@pytest.fixture
def api(fake):
    return Api(fake)


def seed_app(fake, *servers):
    fake.seed({"be_app": backend_body(servers=list(servers) or [server_body()])})


# --- info, auth, versions ---

def test_info_answers_only_under_its_own_base(fake, api):
    status, _, info = api.call("GET", "/info")
    assert status == 200 and "fake_dataplane" in info["api"]["version"]
    other = "/v3" if fake.api == "v2" else "/v2"
    status, _, error = api.call("GET", "/info", base=other)
    assert status == 404 and error["code"] == 404


@pytest.mark.parametrize("personality", ["3.2", "3.4"])
def test_unknown_paths_and_authentication(personality):
    """go-swagger routes first (404 without credentials); the oapi server authenticates in
    front of the router (dataplaneapi v3.3.6 UPGRADE.md)."""
    with fdp.FakeDataPlane(personality=personality, check_config=False) as fake:
        api = Api(fake)
        assert api.call("GET", "/services/nope", auth=False)[0] == (404 if personality == "3.2" else 401)
        assert api.call("GET", "/services/nope")[0] == 404


def test_basic_auth_is_required(fake, api):
    status, headers, _ = api.call("GET", "/info", auth=False)
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    assert Api(fake, password="wrong").call("GET", "/info")[0] == 401
    assert api.call("GET", "/info")[0] == 200


def test_version_endpoint_and_header(fake, api):
    status, headers, version = api.call("GET", f"{CFG}/version")
    assert (status, version, headers["Configuration-Version"]) == (200, 1, "1")
    status, headers, _ = api.call("POST", q(f"{CFG}/backends", version=1), backend_body())
    assert status == 202 and headers["Configuration-Version"] == "2" and "Reload-ID" in headers
    assert any(name == "Reload-Id" for name, _ in headers.items())   # Go's canonical spelling
    assert api.call("GET", f"{CFG}/version")[2] == 2 == fake.version


def test_v2_wraps_get_answers_and_v3_does_not(fake, api):
    seed_app(fake)
    status, _, payload = api.call("GET", f"{CFG}/backends")
    if fake.api == "v2":
        assert payload["_version"] == 2 and payload["data"][0]["name"] == "be_app"
    else:
        assert isinstance(payload, list) and payload[0]["name"] == "be_app"
    assert api.data("GET", servers_path(fake.api, "be_app", "srv1"))["address"] == "10.0.0.4"


# --- transactions ---

def test_transaction_lifecycle(fake, api):
    status, _, error = api.call("POST", f"{TX}?version=7")
    assert status == 409
    assert error["message"] == "version mismatch: version in configuration file is 1, given version is 7"
    tid = api.start()
    assert api.call("GET", f"{TX}/{tid}")[2] == {"_version": 1, "id": tid, "status": "in_progress"}
    assert fake.open_transactions() == [tid]

    status, headers, _ = api.call("POST", q(f"{CFG}/backends", transaction_id=tid), backend_body())
    assert status == 202 and headers["Configuration-Version"] == "1" and "Reload-ID" not in headers
    status, _, _ = api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), server_body())
    assert status == 202
    assert [b["name"] for b in api.data("GET", q(f"{CFG}/backends", transaction_id=tid))] == ["be_app"]
    assert api.data("GET", f"{CFG}/backends") == []           # not committed yet
    assert api.call("GET", q(f"{CFG}/version", transaction_id=tid))[2] == 1

    status, headers, result = api.commit(tid)
    assert status == 202 and result == {"_version": 1, "id": tid, "status": "success"}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-0", headers["Reload-ID"])
    settle(fake)                                     # the reload runs at the next tick
    assert (fake.version, fake.reloads, fake.commits) == (2, 1, 1)
    assert fake.backends["be_app"]["servers"]["srv1"] == server_body()
    assert api.call("GET", f"/services/haproxy/reloads/{headers['Reload-ID']}")[2]["status"] == "succeeded"
    assert api.call("GET", f"{TX}/{tid}")[0] == 404                # committed: gone
    assert api.call("DELETE", f"{TX}/{tid}")[0] == 404
    assert fake.open_transactions() == [] and fake.violations == []


def test_empty_commit_still_reloads_and_bumps_version(fake, api):
    status, _, _ = api.commit(api.start())
    settle(fake)
    assert status == 202 and fake.version == 2 and fake.reloads == 1


def test_delete_transaction(fake, api):
    tid = api.start()
    assert api.call("DELETE", f"{TX}/{tid}")[0] == 204
    assert api.call("GET", f"{TX}/{tid}")[0] == 404
    status, _, error = api.call("DELETE", f"{TX}/nope")
    assert status == 404 and error["message"] == "transaction does not exist: transaction file nope does not exist"
    status, _, error = api.call("GET", f"{TX}/nope")
    assert status == 404 and error["message"] == "transaction does not exist: transaction nope does not exist"
    status, _, error = api.commit("nope")
    assert status == 404 and error["message"] == "transaction does not exist: transaction nope does not exist"


def test_commit_outdates_the_other_open_transactions(fake, api):
    first, second = api.start(), api.start()
    assert api.commit(first)[0] == 202
    assert api.call("GET", f"{TX}/{second}")[2]["status"] == "outdated"
    status, _, error = api.commit(second)
    assert status == 406 and error["message"] == f"transaction {second} is outdated and cannot be committed"
    # an outdated transaction is gone for writes and reads, and its version is no longer known
    status, _, error = api.call("POST", q(f"{CFG}/backends", transaction_id=second), backend_body())
    assert (status, error["message"]) == (400, f"transaction does not exist: {second}")
    status, _, error = api.call("GET", q(f"{CFG}/version", transaction_id=second))
    assert (status, error["message"]) == (400, f"transaction does not exist: {second}")
    assert api.call("GET", f"{TX}/{second}")[2] == {"id": second, "status": "outdated"}
    assert api.call("DELETE", f"{TX}/{second}")[0] == 204
    assert fake.version == 2 and fake.open_transactions() == []


def test_concurrent_commits_one_wins(fake, api):
    tids = [api.start() for _ in range(4)]
    statuses = []
    threads = [threading.Thread(target=lambda t=t: statuses.append(api.commit(t)[0])) for t in tids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(statuses) == [202, 406, 406, 406]
    settle(fake)
    assert fake.version == 2 and fake.reloads == 1 and sorted(fake.transactions().values()) == ["outdated"] * 3


def test_commit_after_a_plain_write_is_a_version_mismatch(fake, api):
    tid = api.start()
    assert api.call("POST", q(f"{CFG}/backends", version=1), backend_body())[0] == 202
    status, _, error = api.commit(tid)
    assert status == 409
    assert error["message"] == "version mismatch: version mismatch, transaction version: 1, configured version: 2"
    assert fake.transactions() == {tid: "outdated"}
    assert api.commit(tid)[0] == 406


def test_more_than_twenty_open_transactions_is_429(fake, api):
    tids = [api.start() for _ in range(20)]
    status, _, error = api.call("POST", f"{TX}?version=1")
    assert status == 429 and "maximum amount of 20 active transactions" in error["message"]
    api.call("DELETE", f"{TX}/{tids[0]}")
    assert api.call("POST", f"{TX}?version=1")[0] == 201
    # only transactions in progress count (actualCount: GetTransactions("in_progress"))
    assert api.commit(tids[1])[0] == 202                 # the 19 others are outdated now
    assert len(fake.transactions()) == 19 and fake.open_transactions() == []
    assert [api.call("POST", f"{TX}?version=2")[0] for _ in range(21)] == [201] * 20 + [429]


def test_transactions_are_listed_as_the_transaction_directory_reads(fake, api):
    seed_app(fake)
    ids = [api.start() for _ in range(3)]
    bad = q(servers_path(fake.api, "be_app"), transaction_id=ids[0])
    assert api.call("POST", bad, server_body("srv9", address="bad..address"))[0] == 202
    assert api.commit(ids[0])[0] == 400                                  # failed
    assert api.commit(ids[1])[0] == 202                                  # ids[2] outdated
    newer = sorted(api.start() for _ in range(2))
    listed = api.call("GET", TX)[2]
    assert listed == [{"id": ids[0], "status": "failed"}] + \
        [{"_version": 3, "id": t, "status": "in_progress"} for t in newer] + [{"id": ids[2], "status": "outdated"}]
    assert api.call("GET", f"{TX}?status=in_progress")[2] == listed[1:3]
    assert api.call("GET", f"{TX}?status=failed")[2] == listed[:1]
    status, _, _ = api.call("GET", f"{TX}?status=outdated")
    assert status == (422 if fake.traits.flavor == "swagger" else 400)


def test_write_parameter_rules(fake, api):
    seed_app(fake)                                      # version 2
    backends = f"{CFG}/backends"
    tid = api.start()
    cases = [
        (q(backends, version=2, transaction_id=tid), 400, "both version and transaction specified"),
        (backends, 400, "version or transaction not specified"),
        (q(backends, version=1), 409, "version mismatch: version in configuration file is 2, given version is 1"),
        (q(backends, transaction_id=tid, force_reload="true"), 400, "Both force_reload and transaction"),
        (q(backends, transaction_id="nope"), 400, "transaction does not exist: nope"),
    ]
    for path, status, message in cases:
        answer = api.call("POST", path, backend_body("be_new"))
        assert answer[0] == status and message in answer[2]["message"], (path, answer)
    status, _, error = api.call("POST", q(backends, version=2), backend_body())
    assert status == 409 and error["message"] == "object already exists: backend be_app already exists"
    assert api.call("GET", f"{backends}/nope")[0] == 404
    assert api.call("PUT", q(f"{backends}/nope", version=2), backend_body("nope"))[0] == 404
    assert api.call("DELETE", q(f"{backends}/nope", version=2))[0] == 404
    srv = servers_path(fake.api, "be_app", "nope")
    assert api.call("GET", srv)[0] == 404
    status, _, error = api.call("PUT", q(srv, version=2), server_body("nope"))
    assert status == 404 and error["message"] == "missing object: server nope does not exist in be_app backend"
    assert api.call("DELETE", q(srv, version=2))[0] == 404
    status, _, error = api.call("POST", q(servers_path(fake.api, "be_app"), version=2), server_body())
    assert status == 409 and "server srv1 already exists in be_app backend" in error["message"]
    status, _, error = api.call("POST", q(servers_path(fake.api, "be_gone"), version=2), server_body())
    assert status == 400 and error["message"] == "missing parent: backend be_gone does not exist"
    assert fake.version == 2 and fake.reloads == 0 and fake.violations == []


def test_list_servers_of_a_missing_backend_is_empty(fake, api):
    assert api.data("GET", servers_path(fake.api, "be_gone")) == []


def test_v2_server_parent_parameters():
    with fdp.FakeDataPlane(personality="2.9") as fake:
        api = Api(fake)
        seed_app(fake)
        path = f"{CFG}/servers?parent_type=backend&parent_name=be_app"
        assert [s["name"] for s in api.data("GET", path)] == ["srv1"]
        status, _, error = api.call("GET", f"{CFG}/servers")
        assert status == 500 and error["message"] == "parentType empty"


# --- the reload agent ---

RELOADS = "/services/haproxy/reloads"


def reload_of(api, rid):
    status, _, body = api.call("GET", f"{RELOADS}/{rid}")
    assert status == 200, body
    return body


def test_reload_delay_defaults_to_dataplaneapis():
    assert fdp.FakeDataPlane(check_config=False).reload_delay == 5.0
    assert fdp.FakeDataPlane(check_config=False, reload_delay=0).reload_delay == 5.0    # as --reload-delay 0
    assert fdp.FakeDataPlane(check_config=False, reload_delay=0.2).reload_delay == 0.2


@pytest.mark.parametrize("personality", AGENT)
def test_reloads_run_at_the_tick_and_share_an_id(personality):
    with fdp.FakeDataPlane(personality=personality, reload_delay=1.0) as slow:
        sapi = Api(slow)
        slow.restart()                                 # a tick period starts now
        seed_app(slow)
        status, headers, _ = sapi.commit(sapi.start())
        rid = headers["Reload-ID"]
        # every reloading write before the tick shares it
        _, plain, _ = sapi.call("PUT", q(f"{CFG}/backends/be_app", version=slow.version), backend_body(retries=2))
        _, second, _ = sapi.commit(sapi.start())
        assert plain["Reload-ID"] == second["Reload-ID"] == rid
        assert status == 202 and slow.pending_reload == rid and slow.reloads == 0
        # GetReload's quirk: the pending reload answers with the (empty) id of the running one
        assert reload_of(sapi, rid) == {"status": "in_progress"}
        assert sapi.call("GET", RELOADS)[2] == [{"id": rid, "status": "in_progress"}]
        assert slow.wait_reloads(timeout=3)
        record = reload_of(sapi, rid)
        assert record["status"] == "succeeded" and record["id"] == rid and record["reload_timestamp"] > 0
        assert sapi.call("GET", RELOADS)[2] == [record] and slow.reloads == 1
        # the next reload takes the next number
        _, headers, _ = sapi.commit(sapi.start())
        assert headers["Reload-ID"] == rid[:-1] + "1"


def test_reload_records_as_get_reload_answers_them(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    fake.reload_fail()
    _, headers, _ = api.commit(api.start())
    failed = headers["Reload-ID"]
    settle(fake)
    _, headers, _ = api.commit(api.start())
    ok = headers["Reload-ID"]
    settle(fake)
    record = reload_of(api, failed)
    assert record["status"] == "failed" and "injected fault" in record["response"] and record["id"] == failed
    assert reload_of(api, ok)["status"] == "succeeded"
    assert [r["id"] for r in api.call("GET", RELOADS)[2]] == [failed, ok]
    day = failed.rsplit("-", 1)[0]
    # no record, older than the last success (by counter): a made-up "succeeded"
    fake.reload_fail()
    _, headers, _ = api.commit(api.start())
    settle(fake)
    assert reload_of(api, failed)["status"] == "failed"                    # failures are kept
    assert reload_of(api, "1999-01-01-7") == {"id": "1999-01-01-7", "status": "succeeded"}   # older date
    assert api.call("GET", f"{RELOADS}/{day}-9")[0] == 404                  # newer: unknown
    status, _, error = api.call("GET", f"{RELOADS}/{day}-9")
    assert error["message"] == f"Reload with ID {day}-9 does not exist"
    status, _, error = api.call("GET", f"{RELOADS}/latest")
    swagger = fake.traits.flavor == "swagger"
    assert (status, error["code"]) == ((422, 605) if swagger else (400, 400))
    assert ("should match" if swagger else "doesn't match") in error["message"]


def test_failed_reloads_are_kept_for_the_retention():
    now = [1_000_000.0]
    with fdp.FakeDataPlane(reload_delay=DELAY, check_config=False) as fake:
        fake._clock = lambda: now[0]
        api = Api(fake)
        fake.reload_fail(2)
        first = api.commit(api.start())[1]["Reload-ID"]
        settle(fake)
        now[0] += 2 * 86400                                # two days later, past the 1-day retention
        second = api.commit(api.start())[1]["Reload-ID"]
        settle(fake)
        assert [r["id"] for r in api.call("GET", RELOADS)[2]] == [second]
        assert api.call("GET", f"{RELOADS}/{first}")[0] == 404


def test_get_reload_waits_while_a_reload_runs(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    fake.reload_duration = 1.2
    rid = api.commit(api.start())[1]["Reload-ID"]
    deadline = time.monotonic() + 5
    while not fake.reloading:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    assert api.call("GET", f"{CFG}/version")[0] == 200 and time.monotonic() - started < 0.6   # not blocked
    record = reload_of(api, rid)
    assert time.monotonic() - started >= 0.6 and record["status"] == "succeeded"
    fake.reload_duration = 0.6
    api.commit(api.start())
    while not fake.reloading:
        time.sleep(0.005)
    started = time.monotonic()
    listed = api.call("GET", RELOADS)[2]
    assert time.monotonic() - started >= 0.3 and all(r["status"] == "succeeded" for r in listed)


def test_commit_during_a_reload_waits_for_it_and_gets_the_next_id(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    fake.reload_duration = 0.5
    rid = api.commit(api.start())[1]["Reload-ID"]
    while not fake.reloading:
        time.sleep(0.005)
    tid = api.start()
    started = time.monotonic()
    status, headers, _ = api.commit(tid)
    assert status == 202 and time.monotonic() - started >= 0.25       # Reload() waits for the cache lock
    assert headers["Reload-ID"] == rid[:-1] + "1"
    fake.reload_duration = 0
    settle(fake)


def test_a_failed_reload_leaves_haproxy_on_the_last_good_configuration(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    seed_app(fake)                                                      # version 2, running
    good = fake.running_render()
    assert fake.file_text() == good == fake.render()
    fake.reload_fail()
    tid = api.start()
    assert api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), server_body("srv2"))[0] == 202
    rid = api.commit(tid)[1]["Reload-ID"]
    settle(fake)
    assert reload_of(api, rid)["status"] == "failed"
    # the API answers the committed configuration...
    assert [s["name"] for s in api.data("GET", servers_path(fake.api, "be_app"))] == ["srv1", "srv2"]
    assert api.call("GET", f"{CFG}/version")[2] == 3 == fake.version
    # ...HAProxy runs the last good one, and the file holds it again (nothing reloads it)
    assert list(fake.running_backends["be_app"]["servers"]) == ["srv1"]
    assert fake.running_render() == good and fake.file_text() == good
    assert fake.file_text().startswith("# _version=2\n")
    time.sleep(4 * DELAY)
    assert fake.reloads == 1 and fake.pending_reload is None
    # the next commit writes the in-memory configuration to the file; its reload takes all
    rid = api.commit(api.start())[1]["Reload-ID"]
    settle(fake)
    assert reload_of(api, rid)["status"] == "succeeded"
    assert list(fake.running_backends["be_app"]["servers"]) == ["srv1", "srv2"]
    assert fake.running_render() == fake.file_text() == fake.render()
    assert fake.violations == []


@pytest.mark.parametrize("personality", AGENT)
def test_force_reload_on_a_commit(personality):
    with fdp.FakeDataPlane(personality=personality, reload_delay=1.0) as fake:
        _force_reload_on_a_commit(fake, Api(fake))


def _force_reload_on_a_commit(fake, api):
    listed = api.call("GET", RELOADS)[2]
    status, headers, body = api.call("PUT", q(f"{TX}/{api.start()}", force_reload="true"))
    # nothing pending: a reload now, that no record keeps (ForceReload -> reloadHAProxy("force"))
    assert status == 200 and "Reload-ID" not in headers and body["status"] == "success"
    assert fake.reloads == 1 and fake.reload_history == [{"id": "force", "status": "succeeded", "recorded": False}]
    assert api.call("GET", RELOADS)[2] == listed == []
    # a reload pending: it runs now, recorded under its id
    seed_app(fake)
    fake.restart()                                     # the next tick is 1 s away
    status, headers, _ = api.call("PUT", q(f"{CFG}/backends/be_app", version=fake.version), backend_body(retries=2))
    rid = headers["Reload-ID"]
    status, _, _ = api.call("PUT", q(f"{TX}/{api.start()}", force_reload="true"))
    assert status == 200 and fake.reload_history[-1] == {"id": rid, "status": "succeeded", "recorded": True}
    assert reload_of(api, rid)["status"] == "succeeded" and fake.pending_reload is None
    # a forced reload that fails: 400, the commit stands
    fake.reload_fail()
    version, tid = fake.version, api.start()
    status, _, error = api.call("PUT", q(f"{TX}/{tid}", force_reload="true"))
    assert status == 400 and error["message"].startswith("Reload failed: ") and error["code"] == 400
    assert fake.version == version + 1 and api.call("GET", f"{TX}/{tid}")[0] == 404
    assert fake.reload_history[-1] == {"id": "force", "status": "failed", "recorded": False}


def test_force_reload_on_plain_writes(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    seed_app(fake)
    backends = f"{CFG}/backends"
    status, headers, _ = api.call("POST", q(backends, version=2, force_reload="true"), backend_body("be_two"))
    assert status == 201 and "Reload-ID" not in headers and fake.reloads == 1
    status, _, _ = api.call("PUT", q(f"{backends}/be_two", version=3, force_reload="true"), backend_body("be_two"))
    assert status == 200 and fake.reloads == 2
    fake.reload_fail()
    status, _, error = api.call("DELETE", q(f"{backends}/be_two", version=4, force_reload="true"))
    assert status == 400 and error["message"].startswith("Reload failed: ")
    assert "be_two" not in fake.backends and "be_two" in fake.running_backends and fake.version == 5


# --- a dataplaneapi restart ---

def test_restart_loses_the_pending_reload_and_the_records(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    first = api.commit(api.start())[1]["Reload-ID"]
    settle(fake)
    pending = api.commit(api.start())[1]["Reload-ID"]
    assert pending == first[:-1] + "1"
    fake.restart()
    time.sleep(4 * DELAY)
    assert fake.reloads == 1 and fake.pending_reload is None          # never ran
    assert api.call("GET", RELOADS)[2] == []
    assert api.call("GET", f"{RELOADS}/{first}")[0] == 404
    assert api.call("GET", f"{RELOADS}/{pending}")[0] == 404
    again = api.commit(api.start())[1]["Reload-ID"]
    assert again == first                                              # the counter starts at 0 again
    settle(fake)
    # an old id whose counter is above the new last success's is unknown; GetReload cannot tell
    # the old "-0" from the new one
    assert api.call("GET", f"{RELOADS}/{pending}")[0] == 404
    assert reload_of(api, first)["status"] == "succeeded" and fake.reloads == 2


def test_restart_reads_the_file_back_after_a_failed_reload(agent_fake):
    fake, api = agent_fake, Api(agent_fake)
    seed_app(fake)                                                     # version 2: file, HAProxy
    outdated, tid = api.start(), api.start()
    assert api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), server_body("srv2"))[0] == 202
    fake.reload_fail()
    assert api.commit(tid)[0] == 202                                   # version 3; `outdated` outdated
    settle(fake)
    open_tid = api.start()                                             # at version 3
    assert fake.version == 3 and fake.file_text().startswith("# _version=2\n")
    fake.restart()
    # the API now answers the file: the last-known-good configuration at its version
    assert api.call("GET", f"{CFG}/version")[2] == 2 == fake.version
    assert [s["name"] for s in api.data("GET", servers_path(fake.api, "be_app"))] == ["srv1"]
    # transactions are files: the one in progress is back with its version, the outdated one listed
    assert api.call("GET", f"{TX}/{open_tid}")[2] == {"_version": 3, "id": open_tid, "status": "in_progress"}
    assert {"id": outdated, "status": "outdated"} in api.call("GET", TX)[2]
    status, _, error = api.commit(open_tid)
    assert status == 409 and error["message"] == \
        "version mismatch: version mismatch, transaction version: 3, configured version: 2"
    time.sleep(4 * DELAY)
    assert fake.reloads == 1 and fake.pending_reload is None           # nothing reloads at startup
    # a plain write at the version it answers now: the version 3 of before is another one
    assert api.call("PUT", q(f"{CFG}/backends/be_app", version=2), backend_body(retries=1))[0] == 202
    settle(fake)
    assert fake.running_backends["be_app"]["retries"] == 1 and fake.version == 3
    assert list(fake.running_backends["be_app"]["servers"]) == ["srv1"]


# --- haproxy -c ---

def test_commit_of_an_invalid_configuration_is_refused(fake, api):
    seed_app(fake)
    checks = fake.checks
    tid = api.start()
    bad = server_body("srv9", address="bad..address")
    assert api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), bad)[0] == 202
    status, _, error = api.commit(tid)
    assert status == 400 and error["message"].startswith("validation error: exit status 1: err transactionId=")
    assert "srv9" in error["message"]
    assert fake.transactions() == {tid: "failed"}
    assert fake.checks == checks + 1 and fake.check_failures == 1
    assert fake.version == 2 and fake.reloads == 0 and "srv9" not in fake.backends["be_app"]["servers"]
    status, _, error = api.commit(tid)
    assert status == 406 and error["message"] == f"transaction {tid} is failed and cannot be committed"
    # a plain write is checked the same way and changes nothing
    assert api.call("POST", q(servers_path(fake.api, "be_app"), version=2), bad)[0] == 400
    assert fake.version == 2 and fake.reloads == 0
    # the failed plain write is a failed (implicit) transaction, listed as such
    failed = api.call("GET", f"{TX}?status=failed")[2]
    assert len(failed) == 2 and {"id": tid, "status": "failed"} in failed


def test_rendered_configuration_passes_haproxy_check(fake, api):
    params = {"forwardfor": {"enabled": "enabled"}, "redispatch": {"enabled": "enabled"},
              "connect_timeout": 3000, "server_timeout": 20000, "retries": 3,
              "adv_check": "httpchk", "httpchk_params": {"method": "GET", "uri": "/health"},
              "default_server": {"inter": 2000, "rise": 2, "fall": 3}, "http_connection_mode": "http-server-close",
              "abortonclose": "enabled", "log_health_checks": "disabled"}
    live = server_body(check="enabled", maintenance="disabled", inter=2000, rise=2, fall=3, weight=100)
    parked = dict(PARKED, name="srv2")
    tid = api.start()
    assert api.call("POST", q(f"{CFG}/backends", transaction_id=tid), backend_body(**params))[0] == 202
    for server in (live, parked):
        assert api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), server)[0] == 202
    assert api.commit(tid)[0] == 202
    text = fake.render()
    for line in ("backend be_app", "    balance roundrobin", "    option forwardfor", "    option redispatch",
                 "    timeout connect 3000", "    option httpchk GET /health", "    no option log-health-checks",
                 "    default-server fall 3 inter 2000 rise 2",
                 "    server srv1 10.0.0.4:8080 check enabled fall 3 inter 2000 rise 2 weight 100",
                 "    server srv2 127.0.0.1:80 no-check disabled"):
        assert line in text.splitlines(), line
    assert text.startswith("# _version=2\n")
    assert fake.check_failures == 0 and fake.unrendered == [] and fake.violations == []


# --- body validation ---

def test_invalid_bodies_are_refused_and_recorded(fake, api):
    backends = q(f"{CFG}/backends", version=1)
    status, _, error = api.call("POST", backends, backend_body(balance={"algorithm": "fastest"}))
    assert status == 422 and "balance.algorithm in body should be one of [" in error["message"]
    assert any("balance.algorithm" in v for v in fake.violations)
    seed_app(fake)
    srv = q(servers_path(fake.api, "be_app"), version=2)
    for body, field in ((server_body("s2", port=70000), "port"), (server_body("s2", address="a b"), "address"),
                        (server_body("s2", check="sometimes"), "check"), (server_body("s2", check=None), "check"),
                        ({"name": "s2"}, "address")):
        fake.violations.clear()
        status, _, error = api.call("POST", srv, body)
        assert status == 422 and field in error["message"], (body, error)
        assert fake.violations and field in fake.violations[0]
    fake.violations.clear()
    assert api.call("POST", srv, server_body("s2", weight=None))[0] in (201, 202)   # nullable
    assert fake.version == 3 and fake.violations == []


def test_unknown_fields_are_answered_2xx_forgotten_and_recorded(fake, api):
    seed_app(fake)
    status, _, answer = api.call("POST", q(servers_path(fake.api, "be_app"), version=2),
                                 server_body("s2", colour="blue"))
    # Every release decodes into Go structs without unknown-field checks: 2xx, dropped.
    assert status in (201, 202) and "colour" not in answer
    assert "colour" not in fake.backends["be_app"]["servers"]["s2"]
    assert fake.forgotten == [("server", "colour")]
    assert len(fake.violations) == 1 and "colour is not a field of the server model" in fake.violations[0]


def test_unknown_fields_can_still_be_refused_on_request():
    with fdp.FakeDataPlane(personality="3.4", reject_unknown_fields=True) as fake:
        status, _, answer = Api(fake).call("POST", q(f"{CFG}/backends", version=1), backend_body(colour="x"))
        assert status == 422 and answer["message"] == "colour in body is a forbidden property"
        assert fake.version == 1 and fake.forgotten == []


@pytest.mark.parametrize("personality", ALL)
def test_info_claims_the_release(personality):
    with fdp.FakeDataPlane(personality=personality) as fake:
        status, _, info = Api(fake).call("GET", "/info")
        assert status == 200
        assert info["api"]["version"] == f"{fdp.PERSONALITIES[personality].release} fake_dataplane"
        assert fake.personality == personality and fake.api == ("v2" if personality == "2.9" else "v3")


def test_api_argument_maps_to_a_personality():
    assert fdp.FakeDataPlane("v2", check_config=False).personality == "2.9"
    assert fdp.FakeDataPlane(api="v3", check_config=False).personality == "3.4"
    assert fdp.FakeDataPlane(check_config=False).personality == "3.4"
    assert fdp.FakeDataPlane("v2", personality="3.0", check_config=False).personality == "3.0"
    with pytest.raises(ValueError):
        fdp.FakeDataPlane(personality="3.1", check_config=False)
    assert [p.release for p in fdp.PERSONALITIES.values()] == \
        ["v2.9.27", "v3.0.23", "v3.2.15", "v3.3.6", "v3.4.2"]


@pytest.mark.parametrize("personality", ALL)
def test_http_proxy_is_kept_until_3_3_6(personality):
    """client-native dropped http_proxy in 6.3.9 (dataplaneapi 3.3.6 takes 6.3.10): a release
    whose model has it writes `option http_proxy`, which HAProxy 2.6 refuses at commit; 3.3.6
    and 3.4 answer 2xx and forget it."""
    with fdp.FakeDataPlane(personality=personality) as fake:
        api = Api(fake)
        tid = api.start()
        status, _, echoed = api.call("POST", q(f"{CFG}/backends", transaction_id=tid),
                                     backend_body(http_proxy="enabled"))
        assert status == 202
        status, _, error = api.commit(tid)
        if personality in ("3.3.6", "3.4"):
            assert "http_proxy" not in echoed and status == 202
            assert "http_proxy" not in fake.backends["be_app"]
            assert fake.forgotten == [("backend", "http_proxy")] and len(fake.violations) == 1
        else:
            assert echoed["http_proxy"] == "enabled" and fake.forgotten == [] and fake.violations == []
            assert status == 400 and "option 'http_proxy' is not supported" in error["message"]


@pytest.mark.parametrize("personality", ["3.0", "3.2"])
def test_fields_newer_than_the_release_are_forgotten(personality):
    with fdp.FakeDataPlane(personality=personality) as fake:
        api = Api(fake)
        metadata = {"owner": {"team": "web"}}      # in client-native 6.2's backend model, not 6.0's
        status, _, _ = api.call("POST", q(f"{CFG}/backends", version=1), backend_body(metadata=metadata))
        assert status == 202
        kept = fake.backends["be_app"].get("metadata")
        assert (kept, fake.forgotten) == ((None, [("backend", "metadata")]) if personality == "3.0"
                                         else (metadata, []))


def test_forget_fields_knob():
    with fdp.FakeDataPlane(personality="3.4", forget_fields={"backend": {"retries"}, "server": {"weight"}}) as fake:
        api = Api(fake)
        body = backend_body(retries=3, servers={"srv1": server_body(weight=10)})
        status, _, echoed = api.call("POST", q(f"{CFG}/backends", version=1, full_section="true"), body)
        assert status == 202 and "retries" not in echoed and "weight" not in echoed["servers"]["srv1"]
        assert "retries" not in fake.backends["be_app"]
        assert fake.backends["be_app"]["servers"]["srv1"] == server_body()
        status, _, _ = api.call("PUT", q(servers_path("v3", "be_app", "srv1"), version=2), server_body(weight=5))
        assert status == 200 and "weight" not in fake.server("be_app", "srv1")
        assert fake.forgotten == [("backend", "retries"), ("server", "weight"), ("server", "weight")]
        assert fake.violations == []                       # forgetting is the server's doing


def test_validation_errors_per_flavor():
    """go-swagger (2.9-3.2) serves the first error with a 6xx body code; the oapi server
    (3.3.6+) serves every leaf error with code 422 (respond.Unprocessable)."""
    bad = backend_body(mode="udp", balance={"algorithm": "fastest"})
    for personality, code in (("3.2", 606), ("3.4", 422)):
        with fdp.FakeDataPlane(personality=personality) as fake:
            status, _, error = Api(fake).call("POST", q(f"{CFG}/backends", version=1), bad)
            assert status == 422 and error["code"] == code
            assert ("\n" in error["message"]) == (personality == "3.4")
            status, _, error = Api(fake).call("POST", f"{TX}?version=x")
            assert (status, error["code"]) == ((422, 601) if personality == "3.2" else (400, 400))
            status, _, error = Api(fake).call("POST", TX)
            assert status == (422 if personality == "3.2" else 400)
            assert error["message"] == ("version in query is required" if personality == "3.2"
                                        else "Query argument version is required, but not found")


def test_body_needs_a_json_content_type(fake, api):
    status, _, _ = api.call("POST", q(f"{CFG}/backends", version=1), backend_body(), content_type=False)
    assert status == 415 and fake.violations


def test_get_returns_what_go_would_echo(fake, api):
    seed_app(fake)
    body = server_body("s2", weight=0, inter=None, backup="", allow_0rtt=False)
    status, _, echoed = api.call("POST", q(servers_path(fake.api, "be_app"), version=2), body)
    assert echoed == server_body("s2", weight=0)             # unset values left out, nullable 0 kept
    assert api.data("GET", servers_path(fake.api, "be_app", "s2")) == server_body("s2", weight=0)


# --- reload counting ---

def test_runtime_capable_server_put_does_not_reload(fake, api):
    seed_app(fake, server_body(check="disabled", maintenance="disabled", weight=100))
    srv1 = servers_path(fake.api, "be_app", "srv1")
    parked = server_body(address="127.0.0.1", port=80, check="disabled", maintenance="enabled", weight=100)
    status, headers, _ = api.call("PUT", q(srv1, version=2), parked)
    assert status == 200 and "Reload-ID" not in headers
    assert fake.reloads == 0 and fake.version == 3
    assert fake.runtime_changes == ["set server be_app/srv1 state maint",
                                    "set server be_app/srv1 addr 127.0.0.1 port 80"]
    assert "    server srv1 127.0.0.1:80 no-check disabled weight 100" in fake.render().splitlines()

    fake.runtime_changes.clear()
    status, _, _ = api.call("PUT", q(srv1, version=3), dict(parked, weight=50))
    assert status == 200 and fake.runtime_changes == ["set server be_app/srv1 weight 50"]
    status, _, _ = api.call("PUT", q(srv1, version=4), dict(parked, weight=50))      # identical
    assert status == 200 and fake.version == 5 and fake.reloads == 0

    status, headers, _ = api.call("PUT", q(srv1, version=5), dict(parked, weight=50, inter=3000))
    assert status == 202 and "Reload-ID" in headers
    settle(fake)
    assert fake.reloads == 1
    status, _, _ = api.call("PUT", q(srv1, version=6, force_reload="true"), dict(parked, weight=50))
    assert status == 200 and fake.reloads == 2          # forced: done before the answer
    assert fake.violations == []


def runtime_path(api, backend, name):
    if api == "v2":
        return f"/services/haproxy/runtime/servers/{name}?backend={backend}"
    return f"/services/haproxy/runtime/backends/{backend}/servers/{name}"


def stats_of(fake, payload):
    """The native_stat items of a native stats answer: v2 a list of collections, v3 one."""
    return [i for c in (payload if fake.api == "v2" else [payload]) for i in c["stats"]]


def test_runtime_admin_state_is_neither_a_reload_nor_a_version(fake, api):
    seed_app(fake, server_body(), server_body("srv2", "10.0.0.5", maintenance="enabled"))
    version, srv1 = fake.version, runtime_path(fake.api, "be_app", "srv1")
    status, _, body = api.call("GET", srv1)
    assert status == 200 and (body["admin_state"], body["address"], body["port"]) == ("ready", "10.0.0.4", 8080)
    status, headers, body = api.call("PUT", srv1, {"admin_state": "drain"})
    assert status == 200 and body["admin_state"] == "drain" and "Reload-ID" not in headers
    assert fake.runtime_changes == ["set server be_app/srv1 state drain"]
    assert api.call("PUT", srv1, {"admin_state": "drain"})[0] == 200       # idempotent: no second command
    assert fake.runtime_changes == ["set server be_app/srv1 state drain"]
    assert (fake.version, fake.reloads, fake.commits) == (version, 0, 0)
    assert api.call("GET", runtime_path(fake.api, "be_app", "srv2"))[2]["admin_state"] == "maint"
    # A state set at runtime is what HAProxy answers until a reload, maint included.
    assert api.call("PUT", runtime_path(fake.api, "be_app", "srv2"), {"admin_state": "ready"})[2][
        "admin_state"] == "ready"
    assert api.call("GET", runtime_path(fake.api, "be_app", "srv2"))[2]["admin_state"] == "ready"
    # A failed reload leaves the old workers, and their runtime state, running.
    fake.fail_reloads = 1
    api.commit(api.start())
    settle(fake)
    assert api.call("GET", srv1)[2]["admin_state"] == "drain"
    # A reload forgets runtime state, as HAProxy does.
    api.commit(api.start())
    settle(fake)
    assert api.call("GET", srv1)[2]["admin_state"] == "ready"
    assert api.call("GET", runtime_path(fake.api, "be_app", "srv2"))[2]["admin_state"] == "maint"
    assert fake.violations == []


def test_runtime_server_errors(fake, api):
    seed_app(fake)
    for backend, name in (("be_app", "srv9"), ("be_nope", "srv1")):
        # client-native's answer for both; misc.HandleError makes it 500 before 3.2, 404 from 3.2.
        status, _, body = api.call("PUT", runtime_path(fake.api, backend, name), {"admin_state": "drain"})
        expected = 500 if fake.personality in ("2.9", "3.0") else 404
        assert (status, body["message"]) == (expected, f"no data for {backend}/{name}: not found")
        assert api.call("GET", runtime_path(fake.api, backend, name))[0] == 404
    status, _, _ = api.call("PUT", runtime_path(fake.api, "be_app", "srv1"), {"admin_state": "sleepy"})
    assert status == 422 and fake.violations and "admin_state" in fake.violations[-1]
    if fake.api == "v2":
        assert api.call("PUT", "/services/haproxy/runtime/servers/srv1", {"admin_state": "drain"})[0] == 422
    fake.runtime_broken = True
    assert api.call("PUT", runtime_path(fake.api, "be_app", "srv1"), {"admin_state": "drain"})[0] == 500
    assert fake.admin_states == {}                   # a drain HAProxy refused is no drain


def test_native_stats_shapes_and_filters(fake, api):
    seed_app(fake, server_body(), server_body("srv2", "10.0.0.5"))
    fake.sessions[("be_app", "srv2")] = 3
    path = "/services/haproxy/stats/native"
    status, _, payload = api.call("GET", q(path, type="server", parent="be_app", name="srv2"))
    assert status == 200 and isinstance(payload, list if fake.api == "v2" else dict)
    assert stats_of(fake, payload) == [{"type": "server", "name": "srv2", "backend_name": "be_app",
                                        "stats": {"scur": 3, "status": "no check"}}]   # as HAProxy says
    _, _, payload = api.call("GET", q(path, type="server", parent="be_app"))
    assert [i["name"] for i in stats_of(fake, payload)] == ["srv1", "srv2"]
    _, _, payload = api.call("GET", q(path, type="server", parent="be_app", name="srv9"))
    assert stats_of(fake, payload) == []
    assert api.call("GET", q(path, name="srv2"))[2]["message"] == "Type required when filtering by name"
    assert api.call("GET", q(path, type="server", name="srv2"))[0] == 400
    assert api.call("GET", q(path, type="listener"))[0] == (422 if fake.traits.flavor == "swagger" else 400)
    api.call("PUT", runtime_path(fake.api, "be_app", "srv2"), {"admin_state": "drain"})
    _, _, payload = api.call("GET", q(path, type="server", parent="be_app", name="srv2"))
    assert stats_of(fake, payload)[0]["stats"]["status"] == "DRAIN"


def test_plain_server_post_and_delete(fake, api):
    seed_app(fake)
    status, headers, _ = api.call("POST", q(servers_path(fake.api, "be_app"), version=2), server_body("srv2"))
    if fake.api == "v3":        # runtime `add server`: no reload
        assert status == 201 and fake.reloads == 0
        assert fake.runtime_changes == ["add server be_app/srv2 10.0.0.4:8080", "enable server be_app/srv2"]
    else:                       # dataplaneapi 2.9 always reloads here
        assert status == 202 and "Reload-ID" in headers
        settle(fake)
        assert fake.reloads == 1
    reloads = fake.reloads
    status, headers, _ = api.call("DELETE", q(servers_path(fake.api, "be_app", "srv2"), version=3))
    assert status == 202 and "Reload-ID" in headers
    settle(fake)
    assert fake.reloads == reloads + 1
    status, _, _ = api.call("DELETE", q(servers_path(fake.api, "be_app", "srv1"), version=4, force_reload="true"))
    assert status == 204 and fake.reloads == reloads + 2 and fake.backends["be_app"]["servers"] == {}


def test_runtime_add_is_not_used_with_a_default_server():
    with fdp.FakeDataPlane("v3", reload_delay=DELAY) as fake:
        fake.seed({"be_app": backend_body(default_server={"inter": 2000})})
        status, _, _ = Api(fake).call("POST", q(servers_path("v3", "be_app"), version=2), server_body())
        settle(fake)
        assert status == 202 and fake.reloads == 1 and fake.runtime_changes == []


def test_a_nil_runtime_pointer_sends_the_commands_before_it_then_reloads(fake, api):
    """changeThroughRuntimeAPI visits the differing fields in models.Server's order (agent-addr,
    agent-check, agent-send, health_check_port, maintenance, weight, address, port); a pointer
    field absent from the new body panics at its dereference, after the commands before it
    went out; the recovered panic means a reload (v2.9.27 handlers/runtime.go:36-46, 89-95)."""
    seed_app(fake, server_body(weight=10, maintenance="disabled"))
    srv1 = servers_path(fake.api, "be_app", "srv1")
    body = server_body(address="10.0.0.9", maintenance="enabled")          # weight dropped
    status, headers, echoed = api.call("PUT", q(srv1, version=2), body)
    assert status == 202 and "Reload-ID" in headers and echoed == body
    assert fake.runtime_changes == ["set server be_app/srv1 state maint"]  # not the address
    assert fake.server("be_app", "srv1") == body and fake.version == 3    # the file is written
    settle(fake)
    assert fake.running_backends["be_app"]["servers"]["srv1"] == body and fake.admin_states == {}
    # a port dropped with the address changed: the address step dereferences the port
    fake.runtime_changes.clear()
    status, _, _ = api.call("PUT", q(srv1, version=3), {"name": "srv1", "address": "10.0.0.8",
                                                        "maintenance": "enabled"})
    assert status == 202 and fake.runtime_changes == []
    settle(fake)
    # keeping every pointer: runtime only, 200
    fake.runtime_changes.clear()
    status, headers, _ = api.call("PUT", q(srv1, version=4), server_body(address="10.0.0.7", port=81))
    assert status == 200 and "Reload-ID" not in headers
    assert fake.runtime_changes == ["set server be_app/srv1 state ready", "set server be_app/srv1 addr 10.0.0.7 port 81"]
    assert fake.violations == []


def test_runtime_commands_go_to_what_haproxy_runs(fake, api):
    """After a failed reload HAProxy lacks what the API shows: a runtime-only change of such
    a server fails on HAProxy's socket and becomes a reload."""
    seed_app(fake)
    fake.reload_fail()
    tid = api.start()
    api.call("POST", q(servers_path(fake.api, "be_app"), transaction_id=tid), server_body("srv2"))
    api.commit(tid)
    settle(fake)
    assert "srv2" in fake.backends["be_app"]["servers"] and "srv2" not in fake.running_backends["be_app"]["servers"]
    assert api.call("GET", runtime_path(fake.api, "be_app", "srv2"))[0] == 404
    status, headers, _ = api.call("PUT", q(servers_path(fake.api, "be_app", "srv2"), version=3),
                                  server_body("srv2", weight=5))
    assert status == 202 and "Reload-ID" in headers
    assert fake.runtime_changes == ["set server be_app/srv2 weight 5", "# failed: No such server."]
    settle(fake)
    assert fake.running_backends["be_app"]["servers"]["srv2"]["weight"] == 5
    assert api.call("GET", runtime_path(fake.api, "be_app", "srv2"))[0] == 200


@pytest.mark.parametrize("personality", ["3.0", "3.2", "3.3.6", "3.4"])
def test_runtime_add_server_needs_the_backend_in_haproxy(personality):
    with fdp.FakeDataPlane(personality=personality, reload_delay=1.0) as fake:
        api = Api(fake)
        fake.restart()                                    # the next tick is 1 s away
        status, headers, _ = api.call("POST", q(f"{CFG}/backends", version=1), backend_body())
        rid = headers["Reload-ID"]
        status, headers, _ = api.call("POST", q(servers_path("v3", "be_app"), version=2), server_body())
        assert status == 202 and headers["Reload-ID"] == rid
        assert fake.runtime_changes == ["add server be_app/srv1 10.0.0.4:8080", "# failed: No such backend."]
        assert fake.wait_reloads(3)
        fake.runtime_changes.clear()
        status, _, _ = api.call("POST", q(servers_path("v3", "be_app"), version=3), server_body("srv2"))
        assert status == 201 and fake.runtime_changes == ["add server be_app/srv2 10.0.0.4:8080",
                                                          "enable server be_app/srv2"]
        assert list(fake.running_backends["be_app"]["servers"]) == ["srv1", "srv2"]
        assert fake.admin_states == {}


@pytest.mark.parametrize("personality", ALL)
def test_runtime_server_put_fields_per_release(personality):
    with fdp.FakeDataPlane(personality=personality, reload_delay=DELAY) as fake:
        api = Api(fake)
        seed_app(fake, server_body(weight=10), server_body("srv2"))
        path = runtime_path(fake.api, "be_app", "srv1")
        status, _, body = api.call("PUT", path, {"admin_state": "drain", "weight": 20,
                                                 "address": "10.0.0.9", "port": 9000})
        assert status == 200 and body["admin_state"] == "drain"
        assert fake.backends["be_app"]["servers"]["srv1"] == server_body(weight=10)   # nothing written
        assert fake.reloads == 0
        if personality in ("3.3.6", "3.4"):       # weight, then address/port, from 3.3.1
            assert fake.runtime_changes == ["set server be_app/srv1 state drain", "set server be_app/srv1 weight 20",
                                            "set server be_app/srv1 addr 10.0.0.9 port 9000"]
            assert (body["weight"], body["address"], body["port"]) == (20, "10.0.0.9", 9000)
            assert fake.running_backends["be_app"]["servers"]["srv1"] == server_body(address="10.0.0.9", port=9000,
                                                                                     weight=20)
            assert fake.violations == [] and fake.forgotten == []
            fake.runtime_changes.clear()          # HAProxy's weight is 1 when the file sets none
            assert api.call("PUT", runtime_path("v3", "be_app", "srv2"), {"weight": 1})[2]["weight"] == 1
            assert fake.runtime_changes == []
        else:                                     # weight is not in the model, address/port read-only
            assert fake.runtime_changes == ["set server be_app/srv1 state drain"]
            assert (body["address"], body["port"]) == ("10.0.0.4", 8080) and "weight" not in body
            assert fake.forgotten == [("runtime_server", "weight")]
            assert len(fake.violations) == 3       # weight unknown, address and port ignored


def test_runtime_plan_follows_change_through_runtime_api():
    old = server_body(weight=10, maintenance="disabled")
    assert fdp.runtime_plan("b", old, old) == ([], False)
    assert fdp.runtime_plan("b", dict(old, port=81), old) == (["set server b/srv1 addr 10.0.0.4 port 81"], False)
    assert fdp.runtime_plan("b", dict(old, rise=3), old) == ([], True)
    assert fdp.runtime_plan("b", dict(old, name="srv9"), old) == ([], True)
    assert fdp.runtime_plan("b", {k: v for k, v in old.items() if k != "weight"}, old) == ([], True)
    assert fdp.runtime_plan("b", dict(old, **{"agent-check": "enabled"}), old) == (["enable agent b/srv1"], False)


# --- faults ---

def test_fault_injection(fake, api):
    failing = fake.add_fault("PUT", fdp.PATH_TRANSACTION, status=500, message="boom")
    tid = api.start()
    assert api.commit(tid)[:3:2] == (500, {"code": 500, "message": "boom"})
    assert failing.hits == 1 and fake.transactions() == {tid: "in_progress"}
    assert api.commit(tid)[0] == 202                           # the fault was used up

    storm = fake.add_fault("POST", fdp.PATH_TRANSACTIONS, status=409, times=3)
    assert [api.call("POST", f"{TX}?version=2")[0] for _ in range(4)] == [409, 409, 409, 201]
    assert storm.hits == 3

    fake.add_fault("GET", fdp.PATH_VERSION, delay=0.3)
    started = time.monotonic()
    assert api.call("GET", f"{CFG}/version")[0] == 200 and time.monotonic() - started >= 0.3

    fake.add_fault("*", fdp.PATH_INFO, drop=True)
    with pytest.raises((http.client.HTTPException, ConnectionError, urllib.error.URLError)):
        api.call("GET", "/info")
    assert api.call("GET", "/info")[0] == 200

    fake.add_fault("PUT", fdp.PATH_TRANSACTION, status=500, after=True)   # the answer is lost
    version = fake.version
    assert api.commit(fake.open_transactions()[0])[0] == 500
    assert fake.version == version + 1


def test_stop_does_not_wait_for_a_hung_request():
    fake = fdp.FakeDataPlane("v2").start()
    fake.add_fault("GET", fdp.PATH_INFO, delay=30)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_swallow(lambda: Api(fake).call("GET", "/info"))))
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    fake.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 3 and not thread.is_alive()


def _swallow(call):
    try:
        return call()
    except Exception as exc:
        return exc


# --- v3 full sections ---

def test_v3_full_section():
    with fdp.FakeDataPlane("v3") as fake:
        api = Api(fake)
        backends = f"{CFG}/backends"
        servers = {name: server_body(name, port=8000 + i) for i, name in enumerate(("srv2", "srv10", "srv1"))}
        status, _, _ = api.call("POST", q(backends, version=1, full_section="true"), backend_body(servers=servers))
        assert status == 202
        assert list(fake.backends["be_app"]["servers"]) == ["srv1", "srv10", "srv2"]    # client-native sorts
        full = api.data("GET", q(backends, full_section="true"))[0]
        assert full["servers"]["srv10"] == servers["srv10"]
        assert "servers" not in api.data("GET", f"{backends}/be_app")

        del servers["srv10"]
        status, _, _ = api.call("PUT", q(f"{backends}/be_app", version=2, full_section="true"),
                                backend_body(servers=servers))
        assert status == 202 and list(fake.backends["be_app"]["servers"]) == ["srv1", "srv2"]
        status, _, _ = api.call("PUT", q(f"{backends}/be_app", version=3), backend_body(retries=2))
        assert status == 202 and list(fake.backends["be_app"]["servers"]) == ["srv1", "srv2"]   # kept

        status, _, error = api.call("POST", q(backends, version=4, full_section="true"), backend_body())
        assert status == 404 and error["message"] == "missing object: backend be_app already exist"
        assert fake.violations == []

        api.call("POST", q(backends, version=4), backend_body("be_other", servers=servers))
        assert fake.backends["be_other"]["servers"] == {}
        assert fake.violations and "without full_section" in fake.violations[0]


def _full_section_orders(personality, seed, writes=3):
    names = ["srv1", "srv2", "srv10", "srv3", "srv11"]
    servers = {n: server_body(n, port=8000 + i) for i, n in enumerate(names)}
    orders = []
    with fdp.FakeDataPlane(personality=personality, rng=seed, check_config=False) as fake:
        api = Api(fake)
        for n in range(writes):
            path = q(f"{CFG}/backends" + ("/be_app" if n else ""), version=fake.version, full_section="true")
            assert api.call("PUT" if n else "POST", path, backend_body(servers=servers))[0] == 202
            orders.append(tuple(fake.backends["be_app"]["servers"]))
            rendered = [line.split()[1] for line in fake.render().splitlines() if line.startswith("    server ")]
            assert tuple(rendered) == orders[-1]
        # Go's JSON encoder sorts map keys whatever the file order
        assert list(api.data("GET", q(f"{CFG}/backends/be_app", full_section="true"))["servers"]) == sorted(names)
    return orders


@pytest.mark.parametrize("personality", ["3.0", "3.2", "3.3.6", "3.4"])
def test_full_section_server_order(personality):
    orders = _full_section_orders(personality, seed=7)
    if personality == "3.0":      # client-native 6.0 ranges over a Go map: an order per write
        assert len(set(orders)) > 1 and all(sorted(o) == sorted(orders[0]) for o in orders)
        assert _full_section_orders(personality, seed=7) == orders          # reproducible by seed
    else:                         # 6.2.7+: string order of the names
        assert set(orders) == {("srv1", "srv10", "srv11", "srv2", "srv3")}


def test_v3_full_section_validates_the_servers_inside():
    with fdp.FakeDataPlane("v3") as fake:
        body = backend_body(servers={"srv1": server_body(port=0)})
        status, _, error = Api(fake).call("POST", q(f"{CFG}/backends", version=1, full_section="true"), body)
        assert status == 422 and "servers.srv1.port" in error["message"]


# --- edits behind the client's back, introspection ---

def test_seed_and_edit_server_move_the_version(fake, api):
    seed_app(fake)
    assert fake.version == 2
    tid = api.start()
    fake.edit_server("be_app", "srv1", maintenance="enabled", weight=5)
    assert fake.version == 3 and fake.server("be_app", "srv1")["maintenance"] == "enabled"
    assert api.commit(tid)[0] == 409
    snapshot = fake.backends
    snapshot["be_app"]["servers"]["srv1"]["address"] = "changed"
    assert fake.server("be_app", "srv1")["address"] == "10.0.0.4"
    with pytest.raises(fdp.SeedError):
        fake.edit_server("be_app", "srv1", port=0)
    fake.remove_server("be_app", "srv1")
    fake.remove_backend("be_app")
    assert fake.backends == {} and fake.version == 5


def test_requests_are_recorded(fake, api):
    api.call("GET", f"{CFG}/version")
    api.call("POST", q(f"{CFG}/backends", version=1), backend_body())
    method, path, query = fake.requests[-1]
    assert (method, path, query) == ("POST", f"{fake.base}{CFG}/backends", {"version": "1"})
    assert fake.requests[-1].status == 202 and fake.requests[-1].body["name"] == "be_app"
    assert fake.count_requests("GET", r"/configuration/version$") == 1
    fake.reset_requests()
    assert fake.requests == []


def test_command_line_options():
    args = fdp.build_parser().parse_args([])
    assert (args.reload_delay, args.personality, args.api) == (5.0, None, None)
    args = fdp.build_parser().parse_args(["--personality", "3.3.6", "--reload-delay", "0.5"])
    assert (args.reload_delay, args.personality) == (0.5, "3.3.6")
    with pytest.raises(SystemExit):
        fdp.build_parser().parse_args(["--personality", "3.1"])


def test_standalone_personality_and_reload_delay():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_dataplane.py"), "--port", "0",
                             "--personality", "3.0", "--reload-delay", "0.1", "--no-check"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "v3.0.23" in line
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v3", line).group(1)
        fake = type("Remote", (), {"url": url, "base": "/v3", "version": 1, "api": "v3"})()
        api = Api(fake)
        assert api.call("GET", "/info")[2]["api"]["version"].startswith("v3.0.23")
        rid = api.commit(api.start())[1]["Reload-ID"]
        deadline = time.monotonic() + 5
        while reload_of(api, rid)["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        proc.stderr.close()


def test_standalone_command_line(tmp_path):
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"be_app": backend_body(servers=[server_body()])}))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_dataplane.py"), "--port", "0",
                             "--api", "v2", "--password", "s3cret", "--seed", str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v2", line).group(1)
        request = urllib.request.Request(url + "/v2" + CFG + "/servers?backend=be_app")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"admin:s3cret").decode())
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["data"][0]["name"] == "srv1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        proc.stderr.close()


# --- phase 2: a real HAProxy ---

class NamedServer:
    """A tiny HTTP server on a loopback address that answers with its name."""

    def __init__(self, address, name):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def who_answers(port, count=6):
    """The set of server names that answer `count` requests through HAProxy."""
    names = set()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/", headers={"Connection": "close"})
        names.add(conn.getresponse().read().decode())
        conn.close()
    return names


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_live_haproxy_reloads_on_commit_and_applies_runtime_changes():
    alpha, beta = NamedServer("127.0.0.2", "alpha"), NamedServer("127.0.0.3", "beta")
    frontend_port = fdp._free_port()
    fake = fdp.FakeDataPlane("v3", base_config=fdp.frontend_config(frontend_port, default_backend="be_app"),
                             live=True, reload_delay=DELAY)
    fake.seed({"be_app": backend_body(servers=[server_body("srv1", "127.0.0.2", alpha.port)])}, bump=False)
    api = Api(fake)
    try:
        fake.start()
        live = fake.live
        master, workers = live._proc.pid, live.show_proc()["workers"]
        assert who_answers(frontend_port) == {"alpha"}

        tid = api.start()
        srv2 = server_body("srv2", "127.0.0.3", beta.port)
        assert api.call("POST", q(servers_path("v3", "be_app"), transaction_id=tid), srv2)[0] == 202
        assert api.commit(tid)[0] == 202
        settle(fake)
        assert fake.reloads == 1 == live.reload_count()
        assert who_answers(frontend_port) == {"alpha", "beta"}

        parked = server_body("srv1", "127.0.0.2", alpha.port, maintenance="enabled")
        status, _, _ = api.call("PUT", q(servers_path("v3", "be_app", "srv1"), version=2), parked)
        assert status == 200 and fake.runtime_changes == ["set server be_app/srv1 state maint"]
        assert fake.reloads == 1 == live.reload_count()
        assert who_answers(frontend_port) == {"beta"}
        with open(live.cfg_path) as f:                          # written for the next reload
            assert f"    server srv1 127.0.0.2:{alpha.port} disabled" in f.read().splitlines()

        status, _, _ = api.call("PUT", q(servers_path("v3", "be_app", "srv2"), version=3), dict(srv2, inter=3000))
        assert status == 202
        settle(fake)
        assert fake.reloads == 2 == live.reload_count()
        assert who_answers(frontend_port) == {"beta"}           # srv1 stays in maintenance

        # A runtime drain: HAProxy's own state (`show stat` says DRAIN), no reload.
        fake.runtime_changes.clear()
        status, _, _ = api.call("PUT", "/services/haproxy/runtime/backends/be_app/servers/srv2",
                                   {"admin_state": "drain"})
        assert status == 200 and fake.runtime_changes == ["set server be_app/srv2 state drain"]
        _, _, stats = api.call("GET", q("/services/haproxy/stats/native", type="server", parent="be_app",
                                        name="srv2"))
        assert stats["stats"][0]["stats"]["status"] == "DRAIN" and stats["stats"][0]["stats"]["scur"] == 0
        assert fake.reloads == 2 == live.reload_count()
        assert fake.violations == [] and fake.errors == []
        workers += live.show_proc()["workers"]
    finally:
        fake.stop()
        alpha.close()
        beta.close()
    assert not any(_alive(pid) for pid in [master] + workers)


def test_live_failed_reload_puts_the_last_good_file_back():
    alpha, beta = NamedServer("127.0.0.2", "alpha"), NamedServer("127.0.0.3", "beta")
    frontend_port = fdp._free_port()
    fake = fdp.FakeDataPlane("v3", base_config=fdp.frontend_config(frontend_port, default_backend="be_app"),
                             live=True, reload_delay=DELAY)
    fake.seed({"be_app": backend_body(servers=[server_body("srv1", "127.0.0.2", alpha.port)])}, bump=False)
    api = Api(fake)
    try:
        fake.start()
        live = fake.live
        good = fake.running_render()
        fake.reload_fail()
        tid = api.start()
        srv2 = server_body("srv2", "127.0.0.3", beta.port)
        assert api.call("POST", q(servers_path("v3", "be_app"), transaction_id=tid), srv2)[0] == 202
        assert api.commit(tid)[0] == 202
        settle(fake)
        with open(live.cfg_path) as f:
            assert f.read() == good == fake.file_text()                 # the last good file is back
        assert live.reload_count() == 0 and who_answers(frontend_port) == {"alpha"}
        assert "srv2" in fake.backends["be_app"]["servers"]
        api.commit(api.start())                                         # writes the API's configuration
        settle(fake)
        assert live.reload_count() == 1 and who_answers(frontend_port) == {"alpha", "beta"}
        with open(live.cfg_path) as f:
            assert f.read() == fake.running_render() == fake.render()
        assert fake.violations == [] and fake.errors == []
    finally:
        fake.stop()
        alpha.close()
        beta.close()
