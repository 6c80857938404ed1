#!/usr/bin/env python3
"""An emulator of the HAProxy Data Plane API for the test bed, release by release.

There is no dataplaneapi binary in the test bed; this file stands in for it. It keeps an
in-memory configuration of backends and servers, speaks the v2 or v3 REST dialect of one
dataplaneapi release (its "personality"), validates every request body against the official
specification in ``spec/``, renders a complete ``haproxy.cfg``, checks every change with the
real ``haproxy -c``, reloads on dataplaneapi's ticker, and optionally drives a real HAProxy
(master-worker) so tests can send real traffic through it. It is never more lenient than the
release it plays; where it is stricter, it says so below and records the client bug.

Usage in tests::

    from fake_dataplane import FakeDataPlane, frontend_config

    with FakeDataPlane(personality="3.2", reload_delay=0.05) as fake:
        ... point the client at fake.url, user fake.username / fake.password ...
        fake.wait_reloads()                        # the reload ticker came and went
        assert fake.violations == []               # end every test with this

``personality`` is one of PERSONALITIES: "2.9" (the v2 API), "3.0", "3.2", "3.3.6", "3.4"
(v3). The old ``api="v2"|"v3"`` still works and means "2.9" or "3.4"; ``personality`` wins.
End every test with ``assert fake.violations == [] and fake.errors == []``: violations are
client bugs (invalid bodies, unknown fields...), errors are emulator crashes.

What a caller must know (changes from the emulator before personalities):

* ``reload_delay`` defaults to 5 s, dataplaneapi's ``--reload-delay`` (0 also means 5 s, as
  there). Reloads run on a ticker: a commit answers 202 + ``Reload-Id`` and its reload runs
  at the next tick. Tests pass a short delay (0.05) and call ``fake.wait_reloads()`` before
  asserting on ``fake.reloads``, ``running_backends`` or reload records.
* Unknown body fields are answered 2xx and forgotten by every release; the emulator no
  longer answers 422 for them (``reject_unknown_fields=True`` brings that back). Each one is
  still a violation, and is listed in ``fake.forgotten`` as (model, dotted path).
* What HAProxy runs is kept apart from what the API answers: ``running_backends``,
  ``running_render()``; ``file_text()`` is what the configuration file holds.
* The header is sent as Go writes it: ``Reload-Id`` (HTTP header names are case-insensitive).
* New: ``personality``, ``traits`` (the Personality), ``forgotten``, ``forget_fields=``,
  ``rng=``, ``reload_retention=``, ``reload_duration``, ``restart()``, ``reload_fail(n)``,
  ``wait_reloads(timeout)``, ``pending_reload``, ``reloading``, ``reload_history``,
  ``running_backends``, ``running_render()``, ``file_text()``, ``operational_states``,
  ``restarts``. The command line takes ``--personality`` and ``--reload-delay`` (default 5).

Introspection: ``version``, ``backends`` (deep copy of what the API answers), ``server(b, s)``,
``open_transactions()``, ``transactions()``, ``requests`` (``reset_requests()``,
``count_requests()``), ``reloads`` (HAProxy reloads performed, failed ones too),
``reload_history``, ``runtime_changes``, ``commits``, ``checks``, ``check_failures``,
``last_check_output``, ``unrendered``, ``render()``, ``admin_states`` (runtime states that
differ from what HAProxy loaded); ``sessions[(backend, server)] = n`` sets a server's current
sessions for the native stats (a live HAProxy reports its own).
Faults: ``add_fault(method, PATH_..., status=, message=, delay=, drop=, times=, after=)``;
``reload_fail(n)`` / ``fail_reloads`` (the next n reloads fail), ``reload_duration`` (seconds
a reload takes), ``runtime_broken``, ``runtime_gap``; ``restart()`` (dataplaneapi restarts).
Changes behind the client's back (another party wrote the file and HAProxy reloaded it):
``seed()``, ``edit_server()``, ``remove_server()``, ``remove_backend()``. A real HAProxy:
``live=True`` or ``live=LiveHAProxy(...)`` (testing/live_haproxy.py; ``fake.live.reload_count()``
is HAProxy's own count).

Standalone, until SIGTERM or Ctrl-C::

    python3 testing/fake_dataplane.py --port 5555 --personality 3.2 [--reload-delay 5] \\
        [--user admin --password adminpwd] [--base-config FILE] [--seed FILE.json] \\
        [--no-check] [--live] [--haproxy /usr/sbin/haproxy]

THE TABLE: behaviours that differ between releases, or from this emulator's old behaviour
----------------------------------------------------------------------------------------

Sources: dataplaneapi = github.com/haproxytech/dataplaneapi, cn = github.com/haproxytech/
client-native, read at the tags named (file:lines at that tag). Releases played: 2.9 =
dataplaneapi v2.9.27 (cn v5.1.28, go-swagger, v2 API); 3.0 = v3.0.23 (cn v6.0.27, go-swagger);
3.2 = v3.2.15 (cn v6.2.17, go-swagger); 3.3.6 (cn v6.3.10; the first release on chi +
oapi-codegen, UPGRADE.md); 3.4 = v3.4.2 (cn v6.4.1, chi + oapi-codegen). cn v5.1.28, v6.0.27,
v6.2.17, v6.3.10 and v6.4.1 are not in the snapshot read; the nearest tags were read (v5.1.27,
v6.0.26 = head of branch v6.0, v6.2.16, v6.3.9, v6.4.0) and dataplaneapi's embedded spec
checked for the fields concerned.

a. Server order after a full-section POST/PUT (v3 only; 2.9 has no full_section).
   3.0: Go map order, a new random order per write (``rng=`` seeds it). 3.2, 3.3.6, 3.4:
   string order of the names (srv1, srv10, srv2). GET answers the map with sorted keys in
   every release (Go's JSON encoder).
   cn v6.0.26 configuration/structured_backends.go:294 ranges over b.Servers (a map); cn
   v6.2.7 :293-304 sorts the names (commit f16d6633), first taken by dataplaneapi v3.2.8
   (go.mod: v3.2.7 cn v6.2.6, v3.2.8 cn v6.2.7); the v6.0 and v6.1 branches never got it.

b. Unknown body fields: every release answers 2xx and forgets them (before: the emulator
   answered 422 on v3). go-swagger (2.9, 3.0, 3.2) decodes with the route's JSON consumer and
   only runs Validate (dataplaneapi v2.9.27 operations/backend/create_backend_parameters.go:
   93-102); the oapi releases check the body only against a stub schema (``backend: {type:
   object, x-go-type: models.Backend}`` in the spec embedded in handlers/configuration/backend/
   backend.gen.go; validator handlers/middleware/middleware.go:48-129) and decode it with
   respond.DecodeJSON, a json.Decoder without DisallowUnknownFields, then Validate
   (v3.3.6 and v3.4.2 handlers/respond/respond.go:187-211). Each release's models are its
   own: 3.0 lacks the backend and server fields added in cn 6.1/6.2 (metadata,
   hash_preserve_affinity, ... see Personality.absent), 3.3.6 lacks use_small_buffers,
   filter_sequence_list, quic-cc-algo, quic_cc_algo_max_window. Recorded in violations and
   ``fake.forgotten``.
   Body errors: go-swagger serves the first error, body code 6xx; the oapi releases serve
   every leaf error joined by newlines with code 422 (v3.4.2 respond.go:217-238; UPGRADE.md).
   Query parameter errors: go-swagger 422 (6xx); oapi-codegen 400 "Query argument X is
   required, but not found" / "Invalid format for parameter X: ..." (v3.4.2
   handlers/dataplane/transactions/transactions.gen.go:174-183, 320-322, 342-344).

c. Backend ``http_proxy``: kept by 2.9, 3.0, 3.2 (it is in their models; HAProxy 2.6 then
   refuses ``option http_proxy`` at commit, 400); 3.3.6 and 3.4: not in the model, 2xx and
   forgotten (a violation, and ("backend", "http_proxy") in fake.forgotten). cn commit
   2ae50a48 "remove unsupported http-use-htx and http-proxy options" is in v6.3.9, not in
   v6.3.8; dataplaneapi v3.3.5 go.mod takes cn v6.3.8, v3.3.6 takes v6.3.10 (its embedded spec
   lost http_proxy; v3.3.5's, v3.2.15's and v3.0.23's still have it). ``forget_fields=
   {"backend": {...}, "server": {...}}`` makes any field behave so (2xx, not kept, listed in
   fake.forgotten, not a violation).

d. Runtime server endpoint for an unknown backend or server (v2 /runtime/servers/{name}?
   backend=B, v3 /runtime/backends/{B}/servers/{name}): client-native's "no data for B/S: not
   found" (cn v5.1.27 runtime/runtime_client.go:458). GET: 404 everywhere (isNotFoundError).
   PUT: 500 on 2.9 and 3.0 (and 3.1): misc.HandleError's default case (dataplaneapi v2.9.27
   and v3.0.23 misc/misc.go:100-103); 404 from 3.2.0, which maps cn's ErrNotFound (v3.2.15
   misc/misc.go:103; v3.4.2 :100-104). "Unknown" now means: not in what HAProxy runs (after
   a failed reload, or before the tick, the API knows servers HAProxy does not).

e. Runtime server PUT body: 2.9, 3.0, 3.2 apply operational_state then admin_state
   (v2.9.27 handlers/runtime_server.go:105-153; v3.0.23/v3.2.15 :106-153); address and port are
   read-only fields of that model (ignored: a violation) and weight is not in it (forgotten).
   3.3.6, 3.4 also apply weight, then address/port ("set server B/S addr A port P"), each only
   when it differs (from v3.3.1 handlers/runtime_server.go:107-211, cn v6.3.2 models/
   runtime_server.go:155; v3.4.2 handlers/runtime/servers/servers.go:183-293).

f. Reloads on a ticker (same code in every release: v2.9.27 haproxy/reload_agent.go and
   v3.4.2 reload_agent/reload_agent.go differ in imports and the runtime interface only).
   A ticker of reload_delay (default 5 s; 0 means 5 s: :115-123 / v3.4.2 :110-118; config
   v2.9.27 configuration/configuration.go:61) runs the one pending reload at each tick
   (handleReloads :180-193); every reloading write since the last tick gets the same id
   (Reload :257-266), "YYYY-MM-DD-N" with N from 0 per start (newReload :331-338). The agent
   holds its cache lock for the whole reload (handleReload :153-178): GET
   /services/haproxy/reloads[/{id}] and every write asking for a reload wait until it ends,
   then the write gets the next id. GET /reloads/{id} (GetReload :420-471): pending ->
   {"status": "in_progress"} with the running reload's id, which is empty then, so no "id"
   (:430-435); failed ones kept for --reload-retention days (1; :354-387); the last success;
   an id without record older than the last success (by date, or else by counter alone)
   -> a made-up {"id", "status": "succeeded"} (:446-468); else 404 "Reload with ID X does not
   exist" (handlers/reloads.go:40-52). A malformed id: 422 (go-swagger) / 400 (oapi), pattern
   ^\\d{4}-\\d{2}-\\d{2}-\\d+$. GET /reloads (GetReloads :389-418): failed ones (map order),
   last success, running, pending. ``wait_reloads()`` waits for the tick; ``reload_duration``
   makes a reload take time.

g. Failed reloads: the agent copies the file to .bck, copies the last-known-good copy over
   the file, and removes the .bck on return (:208-223; v3.4.2 :203-218): HAProxy is neither
   restarted nor reloaded with it, and the failed configuration survives only in memory.
   Every GET keeps answering the committed configuration (cn's in-memory parser); the file
   watcher does not reload the restored file, which carries a valid "# _md5hash" line
   (dataplaneapi v2.9.27 configuration/watcher.go:79-81, 99-113; client-native/cn.go:40
   UseMd5Hash). A successful reload copies the file as it is then to the last-known-good copy
   (:227). The next commit writes its whole configuration to the file (cn v5.1.27
   configuration/transaction.go:201; transactions start from the in-memory parser: persistent
   transactions save it to their file, :546-566, and parse that, configuration.go:104-142),
   so its reload brings HAProxy up to date. Emulated: ``running_backends``/``running_render()``
   (what HAProxy runs), ``file_text()``; live, the last-known-good text is written back to
   the file HAProxy reads.

h. force_reload=true (commit 200, create 201, replace 200, delete 204): synchronous. With a
   reload pending it runs now, recorded under its id; otherwise a reload with the id "force"
   that no record keeps (ForceReload :268-284). A failure is a ReloadError "Reload failed:
   ERR, OUTPUT" answered 400 (misc.HandleError v2.9.27 misc/misc.go:92-95, v3.4.2 :89-92); the
   change stays committed. ``fake.reload_history`` lists both kinds.

i. restart(): the pending reload is lost, the records are forgotten, the counter restarts at
   0 (so an old "-0" id can answer for the new one), a new ticker period begins, the file
   becomes the last-known-good copy (NewReloadAgent :93-137). The configuration and version
   are read from the file (cn interface.go:79-145, version from "# _version", configuration.go:
   182-191): after a failed reload that is the last-known-good one, and the version goes back.
   In-progress transactions survive with their version, failed/outdated ones stay listed
   (persistent transactions, dataplaneapi client-native/cn.go:37; cn transaction-handling.go:
   36-59). No reload at startup (no Reload() call outside the handlers, configure_data_plane.go).

j. Transactions: 429 "cannot start a new transaction, reached the maximum amount of 20 active
   transactions available" when 20 are in progress (only in_progress count: v2.9.27
   configure_data_plane.go:302-321, rate/threshold_limit.go:22-27). A commit marks every other
   in_progress transaction whose version is <= the committed one's outdated (handlers/
   transaction.go:190-201). GET /transactions lists the transaction directory in name order:
   failed/, in-progress files, outdated/, each by id (cn transaction.go:447-514); failed and
   outdated ones carry no "_version" (their version is read with the id as a file path and
   comes back 0, :533-536, 668-691, transaction-handling.go:78-91); ?status= takes failed or
   in_progress (422/400 otherwise). A plain write that fails ``haproxy -c`` is listed as a
   failed transaction (SaveData :697-724).

k. Plain (versioned) server PUT, changeThroughRuntimeAPI (v2.9.27 handlers/runtime.go:29-238;
   v3.4.2 handlers/configuration/server/server.go:295-437): the file is written first; no
   runtime client -> reload; no difference -> 200; a difference outside Weight, Address, Port,
   Maintenance, AgentCheck, AgentAddr, AgentSend, HealthCheckPort -> reload. Otherwise the
   commands go out in models.Server's field order (agent-addr, agent-check, agent-send,
   health_check_port, maintenance, weight, address, port: cn models/server.go, server_params.go)
   and a pointer field (weight, health_check_port, port) that differs and is absent from the
   new body panics at its dereference, after the commands before it were sent; the recovered
   panic, or a failed command, means a reload: 202 + Reload-Id (with force_reload 200).
   Commands now act on what HAProxy runs (a server it does not run: "No such server.", reload).

l. Also: DELETE of a missing transaction 404 "transaction does not exist: transaction file X
   does not exist", GET/commit 404 "... transaction X does not exist" (transaction.go:82-117,
   155-162; cn :609); a write or read with an outdated transaction_id 400 "transaction does
   not exist: ID", GET version?transaction_id= of one 400 too (was 404: cn version.go:23-34);
   commit of an outdated or failed one 406, of a stale one 409 (then outdated); plain writes
   answer 202 + Reload-Id, 200/201/204 when forced or applied at runtime; the oapi releases
   authenticate before routing (401 for unknown paths without credentials, UPGRADE.md);
   a plain server POST is added at runtime (201) on 3.x only when no default_server applies
   and HAProxy runs the backend (2.9 converts into a nil pointer and always reloads:
   handlers/server.go:113-130); runtime_server answers carry weight on 3.3.6+.

The same in every release (and as before):

* every write takes exactly one of ``transaction_id`` or ``version``; a plain (versioned)
  write is an implicit transaction committed at once: checked with ``haproxy -c``, version
  + 1 whether anything changed or not, file written, then a reload asked for;
* a write that fails inside an explicit transaction leaves the transaction open (cn's
  HandleError deletes only implicit ones), holding whatever the write changed before it
  failed; the emulator's writes fail before they change anything (as schema errors do), and
  ``add_fault(..., after=True)`` stands in for a write that failed half-way;
* a full-section POST/PUT rebuilds the backend from the body alone: child lists it lacks are
  gone, the section moves to the end of the file; POST of an existing one is 404 "backend X
  already exist" (cn structured_backends.go:114-128);
* unparking in one plain PUT sends ``set server ... state ready`` before ``set server ...
  addr`` (the field order of k): the server is ready at the parked address for a moment
  (``runtime_gap`` widens it);
* the runtime server endpoint and native stats ask HAProxy: no version, no reload, nothing
  written; a successful reload forgets runtime state, a failed one keeps the old workers
  and theirs. Native stats: v2 a list of collections, v3 one (handlers/stats.go).

Deliberately stricter than dataplaneapi (each recorded in ``fake.violations``):

* ``null`` is accepted only where the model is nullable (Go would read it as "unset");
* an unknown field, a field the release's model lacks, or a read-only runtime_server field
  is answered as the release answers it (2xx, forgotten or ignored) but recorded;
* a v3 backend POST/PUT that carries ``servers`` without ``full_section=true`` (dataplaneapi
  ignores those servers);
* 3.0 is validated with the 3.2 specification minus the fields 3.0 lacks, and 3.3.6 with
  the 3.4 one minus the fields 3.3.6 lacks: enum or pattern differences between those
  releases, if any, are not modelled (none in the backend and server models).

Measured against the real servers (testing/test_conformance.py and testing/differential.py,
dataplaneapi 2.9.27, 3.2.15 and 3.4.2 built here, on HAProxy 3.0.11 and Debian's 2.6.12; see
docs/development.md): with HAProxy 3.0 the program's 400-570 requests per release agree in
order, status, Reload-Id/Configuration-Version headers, answer shapes and the backends' end
state, once three differences were fixed here: /info's ``system`` is {}; a succeeded reload's
record carries HAProxy's output as ``response``; runtime_server answers carry ``id`` (and from
3.3.6 the whole ``show servers state`` line). Kept on purpose: the emulator plays dataplaneapi
over HAProxy 2.7+, which it reloads through the master socket. Over HAProxy 2.6 dataplaneapi
runs its reload_cmd instead: the master CLI's ``reload`` returns before the reload ends, so a
reload HAProxy refuses is recorded "succeeded" (and its record has no ``response``), and the
runtime API does not see the servers added since dataplaneapi started (PUT /runtime/...: 500
"no data for B/S" on 2.9, 404 on 3.x), so a drain is refused and the server parked at once.

As lenient as the real server: unknown fields (2xx, dropped), the runtime PUT's read-only
fields (ignored), the made-up "succeeded" for old reload ids. Reproduced on purpose: a
commit whose file write lands while a reload runs that then fails loses its file to the
last-known-good copy, as the agent's copy does. Not emulated: the rollback commands of a
failed runtime server PUT (here a failure is always the first command's) and Go's
writer-preferring RWMutex.
"""
from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import jsonschema

from live_haproxy import HAPROXY_BIN, LiveHAProxy   # the haproxy binary; a real HAProxy (live=)

# === Constants ===

DEFAULT_USERNAME = "admin"
DEFAULT_PASSWORD = "adminpwd"
MAX_OPEN_TRANSACTIONS = 20      # dataplaneapi's --max-open-transactions default
DEFAULT_RELOAD_DELAY = 5.0      # dataplaneapi's --reload-delay default (and what 0 means there)
DEFAULT_RELOAD_RETENTION = 1    # dataplaneapi's --reload-retention default, in days
RELOAD_ID_PATTERN = r"^\d{4}-\d{2}-\d{2}-\d+$"   # the reload id path parameter's pattern
MAX_FAULT_DELAY = 60.0          # an injected hang never lasts longer than this
CHECK_TIMEOUT = 60.0            # seconds allowed for one `haproxy -c`

SPEC_FILES = {
    "v2": "dataplaneapi-v2.yaml",                   # client-native v5.1 (dataplaneapi 2.9)
    "v3": "dataplaneapi-v3.yaml",                   # client-native v6.2 (dataplaneapi 3.2)
    "v3.4": "dataplaneapi-v3.4-openapi3.yaml",      # dataplaneapi 3.4, OpenAPI 3
}


@dataclasses.dataclass(frozen=True)
class Personality:
    """One dataplaneapi release as the emulator plays it (see the TABLE in the module docstring)."""
    name: str
    api: str                    # "v2" or "v3": paths, wrapped or bare GET bodies
    release: str                # what GET /info claims
    client_native: str          # the client-native release its go.mod takes
    spec: str                   # key of SPEC_FILES whose models decode the bodies
    flavor: str                 # "swagger" (go-swagger server) or "oapi" (chi + oapi-codegen server)
    server_order: str           # full-section servers: "file" (v2: none), "random" (Go map), "name"
    runtime_put_missing: int    # runtime server PUT for an unknown backend/server
    runtime_put_fields: tuple   # runtime server PUT body fields applied, in the handler's order
    runtime_add_server: bool    # a plain server POST may use runtime `add server`
    # Fields the spec file models have but this release's models lack, by definition name
    # (the spec files in spec/ are one per family; these are the differences measured with
    # client-native v6.0.26 vs v6.2.16 and dataplaneapi v3.3.6 vs v3.4.2 specifications).
    absent: dict = dataclasses.field(default_factory=dict)


_SERVER_FIELDS_AFTER_6_0 = frozenset({"check-pool-conn-name", "check-reuse-pool", "idle_ping", "init-state",
                                      "sslv3", "strict-maxconn", "tlsv10", "tlsv11", "tlsv12", "tlsv13"})

# The releases the emulator plays; the letters are the rows of the TABLE in the module docstring:
# server_order (a), spec/absent (b, c), flavor (b, l), runtime_put_missing (d),
# runtime_put_fields (e), runtime_add_server (l). The reload agent (f-i), transactions (j)
# and changeThroughRuntimeAPI (k) are the same code in every release.
PERSONALITIES = {
    "2.9": Personality("2.9", "v2", "v2.9.27", "v5.1.28", "v2", "swagger", "file", 500,
                       ("operational_state", "admin_state"), False),
    "3.0": Personality("3.0", "v3", "v3.0.23", "v6.0.27", "v3", "swagger", "random", 500,
                       ("operational_state", "admin_state"), True,
                       {"backend_base": frozenset({"accept_unsafe_violations_in_http_response",
                                                   "hash_preserve_affinity", "http-drop-request-trailers",
                                                   "metadata"}),
                        "server_params": _SERVER_FIELDS_AFTER_6_0,
                        "httpchk_params": frozenset({"host"})}),
    "3.2": Personality("3.2", "v3", "v3.2.15", "v6.2.17", "v3", "swagger", "name", 404,
                       ("operational_state", "admin_state"), True),
    "3.3.6": Personality("3.3.6", "v3", "v3.3.6", "v6.3.10", "v3.4", "oapi", "name", 404,
                         ("operational_state", "admin_state", "weight", "address", "port"), True,
                         {"backend_base": frozenset({"use_small_buffers"}),
                          "backend": frozenset({"filter_sequence_list"}),
                          "server_params": frozenset({"quic-cc-algo", "quic_cc_algo_max_window"})}),
    "3.4": Personality("3.4", "v3", "v3.4.2", "v6.4.1", "v3.4", "oapi", "name", 404,
                       ("operational_state", "admin_state", "weight", "address", "port"), True),
}
API_PERSONALITY = {"v2": "2.9", "v3": "3.4"}        # the old api= argument
API_RELEASE = {api: PERSONALITIES[name].release for api, name in API_PERSONALITY.items()}

IN_PROGRESS, SUCCESS, FAILED, OUTDATED = "in_progress", "success", "failed", "outdated"

# Fields dataplaneapi can change on a running HAProxy without a reload, in the
# order it visits them (the order of the Go struct fields of models.Server).
RUNTIME_SERVER_FIELDS = ("agent-addr", "agent-check", "agent-send", "health_check_port",
                         "maintenance", "weight", "address", "port")

# Path patterns for fault injection. They are matched (re.search) against the
# request path without its /v2 or /v3 prefix, so one pattern serves both APIs.
PATH_INFO = r"^/info$"
PATH_VERSION = r"^/services/haproxy/configuration/version$"
PATH_TRANSACTIONS = r"^/services/haproxy/transactions$"            # POST = start
PATH_TRANSACTION = r"^/services/haproxy/transactions/[^/]+$"       # PUT = commit
PATH_BACKENDS = r"^/services/haproxy/configuration/backends(/[^/]+)?$"
PATH_SERVERS = r"/servers(/[^/]+)?$"


# === Errors ===

class ApiError(Exception):
    """An error answer: HTTP status plus the ``{"code", "message"}`` body."""

    def __init__(self, status: int, message: str, code: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = status if code is None else code


class SeedError(ValueError):
    """A seed() or edit_*() call describes an invalid configuration (a test bug)."""


# === Specification models ===
#
# The request bodies are checked with `jsonschema` against the models of the
# official specifications. Swagger 2.0 and OpenAPI 3.0 schemas are close to
# JSON Schema; the differences handled here are `$ref` targets, nullability
# (`x-nullable` / `nullable`) and `additionalProperties: false` next to
# `allOf`, which in JSON Schema would reject every property declared in the
# allOf parts. Unknown fields are therefore found by a separate walk that
# merges allOf parts, the way the Go structs do.

_SPEC_CACHE: dict[str, "SpecModels"] = {}
_SPEC_LOCK = threading.Lock()


def default_spec_dir() -> str:
    """Where the specification files are: $FAKE_DATAPLANE_SPEC_DIR, or near this file."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("FAKE_DATAPLANE_SPEC_DIR"), os.path.join(here, "spec"),
                  os.path.join(here, "..", "spec"), os.path.join(here, "..", "..", "shared", "spec")]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, SPEC_FILES["v2"])):
            return os.path.normpath(candidate)
    raise FileNotFoundError("Data Plane API specifications not found; set FAKE_DATAPLANE_SPEC_DIR")


def load_models(path: str, absent: dict | None = None) -> "SpecModels":
    """The models of one specification file, parsed once per process; `absent` removes
    fields ({definition: field names}) that an older or newer release's models lack."""
    key = (path, tuple(sorted((name, tuple(sorted(fields))) for name, fields in (absent or {}).items())))
    with _SPEC_LOCK:
        if key not in _SPEC_CACHE:
            schemas = _read_spec_schemas(path)
            label = os.path.basename(path)
            if absent:
                schemas = _without_fields(schemas, absent)
                label += " without " + ", ".join(f"{n}.{f}" for n, fs in sorted(absent.items()) for f in sorted(fs))
            _SPEC_CACHE[key] = SpecModels(schemas, label)
        return _SPEC_CACHE[key]


def _without_fields(schemas: dict, absent: dict) -> dict:
    """A copy of `schemas` whose named definitions (and their inline allOf parts) lack the fields."""
    out = dict(schemas)
    for name, fields in absent.items():
        if name not in out:
            continue
        node = copy.deepcopy(out[name])
        for part in [node] + [p for p in node.get("allOf", ()) if "$ref" not in p]:
            for f in fields:
                part.get("properties", {}).pop(f, None)
            if "required" in part:
                part["required"] = [r for r in part["required"] if r not in fields]
        out[name] = node
    return out


def _read_spec_schemas(path: str) -> dict:
    """The spec's model definitions (Swagger `definitions` or OpenAPI `components.schemas`).

    Parsing the large YAML files takes about a second each, so the models are
    cached as JSON in the temp directory, keyed by a hash of the file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    cache = os.path.join(tempfile.gettempdir(),
                         f"fake_dataplane-{hashlib.sha256(raw).hexdigest()[:20]}.json")
    try:
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    import yaml  # only needed when the cache is cold
    doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = doc.get("definitions") or doc["components"]["schemas"]
    text = json.dumps(schemas, default=str)      # YAML dates in examples become strings
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, cache)
    except OSError:
        pass
    return json.loads(text)


def _is_nullable(node: dict) -> bool:
    return node.get("x-nullable") is True or node.get("nullable") is True


def _to_json_schema(node):
    """Convert one Swagger 2.0 / OpenAPI 3.0 schema node to JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:                       # siblings of $ref are ignored by both formats
        out = {"$ref": "#/$defs/" + node["$ref"].rsplit("/", 1)[1]}
    else:
        out = {}
        for key, value in node.items():
            if key.startswith("x-") or key in ("example", "nullable", "discriminator", "readOnly"):
                continue
            if key == "additionalProperties" and value is False:
                continue                     # see SpecModels.unknown_fields
            if key == "properties":
                out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
            elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
                out[key] = _to_json_schema(value)
            else:
                out[key] = value
    if not _is_nullable(node):
        return out
    if isinstance(out.get("type"), str) and "$ref" not in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


def _go_message(error) -> tuple[int, str]:
    """A go-swagger style (code, message) for one jsonschema error."""
    where = ".".join(str(p) for p in error.absolute_path)
    path = where or "body"
    kind, expected = error.validator, error.validator_value
    if kind == "required":
        missing = [p for p in expected if isinstance(error.instance, dict) and p not in error.instance]
        name = ".".join(p for p in (where, missing[0] if missing else "") if p)
        return 602, f"{name} in body is required"
    if kind == "enum":
        values = " ".join(json.dumps(v) if not isinstance(v, str) else v
                          for v in expected if v is not None)
        return 606, f"{path} in body should be one of [{values}]"
    if kind == "pattern":
        return 605, f"{path} in body should match '{expected}'"
    if kind == "maximum":
        return 608, f"{path} in body should be less than or equal to {expected}"
    if kind == "minimum":
        return 609, f"{path} in body should be greater than or equal to {expected}"
    if kind == "type":
        wanted = expected if isinstance(expected, str) else expected[0]
        return 601, f"{path} in body must be of type {wanted}: {json.dumps(error.instance)[:80]}"
    return 601, f"{path} in body: {error.message}"


def _leaf_errors(error) -> list:
    """Errors from anyOf (nullable refs) carry their causes in .context."""
    if not error.context:
        return [error]
    return _leaf_errors(jsonschema.exceptions.best_match(error.context))


class SpecModels:
    """The models of one specification file: validation, unknown fields, Go round trip."""

    def __init__(self, schemas: dict, label: str):
        self.label = label
        self.raw = schemas
        self._defs = {name: _to_json_schema(schema) for name, schema in schemas.items()}
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def schema_errors(self, model: str, instance) -> list[tuple[int, str]]:
        """Every (go-swagger code, message) for `instance` against `model`, path-sorted."""
        if model not in self._validators:
            schema = {"$defs": self._defs, "$ref": f"#/$defs/{model}"}
            self._validators[model] = jsonschema.Draft202012Validator(schema)
        errors = [leaf for error in self._validators[model].iter_errors(instance)
                  for leaf in _leaf_errors(error)]
        errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
        return [_go_message(e) for e in errors]

    def unknown_fields(self, model: str, instance) -> list[str]:
        """Dotted paths of fields the model does not declare (Go would drop them)."""
        return self._unknown(self.raw[model], instance, "")

    def normalize(self, model: str, instance, keep_null: bool = False):
        """What dataplaneapi gives back after decoding into Go structs and encoding again:
        unknown fields dropped, and unset values (omitempty) left out.

        keep_null keeps explicit nulls, for validation: go-swagger never validates
        a zero value of an optional field, but the emulator rejects misplaced nulls.
        """
        return self._normalize(self.raw[model], instance, keep_null)

    def _resolve(self, node: dict) -> dict:
        while isinstance(node, dict) and "$ref" in node:
            node = self.raw[node["$ref"].rsplit("/", 1)[1]]
        return node

    def _parts(self, node: dict):
        node = self._resolve(node)
        yield node
        for part in node.get("allOf", ()):
            yield from self._parts(part)

    def _shape(self, node: dict):
        """(declared properties or None for a free-form object, map value schema, required)."""
        props, additional, declared, required = {}, None, False, set()
        for part in self._parts(node):
            if "properties" in part:
                props.update(part["properties"])
                declared = True
            extra = part.get("additionalProperties")
            if isinstance(extra, dict) or extra is True:
                additional = extra if isinstance(extra, dict) else {}
                declared = True
            required.update(part.get("required", ()))
        return (props if declared else None), additional, required

    def _unknown(self, node: dict, value, path: str) -> list[str]:
        if isinstance(value, dict):
            props, additional, _ = self._shape(node)
            if props is None:
                return []
            found = []
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                sub = props.get(key, additional)
                if sub is None:
                    found.append(where)
                else:
                    found += self._unknown(sub, item, where)
            return found
        items = self._resolve(node).get("items")
        if isinstance(value, list) and isinstance(items, dict):
            return [f for i, item in enumerate(value) for f in self._unknown(items, item, f"{path}.{i}")]
        return []

    def _normalize(self, node: dict, value, keep_null: bool):
        if isinstance(value, dict):
            props, additional, required = self._shape(node)
            if props is None:
                return value
            out = {}
            for key, item in value.items():
                sub = props.get(key, additional)
                if sub is None:
                    continue
                item = self._normalize(sub, item, keep_null)
                if key in required or (keep_null and item is None) or not self._go_empty(sub, item):
                    out[key] = item
            return out
        items = self._resolve(node).get("items")
        if isinstance(value, list) and isinstance(items, dict):
            return [self._normalize(items, item, keep_null) for item in value]
        return value

    def _go_empty(self, node: dict, value) -> bool:
        """Would Go's `omitempty` leave this value out?"""
        if value is None:
            return True
        if _is_nullable(node):               # a pointer: only nil is empty
            return False
        if isinstance(value, bool):
            return value is False
        if isinstance(value, (int, float)):
            return value == 0
        if isinstance(value, str):
            return value == ""
        if isinstance(value, list):
            return not value
        if isinstance(value, dict) and not value:   # an empty map is empty, an empty struct is not
            return self._shape(node)[0] == {}
        return False


# === Configuration model ===

class _Backend:
    """One backend: its fields (the spec's backend model) and its servers in file order.

    Server dicts are never mutated in place, only replaced, so copies can share them.
    """
    __slots__ = ("fields", "servers")

    def __init__(self, fields: dict, servers: dict | None = None):
        self.fields = fields
        self.servers = servers if servers is not None else {}

    def copy(self) -> "_Backend":
        return _Backend(dict(self.fields), dict(self.servers))


class _Config:
    """All backends in file order, copy-on-write.

    fork() costs one dict copy; a backend is copied the first time the fork
    writes to it. A committed _Config is never written to again.
    """

    def __init__(self, backends: dict | None = None):
        self.backends: dict[str, _Backend] = backends if backends is not None else {}
        self._owned: set[str] = set()

    def fork(self) -> "_Config":
        return _Config(dict(self.backends))

    def writable(self, name: str) -> _Backend:
        if name not in self._owned:
            self.backends[name] = self.backends[name].copy()
            self._owned.add(name)
        return self.backends[name]

    def put(self, name: str, backend: _Backend) -> None:
        self.backends[name] = backend
        self._owned.add(name)

    def delete(self, name: str) -> None:
        del self.backends[name]
        self._owned.discard(name)


def _replace_key(mapping: dict, old: str, new: str, value) -> dict:
    """A copy of `mapping` with `old` replaced by `new` at the same position."""
    return {(new if key == old else key): (value if key == old else item)
            for key, item in mapping.items()}


class _Transaction:
    """One transaction, as its file in the transaction directory: in progress at the top,
    failed and outdated ones moved to subdirectories (client-native configuration/transaction.go)."""
    __slots__ = ("id", "version", "status", "config")

    def __init__(self, version: int, config: _Config, tid: str | None = None, status: str = IN_PROGRESS):
        self.id = tid or str(uuid.uuid4())
        self.version = version
        self.status = status
        self.config = config

    def as_json(self) -> dict:
        """A failed or outdated transaction has no parser left and its version is read with
        the transaction id given as a file path (client-native v5.1.27 transaction.go:533-536,
        668-691; transaction-handling.go:78-91): 0, which `omitempty` leaves out."""
        if self.status != IN_PROGRESS:
            return {"id": self.id, "status": self.status}
        return {"_version": self.version, "id": self.id, "status": self.status}


# === Rendering haproxy.cfg ===
#
# Keyword names follow client-native's serializers: a field `foo_bar` with
# "enabled"/"disabled" becomes `option foo-bar` / `no option foo-bar` in a
# backend and `foo-bar` / `no-foo-bar` on a server line; the exceptions are in
# the tables below. Backend fields without a rendering are listed in
# fake.unrendered instead of being silently lost.

_SERVER_WORDS = {   # field: (keyword for "enabled", keyword for "disabled")
    "maintenance": ("disabled", "enabled"),
    "stick": ("stick", "non-stick"),
    "check_via_socks4": ("check-via-socks4", None),
    "no_verifyhost": ("no-verifyhost", None),
    **{f"{p}{v}": (f"force-{v}", f"no-{v}")
       for p in ("", "force_") for v in ("sslv3", "tlsv10", "tlsv11", "tlsv12", "tlsv13")},
    **{f"no_{v}": (f"no-{v}", None) for v in ("sslv3", "tlsv10", "tlsv11", "tlsv12", "tlsv13")},
}
_SERVER_KEYWORDS = {"ssl_cafile": "ca-file", "ssl_certificate": "crt",
                    "health_check_address": "addr", "health_check_port": "port"}
_SERVER_SKIP = frozenset({"name", "address", "port", "metadata"})

_BACKEND_TIMEOUTS = {"check_timeout": "check", "connect_timeout": "connect", "queue_timeout": "queue",
                     "server_timeout": "server", "server_fin_timeout": "server-fin",
                     "tarpit_timeout": "tarpit", "tunnel_timeout": "tunnel",
                     "http_keep_alive_timeout": "http-keep-alive",
                     "http_request_timeout": "http-request"}
_BACKEND_VALUES = {"retries": "retries", "fullconn": "fullconn", "id": "id", "guid": "guid",
                   "description": "description", "log_tag": "log-tag", "http_reuse": "http-reuse",
                   "hash_balance_factor": "hash-balance-factor", "retry_on": "retry-on",
                   "max_keep_alive_queue": "max-keep-alive-queue",
                   "http_send_name_header": "http-send-name-header",
                   "dynamic_cookie_key": "dynamic-cookie-key",
                   "server_state_file_name": "server-state-file-name",
                   "load_server_state_from_file": "load-server-state-from-file",
                   "hash_preserve_affinity": "hash-preserve-affinity",
                   "http_restrict_req_hdr_names": "option http-restrict-req-hdr-names",
                   "srvtcpka_cnt": "srvtcpka-cnt", "srvtcpka_idle": "srvtcpka-idle",
                   "srvtcpka_intvl": "srvtcpka-intvl"}
_BACKEND_OPTION_NAMES = {"http_proxy": "http_proxy"}    # the one option spelled with "_"


def _quote(value) -> str:
    """One haproxy.cfg word: bare when safe, otherwise double-quoted."""
    text = str(value)
    if text and re.fullmatch(r"[^\s#'\"\\]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_params(params: dict, unrendered: list | None = None, where: str = "") -> list[str]:
    """The keywords after `server NAME ADDR:PORT` (or `default-server`) for server params:
    flag words first, then keyword-value pairs, each group sorted by field name."""
    words, pairs = [], []
    for key in sorted(params):
        value = params[key]
        if key in _SERVER_SKIP or value is None or value is False:
            continue
        keyword = _SERVER_KEYWORDS.get(key, key.replace("_", "-"))
        if value in ("enabled", "disabled") and key not in _SERVER_KEYWORDS:
            on, off = _SERVER_WORDS.get(key, (keyword, f"no-{keyword}"))
            word = on if value == "enabled" else off
            if word:
                words.append(word)
        elif value is True:
            words.append(keyword)
        elif isinstance(value, list):
            pairs.append(f"{keyword} {','.join(str(v) for v in value)}")
        elif isinstance(value, dict):
            if key == "set-proxy-v2-tlv-fmt" and "id" in value:
                pairs.append(f"set-proxy-v2-tlv-fmt({value['id']}) {_quote(value.get('value', ''))}")
            elif unrendered is not None:
                unrendered.append(f"{where}: {key}")
        else:
            pairs.append(f"{keyword} {_quote(value)}")
    return words + pairs


def server_address(server: dict) -> str:
    """ADDR or ADDR:PORT, with IPv6 literals bracketed."""
    address = server.get("address", "")
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    port = server.get("port")
    return f"{address}:{port}" if port is not None else address


def render_server(server: dict, unrendered: list | None = None, backend: str = "") -> str:
    """`server NAME ADDR:PORT params...`"""
    words = server_params(server, unrendered, f"backend {backend} server {server.get('name')}")
    return " ".join(["server", server["name"], server_address(server)] + words)


def _render_balance(balance: dict) -> str:
    algorithm = balance.get("algorithm", "roundrobin")
    words = [algorithm]
    if algorithm == "hdr":
        words = [f"hdr({balance.get('hdr_name', '')})"]
        if balance.get("hdr_use_domain_only"):
            words.append("use_domain_only")
    elif algorithm == "url_param":
        words.append(balance.get("url_param", ""))
        if balance.get("url_param_check_post"):
            words += ["check_post", str(balance["url_param_check_post"])]
        if balance.get("url_param_max_wait"):
            words += ["max_wait", str(balance["url_param_max_wait"])]
    elif algorithm == "uri":
        for flag, word in (("uri_whole", "whole"), ("uri_path_only", "path-only")):
            if balance.get(flag):
                words.append(word)
        for field, word in (("uri_len", "len"), ("uri_depth", "depth")):
            if balance.get(field):
                words += [word, str(balance[field])]
    elif algorithm == "random" and balance.get("random_draws"):
        words = [f"random({balance['random_draws']})"]
    elif algorithm == "rdp-cookie" and balance.get("rdp_cookie_name"):
        words = [f"rdp-cookie({balance['rdp_cookie_name']})"]
    elif algorithm == "hash":
        words.append(balance.get("hash_expression", ""))
    return "balance " + " ".join(w for w in words if w)


def _render_cookie(cookie: dict) -> str:
    words = ["cookie", cookie["name"]]
    if cookie.get("type"):
        words.append(cookie["type"])
    words += [flag for flag in ("indirect", "nocache", "postonly", "preserve", "httponly",
                                "secure", "dynamic") if cookie.get(flag)]
    for field in ("maxidle", "maxlife"):
        if cookie.get(field):
            words += [field, str(cookie[field])]
    words += [w for d in cookie.get("domain", ()) for w in ("domain", d["value"])]
    words += [w for a in cookie.get("attr", ()) for w in ("attr", _quote(a["value"]))]
    return " ".join(words)


def _render_stick_table(table: dict) -> str:
    words = ["stick-table", "type", table.get("type", "ip")]
    if table.get("keylen"):
        words += ["len", str(table["keylen"])]
    for field in ("size", "expire", "peers", "store"):
        if table.get(field) not in (None, ""):
            words += [field, str(table[field])]
    if table.get("nopurge"):
        words.append("nopurge")
    return " ".join(words)


def _render_backend_field(key: str, value, fields: dict) -> list[str] | None:
    """haproxy.cfg lines for one backend field; None when the emulator cannot render it."""
    if key in _BACKEND_TIMEOUTS:
        return [f"timeout {_BACKEND_TIMEOUTS[key]} {value}"]
    if key in _BACKEND_VALUES:
        return [f"{_BACKEND_VALUES[key]} {_quote(value)}"]
    if value in ("enabled", "disabled") and key not in ("forwardfor", "redispatch"):
        option = "option " + _BACKEND_OPTION_NAMES.get(key, key.replace("_", "-"))
        return [option if value == "enabled" else f"no {option}"]
    if key == "http_connection_mode":
        return [f"option {value}"]
    if key == "adv_check":
        if value != "httpchk":
            return [f"option {value}"]
        params = fields.get("httpchk_params") or {}
        words = [params[k] for k in ("method", "uri", "version") if params.get(k)]
        lines = [" ".join(["option httpchk"] + words)]
        if params.get("host"):
            lines.append(f"http-check send hdr Host {_quote(params['host'])}")
        return lines
    if key == "httpchk_params":
        return [] if fields.get("adv_check") == "httpchk" else None
    if key == "forwardfor":
        words = ["option forwardfor"]
        words += [f"{k} {value[k]}" for k in ("except", "header") if value.get(k)]
        return [" ".join(words + (["if-none"] if value.get("ifnone") else []))]
    if key == "redispatch":
        if value.get("enabled") == "disabled":
            return ["no option redispatch"]
        return [" ".join(["option redispatch"] + ([str(value["interval"])] if value.get("interval") else []))]
    if key == "hash_type":
        return [" ".join(["hash-type"] + [value[k] for k in ("method", "function", "modifier") if value.get(k)])]
    if key in ("disabled", "enabled"):
        return [key] if value is True else []
    if key == "cookie":
        return [_render_cookie(value)]
    if key == "stick_table":
        return [_render_stick_table(value)]
    if key == "acl_list":       # a full section's child list (v3)
        return [" ".join(w for w in ("acl", a["acl_name"], a["criterion"], a.get("value", "")) if w)
                for a in value]
    return None


def render_backend(name: str, backend: _Backend, unrendered: list | None = None) -> list[str]:
    """The lines of one `backend` section, servers last in stored order."""
    fields = backend.fields
    header = f"backend {name}" + (f" from {fields['from']}" if fields.get("from") else "")
    lines = [header]
    if fields.get("mode"):
        lines.append(f"    mode {fields['mode']}")
    if fields.get("balance"):
        lines.append("    " + _render_balance(fields["balance"]))
    for key in sorted(fields):
        if key in ("name", "from", "mode", "balance", "default_server", "servers", "metadata"):
            continue
        rendered = _render_backend_field(key, fields[key], fields)
        if rendered is None:
            if unrendered is not None:
                unrendered.append(f"backend {name}: {key}")
            continue
        lines += ["    " + line for line in rendered]
    if fields.get("default_server"):
        words = server_params(fields["default_server"], unrendered, f"backend {name} default_server")
        lines.append("    " + " ".join(["default-server"] + words))
    lines += ["    " + render_server(s, unrendered, name) for s in backend.servers.values()]
    return lines


def frontend_config(port: int, default_backend: str | None = None, use_backends=(),
                    name: str = "fe_main", mode: str = "http", address: str = "127.0.0.1") -> str:
    """A `frontend` section for base_config: bind address:port, then routing.

    use_backends: (backend, condition) pairs, e.g. ("be_api", "{ path_beg /api }").
    """
    lines = [f"frontend {name}", f"    mode {mode}", f"    bind {address}:{port}"]
    lines += [f"    use_backend {backend} if {condition}" for backend, condition in use_backends]
    if default_backend:
        lines.append(f"    default_backend {default_backend}")
    return "\n".join(lines) + "\n"


def render_haproxy_cfg(backends: dict, *, version: int, base_config: str,
                       global_lines=(), unrendered: list | None = None) -> str:
    """A complete haproxy.cfg: version comment, global, defaults, base part, backends."""
    lines = [f"# _version={version}",
             "# Rendered by testing/fake_dataplane.py (HAProxy Data Plane API emulator)",
             "global", "    maxconn 4096"]
    lines += ["    " + line for line in global_lines]
    lines += ["", "defaults", "    mode http", "    timeout connect 5s",
              "    timeout client 30s", "    timeout server 30s", ""]
    lines += base_config.rstrip("\n").splitlines() + [""]
    for name, backend in backends.items():
        lines += render_backend(name, backend, unrendered) + [""]
    return "\n".join(lines)


# === HAProxy check ===

def haproxy_check(haproxy_bin: str, text: str, workdir: str) -> tuple[int, str]:
    """Run `haproxy -c -f FILE` on `text`: (exit status, combined output)."""
    path = os.path.join(workdir, "check.cfg")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        done = subprocess.run([haproxy_bin, "-c", "-f", path], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"haproxy -c timed out after {CHECK_TIMEOUT} s"
    return done.returncode, done.stdout + done.stderr


def check_error_message(status: int, output: str, transaction_id: str) -> str:
    """The message client-native builds from a failed check: one `line=N msg="..."` per alert."""
    parts = [f"exit status {status}: err transactionId={transaction_id} "]
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("[ALERT]") or "Fatal errors found" in line or "rror(s) found in" in line:
            continue
        located = re.search(r"\[[^\]\s]*:(\d+)\]\s*:\s*(.*)$", line)
        if located:
            parts.append(f'line={located.group(1)} msg="{located.group(2).strip()}"')
        else:
            parts.append(f'msg="{line.split(" : ", 1)[-1].strip()}"')
    if len(parts) == 1 and output.strip():
        parts.append(f'msg="{output.strip().splitlines()[-1]}"')
    return "\n".join(parts)


# === Faults and recorded requests ===

class Fault:
    """One injected fault: see FakeDataPlane.add_fault()."""

    def __init__(self, method: str, path: str, status: int | None, message: str | None,
                 delay: float, drop: bool, times: int | None, after: bool):
        self.method = method.upper()
        self.path = re.compile(path)
        self.status = status
        self.message = message or f"injected fault ({status})"
        self.delay = min(max(delay, 0.0), MAX_FAULT_DELAY)
        self.drop = drop
        self.remaining = times
        self.after = after
        self.hits = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.remaining is None or self.remaining > 0) \
            and self.method in ("*", method) and bool(self.path.search(path))

    def __repr__(self):
        return (f"Fault({self.method} {self.path.pattern} status={self.status} delay={self.delay} "
                f"drop={self.drop} hits={self.hits} remaining={self.remaining})")


class RecordedRequest(tuple):
    """(method, path, query) of one request; also .body (parsed JSON or None) and .status."""

    def __new__(cls, method: str, path: str, query: dict, body=None):
        self = super().__new__(cls, (method, path, query))
        self.body = body
        self.status = None
        return self

    method = property(lambda self: self[0])
    path = property(lambda self: self[1])
    query = property(lambda self: self[2])


class _Request:
    """One parsed API request, as the endpoint handlers see it."""

    def __init__(self, method, path, rel, query, headers, body, params):
        self.method, self.path, self.rel = method, path, rel
        self.query, self.headers, self.raw_body, self.params = query, headers, body, params


class _Response:
    def __init__(self, status: int, body=None, headers: dict | None = None, reload: str | None = None):
        self.status = status
        self.body = body          # JSON-able, or str for text/plain, or None for no body
        self.headers = headers or {}
        self.reload = reload      # "schedule" or "force": asked of the reload agent once unlocked


class _ReloadAgent:
    """The reload agent's cache (dataplaneapi haproxy/reload_agent.go, reload_agent/ from 3.3.6):
    failed reloads by id, the last success, the reload running (current) and the one pending
    (next), and the id counter. Guarded by FakeDataPlane._agent_lock, which is held for the
    whole of a reload as the agent holds its cache lock."""

    def __init__(self):
        self.failed: dict[str, dict] = {}
        self.last_success: dict | None = None
        self.next = ""
        self.current = ""
        self.index = 0


# === The emulator ===

# FakeDataPlane is made of parts that share one instance, its state and its self._lock:
#
#   the store      _ConfigStore    versions, the committed configuration (backends and servers),
#                                  transactions, the `haproxy -c` check, edits behind the client's back
#                  _ReloadStore    the reload agent: ticker, reload ids and records, HAProxy reloads
#                  _RuntimeStore   what HAProxy runs: runtime commands and runtime state
#                  _Store          the three together, and the state they keep (its __init__)
#   the front      _Requests       query parameters and bodies, checked the way the release checks
#                  _Router         the route table, authentication, faults, recorded requests
#   the endpoints, one class per resource (the route table names each handler):
#                  _InfoEndpoints         /info, configuration/version, configuration/raw
#                  _TransactionEndpoints  /services/haproxy/transactions[/{id}]
#                  _ReloadEndpoints       /services/haproxy/reloads[/{id}]
#                  _BackendEndpoints      configuration/backends[/{name}]
#                  _ServerEndpoints       configuration/[backends/{parent}/]servers[/{name}]
#                  _RuntimeEndpoints      runtime/[backends/{parent}/]servers/{name}, stats/native
#
# Handlers run under self._lock (but for the reload agent's own); see _Router._serve.


class _ConfigStore:
    """The configuration dataplaneapi keeps: the version, the committed configuration (what every
    GET answers) and the file, the transactions, the `haproxy -c` check of every change, and the
    changes another party makes behind the client's back. Part of _Store."""

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def backends(self) -> dict:
        """A deep copy of the committed configuration: {name: {fields..., "servers": {name: server}}}."""
        with self._lock:
            return {name: {**copy.deepcopy(b.fields), "servers": copy.deepcopy(b.servers)}
                    for name, b in self._config.backends.items()}

    def server(self, backend: str, name: str) -> dict | None:
        """A copy of one committed server, or None."""
        with self._lock:
            b = self._config.backends.get(backend)
            return copy.deepcopy(b.servers.get(name)) if b else None

    def open_transactions(self) -> list[str]:
        """Ids of the transactions in progress."""
        with self._lock:
            return [t.id for t in self._transactions.values() if t.status == IN_PROGRESS]

    def transactions(self) -> dict[str, str]:
        """{id: status} of every transaction not yet committed or deleted."""
        with self._lock:
            return {t.id: t.status for t in self._transactions.values()}

    def render(self) -> str:
        """The haproxy.cfg of the committed configuration (what every GET answers)."""
        with self._lock:
            return self._render(self._config, self._version)

    def file_text(self) -> str:
        """What the configuration file holds: the last commit's, or after a failed reload the
        last-known-good copy put back (a restart() reads it)."""
        with self._lock:
            return self._render(*self._disk)

    def seed(self, backends: dict, *, replace: bool = True, bump: bool = True) -> None:
        """Install `backends` as if another party changed the configuration.

        backends: {name: backend body, optionally with "servers" as a list or a
        {name: server} map}; bodies are validated like API requests (SeedError).
        replace: drop backends not listed; bump: increment the version.
        """
        with self._lock:
            config = _Config() if replace else self._config.fork()
            for name, body in backends.items():
                body = dict(body)
                servers = body.pop("servers", None) or {}
                if isinstance(servers, dict):
                    servers = [dict(s, name=s.get("name", key)) for key, s in servers.items()]
                fields = self._seed_body("backend", {"name": name, **body})
                config.put(name, _Backend(fields, {s["name"]: self._seed_body("server", s) for s in servers}))
            self._install_external(config, bump)

    def edit_server(self, backend: str, name: str, changes: dict | None = None, **fields) -> None:
        """Change some fields of a committed server (None removes a field); bumps the version."""
        changes = {**(changes or {}), **fields}
        with self._lock:
            config = self._config.fork()
            if name not in config.backends.get(backend, _Backend({})).servers:
                raise SeedError(f"no server {name} in backend {backend}")
            target = config.writable(backend)
            merged = {k: v for k, v in {**target.servers[name], **changes}.items() if v is not None}
            merged = self._seed_body("server", merged)
            target.servers = _replace_key(target.servers, name, merged["name"], merged)
            self._install_external(config, True)

    def remove_server(self, backend: str, name: str) -> None:
        """Delete a committed server behind the client's back; bumps the version."""
        with self._lock:
            config = self._config.fork()
            if name not in config.backends.get(backend, _Backend({})).servers:
                raise SeedError(f"no server {name} in backend {backend}")
            del config.writable(backend).servers[name]
            self._install_external(config, True)

    def remove_backend(self, name: str) -> None:
        """Delete a committed backend behind the client's back; bumps the version."""
        with self._lock:
            config = self._config.fork()
            if name not in config.backends:
                raise SeedError(f"no backend {name}")
            config.delete(name)
            self._install_external(config, True)

    def _seed_body(self, model: str, body: dict) -> dict:
        problems = self._models.schema_errors(model, self._models.normalize(model, body, keep_null=True)) + [
            (616, f"{path} is an unknown field") for path in self._models.unknown_fields(model, body)]
        if problems:
            raise SeedError(f"invalid {model} {body.get('name')!r}: " + "; ".join(m for _, m in problems))
        return self._models.normalize(model, body)

    def _install_external(self, config: _Config, bump: bool) -> None:
        """Another party wrote the file and HAProxy reloaded it: API, file, last-known-good
        copy and HAProxy all hold `config` (the reload agent's records are not touched)."""
        self._check(config, "seed", version=self._version + bump, error=SeedError)
        self._config = config
        self._version += bump
        self._disk = self._lkg = self._running_base = (config, self._version)
        self._running = config
        if self.live is not None and self.live.running:
            self.live.write_config(self._render(config, self._version))
            self.live.reload()
            self.external_reloads += 1
        self.admin_states.clear()
        self.operational_states.clear()

    def _render(self, config: _Config, version: int) -> str:
        unrendered: list[str] = []
        text = render_haproxy_cfg(config.backends, version=version, base_config=self.base_config,
                                  global_lines=self.live.global_lines() if self.live else (),
                                  unrendered=unrendered)
        for item in unrendered:
            if item not in self.unrendered:
                self.unrendered.append(item)
        return text

    def _check(self, config: _Config, transaction_id: str, *, version: int, error=ApiError) -> None:
        """`haproxy -c` on the configuration; raises 400 "validation error" (or `error`)."""
        if not self.check_config:
            return
        self.checks += 1
        self._tmpdir = self._tmpdir or tempfile.mkdtemp(prefix="fdp-")
        status, output = haproxy_check(self.haproxy_bin, self._render(config, version), self._tmpdir)
        self.last_check_output = output
        if status != 0:
            self.check_failures += 1
            message = "validation error: " + check_error_message(status, output, transaction_id)
            raise error(400, message) if error is ApiError else error(message)

    def _install(self, config: _Config) -> None:
        """Make a checked configuration current; the version moves on by one. The commit
        saves the transaction's parser over the configuration file (client-native
        configuration/transaction.go commitTransaction, v5.1.27:201), so the file holds it too."""
        self._config = config
        self._version += 1
        self._disk = (config, self._version)
        if self.live is not None and self.live.running:
            self.live.write_config(self._render(config, self._version))

    def _commit_implicit(self, config: _Config) -> None:
        """A plain write is client-native's implicit transaction: check, then install. One
        that fails the check is moved to the failed transactions like any other
        (SaveData -> CommitTransaction -> failTransaction, v5.1.27 transaction.go:697-724)."""
        tid = str(uuid.uuid4())
        try:
            self._check(config, tid, version=self._version + 1)
        except ApiError:
            self._transactions[tid] = _Transaction(self._version, config, tid, FAILED)
            raise
        self._install(config)

    def _target(self, tid: str, version: int) -> _Config:
        """The configuration a write changes: the transaction's, or a fork for a plain write."""
        if tid:
            tx = self._transactions.get(tid)
            # An outdated transaction is dropped: not 406/409 but 400 "does not exist"
            # (dataplaneapi 2.9 misc/misc.go:84-89, handlers/transaction.go:88-94).
            if tx is None or tx.status != IN_PROGRESS:
                raise ApiError(400, f"transaction does not exist: {tid}")
            return tx.config
        if version != self._version:
            raise ApiError(409, f"version mismatch: version in configuration file is {self._version}, "
                                f"given version is {version}")
        return self._config.fork()

    def _read_config(self, req: _Request) -> tuple[_Config, int]:
        """The configuration (and version) a read sees: committed, or the transaction's."""
        tid = req.query.get("transaction_id", "")
        if not tid:
            return self._config, self._version
        tx = self._transactions.get(tid)
        if tx is None or tx.status != IN_PROGRESS:
            raise ApiError(400, f"transaction does not exist: {tid}")
        return tx.config, tx.version


class _ReloadStore:
    """The reload agent (dataplaneapi v2.9.27 haproxy/reload_agent.go; v3.4.2 reload_agent/): its
    ticker, the pending and running reload, the records of past ones, and HAProxy's reloads
    (rows f to i of the TABLE). Part of _Store.

    Nothing here may be called with self._lock held: the agent lock is held for the whole
    of a reload, and the reload takes self._lock at its end."""

    @property
    def pending_reload(self) -> str | None:
        """The id of the reload waiting for the next tick, if any."""
        return self._agent.next or None

    @property
    def reloading(self) -> bool:
        """A reload is running (GET /services/haproxy/reloads/... waits for it)."""
        return bool(self._agent.current)

    def wait_reloads(self, timeout: float = 10.0) -> bool:
        """Wait until no reload is pending or running (the next tick came and went): True,
        or False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self._agent_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    if not self._agent.next and not self._agent.current:
                        return True
                finally:
                    self._agent_lock.release()
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.01, self.reload_delay / 4))

    def restart(self) -> None:
        """Restart dataplaneapi (HAProxy keeps running):

        * the reload agent starts afresh (NewReloadAgent, v2.9.27 haproxy/reload_agent.go:93-137):
          a pending reload is lost and never runs, the records are forgotten (old ids answer
          404, or a made-up "succeeded" once a newer success exists, GetReload :446-468), the
          id counter starts at 0 again, the ticker starts a new period, and the file as it is
          becomes the last-known-good copy ("assume it is valid when starting", :129-132);
        * the configuration is read from the file (client-native configuration.New,
          v5.1.27 configuration/interface.go:120-142), version from its `# _version` line:
          after a failed reload that is the last-known-good configuration, so the version
          can go back and what the API answered before is gone;
        * transactions live as files in the transaction directory (persistent transactions,
          dataplaneapi client-native/cn.go:37): in_progress ones are loaded again with their
          own version (InitTransactionParsers, transaction-handling.go:36-59), failed and
          outdated ones stay listed;
        * nothing reloads HAProxy at startup (no Reload() call outside the handlers).
        """
        with self._agent_lock:                    # a reload under way ends first
            with self._lock:
                self._config, self._version = self._disk
                self._lkg = self._disk
                self._agent = _ReloadAgent()
                self.restarts += 1
            self._ticker_wake.set()

    def reload_fail(self, n: int = 1) -> None:
        """The next `n` reloads fail (as fail_reloads += n)."""
        with self._lock:
            self.fail_reloads += n

    def _ticker(self) -> None:
        """handleReloads (v2.9.27 :180-193): a time.Ticker of reload_delay; at each tick the
        pending reload, if any, runs. A tick that falls while a reload runs stays buffered
        (Go's ticker channel holds one), the rest are dropped; restart() restarts the phase."""
        origin, k, immediate = time.monotonic(), 1, False
        while True:
            wait = 0.0 if immediate else origin + k * self.reload_delay - time.monotonic()
            immediate = False
            if self._ticker_wake.wait(max(0.0, wait)):
                if self._stopping.is_set():
                    return
                self._ticker_wake.clear()                  # restart(): a new agent, a new ticker
                origin, k = time.monotonic(), 1
                continue
            try:
                with self._agent_lock:
                    if self._stopping.is_set():
                        return
                    if self._agent.next:
                        self._agent_handle(self._agent.next)
            except Exception as exc:  # noqa: BLE001    # an emulator bug: make it visible
                self.errors.append(f"reload ticker: {exc!r}")
            k += 1
            now = time.monotonic()
            if origin + k * self.reload_delay <= now:      # ticks passed while reloading
                immediate = True
                k = int((now - origin) // self.reload_delay) + 1

    def _agent_schedule(self) -> str:
        """Reload() (v2.9.27 :257-266): the pending reload's id, or a new one, "YYYY-MM-DD-N"
        with N counting from 0 since the agent started (newReload :331-338). It waits while a
        reload runs (the cache lock), as the real handler does."""
        with self._agent_lock:
            agent = self._agent
            if not agent.next:
                agent.next = f"{datetime.date.today():%Y-%m-%d}-{agent.index}"
                agent.index += 1
            return agent.next

    def _agent_handle(self, reload_id: str) -> tuple[bool, str, str]:
        """handleReload (v2.9.27 :153-178), called with the agent lock held: run the reload
        and record it; failed ones are kept (and older ones past the retention dropped,
        failReload/clearReloads :354-387), a success replaces the last success."""
        agent = self._agent
        agent.current = reload_id
        try:
            ok, err, response = self._reload_haproxy(reload_id)
            record = {"id": reload_id, "reload_timestamp": int(self._clock()),
                      "status": "succeeded" if ok else "failed"}
            if response:
                record["response"] = response
            if ok:
                agent.last_success = record
            else:
                agent.failed[reload_id] = record
                now = int(self._clock())
                for key in [k for k, v in agent.failed.items()
                            if now - v["reload_timestamp"] > self.reload_retention * 86400]:
                    del agent.failed[key]
            return ok, err, response
        finally:
            agent.current = ""
            agent.next = ""

    def _agent_force(self) -> str | None:
        """ForceReload (v2.9.27 :268-284): the pending reload now, recorded as any other;
        or, none pending, a reload with the id "force" that no record keeps. A failure is a
        ReloadError "Reload failed: ERR, OUTPUT" (the handlers answer it 400, misc.HandleError
        v2.9.27 misc/misc.go:92-95). Returns that message, or None."""
        with self._agent_lock:
            pending = self._agent.next
            if pending:
                ok, err, response = self._agent_handle(pending)
                return None if ok else f"Reload failed: {err}, {response}"
        ok, err, response = self._reload_haproxy("force")
        return None if ok else f"Reload failed: {err}, {response}"

    def _reload_haproxy(self, reload_id: str) -> tuple[bool, str, str]:
        """reloadHAProxy (v2.9.27 :195-229): (succeeded, error, output). On failure the
        configuration file is copied aside (.bck), the last-known-good copy is copied over it
        and the .bck removed: HAProxy keeps its old workers, nothing reloads the restored file,
        and the API keeps answering its in-memory configuration. On success the file, as it is
        now, becomes the last-known-good copy."""
        with self._haproxy_lock:
            loaded = self._disk                     # what HAProxy reads when it reloads
            if self.reload_duration > 0:
                self._stopping.wait(self.reload_duration)
            with self._lock:
                injected = self.fail_reloads > 0
                if injected:
                    self.fail_reloads -= 1
            if injected:
                ok, err, response = False, "executing reload command failed: exit status 1", \
                    "[ALERT] (fake_dataplane) : config : reload failed (injected fault)"
            elif self.live is not None and self.live.running:
                try:
                    ok, message = self.live.reload()
                except (OSError, RuntimeError, TimeoutError) as exc:
                    ok, message = False, str(exc)
                err, response = ("", "") if ok else ("reload through the master socket failed", message)
            else:
                ok, err, response = True, "", ""
            if ok and not response:
                # What HAProxy 2.7+ says when it reloads through the master socket (the record's
                # `response`, seen from dataplaneapi 2.9.27, 3.2.15 and 3.4.2 on HAProxy 3.0.11).
                response = "[NOTICE]   (0) : haproxy version is 2.6 (fake_dataplane)\n"
            with self._lock:
                self.reloads += 1
                self.reload_history.append({"id": reload_id, "status": "succeeded" if ok else "failed",
                                            "recorded": reload_id != "force"})
                if ok:
                    self._running_base = loaded
                    self._running = loaded[0]
                    self._lkg = self._disk          # copyFile(configFile, lkgConfigFile) :227
                    self.admin_states.clear()       # new workers: runtime state does not survive
                    self.operational_states.clear()
                else:
                    self._disk = self._lkg
                    if self.live is not None and self.live.running:
                        self.live.write_config(self._render(*self._lkg))
        return ok, err, response

    def _finish(self, response: _Response) -> _Response:
        """What a handler asks of the reload agent after its change (self._lock released)."""
        if response.reload == "schedule":
            response.headers["Reload-Id"] = self._agent_schedule()   # Go's canonical spelling
        elif response.reload == "force":
            error = self._agent_force()
            if error is not None:
                return _Response(400, {"code": 400, "message": error})
        return response

    def _reloading_answer(self, force: bool, forced_status: int, payload) -> _Response:
        """The answer of a plain write that needs a reload: 202 + Reload-Id once the agent
        gave one, or with force_reload the forced reload's status (or its 400)."""
        if force:
            return _Response(forced_status, payload, reload="force")
        return _Response(202, payload, reload="schedule")


class _RuntimeStore:
    """What HAProxy runs: the configuration of its last successful reload changed since by runtime
    commands (addresses, weights, servers added), and the runtime states (admin, operational) that
    the next reload forgets. Runtime commands go to the live HAProxy, if any. Part of _Store."""

    def running_render(self) -> str:
        """The haproxy.cfg HAProxy loaded at its last successful reload (what it runs, but
        for runtime changes since: see running_backends)."""
        with self._lock:
            return self._render(*self._running_base)

    @property
    def running_backends(self) -> dict:
        """What HAProxy runs, like `backends`: the last successful reload's configuration with
        the runtime changes made since (addresses, ports, weights, servers added at runtime;
        admin states are in admin_states)."""
        with self._lock:
            return {name: {**copy.deepcopy(b.fields), "servers": copy.deepcopy(b.servers)}
                    for name, b in self._running.backends.items()}

    def _runtime(self, commands: list[str], added: dict | None = None) -> bool:
        """Issue runtime commands to HAProxy (the live one, if any), one at a time; False at
        the first that fails. Without a live HAProxy a command for a server HAProxy does not
        run fails as HAProxy answers it (after a failed reload, or before the tick). What
        succeeds changes what HAProxy runs (running_backends, admin_states); `added` is the
        server an `add server` command adds."""
        for n, command in enumerate(commands):
            if self.runtime_broken:
                self.runtime_changes.append(f"# failed: {command}: no runtime socket")
                return False
            if n and self.runtime_gap:
                time.sleep(self.runtime_gap)    # dataplaneapi sends one command at a time
            self.runtime_changes.append(command)
            if self.live is not None and self.live.running:
                ok, answer = self.live.runtime(command)
            else:
                answer = self._emulated_runtime_error(command)
                ok = answer is None
            if not ok:
                self.runtime_changes.append(f"# failed: {answer}")
                return False
            self._apply_runtime(command, added)
        return True

    _RUNTIME_TARGET = re.compile(r"^(add server|set server|enable server|disable server|enable agent|"
                                 r"disable agent) (\S+)/(\S+)(?: (.*))?$")

    def _emulated_runtime_error(self, command: str) -> str | None:
        match = self._RUNTIME_TARGET.match(command)
        if match is None:
            return None
        verb, backend, name = match[1], match[2], match[3]
        running = self._running.backends.get(backend)
        if running is None:
            return "No such backend."
        if verb == "add server":
            return "Already exists a server with the same name in backend." if name in running.servers else None
        return None if name in running.servers else "No such server."

    def _apply_runtime(self, command: str, added: dict | None) -> None:
        match = self._RUNTIME_TARGET.match(command)
        if match is None:
            return
        verb, backend, name, rest = match[1], match[2], match[3], match[4] or ""
        key, words = (backend, name), rest.split()
        if verb == "add server" and added is not None:
            self._patch_running(backend, name, add=added)
            if added.get("maintenance") != "enabled":
                self.admin_states[key] = "maint"       # HAProxy before 3.0 adds it in maintenance
            return
        state = None
        if verb == "enable server":
            state = "ready"
        elif verb == "disable server":
            state = "maint"
        elif verb in ("enable agent", "disable agent"):
            self._patch_running(backend, name, {"agent-check": "enabled" if verb == "enable agent" else "disabled"})
        elif words[:1] == ["state"]:
            state = words[1]
        elif words[:1] == ["health"]:
            self.operational_states[key] = words[1]
        elif words[:1] == ["addr"]:
            port = int(words[3]) if words[2:3] == ["port"] else None
            self._patch_running(backend, name, {"address": words[1], **({"port": port} if port else {})})
        elif words[:1] == ["weight"]:
            self._patch_running(backend, name, {"weight": int(words[1])})
        elif words[:1] == ["check-port"]:
            self._patch_running(backend, name, {"health_check_port": int(words[1])})
        elif words[:1] in (["agent-addr"], ["agent-send"]):
            self._patch_running(backend, name, {words[0]: " ".join(words[1:]) or None})
        if state is not None:
            # Kept while it differs from what HAProxy loaded (until a reload): the real API
            # reads the state back from HAProxy (runtime_server.go v3.2.0:147-152).
            self.admin_states.pop(key, None)
            if state != self._filed_admin_state(backend, name):
                self.admin_states[key] = state

    def _patch_running(self, backend: str, name: str, changes: dict | None = None, add: dict | None = None) -> None:
        if backend not in self._running.backends:
            return
        self._running = self._running.fork()
        target = self._running.writable(backend)
        if add is not None:
            target.servers[name] = dict(add)
        elif name in target.servers:
            merged = {**target.servers[name], **(changes or {})}
            target.servers[name] = {k: v for k, v in merged.items() if v is not None}

    def _running_server(self, backend: str, name: str) -> dict | None:
        return self._running.backends.get(backend, _Backend({})).servers.get(name)

    def _filed_admin_state(self, backend: str, name: str) -> str:
        server = self._running_server(backend, name) or {}
        return "maint" if server.get("maintenance") == "enabled" else "ready"


class _Store(_RuntimeStore, _ReloadStore, _ConfigStore):
    """The emulator's state: what dataplaneapi, its reload agent and HAProxy hold between requests."""

    def __init__(self, *, check_config: bool, haproxy_bin: str, live: LiveHAProxy | bool | None,
                 base_config: str | None, reload_delay: float, reload_retention: float):
        self.check_config = check_config
        self.haproxy_bin = haproxy_bin
        self.live = LiveHAProxy(haproxy_bin=haproxy_bin) if live is True else (live or None)
        self.frontend_port = _free_port()
        self.base_config = base_config if base_config is not None else frontend_config(self.frontend_port)

        self._lock = threading.RLock()
        self._config = _Config()
        self._version = 1
        self._transactions: dict[str, _Transaction] = {}
        # The reload agent and what it reloads. The configuration file (_disk) is what commits
        # write; the last-known-good copy (_lkg) is the file as of the last successful reload;
        # HAProxy runs what it loaded then (_running_base), changed since by runtime commands
        # (_running). Each is a (_Config, version) pair or a _Config; committed _Configs are
        # never written to, so sharing them is safe.
        self.reload_delay = float(reload_delay) if reload_delay and reload_delay > 0 else DEFAULT_RELOAD_DELAY
        self.reload_retention = reload_retention
        self.reload_duration = 0.0               # seconds one reload takes (not live: emulated)
        self._agent = _ReloadAgent()
        self._agent_lock = threading.Lock()      # the agent's cache lock: held during a reload
        self._haproxy_lock = threading.Lock()    # one HAProxy reload at a time
        self._ticker_thread: threading.Thread | None = None
        self._ticker_wake = threading.Event()    # stop() or restart()
        self._clock = time.time                  # reload timestamps and retention (tests may replace)
        self._disk = (self._config, self._version)
        self._lkg = self._disk
        self._running_base = self._disk
        self._running = self._config
        self._tmpdir: str | None = None         # for `haproxy -c` files, made on first use
        self._stopping = threading.Event()

        # Introspection for tests (read them).
        self.errors: list[str] = []           # emulator crashes (answered 500)
        self.runtime_changes: list[str] = []  # runtime commands dataplaneapi would issue
        self.reloads = 0                      # HAProxy reloads performed (failed ones too)
        self.reload_history: list[dict] = []  # {"id", "status", "recorded"} of every reload performed
        self.external_reloads = 0             # live reloads caused by seed()/edit_*()
        self.restarts = 0                     # restart() calls
        self.commits = 0
        self.checks = 0
        self.check_failures = 0
        self.last_check_output = ""
        self.unrendered: list[str] = []       # fields the renderer could not express
        # Faults of HAProxy itself (set them directly, or reload_fail()):
        self.fail_reloads = 0                 # the next N reloads fail (reload command exits non-zero)
        self.runtime_broken = False           # every runtime command fails (no runtime socket)
        self.runtime_gap = 0.0                # seconds between two runtime commands of one write
        # Runtime server state (the runtime server and native stats endpoints): admin states set
        # at runtime ("drain"), forgotten by every reload as HAProxy forgets them; and, without
        # a live HAProxy, each server's current sessions (scur) as a test sets them.
        self.admin_states: dict[tuple[str, str], str] = {}
        self.operational_states: dict[tuple[str, str], str] = {}   # `set server ... health` at runtime
        self.sessions: dict[tuple[str, str], int] = {}


class _Requests:
    """Reading a request the way the release reads it: flags and integers in the query (go-swagger
    or oapi-codegen errors), a write's transaction_id/version/force_reload, the body checked
    against the release's models (violations, forgotten fields: rows b, c), v2's wrapping and
    parents."""

    def _violation(self, req: _Request, message: str) -> None:
        self.violations.append(f"{req.method} {req.path}: {message}")

    def _flag(self, req: _Request, name: str) -> bool:
        value = req.query.get(name)
        if value is None or value.lower() in ("", "false", "0"):
            return False
        if value.lower() in ("true", "1"):
            return True
        raise self._param_error(name, "bool", value)

    def _int_param(self, req: _Request, name: str, required: bool = False) -> int:
        value = req.query.get(name)
        if value is None or value == "":
            if required:
                if self.traits.flavor == "swagger":
                    raise ApiError(422, f"{name} in query is required", 602)
                raise ApiError(400, f"Query argument {name} is required, but not found")
            return 0
        try:
            return int(value)
        except ValueError:
            raise self._param_error(name, "int64", value) from None

    def _param_error(self, name: str, kind: str, value: str) -> ApiError:
        if self.traits.flavor == "swagger":   # go-swagger: 422 with a 6xx body code
            return ApiError(422, f'{name} in query must be of type {kind}: "{value}"', 601)
        # oapi-codegen's parameter binding (e.g. v3.4.2 transactions.gen.go:174-183, 342-344)
        return ApiError(400, f"Invalid format for parameter {name}: error binding string parameter: "
                             f'parsing "{value}": invalid syntax')

    def _write_params(self, req: _Request) -> tuple[str, int, bool]:
        """(transaction id, version, force_reload) of a write, with dataplaneapi's checks."""
        tid = req.query.get("transaction_id", "")
        version = self._int_param(req, "version")
        force = self._flag(req, "force_reload")
        if tid and force:
            raise ApiError(400, "Both force_reload and transaction specified, specify only one")
        if tid and version:
            raise ApiError(400, "both version and transaction specified, specify only one")
        if not tid and not version:
            raise ApiError(400, "version or transaction not specified: "
                                "version or transaction not specified, specify only one")
        return tid, version, force

    def _body(self, req: _Request, model: str) -> dict:
        """The request body validated against `model`, normalized the way Go echoes it."""
        content_type = req.headers.get("Content-Type", "")
        if not content_type.lower().startswith("application/json"):
            message = f'unsupported media type "{content_type}", only [application/json] are allowed'
            self._violation(req, message)
            raise ApiError(415, message)
        try:
            data = json.loads(req.raw_body or b"")
        except ValueError as exc:
            self._violation(req, f"body is not JSON: {exc}")
            raise ApiError(400, f"parsing data body failed: {exc}") from None
        if not isinstance(data, dict):
            self._violation(req, "body is not a JSON object")
            raise ApiError(422, "data in body must be of type object", 601)
        checked = self._models.normalize(model, data, keep_null=True)
        problems = self._models.schema_errors(model, checked)
        # Unknown fields: go-swagger's JSON consumer and the oapi handlers' respond.DecodeJSON
        # both decode into client-native's Go structs without unknown-field checks, so every
        # release answers 2xx and forgets them (the client bug is recorded all the same).
        unknown = self._models.unknown_fields(model, data)
        for path in unknown:
            self._violation(req, f"{path} is not a field of the {model} model of dataplaneapi "
                                 f"{self.traits.release} "
                                 f"({'rejected' if self.reject_unknown_fields else 'answered 2xx and forgotten'})")
        if self.reject_unknown_fields:
            problems += [(616, f"{path} in body is a forbidden property") for path in unknown]
        if problems:
            for _, message in problems:
                if "forbidden property" not in message:
                    self._violation(req, message)
            if self.traits.flavor == "swagger":     # go-swagger serves the first error, 6xx code
                raise ApiError(422, problems[0][1], problems[0][0])
            raise ApiError(422, "\n".join(m for _, m in problems))   # respond.Unprocessable: all
        self.forgotten += [(model, path) for path in unknown]
        return self._forget(model, self._models.normalize(model, data))

    def _forget(self, model: str, data: dict) -> dict:
        """Drop the fields forget_fields names (a server whose models lack them)."""
        dropped = [f for f in self.forget_fields.get(model, ()) if f in data]
        out = {k: v for k, v in data.items() if k not in dropped}
        self.forgotten += [(model, f) for f in dropped]
        if model == "backend" and isinstance(out.get("servers"), dict) and self.forget_fields.get("server"):
            out["servers"] = {name: self._forget("server", server) for name, server in out["servers"].items()}
        return out

    def _full_section(self, req: _Request) -> bool:
        return self.api == "v3" and self._flag(req, "full_section")

    def _wrap(self, version: int, data):
        """v2 wraps GET answers in {"_version", "data"}; v3 answers bare."""
        return {"_version": version, "data": data} if self.api == "v2" else data

    def _parent(self, req: _Request) -> str:
        """The backend a server request addresses (v3 path; v2 query parameters)."""
        if self.api == "v3":
            return req.params["parent"]
        if req.query.get("backend"):
            return req.query["backend"]
        parent_type, parent_name = req.query.get("parent_type", ""), req.query.get("parent_name", "")
        if not parent_type:
            raise ApiError(500, "parentType empty")
        if not parent_name:
            raise ApiError(500, "parentName empty")
        if parent_type != "backend":
            raise ApiError(501, f"fake_dataplane emulates backend servers only, not {parent_type}")
        return parent_name


class _Router:
    """From an HTTP request to a handler and back: the route table, authentication, the
    Configuration-Version header, injected faults and the recorded requests."""

    def _build_routes(self) -> list:
        backends = "/services/haproxy/configuration/backends"
        servers = "/services/haproxy/configuration/servers" if self.api == "v2" \
            else backends + "/(?P<parent>[^/]+)/servers"
        runtime = "/services/haproxy/runtime/servers" if self.api == "v2" \
            else "/services/haproxy/runtime/backends/(?P<parent>[^/]+)/servers"
        table = [
            ("GET", "/info", self._get_info),
            ("GET", "/services/haproxy/configuration/version", self._get_version),
            ("GET", "/services/haproxy/configuration/raw", self._get_raw),
            ("GET", "/services/haproxy/transactions", self._list_transactions),
            ("POST", "/services/haproxy/transactions", self._start_transaction),
            ("GET", "/services/haproxy/transactions/(?P<id>[^/]+)", self._get_transaction),
            ("PUT", "/services/haproxy/transactions/(?P<id>[^/]+)", self._commit_transaction, "commit"),
            ("DELETE", "/services/haproxy/transactions/(?P<id>[^/]+)", self._delete_transaction),
            ("GET", "/services/haproxy/reloads", self._list_reloads, "unlocked"),
            ("GET", "/services/haproxy/reloads/(?P<id>[^/]+)", self._get_reload, "unlocked"),
            ("GET", backends, self._list_backends),
            ("POST", backends, self._create_backend),
            ("GET", backends + "/(?P<name>[^/]+)", self._get_backend),
            ("PUT", backends + "/(?P<name>[^/]+)", self._replace_backend),
            ("DELETE", backends + "/(?P<name>[^/]+)", self._delete_backend),
            ("GET", servers, self._list_servers),
            ("POST", servers, self._create_server),
            ("GET", servers + "/(?P<name>[^/]+)", self._get_server),
            ("PUT", servers + "/(?P<name>[^/]+)", self._replace_server),
            ("DELETE", servers + "/(?P<name>[^/]+)", self._delete_server),
            ("GET", runtime + "/(?P<name>[^/]+)", self._get_runtime_server),
            ("PUT", runtime + "/(?P<name>[^/]+)", self._replace_runtime_server),
            ("GET", "/services/haproxy/stats/native", self._get_native_stats),
        ]
        return [(method, re.compile(pattern), handler, set(options)) for method, pattern, handler, *options in table]

    def handle(self, method: str, target: str, headers, body: bytes) -> _Response | None:
        """Answer one HTTP request; None means: drop the connection without an answer."""
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        rel = re.sub(r"^/v[23](?=/|$)", "", parts.path)
        try:
            parsed_body = json.loads(body) if body else None
        except ValueError:
            parsed_body = None
        record = RecordedRequest(method, parts.path, query, parsed_body)
        with self._lock:
            self.requests.append(record)
            fault = next((f for f in self._faults if f.matches(method, rel)), None)
            if fault is not None:
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
        if fault is not None and fault.delay and self._stopping.wait(fault.delay):
            return None                         # stopping: abandon the hung request
        if fault is not None and not fault.after and (fault.drop or fault.status):
            response = None if fault.drop else \
                _Response(fault.status, {"code": fault.status, "message": fault.message})
        else:
            response = self._serve(method, parts.path, query, headers, body)
            if fault is not None and fault.after and (fault.drop or fault.status):
                response = None if fault.drop else \
                    _Response(fault.status, {"code": fault.status, "message": fault.message})
        if response is not None:
            with self._lock:
                response.headers.setdefault("Configuration-Version", str(self._header_version(query)))
            record.status = response.status
        return response

    def _header_version(self, query: dict) -> int:
        """The Configuration-Version header: the transaction's version when one is named
        (0 when it is not in progress, as dataplaneapi's middleware does)."""
        tid = query.get("transaction_id")
        if not tid:
            return self._version
        tx = self._transactions.get(tid)
        return tx.version if tx is not None and tx.status == IN_PROGRESS else 0

    def _serve(self, method, path, query, headers, body) -> _Response:
        """Route, run the handler (under self._lock unless it is the reload agent's own),
        then ask the reload agent what the handler needs (outside self._lock). A commit
        holds the commit mutex throughout, as CommitTransactionHandlerImpl does."""
        routed = self._route(method, path, query, headers, body)
        if isinstance(routed, _Response):
            return routed
        handler, req, options = routed
        commit = "commit" in options
        if commit:
            self._commit_lock.acquire()
        try:
            if "unlocked" in options:
                response = self._call(handler, req)
            else:
                with self._lock:
                    response = self._call(handler, req)
            try:
                return self._finish(response)
            except Exception as exc:  # noqa: BLE001    # an emulator bug: make it visible
                self.errors.append(f"{req.method} {req.path} (reload agent): {exc!r}")
                return _Response(500, {"code": 500, "message": f"fake_dataplane internal error: {exc!r}"})
        finally:
            if commit:
                self._commit_lock.release()

    def _route(self, method, path, query, headers, body):
        """(handler, request, options) or the error answer. The go-swagger servers route
        first (unknown path 404, wrong method 405) and authenticate matched routes; the
        oapi servers authenticate every request first (UPGRADE.md, dataplaneapi v3.3.6)."""
        unauthorized = _Response(401, {"code": 401, "message": "unauthenticated for invalid credentials"},
                                 {"WWW-Authenticate": 'Basic realm="API"'})
        if self.traits.flavor == "oapi" and not self._authorized(headers):
            return unauthorized
        if path != self.base and not path.startswith(self.base + "/"):
            return _Response(404, {"code": 404, "message": f"path {path} was not found"})
        rel = path[len(self.base):]
        allowed = []
        for route_method, pattern, handler, options in self._routes:
            match = pattern.fullmatch(rel)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            if not self._authorized(headers):
                return unauthorized
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            return handler, _Request(method, path, rel, query, headers, body, params), options
        if allowed:
            return _Response(405, {"code": 405, "message": f"method {method} is not allowed for path {path}"},
                             {"Allow": ", ".join(allowed)})
        return _Response(404, {"code": 404, "message": f"path {path} was not found"})

    def _call(self, handler, req: _Request) -> _Response:
        try:
            return handler(req)
        except ApiError as exc:
            return _Response(exc.status, {"code": exc.code, "message": exc.message})
        except Exception as exc:             # an emulator bug: make it visible to tests
            self.errors.append(f"{req.method} {req.path}: {exc!r}")
            return _Response(500, {"code": 500, "message": f"fake_dataplane internal error: {exc!r}"})

    def _authorized(self, headers) -> bool:
        if self.password is None:
            return True
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return headers.get("Authorization", "") == f"Basic {expected}"

    def add_fault(self, method: str, path: str, *, status: int | None = None, message: str | None = None,
                  delay: float = 0.0, drop: bool = False, times: int | None = 1,
                  after: bool = False) -> Fault:
        """Inject a fault into requests matching `method` ("*" = any) and the regex `path`.

        The path is matched without its /v2|/v3 prefix (see the PATH_* constants).
        delay: wait this long first (capped at MAX_FAULT_DELAY; stop() interrupts);
        status: answer {"code": status, "message": message} instead of handling;
        drop: close the connection without an answer;
        after: handle the request normally first, then replace the answer (a lost answer);
        times: how many requests it hits (None = until removed). Returns the Fault (.hits).
        """
        fault = Fault(method, path, status, message, delay, drop, times, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove_fault(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def count_requests(self, method: str | None = None, path: str | None = None) -> int:
        """How many recorded requests match `method` and the regex `path` (searched in the full path)."""
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method) and (path is None or re.search(path, r.path)))


class _InfoEndpoints:
    """GET /info, GET /services/haproxy/configuration/version and .../configuration/raw."""

    def _get_info(self, req: _Request) -> _Response:
        return _Response(200, {"api": {"version": f"{self.traits.release} fake_dataplane",
                                       "build_date": "2025-01-01T00:00:00.000Z"},
                               "system": {}})      # as dataplaneapi 2.9.27 to 3.4.2 answered here

    def _get_version(self, req: _Request) -> _Response:
        tid = req.query.get("transaction_id", "")
        if not tid:
            return _Response(200, self._version)
        tx = self._transactions.get(tid)
        if tx is None or tx.status != IN_PROGRESS:       # GetParser: ErrTransactionDoesNotExist
            raise ApiError(400, f"transaction does not exist: {tid}")
        return _Response(200, tx.version)

    def _get_raw(self, req: _Request) -> _Response:
        config, version = self._read_config(req)
        text = self._render(config, version)
        return _Response(200, self._wrap(version, text) if self.api == "v2" else text)


class _TransactionEndpoints:
    """/services/haproxy/transactions: list, start; /transactions/{id}: get, commit, delete (rows j, l)."""

    def _tx_or_404(self, tid: str) -> _Transaction:
        tx = self._transactions.get(tid)
        if tx is None:
            raise ApiError(404, f"transaction does not exist: transaction {tid} does not exist")
        return tx

    def _list_transactions(self, req: _Request) -> _Response:
        """parseTransactions (client-native v5.1.27 transaction.go:447-514) reads the
        transaction directory in name order: the `failed` subdirectory, the in-progress
        files, the `outdated` subdirectory, each by id; ?status= takes failed or in_progress."""
        status = req.query.get("status", "")
        if status not in ("", FAILED, IN_PROGRESS):
            if self.traits.flavor == "swagger":
                raise ApiError(422, "status in query should be one of [failed in_progress]", 606)
            raise ApiError(400, 'status in query: value is not one of the allowed values ["failed","in_progress"]')
        rank = {FAILED: 0, IN_PROGRESS: 1, OUTDATED: 2}
        listed = sorted((t for t in self._transactions.values() if not status or t.status == status),
                        key=lambda t: (rank[t.status], t.id))
        return _Response(200, [t.as_json() for t in listed])

    def _start_transaction(self, req: _Request) -> _Response:
        version = self._int_param(req, "version", required=True)
        in_progress = sum(1 for t in self._transactions.values() if t.status == IN_PROGRESS)
        if in_progress >= self.max_open_transactions:
            raise ApiError(429, "cannot start a new transaction, reached the maximum amount of "
                                f"{self.max_open_transactions} active transactions available")
        if version != self._version:
            raise ApiError(409, f"version mismatch: version in configuration file is {self._version}, "
                                f"given version is {version}")
        tx = _Transaction(version, self._config.fork())
        self._transactions[tx.id] = tx
        return _Response(201, tx.as_json())

    def _get_transaction(self, req: _Request) -> _Response:
        return _Response(200, self._tx_or_404(req.params["id"]).as_json())

    def _delete_transaction(self, req: _Request) -> _Response:
        """Removes the file wherever it is (in progress, failed or outdated); none: 404
        (handlers/transaction.go v2.9.27:82-98, the message of GetTransactionFile :609)."""
        tid = req.params["id"]
        if tid not in self._transactions:
            raise ApiError(404, f"transaction does not exist: transaction file {tid} does not exist")
        del self._transactions[tid]
        return _Response(204)

    def _commit_transaction(self, req: _Request) -> _Response:
        force = self._flag(req, "force_reload")
        tx = self._tx_or_404(req.params["id"])
        if tx.status in (OUTDATED, FAILED):
            raise ApiError(406, f"transaction {tx.id} is {tx.status} and cannot be committed")
        if tx.version != self._version:
            tx.status = OUTDATED
            raise ApiError(409, f"version mismatch: version mismatch, transaction version: {tx.version}, "
                                f"configured version: {self._version}")
        try:
            self._check(tx.config, tx.id, version=self._version + 1)
        except ApiError:
            tx.status = FAILED
            raise
        self._install(tx.config)
        self.commits += 1
        del self._transactions[tx.id]
        for other in self._transactions.values():    # their base version is gone
            if other.status == IN_PROGRESS and other.version < self._version:
                other.status = OUTDATED
        payload = {"_version": tx.version, "id": tx.id, "status": SUCCESS}
        return self._reloading_answer(force, 200, payload)


class _ReloadEndpoints:
    """GET /services/haproxy/reloads and /reloads/{id}: the reload agent's records (row f)."""

    def _list_reloads(self, req: _Request) -> _Response:
        """GetReloads (v2.9.27 haproxy/reload_agent.go:389-418): the failed reloads (a Go
        map: in no order), the last success, the running one and the pending one."""
        with self._agent_lock:
            agent = self._agent
            failed = [dict(r) for r in agent.failed.values()]
            self._rng.shuffle(failed)
            listed = failed + ([dict(agent.last_success)] if agent.last_success else [])
            listed += [{"id": rid, "status": "in_progress"} for rid in (agent.current, agent.next) if rid]
        return _Response(200, listed)

    def _get_reload(self, req: _Request) -> _Response:
        """GetReload (v2.9.27 :420-471), unwrapped in v2 too (the reload model is not a
        configuration object). It waits while a reload runs (the agent's cache lock)."""
        reload_id = req.params["id"]
        if not re.fullmatch(RELOAD_ID_PATTERN, reload_id):
            if self.traits.flavor == "swagger":
                raise ApiError(422, f"id in path should match '{RELOAD_ID_PATTERN}'", 605)
            raise ApiError(400, f'id in path: string doesn\'t match the regular expression "{RELOAD_ID_PATTERN}"')
        with self._agent_lock:
            entry = self._reload_record(reload_id)
        if entry is None:
            raise ApiError(404, f"Reload with ID {reload_id} does not exist")
        return _Response(200, entry)

    def _reload_record(self, reload_id: str) -> dict | None:
        """GetReload's answer, quirks included: the pending reload answers in_progress with
        the id of the running one, which is empty then (Go leaves it out, :430-435); an id
        without a record that is older than the last success, by date or else by counter
        alone, answers a made-up "succeeded" (:446-468)."""
        agent = self._agent
        if agent.current == reload_id:
            return {"id": reload_id, "status": "in_progress"}
        if agent.next == reload_id:
            return {"status": "in_progress", **({"id": agent.current} if agent.current else {})}
        if reload_id in agent.failed:
            return dict(agent.failed[reload_id])
        if agent.last_success is None:
            return None
        if agent.last_success["id"] == reload_id:
            return dict(agent.last_success)
        last, asked = _reload_id_parts(agent.last_success["id"]), _reload_id_parts(reload_id)
        if last is None or asked is None:
            return None
        if asked[0] < last[0] or last[1] > asked[1]:
            return {"id": reload_id, "status": "succeeded"}
        return None


class _BackendEndpoints:
    """/services/haproxy/configuration/backends[/{name}]: list, get, create, replace, delete;
    full sections on v3 (row a)."""

    def _backend_json(self, name: str, backend: _Backend, full: bool) -> dict:
        data = dict(backend.fields, name=name)
        if full and backend.servers:               # omitempty: no "servers" key when there are none
            data["servers"] = dict(sorted(backend.servers.items()))    # Go's JSON sorts map keys
        return data

    def _list_backends(self, req: _Request) -> _Response:
        config, version = self._read_config(req)
        full = self._full_section(req)
        return _Response(200, self._wrap(version, [self._backend_json(n, b, full)
                                                   for n, b in config.backends.items()]))

    def _get_backend(self, req: _Request) -> _Response:
        config, version = self._read_config(req)
        name = req.params["name"]
        if name not in config.backends:
            raise ApiError(404, f"missing object: Backend {name} does not exist")
        return _Response(200, self._wrap(version, self._backend_json(name, config.backends[name],
                                                                     self._full_section(req))))

    def _split_backend_body(self, req: _Request, data: dict, full: bool) -> tuple[dict, dict]:
        """(backend fields, servers in the order client-native writes them): Go map order
        (random) up to client-native 6.2.6, string order of the names from 6.2.7
        (configuration/structured_backends.go: v6.0.26 :294 ranges over the map; v6.2.7
        :293-304 sorts the names first)."""
        servers = data.pop("servers", None) or {}
        if servers and not full:
            self._violation(req, "servers sent without full_section=true are ignored by dataplaneapi")
            return data, {}
        items = sorted(servers.items())
        if self.traits.server_order == "random":
            self._rng.shuffle(items)
        return data, {s["name"]: s for _, s in items}

    def _create_backend(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        full = self._full_section(req)
        payload = self._body(req, "backend")
        fields, servers = self._split_backend_body(req, dict(payload), full)
        name = fields["name"]
        config = self._target(tid, version)
        if name in config.backends:
            if full:    # client-native's structured create reports this as a missing object
                raise ApiError(404, f"missing object: backend {name} already exist")
            raise ApiError(409, f"object already exists: backend {name} already exists")
        config.put(name, _Backend(fields, servers))
        if tid:
            return _Response(202, payload)
        self._commit_implicit(config)
        return self._reloading_answer(force, 201, payload)

    def _replace_backend(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        full = self._full_section(req)
        payload = self._body(req, "backend")
        fields, servers = self._split_backend_body(req, dict(payload), full)
        name = req.params["name"]
        config = self._target(tid, version)
        if name not in config.backends:
            raise ApiError(404, f"missing object: backend {name} does not exist")
        if full:        # the section is deleted and written again (at the end of the file)
            config.delete(name)
            config.put(fields["name"], _Backend(fields, servers))
        else:           # fields replaced, servers and other children kept
            config.writable(name).fields = dict(fields, name=name)
        if tid:
            return _Response(202, payload)
        self._commit_implicit(config)
        return self._reloading_answer(force, 200, payload)

    def _delete_backend(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        name = req.params["name"]
        config = self._target(tid, version)
        if name not in config.backends:
            raise ApiError(404, f"missing object: backend {name} does not exist")
        config.delete(name)
        if tid:
            return _Response(202)
        self._commit_implicit(config)
        return self._reloading_answer(force, 204, None)


class _ServerEndpoints:
    """Configuration servers (v2 /services/haproxy/configuration/servers?backend=B, v3
    /services/haproxy/configuration/backends/{B}/servers): list, get, create, replace, delete
    (rows k, l)."""

    def _list_servers(self, req: _Request) -> _Response:
        parent = self._parent(req)
        config, version = self._read_config(req)
        backend = config.backends.get(parent)       # a missing parent lists as empty
        return _Response(200, self._wrap(version, list(backend.servers.values()) if backend else []))

    def _get_server(self, req: _Request) -> _Response:
        parent, name = self._parent(req), req.params["name"]
        config, version = self._read_config(req)
        server = config.backends.get(parent, _Backend({})).servers.get(name)
        if server is None:
            raise ApiError(404, f"missing object: server {name} does not exist in {parent} backend")
        return _Response(200, self._wrap(version, server))

    def _create_server(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        parent = self._parent(req)
        server = self._body(req, "server")
        config = self._target(tid, version)
        if parent not in config.backends:
            raise ApiError(400, f"missing parent: backend {parent} does not exist")
        if server["name"] in config.backends[parent].servers:
            raise ApiError(409, f"object already exists: server {server['name']} already exists "
                                f"in {parent} backend")
        config.writable(parent).servers[server["name"]] = server
        if tid:
            return _Response(202, server)
        self._commit_implicit(config)
        if force:
            return self._reloading_answer(True, 201, server)
        if self._runtime_add_possible(config.backends[parent], server) \
                and self._runtime(runtime_add_commands(parent, server), added=server):
            return _Response(201, server)
        return self._reloading_answer(False, 201, server)

    def _runtime_add_possible(self, backend: _Backend, server: dict) -> bool:
        """dataplaneapi adds at runtime when no default_server applies and the server
        converts to its runtime model (a numeric `id` does not)."""
        return self.runtime_add_server and not self.runtime_broken \
            and not backend.fields.get("default_server") and "id" not in server

    def _replace_server(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        parent, name = self._parent(req), req.params["name"]
        server = self._body(req, "server")
        config = self._target(tid, version)
        ondisk = config.backends.get(parent, _Backend({})).servers.get(name)
        if ondisk is None:
            raise ApiError(404, f"missing object: server {name} does not exist in {parent} backend")
        if server["name"] != name and server["name"] in config.backends[parent].servers:
            raise ApiError(409, f"object already exists: server {server['name']} already exists "
                                f"in {parent} backend")
        target = config.writable(parent)
        target.servers = _replace_key(target.servers, name, server["name"], server)
        if tid:
            return _Response(202, server)
        self._commit_implicit(config)      # the file is written (version + 1) whatever follows
        if self.runtime_broken:            # no runtime client: reload before comparing anything
            return self._reloading_answer(force, 200, server)
        # changeThroughRuntimeAPI: the commands up to a nil pointer go out, then a reload
        commands, reload_needed = runtime_plan(parent, server, ondisk)
        if self._runtime(commands) and not reload_needed:
            return _Response(200, server)
        return self._reloading_answer(force, 200, server)

    def _delete_server(self, req: _Request) -> _Response:
        tid, version, force = self._write_params(req)
        parent, name = self._parent(req), req.params["name"]
        config = self._target(tid, version)
        if name not in config.backends.get(parent, _Backend({})).servers:
            raise ApiError(404, f"missing object: server {name} does not exist in {parent} backend")
        del config.writable(parent).servers[name]
        if tid:
            return _Response(202)
        self._commit_implicit(config)
        return self._reloading_answer(force, 204, None)


class _RuntimeEndpoints:
    """Runtime servers (v2 /services/haproxy/runtime/servers/{name}?backend=B, v3
    /services/haproxy/runtime/backends/{B}/servers/{name}) and /services/haproxy/stats/native:
    no reload, no new version (rows d, e)."""

    def _runtime_server(self, req: _Request) -> tuple[str, str, dict]:
        """(backend, name, server) of a runtime server request, as HAProxy runs it (the real
        API asks HAProxy: `show servers state`). No runtime client: 500. An unknown backend
        or server is client-native's "no data for B/S: not found" (runtime_client.go
        GetServerState): GET 404 (isNotFoundError); PUT passes it to misc.HandleError, which
        maps client-native's ErrNotFound to 404 only from 3.2 (v3.2.15 misc/misc.go:103;
        v2.9.27 :100-103 and v3.0.23 :100-103 answer 500). v2 requires ?backend= (422)."""
        parent = req.params["parent"] if self.api == "v3" else req.query.get("backend", "")
        if not parent:
            raise ApiError(422, "backend in query is required", 602)
        if self.runtime_broken:
            raise ApiError(500, "no valid runtime found")
        server = self._running_server(parent, req.params["name"])
        if server is None:
            status = self.traits.runtime_put_missing if req.method == "PUT" else 404
            raise ApiError(status, f"no data for {parent}/{req.params['name']}: not found")
        return parent, req.params["name"], server

    def _runtime_server_json(self, backend: str, name: str, server: dict) -> dict:
        admin = self.admin_states.get((backend, name)) or \
            ("maint" if server.get("maintenance") == "enabled" else "ready")
        operational = self.operational_states.get((backend, name)) or ("down" if admin == "maint" else "up")
        servers = list(self._running.backends.get(backend, _Backend({})).servers)
        number = server.get("id") or (servers.index(name) + 1 if name in servers else 1)
        data = {"name": name, "id": str(number), "address": server.get("address"), "admin_state": admin,
                "operational_state": operational}
        if server.get("port") is not None:
            data["port"] = server["port"]
        if "weight" in self.traits.runtime_put_fields:      # the model has it from 3.3.1
            weight = server.get("weight", 1)
            # client-native 6.3+'s runtime_server carries `show servers state` whole (as dataplaneapi
            # 3.4.2 answered on HAProxy 3.0.11; the values are the ones a plain server has).
            data.update({"weight": weight, "iweight": weight, "uweight": weight, "forced_id": number
                         if server.get("id") else 0, "backend_name": backend, "backend_id": 1,
                         "backend_forced_id": 0, "agent_addr": "-", "agent_port": 0, "agent_state": 0,
                         "check_addr": "-", "check_port": 0, "check_health": 0, "check_result": 2,
                         "check_state": 6, "check_status": 8, "fqdn": "-", "srvrecord": "-",
                         "last_time_change": 0, "use_ssl": server.get("ssl") == "enabled"})
        return data

    def _get_runtime_server(self, req: _Request) -> _Response:
        return _Response(200, self._runtime_server_json(*self._runtime_server(req)))

    def _replace_runtime_server(self, req: _Request) -> _Response:
        """Change a server at runtime; nothing is written, nothing reloads. Up to 3.3.0 only
        operational_state and admin_state are applied (v2.9.27 handlers/runtime_server.go:
        105-153; address and port are read-only fields of that model, weight is not in it);
        from 3.3.1 weight, then address/port too (v3.3.1 handlers/runtime_server.go:107-211,
        v3.4.2 handlers/runtime/servers/servers.go:183-293). Each command only when the value
        differs from HAProxy's. (The rollback commands sent after a failed command are not
        emulated: here a failure is the first command's.)"""
        backend, name, server = self._runtime_server(req)
        body = self._body(req, "runtime_server")
        fields = self.traits.runtime_put_fields
        for f in ("address", "port"):
            if f in body and f not in fields:
                self._violation(req, f"{f} is read-only in the runtime_server model of dataplaneapi "
                                     f"{self.traits.release}: ignored")
        now = self._runtime_server_json(backend, name, server)
        target = f"{backend}/{name}"
        commands = []
        if body.get("operational_state") and body["operational_state"] != now["operational_state"]:
            commands.append(f"set server {target} health {body['operational_state']}")
        if body.get("admin_state") and body["admin_state"] != now["admin_state"]:
            commands.append(f"set server {target} state {body['admin_state']}")
        # rs.Weight is HAProxy's user weight, 1 when the configuration sets none (cn v6.4.0
        # runtime/servers.go:211-215)
        if "weight" in fields and body.get("weight") is not None and body["weight"] != server.get("weight", 1):
            commands.append(f"set server {target} weight {body['weight']}")
        if "address" in fields:
            address_changed = bool(body.get("address")) and body["address"] != server.get("address")
            port_changed = body.get("port") is not None and body["port"] != server.get("port")
            if address_changed or port_changed:
                address = body.get("address") or server.get("address", "")
                port = body["port"] if body.get("port") is not None else server.get("port")
                commands.append(f"set server {target} addr {address}" + (f" port {port}" if port else ""))
        if not self._runtime(commands):
            raise ApiError(500, f"runtime error: {self.runtime_changes[-1]}")
        return _Response(200, self._runtime_server_json(backend, name, self._running_server(backend, name)))

    def _get_native_stats(self, req: _Request) -> _Response:
        """HAProxy's stats: v2 a list of collections (one per runtime API), v3 one collection;
        filtered the way dataplaneapi's handlers/stats.go GetStatsHandlerImpl does."""
        kind, name, parent = (req.query.get(k) for k in ("type", "name", "parent"))
        if kind is not None and kind not in ("frontend", "backend", "server"):
            raise ApiError(422 if self.traits.flavor == "swagger" else 400,
                           "type in query should be one of [frontend backend server]", 606)
        if name is not None and kind is None:
            raise ApiError(400, "Type required when filtering by name")
        if name is not None and kind == "server" and parent is None:
            raise ApiError(400, "Parent backend required when filtering by server")
        items = [i for i in self._native_stat_items()
                 if (kind is None or i["type"] == kind) and (name is None or i["name"] == name)
                 and (kind != "server" or parent is None or i.get("backend_name") == parent)]
        collection = {"runtimeAPI": self.live.stats_socket if self.live else "fake_dataplane", "stats": items}
        return _Response(200, [collection] if self.api == "v2" else collection)

    def _native_stat_items(self) -> list[dict]:
        """One native_stat per server (and backend): scur and status from `show stat` on a
        live HAProxy, else from `sessions` and the admin states."""
        shown = self.live.show_stat() if self.live is not None and self.live.running else None
        items = []
        for backend, b in self._running.backends.items():
            items.append({"type": "backend", "name": backend, "stats": {}})
            for name, server in b.servers.items():
                admin = self._runtime_server_json(backend, name, server)["admin_state"]
                stats = shown.get((backend, name), {}) if shown is not None else {
                    "scur": self.sessions.get((backend, name), 0),
                    "status": {"maint": "MAINT", "drain": "DRAIN"}.get(
                        admin, "UP" if server.get("check") == "enabled" else "no check")}
                items.append({"type": "server", "name": name, "backend_name": backend, "stats": stats})
        return items


class FakeDataPlane(_InfoEndpoints, _TransactionEndpoints, _ReloadEndpoints, _BackendEndpoints,
                    _ServerEndpoints, _RuntimeEndpoints, _Router, _Requests, _Store):
    """An HAProxy Data Plane API emulator (one dataplaneapi release per instance).

    Constructor arguments:
      api                   "v2" or "v3" (kept for old callers): personality "2.9" or "3.4"
      personality           one of PERSONALITIES ("2.9", "3.0", "3.2", "3.3.6", "3.4"); wins over api
      port                  TCP port on 127.0.0.1; 0 picks a free one
      username, password    basic auth; password=None disables auth
      base_config           text placed after `defaults` (frontends...); default:
                            frontend_config(self.frontend_port) with no backend
      check_config          run `haproxy -c` on every change (False for big benchmarks)
      haproxy_bin           the haproxy binary used for checks and live mode
      max_open_transactions 429 beyond this many transactions in progress
      runtime_add_server    plain server POST may use runtime `add server`
                            (default: the personality's; False for 2.9)
      reject_unknown_fields answer 422 for unknown body fields (default False: no release
                            does; they are recorded in violations and forgotten either way)
      forget_fields         {model: {field, ...}}: the server answers 2xx for these fields
                            and does not keep them ("backend", "server"; servers inside a
                            full-section backend count as "server"); see fake.forgotten
      rng                   a random.Random or a seed, for Go's map order (personality 3.0)
      live                  None, True, or a LiveHAProxy: drive a real HAProxy
      spec_dir              where the specification files are
      reload_delay          the reload agent's ticker period in seconds (dataplaneapi's
                            --reload-delay): at each tick the one pending reload runs, shared
                            by every reload asked for since the last tick. Default 5 s, as
                            there; 0 also means 5 s there and here. Tests pass e.g. 0.05.
      reload_retention      days a failed reload stays listed (--reload-retention, 1)
    """

    def __init__(self, api: str | None = None, *, personality: str | None = None,
                 port: int = 0, username: str = DEFAULT_USERNAME,
                 password: str | None = DEFAULT_PASSWORD, base_config: str | None = None,
                 check_config: bool = True, haproxy_bin: str = HAPROXY_BIN,
                 max_open_transactions: int = MAX_OPEN_TRANSACTIONS,
                 runtime_add_server: bool | None = None, reject_unknown_fields: bool | None = None,
                 live: "LiveHAProxy | bool | None" = None, spec_dir: str | None = None,
                 reload_delay: float = DEFAULT_RELOAD_DELAY, reload_retention: float = DEFAULT_RELOAD_RETENTION,
                 forget_fields: dict | None = None,
                 rng: random.Random | int | None = None):
        if api is not None and api not in API_PERSONALITY:
            raise ValueError(f"api must be 'v2' or 'v3', got {api!r}")
        if personality is None:
            personality = API_PERSONALITY[api or "v3"]
        if personality not in PERSONALITIES:
            raise ValueError(f"personality must be one of {sorted(PERSONALITIES)}, got {personality!r}")
        if check_config and not os.access(haproxy_bin, os.X_OK):
            raise FileNotFoundError(f"haproxy binary not found: {haproxy_bin}")
        self.personality = personality
        self.traits = PERSONALITIES[personality]
        self.api = self.traits.api
        self.base = "/" + self.api
        self.username, self.password = username, password
        self.max_open_transactions = max_open_transactions
        self.runtime_add_server = self.traits.runtime_add_server if runtime_add_server is None \
            else runtime_add_server
        self.reject_unknown_fields = bool(reject_unknown_fields)
        self.forget_fields = {model: set(fields) for model, fields in (forget_fields or {}).items()}
        self._rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        super().__init__(check_config=check_config, haproxy_bin=haproxy_bin, live=live, base_config=base_config,
                         reload_delay=reload_delay, reload_retention=reload_retention)
        spec_dir = spec_dir or default_spec_dir()
        self._models = load_models(os.path.join(spec_dir, SPEC_FILES[self.traits.spec]), self.traits.absent)

        self._faults: list[Fault] = []
        self._commit_lock = threading.Lock()     # the commit handler's mutex
        self._routes = self._build_routes()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requested_port = port

        # Introspection for tests (read them; reset_requests() clears requests; the store's are in
        # _Store.__init__).
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []       # client bugs: assert fake.violations == []
        self.forgotten: list[tuple[str, str]] = []   # (model, field) answered 2xx and not kept

    def start(self) -> "FakeDataPlane":
        """Listen on 127.0.0.1, start the reload agent's ticker (and the live HAProxy, if any)."""
        self._stopping.clear()
        if self.live is not None and not self.live.running:
            with self._lock:
                self._check(self._config, "start", version=self._version, error=SeedError)
                self.live.start(self._render(self._config, self._version))
        self._server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), _Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-dataplane-{self.personality}", daemon=True)
        self._thread.start()
        if self._ticker_thread is None:
            self._ticker_thread = threading.Thread(target=self._ticker, name="fake-dataplane-reloads",
                                                   daemon=True)
            self._ticker_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (interrupting injected hangs), the ticker, and the live HAProxy."""
        self._stopping.set()
        self._ticker_wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._ticker_thread is not None:
            self._ticker_thread.join(timeout=10)
            self._ticker_thread = None
        if self.live is not None:
            self.live.cleanup()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "FakeDataPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._requested_port

    @property
    def url(self) -> str:
        """Base URL for the client (without /v2 or /v3)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + self.base


def _reload_id_parts(reload_id: str) -> tuple[datetime.date, int] | None:
    """(date, counter) of a reload id, as getTimeIndexFromID reads it; None if unreadable."""
    date, _, index = reload_id.rpartition("-")
    try:
        return datetime.datetime.strptime(date, "%Y-%m-%d").date(), int(index)
    except ValueError:
        return None


# === Runtime rules (dataplaneapi's changeThroughRuntimeAPI) ===

def changed_server_fields(new: dict, old: dict) -> set[str]:
    """Fields whose values differ, compared the way dataplaneapi's reflection does:
    lists and maps (metadata, proxy-v2-options) are not compared; a difference
    inside a nested object counts as that object's (non-runtime) field."""
    changed = set()
    for key in set(new) | set(old):
        a, b = new.get(key), old.get(key)
        if isinstance(a, list) or isinstance(b, list) or key == "metadata":
            continue
        if a != b:
            changed.add(key if not (isinstance(a, dict) or isinstance(b, dict)) else f"{key}.*")
    return changed


def runtime_plan(backend: str, new: dict, old: dict) -> tuple[list[str], bool]:
    """(runtime commands, reload needed) for a plain server PUT replacing `old` by `new`.

    No difference: no command, no reload. A difference outside
    RUNTIME_SERVER_FIELDS: reload. A runtime field set to null makes
    dataplaneapi dereference a nil pointer, recover and reload, keeping the
    commands it already issued.
    """
    changed = changed_server_fields(new, old)
    if not changed:
        return [], False
    if not changed <= set(RUNTIME_SERVER_FIELDS):
        return [], True
    target = f"{backend}/{new['name']}"
    commands: list[str] = []
    address_done = False
    for field in RUNTIME_SERVER_FIELDS:
        if field not in changed:
            continue
        value = new.get(field)
        if field in ("address", "port"):
            if address_done:
                continue
            if new.get("port") is None:
                return commands, True
            commands.append(f"set server {target} addr {new.get('address', '')} port {new['port']}")
            address_done = True
        elif field in ("weight", "health_check_port"):
            if value is None:
                return commands, True
            keyword = "weight" if field == "weight" else "check-port"
            commands.append(f"set server {target} {keyword} {value}")
        elif field == "maintenance":
            commands.append(f"set server {target} state {'maint' if value == 'enabled' else 'ready'}")
        elif field == "agent-check" and value in ("enabled", "disabled"):
            commands.append(f"{'enable' if value == 'enabled' else 'disable'} agent {target}")
        elif field in ("agent-addr", "agent-send"):
            commands.append(f"set server {target} {field} {value or ''}".rstrip())
    return commands, False


def runtime_add_commands(backend: str, server: dict) -> list[str]:
    """`add server` for a new server; HAProxy before 3.0 adds it in maintenance, so an
    `enable server` follows unless the server is meant to be in maintenance."""
    words = ["add server", f"{backend}/{server['name']}", server_address(server)]
    words += [w for w in server_params(server) if w not in ("enabled", "disabled")]
    commands = [" ".join(words)]
    if server.get("maintenance") != "enabled":
        commands.append(f"enable server {backend}/{server['name']}")
    return commands


# === HTTP transport ===

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    """Hands each request to FakeDataPlane.handle() and writes its answer."""
    protocol_version = "HTTP/1.1"
    server_version = "fake-dataplaneapi"
    sys_version = ""
    timeout = 30                              # idle keep-alive connections end

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = self.server.fake.handle(self.command, self.path, self.headers, body)
        if response is None:                  # injected drop (or stopping during a hang)
            self.close_connection = True
            return
        if response.body is None:
            payload, content_type = b"", None
        elif isinstance(response.body, str):
            payload, content_type = response.body.encode(), "text/plain"
        else:
            payload, content_type = (json.dumps(response.body) + "\n").encode(), "application/json"
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format, *args) -> None:   # quiet: tests read fake.requests instead
        pass


# === CLI ===

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="HAProxy Data Plane API emulator (test bed).")
    parser.add_argument("--port", type=int, default=5555, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--api", choices=("v2", "v3"), help="v2 = --personality 2.9, v3 = --personality 3.4")
    parser.add_argument("--personality", choices=tuple(PERSONALITIES),
                        help="the dataplaneapi release to behave as (default 3.4; wins over --api)")
    parser.add_argument("--user", default=DEFAULT_USERNAME)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--no-auth", action="store_true", help="accept requests without credentials")
    parser.add_argument("--base-config", metavar="FILE", help="haproxy.cfg text placed after defaults")
    parser.add_argument("--seed", metavar="FILE", help="JSON {backend: body with servers} to start from")
    parser.add_argument("--no-check", action="store_true", help="skip `haproxy -c`")
    parser.add_argument("--live", action="store_true", help="run and reload a real HAProxy")
    parser.add_argument("--haproxy", default=HAPROXY_BIN, help="haproxy binary")
    parser.add_argument("--reload-delay", type=float, default=DEFAULT_RELOAD_DELAY,
                        help="the reload ticker's period in seconds, like dataplaneapi's --reload-delay "
                             "(default 5; 0 means 5 there and here)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base_config = None
    if args.base_config:
        with open(args.base_config, encoding="utf-8") as f:
            base_config = f.read()
    fake = FakeDataPlane(args.api, personality=args.personality, port=args.port, username=args.user,
                         password=None if args.no_auth else args.password, base_config=base_config,
                         check_config=not args.no_check, haproxy_bin=args.haproxy, live=args.live or None,
                         reload_delay=args.reload_delay)
    if args.seed:
        with open(args.seed, encoding="utf-8") as f:
            fake.seed(json.load(f), bump=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake.start()
    print(f"fake dataplaneapi {fake.traits.release} ({fake.api}) listening on {fake.url}{fake.base}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
