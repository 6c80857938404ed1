#!/usr/bin/env python3
# haproxy-azure-discovery, Copyright the haproxy-azure-discovery authors. Apache-2.0.
"""Keep HAProxy server slots in sync with tagged Azure VMs and scale-set instances.

Every cycle the program lists the Azure VMs and scale-set instances tagged
HAProxy:Service:Name / HAProxy:Service:Port, filters them by tag rules, groups
them into services (name, port, region) and keeps one HAProxy backend per
service in step through the Data Plane API: backend azure-NAME-PORT-REGION with
server slots srv1..srvN, live ones pointing at instances and parked ones at
127.0.0.1:80 in maintenance. Backends are created, never deleted. A server whose
instance left drains first (no new connections, safety.drain_seconds at most), then
parks. With haproxy.targets, one discovery feeds several HAProxy hosts, each planned,
applied and backed off on its own.

Usage:
    haproxy-azure-discovery [-c FILE] [--once [--confirm-drain] | --dry-run | --validate
                            | --status [--json] | --explain NAME|ID [--json]]
                            [--log-level LEVEL] [--version]

    --validate   check the configuration only (no network, no Azure SDK)
    --once       run one full cycle and exit
    --dry-run    discover, read HAProxy, print the plan; change nothing
    --status     discovery and HAProxy's backends side by side, drift marked
    --explain    why one VM or scale-set instance is (not) served
    (no mode)    run as a daemon: SIGTERM/SIGINT stop, SIGHUP reloads the config

Configuration: JSON (or TOML on Python 3.11+), default
/etc/haproxy-azure-discovery/config.json, then config.toml. Strings may use
${VAR} and ${VAR:-default}. See docs/configuration.md for every key.

Exit codes: 0 ok, 1 cycle failed or unexpected error (--explain: not served),
2 usage (--explain: not found), 69 Azure SDK not importable, 78 configuration invalid.
"""
from __future__ import annotations

# === Imports (stdlib only) ===
import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import hashlib
import http.client
import http.server
import ipaddress
import json
import logging
import math
import operator
import os
import queue
import random
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

# === Constants and version ===
__version__ = "0.1.0"

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78

DEFAULT_CONFIG_PATHS = ("/etc/haproxy-azure-discovery/config.json",
                        "/etc/haproxy-azure-discovery/config.toml")
SDK_PACKAGES = ("azure-identity", "azure-mgmt-compute", "azure-core")

DAY, HOUR = 86400.0, 3600.0
MAX_WEIGHT = 256                  # HAProxy's server weight range is 0-256
# HAProxy parses numbers (and times, in ms) as 32-bit signed integers
INT_MAX = 2**31 - 1
# HAProxy's own bounds of int params, where they are narrower than 0..INT_MAX (haproxy -c: "invalid
# value 0 for argument 'inter'", weights above 256 refused).
PARAM_BOUNDS = {"weight": (0, MAX_WEIGHT), **{k: (1, INT_MAX) for k in (
    "inter", "fastinter", "downinter", "agent-inter", "rise", "fall", "error_limit")}}
MAX_SLOTS = 100000                # haproxy.server_slots.max at most (slot names srv1..srv999999)

# A parked slot points here, in maintenance (as the Data Plane API's own AWS discovery does).
PARK_ADDRESS, PARK_PORT = "127.0.0.1", 80
# Power states of an instance on its way out: its server drains at once, even with
# azure.running_only false ("deleting" is the provisioning state, see power_state).
LEAVING_STATES = frozenset({"stopping", "deallocating", "deleting"})
# A Uniform instance's Application Health (its instance view's vmHealth: HealthState/...);
# azure.require_healthy serves only "healthy", drains "unhealthy" and lets the others wait.
HEALTH_STATES = ("healthy", "unhealthy", "initializing", "unknown")
HEALTH_WAITS = frozenset({"initializing", "unknown"})
# Every pattern is used with fullmatch: a `$` anchor lets a trailing newline through
# ("web\n"), and a newline in a name would end a line of haproxy.cfg.
# Names end up in haproxy.cfg: the Data Plane API's own backend-name pattern, and a length
# bound so that a 10 kB tag value cannot become a 10 kB backend name.
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
REGION_RE = re.compile(r"[a-z0-9]{1,40}")
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
RESOURCE_GROUP_RE = re.compile(r"[-\w.()]{0,89}[-\w()]")     # Azure: no trailing period

BALANCE_ALGORITHMS = ("roundrobin", "static-rr", "leastconn", "first", "source", "uri",
                      "url_param", "hdr", "random", "rdp-cookie", "hash")
# Scalar backend and server fields that both the v2 and the v3 specification define; the
# test suite checks these lists against testing/spec. Fields the program owns are absent.
BACKEND_PARAMS = frozenset("""
    abortonclose accept_invalid_http_response adv_check allbackups check_timeout checkcache
    compression connect_timeout cookie default_server description disabled dynamic_cookie_key
    email_alert enabled error_files errorfiles_from_http_errors errorloc302 errorloc303
    external_check external_check_command external_check_path force_persist forwardfor from
    fullconn h1_case_adjust_bogus_server hash_balance_factor hash_type http-buffer-request
    http-no-delay http_connection_mode http_keep_alive_timeout http_pretend_keepalive
    http_proxy http_request_timeout http_restrict_req_hdr_names http_reuse
    http_send_name_header httpchk_params id ignore_persist independent_streams
    load_server_state_from_file log_health_checks log_tag max_keep_alive_queue
    mysql_check_params nolinger originalto persist persist_rule pgsql_check_params
    prefer_last_server queue_timeout redispatch retries retry_on server_fin_timeout
    server_state_file_name server_timeout smtpchk_params source splice_auto splice_request
    splice_response spop_check srvtcpka srvtcpka_cnt srvtcpka_idle srvtcpka_intvl
    stats_options stick_table tarpit_timeout tcp_smart_connect tcpka transparent
    tunnel_timeout use_fcgi_app""".split())
SERVER_PARAMS = frozenset("""
    agent-addr agent-check agent-inter agent-port agent-send allow_0rtt alpn backup check
    check-send-proxy check-sni check-ssl check_alpn check_proto check_via_socks4 ciphers
    ciphersuites client_sigalgs cookie crl_file curves downinter error_limit fall fastinter
    health_check_address health_check_port init-addr inter log-bufsize log_proto max_reuse
    maxconn maxqueue minconn namespace no_verifyhost npn observe on-error on-marked-down
    on-marked-up pool_low_conn pool_max_conn pool_purge_delay proto proxy-v2-options redir
    resolve-net resolve-prefer resolve_opts resolvers rise send-proxy send-proxy-v2
    send_proxy_v2_ssl send_proxy_v2_ssl_cn shard sigalgs slowstart sni socks4 source ssl
    ssl_cafile ssl_certificate ssl_max_ver ssl_min_ver ssl_reuse stick tcp_ut tfo track
    verify verifyhost weight ws""".split())


def _by_kind(groups: Mapping[str, str]) -> dict[str, str]:
    return {name: kind for kind, names in groups.items() for name in names.split()}


# What the Data Plane API's model allows as each param's value, where the v2 and the v3
# specification agree (the test suite checks this table against testing/spec): "int" (0 or
# more), "port", "bool", "list", "object", "word" (no whitespace), "name" (a section name),
# "text", "re:PATTERN", or the allowed values separated by "|".
SERVER_PARAM_KINDS = _by_kind({
    "int": """
        agent-inter downinter error_limit fall fastinter inter log-bufsize max_reuse
        maxconn maxqueue minconn pool_low_conn pool_max_conn pool_purge_delay rise shard
        slowstart tcp_ut weight
    """,
    "enabled|disabled": """
        agent-check backup check check-send-proxy check-ssl check_via_socks4
        no_verifyhost send-proxy send-proxy-v2 send_proxy_v2_ssl send_proxy_v2_ssl_cn
        ssl ssl_reuse stick tfo
    """,
    "word": """
        agent-addr alpn check-sni check_alpn check_proto cookie health_check_address
        init-addr proto resolvers sni socks4 ssl_cafile ssl_certificate
    """,
    "text": """
        agent-send ciphers ciphersuites client_sigalgs crl_file curves namespace npn
        redir sigalgs source track verifyhost
    """,
    "SSLv3|TLSv1.0|TLSv1.1|TLSv1.2|TLSv1.3": "ssl_max_ver ssl_min_ver",
    "port": "agent-port health_check_port",
    "auto|h1|h2": "ws",
    "bool": "allow_0rtt",
    "fastinter|fail-check|sudden-death|mark-down": "on-error",
    "ipv4|ipv6": "resolve-prefer",
    "layer4|layer7": "observe",
    "legacy|octet-count": "log_proto",
    "list": "proxy-v2-options",
    "none|required": "verify",
    "re:([A-Za-z0-9.:/]+)(,[A-Za-z0-9.:/]+)*": "resolve-net",
    "re:(allow-dup-ip|ignore-weight|prevent-dup-ip)(,(allow-dup-ip|ignore-weight|prevent-dup-ip))*":
        "resolve_opts",
    "shutdown-backup-sessions": "on-marked-up",
    "shutdown-sessions": "on-marked-down",
})
BACKEND_PARAM_KINDS = _by_kind({
    "enabled|disabled": """
        abortonclose accept_invalid_http_response allbackups checkcache external_check
        h1_case_adjust_bogus_server http-buffer-request http-no-delay
        http_pretend_keepalive http_proxy independent_streams log_health_checks nolinger
        persist prefer_last_server splice_auto splice_request splice_response spop_check
        srvtcpka tcp_smart_connect tcpka transparent
    """,
    "object": """
        compression cookie default_server email_alert errorloc302 errorloc303
        force_persist forwardfor hash_type httpchk_params ignore_persist
        mysql_check_params originalto persist_rule pgsql_check_params redispatch
        smtpchk_params source stats_options stick_table
    """,
    "int": """
        check_timeout connect_timeout fullconn hash_balance_factor
        http_keep_alive_timeout http_request_timeout id max_keep_alive_queue
        queue_timeout retries server_fin_timeout server_timeout srvtcpka_cnt
        srvtcpka_idle srvtcpka_intvl tarpit_timeout tunnel_timeout
    """,
    "text": "description http_send_name_header retry_on server_state_file_name use_fcgi_app",
    "word": "dynamic_cookie_key external_check_command external_check_path log_tag",
    "bool": "disabled enabled",
    "list": "error_files errorfiles_from_http_errors",
    "aggressive|always|never|safe": "http_reuse",
    "global|local|none": "load_server_state_from_file",
    "httpchk|ldap-check|mysql-check|pgsql-check|redis-check|smtpchk|ssl-hello-chk|tcp-check":
        "adv_check",
    "httpclose|http-server-close|http-keep-alive": "http_connection_mode",
    "name": "from",
    "preserve|delete|reject": "http_restrict_req_hdr_names",
})

# Fields a Data Plane API release dropped from its model, and the first release without them:
# http_proxy left client-native in 6.3.9, which dataplaneapi 3.3.6 took; the server answers 2xx
# and forgets it (handlers/respond/respond.go decodes without unknown-field checks).
FIELDS_GONE = {"backend.http_proxy": (3, 3, 6)}
# A backend written with the same desired state this many cycles running, and read back
# different in the same fields each time, has fields the server does not keep: they are
# ignored from then on (for that target), and the write loop ends.
REWRITE_LIMIT = 3
# Seconds a cycle waits for the reload its writes caused (dataplaneapi's reload-delay is 5 s).
RELOAD_WAIT = 60.0
# Server fields dataplaneapi applies through HAProxy's runtime API without a reload when a
# plain PUT changes only them (client-native/dataplaneapi changeThroughRuntimeAPI).
RUNTIME_FIELDS = frozenset({"address", "port", "maintenance", "weight", "agent-check",
                            "agent-addr", "agent-send", "health_check_port"})

# A custom cloud's endpoints document: GET {resource_manager_url}/metadata/endpoints (Azure Stack
# Hub and Azure's own clouds serve it; azure-cli and Terraform read it to register a cloud). Azure's
# clouds answer 2022-09-01; Azure Stack Hub documents only 2015-01-01 (both shapes carry
# authentication.loginEndpoint and audiences).
CLOUD_METADATA_APIS = ("2022-09-01", "2015-01-01")
# (Resource Manager endpoint = token audience, login authority) per azure.cloud.
CLOUDS = {
    "public": ("https://management.azure.com", "login.microsoftonline.com"),
    "china": ("https://management.chinacloudapi.cn", "login.chinacloudapi.cn"),
    "usgovernment": ("https://management.usgovcloudapi.net", "login.microsoftonline.us"),
}


# How often a thread waiting on the listings (or in a retry's wait) looks at the stop flag.
WAIT_SLICE = 0.1

log = logging.getLogger("haproxy_azure_discovery")


# === Errors ===
class DiscoveryError(Exception):
    """Base of every error the program expects; main() maps it to exit_code."""
    exit_code = EX_FAIL


class ConfigError(DiscoveryError):
    """The configuration is invalid; carries every problem found, each with its key path."""
    exit_code = EX_CONFIG

    def __init__(self, problems: Sequence[str]):
        self.problems = tuple(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class DependencyError(DiscoveryError):
    exit_code = EX_UNAVAILABLE


class AzureError(DiscoveryError):
    """A listing failed after the SDK's own retries: the whole discovery is void."""

    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status


class DataPlaneError(DiscoveryError):
    """A Data Plane API request failed; the message names method, path, status and reason."""

    def __init__(self, msg: str, status: int | None = None, body: str = ""):
        super().__init__(msg)
        self.status, self.body = status, body


class TransactionConflict(DataPlaneError):
    """The configuration version moved (409) or the transaction is outdated (406): re-plan."""


class CommitRefused(DataPlaneError):
    """A commit the Data Plane API refused: the configuration it would make fails `haproxy -c`."""


class ReloadFailed(DataPlaneError):
    """A reload of HAProxy failed, never confirmed, or is unknown to the Data Plane API: HAProxy
    may run an older configuration than the API shows (dataplaneapi puts the last good file
    back; every GET still answers the new one). A debt the program pays with a reload."""

    def __init__(self, reload_id: str, at: Any = None, response: Any = None):
        self.reload_id, self.at = reload_id, at if _is_count(at) else None
        self.response = shorten(str(response or "no message"), 300)
        when = f" at {utc(self.at)}" if self.at is not None else ""
        super().__init__(
            f"HAProxy runs an older configuration than the Data Plane API shows: reload "
            f"{reload_id} failed{when}: {self.response}")


# The Data Plane API's answers to a write it refuses: a body its model rejects (422) or a
# change client-native cannot make (400). They concern that one backend's writes only.
REFUSED_STATUSES = (400, 422)


class Aborted(DiscoveryError):
    """Shutdown was requested in the middle of a cycle."""


# === Masking secrets ===
# Anything shaped like a credential, whoever wrote it: Authorization values, bearer tokens,
# the managed-identity header, and key=value pairs with a secret-sounding key (not our own
# key paths such as "haproxy.password: is required").
_REDACT_RE = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer)?\s*|bearer\s+|"
    r"x-identity-header[\"']?\s*[:=]\s*|"
    r"(?<![\w.])(?:password|passwd|secret|token|access_token|client_secret)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"',;}&]+")
# Environment variables whose values are secrets wherever they end up.
SECRET_VAR_RE = re.compile(
    r"(?i)(.*_)?(password|passwd|pass|secret|token|key|credentials?|identity_header)(_.*)?")


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known secret value (4 characters or more) and anything shaped
    like a credential masked: the one masking path of every printed line. A secret is
    masked as written and as it appears escaped (JSON, a Python repr, URL-quoted) or with
    its whitespace folded, so that no way of printing an answer shows it."""
    for secret in sorted({v for s in secrets if s and len(s) >= 4 for v in _spellings(s)}, key=len,
                         reverse=True):
        text = text.replace(secret, "***")
    return _REDACT_RE.sub(lambda m: m.group(1) + "***", text)


@functools.lru_cache(maxsize=256)
def _spellings(secret: str) -> tuple[str, ...]:
    return tuple({secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
                  repr(secret)[1:-1], urllib.parse.quote(secret, safe=""),
                  urllib.parse.quote_plus(secret),
                  " ".join(secret.split())} - {""})


def shorten(text: str, limit: int, secrets: Iterable[str] = ()) -> str:
    """Text from outside, for one line: masked first (a cut must not leave the start of a
    secret behind), then its whitespace folded, then cut to `limit` characters."""
    return " ".join(redact(text, secrets).split())[:limit]


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values of the environment variables that hold secrets (by name)."""
    return [v for k, v in env.items() if SECRET_VAR_RE.fullmatch(k) and v]


# === Stop flag ===
class StopFlag(typing.Protocol):
    """Shutdown, as every loop between requests and every wait of the program sees it (Flag:
    set by SIGTERM/SIGINT). A wait on it ends as soon as it is set: True then."""

    def is_set(self) -> bool: ...

    def wait(self, seconds: float) -> bool: ...


class Flag:
    """A flag a signal handler may set, and that every wait in the program waits on (the
    StopFlag of the daemon, --once and the tests alike). threading.Event.set() takes a lock
    that the interrupted main thread may hold at that moment (inside Event.wait or clear):
    Python runs handlers between two bytecodes of the main thread, so that can deadlock.
    Setting writes one attribute and one byte to a self-pipe, which wakes every waiter, in
    any thread, at once; only clear() empties the pipe."""

    def __init__(self) -> None:
        self._value = False
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    def set(self) -> None:
        self._value = True
        try:
            self._wake_w.send(b"!")
        except OSError:           # full (waiters are woken already) or closed
            pass

    def clear(self) -> None:
        self._value = False
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:           # BlockingIOError: empty
            pass

    def is_set(self) -> bool:
        return self._value

    def wait(self, seconds: float) -> bool:
        """Until the flag is set or `seconds` pass; True when it is set."""
        return wait_any([self], seconds) is not None

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


def wait_any(flags: Sequence[Flag], seconds: float) -> Flag | None:
    """Wait until one of `flags` is set (that one) or `seconds` pass (None)."""
    deadline = time.monotonic() + seconds
    while True:
        for flag in flags:
            if flag.is_set():
                return flag
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            select.select([f._wake_r for f in flags], [], [], None if math.isinf(left) else left)
        except (OSError, ValueError):     # closed meanwhile: a slice of sleep instead
            time.sleep(min(left, WAIT_SLICE))


# === Domain model ===
class Instance(typing.NamedTuple):
    """One Azure VM or scale-set instance, as discovery saw it. Immutable like the frozen
    dataclasses around it, but a named tuple, as Member: the join builds one per instance
    every cycle, and a frozen dataclass's __init__ costs a call per field (bench/RESULTS.md)."""
    id: str                      # lower-cased ARM resource id: the identity
    name: str                    # for people: printable (the join escapes it)
    region: str
    tags: Mapping[str, str]
    address: str | None          # chosen per azure.address / azure.ip_version; None = none found
    power_state: str = "unknown"  # "running", "stopped", "deallocated", ... or "unknown"
    kind: str = "vm"             # "vm", "flexible" (Flexible scale-set member) or "uniform"
    health: str | None = None    # Uniform: Application Health (HEALTH_STATES); None: not reported


@dataclass(frozen=True)
class Skip:
    """Why an instance is not served: reported as data, logged by the loop."""
    instance: str                # the instance's name, for people
    reason: str
    id: str = ""                 # the resource id, for the operator who must find it
    rule: str = field(default="", compare=False)    # the rule it failed (RULES), for --explain


@dataclass(frozen=True)
class Discovery:
    instances: tuple[Instance, ...]
    skipped: tuple[Skip, ...] = ()
    requests: int = 0
    quota: Mapping[str, int] = field(default_factory=dict)   # Azure's read buckets: the least left
    # the next cycle waits this long at least, for the buckets to refill
    wait: float = 0.0


# a dict key of every cycle: hashed in C, ordered as a tuple
class ServiceKey(typing.NamedTuple):
    name: str
    port: int
    region: str


class Member(typing.NamedTuple):
    """An instance selected to serve a service, at the address and port it serves on. Immutable
    like the frozen dataclasses around it, but a named tuple: one is built per instance every
    cycle, and a frozen dataclass's __init__ costs a call per field."""
    instance: str                # instance id
    label: str                   # instance name, for people
    address: str
    port: int
    weight: int | None = None    # from the weight tag; None = not set by a tag
    waits: bool = False          # azure.require_healthy, not Healthy: keeps a live slot it holds


class Drain(typing.NamedTuple):          # a named tuple, as Member: one per leaving server
    """A live server whose instance left, draining: no new connections, its sessions
    finish. Parked at `until` at the latest, or once its sessions are 0."""
    backend: str
    server: str
    # the endpoint drained: a slot whose server changed is another drain
    address: str
    port: int | None             # as HAProxy holds it (the model's port is nullable)
    since: float                 # when the drain began (wall clock, seconds)
    until: float                 # since + safety.drain_seconds


@dataclass(frozen=True)
class BackendState:
    """A backend as the Data Plane API holds it: its fields and every server, by name."""
    name: str
    fields: Mapping[str, Any]
    servers: Mapping[str, Mapping[str, Any]]


class ServerChange(typing.NamedTuple):       # a named tuple, as Member: one per changed server
    action: str                          # "add", "update" or "delete"
    name: str
    body: Mapping[str, Any] | None       # what to send (None for delete)
    before: Mapping[str, Any] | None     # what HAProxy holds (None for add)
    label: str = ""                      # the instance, for people

    @property
    def runtime_only(self) -> bool:
        """True when dataplaneapi can apply this change without reloading HAProxy."""
        if self.action != "update" or self.before is None or self.body is None:
            return False
        keys = set(self.body) | set(self.before)
        changed = {k for k in keys if not _same_value(self.body.get(k), self.before.get(k))}
        return changed <= RUNTIME_FIELDS

    @property
    def unparks(self) -> bool:
        """A parked slot filled with a new address: a runtime write of it needs two steps."""
        return (self.action == "update" and self.before is not None and self.body is not None
                and self.before.get("maintenance") == "enabled" and _is_live(self.body)
                and (self.before.get("address"), self.before.get("port"))
                != (self.body.get("address"), self.body.get("port")))


@dataclass(frozen=True)
class BackendPlan:
    """The changes one backend needs; `fields` and `servers` are its complete desired state."""
    name: str
    create: bool
    fields_changed: bool
    fields: Mapping[str, Any]
    servers: Mapping[str, Mapping[str, Any]]
    changes: tuple[ServerChange, ...]
    slots: int
    live: int
    # the fields the program sets (before `fields` adds what HAProxy holds)
    wanted: Mapping[str, Any] = field(default_factory=dict)

    @property
    def structural(self) -> bool:
        """Anything beyond re-pointing existing slots: needs a transaction (and a reload)."""
        return (self.create or self.fields_changed
                or any(c.action != "update" for c in self.changes))


@dataclass(frozen=True)
class Plan:
    backends: tuple[BackendPlan, ...] = ()
    skipped: tuple[Skip, ...] = ()
    held: tuple[str, ...] = ()           # "backend/server" slots whose parking is held back
    draining: tuple[Drain, ...] = ()     # servers set (again) to drain this cycle, kept live
    ready: tuple[str, ...] = ()          # "backend/server": drained, but its instance came back
    warnings: tuple[str, ...] = ()       # e.g. a foreign server holding one of our slot ids
    live: int = 0                        # live servers once applied
    services: int = 0                    # services discovered
    slots: int = 0                       # slots in all our backends once applied
    our_backends: int = 0

    @property
    def empty(self) -> bool:
        return not self.backends

    @property
    def runtime_only(self) -> bool:
        return all(not b.structural and all(c.runtime_only for c in b.changes)
                   for b in self.backends)

    @property
    def runtime_writes(self) -> int:
        """Plain server PUTs hybrid mode sends for this plan: an unpark takes two."""
        return sum(1 + c.unparks for b in self.backends for c in b.changes)


@dataclass(frozen=True)
class Applied:
    """What applying a plan left behind: the configuration version it ended at (None when
    the Data Plane API did not say), the reloads it caused, by Reload-ID, and the backends
    the API refused (their writes left out), with its reason."""
    version: int | None
    reloads: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)


class Source(typing.Protocol):
    """Where instances come from: AzureSource, or a test's scripted list."""

    def discover(self) -> Discovery: ...


class Target(typing.Protocol):
    """What plans are applied to: DataPlane (HAProxy through its Data Plane API), or a
    test's in-memory fake. The core decides what to do; a Target knows the wire."""

    requests: int

    def version(self) -> int: ...

    def read_backends(self, prefix: str) -> dict[str, BackendState]: ...

    def apply_transaction(self, plan: Plan, version: int, stop: StopFlag) -> Applied: ...

    def apply_runtime(self, plan: Plan, version: int, stop: StopFlag) -> Applied: ...

    def await_reloads(self, reloads: Sequence[str], stop: StopFlag) -> None: ...

    def reload_debt(self) -> ReloadFailed | None: ...

    def make_reload(self, version: int, stop: StopFlag) -> Applied: ...

    def dropped_fields(self) -> frozenset[str]: ...

    def set_admin_state(self, backend: str, server: str, admin_state: str) -> None: ...

    def admin_state(self, backend: str, server: str) -> str | None: ...

    def sessions(self, backend: str, servers: Sequence[str]) -> dict[str, int | None]: ...


class Settled(typing.NamedTuple):
    """A backend a cycle found exactly as it planned it, with nothing to drain, and what it was
    planned from. Planning is a function of these and of the configuration (which a State does
    not outlive): a later cycle that finds them all equal takes the slots as they are."""
    members: list[Member]                # the backend's members, as discovered
    backend: BackendState                # as HAProxy held it
    previous: Mapping[str, str]          # its State.assignments
    slots: list[Member | None]
    foreign_ids: Mapping[int, str]       # server ids held by servers of others in it


class Rewrite(typing.NamedTuple):
    """A backend written with one desired state in `count` cycles running; `keys`: what differed
    from HAProxy every time after the first (_differing, intersected; None the first time)."""
    desired: tuple[Mapping[str, Any], Mapping[str, Any]]     # (BackendPlan.wanted, .servers)
    keys: frozenset[str] | None
    count: int


@dataclass
class State:
    """What the daemon remembers between cycles; SIGHUP replaces it with a fresh one."""
    version: int | None = None            # configuration version after our last cycle
    fingerprint: str | None = None        # of the discovery our last cycle applied
    # backend -> instance -> slot
    assignments: dict[str, dict[str, str]] = field(default_factory=dict)
    drain_fingerprint: str | None = None  # discovery seen behind a mass drain ...
    drain_streak: int = 0                 # ... and in how many cycles in a row
    drain_since: float | None = None      # ... and since when (wall clock), while it is held
    # backend -> server -> its drain
    draining: dict[str, dict[str, Drain]] = field(default_factory=dict)
    skipped: frozenset[str] = frozenset()  # skip reasons already logged as warnings
    warned: frozenset[str] = frozenset()   # plan warnings already logged
    settled: dict[str, Settled] = field(default_factory=dict)   # backend -> as last found in sync
    # a reload HAProxy still owes: it may run an older configuration
    debt: ReloadFailed | None = None
    looked: bool = False                  # _first_look has read what the target tells once
    # backend -> its writes of one desired state
    rewrites: dict[str, Rewrite] = field(default_factory=dict)
    # "backend.KEY"/"server.KEY" params the target does not keep
    unkept: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Decision:
    """What one planning pass decided; the loop stores it in State once it is applied."""
    plan: Plan
    assignments: dict[str, dict[str, str]]
    drain_fingerprint: str | None
    drain_streak: int
    drain_since: float | None = None
    draining: dict[str, dict[str, Drain]] = field(default_factory=dict)
    settled: dict[str, Settled] = field(default_factory=dict)


# === Configuration ===
@dataclass(frozen=True)
class AzureConfig:
    subscription_id: str = ""
    subscription_ids: tuple[str, ...] = ()
    resource_groups: tuple[str, ...] = ()
    credential_type: str = "default"
    managed_identity_client_id: str = ""
    cloud: str = ""                 # "" = public, or the resource_manager_url's own metadata
    resource_manager_url: str = ""
    token_audience: str = ""
    login_endpoint: str = ""
    address: str = "private"
    ip_version: str = "ipv4"
    running_only: bool = True
    require_healthy: bool = False   # Uniform instances: served only while reported Healthy
    timeout: float = 30.0
    retries: int = 3
    workers: int = 8
    source: str = "arm"             # "arm" (Resource Manager listings) or "resource_graph"
    max_pages: int = 10000          # pages of one listing, at most (a link that never ends)
    discovery_deadline_seconds: float = 300.0   # one discovery, every listing, at most

    @property
    def subscriptions(self) -> tuple[str, ...]:
        subs = ((self.subscription_id,) if self.subscription_id else ()) + self.subscription_ids
        return tuple(dict.fromkeys(s.lower() for s in subs))


@dataclass(frozen=True)
class TagsConfig:
    service_name_tag: str = "HAProxy:Service:Name"
    service_port_tag: str = "HAProxy:Service:Port"
    instance_port_tag: str = "HAProxy:Instance:Port"
    instance_weight_tag: str = "HAProxy:Instance:Weight"
    allowlist: Mapping[str, str] = field(default_factory=dict)
    denylist: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendConfig:
    name_prefix: str = "azure"
    name_separator: str = "-"
    balance: str = "roundrobin"
    mode: str = "http"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotsConfig:
    base: int = 10
    growth_factor: float = 1.5
    growth_type: str = "linear"
    max: int = 1000              # slots per backend; the growth rule never goes past it


# One HAProxy host of haproxy.targets: its connection keys; None (a key left out) takes the
# top-level haproxy.* value. `name` labels it in logs, metrics and --status (default: base_url).
@dataclass(frozen=True)
class TargetConfig:
    name: str | None = None
    base_url: str | None = None
    api_version: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float | None = None
    verify_ssl: bool | None = None
    ca_file: str | None = None


@dataclass(frozen=True)
class HAProxyConfig:
    base_url: str = "http://localhost:5555"
    api_version: str = "auto"
    username: str = "admin"
    password: str = ""
    timeout: float = 10.0
    verify_ssl: bool = True
    ca_file: str = ""
    apply_mode: str = "transaction"
    hybrid_max_writes: int = 25
    # the largest answer read (100,000 servers in full sections: some 30 MiB)
    max_answer_mb: int = 64
    backend: BackendConfig = BackendConfig()
    server: ServerConfig = ServerConfig()
    server_slots: SlotsConfig = SlotsConfig()
    targets: tuple[TargetConfig, ...] = ()     # empty: the one target of the keys above


@dataclass(frozen=True)
class PollingConfig:
    interval_seconds: float = 30.0
    jitter_seconds: float = 5.0
    backoff_base_seconds: float = 5.0
    max_backoff_seconds: float = 300.0


@dataclass(frozen=True)
class SafetyConfig:
    max_drain_percent: float = 50.0
    drain_confirm_cycles: int = 2
    # ... and this long since it was first seen, whichever is longer
    drain_confirm_seconds: float = 300.0
    drain_seconds: float = 30.0   # a leaving server drains this long at most before it is parked


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "json"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""


# A service's overrides: None (a key left out) takes the top-level haproxy.* value.
@dataclass(frozen=True)
class ServiceBackendConfig:
    balance: str | None = None
    mode: str | None = None
    params: Mapping[str, Any] | None = None     # merged over haproxy.backend.params


@dataclass(frozen=True)
class ServiceServerConfig:
    params: Mapping[str, Any] | None = None     # merged over haproxy.server.params


@dataclass(frozen=True)
class ServiceSlotsConfig:
    base: int | None = None
    growth_factor: float | None = None
    growth_type: str | None = None
    max: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    backend: ServiceBackendConfig = ServiceBackendConfig()
    server: ServiceServerConfig = ServiceServerConfig()
    server_slots: ServiceSlotsConfig = ServiceSlotsConfig()


@dataclass(frozen=True)
class Config:
    azure: AzureConfig = AzureConfig()
    tags: TagsConfig = TagsConfig()
    haproxy: HAProxyConfig = HAProxyConfig()
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)   # by service name
    polling: PollingConfig = PollingConfig()
    safety: SafetyConfig = SafetyConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else (
        "must be " + " or ".join(f'"{c}"' for c in choices) + f", got {json.dumps(v)}")


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _not_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def _matches(regex: re.Pattern, what: str) -> Callable[[str], str | None]:
    return lambda v: None if regex.fullmatch(v) else f"{what}, got {json.dumps(v)}"


def _http_url(v: str) -> str | None:
    u = urllib.parse.urlsplit(v)
    ok = u.scheme in ("http", "https") and u.hostname
    return None if ok else f"must be an http(s) URL, got {json.dumps(v)}"


def _optional_https_url(v: str) -> str | None:
    u = urllib.parse.urlsplit(v)
    ok = not v or (u.scheme == "https" and u.hostname)
    return None if ok else f"must be an https URL, got {json.dumps(v)}"


def listen_address(v: str) -> tuple[str, int] | None:
    """(host, port) of "HOST:PORT" or "[V6]:PORT"; None when it is neither. An empty
    host listens on every IPv4 address."""
    host, sep, port = v.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host[1:-1], int(port)
    if host in ("", "localhost"):
        return host, int(port)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return host, int(port)


def _listen_address(v: str) -> str | None:
    ok = not v or listen_address(v) is not None
    return None if ok else (
        'must be "HOST:PORT", HOST an IPv4 address, [an IPv6 address], localhost or '
        f'empty (e.g. "127.0.0.1:9777", "[::1]:9777"), got {json.dumps(v)}')


def _params(allowed: frozenset[str], owned: str,
            kinds: Mapping[str, str]) -> Callable[[Mapping], str | None]:
    def check(v: Mapping) -> str | None:
        bad = sorted(k for k in v if k not in allowed)
        if not bad:
            wrong = [f"{k}: {problem}" for k in sorted(v)
                     if (problem := param_value_problem(v[k], kinds[k], k))]
            return "; ".join(wrong) or None
        owned_keys = [k for k in bad if k in owned.split()]
        if owned_keys:
            return f"may not set {', '.join(owned_keys)} (the program sets it)"
        return f"unknown field(s) {', '.join(bad)} (not in the Data Plane API model)"
    return check


def param_value_problem(value: Any, kind: str, name: str = "") -> str | None:
    """Why `value` is not what the Data Plane API's model allows for a param of `kind`, or
    what HAProxy itself refuses (PARAM_BOUNDS): `haproxy -c` at the commit would fail the
    whole transaction, every backend in it."""
    got = json.dumps(value)[:60]
    if kind in ("int", "port"):
        low, high = PARAM_BOUNDS.get(name, (0, INT_MAX)) if kind == "int" else (1, 65535)
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"must be an integer {low}-{high}, got {got}"
    if kind in ("bool", "list", "object"):
        ok = isinstance(value, {"bool": bool, "list": list, "object": dict}[kind])
        what = "true or false" if kind == "bool" else f"a {kind}"
        return None if ok else f"must be {what}, got {got}"
    if not isinstance(value, str) or not value.isprintable():
        return f"must be a string without control characters, got {got}"
    if kind == "word" or kind == "name":
        ok = re.fullmatch(r"[^\s]+" if kind == "word" else r"[A-Za-z0-9_.:-]+", value) is not None
        which = " of A-Z a-z 0-9 _ . : -" if kind == "name" else ""
        return None if ok else f"must be one word{which}, got {got}"
    if kind.startswith("re:"):
        return None if re.fullmatch(kind[3:], value) else f"must match {kind[3:]}, got {got}"
    if kind != "text" and value not in kind.split("|"):
        return f"must be {' or '.join(kind.split('|'))}, got {got}"
    return None


def _at_most(high: float, unit: str = "") -> Callable[[float], str | None]:
    return lambda v: None if v <= high else f"must be at most {high:g}{unit}, got {v:g}"


def _between(low: float, high: float, unit: str = "") -> Callable[[float], str | None]:
    return lambda v: (None if low <= v <= high
                      else f"must be between {low:g} and {high:g}{unit}, got {v:g}")


def _bounded_url(v: str) -> str | None:
    """The Data Plane API's URL: scheme, host, port and a path, nothing else. Credentials go in
    username/password, never in the URL (nor into an error message); the program adds its own
    paths and queries."""
    if any(c.isspace() or not c.isprintable() for c in v):
        return "must not contain spaces or control characters"
    u = urllib.parse.urlsplit(v)
    if u.username is not None or u.password is not None:
        return ("must not carry credentials (user:password@): use haproxy.username and "
                "haproxy.password")
    if "?" in v or "#" in v:
        return f"must not have a query or a fragment, got {json.dumps(v)}"
    try:
        port = u.port
    except ValueError:
        port = 0
    if port == 0:
        return f"port must be 1-65535, got {json.dumps(v)}"
    return _http_url(v)


def _endpoint_key(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL as the connection goes: the default port of its
    scheme spelt out, every name of the loopback host as one."""
    u = urllib.parse.urlsplit(url)
    host = (u.hostname or "").lower().rstrip(".")
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            host = "localhost"
    except ValueError:
        pass
    return u.scheme.lower(), host, u.port or (443 if u.scheme.lower() == "https" else 80)


def _tag_name(v: str) -> str | None:
    return None if v and v.isprintable() and len(v) <= 512 else (
        f"must be a tag name (1-512 printable characters), got {json.dumps(v)[:80]}")


# Per-key checks beyond the type; the type comes from the dataclass annotation.
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "azure.subscription_id": lambda v: None if not v or GUID_RE.fullmatch(v) else (
        f"must be a subscription GUID, got {json.dumps(v)}"),
    "azure.credential_type": _one_of("default", "managed_identity", "workload_identity",
                                     "client_secret", "azure_cli"),
    "azure.cloud": _one_of("", *CLOUDS),
    "azure.resource_manager_url": _optional_https_url,
    "azure.token_audience": _optional_https_url,
    "azure.login_endpoint": _optional_https_url,
    "azure.address": _one_of("private", "public"),
    "azure.ip_version": _one_of("ipv4", "ipv6"),
    "azure.timeout": lambda v: _positive(v) or _at_most(HOUR, " s")(v),
    "azure.retries": _between(0, 20),
    "azure.workers": _between(1, 64),
    "azure.source": _one_of("arm", "resource_graph"),
    "azure.max_pages": _between(1, 1000000),
    "azure.discovery_deadline_seconds": lambda v: _positive(v) or _at_most(HOUR, " s")(v),
    "haproxy.base_url": _bounded_url,
    "haproxy.api_version": _one_of("auto", "v2", "v3"),
    # a target's (haproxy.targets[i].name)
    "haproxy.name": _matches(re.compile(r"[^\s\"\\\x00-\x1f\x7f]{1,100}"),
                             "must be 1-100 characters without spaces, quotes, backslashes or "
                             "controls"),
    "haproxy.username": lambda v: None if v else "must not be empty",
    "haproxy.password": lambda v: None if v
        else "is required (the Data Plane API always asks for credentials)",
    "tags.service_name_tag": _tag_name,
    "tags.service_port_tag": _tag_name,
    "tags.instance_port_tag": _tag_name,
    "tags.instance_weight_tag": _tag_name,
    "haproxy.timeout": lambda v: _positive(v) or _at_most(HOUR, " s")(v),
    "haproxy.apply_mode": _one_of("transaction", "hybrid"),
    "haproxy.hybrid_max_writes": _between(1, 100000),
    "haproxy.max_answer_mb": _between(1, 4096),
    "haproxy.backend.name_prefix": _matches(re.compile(r"[A-Za-z0-9_.:-]{1,32}"),
                                            "must be 1-32 of A-Z a-z 0-9 _ . : -"),
    "haproxy.backend.name_separator": _matches(re.compile(r"[_.:-]{1,3}"),
                                               "must be 1-3 of _ . : -"),
    "haproxy.backend.balance": _one_of(*BALANCE_ALGORITHMS),
    "haproxy.backend.mode": _one_of("http", "tcp"),
    "haproxy.backend.params": _params(BACKEND_PARAMS, "name mode balance servers",
                                      BACKEND_PARAM_KINDS),
    "haproxy.server.params": _params(SERVER_PARAMS, "name address port maintenance",
                                     SERVER_PARAM_KINDS),
    "haproxy.server_slots.base": _between(1, 10000),
    "haproxy.server_slots.max": _between(1, MAX_SLOTS),
    "haproxy.server_slots.growth_factor": lambda v: _positive(v) or _at_most(100)(v),
    "haproxy.server_slots.growth_type": _one_of("linear", "exponential"),
    "polling.interval_seconds": lambda v: _positive(v) or _at_most(DAY, " s")(v),
    "polling.jitter_seconds": lambda v: _not_negative(v) or _at_most(DAY, " s")(v),
    "polling.backoff_base_seconds": lambda v: _positive(v) or _at_most(DAY, " s")(v),
    "polling.max_backoff_seconds": lambda v: _positive(v) or _at_most(DAY, " s")(v),
    "safety.max_drain_percent": lambda v: None if 0 <= v <= 100
        else f"must be between 0 and 100, got {v}",
    "safety.drain_confirm_cycles": _between(1, 1000),
    "safety.drain_confirm_seconds": lambda v: _not_negative(v) or _at_most(DAY, " s")(v),
    "safety.drain_seconds": lambda v: _not_negative(v) or _at_most(DAY, " s")(v),
    "logging.level": _one_of("DEBUG", "INFO", "WARNING", "ERROR"),
    "logging.format": _one_of("json", "text"),
    "metrics.listen": _listen_address,
}
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str], path: str, problems: list[str]) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset VAR without default is a problem."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""
    return _VAR_RE.sub(sub, value)


def _coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Check one value against its annotation; numbers and booleans may come as strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:          # X | None: an override, given as X
        return _coerce(value, next(a for a in args if a is not type(None)), path, problems)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: must be true or false, got {json.dumps(value, default=str)}")
    elif hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                pass
        try:
            if isinstance(value,
                          (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                if hint is float or value == int(value):
                    return hint(value)
        except OverflowError:     # an integer too large for a float
            value = f"{str(value)[:20]}... ({len(str(value))} digits)"
        kind = "a number" if hint is float else "an integer"
        problems.append(f"{path}: must be {kind}, got {json.dumps(value, default=str)}")
    elif hint is str:
        if isinstance(value, str):
            return value
        shown = "(not shown, being a secret)" if _secret_key(path) else json.dumps(value,
                                                                                   default=str)
        problems.append(f"{path}: must be a string, got {shown}")
    elif origin is tuple:
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        problems.append(f"{path}: must be a list of non-empty strings")
    elif origin in (Mapping, dict):
        want_str = args and args[1] is str
        if isinstance(value,
                      dict) and all(isinstance(v, str) or not want_str for v in value.values()):
            return {k: v for k, v in value.items() if not k.startswith("_")}
        problems.append(f"{path}: must be an object" + (" of strings" if want_str else ""))
    return None


def _secret_key(path: str) -> bool:
    """Whether a key path holds a secret, whose value no message may show."""
    return SECRET_VAR_RE.fullmatch(path.rsplit(".", 1)[-1]) is not None


def _interpolate_all(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env, path, problems)
    if isinstance(value, list):
        return [_interpolate_all(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate_all(v, env, f"{path}.{k}", problems) for k, v in value.items()}
    return value


def _build(cls: type, raw: Any, env: Mapping[str, str], path: str, problems: list[str],
           checks: str | None = None) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem (with its key path).
    `checks` is the CHECKS path of this level when it differs from `path` (a service's
    overrides are checked like the haproxy.* keys they override)."""
    checks = path if checks is None else checks
    if not isinstance(raw, dict):
        problems.append(f"{path or 'configuration'}: must be an object")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if not key.startswith("_") and key not in names:
            problems.append(f"{path + '.' if path else ''}{key}: unknown key")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{path}.{name}" if path else name
        check = f"{checks}.{name}" if checks else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], env, key, problems, check)
            continue
        if name == "services":
            kwargs[name] = _build_services(raw[name], env, problems)
            continue
        if name == "targets":
            kwargs[name] = _build_targets(raw[name], env, problems)
            continue
        try:
            ok, value = _build_value(raw[name], hints[name], env, key, problems, check)
            if ok:
                kwargs[name] = value
        except Exception as exc:  # noqa: BLE001 - whatever the value does, it is this key's problem
            problems.append(f"{key}: cannot be read ({type(exc).__name__}: {str(exc)[:100]})")
    return cls(**kwargs)


def _build_value(raw: Any, hint: Any, env: Mapping[str, str], key: str, problems: list[str],
                 check: str) -> tuple[bool, Any]:
    """`raw` interpolated, coerced to `hint` and checked (CHECKS[check]): (True, the value),
    or (False, None) with the problem appended (named by `key`)."""
    before = len(problems)
    value = _coerce(_interpolate_all(raw, env, key, problems), hint, key, problems)
    if len(problems) > before:
        return False, None
    problem = CHECKS.get(check, lambda v: None)(value)
    if problem:
        problems.append(f"{key}: {problem}")
        return False, None
    return True, value


def _build_services(raw: Any, env: Mapping[str, str],
                    problems: list[str]) -> dict[str, ServiceConfig]:
    """services: service name -> overrides, each checked like the haproxy.* key it
    overrides. A name no instance carries yet is fine: it may appear later."""
    if not isinstance(raw, dict):
        problems.append("services: must be an object (service name -> overrides)")
        return {}
    out = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        if not NAME_RE.fullmatch(name):
            problems.append(
                f"services.{_printable(name)}: not a service name (1-64 of A-Z a-z 0-9 _ . : -)")
            continue
        out[name] = _build(ServiceConfig, entry, env, f"services.{name}", problems, "haproxy")
    return out


MAX_TARGETS = 100


def _build_targets(raw: Any, env: Mapping[str, str],
                   problems: list[str]) -> tuple[TargetConfig, ...]:
    """haproxy.targets: each entry checked like the haproxy.* connection keys it overrides."""
    if not isinstance(raw, list) or len(raw) > MAX_TARGETS:
        problems.append(
            f"haproxy.targets: must be a list of at most {MAX_TARGETS} objects (empty: the one "
            "target of haproxy.base_url)")
        return ()
    return tuple(_build(TargetConfig, entry, env, f"haproxy.targets[{i}]", problems, "haproxy")
                 for i, entry in enumerate(raw))


def target_configs(cfg: Config) -> list[tuple[str, Config]]:
    """Each HAProxy target, by name, with the configuration it runs with: its connection keys
    over the top-level haproxy.* ones. Without haproxy.targets, the one top-level target."""
    top = cfg.haproxy
    if not top.targets:
        return [(top.base_url, cfg)]
    out = []
    for t in top.targets:
        given = {f.name: v for f in dataclasses.fields(t) if f.name != "name"
                 and (v := getattr(t, f.name)) is not None}
        haproxy = dataclasses.replace(top, targets=(), **given)
        out.append((t.name or haproxy.base_url, dataclasses.replace(cfg, haproxy=haproxy)))
    return out


def _target_problems(cfg: Config) -> list[str]:
    """Rules across the entries of haproxy.targets, and those of a merged entry."""
    problems, seen_urls, seen_names = [], {}, {}
    for i, (name, c) in enumerate(target_configs(cfg) if cfg.haproxy.targets else []):
        path, entry, h = f"haproxy.targets[{i}]", cfg.haproxy.targets[i], c.haproxy
        if not h.password:
            problems.append(f"{path}.password: is required (here or as haproxy.password)")
        if h.ca_file and not h.verify_ssl and (entry.ca_file or entry.verify_ssl is not None):
            problems.append(f"{path}.ca_file: set, but verify_ssl is false (here or in haproxy)")
        key = _endpoint_key(h.base_url)
        if key in seen_urls:
            problems.append(
                f"{path}.base_url: {h.base_url} is haproxy.targets[{seen_urls[key]}]'s Data Plane "
                "API "
                "too (the same scheme, host and port: two targets would fight over one HAProxy)")
        if name in seen_names:
            problems.append(
                f"{path}.name: {json.dumps(name)} names haproxy.targets[{seen_names[name]}] too")
        seen_urls.setdefault(key, i)
        seen_names.setdefault(name, i)
    return problems


def service_haproxy(cfg: Config, service: str | None) -> HAProxyConfig:
    """haproxy.* as it applies to one service: its overrides (services.NAME) over the
    top-level keys; params are merged key by key, the service's winning."""
    top, over = cfg.haproxy, cfg.services.get(service or "")
    if over is None:
        return top
    b, s, slots = over.backend, over.server, over.server_slots
    backend = dataclasses.replace(
        top.backend, balance=b.balance or top.backend.balance, mode=b.mode or top.backend.mode,
        params={**top.backend.params, **(b.params or {})})
    server = ServerConfig({**top.server.params, **(s.params or {})})
    given = {f.name: v for f in dataclasses.fields(slots) if (v := getattr(slots, f.name))
             is not None}
    return dataclasses.replace(top, backend=backend, server=server,
                               server_slots=dataclasses.replace(top.server_slots, **given))


def parse_config(raw: Any, env: Mapping[str, str]) -> Config:
    """Turn the loaded file into a Config, or raise ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw, env, "", problems)
    reported = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in _cross_checks(cfg) if p.split(":", 1)[0] not in reported]
    if problems:
        raise ConfigError(problems)
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one key."""
    problems = []
    if not cfg.azure.subscriptions:
        problems.append("azure.subscription_id: required (or azure.subscription_ids)")
    for i, sub in enumerate(cfg.azure.subscription_ids):
        if not GUID_RE.fullmatch(sub):
            problems.append(f"azure.subscription_ids[{i}]: must be a subscription GUID, "
                            f"got {json.dumps(sub)}")
    for i, rg in enumerate(cfg.azure.resource_groups):
        if not RESOURCE_GROUP_RE.fullmatch(rg):
            problems.append(
                f"azure.resource_groups[{i}]: not a resource group name: {json.dumps(rg)}")
    problems += _slot_problems(cfg.haproxy.server_slots, "haproxy.server_slots")
    for name in cfg.services:
        # The combination counts: a service's base against the top-level max, and so on.
        problems += _slot_problems(service_haproxy(cfg, name).server_slots,
                                   f"services.{name}.server_slots")
    polling = cfg.polling
    if polling.max_backoff_seconds < polling.backoff_base_seconds:
        problems.append(
            "polling.max_backoff_seconds: must be at least polling.backoff_base_seconds "
            f"({polling.max_backoff_seconds} < {polling.backoff_base_seconds})")
    if cfg.azure.require_healthy and cfg.azure.source == "resource_graph":
        problems.append('azure.require_healthy: needs azure.source "arm": Resource Graph rows '
                        "carry no Application Health state (vmHealth); the scale sets' listings do")
    if cfg.haproxy.ca_file and not cfg.haproxy.verify_ssl:
        problems.append("haproxy.ca_file: set, but haproxy.verify_ssl is false")
    if not cfg.haproxy.targets and not cfg.haproxy.password:
        problems.append(
            "haproxy.password: is required (the Data Plane API always asks for credentials)")
    return problems + _target_problems(cfg)


def _slot_problems(slots: SlotsConfig, path: str) -> list[str]:
    problems = []
    if slots.base > slots.max:
        problems.append(f"{path}.max: must be at least {path}.base ({slots.max} < {slots.base})")
    if slots.growth_type == "linear" and slots.growth_factor < 1:
        problems.append(f"{path}.growth_factor: must be at least 1 for linear growth "
                        f"(fewer slots than instances otherwise), got {slots.growth_factor}")
    if slots.growth_type == "exponential" and slots.growth_factor <= 1:
        problems.append(f"{path}.growth_factor: must be greater than 1 for exponential "
                        f"growth, got {slots.growth_factor}")
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """Legal but risky settings, logged at start-up."""
    warnings = []
    if cfg.polling.interval_seconds < 10:
        warnings.append(f"polling.interval_seconds is {cfg.polling.interval_seconds}: below 10 s, "
                        "large estates may exhaust Azure Resource Manager read quotas")
    if not cfg.haproxy.verify_ssl:
        warnings.append(
            "haproxy.verify_ssl is false: the Data Plane API certificate is not checked")
    warnings += [
        f"haproxy.targets[{i}].verify_ssl is false: the Data Plane API certificate of {name} is "
        "not checked"
        for i, (name, c) in enumerate(target_configs(cfg)) if cfg.haproxy.targets
        and not c.haproxy.verify_ssl and cfg.haproxy.targets[i].verify_ssl is not None]
    return warnings


def load_config(path: str, env: Mapping[str, str]) -> Config:
    """Read JSON (or TOML by extension) from `path` and parse it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    cfg = parse_config(decode_config(data, path), env)
    problems = file_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def file_problems(cfg: Config) -> list[str]:
    """Files the configuration names must exist and load: the CA bundles as PEM (each
    target's own, by its key path)."""
    given = [("haproxy.ca_file", cfg.haproxy.ca_file)]
    given += [(f"haproxy.targets[{i}].ca_file", t.ca_file) for i, t
              in enumerate(cfg.haproxy.targets)]
    return [problem for key, path in given if path and (problem := _ca_problem(key, path))]


def _ca_problem(key: str, path: str) -> str | None:
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:          # (an OSError too: first)
        return f"{key}: {path} holds no PEM certificate"
    except OSError as exc:
        return f"{key}: cannot read {path}: {exc.strerror or exc}"
    return None


def decode_config(data: bytes, path: str) -> Any:
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            raise ConfigError([f"{path}: TOML needs Python 3.11 or newer; use JSON"]) from None
        try:
            return tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        return json.loads(data)
    except RecursionError:
        raise ConfigError([f"{path}: not valid JSON: nested too deeply"]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc}"]) from None


def find_config(path: str | None) -> str:
    if path:
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if os.path.exists(candidate):
            return candidate
    return DEFAULT_CONFIG_PATHS[0]


# === Discovery: filter and group ===
@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block (or a decorated function), back on after
    it unless it was off before. For the cycle's bulk work, which allocates far more objects
    than the collector's thresholds and creates no reference cycles: the collector's passes
    over everything alive (full ones included) then cost much of it and free nothing (figures
    in bench/RESULTS.md). An Azure discovery decodes tens of megabytes of JSON kept until the
    join (a collection right after one finds no unreachable object); the core builds members,
    slots and plans. Reference counting frees everything meanwhile; the collector resumes
    after the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@functools.lru_cache(maxsize=4096)      # a few distinct tag values, thousands of instances
def _port(value: str | None) -> int | None:
    # Spaces and tabs around the digits are forgiven; nothing else (str.strip() would also
    # take \x1c-\x1f, which int() refuses).
    digits = None if value is None else value.strip(" \t")
    if digits is None or not re.fullmatch(r"[0-9]{1,5}", digits):
        return None
    port = int(digits)
    return port if 1 <= port <= 65535 else None


def service_of(inst: Instance, cfg: Config) -> tuple[ServiceKey, int, int | None] | Skip | None:
    """The service an instance belongs to, the port it serves on and its weight tag, why
    it cannot serve, or None when it carries no service-name tag (it is not ours)."""
    t, tags = cfg.tags, folded(inst.tags)
    name = tags.get(t.service_name_tag.lower())
    if name is None:
        return None
    port_tag = tags.get(t.service_port_tag.lower())
    if not NAME_RE.fullmatch(name):
        return _skip(inst, f"tag {t.service_name_tag} {_shown(name)} is not a service name "
                           "(1-64 of A-Z a-z 0-9 _ . : -)", "service name")
    port = _port(port_tag)
    if port is None:
        return _skip(inst, f"tag {t.service_port_tag} {_shown(port_tag)} is not a port (1-65535)",
                     "service port")
    serve_port = port
    if (own := tags.get(t.instance_port_tag.lower())) is not None:
        serve_port = _port(own)
        if serve_port is None:
            return _skip(inst, f"tag {t.instance_port_tag} {_shown(own)} is not a port (1-65535)",
                         "service port")
    weight = None
    if (own := tags.get(t.instance_weight_tag.lower())) is not None:
        weight = _weight(own)
        if weight is None:
            return _skip(inst, f"tag {t.instance_weight_tag} {_shown(own)} is not a weight "
                               f"(0-{MAX_WEIGHT})", "weight")
    if not REGION_RE.fullmatch(inst.region):
        return _skip(inst, f"location {_shown(inst.region)} is not a region name", "region")
    return ServiceKey(name, port, inst.region), serve_port, weight


def _weight_value(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WEIGHT


def _weight(value: str) -> int | None:
    digits = value.strip(" \t")
    if not re.fullmatch(r"[0-9]{1,3}", digits) or int(digits) > MAX_WEIGHT:
        return None
    return int(digits)


def folded(tags: Mapping[str, str]) -> dict[str, str]:
    """Tags keyed by lower-cased name: Azure treats tag names case-insensitively (values
    are exact). Of two names that differ only in case, the first in sorted order wins."""
    out: dict[str, str] = {}
    for key in sorted(tags):
        out.setdefault(key.lower(), tags[key])
    return out


def _skip(inst: Instance, reason: str, rule: str = "") -> Skip:
    return Skip(_printable(inst.name), reason, _printable(inst.id), rule)


def _printable(text: str) -> str:
    """A name from outside, safe for one log line: control characters escaped, bounded."""
    if text.isprintable() and len(text) <= 200:
        return text
    # ASCII escapes: a line separator or a bidi override is no more printable than a newline.
    return json.dumps(text[:200])[1:-1][:200]


def _shown(value: str | None) -> str:
    """A tag value quoted for a log line: bounded, control characters escaped."""
    if value is None:
        return "(missing)"
    shown = json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    return shown if len(shown) <= 64 else shown[:60] + '..."'     # escapes can be 12 characters


def tags_match(tags: Mapping[str, str], cfg: TagsConfig) -> bool:
    """Allowlist: every pair must be present; denylist: any present pair excludes.
    Tag names compare case-insensitively, values exactly."""
    if not cfg.allowlist and not cfg.denylist:
        return True
    tags = folded(tags)
    return (all(tags.get(k.lower()) == v for k, v in cfg.allowlist.items())
            and not any(tags.get(k.lower()) == v for k, v in cfg.denylist.items()))


@collector_paused()
def select_instances(instances: Iterable[Instance], cfg: Config
                     ) -> tuple[dict[ServiceKey, list[Member]], list[Skip]]:
    """Group the instances that may serve into services; the rest become Skips.

    Instances filtered out on purpose (no service-name tag, denylist, not running, on its way out)
    are
    not Skips: only instances that carry the service tags but cannot be served are.
    """
    groups: dict[ServiceKey, list[Member]] = {}
    skipped: list[Skip] = []
    seen: set[str] = set()
    # service_of reads the tags and the region only: thousands of instances share a handful of
    # answers, and its checks (tag folding, patterns) are the costliest part of this loop.
    # (tags, region) -> None, a Skip, or (port, weight, the list of the service's members)
    services: dict[tuple, tuple[int, int | None, list[Member]] | Skip | None] = {}
    filtering = bool(cfg.tags.allowlist or cfg.tags.denylist)     # tags_match is True otherwise
    running_only, requiring = cfg.azure.running_only, cfg.azure.require_healthy
    for inst in instances:
        iid, name, region, tags, address, power, _, _ = inst   # one unpacking, not nine lookups
        if iid in seen or (filtering and not tags_match(tags, cfg.tags)):
            continue
        seen.add(iid)
        if power in LEAVING_STATES or (running_only and power != "running"):
            continue
        waits = requiring and _health_waits(inst, cfg)
        if waits is None:                   # Unhealthy: not served, as if gone (its server drains)
            continue
        answer = (tuple(tags.items()), region)
        try:
            found = services[answer]
        except KeyError:
            found = services[answer] = _service_group(inst, cfg, groups)
        if found is None:
            continue
        if isinstance(found, Skip):
            skipped.append(_skip(inst, found.reason, found.rule))
        elif address is None:
            skipped.append(_skip(inst, no_address(cfg.azure), "address"))
        else:
            port, weight, group = found
            group.append(Member(iid, name, address, port, weight, waits))
    # Instances are read in the order they came (the order they sit in memory: reading them by
    # id costs twice as much); members and skips are put in instance-id order at the end.
    return ({k: sorted(ms, key=_by_instance) for k, ms in groups.items() if ms},
            sorted(skipped, key=_by_id))


_by_instance, _by_id = operator.attrgetter("instance"), operator.attrgetter("id")     # sort keys


def no_address(cfg: AzureConfig) -> str:
    return (f"no {cfg.address} {cfg.ip_version} address: primary network interface or IP "
            "configuration missing")


def health_blocks(inst: Instance, cfg: Config) -> str | None:
    """Why azure.require_healthy keeps this instance from being served, or None. Only Uniform
    instances are judged, and one that reports no Application Health (no extension) is served
    as before. Unhealthy is not served: its server drains as if the instance were gone.
    Initializing and Unknown wait: not added, while a live server it already holds stays."""
    health = inst.health
    if not cfg.azure.require_healthy or inst.kind != "uniform" or health in (None, "healthy"):
        return None
    if health in HEALTH_WAITS:
        return f"Application Health {health}: not added until Healthy (a server it holds stays)"
    return f"Application Health {health}: not served (its server drains)"


def _health_waits(inst: Instance, cfg: Config) -> bool | None:
    """health_blocks as select_instances reads it: False served, True waits (Member.waits),
    None not served."""
    if health_blocks(inst, cfg) is None:
        return False
    return True if inst.health in HEALTH_WAITS else None


def _service_group(inst: Instance, cfg: Config, groups: dict[ServiceKey, list[Member]]
                   ) -> tuple[int, int | None, list[Member]] | Skip | None:
    """service_of, with the service's list of members in `groups` in place of its key."""
    found = service_of(inst, cfg)
    if found is None or isinstance(found, Skip):
        return found
    key, port, weight = found
    return port, weight, groups.setdefault(key, [])


def backend_name(key: ServiceKey, cfg: BackendConfig) -> str:
    sep = cfg.name_separator
    return f"{cfg.name_prefix}{sep}{key.name}{sep}{key.port}{sep}{key.region}"


def fingerprint(groups: Mapping[ServiceKey, list[Member]]) -> str:
    """A stable digest of a discovery result: equal results, equal fingerprints."""
    digest = hashlib.sha256()
    for k in sorted(groups, key=lambda k: (k.name, k.port, k.region)):
        # One string per service; no field holds a newline (names and ids are checked).
        digest.update(f"{k.name}\n{k.port}\n{k.region}\n".encode())
        digest.update("\n".join(sorted(f"{m.instance} {m.address} {m.port} {m.weight}"
                                        f"{' waits' * m.waits}" for m in groups[k])).encode())
        digest.update(b"\n\n")
    return digest.hexdigest()[:16]


# === Slots and diff ===
def _ceil(x: float) -> int:
    # Round first so that 10 * 1.1 (11.000000000000002) gives 11, not 12.
    return math.ceil(round(x, 9))


def slot_target(n: int, cfg: SlotsConfig) -> int:
    """Slots wanted for n live instances: never below base, at least n, never above max."""
    if n <= cfg.base:
        return cfg.base
    if n >= cfg.max:
        return cfg.max
    if cfg.growth_type == "linear":
        return min(cfg.max, cfg.base + _ceil((n - cfg.base) * cfg.growth_factor))
    # The smallest k with ceil(base * f^k) >= n: start just below the logarithm's answer.
    k = max(1, math.floor(math.log(n / cfg.base, cfg.growth_factor)) - 1)
    while _ceil(cfg.base * cfg.growth_factor ** k) < n:
        k += 1
    return min(cfg.max, _ceil(cfg.base * cfg.growth_factor ** k))


def slot_count(n: int, current: int, highest_live: int, cfg: SlotsConfig) -> int:
    """The slot count after this cycle. Growth is immediate once the instances outgrow
    the slots (or the backend has fewer than base), and goes to the target for n, so
    that the next instances find parked slots: filling one needs no reload. Shrinking
    happens only when the target is at most half the current count, and never below
    base or a live slot."""
    target = slot_target(n, cfg)
    if n > current or current < cfg.base:
        return max(target, current)
    if target * 2 <= current:
        return max(target, highest_live)
    return current


@functools.lru_cache(maxsize=65536)     # the same few thousand names, every cycle
def slot_index(name: str) -> int | None:
    """N for our slot names srvN, None for any other server."""
    digits = name[3:]
    if name[:3] == "srv" and digits.isdigit() and digits.isascii() and digits[0] != "0" and len(
            digits) < 7:
        return int(digits)
    return None


def _is_live(server: Mapping[str, Any]) -> bool:
    return server.get("maintenance") != "enabled"


class SlotAssignment:
    """One backend's slots srv1..srvN being assigned to the members that serve them, in two
    steps: `match` gives each member the slot it holds, `slots` places the rest. Between
    them, `leaving` tells which live servers would drain, and the drains that go on join
    as members of their own slots (a second `match`, which goes on where the first ended).

    An instance keeps its slot while it lives (remembered in `previous`, else found by
    address:port among live servers after a restart); new instances take the lowest
    parked slot; live servers never move.
    """

    __slots__ = ("ours", "live", "foreign_ids", "previous", "taken", "fresh", "members", "waited",
                 "_by_endpoint")

    def __init__(self, servers: Mapping[str, Mapping[str, Any]], previous: Mapping[str, str]):
        # by slot number
        ours = self.ours = {i: s for name, s in servers.items() if (i := slot_index(name))}
        self.live = {i for i, s in ours.items() if _is_live(s)}
        # Server ids held by servers of others in the backend: HAProxy refuses two servers with
        # one id, so the slot whose number is taken goes without an explicit id.
        self.foreign_ids = {} if len(ours) == len(servers) else {
            i: n for n, s in servers.items() if slot_index(n) is None
                and isinstance(i := s.get("id"), int)}
        self.previous = previous
        self.taken: dict[int, Member] = {}          # slot number -> the member that holds it
        # members that hold no slot yet (their slots change)
        self.fresh: list[Member] = []
        self.members = 0
        self.waited = 0                             # members that wait and hold no slot
        # built when first needed
        self._by_endpoint: dict[tuple[Any, Any], list[int]] | None = None

    def match(self, members: Sequence[Member], draining: Collection[str] = ()) -> SlotAssignment:
        """Each member to the slot it holds, if any. A member that waits keeps a live slot it
        holds, unless that server drains (`draining`: server names), and takes no other."""
        taken, previous, waited = self.taken, self.previous, 0
        for m in members:
            i = slot_index(previous.get(m.instance, ""))
            if i is None or i in taken:
                if self._by_endpoint is None:
                    self._by_endpoint = {}
                    for j in sorted(self.live):
                        s = self.ours[j]
                        self._by_endpoint.setdefault((s.get("address"), s.get("port")),
                                                     []).append(j)
                candidates = self._by_endpoint.get((m.address, m.port))
                i = next((j for j in candidates if j not in taken), None) if candidates else None
            if m.waits and (i is None or i not in self.live or f"srv{i}" in draining):
                waited += 1
            elif i is None:
                self.fresh.append(m)
            else:
                taken[i] = m
        self.members += len(members) - waited
        self.waited += waited
        return self

    def leaving(self) -> list[str]:
        """Our servers live in HAProxy that the slots would park or point elsewhere, in slot
        order. (A member still to be placed never lands on a live slot at its own address:port:
        that slot would have matched it.)"""
        taken, ours = self.taken, self.ours
        return [f"srv{i}" for i in sorted(self.live) if (m := taken.get(i)) is None
                or m.address != ours[i].get("address") or m.port != ours[i].get("port")]

    def slots(self, cfg: SlotsConfig) -> list[Member | None]:
        """The member each slot serves, in slot order (None: parked). A slot that is live in
        HAProxy but not ours this cycle is being parked now; it stays in place for this cycle
        so that shrinking only ever removes parked slots."""
        taken, live = self.taken, self.live
        count = slot_count(self.members, max(self.ours, default=0), max([*taken, *live], default=0),
                           cfg)
        if self.fresh:
            # Parked (or new) slots first; a slot whose instance just left only when none is
            # left, rather than growing the backend.
            free = sorted((j for j in range(1, count + 1) if j not in taken),
                          key=lambda j: (j in live, j))
            # free has room for every fresh member
            taken = {**taken, **dict(zip(free, self.fresh))}
        return [taken.get(j) for j in range(1, count + 1)]


@functools.lru_cache(maxsize=64)
def slot_names(count: int) -> tuple[str, ...]:
    """srv1..srvN: the names of a backend's slots, in the order SlotAssignment.slots gives them."""
    return tuple(f"srv{j}" for j in range(1, count + 1))


@functools.lru_cache(maxsize=64)
def slot_name_set(count: int) -> frozenset[str]:
    """slot_names(count) as a set: whether a backend holds anything else is then one C call."""
    return frozenset(slot_names(count))


def slot_fields(cfg: HAProxyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every server body of a backend holds besides its name and id: (a live slot's,
    after its address and port; a parked slot's). The key order is that of the successive
    updates these replace: a key already present keeps its place when a later one (params,
    maintenance) overrides its value. Params never hold name, id, address or port
    (parse_config refuses them)."""
    live = {"check": "enabled", **cfg.server.params, "maintenance": "disabled"}
    if cfg.apply_mode == "hybrid":
        # Parking and filling must differ only in runtime-capable fields.
        return live, {"address": PARK_ADDRESS, "port": PARK_PORT, "maintenance": "enabled",
                      "check": "enabled",
                      **cfg.server.params, "maintenance": "enabled"}  # noqa: F601
    return live, {"address": PARK_ADDRESS, "port": PARK_PORT, "maintenance": "enabled",
                  "check": "disabled"}


def backend_fields(name: str, cfg: BackendConfig) -> dict[str, Any]:
    return {"name": name, "mode": cfg.mode, "balance": {"algorithm": cfg.balance}, **cfg.params}


def _same_value(want: Any, have: Any) -> bool:
    # The API omits switches that are off: an absent "check" equals "disabled".
    if want == have:
        return True
    if want in ("disabled", None) and have in ("disabled", None, ""):
        return True
    if isinstance(want, Mapping) and isinstance(have, Mapping):
        return all(_same_value(v, have.get(k)) for k, v in want.items())
    return False


def _differs(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    """Only the keys we set count: fields HAProxy or others add are left alone."""
    if want.items() <= have.items():       # the common case, compared in C
        return False
    return any(not _same_value(v, have.get(k)) for k, v in want.items())


def slot_body(name: str, member: Member | None, have: Mapping[str, Any] | None,
              cfg: HAProxyConfig, with_id: bool, fields: tuple[dict[str, Any], dict[str, Any]]
              ) -> dict[str, Any]:
    """What slot `name` should hold, serving `member` or parked (None), over the server on
    disk `have` (None: a new one); `fields`: slot_fields(cfg)."""
    body: dict[str, Any] = {"name": name}
    if with_id:
        body["id"] = slot_index(name)
    if member is not None:
        body["address"], body["port"] = member.address, member.port
    body.update(slot_settings(member, have, fields, cfg.apply_mode == "hybrid"))
    return body


def slot_settings(member: Member | None, have: Mapping[str, Any] | None,
                  fields: tuple[dict[str, Any], dict[str, Any]], hybrid: bool) -> Mapping[str, Any]:
    """The one statement of a slot's fields past its name, id, address and port (plan_backend
    writes them, in_sync compares them): the live or parked fields of slot_fields, and

    - the instance's weight tag, which wins over params;
    - a weight nobody asked for (a weight tag removed, a slot refilled after a weighted
      instance) back to HAProxy's default, 1, rather than kept (0 = no traffic);
    - in hybrid mode, parked or live, none of the pointer fields the server on disk has:
      dataplaneapi's runtime path dereferences the new value of each changed runtime field,
      and a nil one panics into a reload, after the runtime commands before it went out
      (v2.9 handlers/runtime.go changeThroughRuntimeAPI; v3.4 handlers/configuration/server/
      server.go). A health-check port stays as HAProxy holds it.

    Most slots need none of these: the shared dict comes back, not a copy."""
    settings = fields[0] if member is not None else fields[1]
    if member is not None and member.weight is not None:
        settings = {**settings, "weight": member.weight}
    elif have and "weight" not in settings and have.get("weight") is not None \
            and (hybrid or (member is not None and have["weight"] != 1)):
        settings = {**settings, "weight": 1}
    if hybrid and have and "health_check_port" not in settings \
            and have.get("health_check_port") is not None:
        settings = {**settings, "health_check_port": have["health_check_port"]}
    return settings


def _changed(body: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    return not body.items() <= have.items() and _differs(body, have)     # the first test is C


def plan_backend(name: str, slots: Sequence[Member | None], actual: BackendState | None,
                 cfg: HAProxyConfig, taken_ids: Mapping[int, str]) -> BackendPlan | None:
    """The changes that turn `actual` into `slots`; None when there are none. `taken_ids`:
    the ids servers of others hold in it (SlotAssignment.foreign_ids).

    Never deletes a backend; deletes only our trailing slots beyond the slot count,
    which SlotAssignment.slots guarantees are parked.
    """
    want_fields = backend_fields(name, cfg.backend)
    have_servers = actual.servers if actual else {}
    servers: dict[str, Mapping[str, Any]] = {}      # not ours: kept, ahead of our slots
    beyond = []                                     # (N, srvN) of ours past the slot count
    if not have_servers.keys() <= slot_name_set(len(slots)):    # most backends: told in C
        for n, s in have_servers.items():
            if (i := slot_index(n)) is None:
                servers[n] = s
            elif i > len(slots):                    # slots are srv1..srv<len(slots)>
                beyond.append((i, n))
    changes, fields = [], slot_fields(cfg)
    for j, (n, member) in enumerate(zip(slot_names(len(slots)), slots), 1):
        have = have_servers.get(n)
        body = servers[n] = slot_body(n, member, have, cfg, j not in taken_ids, fields)
        if have is None:
            changes.append(ServerChange("add", n, body, None, member.label if member else ""))
        elif _changed(body, have):
            changes.append(ServerChange("update", n, body, have, member.label if member else ""))
    for _, n in sorted(beyond):
        changes.append(ServerChange("delete", n, None, have_servers[n]))
    fields_changed = actual is not None and _differs(want_fields, actual.fields)
    if actual is not None and not changes and not fields_changed:
        return None
    return BackendPlan(name=name, create=actual is None, fields_changed=fields_changed,
                       fields=want_fields if actual is None else {**actual.fields, **want_fields},
                       servers=servers, changes=tuple(changes), slots=len(slots),
                       live=len(slots) - slots.count(None), wanted=want_fields)


def _differing(want: Mapping[str, Any], have: Mapping[str, Any],
               changes: Sequence[ServerChange]) -> frozenset[str]:
    """What differs between a backend's desired state and HAProxy's: "backend.KEY", "server.KEY"
    of an update, "add.NAME", "delete.NAME" (what the rewrite guard compares between cycles)."""
    out = {f"backend.{k}" for k, v in want.items() if not _same_value(v, have.get(k))}
    for c in changes:
        if c.action == "update":
            out.update(f"server.{k}" for k, v in c.body.items() if
                       not _same_value(v, c.before.get(k)))
        else:
            out.add(f"{c.action}.{c.name}")
    return frozenset(out)


def in_sync(name: str, slots: Sequence[Member | None], actual: BackendState | None,
            cfg: HAProxyConfig, taken_ids: Mapping[int, str]) -> bool:
    """True when plan_backend has nothing to write: `actual` holds every slot as slot_body
    says, no slot of ours lies beyond them and the backend's fields are as configured (most
    backends in most cycles: told without building a body)."""
    if actual is None or _differs(backend_fields(name, cfg.backend), actual.fields):
        return False
    have, fields, hybrid = actual.servers, slot_fields(cfg), cfg.apply_mode == "hybrid"
    for j, (n, m) in enumerate(zip(slot_names(len(slots)), slots), 1):
        h = have.get(n)
        if h is None or h.get("name") != n or (j not in taken_ids and h.get("id") != j):
            return False
        if m is not None and (h.get("address") != m.address or h.get("port") != m.port):
            return False
        if not slot_settings(m, h, fields, hybrid).items() <= h.items():     # _changed's C half
            return False
    return max(filter(None, map(slot_index, have)), default=0) <= len(slots)


def id_clashes(name: str, slots: Sequence[Member | None], taken: Mapping[int, str]) -> list[str]:
    """One line per slot that goes without its id because a foreign server holds it
    (`taken`: SlotAssignment.foreign_ids of the backend)."""
    if not taken:
        return []
    return [f"backend {name}: server {taken[i]} holds id {i}, so slot srv{i} goes without an "
            "explicit id"
            for i in range(1, len(slots) + 1) if i in taken]


@collector_paused()
def plan_cycle(groups: Mapping[ServiceKey, list[Member]], skipped: Sequence[Skip],
               actual: Mapping[str, BackendState], state: State, cfg: Config, now: float = 0.0,
               sessions: Mapping[str, int | None] | None = None) -> Decision:
    """Desired vs actual for every discovered service and every backend of ours.

    A vanished service parks all its slots; no backend is ever deleted. A mass drain
    is held back (its servers stay live) until the mass-drain guard lets it through.
    A live server whose instance left drains first (safety.drain_seconds): it keeps its
    slot, live, until its time is up or its sessions are 0 (`sessions` by "backend/server",
    read once the drain is in effect; None: not read), and is parked then.
    """
    r = _Round(groups, actual, state, cfg, now, sessions)
    desired = {backend_name(k, cfg.haproxy.backend): ms for k, ms in groups.items()}
    prefix = cfg.haproxy.backend.name_prefix + cfg.haproxy.backend.name_separator
    names = sorted(set(desired) | {n for n in actual if n.startswith(prefix)})
    settings = backend_settings(names, groups, cfg)
    skipped = [*skipped, *_beyond_max(desired, state, settings)]

    same = _still_settled(names, desired, actual, state)      # most, when few services change
    work = {n: SlotAssignment(actual[n].servers if n in actual else {},
                              state.assignments.get(n, {}))
            .match(desired.get(n, ()), state.draining.get(n, ())) for n in names if n not in same}
    drains = {n: d for n, a in work.items() if (d := a.leaving())}
    held, guard, kept, fp = (_drain_decisions(r, drains, work, _live(work, same)) if drains
                             else ({}, Guard(False, 0, None), {}, None))
    _serve_held(r, drains, work, held, kept)
    slots = {n: same[n].slots if n in same else work[n].slots(settings[n].server_slots)
             for n in names}
    taken_ids = {n: same[n].foreign_ids if n in same else work[n].foreign_ids for n in names}
    # A member placed this cycle changes its slot: in_sync could only say no, after most of a pass.
    plans = [p for n in names if n not in same
             and (work[n].fresh
                  or not in_sync(n, slots[n], actual.get(n), settings[n], taken_ids[n]))
             and (p := plan_backend(n, slots[n], actual.get(n), settings[n], taken_ids[n]))]
    plan = Plan(backends=tuple(plans), skipped=tuple(skipped),
                held=tuple(f"{n}/{s}" for n, d in held.items() for s in d),
                draining=tuple(d for n in sorted(kept) for d in kept[n].values()),
                ready=tuple(_all_returned(r, names, drains, slots)),
                warnings=tuple(w for n in names for w in id_clashes(n, slots[n], taken_ids[n])),
                live=sum(len(ms) for ms in desired.values()) - _waiting(work, same),
                services=len(desired), slots=sum(map(len, slots.values())), our_backends=len(names))
    unsettled = {p.name for p in plans} | set(drains) | set(state.draining)
    return Decision(plan=plan, assignments={n: _assignment(slots[n]) for n in names},
                    drain_fingerprint=fp if guard.streak else None, drain_streak=guard.streak,
                    drain_since=guard.since if guard.held else None,
                    draining={n: k for n, k in kept.items() if k},
                    settled={n: same.get(n) or Settled(desired.get(n, []), actual[n],
                                                       state.assignments.get(n, {}), slots[n],
                                                       taken_ids[n])
                             for n in names if n in actual and n not in unsettled})


def _assignment(slots: Sequence[Member | None]) -> dict[str, str]:
    """Instance id -> the slot it holds."""
    return {m.instance: s for s, m in zip(slot_names(len(slots)), slots) if m}


def _all_returned(r: _Round, names: Iterable[str], drains: Mapping[str, Sequence[str]],
                  slots: Mapping[str, Sequence[Member | None]]) -> Iterator[str]:
    """_returned over every backend with drains under way."""
    for n in names:
        if n in r.state.draining:
            yield from _returned(n, r.state.draining[n], drains.get(n, ()), slots[n],
                                 r.actual.get(n))


def _live(work: Mapping[str, SlotAssignment], same: Mapping[str, Settled]) -> int:
    """Our servers live in HAProxy before this cycle's changes."""
    return (sum(len(a.live) for a in work.values())
            + sum(len(s.slots) - s.slots.count(None) for s in same.values()))


def _waiting(work: Mapping[str, SlotAssignment], same: Mapping[str, Settled]) -> int:
    """Members that wait (Member.waits) and hold no slot: discovered, not live. (A settled
    backend has no drain: its live slots are its placed members.)"""
    return (sum(a.waited for a in work.values())
            + sum(len(s.members) - len(s.slots) + s.slots.count(None) for s in same.values()))


def rewrite_guard(plan: Plan, actual: Mapping[str, BackendState], before: Mapping[str, Rewrite],
                  limit: int = REWRITE_LIMIT) -> tuple[dict[str, Rewrite],
                                                       dict[str, frozenset[str]]]:
    """(the rewrites once `plan` is applied, the backends whose write loop ends now, with what
    differed every time). A backend planned with the desired state it was written with the
    cycle before counts on; written so `limit` times and still read back different, the fields
    that differed each time are what the server does not keep. Whatever the cause (a field
    the release forgets, another writer undoing ours), no write loop outlives `limit` cycles.
    (What differs is worked out only for a backend written again: most are written once.)"""
    after, looping = {}, {}
    for b in plan.backends:
        desired, last = (b.wanted, b.servers), before.get(b.name)
        if last is None or last.desired != desired or b.name not in actual:
            after[b.name] = Rewrite(desired, None, 1)
            continue
        differs = _differing(b.wanted, actual[b.name].fields, b.changes)
        keys = differs if last.keys is None else last.keys & differs
        after[b.name] = Rewrite(desired, keys, last.count + 1)
        if last.count >= limit and keys:
            looping[b.name] = keys
    return after, looping


def without_fields(cfg: Config, fields: frozenset[str]) -> Config:
    """The configuration without the params ("backend.KEY", "server.KEY") a target does not keep,
    at the top level and in every service's overrides."""
    if not fields:
        return cfg

    def kept(params: Mapping[str, Any] | None, kind: str) -> Any:
        return None if params is None else {k: v for k, v in params.items() if f"{kind}.{k}"
                                            not in fields}
    top = cfg.haproxy
    haproxy = dataclasses.replace(top, backend=dataclasses.replace(top.backend, params=kept(
        top.backend.params, "backend")),
                                  server=ServerConfig(kept(top.server.params, "server")))
    services = {n: dataclasses.replace(
        s, backend=dataclasses.replace(s.backend, params=kept(s.backend.params, "backend")),
        server=ServiceServerConfig(kept(s.server.params, "server"))) for n, s
                in cfg.services.items()}
    return dataclasses.replace(cfg, haproxy=haproxy, services=services)


def configured_fields(cfg: Config) -> frozenset[str]:
    """Every param the configuration sets, as "backend.KEY" / "server.KEY"."""
    out = {f"backend.{k}" for k
           in cfg.haproxy.backend.params} | {f"server.{k}" for k in cfg.haproxy.server.params}
    for s in cfg.services.values():
        out |= {f"backend.{k}" for k in s.backend.params
                or {}} | {f"server.{k}" for k in s.server.params or {}}
    return frozenset(out)


def _still_settled(names: Iterable[str], desired: Mapping[str, list[Member]],
                   actual: Mapping[str, BackendState],
                   state: State) -> dict[str, Settled]:
    """The backends State.settled holds that are planned from equal members, servers and
    assignments again: their slots stand, with nothing to write and nothing to drain. (A
    backend with a drain, begun or going on, is never recorded as settled.)"""
    out = {}
    for n in names:
        s = state.settled.get(n)
        if s is not None and s.previous == state.assignments.get(
                n, {}) and s.members == desired.get(n, []) \
                and s.backend == actual.get(n):
            out[n] = s
    return out


class _Round(typing.NamedTuple):
    """What plan_cycle plans from, as its helpers share it."""
    groups: Mapping[ServiceKey, list[Member]]
    actual: Mapping[str, BackendState]
    state: State
    cfg: Config
    now: float
    sessions: Mapping[str, int | None] | None     # by "backend/server"; None: not read


def _drain_decisions(r: _Round, drains: Mapping[str, list[str]], work: Mapping[str, SlotAssignment],
                     live: int) -> tuple[dict[str, list[str]], Guard, dict[str, dict[str, Drain]],
                                         str | None]:
    """(the servers the guard holds live, its verdict, the servers that drain on: backend ->
    server -> Drain, the discovery's fingerprint where the guard needs it). The guard counts
    drain starts as parks (a server draining already was counted when it began); a held
    start does not start draining."""
    actual, state, groups, cfg, now = r.actual, r.state, r.groups, r.cfg.safety, r.now
    before = {n: _drained_before(d, actual[n], state.draining.get(n, {})) for n, d
              in drains.items()}
    starts = {n: [s for s in d if s not in before[n]] for n, d in drains.items()}
    started = sum(map(len, starts.values()))
    live_now = live - sum(map(len, before.values()))
    guard, fp = drain_held(started, live_now, not groups, 0, None, now, cfg), None
    if guard.streak:
        # The guard trips: only then does the streak of identical discoveries behind it
        # count, and the fingerprint (a pass over every member) say whether it goes on.
        fp = fingerprint(groups)
        seen = state.drain_fingerprint == fp
        guard = drain_held(started, live_now, not groups, state.drain_streak if seen else 0,
                           state.drain_since if seen else None, now, cfg)
    kept = {n: _keep_draining(r, n, list(before[n]) if guard.held else d, work[n].taken, before[n])
            for n, d in drains.items()}
    return ({n: d for n, d in starts.items() if d} if guard.held else {}), guard, kept, fp


def _serve_held(r: _Round, drains: Mapping[str, list[str]], work: Mapping[str, SlotAssignment],
                held: Mapping[str, list[str]], kept: Mapping[str, Mapping[str, Drain]]) -> None:
    """Serve the held and the draining servers as if they were still discovered: they keep
    their slots, and new instances take parked slots (or the backend grows)."""
    for n, names in drains.items():
        stay = [s for s in names if s in kept.get(n, ()) or s in held.get(n, ())]
        if stay:
            work[n].match(_held_members(stay, r.actual[n], r.state.assignments.get(n, {})))


def _drained_before(names: Sequence[str], actual: BackendState,
                    previous: Mapping[str, Drain]) -> dict[str, Drain]:
    """The drains of earlier cycles that go on: same slot, same address:port still live there."""
    return {n: d for n in names if (d := previous.get(n)) is not None
            and (d.address, d.port)
            == (actual.servers[n].get("address"), actual.servers[n].get("port"))}


def _keep_draining(r: _Round, name: str, servers: Sequence[str], taken: Mapping[int, Member],
                   before: Mapping[str, Drain]) -> dict[str, Drain]:
    """Which of these leaving servers drain on this cycle: not with drain_seconds 0, not
    past their time, not once their sessions are 0. A slot re-pointed to the same
    instance's new address is no drain: that instance did not leave."""
    actual, previous, now, sessions = r.actual[name], r.state.assignments.get(name,
                                                                              {}), r.now, r.sessions
    seconds, kept = r.cfg.safety.drain_seconds, {}
    for s in servers:
        member = taken.get(slot_index(s))
        if not seconds or (member is not None and previous.get(member.instance) == s):
            continue
        since = before[s].since if s in before else now
        if now < since + seconds and (sessions is None or sessions.get(f"{name}/{s}") != 0):
            have = actual.servers[s]
            kept[s] = Drain(name, s, have.get("address", ""), have.get("port"), since, since
                            + seconds)
    return kept


def _returned(name: str, previous: Mapping[str, Drain], leaving: Sequence[str],
              slots: Sequence[Member | None],
              actual: BackendState | None) -> list[str]:
    """Servers drained on an earlier cycle whose instance came back to the same slot: HAProxy
    still drains them at runtime, so they are set ready again."""
    out = []
    for s, d in sorted(previous.items()):
        if s in leaving:
            continue
        i = slot_index(s)
        member = slots[i - 1] if i and i <= len(slots) else None
        have = actual.servers.get(s) if actual else None
        if member is not None and (member.address, member.port) == (d.address, d.port) \
                and have is not None and (have.get("address"),
                                          have.get("port")) == (d.address, d.port):
            out.append(f"{name}/{s}")
    return out


def backend_settings(names: Iterable[str], groups: Mapping[ServiceKey, list[Member]],
                     cfg: Config) -> dict[str, HAProxyConfig]:
    """haproxy.* for each of our backends, with its service's overrides. A backend whose
    service was not discovered this cycle is named after it:
    `{prefix}{sep}NAME{sep}PORT{sep}REGION`,
    and neither port nor region can hold the separator, so NAME is what precedes them."""
    b = cfg.haproxy.backend
    named = {backend_name(k, b): k.name for k in groups}
    cut = len(b.name_prefix) + len(b.name_separator)
    return {n: service_haproxy(cfg, named.get(n) or n[cut:].rsplit(b.name_separator, 2)[0]) for n
            in names}


def _beyond_max(desired: dict[str, list[Member]], state: State,
                settings: Mapping[str, HAProxyConfig]) -> list[Skip]:
    """Past haproxy.server_slots.max a backend takes no more instances: those that hold a
    slot keep it, the rest (by id) become skips. Trims `desired` in place."""
    skips = []
    for name, members in desired.items():
        cfg = settings[name].server_slots
        if len(members) > cfg.max:
            held = state.assignments.get(name, {})
            ordered = sorted(members, key=lambda mb: (mb.instance not in held, mb.waits,
                                                      mb.instance))
            desired[name] = ordered[:cfg.max]
            skips += [Skip(mb.label,
                           f"backend {name} is full (haproxy.server_slots.max = {cfg.max})",
                           mb.instance, "server_slots.max") for mb in ordered[cfg.max:]]
    return skips


def state_after(actual: Mapping[str, BackendState], plan: Plan) -> dict[str, BackendState]:
    """What HAProxy holds once `plan` is applied to `actual`."""
    return {**actual, **{b.name: BackendState(b.name, b.fields, b.servers) for b in plan.backends}}


class Guard(typing.NamedTuple):
    """The mass-drain guard's verdict on one cycle's drains."""
    held: bool
    # cycles in a row the discovery behind them was seen (0: not tripped)
    streak: int
    since: float | None          # when it was first seen (wall clock)


def drain_held(drains: int, live: int, empty: bool, streak: int, since: float | None, now: float,
               cfg: SafetyConfig) -> Guard:
    """Whether this cycle's drains must wait. A drain of more than one server and more than
    max_drain_percent of all live servers, or any drain of an empty discovery (everything to
    nothing between two polls is possible, but almost never true), waits until the same
    discovery has been seen drain_confirm_cycles times in a row and drain_confirm_seconds
    have passed since it was first seen, whichever is longer (`streak` counts the earlier
    sightings, `since` is the first)."""
    if not (empty and drains) and (drains <= 1 or drains * 100 <= cfg.max_drain_percent * live):
        return Guard(False, 0, None)
    since = now if since is None else since
    return Guard(streak + 1 < cfg.drain_confirm_cycles or now - since < cfg.drain_confirm_seconds,
                 streak + 1, since)


def _held_members(names: Sequence[str], actual: BackendState | None,
                  previous: Mapping[str, str]) -> list[Member]:
    """Members that keep these live servers as HAProxy holds them (weight included), owned
    by the instance that held each slot, so that instance keeps it if it comes back."""
    owner = {slot: inst for inst, slot in previous.items()}
    have = actual.servers if actual else {}
    return [Member(owner.get(n, f"held:{n}"), "held", have[n].get("address", PARK_ADDRESS),
                   have[n].get("port") or PARK_PORT, w if _weight_value(w := have[n].get("weight"))
                   else None)
            for n in names]


# === Views ===
def utc(seconds: float) -> str:
    """A wall-clock time as people read it in logs: RFC 3339, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def endpoint(address: Any, port: Any) -> str:
    """address:port as people read it: an IPv6 address in brackets ([fd00::4]:8080)."""
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


def format_plan(plan: Plan) -> str:
    """The plan as stable text: what --dry-run prints and the tests compare."""
    lines = []
    for b in plan.backends:
        head = "create, " if b.create else ""
        lines.append(f"backend {b.name} ({head}{b.slots} slots, {b.live} live)")
        if b.fields_changed:
            lines.append("  ~ backend settings")
        if b.create:
            lines += [f"  + {n} {_endpoint(s)}" for n, s in b.servers.items()]
            continue
        for c in b.changes:
            if c.action == "add":
                lines.append(f"  + {c.name} {_endpoint(c.body)}{_label(c)}")
            elif c.action == "delete":
                lines.append(f"  - {c.name} {_endpoint(c.before)}")
            else:
                lines.append(
                    f"  ~ {c.name} {_endpoint(c.before)} -> {_endpoint(c.body)}{_label(c)}")
    for h in plan.held:
        lines.append(f"held: {h} stays live (mass-drain guard)")
    for d in plan.draining:
        where = endpoint(d.address, d.port)
        lines.append(f"draining: {d.backend}/{d.server} {where} since {utc(d.since)}, "
                     f"parked by {utc(d.until)}")
    for r in plan.ready:
        lines.append(f"ready: {r} (its instance is back)")
    for s in plan.skipped:
        lines.append(f"skipped: {s.instance}: {s.reason}")
    lines.append(f"{plan.services} services, {plan.live} live servers, "
                 f"{len(plan.backends)} backends to change" if plan.backends
                 else f"{plan.services} services, {plan.live} live servers, no changes")
    return "\n".join(lines) + "\n"


@collector_paused()
def status_view(seen: "Seen", actual: Mapping[str, BackendState], decision: Decision, cfg: Config,
                target: str, now: float = 0.0,
                draining: Mapping[str, Mapping[str, Drain]] | None = None) -> dict[str, Any]:
    """Discovery and one target's backends side by side: per backend its slots, with the
    instance in each live slot, each draining slot's start and seconds left (at `now`;
    `draining`: the drains under way), and what the plan would change marked as drift
    (a drain it would start among them). Plain data, the same for --status, --status
    --json and the metrics listener's /state."""
    draining = draining or {}
    planned = {b.name: b for b in decision.plan.backends}
    held = dict.fromkeys(decision.plan.held, decision.drain_since)
    # The instance serving a slot is the one discovered at the address HAProxy holds.
    members = {backend_name(k, cfg.haproxy.backend): {(m.address, m.port): m for m in ms} for k, ms
               in seen.groups.items()}
    backends = [_backend_view(name, actual.get(name), planned.get(name), members.get(name, {}),
                              _Drains(held, draining.get(name, {}), decision.draining.get(name, {}),
                                      now))
                for name in sorted(set(actual) | set(planned))]
    entry = {"target": target, "ok": True, "backends": backends,
             "drift": sum(b["drift"] for b in backends)}
    if held:
        entry["held"] = {"servers": len(held), "since": utc(decision.drain_since)
                         if decision.drain_since is not None else None}
    return {"discovery": discovery_view(seen.groups, seen.skipped, cfg), "targets": [entry]}


def discovery_view(groups: Mapping[ServiceKey, list[Member]], skipped: Sequence[Skip],
                   cfg: Config) -> dict[str, Any]:
    """The discovery half of status_view: the same for every target."""
    return {
        "instances": sum(map(len, groups.values())),
        "services": [{"service": k.name, "port": k.port, "region": k.region,
                      "backend": backend_name(k, cfg.haproxy.backend), "instances": len(ms)}
                     for k, ms in sorted(groups.items())],
        "skipped": [{"instance": s.instance, "reason": s.reason} for s in skipped],
    }


def combined_view(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The status views of several targets (each what it holds, or why it could not be
    read) as one: the discovery they share, then every target in order."""
    return {"discovery": views[0]["discovery"], "targets": [t for v in views for t in v["targets"]]}


class _Drains(typing.NamedTuple):
    """The drains one backend's view shows: the servers the guard holds live (all backends',
    "backend/server" -> since), those draining (server -> Drain), those the plan would start
    draining, and the time their seconds left are counted from."""
    held: Mapping[str, float | None]
    draining: Mapping[str, Drain]
    to_drain: Mapping[str, Drain]
    now: float


def _backend_view(name: str, actual: BackendState | None, plan: BackendPlan | None,
                  members: Mapping[tuple[str, int], Member], drains: _Drains) -> dict[str, Any]:
    held, draining, to_drain, now = drains
    have = actual.servers if actual else {}
    changes = {c.name: c for c in plan.changes} if plan else {}
    slots = []
    for sname in sorted({n for n in [*have, *(plan.servers if plan else {})] if slot_index(n)},
                        key=slot_index):
        server = have.get(sname)
        state = "missing" if server is None else "live" if _is_live(server) else "parked"
        entry: dict[str, Any] = {"slot": sname, "state": state}
        if state == "live" and (d := draining.get(sname)):
            # NaN: under way in HAProxy, begun by another process
            known = not math.isnan(d.since)
            entry.update(state="draining", since=utc(d.since) if known else None,
                         seconds_left=max(0, math.ceil(d.until - now)) if known else None)
        if entry["state"] in ("live", "draining"):
            entry["address"] = _endpoint(server)
            m = members.get((server.get("address"), server.get("port")))
            entry["instance"] = m.label if m else None        # None: no discovered instance there
        if f"{name}/{sname}" in held:
            since = held[f"{name}/{sname}"]
            entry["drift"] = "held live by the mass-drain guard" + (f" since {utc(since)}" if since
                                                                    is not None else "")
        elif sname in to_drain and sname not in draining:
            entry["drift"] = "want draining (its instance left), then parked"
        elif (c := changes.get(sname)) or (plan and plan.create):
            entry["drift"] = _drift(c, plan.servers.get(sname) if plan else None)
        slots.append(entry)
    return {"backend": name, "slots": len([s for s in slots if s["state"] != "missing"]),
            "live": sum(s["state"] == "live" for s in slots),
            "parked": sum(s["state"] == "parked" for s in slots),
            "draining": sum(s["state"] == "draining" for s in slots),
            "drift": sum("drift" in s for s in slots)
            + bool(plan and (plan.create or plan.fields_changed)),
            "settings_drift": bool(plan and plan.fields_changed), "missing": actual is None,
            "servers": slots}


def _drift(change: ServerChange | None, want: Mapping[str, Any] | None) -> str:
    if change is not None and change.action == "delete":
        return "to remove (beyond the slot count)"
    want = change.body if change is not None else want
    if change is not None and change.action == "update" and _endpoint(want) == _endpoint(
            change.before):
        differ = sorted(k for k in want if not _same_value(want[k], change.before.get(k)))
        return f"settings differ ({', '.join(differ)})"
    return f"want {_endpoint(want)}" + (f" ({change.label})" if change is not None
                                        and _label(change) else "")


def format_status(view: Mapping[str, Any]) -> str:
    """--status as text: discovery first, then per target and backend one line per slot,
    a `!` before each slot (or backend) that differs from the desired state."""
    d = view["discovery"]
    lines = [
        f"discovery: {len(d['services'])} services, {d['instances']} instances, "
        f"{len(d['skipped'])} skipped"]
    lines += [f"  {s['backend']}: {s['instances']} instances" for s in d["services"]]
    lines += [f"  skipped: {s['instance']}: {s['reason']}" for s in d["skipped"]]
    for t in view["targets"]:
        if not t["ok"]:
            lines.append(f"target {t['target']}: unreachable: {t['error']}")
            if t.get("behind"):
                lines.append(f" !{t['behind']}")
            continue
        lines.append(f"target {t['target']}: {len(t['backends'])} backends, "
                     + (f"{t['drift']} differences from the desired state" if t["drift"]
                        else "in sync"))
        if t.get("behind"):
            lines.append(f" !{t['behind']}")
        if t.get("held"):
            lines.append(f" !the mass-drain guard holds {t['held']['servers']} servers live"
                         + (f" since {t['held']['since']}" if t["held"]["since"] else ""))
        for b in t["backends"]:
            mark = "!" if b["missing"] or b["settings_drift"] else " "
            what = "missing" if b[
                "missing"] else f"{b['slots']} slots, {b['live']} live, {b['parked']} parked" + (
                f", {b['draining']} draining" if b["draining"] else "")
            lines.append(f" {mark}backend {b['backend']}: {what}"
                         + (" (settings differ)" if b["settings_drift"] else ""))
            for s in b["servers"]:
                where = s.get("address", "")
                who = (s["instance"] or "(no discovered instance)") if s["state"] == "live" else (
                    (f"since {s['since']}, {s['seconds_left']} s left" if s["since"]
                     else "under way")
                    if s["state"] == "draining" else "")
                mark = "!" if "drift" in s else " "
                row = f"  {mark} {s['slot']:<8} {s['state']:<8} {where:<22} {who}".rstrip()
                lines.append(row + (f"  <- {s['drift']}" if "drift" in s else ""))
    return "\n".join(lines) + "\n"


def _endpoint(server: Mapping[str, Any] | None) -> str:
    if server is None:
        return "?"
    if server.get("maintenance") == "enabled":
        return "parked"
    return endpoint(server.get("address"), server.get("port"))


def _label(change: ServerChange) -> str:
    return f" ({change.label})" if change.label and change.body and _is_live(change.body) else ""


# === Azure transport ===
def _azure_sdk() -> tuple[Any, Any, Any, Any]:
    """Import the Azure SDK on first use; DependencyError (exit 69) if absent."""
    try:
        import azure.core.exceptions
        import azure.identity
        from azure.core.rest import HttpRequest
        from azure.mgmt.compute import ComputeManagementClient
    except ImportError as exc:
        raise DependencyError(
            f"Azure SDK not importable ({exc}); install azure-identity and azure-mgmt-compute "
            "into the interpreter that runs this program "
            "(or use the haproxy-azure-discovery.pyz, which carries them)") from exc
    return azure.identity, ComputeManagementClient, azure.core.exceptions, HttpRequest


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, lower-cased, the default port spelt out."""
    u = urllib.parse.urlsplit(url)
    try:
        port = u.port or {"https": 443, "http": 80}.get(u.scheme.lower())
    except ValueError:
        port = -1
    return u.scheme.lower(), (u.hostname or "").lower(), port


def _json_kind(value: Any) -> str:
    kinds = {str: "a string", list: "a list", bool: "a boolean", dict: "an object"}
    return "null" if value is None else kinds.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def environment_settings(url: str) -> dict[str, Any]:
    """The proxy and CA bundle that requests would take from the environment (HTTPS_PROXY,
    NO_PROXY, REQUESTS_CA_BUNDLE...) for `url`, read once, for the listings' transport (the
    credential's own requests still read them). Every listing goes to Resource Manager's host,
    so one answer holds."""
    import requests
    found = requests.Session().merge_environment_settings(url, {}, None, None, None)
    settings: dict[str, Any] = {}
    if found["proxies"]:
        settings["proxies"] = dict(found["proxies"])
    if isinstance(found["verify"], str):
        settings["connection_verify"] = found["verify"]
    return settings


_sockets = threading.local()        # .holder: where the connection in use puts its socket


@functools.cache
def _watched_pools() -> dict[str, type]:
    """urllib3's connection pools, with connections that hand their socket over once a request
    went out on them (a new or a kept-alive one), so that a deadline can cut the answer short
    however slowly it comes. Built at first use: urllib3 comes with the Azure SDK."""
    import urllib3

    class Watched:
        def request(self, *args: Any, **kwargs: Any) -> None:
            super().request(*args, **kwargs)    # type: ignore[misc]
            holder = getattr(_sockets, "holder", None)
            if holder is not None:
                holder.append(self.sock)        # type: ignore[attr-defined]

    class WatchedHTTP(Watched, urllib3.connection.HTTPConnection):
        pass

    class WatchedHTTPS(Watched, urllib3.connection.HTTPSConnection):
        pass

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = WatchedHTTP

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPS
    return {"http": HTTPPool, "https": HTTPSPool}


def _sdk_transport_error(exc: Exception) -> Exception:
    """urllib3's errors as the exceptions azure-core's retry policy acts on, as its own
    transport maps requests'."""
    import urllib3
    from azure.core import exceptions as errors
    # before ConnectTimeoutError, its base
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return errors.ServiceRequestError(exc, error=exc)
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return errors.ServiceRequestTimeoutError(exc, error=exc)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return errors.ServiceResponseTimeoutError(exc, error=exc)
    if isinstance(exc, (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError)):
        return errors.ServiceResponseError(exc, error=exc)           # sent; the answer broke
    return errors.ServiceRequestError(exc, error=exc)                # TLS, proxy: not sent


def _cut(holder: list[Any], expired: list[bool]) -> None:
    """A request's deadline passed: cut its connection, whatever it is waiting for."""
    expired.append(True)
    for sock in holder:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _PageTransport:
    """An azure-core transport for the listings over urllib3 (requests' own connection layer)
    instead of requests: the pipeline's policies (credential, retries honouring Retry-After,
    redirects, the request hook) are unchanged above it. requests' request preparation,
    session merging and response wrapping cost more CPU than everything else in the
    pipeline (bench/RESULTS.md). A page is read whole (gzip, as requests asks for it) within
    the read timeout; errors map to the exceptions azure-core's retry policy acts on.
    `settings` are environment_settings': proxy and CA bundle. The credential keeps
    azure-core's own transport."""

    def __init__(self, settings: Mapping[str, Any], workers: int, connect: float, read: float):
        import urllib3
        self._proxy = (settings.get("proxies") or {}).get("https")
        if self._proxy and urllib3.util.parse_url(self._proxy).scheme not in ("http", "https"):
            raise AzureError(
                f"proxy {urllib3.util.parse_url(self._proxy).scheme}:// (HTTPS_PROXY or "
                "ALL_PROXY) is not supported for Resource Manager: use an http:// or "
                "https:// proxy")
        ca = settings.get("connection_verify") or _default_ca_bundle()
        self._where = {"ca_cert_dir" if os.path.isdir(ca) else "ca_certs": ca, "maxsize": workers}
        self._connect, self._read = connect, read
        self.pool: Any = None
        self._lock = threading.Lock()       # the listing threads' first pages arrive together

    def open(self) -> None:
        import urllib3
        with self._lock:
            if self.pool is None and self._proxy:
                # user:password in the proxy's URL
                auth = urllib3.util.parse_url(self._proxy).auth
                headers = urllib3.make_headers(proxy_basic_auth=urllib.parse.unquote(
                    auth)) if auth else None
                self.pool = urllib3.ProxyManager(self._proxy, proxy_headers=headers, **self._where)
            elif self.pool is None:
                self.pool = urllib3.PoolManager(**self._where)
            self.pool.pool_classes_by_scheme = _watched_pools()

    def close(self) -> None:
        with self._lock:
            if self.pool is not None:
                self.pool.clear()
                self.pool = None

    def __enter__(self) -> "_PageTransport":
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, request: Any, **options: Any) -> "_Page":
        """One request, its answer read whole before the read timeout runs out: a page
        trickled a byte at a time would pass every read's timeout and never end."""
        import urllib3
        from azure.core.exceptions import ServiceResponseTimeoutError
        if (pool := self.pool) is None:
            self.open()
            pool = self.pool
        read = options.get("read_timeout", self._read)
        timeout = urllib3.Timeout(connect=options.get("connection_timeout", self._connect),
                                  read=read)
        body = request.content.encode() if isinstance(request.content, str) else request.content
        holder, expired = [], []
        _sockets.holder = holder
        deadline = threading.Timer(read, _cut, (holder, expired))
        deadline.daemon = True
        deadline.start()
        late = f"no whole answer within {read:g} s (azure.timeout)"
        try:
            raw = pool.urlopen(request.method, request.url, body=body, retries=False,
                               headers={"Accept-Encoding": "gzip, deflate", **request.headers},
                               redirect=False, timeout=timeout, preload_content=True,
                               enforce_content_length=True)
        except urllib3.exceptions.HTTPError as exc:
            if expired:
                raise ServiceResponseTimeoutError(late, error=exc) from exc
            raise _sdk_transport_error(exc) from exc
        finally:
            deadline.cancel()
            _sockets.holder = None
        if expired:
            raise ServiceResponseTimeoutError(late)
        return _Page(request, raw.status, raw.reason or "", raw.headers, raw.data)


def _default_ca_bundle() -> str:
    """requests' CA bundle (certifi's), which the listings used before they had a transport of
    their own."""
    from requests.utils import DEFAULT_CA_BUNDLE_PATH
    return DEFAULT_CA_BUNDLE_PATH


@dataclass
class _Page:
    """A listing's response, read whole: what the pipeline's policies and AzureSource._send read of
    an azure.core.rest.HttpResponse."""
    request: Any
    status_code: int
    reason: str
    headers: Mapping[str, str]          # urllib3's: case-insensitive
    content: bytes
    is_closed: bool = True
    is_stream_consumed: bool = True

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def url(self) -> str:
        return self.request.url

    def body(self) -> bytes:
        return self.content

    read = body

    def text(self, encoding: str | None = None) -> str:
        return self.content.decode(encoding or "utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def iter_bytes(self, **_options: Any) -> Iterator[bytes]:
        yield self.content

    iter_raw = iter_bytes

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            from azure.core.exceptions import HttpResponseError
            raise HttpResponseError(response=self)

    def close(self) -> None:
        pass


_worker = threading.local()      # .pool: the _Pool a listing thread works for


class _Pool:
    """A bounded pool of daemon threads for one discovery's listings. Unlike
    ThreadPoolExecutor's workers, which the interpreter joins at exit, a request still in
    flight when shutdown is requested cannot hold the process past systemd's stop timeout;
    once closed (or failed), its threads give up at their next page."""

    def __init__(self, workers: int, name: str = "azure"):
        self.closed = False
        self.failed: BaseException | None = None    # the first listing's failure
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: list[concurrent.futures.Future] = []
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
                         for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._futures.append(future)
        self._jobs.put((future, fn, args))
        return future

    def listing(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """submit `fn`, whose failure (other than a shutdown) is recorded first as the pool's,
        so that its sibling listings stop at their next page."""
        return self.submit(self._failing_first, fn, *args)

    def _failing_first(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Aborted:
            raise
        except BaseException as exc:
            with self._lock:
                self.failed = self.failed or exc
            raise

    def wait(self, jobs: Sequence[concurrent.futures.Future], stop: StopFlag) -> None:
        """Wait for `jobs` in short slices, so that a shutdown (Aborted) or a failed listing
        (its error) ends the wait at once rather than after every remaining page."""
        while True:
            if self.failed is not None:
                raise self.failed
            if stop.is_set():
                raise Aborted("shutdown requested: Azure listing abandoned")
            pending = [job for job in jobs if not job.done()]
            if not pending:
                return
            concurrent.futures.wait(pending, timeout=WAIT_SLICE,
                                    return_when=concurrent.futures.FIRST_EXCEPTION)

    @staticmethod
    def abandoned() -> bool:
        """In a listing thread: whether the discovery it works for is over (closed) or failed."""
        pool = getattr(_worker, "pool", None)
        return pool is not None and (pool.closed or pool.failed is not None)

    def _work(self) -> None:
        _worker.pool = self
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def close(self) -> None:
        """Cancel the jobs not started; the threads finish their request, then exit."""
        self.closed = True
        for future in self._futures:
            future.cancel()
        for _ in self._threads:
            self._jobs.put(None)


class _SharedToken:
    """The credential, behind a lock and a cache shared by every listing thread: the SDK's
    bearer-token policy is per client and unlocked, so concurrent first requests would each
    fetch a token. Refreshes 5 minutes before expiry, as azure-core's policy does."""

    def __init__(self, credential: Any):
        self.credential = credential
        self._lock = threading.Lock()
        self._tokens: dict[tuple, Any] = {}

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        if kwargs.get("claims"):            # a claims challenge wants a fresh token
            return self.credential.get_token(*scopes, **kwargs)
        key = (scopes, tuple(sorted(kwargs.items())))
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.expires_on - time.time() < 300:
                token = self._tokens[key] = self.credential.get_token(*scopes, **kwargs)
            return token

    def close(self) -> None:
        close = getattr(self.credential, "close", None)
        if close is not None:
            close()


def _retry_policy(cfg: AzureConfig, check: Callable[[], None], progress: Callable[[], None],
                  stop: Flag) -> Any:
    """azure-core's RetryPolicy, with every wait (a 429's Retry-After included) capped at
    azure.timeout and cut short by `check` (shutdown, a failed sibling); the watchdog hears
    from every second of it. Uncapped, one Retry-After could outlast systemd's watchdog; with
    the cap one page takes at most (2 x retries + 1) x azure.timeout. POST is retried too: the
    program's only POST is a Resource Graph query, which reads (azure-core retries a POST only
    on 500/503/504 or with Retry-After: a 408, a 429 without it, a 502 or a timeout would fail
    the cycle)."""
    from azure.core.pipeline.policies import RetryPolicy

    class CappedRetry(RetryPolicy):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._method_whitelist = frozenset({*self._method_whitelist, "POST"})

        def sleep(self, settings: dict, transport: Any, response: Any = None) -> None:
            after = self.get_retry_after(response) if response else None
            deadline = time.monotonic() + min(after or self.get_backoff_time(settings), cfg.timeout)
            while (left := deadline - time.monotonic()) > 0:
                check()
                progress()
                stop.wait(min(left, 1.0))
            check()

    return CappedRetry(retry_total=cfg.retries)


def _listing_policies(credential: Any, scope: str, retry: Any,
                      hook: Callable[[Any], None]) -> list[Any]:
    """The management client's pipeline (azure-mgmt-compute's ComputeManagementClient) without the
    policies that do nothing for a listing: content decoding (_PageTransport reads a page whole),
    resource-provider registration (acts on writes' 409 only), network trace, distributed tracing
    and HTTP logging (the SDK's loggers stay at WARNING, and INFO is where they speak), and the
    proxy policy (the transport has the proxy). Each costs CPU on every page (bench/RESULTS.md
    has what they cost together)."""
    from azure.core.pipeline import policies
    from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy
    # The same order as the client's own list; the user agent names this program before the SDK.
    return [policies.RequestIdPolicy(),
            policies.UserAgentPolicy(user_agent=f"haproxy-azure-discovery/{__version__}"),
            retry, ARMChallengeAuthenticationPolicy(credential, scope),
            policies.CustomHookPolicy(raw_request_hook=hook),
            policies.SensitiveHeaderCleanupPolicy()]


def _arm_error(response: Any, secrets: Iterable[str] = ()) -> str:
    """The code and message of a Resource Manager error body, masked and bounded."""
    try:
        error = response.json().get("error") or {}
        text = f"{error.get('code', '')}: {error.get('message', '')}"
    except (ValueError, AttributeError):
        text = response.text()[:MAX_ERROR_BODY]
    return shorten(text, 300, secrets)


def _sdk_message(exc: Exception, secrets: Iterable[str] = ()) -> str:
    status = getattr(exc, "status_code", None)
    text = shorten(str(getattr(exc, "message", None) or exc), 300, secrets)
    return (f"HTTP {status}: " if status else "") + f"{type(exc).__name__}: {text}"


class _ArmPager:
    """Resource Manager's transport for the listings: one SDK client and its pipeline
    (credential, retries honouring Retry-After, timeouts) over _PageTransport; a request
    sent and its page read whole and decoded once; pages followed on the same origin only,
    never the same link twice, at most azure.max_pages; Resource Graph's window waited
    for; Azure's read buckets read from every answer. Counts requests. `check` runs between
    pages and retries (it raises to stop the listing); `progress` after every page."""

    def __init__(self, cfg: Config, env: Mapping[str, str], stop: StopFlag,
                 check: Callable[[], None], progress: Callable[[], None]):
        self._identity, self._compute, self._errors, self._request = _azure_sdk()
        self.cfg, self._env, self._stop = cfg, env, stop
        self.check, self._progress = check, progress
        self._secrets = secret_values(env)      # masked before any answer is cut short
        self._lock = threading.Lock()
        self.requests = 0
        self.left: dict[str, int] = {}          # each read bucket: the least left, this cycle
        self.used: dict[str, int] = {}          # ... and the answers that reported it
        self._stretched = ""                    # the bucket the polling interval is stretched for
        self.base = (cfg.azure.resource_manager_url
                     or CLOUDS[cfg.azure.cloud or "public"][0]).rstrip("/")
        self._client: Any = None
        self._credential: Any = None
        self.scope = ""

    def power_state(self, instance_id: str, name: str) -> str | None:
        """GET {vm}/instanceView (VirtualMachines_InstanceView): the VM's power state; None when
        the VM is gone (404)."""
        self.check()
        url = (f"{self.base}{urllib.parse.quote(instance_id)}/instanceView"
               f"?api-version={COMPUTE_API}")
        try:
            view, _ = self.send(self.request("GET", url), f"instance view of {name}")
        except AzureError as exc:
            if exc.status == 404:
                return None
            raise
        self._progress()
        return power_state(view)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """An SDK HttpRequest for `url` (sent by send)."""
        return self._request(method, url, **kwargs)

    def new_cycle(self) -> None:
        self.left, self.used = {}, {}

    def stretch(self) -> float:
        """The wait Azure's buckets ask for before the next cycle, said once when it begins and
        once when it ends."""
        interval = self.cfg.polling.interval_seconds
        left, used = self.left, self.used
        wait, bucket = quota_wait_seconds(left, used, interval)
        if bucket and not self._stretched:
            log.warning(
                "Azure's read bucket %s has %d requests left and a cycle takes %d: the next cycles "
                "wait "
                "%.0f s (polling.interval_seconds is %g) until it refills", bucket, left[bucket],
                used[bucket], wait, interval,
                extra={"event": "azure_quota_stretch", "bucket": bucket})
        elif self._stretched and not bucket:
            log.info("Azure's read buckets refilled: polling every %g s again", interval,
                     extra={"event": "azure_quota_normal", "bucket": self._stretched})
        self._stretched = bucket
        return wait

    def credential_only(self) -> None:
        """Before the cloud's endpoints are known (read at the first discovery): a credential
        without its environment fails now, not then."""
        _credential(self.cfg.azure, self._identity, CLOUDS["public"][1], self._env)

    def connect(self, endpoints: tuple[str, str]) -> None:
        audience, login = endpoints
        azure = self.cfg.azure
        self.scope = audience.rstrip("/") + "/.default"
        self._credential = _SharedToken(_credential(azure, self._identity, login, self._env))
        # One client carries the pipeline for every listing: all of them go to Resource
        # Manager, with its endpoint, token scope and read quota.
        retry = _retry_policy(azure, self.check, self._progress, self._stop)
        policies = _listing_policies(self._credential, self.scope, retry, self._count)
        transport = _PageTransport(environment_settings(self.base), azure.workers,
                                    connect=min(10.0, azure.timeout), read=azure.timeout)
        self._client = self._compute(
            self._credential, azure.subscriptions[0], base_url=self.base,
            credential_scopes=[self.scope],
            policies=policies, transport=transport)

    def cloud_metadata(self) -> Any:
        """GET {resource_manager_url}/metadata/endpoints (unauthenticated) for a custom cloud's
        token
        audience and login endpoint; read once, on the first discovery."""
        from azure.core import PipelineClient
        try:
            with PipelineClient(self.base) as client:
                for version in CLOUD_METADATA_APIS:
                    url = f"{self.base}/metadata/endpoints?api-version={version}"
                    response = client.send_request(self._request("GET", url),
                                                   connection_timeout=min(
                        10.0, self.cfg.azure.timeout), read_timeout=self.cfg.azure.timeout)
                    if response.status_code not in (400, 404):    # an api-version it does not serve
                        break
                document = response.json() if response.status_code == 200 else None
        except self._errors.AzureError as exc:
            raise AzureError(
                f"cloud metadata from {url}: {_sdk_message(exc, self._secrets)}") from None
        except ValueError as exc:
            raise AzureError(f"cloud metadata from {url}: not JSON ({str(exc)[:100]})") from None
        if document is None:
            raise AzureError(f"cloud metadata from {url}: HTTP {response.status_code}")
        return document

    def _count(self, _request: Any) -> None:
        with self._lock:
            self.requests += 1

    def close(self) -> None:
        """Close the client's connections and the credential's (a reload replaces both)."""
        if self._client is not None:
            self._client.close()
            self._credential.close()

    def token(self) -> None:
        try:
            self._credential.get_token(self.scope)
        except self._errors.AzureError as exc:
            raise AzureError(
                f"getting a token for {self.scope} failed: "
                f"{_sdk_message(exc, self._secrets)}") from None

    def _observe(self, headers: Mapping[str, str]) -> None:
        """An answer's read buckets (quota_headers), kept for this cycle's stretch and gauges."""
        found = quota_headers(headers)
        if found:
            with self._lock:
                for bucket, left in found.items():
                    self.left[bucket] = min(left, self.left.get(bucket, left))
                    self.used[bucket] = self.used.get(bucket, 0) + 1

    def fresh_link(self, what: str, link: Any, seen: set[str], kind: str) -> str:
        """A listing's next link (or Resource Graph's $skipToken) as it may be followed: a
        string, seen nowhere before in this listing (else the listing would never end), and,
        for a link, at the configured endpoint's own scheme, host and port (the bearer token
        goes along: it never leaves for another origin)."""
        if not isinstance(link, str):
            raise AzureError(f"{what} failed: malformed page ({kind} is not a string)")
        shown = shorten(link, 200, self._secrets)
        if kind == "nextLink" and _origin(link) != _origin(self.base):
            raise AzureError(
                f"{what} failed: nextLink {shown} leads away from {self.base}: not followed")
        if link in seen:
            raise AzureError(
                f"{what} failed: {kind} {shown} came twice: the listing would never end")
        seen.add(link)
        return link

    def paged(self, what: str, next_request: Callable[[Mapping | None], Any], key: str,
              each: Callable[[Mapping], None] | None = None) -> list[Mapping]:
        """The page loop of every listing and query: `next_request(previous page)` builds the
        next request (None: done); each page's `key` must be a list of objects, returned all
        together; or each page goes to `each` as it comes, which reads it and checks what it
        reads. AzureError if any page fails, or past azure.max_pages; Aborted between pages on
        shutdown; `progress` after every page."""
        items: list[Mapping] = []
        page: Mapping | None = None
        pages = 0
        while (request := next_request(page)) is not None:
            self.check()
            if (pages := pages + 1) > self.cfg.azure.max_pages:
                raise AzureError(
                    f"{what} failed: more than azure.max_pages ({self.cfg.azure.max_pages}) pages")
            page, headers = self.send(request, what)
            if each is not None:
                each(page)
            else:
                found = page.get(key)
                if not isinstance(found, list):
                    # A 200 without the list would read as an empty estate and park everything.
                    raise AzureError(f'{what} failed: malformed page (no "{key}" list)')
                for n, item in enumerate(found, 1):
                    if not isinstance(item, dict):
                        raise AzureError(f"{what} failed: malformed page {pages} (item {n} is "
                                         f"{_json_kind(item)}, not an object)")
                items += found
            self._progress()
            pause = quota_wait(headers)
            # Resource Graph's per-user window is spent: wait for its reset
            if pause is not None:
                self.pause(pause)
        return items

    def pause(self, seconds: float) -> None:
        """Wait for Resource Graph's per-user window to reset (at most 60 s: quota_wait), in
        short slices: a shutdown ends the wait; the watchdog hears from every slice."""
        deadline, heard = time.monotonic() + seconds, -math.inf
        while (left := deadline - time.monotonic()) > 0:
            self.check()
            if time.monotonic() - heard >= 1:
                self._progress()
                heard = time.monotonic()
            time.sleep(min(left, WAIT_SLICE))
        self.check()

    def send(self, request: Any, what: str) -> tuple[Mapping, Mapping[str, str]]:
        """One request through the SDK pipeline (credential, retries, timeouts): its JSON object
        and headers. A 429 that outlives the SDK's retries is tried once more after Resource
        Graph's window resets, when the answer says when that is."""
        try:
            response = self.fetch(request)
            self._observe(response.headers)
            if response.status_code == 429 and (pause := quota_wait(response.headers)) is not None:
                self.pause(pause)
                response = self.fetch(request)
            if 300 <= response.status_code < 400:
                location = shorten(str(response.headers.get("Location") or "(none)"), 200,
                                   self._secrets)
                raise AzureError(
                    f"{what} failed: HTTP {response.status_code} redirect to {location} not "
                    "followed (Resource Manager answers its list calls itself)",
                    response.status_code)
            # json.loads on the bytes: the SDK's json() decodes to text first.
            page = json.loads(response.body()) if response.status_code == 200 else None
        except self._errors.AzureError as exc:
            raise AzureError(f"{what} failed: {_sdk_message(exc, self._secrets)}",
                             getattr(exc, "status_code", None)) from None
        except ValueError as exc:
            raise AzureError(f"{what} failed: malformed page ({str(exc)[:100]})") from None
        if page is None:
            raise AzureError(
                f"{what} failed: HTTP {response.status_code} {_arm_error(response, self._secrets)}",
                response.status_code)
        if not isinstance(page, dict):
            raise AzureError(f"{what} failed: malformed page (not a JSON object)")
        return page, response.headers

    def fetch(self, request: Any) -> Any:
        """The response with its body read: _PageTransport reads a page whole, and no policy of
        the listings' pipeline decodes it (_send decodes its JSON once)."""
        response = self._client.send_request(request, stream=True)
        response.read()
        return response


def _credential(cfg: AzureConfig, identity: Any, authority: str,
                env: Mapping[str, str]) -> TokenCredential:
    """The credential of azure.credential_type, for the cloud's login authority."""
    client_id = cfg.managed_identity_client_id or None
    kind = cfg.credential_type
    # MSAL checks an authority it does not know with login.microsoftonline.com, which an Azure
    # Stack Hub or air-gapped cloud cannot reach: its own metadata named it.
    known = authority in {login for _, login in CLOUDS.values()}
    try:
        if kind == "managed_identity":
            return identity.ManagedIdentityCredential(client_id=client_id)
        if kind == "workload_identity":
            return identity.WorkloadIdentityCredential(authority=authority)
        if kind == "azure_cli":
            return identity.AzureCliCredential()
        if kind == "client_secret":
            names = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET")
            missing = [n for n in names if not env.get(n)]
            if missing:
                raise ConfigError([
                    f"azure.credential_type: client_secret needs {', '.join(missing)} "
                    "in the environment"])
            return identity.ClientSecretCredential(*(env[n] for n in names), authority=authority,
                                                   disable_instance_discovery=not known)
        # DefaultAzureCredential hands the authority (and the switch) to the credentials it tries:
        # client-secret variables in a private cloud log in at that cloud's endpoint.
        return identity.DefaultAzureCredential(authority=authority,
                                               managed_identity_client_id=client_id,
                                               disable_instance_discovery=not known)
    except ValueError as exc:  # e.g. workload identity without its environment variables
        raise ConfigError([f"azure.credential_type: {kind}: {exc}"]) from None


# === Azure: what the listings mean ===
@dataclass
class AzureListing:
    """Everything the listings (azure.source "arm") gave, as Resource Manager JSON (REST shapes);
    inventory_of reads it into an Inventory."""
    vms: list[Mapping] = field(default_factory=list)          # standalone and Flexible members
    statuses: list[Mapping] = field(default_factory=list)     # VMs with an instance view
    nics: list[Mapping] = field(default_factory=list)         # every NIC, Uniform sets' included
    public_ips: list[Mapping] = field(default_factory=list)
    scale_sets: list[Mapping] = field(default_factory=list)
    set_instances: list[Mapping] = field(default_factory=list)  # Uniform scale-set instances


# What the join reads of each VM, NIC and IP configuration, whichever source listed it: the
# listings' REST items (inventory_of) and Resource Graph's rows (GraphListing) are read into these
# records once, and the join's rules are stated once, over them. Fields are as Azure gave them
# (the join checks them) unless a comment says otherwise. Records, not the REST objects: at the
# largest estates the join holds two hundred thousand of them, and a tuple is a fraction of the
# nested objects' memory and of their cost to build and read.
class ListedVm(typing.NamedTuple):
    """A VM or a scale-set instance."""
    id: Any
    name: Any
    location: Any
    tags: Any
    scale_set: Any              # a Flexible member's scale set id (a Uniform one's is in its id)
    instance_id: Any            # a Uniform instance's number
    power: str | None           # power_state of its instance view; None without one
    health: str | None          # vm_health of its instance view
    has_nics: bool              # it references network interfaces (impossible's check)


class ListedNic(typing.NamedTuple):
    id: Any
    vm: Any                     # its VM's id
    primary: Any
    configs: list["IpConfiguration"]


class IpConfiguration(typing.NamedTuple):
    primary: Any
    private: Any                # privateIPAddress
    version: Any                # privateIPAddressVersion
    public: str                 # its public IP's lower-cased id; "" without one


@dataclass
class Inventory:
    """Everything one discovery listed, as the join reads it (ListedVm, ListedNic); scale sets as
    Resource Manager JSON, public IPs as (id, address) pairs; the status-only list's power states
    by lower-cased id."""
    vms: list[ListedVm] = field(default_factory=list)
    set_instances: list[ListedVm] = field(default_factory=list)
    nics: list[ListedNic] = field(default_factory=list)
    public_ips: list[tuple[Any, Any]] = field(default_factory=list)
    scale_sets: list[Mapping] = field(default_factory=list)
    powers: dict[str, str] = field(default_factory=dict)


def _id(value: Any) -> str:
    return value.lower() if isinstance(value, str) else ""


def _props(raw: Mapping) -> Mapping:
    return raw.get("properties") or {}


def power_state(view: Mapping | None) -> str | None:
    """'running', 'stopped', 'deallocated', ... from an instance view; None without one.
    An instance being deleted is "deleting" whatever its power state (Azure says so in
    the provisioning state: its server must drain now, not once it is gone)."""
    found = None
    for status in (view.get("statuses") if view else None) or ():
        # JSON: dict, not Mapping (4x)
        code = status.get("code") if isinstance(status, dict) else None
        if not isinstance(code, str):
            continue
        power, deleting = _status_code(code)
        if deleting:
            return "deleting"
        if power is not None:
            found = found or power
    return found


def vm_health(view: Mapping | None) -> str | None:
    """The Application Health extension's verdict in a scale-set instance's view (vmHealth,
    status code HealthState/healthy, .../unhealthy, .../initializing, .../unknown): one of
    HEALTH_STATES, "unknown" for a code Azure does not document; None without vmHealth (no
    extension, or none reported yet)."""
    health = view.get("vmHealth") if isinstance(view, dict) else None
    status = health.get("status") if isinstance(health, dict) else None
    code = status.get("code") if isinstance(status, dict) else None
    if not isinstance(code, str):
        return None
    state = code.lower().removeprefix("healthstate/")
    return state if state in HEALTH_STATES else "unknown"


# a handful of distinct codes, forty thousand statuses a cycle
@functools.lru_cache(maxsize=256)
def _status_code(code: str) -> tuple[str | None, bool]:
    """(the power state it names, whether it says the instance is being deleted) of a status
    code."""
    if code.startswith("PowerState/"):
        return code[len("PowerState/"):].lower(), False
    return None, code.lower() == "provisioningstate/deleting"


def _primary(items: Sequence[ListedNic] | Sequence[IpConfiguration]) -> Any:
    """The one marked primary, or the only one (Azure omits `primary` for a single item)."""
    if len(items) == 1:
        return items[0]
    marked = [i for i in items if i.primary]
    return marked[0] if len(marked) == 1 else None


def nic_address(nic: ListedNic, public_ips: Mapping[str, Any], cfg: AzureConfig) -> str | None:
    """The address to serve on: the primary IP configuration for IPv4, the first IPv6
    configuration for IPv6 (Azure requires the primary one to be IPv4); `public_ips` are
    addresses by lower-cased id."""
    version = 6 if cfg.ip_version == "ipv6" else 4
    if version == 4:
        chosen = _primary(nic.configs) if nic.configs else None
    else:
        chosen = next((c for c in nic.configs if c.version == "IPv6"), None)
    if chosen is None:
        return None
    address = chosen.private if cfg.address == "private" else public_ips.get(chosen.public)
    return _valid_ip(address, version)


def _valid_ip(address: Any, version: int) -> str | None:
    if version == 4:
        # The C parser: far cheaper than ipaddress, once per instance, and as strict (dotted quad,
        # no leading zeros). It takes only the canonical dotted quad (glibc's and musl's both), so a
        # string it accepts is already what inet_ntop would write back: no round trip.
        try:
            socket.inet_pton(socket.AF_INET, address)
        except (OSError, TypeError, ValueError):
            return None
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return str(ip) if ip.version == version else None


def _scale_set_of(instance_id: str) -> str:
    """…/virtualmachinescalesets/NAME/virtualmachines/N -> …/virtualmachinescalesets/NAME."""
    return instance_id.rsplit("/virtualmachines/", 1)[0]


def _nics_by_vm(nics: Iterable[ListedNic]) -> dict[str, list[ListedNic]]:
    """NICs by the lower-cased id of their VM; a NIC listed twice (ids compared lower-cased)
    counts once, as first seen."""
    by_vm: dict[str, list[ListedNic]] = {}
    seen: set[str] = set()
    for nic in nics:
        if (nid := _id(nic.id)) not in seen:
            seen.add(nid)
            by_vm.setdefault(_id(nic.vm), []).append(nic)
    return by_vm


def _power_states(items: Iterable[Mapping]) -> dict[str, str]:
    """power_state by lower-cased id, for the items (the status-only VM list) that have one."""
    powers: dict[str, str] = {}
    for item in items:
        if state := power_state(_props(item).get("instanceView")):
            powers[_id(item.get("id"))] = state
    return powers


def inventory_of(listing: AzureListing) -> Inventory:
    """The listings' REST items as the join reads them. AttributeError or TypeError for an item
    not shaped as Azure documents it (an object that is none)."""
    return Inventory(list(map(listed_vm, listing.vms)), list(map(listed_vm, listing.set_instances)),
                     list(map(listed_nic, listing.nics)),
                     [(p.get("id"), _props(p).get("ipAddress")) for p in listing.public_ips],
                     listing.scale_sets, _power_states(listing.statuses))


def listed_vm(raw: Mapping) -> ListedVm:
    """A VM or scale-set instance of the listings."""
    props = _props(raw)
    view = props.get("instanceView")
    return ListedVm(raw.get("id"), raw.get("name"), raw.get("location"), raw.get("tags"),
                    (props.get("virtualMachineScaleSet") or {}).get("id"), raw.get("instanceId"),
                    power_state(view), vm_health(view),
                    bool((props.get("networkProfile") or {}).get("networkInterfaces")))


def listed_nic(raw: Mapping) -> ListedNic:
    """A network interface of the listings."""
    props = _props(raw)
    return ListedNic(raw.get("id"), (props.get("virtualMachine") or {}).get("id"),
                     props.get("primary"), ip_configurations(props.get("ipConfigurations")))


def ip_configurations(configs: Any) -> list[IpConfiguration]:
    """A NIC's ipConfigurations (as both sources give them: Resource Graph's rows carry the
    listings' objects). AttributeError or TypeError when they are not a list of objects."""
    if not configs:
        return []
    if not isinstance(configs, list):
        raise TypeError(f"ipConfigurations is {_json_kind(configs)}, not a list")
    read = []
    for config in configs:
        props = _props(config)
        public = props.get("publicIPAddress")
        read.append(IpConfiguration(props.get("primary"), props.get("privateIPAddress"),
                                    props.get("privateIPAddressVersion"),
                                    _id(public.get("id")) if public else ""))
    return read


def join(inventory: Inventory, cfg: AzureConfig,
         skipped: list[Skip] | None = None) -> list[Instance]:
    """Join what was listed into instances: NICs by their VM's lower-cased id, power states and
    scale sets by lower-cased id. An instance whose NIC or address is missing still comes back
    (address None); a second sighting counts once. An item whose tags are not an object cannot
    be judged: a Skip in `skipped`. AzureError for an item without an id: it could be any
    instance, and leaving it out would drain it."""
    joined = _Join(inventory, cfg)          # one pass per listing, then one lookup per instance
    joined.read(inventory.vms, False, skipped)
    joined.read(inventory.set_instances, True, skipped)
    return list(joined.instances.values())


def _not_shaped(exc: Exception) -> AzureError:
    return AzureError(f"joining the listings failed: an item is not shaped as Azure documents it "
                      f"({str(exc)[:100]})")


def _without_id(vm: ListedVm, uniform: bool) -> AzureError:
    return AzureError(
        f"the {'scale-set instance' if uniform else 'VM'} listing holds an item without "
        f"an id (name {shorten(json.dumps(vm.name), 80)}): its instance cannot "
        "be told; nothing is applied this cycle")


class _Join:
    """What was listed besides the instances, each read once and keyed by lower-cased id."""

    def __init__(self, inventory: Inventory, cfg: AzureConfig):
        self.cfg = cfg
        self.nics = _nics_by_vm(inventory.nics)
        self.public_ips = {_id(pid): address for pid, address in inventory.public_ips}
        self.powers = inventory.powers
        self.sets = {_id(s.get("id")): s for s in inventory.scale_sets}
        self.set_tags: dict[str, dict[str, str]] = {}
        self.instances: dict[str, Instance] = {}           # by lower-cased id

    def read(self, vms: Iterable[ListedVm], uniform: bool, skipped: list[Skip] | None) -> None:
        """Each listed VM or scale-set instance into `instances` (a second sighting counts
        once); one whose tags are not an object into `skipped`. A scale set's tags are its
        instances' too, theirs taking precedence."""
        for vm in vms:
            vid = _id(vm.id)
            if not vid:
                raise _without_id(vm, uniform)
            if vid in self.instances:
                continue
            tags = _tag_values(vm.tags)
            if tags is None:
                if skipped is not None:
                    skipped.append(Skip(_printable(vid.rsplit("/", 1)[-1]), "its tags are not an "
                                        "object (as Azure lists them): it cannot be told whether "
                                        "it serves", _printable(vid), "tags"))
                continue
            set_id = _scale_set_of(vid) if uniform else _id(vm.scale_set)
            if set_id:
                tags = {**self._set_tags(set_id), **tags}
            nics = self.nics.get(vid)
            nic = _primary(nics) if nics else None
            self.instances[vid] = Instance(
                vid, _instance_name(vm, vid, set_id if uniform else ""), _region(vm.location),
                tags, nic_address(nic, self.public_ips, self.cfg) if nic else None,
                vm.power or self.powers.get(vid, "unknown"),
                "uniform" if uniform else "flexible" if set_id else "vm",
                vm.health if uniform else None)

    def _set_tags(self, set_id: str) -> dict[str, str]:
        if set_id not in self.set_tags:
            self.set_tags[set_id] = _tags(self.sets.get(set_id, {})) or {}
        return self.set_tags[set_id]


def _instance_name(vm: ListedVm, vid: str, uniform_set: str) -> str:
    """A Uniform instance is SET_N, as Azure names its computer; any other its name; escaped
    for a log line."""
    if uniform_set and vm.instance_id is not None:
        return _printable(f"{uniform_set.rsplit('/', 1)[-1]}_{vm.instance_id}")
    name = vm.name
    return _printable(name if isinstance(name, str) and name else vid.rsplit("/", 1)[-1])


def _region(location: Any) -> str:
    """A location as a region name: 'East US' -> 'eastus'."""
    return (location if isinstance(location, str) else str(location or "")).replace(" ", "").lower()


def impossible(inventory: Inventory, instances: Sequence[Instance], cfg: Config,
               graph: bool = False) -> str | None:
    """Why these answers cannot describe Azure as it is, or None. A few items missing between
    two listings is the normal race (those instances are skipped); these are not: VMs that
    reference network interfaces with none listed at all, no power state for any VM, a tagged
    Uniform scale set with capacity and no instance. Applied, they would park everything."""
    referencing = sum(1 for v in inventory.vms if v.has_nics)
    if referencing and not any("/virtualmachinescalesets/" not in _id(n.vm)
                               for n in inventory.nics):
        return (f"{referencing} VMs reference network interfaces, and the network interface "
                "listing has none")
    if inventory.set_instances and not any("/virtualmachinescalesets/" in _id(n.vm)
                                           for n in inventory.nics):
        return (f"{len(inventory.set_instances)} scale-set instances are listed, and none of their "
                "network interfaces")
    vms = [i for i in instances if i.kind != "uniform"]
    if cfg.azure.running_only and vms and all(i.power_state == "unknown" for i in vms):
        return f"none of the {len(vms)} VMs listed has a power state"
    listed = {_scale_set_of(_id(i.id)) for i in inventory.set_instances}
    for s in scale_sets_to_list(inventory.scale_sets, cfg):
        sku = s.get("sku")
        capacity = sku.get("capacity") if isinstance(sku, dict) else None
        if _is_count(capacity) and capacity > 0 and _id(s.get("id")) not in listed:
            name = shorten(str(s.get("name") or s.get("id")), 100)
            if graph:
                return (f"scale set {name} has capacity {capacity}, and Resource Graph's "
                        "ComputeResources table has no instance of it (this cloud's "
                        "ComputeResources may lack Uniform scale-set instances): use "
                        'azure.source "arm" in this cloud')
            return f"scale set {name} has capacity {capacity}, and its instance listing is empty"
    return None


def _tags(raw: Mapping) -> dict[str, str] | None:
    """An item's tags as strings; {} without any; None when they are not an object."""
    return _tag_values(raw.get("tags"))


def _tag_values(tags: Any) -> dict[str, str] | None:
    """Tags as strings; {} for none; None when they are not an object."""
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    return {} if tags is None else None


def scale_sets_to_list(scale_sets: Iterable[Mapping], cfg: Config) -> list[Mapping]:
    """Uniform scale sets whose own tags can make their instances match: they carry the
    service-name tag. (Flexible members are ordinary VMs in the VM listing.)"""
    return [s for s in scale_sets
            if (_props(s).get("orchestrationMode") or "Uniform").lower() == "uniform"
            and cfg.tags.service_name_tag.lower() in folded(_tags(s) or {})]


def _resource_group(resource_id: str) -> str:
    parts = resource_id.split("/")
    return parts[parts.index("resourcegroups") + 1] if "resourcegroups" in parts else ""


# The listings: path under /subscriptions/{sub}[/resourceGroups/{rg}], provider API
# version, and extra query. The Microsoft.Compute endpoints for a scale set's NICs and public
# IPs only exist in an old network API version.
COMPUTE_API, NETWORK_API, VMSS_NETWORK_API = "2024-07-01", "2024-05-01", "2018-10-01"
LISTINGS = {
    "VMs": ("/providers/Microsoft.Compute/virtualMachines", COMPUTE_API, {}),
    "VM power states": ("/providers/Microsoft.Compute/virtualMachines", COMPUTE_API,
                        {"statusOnly": "true"}),
    "scale sets": ("/providers/Microsoft.Compute/virtualMachineScaleSets", COMPUTE_API, {}),
    "network interfaces": ("/providers/Microsoft.Network/networkInterfaces", NETWORK_API, {}),
    "public IPs": ("/providers/Microsoft.Network/publicIPAddresses", NETWORK_API, {}),
    "instances of scale set": (
        "/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines",
        COMPUTE_API, {"$expand": "instanceView"}),
    "network interfaces of scale set": (
        "/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/networkInterfaces",
        VMSS_NETWORK_API, {}),
    "public IPs of scale set": (
        "/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/publicipaddresses",
        VMSS_NETWORK_API, {}),
}


# === Azure Resource Graph ===
# azure.source "resource_graph": POST {arm}/providers/Microsoft.ResourceGraph/resources, one
# query over every configured subscription, 1,000 rows a page (the documented maximum of
# options.$top), pages chained by $skipToken. Each row carries only what the join reads; the join is
# the one the listings use. Resource Graph allows `union` only within one table (or with
# ResourceContainers), and Uniform scale-set instances live in ComputeResources: they are a second
# query, sent only when a Uniform scale set carries the service-name tag. Tables, types and
# columns: Microsoft's "Azure Resource Graph table and resource type reference"; the power state is
# an extended property (properties.extended.instanceView.powerState.code, "Understanding the Azure
# Resource Graph query language").
# What a row carries is what the bytes cost: a VM's network interfaces only as their number
# (impossible's check); a NIC's one IP configuration, when it has an address (nearly every NIC),
# as three columns (its address, version and public IP's id: `oneAddressed`), where Azure's
# objects carry id, name, type, subnet and more, two fifths of all bytes at 100,000 instances;
# any other NIC's configurations whole, read as the listings' are. array_length, indexing and
# the configuration's paths as in Microsoft's sample "List virtual machines with their network
# interface and public IP".
# The extended columns' names are camelCase, as Kusto advises, so that none is a keyword of KQL.
GRAPH_API, GRAPH_PAGE = "2022-10-01", 1000
GRAPH_QUERY = """\
{table}
| where type in~ ({types})
| where resourceGroup in~ ({groups})
| extend ipConfigs = properties.ipConfigurations
| extend config0 = ipConfigs[0].properties
| extend oneAddressed = array_length(ipConfigs) == 1 and isnotempty(config0.privateIPAddress)
| project id, name, type, location, tags,
    powerState = properties.extended.instanceView.powerState.code,
    provisioningState = properties.provisioningState,
    capacity = sku.capacity,
    nics = array_length(properties.networkProfile.networkInterfaces),
    virtualMachineScaleSet = properties.virtualMachineScaleSet.id,
    orchestrationMode = properties.orchestrationMode,
    virtualMachine = properties.virtualMachine.id,
    primary = properties.primary,
    ipConfigurations = iff(oneAddressed, dynamic(null), ipConfigs),
    privateIPAddress = iff(oneAddressed, config0.privateIPAddress, dynamic(null)),
    privateIPAddressVersion = iff(oneAddressed, config0.privateIPAddressVersion, dynamic(null)),
    publicIPAddress = iff(oneAddressed, config0.publicIPAddress.id, dynamic(null)),
    ipAddress = properties.ipAddress
| order by id asc"""
GRAPH_TABLES = {
    "Resources": ("microsoft.compute/virtualmachines", "microsoft.compute/virtualmachinescalesets",
                  "microsoft.network/networkinterfaces", "microsoft.network/publicipaddresses"),
    "ComputeResources": (
        "microsoft.compute/virtualmachinescalesets/virtualmachines",
        "microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces",
        "microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces/"
        "ipconfigurations/publicipaddresses"),
}


def graph_query(table: str, groups: Sequence[str], public: bool = True) -> str:
    """GRAPH_QUERY for one table; public IPs only for public addresses; without resource groups,
    without their `where` line. Group names are checked at configuration time (no quote can
    occur in them)."""
    types = [t for t in GRAPH_TABLES[table] if public or not t.endswith("/publicipaddresses")]
    query = GRAPH_QUERY.replace("{table}",
                                table).replace("{types}", ", ".join(f"'{t}'" for t in types))
    if not groups:
        return "\n".join(line for line in query.splitlines() if "{groups}" not in line)
    return query.replace("{groups}", ", ".join(f"'{g}'" for g in groups))


class GraphRow(typing.NamedTuple):
    """A row of GRAPH_QUERY's answer: its columns, in the order it projects them."""
    id: Any
    name: Any
    type: Any
    location: Any
    tags: Any
    powerState: Any
    provisioningState: Any
    capacity: Any
    nics: Any
    virtualMachineScaleSet: Any
    orchestrationMode: Any
    virtualMachine: Any
    primary: Any
    ipConfigurations: Any
    privateIPAddress: Any
    privateIPAddressVersion: Any
    publicIPAddress: Any
    ipAddress: Any


def _graph_vm(row: GraphRow) -> ListedVm:
    """A VM or a Uniform instance: its power state, and a deletion under way, as an instance view
    says them."""
    code, state = row.powerState, row.provisioningState
    deleting = isinstance(state, str) and state.lower() == "deleting"
    return ListedVm(row.id, row.name, row.location, row.tags, row.virtualMachineScaleSet, None,
                    _graph_power(code if isinstance(code, str) else None, deleting), None,
                    bool(row.nics))


@functools.lru_cache(maxsize=64)
def _graph_power(code: str | None, deleting: bool) -> str | None:
    """power_state of the instance view that has this power state's code and says whether the
    instance is being deleted (a handful of states: each read once)."""
    statuses = [{"code": code}] if code else []
    if deleting:
        statuses.append({"code": "ProvisioningState/deleting"})
    return power_state({"statuses": statuses})


def _graph_nic(row: GraphRow) -> ListedNic:
    """A NIC: its one IP configuration as GRAPH_QUERY flattens it, else its configurations."""
    if row.privateIPAddress is not None:
        configs = [IpConfiguration(None, row.privateIPAddress, row.privateIPAddressVersion,
                                   _id(row.publicIPAddress))]
    else:
        configs = ip_configurations(row.ipConfigurations)
    return ListedNic(row.id, row.virtualMachine, row.primary, configs)


def _graph_scale_set(row: GraphRow) -> dict:
    """A scale set as Resource Manager lists it, as far as scale_sets_to_list and impossible read
    it: its name and tags, its orchestration mode and capacity."""
    item = {"id": row.id, "name": row.name, "tags": row.tags,
            "properties": {"orchestrationMode": row.orchestrationMode}}
    if row.capacity is not None:
        item["sku"] = {"capacity": row.capacity}
    return item


def _graph_public_ip(row: GraphRow) -> tuple[Any, Any]:
    return row.id, row.ipAddress


# Each type of GRAPH_TABLES: the list of the Inventory its rows go in, and their shape.
GRAPH_KINDS = {
    "microsoft.compute/virtualmachines": ("vms", _graph_vm),
    "microsoft.compute/virtualmachinescalesets": ("scale_sets", _graph_scale_set),
    "microsoft.network/networkinterfaces": ("nics", _graph_nic),
    "microsoft.network/publicipaddresses": ("public_ips", _graph_public_ip),
    "microsoft.compute/virtualmachinescalesets/virtualmachines": ("set_instances", _graph_vm),
    "microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces":
        ("nics", _graph_nic),
    "microsoft.compute/virtualmachinescalesets/virtualmachines/networkinterfaces/ipconfigurations/"
    "publicipaddresses": ("public_ips", _graph_public_ip),
}


class GraphListing:
    """Resource Graph rows read as they come, page by page, into an Inventory (the records the
    join reads), so that a page's rows can go before the next page comes. Counts the rows and
    their ids, for the paging checks of _graph_listing (a row paged twice has the same id twice,
    as it is: no need to lower-case two hundred thousand ids)."""

    def __init__(self, what: str = "Resource Graph query") -> None:
        self.what = what
        self.inventory = inventory = Inventory()
        self.rows = self.pages = 0
        self.ids: set[str] = set()
        self._kinds = {rtype: (getattr(inventory, into), shape)
                       for rtype, (into, shape) in GRAPH_KINDS.items()}

    def add_table(self, data: Any) -> None:
        """A page's `data` in resultFormat "table" (the columns named once, each row an array of
        cells in their order): its rows, shaped. AzureError when it is no such table."""
        self.pages += 1
        columns = data.get("columns") if isinstance(data, dict) else None
        cells = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(columns, list) or not isinstance(cells, list):
            # A 200 without the rows would read as an empty estate and park everything.
            raise AzureError(f'{self.what} failed: malformed page {self.pages} (no "data" table)')
        names = [column.get("name") if isinstance(column, dict) else None for column in columns]
        self.add(self._rows(names, cells))

    def _rows(self, names: list[Any], cells: list[Any]) -> Iterable[GraphRow]:
        """The rows of a table with these columns, as GraphRows (a column it lacks is null)."""
        for n, row in enumerate(cells, 1):
            if not isinstance(row, list) or len(row) != len(names):
                kind = f"a row of {len(row)} cells" if isinstance(row, list) else _json_kind(row)
                raise AzureError(f"{self.what} failed: malformed page {self.pages} (item {n} is "
                                 f"{kind}, not a row of {len(names)} cells)")
        if names == list(GraphRow._fields):          # as Resource Graph answers GRAPH_QUERY
            return map(GraphRow._make, cells)
        where = [names.index(column) if column in names else None for column in GraphRow._fields]
        return (GraphRow._make([None if at is None else row[at] for at in where]) for row in cells)

    def add(self, rows: Iterable[GraphRow]) -> None:
        """Shape more rows: AzureError for a row without id or type, or with a column not shaped
        as Azure documents it (an IP configuration that is no object: leaving its NIC out would
        drain its VM)."""
        kinds, ids = self._kinds, self.ids
        for row in rows:
            self.rows += 1
            rid, rtype = row.id, row.type
            if not isinstance(rid, str) or not rid or not isinstance(rtype, str):
                raise AzureError(f"Resource Graph row {self.rows} has no id or no type: its "
                                 f"resource cannot be told (id {shorten(json.dumps(rid), 120)}, "
                                 f"type {shorten(json.dumps(rtype), 80)})")
            ids.add(rid)
            kind = kinds.get(rtype.lower())
            if kind is not None:
                into, shape = kind
                try:
                    into.append(shape(row))
                except (AttributeError, TypeError) as exc:
                    raise AzureError(f"Resource Graph row {self.rows} ({shorten(rid, 200)}) is "
                                     f"not shaped as Azure documents it ({str(exc)[:100]})"
                                     ) from None


def query_graph(pager: "_ArmPager", cfg: Config) -> Inventory:
    """Resource Graph: Resources, then ComputeResources when a Uniform scale set is tagged."""
    listing = _graph_listing(pager, cfg, "Resources")
    tagged = {_id(s.get("id")) for s in scale_sets_to_list(listing.scale_sets, cfg)}
    # as the listings do: instances of Uniform sets whose tags can make them match
    if tagged:
        uniform = _graph_listing(pager, cfg, "ComputeResources")
        listing.set_instances = [i for i in uniform.set_instances
                                 if _scale_set_of(_id(i.id)) in tagged]
        listing.nics += uniform.nics
        listing.public_ips += uniform.public_ips
    return listing


def _graph_listing(pager: "_ArmPager", cfg: Config, table: str) -> Inventory:
    """Every row of one Resource Graph query, page by page ($skipToken), each page shaped as it
    comes (GraphListing)."""
    url = (f"{pager.base}/providers/Microsoft.ResourceGraph/resources"
           f"?api-version={GRAPH_API}")
    query = graph_query(table, cfg.azure.resource_groups, cfg.azure.address == "public")
    what, seen = f"Resource Graph query of {table}", set()

    def next_request(page: Mapping | None) -> Any:
        # A table names the columns once, not in every row: half the decoding of objects.
        options: dict[str, Any] = {"$top": GRAPH_PAGE, "resultFormat": "table"}
        if page is not None:
            if not page.get("$skipToken"):
                return None
            options["$skipToken"] = pager.fresh_link(what, page["$skipToken"], seen,
                                                          "$skipToken")
        body = {"subscriptions": list(cfg.azure.subscriptions), "query": query,
                "options": options}
        return pager.request("POST", url, json=body)
    totals: list[Any] = []
    shaped = GraphListing(what)

    def take(page: Mapping) -> None:
        if str(page.get("resultTruncated")).lower() == "true":
            # Rows past the limit are missing, and a missing instance would be drained.
            raise AzureError(f"Resource Graph query of {table} failed: result truncated")
        totals.append(page.get("totalRecords"))
        shaped.add_table(page.get("data"))
    pager.paged(what, next_request, "data", take)
    # Paging is exact only when each page agrees on the total and the rows add up to it with
    # no id twice (Microsoft: unsorted results are "random and not repeatable"; a change
    # while paging gives duplicates or missing rows). A missing VM or NIC would be drained.
    rows, ids = shaped.rows, shaped.ids
    if len(set(map(str, totals))) != 1 or not _is_count(totals[0]) or totals[0] != rows \
            or len(ids) != rows:
        totals_seen = ", ".join(sorted(set(map(str, totals))))
        raise AzureError(f"{what} failed: {rows} rows received ({rows - len(ids)} of them "
                         f"twice), totalRecords {totals_seen}: the pages do not add up (the "
                         "estate changed while it was paged?); nothing is applied this cycle")
    return shaped.inventory


# === Azure quotas and clouds ===
def quota_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds until Resource Graph's per-user window resets, when its quota is spent
    (x-ms-user-quota-remaining 0, x-ms-user-quota-resets-after "hh:mm:ss"); else None."""
    remaining, resets = headers.get("x-ms-user-quota-remaining"), headers.get(
        "x-ms-user-quota-resets-after")
    if remaining is None or resets is None or not (remaining := remaining.strip()).isascii() \
            or not remaining.isdigit() or int(remaining) > 0:
        return None
    match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", resets)
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return min(60.0, int(hours) * 3600 + int(minutes) * 60 + float(seconds))


# Compute's own throttling of "VM List, List All" calls, per subscription and for every caller
# together: 300 a minute refill, 900 burst (Azure's "Troubleshooting throttling errors" for
# Microsoft.Compute). Each page of either VM list is one call.
VM_LIST_KINDS = ("VMs", "VM power states")
VM_LIST_REFILL_PER_MINUTE = 300


def vm_list_budget_warning(calls_per_cycle: int, interval: float) -> str | None:
    """A warning when one cycle's VM list calls, repeated every `interval` seconds, would
    outrun Compute's per-subscription refill on their own; None when they fit."""
    per_minute = calls_per_cycle * 60 / interval
    if per_minute <= VM_LIST_REFILL_PER_MINUTE:
        return None
    return (f"the last cycle made {calls_per_cycle} VM list calls in one subscription: every "
            f"{interval:g} s that is {per_minute:.0f} a minute, over Compute's refill of "
            f"{VM_LIST_REFILL_PER_MINUTE} a minute for all callers of the subscription (every "
            "other host "
            "polling it adds as much); Azure will throttle. Raise polling.interval_seconds, or set "
            'azure.source to "resource_graph"')


# Refill of Azure's read buckets, per minute (Microsoft's "Compute throttling limits" for the
# subscription and region; Resource Manager's reads: a token bucket of 25 a second for a
# principal). The 30-minute labels have no figures there: their 3-minute siblings govern.
QUOTA_REFILL_PER_MINUTE = {
    "HighCostGet3Min": 300, "HighCostGetVMScaleSet3Min": 360, "VMScaleSetVMViews3Min": 2000,
    "LowCostGet3Min": 8000, "subscription-reads": 1500, "resource-graph": 180,
}


def quota_headers(headers: Mapping[str, str]) -> dict[str, int]:
    """The read buckets an answer reports and what is left in each: Compute's
    x-ms-ratelimit-remaining-resource ("Microsoft.Compute/HighCostGet3Min;159,..."), Resource
    Manager's x-ms-ratelimit-remaining-subscription-reads and Resource Graph's
    x-ms-user-quota-remaining. What is not a whole number is left out."""
    found: dict[str, int] = {}
    for part in str(headers.get("x-ms-ratelimit-remaining-resource") or "").split(","):
        name, _, left = part.strip().rpartition(";")
        if name and left.isascii() and left.isdigit():
            found[name.rsplit("/", 1)[-1]] = int(left)
    for key, bucket in (("x-ms-ratelimit-remaining-subscription-reads", "subscription-reads"),
                        ("x-ms-user-quota-remaining", "resource-graph")):
        left = str(headers.get(key) or "").strip()
        if left.isascii() and left.isdigit():
            found[bucket] = int(left)
    return found


def quota_wait_seconds(left: Mapping[str, int], used: Mapping[str, int],
                       interval: float) -> tuple[float, str]:
    """How long the next cycle must wait, at least, so that what it will use of each bucket
    (this cycle's use) has refilled: (seconds, the bucket that says so); (0, "") when the
    polling interval is enough. A bucket whose refill is unknown does not count."""
    worst, why = 0.0, ""
    for bucket, need in used.items():
        rate = QUOTA_REFILL_PER_MINUTE.get(bucket)
        if rate and need > left.get(bucket, need):
            wait = (need - left[bucket]) * 60 / rate
            if wait > interval and wait > worst:
                worst, why = wait, bucket
    return worst, why


def needs_cloud_metadata(cfg: AzureConfig) -> bool:
    """A Resource Manager URL without a named cloud: its own metadata says how to log in,
    unless both the token audience and the login endpoint are configured."""
    return bool(cfg.resource_manager_url and not cfg.cloud
                and not (cfg.token_audience and cfg.login_endpoint))


def cloud_endpoints(cfg: AzureConfig, metadata: Any) -> tuple[str, str]:
    """(token audience, login endpoint): configured, else the named cloud's, else from the
    endpoint's metadata document, else Azure's public cloud."""
    audience, login = CLOUDS[cfg.cloud or "public"]
    if metadata is not None:
        audience, login = metadata_endpoints(metadata, cfg.resource_manager_url)
    return cfg.token_audience or audience, cfg.login_endpoint or login


def metadata_endpoints(document: Any, resource_manager_url: str) -> tuple[str, str]:
    """The first audience and the login endpoint of a `metadata/endpoints` document: one cloud
    object (api-version 2022-09-01), or a list of them, of which the one whose resourceManager is
    this endpoint. AzureError when it has neither."""
    clouds = document if isinstance(document, list) else [document]
    wanted = resource_manager_url.rstrip("/").lower()
    cloud = next((c for c in clouds if isinstance(c, dict)
                  and str(c.get("resourceManager") or "").rstrip("/").lower() == wanted),
                 clouds[0] if len(clouds) == 1 else None)
    auth = cloud.get("authentication") if isinstance(cloud, dict) else None
    audiences = auth.get("audiences") if isinstance(auth, dict) else None
    login = auth.get("loginEndpoint") if isinstance(auth, dict) else None
    if not (isinstance(audiences, list) and audiences and isinstance(audiences[0], str)
            and _optional_https_url(audiences[0]) is None and isinstance(login, str)
            and login and _optional_https_url(login) is None):
        raise AzureError(
            f"cloud metadata of {resource_manager_url}: no https authentication.audiences "
            "and loginEndpoint; set azure.token_audience and azure.login_endpoint")
    return audiences[0], login.rstrip("/")


# === Azure source ===
def without_health(instances: Iterable[Instance], cfg: Config) -> dict[str, int]:
    """Uniform scale sets (by lower-cased id) whose running instances that could serve report
    no Application Health, and how many."""
    bare: dict[str, int] = {}
    for i in instances:
        if i.kind == "uniform" and i.health is None and i.power_state == "running" \
                and could_serve(i, cfg):
            bare[_scale_set_of(i.id)] = bare.get(_scale_set_of(i.id), 0) + 1
    return bare


class AzureSource:
    """Lists VMs, scale sets, NICs and public IPs through the Azure SDK (azure.source "arm"),
    or asks Azure Resource Graph for them ("resource_graph"): requests grow with pages, never
    with instances. Independent listings run concurrently; both sources share one page loop.

    Pages go through _ArmPager, the SDK client's pipeline, and stay JSON: the SDK's model
    objects would cost far more CPU than the JSON itself, seconds per cycle for a large estate.

    `stop` ends a discovery between pages (Aborted); `progress` is called after every page,
    from the listing threads: the daemon's watchdog keep-alive.
    """

    def __init__(self, cfg: Config, env: Mapping[str, str] | None = None,
                 stop: StopFlag | None = None, progress: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self._stop, self._progress = stop or Flag(), progress
        self.pager = _ArmPager(cfg, os.environ if env is None else env, self._stop, self._check,
                               progress)
        self._lock = threading.Lock()
        self._warned_fallback = self._warned_budget = False
        self._warned_health: set[str] = set()    # scale sets said to report no Application Health
        self._vm_list_calls: dict[str, int] = {}    # VM list pages per subscription, this cycle
        self._deadline = math.inf           # of the discovery under way (monotonic)
        if not needs_cloud_metadata(cfg.azure):
            self.pager.connect(cloud_endpoints(cfg.azure, None))
        else:   # connected at the first discovery; a credential without its environment fails now
            self.pager.credential_only()

    @property
    def requests(self) -> int:
        return self.pager.requests

    def close(self) -> None:
        """Close the client's connections and the credential's (a reload replaces both)."""
        self.pager.close()

    def discover(self) -> Discovery:
        if not self.pager.connected:
            self.pager.connect(cloud_endpoints(self.cfg.azure, self.pager.cloud_metadata()))
        before = self.requests
        self._vm_list_calls = {}
        self.pager.new_cycle()
        self._deadline = time.monotonic() + self.cfg.azure.discovery_deadline_seconds
        pool = _Pool(self.cfg.azure.workers)
        try:
            # One token before the fan-out: the SDK's bearer-token policy has no lock, so
            # the first pages of every worker would each fetch one.
            token = pool.submit(self.pager.token)
            pool.wait([token], self._stop)
            token.result()
            skipped: list[Skip] = []
            with collector_paused():
                instances = self._discover(pool, skipped)
        finally:
            pool.close()
        self._check_vm_list_budget()
        return Discovery(tuple(instances), tuple(skipped), self.requests - before,
                         dict(self.pager.left), self.pager.stretch())

    def _discover(self, pool: _Pool, skipped: list[Skip]) -> list[Instance]:
        graph = self.cfg.azure.source == "resource_graph"
        if graph:
            inventory, denied = query_graph(self.pager, self.cfg), False
        else:
            inventory, denied = self._listed(pool)
        instances = self._join(inventory, skipped)
        if denied:
            instances = self._power_states_one_by_one(pool, instances)
        problem = impossible(inventory, instances, self.cfg, graph)
        if problem:
            raise AzureError(
                f"Azure's answers cannot be true: {problem}; nothing is applied this cycle")
        if self.cfg.azure.require_healthy:
            self._warn_without_health(instances)
        return instances

    def _warn_without_health(self, instances: Sequence[Instance]) -> None:
        """azure.require_healthy: one warning per scale set (per configuration) whose running,
        tagged instances report no Application Health; they are served as without the option."""
        bare = without_health(instances, self.cfg)
        for set_id in sorted(bare.keys() - self._warned_health):
            self._warned_health.add(set_id)
            log.warning("scale set %s: %d running instances report no Application Health (no "
                        "vmHealth in their instance view): served without it, although "
                        "azure.require_healthy is set; add the Application Health extension",
                        _printable(set_id.rsplit("/", 1)[-1]), bare[set_id],
                        extra={"event": "azure_no_health", "scale_set": _printable(set_id),
                               "count": bare[set_id]})

    def _listed(self, pool: _Pool) -> tuple[Inventory, bool]:
        """Everything the listings give (_list_all), read into an Inventory; their JSON goes as
        this returns, before the join. True when the status-only list was refused."""
        listing = AzureListing()
        denied = self._list_all(pool, listing)
        try:
            return inventory_of(listing), denied
        except (AttributeError, TypeError) as exc:
            raise _not_shaped(exc) from None

    def _join(self, inventory: Inventory, skipped: list[Skip]) -> list[Instance]:
        """join; an item not shaped as Azure documents it (an item or a field that should be
        an object and is not) fails the discovery as a malformed page does: dropping that one
        item would drain its server."""
        try:
            return join(inventory, self.cfg.azure, skipped)
        except (AttributeError, TypeError) as exc:
            raise _not_shaped(exc) from None

    def _check_vm_list_budget(self) -> None:
        """Warn once (per configuration) when this cycle's VM list calls would outrun Compute's
        refill."""
        warning = vm_list_budget_warning(max(self._vm_list_calls.values(), default=0),
                                         self.cfg.polling.interval_seconds)
        if warning and not self._warned_budget:
            self._warned_budget = True
            log.warning(warning, extra={"event": "azure_quota_warning"})

    def _check(self) -> None:
        """In a listing thread, between pages and retries: stop on shutdown, when a sibling
        listing failed, or when the discovery it worked for is over."""
        if self._stop.is_set():
            raise Aborted("shutdown requested: Azure listing abandoned")
        if time.monotonic() > self._deadline:
            raise AzureError(f"the discovery took longer than azure.discovery_deadline_seconds "
                             f"({self.cfg.azure.discovery_deadline_seconds:g} s): given up")
        if _Pool.abandoned():
            raise Aborted("Azure listing abandoned: the discovery failed")

    def _list_all(self, pool: _Pool, listing: AzureListing) -> bool:
        """Phase one lists per subscription (or resource group); phase two lists each
        Uniform scale set that can match. Any failure fails the whole discovery. True when
        the status-only list was refused (403) in resource-group scope."""
        azure = self.cfg.azure
        public, groups = azure.address == "public", azure.resource_groups
        jobs: list[tuple[list, concurrent.futures.Future]] = []

        def submit(into: list, kind: str, sub: str, rg: str | None, scale_set: str = "") -> None:
            jobs.append((into, pool.listing(self._pages, kind, sub, rg, scale_set)))

        set_jobs, status_jobs = [], []
        for sub in azure.subscriptions:
            for rg in groups or [None]:
                submit(listing.vms, "VMs", sub, rg)
                submit(listing.nics, "network interfaces", sub, rg)
                if public:
                    submit(listing.public_ips, "public IPs", sub, rg)
                set_jobs.append((sub, pool.listing(self._pages, "scale sets", sub, rg)))
            if azure.running_only:
                # Power states come from the status-only list, which exists subscription-wide only
                # (VirtualMachines_ListAll statusOnly); a VM list may carry `$expand=instanceView`
                # only with a scale-set `$filter` (Compute REST reference, VirtualMachines_List).
                # Not through _listing: a 403 here is no failure of the discovery (see below).
                status_jobs.append(pool.submit(self._pages, "VM power states", sub, None))
        pool.wait([job for _, job in set_jobs], self._stop)
        for sub, job in set_jobs:
            sets = job.result()
            listing.scale_sets += sets
            for s in scale_sets_to_list(sets, self.cfg):
                rg, name = _resource_group(_id(s.get("id"))), str(s.get("name") or "")
                submit(listing.set_instances, "instances of scale set", sub, rg, name)
                submit(listing.nics, "network interfaces of scale set", sub, rg, name)
                if public:
                    submit(listing.public_ips, "public IPs of scale set", sub, rg, name)
        pool.wait(status_jobs, self._stop)
        denied = False
        for job in status_jobs:
            try:
                listing.statuses += in_resource_groups(job.result(), groups)
            except AzureError as exc:
                # Reader on resource groups only: subscription-wide lists answer 403
                # AuthorizationFailed.
                if not groups or exc.status != 403:
                    raise
                denied = True
        pool.wait([job for _, job in jobs], self._stop)
        for into, job in jobs:
            into += job.result()
        return denied

    def _power_states_one_by_one(self, pool: _Pool, instances: list[Instance]) -> list[Instance]:
        """The fallback when the identity may not list VMs subscription-wide: one instance-view
        GET per tagged VM or Flexible member whose power state is unknown (never for untagged
        ones; Uniform instances have theirs from their scale set's listing)."""
        wanted = [i for i in instances if i.power_state == "unknown" and i.kind != "uniform"
                  and could_serve(i, self.cfg)]
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning(
                "the identity may not list VMs subscription-wide (403 AuthorizationFailed): power "
                "states cost one instance-view request per tagged VM, %d this cycle; grant Reader "
                "on the subscription, or set azure.source to \"resource_graph\"", len(wanted),
                extra={"event": "azure_power_state_fallback", "count": len(wanted)})
        jobs = [pool.listing(self.pager.power_state, i.id, i.name) for i in wanted]
        pool.wait(jobs, self._stop)
        states = {i.id: job.result() for i, job in zip(wanted, jobs)}
        return [i._replace(power_state=states[i.id]) if states.get(i.id) else i for i in instances]

    def _pages(self, kind: str, sub: str, rg: str | None, scale_set: str = "") -> list[Mapping]:
        """Every item of one Resource Manager listing, following nextLink."""
        path, api_version, query = LISTINGS[kind]
        scope = f"/subscriptions/{sub}" + (f"/resourceGroups/{_q(rg)}" if rg else "")
        url = (f"{self.pager.base}{scope}{path.format(set=_q(scale_set))}?"
               + urllib.parse.urlencode({"api-version": api_version, **query}))
        what = f"listing {kind} {scale_set + ' in ' if scale_set else 'of '}{scope[1:]}"
        seen: set[str] = set()

        def next_request(page: Mapping | None) -> Any:
            link = url if page is None else page.get("nextLink")
            if link:
                link = self.pager.fresh_link(what, link, seen, "nextLink")
            if link and kind in VM_LIST_KINDS:
                with self._lock:
                    self._vm_list_calls[sub] = self._vm_list_calls.get(sub, 0) + 1
            return self.pager.request("GET", link) if link else None
        return self.pager.paged(what, next_request, "value")


def in_resource_groups(items: list[Mapping], groups: Sequence[str]) -> list[Mapping]:
    """The items whose resource group is one of `groups` (all of them when none are configured)."""
    wanted = {g.lower() for g in groups}
    return [i for i in items if _resource_group(_id(i.get("id"))) in wanted] if wanted else items


def could_serve(inst: Instance, cfg: Config) -> bool:
    """Tagged and in scope: carries the service-name tag (keys compare case-insensitively, as
    in Azure) and passes the tag allowlist and denylist."""
    name_tag = cfg.tags.service_name_tag.lower()
    return any(k.lower() == name_tag for k in inst.tags) and tags_match(inst.tags, cfg.tags)


# === Data Plane transport ===
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx comes back as an answer, never followed: the Basic credentials would go along."""

    def redirect_request(self, *_: Any) -> None:
        return None


class _Watched:
    """A connection that hands its socket to `watch` once connected, so that a deadline
    can cut a request short however slowly its answer trickles in."""

    def __init__(self, *args: Any, watch: Callable[[socket.socket], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.watch = watch

    def connect(self) -> None:
        super().connect()
        self.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _DeadlineHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """http and https through watched connections."""

    def __init__(self, context: ssl.SSLContext, watch: Callable[[socket.socket], None]):
        urllib.request.HTTPSHandler.__init__(self, context=context)
        self._watch = watch

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_WatchedHTTP, watch=self._watch), req)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_WatchedHTTPS, watch=self._watch), req,
                            context=self._context)


# an error answer is read this far, no further (any answer: max_answer_mb)
MAX_ERROR_BODY = 64 * 1024
# seconds the delete of a transaction left behind may take, after a shutdown
CLEANUP_TIMEOUT = 1.5
# seconds a drain's runtime or stats call may take: it never holds the cycle
DRAIN_CALL_TIMEOUT = 5.0


def basic_credentials(cfg: HAProxyConfig) -> str:
    """The Basic header value: base64 of user:password, as secret as the password."""
    return base64.b64encode(f"{cfg.username}:{cfg.password}".encode()).decode()


class Shape(typing.NamedTuple):
    """What a 2xx answer's payload must be: a test, and its name for the error."""
    test: Callable[[Any], bool]
    name: str


class _JsonHttp:
    """JSON over HTTP for the Data Plane API, trusting nothing that answers: a deadline for the
    whole answer (a watched socket is cut when it passes, however slowly the answer trickles
    in), no proxy, no redirect followed (the Basic credentials would go along), at most
    haproxy.max_answer_mb read, an answer that is not JSON an error naming what came instead,
    every error text masked before it is shortened. Shutdown (`stop`) cuts the request in
    flight at once; an `urgent` one (the delete of a transaction that must not stay open) goes
    out after it, with a short deadline of its own."""

    def __init__(self, cfg: HAProxyConfig, stop: Flag | None = None):
        self.cfg = cfg
        self.secrets = [cfg.password, basic_credentials(cfg)]
        self._headers = {"Authorization": f"Basic {basic_credentials(cfg)}",
                         "Accept": "application/json",
                         "User-Agent": f"haproxy-azure-discovery/{__version__}"}
        self._max_body = cfg.max_answer_mb * 2**20
        self._stop, self._closed = stop or Flag(), Flag()
        self._guard: threading.Thread | None = None
        self._stopping = self._urgent = self._expired = False
        self._socket: socket.socket | None = None
        context = ssl.create_default_context(cafile=cfg.ca_file or None)
        if not cfg.verify_ssl:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        # The Data Plane API is local to HAProxy: no proxy from the environment applies.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(),
                                                   _DeadlineHandler(context, self._watch))

    def request(self, method: str, url: str, where: str, body: Any = None, shape: Shape
                | None = None,
                timeout: float | None = None,
                urgent: bool = False) -> tuple[int, Any, Mapping[str, str]]:
        """One request (`where` names it in errors); DataPlaneError (TransactionConflict for
        406/409) on failure, Aborted on shutdown. With a `shape`, a 2xx payload that fails its
        test is an error saying it is not that. `timeout` shortens haproxy.timeout."""
        data = None if body is None else json.dumps(body).encode()
        headers = {**self._headers, **({"Content-Type": "application/json"} if data else {})}
        status, raw, got = self._exchange(where,
                                          urllib.request.Request(url, data, headers, method=method),
                                          min(timeout or self.cfg.timeout, self.cfg.timeout),
                                          urgent)
        if 300 <= status < 400:
            location = shorten(str(got.get("Location") or "(none)"), 200, self.secrets)
            raise DataPlaneError(f"{where}: HTTP {status} redirect to {location} not followed "
                                 "(haproxy.base_url must be the Data Plane API itself)", status)
        if status >= 400:
            message = self._error_message(raw)
            error = TransactionConflict if status in (406, 409) else DataPlaneError
            raise error(f"{where}: HTTP {status} {message}", status, message)
        payload = self._decode(where, status, got, raw)
        if shape is not None and not shape.test(payload):
            raise self._malformed(where, status, got, raw, f"not {shape.name}")
        return status, payload, got

    def mask(self, text: str) -> str:
        return redact(text, self.secrets)

    def close(self) -> None:
        """Ends the stop guard's thread (a reload replaces the client)."""
        self._closed.set()

    def _exchange(self, where: str, req: urllib.request.Request, timeout: float,
                  urgent: bool) -> tuple[int, bytes, Any]:
        """Send and read the whole answer before `timeout` runs out, and no longer than shutdown
        allows (unless `urgent`); at most haproxy.max_answer_mb of it."""
        if self._stop.is_set() and not urgent:
            raise Aborted(f"shutdown requested: {where} not sent")
        if self._guard is None:
            self._guard = threading.Thread(target=self._watch_stop, name="dataplane-stop",
                                           daemon=True)
            self._guard.start()
        self._socket, self._expired, self._urgent = None, False, urgent
        timer = threading.Timer(timeout, self._expire)
        timer.daemon = True
        timer.start()
        try:
            answer = self._open(req, timeout)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            if self._stopping and not urgent:
                raise Aborted(f"shutdown requested: {where} abandoned") from None
            if self._expired:
                raise DataPlaneError(f"{where}: timed out, {self._late(timeout)}") from None
            raise DataPlaneError(self.mask(
                f"{where}: {getattr(exc, 'reason', None) or exc}")) from None
        finally:
            timer.cancel()
            self._socket, self._urgent = None, False
        if self._stopping and not urgent:
            raise Aborted(f"shutdown requested: {where} abandoned")
        if self._expired:
            raise DataPlaneError(f"{where}: timed out, {self._late(timeout)}")
        if len(answer[1]) > self._max_body:
            raise DataPlaneError(
                f"{where}: HTTP {answer[0]} answer is larger than haproxy.max_answer_mb "
                f"({self.cfg.max_answer_mb} MiB)", answer[0])
        return answer

    def _open(self, req: urllib.request.Request, timeout: float) -> tuple[int, bytes, Any]:
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read(self._max_body + 1), resp.headers
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(MAX_ERROR_BODY), exc.headers

    def _watch(self, sock: socket.socket) -> None:
        self._socket = sock
        if self._stopping and not self._urgent:     # shutdown came before the connection did
            self._cut()

    def _expire(self) -> None:
        """The deadline passed: cut the connection, whatever it is waiting for."""
        self._expired = True
        self._cut()

    def _cut(self) -> None:
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch_stop(self) -> None:
        """The stop guard's thread: at shutdown, the request in flight is cut at once."""
        if wait_any([self._stop, self._closed], math.inf) is self._stop:
            self._stopping = True
            if not self._urgent:
                self._cut()

    def _late(self, timeout: float) -> str:
        bound = "haproxy.timeout" if timeout == self.cfg.timeout else "the bound of this call"
        return f"no complete answer within {bound} ({timeout:g} s)"

    def _decode(self, where: str, status: int, headers: Any, raw: bytes) -> Any:
        if not raw.strip():
            return None
        if "json" not in str(headers.get("Content-Type") or "").lower():
            raise self._malformed(where, status, headers, raw, "not JSON")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise self._malformed(where, status, headers, raw, "not valid JSON") from None

    def _malformed(self, where: str, status: int, headers: Any, raw: bytes,
                   what: str) -> DataPlaneError:
        """The error for a 2xx answer the API does not give: what came, masked and bounded."""
        kind = shorten(str(headers.get("Content-Type") or "no content type"), 80, self.secrets)
        sample = shorten(raw[:MAX_ERROR_BODY].decode("utf-8", "replace"), 200, self.secrets)
        return DataPlaneError(self.mask(f"{where}: HTTP {status} answer is {what} ({kind}): "
                                        f"{json.dumps(sample, ensure_ascii=False)}"), status)

    def _error_message(self, raw: bytes) -> str:
        """The message of an error answer, bounded, on one line, masked."""
        try:
            payload = json.loads(raw)
            text = payload.get("message", "") if isinstance(payload, dict) else str(payload)
        except (ValueError, RecursionError):
            text = raw.decode("utf-8", "replace")
        return shorten(str(text), 300, self.secrets)


# === Data Plane API ===
class DataPlane:
    """What the HAProxy Data Plane API's calls mean, v2 (wrapped bodies, ?backend=) or v3
    (bare bodies, nested servers, full sections): versions, backends, transactions, runtime
    writes, reloads. Knows nothing of sockets: _JsonHttp carries every request. Counts them."""

    def __init__(self, cfg: HAProxyConfig, progress: Callable[[], None] = lambda: None,
                 stop: Flag | None = None):
        self.cfg = cfg
        self.http = _JsonHttp(cfg, stop)
        self._progress = progress      # the watchdog's keep-alive, while a reload is waited for
        self.api = None if cfg.api_version == "auto" else cfg.api_version
        # dataplaneapi's (major, minor, patch), from /info
        self.release: tuple[int, ...] | None = None
        self.requests = 0

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, query: Mapping[str, Any] | None = None,
                body: Any = None,
                shape: Shape | None = None, timeout: float | None = None,
                urgent: bool = False) -> tuple[int, Any, Mapping[str, str]]:
        """One request to `path` of the API in use (probed first with api_version auto); see
        _JsonHttp.request."""
        api = self.api or self.probe()
        url = f"{self.cfg.base_url.rstrip('/')}/{api}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        self.requests += 1
        return self.http.request(method, url, f"{method} /{api}{path}", body, shape, timeout,
                                 urgent)

    def _mask(self, text: str) -> str:
        return self.http.mask(text)

    def probe(self) -> str:
        """api_version auto: /v3/info, then /v2/info."""
        for api in ("v3", "v2"):
            self.requests += 1
            try:
                _, info, _ = self.http.request("GET", f"{self.cfg.base_url.rstrip('/')}/{api}/info",
                                               f"GET /{api}/info")
            except DataPlaneError as exc:
                if exc.status in (404, 405):
                    continue
                raise
            self.api, self.release = api, _release(info)
            return api
        raise DataPlaneError(f"{self.cfg.base_url}: neither /v3/info nor /v2/info answers: "
                             "is this a Data Plane API?")

    def _data(self, payload: Any) -> Any:
        return payload.get("data") if self.api == "v2" and isinstance(payload, dict) else payload

    def version(self) -> int:
        _, payload, _ = self.request("GET", "/services/haproxy/configuration/version",
                                     shape=Shape(lambda p: _is_count(self._data(p)),
                                                 "an integer version"))
        return self._data(payload)

    def read_backends(self, prefix: str) -> dict[str, BackendState]:
        """Every backend whose name starts with prefix. The version that guards them is read
        before (version()): dataplaneapi sets a reply's Configuration-Version when it writes
        the header, after the body was built, so it can be newer than the data (dataplaneapi
        3.0 adapters/adapters.go)."""
        conf = "/services/haproxy/configuration"
        if self.api is None:
            self.probe()
        if self.api == "v3":
            _, payload, _ = self.request("GET", f"{conf}/backends", {"full_section": "true"},
                                         shape=Shape(_full_sections, "a list of backends"))
            return {b["name"]: _backend_state(b) for b in payload or []
                    if b["name"].startswith(prefix)}
        _, payload, _ = self.request("GET", f"{conf}/backends",
                                     shape=Shape(_wrapped_list,
                                                 '{"_version": integer, "data": list of backends}'))
        found = {}
        for b in payload["data"]:
            if b["name"].startswith(prefix):
                _, servers, _ = self.request("GET", f"{conf}/servers", {"backend": b["name"]},
                                             shape=Shape(_wrapped_servers,
                                                         '{"data": list of servers}'))
                found[b["name"]] = BackendState(b["name"], b,
                                                {s["name"]: s for s in servers["data"]})
        return found

    def dropped_fields(self) -> frozenset[str]:
        """The fields ("backend.KEY", "server.KEY") the release in use answers 2xx to and forgets
        (FIELDS_GONE): sent every cycle, they would be written again every cycle."""
        if self.api is None:
            self.probe()
        if self.release is None:
            _, info, _ = self.request("GET", "/info")
            self.release = _release(info)
        return frozenset(k for k, since in FIELDS_GONE.items() if self.api == "v3" and self.release
                         >= since)

    def _server_path(self, backend: str, server: str) -> tuple[str, dict[str, str]]:
        conf = "/services/haproxy/configuration"
        if self.api == "v3":
            return f"{conf}/backends/{_q(backend)}/servers/{server}", {}
        return f"{conf}/servers/{server}", {"backend": backend}

    def apply_transaction(self, plan: Plan, version: int, stop: StopFlag) -> Applied:
        """The plan written in transactions: _Transactions.apply."""
        return _Transactions(self).apply(plan, version, stop)

    def apply_runtime(self, plan: Plan, version: int, stop: StopFlag) -> Applied:
        """Hybrid mode: each change a plain versioned server PUT, which dataplaneapi applies
        through HAProxy's runtime API and answers 200, or answers 202 when it had to reload
        after all (a field outside the runtime set, a failed runtime command, no runtime
        socket: dataplaneapi 3.4 handlers/configuration/server/server.go:275-384). A backend
        with a refused PUT (400/422: nothing written) is named in Applied.refused and its
        other changes wait."""
        reloads: list[str] = []
        refused = {}
        for b in plan.backends:
            try:
                for c in b.changes:
                    for body in _runtime_steps(c):
                        if stop.is_set():
                            raise Aborted("shutdown requested")
                        version = self._runtime_write(b.name, c.name, body, version, reloads)
            except DataPlaneError as exc:
                if exc.status not in REFUSED_STATUSES or isinstance(exc, TransactionConflict):
                    raise
                refused[b.name] = str(exc)
        return Applied(version, tuple(reloads), refused)

    def _runtime_write(self, backend: str, server: str, body: Mapping[str, Any], version: int,
                       reloads: list[str]) -> int:
        """One plain server PUT at `version`; the version after it. A 202 is a reload."""
        path, query = self._server_path(backend, server)
        status, _, headers = self.request("PUT", path, {**query, "version": version}, body)
        if status == 202:
            reloads += [i for i in _reload_ids(status, headers) if i not in reloads]
            log.warning("server %s/%s: the Data Plane API reloaded HAProxy for a runtime write "
                        "(answered 202)", backend, server,
                        extra={"event": "runtime_reload", "backend": backend, "server": server})
        value = _int_header(headers.get("Configuration-Version"))
        return version + 1 if value is None else value

    def await_reloads(self, reloads: Sequence[str], stop: StopFlag) -> None:
        _Reloads(self).wait(reloads, stop)

    def reload_debt(self) -> ReloadFailed | None:
        return _Reloads(self).debt()

    def make_reload(self, version: int, stop: StopFlag) -> Applied:
        return _Reloads(self).make(version, stop)

    def _runtime_server_path(self, backend: str, server: str) -> tuple[str, dict[str, str]]:
        if (self.api or self.probe()) == "v3":
            return f"/services/haproxy/runtime/backends/{_q(backend)}/servers/{_q(server)}", {}
        return f"/services/haproxy/runtime/servers/{_q(server)}", {"backend": backend}

    def set_admin_state(self, backend: str, server: str, admin_state: str) -> None:
        """HAProxy's runtime admin state of one server ("drain", "ready"): `set server B/S
        state ...` on the runtime API, no reload, nothing written to the file, so a reload
        forgets it (dataplaneapi v3.2 handlers/runtime_server.go:106-157)."""
        path, query = self._runtime_server_path(backend, server)
        self.request("PUT", path, query, {"admin_state": admin_state}, timeout=DRAIN_CALL_TIMEOUT,
                     shape=Shape(lambda p: p is None or isinstance(p, dict), "a runtime server"))

    def admin_state(self, backend: str, server: str) -> str | None:
        """The server's runtime admin state ("ready", "maint", "drain"); None if not given."""
        path, query = self._runtime_server_path(backend, server)
        _, payload, _ = self.request("GET", path, query, timeout=DRAIN_CALL_TIMEOUT,
                                     shape=Shape(lambda p: isinstance(p, dict), "a runtime server"))
        state = payload.get("admin_state")
        return state if isinstance(state, str) else None

    def sessions(self, backend: str, servers: Sequence[str]) -> dict[str, int | None]:
        """Current sessions (`scur`) of these servers of one backend, from HAProxy's native
        stats: one request for the backend's servers, however many drain at once. None for
        a server the answer does not name or gives no count for."""
        _, payload, _ = self.request("GET", "/services/haproxy/stats/native",
                                     {"type": "server", "parent": backend},
                                     shape=Shape(_native_stats, "native stats"),
                                     timeout=DRAIN_CALL_TIMEOUT)
        counts = current_sessions(payload, backend)
        return {s: counts.get(s) for s in servers}



class _Reloads:
    """What dataplaneapi's reload agent says of HAProxy's reloads: waiting for them, the debt
    a failed one leaves, and a reload made to pay it. Sends through its DataPlane."""

    def __init__(self, dp: "DataPlane"):
        self.dp = dp

    def wait(self, reloads: Sequence[str], stop: StopFlag) -> None:
        """Wait (bounded by RELOAD_WAIT) until each reload has run. dataplaneapi reloads on a
        ticker of reload-delay (5 s) shared by the commits in that window, and says in_progress,
        succeeded or failed (v2.9 haproxy/reload_agent.go handleReloads, GetReload; the GET
        blocks while a reload runs). ReloadFailed when one failed, never confirmed, or is
        unknown (404: dataplaneapi restarted and lost it): HAProxy may then run an older
        configuration than every GET shows. `stop` ends the wait at once (Aborted); the
        watchdog hears from every poll."""
        deadline = time.monotonic() + RELOAD_WAIT
        for reload_id in reloads:
            if reload_id == "":
                continue                     # a reload without an id: nothing to ask about
            pause = 0.05
            while True:
                self.dp._progress()
                status, entry = self.status(reload_id)
                if status == "succeeded":
                    break
                if status in ("failed", "unknown"):
                    why = (self.dp._mask(str(entry.get("response"))) if status == "failed"
                           else "unknown to the Data Plane API (it restarted before reloading?)")
                    raise ReloadFailed(reload_id, entry.get("reload_timestamp"), why)
                if time.monotonic() + pause > deadline:
                    raise ReloadFailed(reload_id, None, f"still {status} after {RELOAD_WAIT:g} s")
                if stop.wait(pause):
                    raise Aborted("shutdown requested while waiting for a reload")
                pause = min(pause * 2, 1.0)

    def status(self, reload_id: str) -> tuple[str, Mapping[str, Any]]:
        """("succeeded" | "failed" | "in_progress" | "unknown", the record) of one reload."""
        try:
            _, payload, _ = self.dp.request("GET", f"/services/haproxy/reloads/{_q(reload_id)}",
                                         shape=Shape(lambda p: isinstance(p, dict), "a reload"))
        except DataPlaneError as exc:
            if exc.status == 404:
                return "unknown", {}
            raise
        entry = payload.get("data", payload)
        entry = entry if isinstance(entry, dict) else {}
        status = entry.get("status")
        return (status if status in ("succeeded", "failed") else "in_progress"), entry

    def debt(self) -> ReloadFailed | None:
        """The reload HAProxy still owes, from the API's reload records: the latest one failed
        and none succeeded after it (GET /services/haproxy/reloads: every failed reload kept a
        day, the last success, the pending one; v2.9 haproxy/reload_agent.go GetReloads). Ids
        are DATE-N, N counting reloads since dataplaneapi started: their order is the records'.
        The records do not outlive a dataplaneapi restart: a debt from before one is known only
        to the daemon that saw it."""
        _, payload, _ = self.dp.request("GET", "/services/haproxy/reloads",
                                     shape=Shape(_reloads, "a list of reloads"))
        done = [r for r in payload or [] if r.get("status") in ("failed", "succeeded")
                and _reload_order(r.get("id")) is not None]
        latest = max(done, key=lambda r: _reload_order(r["id"]), default=None)
        if latest is None or latest["status"] != "failed":
            return None
        return ReloadFailed(latest["id"], latest.get("reload_timestamp"),
                            self.dp._mask(str(latest.get("response"))))

    def make(self, version: int, stop: StopFlag) -> Applied:
        """A reload of what the API holds, confirmed: an empty transaction committed at
        `version`. A commit writes the API's configuration to the file HAProxy reads
        (client-native configuration/transaction.go commitTransaction) and schedules a reload
        (v2.9 handlers/transaction.go CommitTransactionHandlerImpl: 202 + Reload-ID), which
        the reload agent records when it succeeds (reload_agent.go handleReload, succeedReload)
        and the records then show the debt paid. (A force_reload commit reloads at once but,
        with no reload pending, records nothing: a fresh process would read the old failure
        as the latest record and reload again.) ReloadFailed when it fails too."""
        transactions = _Transactions(self.dp)
        txn, committed = transactions.start(version), False
        try:
            done = transactions._commit_transaction(txn)
            committed = True
        finally:
            if not committed:
                transactions.delete(txn)
        self.wait(done.reloads, stop)
        return done


class _Transactions:
    """How a plan's backends are written through Data Plane transactions: each backend's
    writes (the v3 full section or v2's request per change), a transaction started at the
    version read, committed; a backend the API refuses left out, the others committed
    without it; transactions that can never commit cleaned up. Sends through its DataPlane."""

    def __init__(self, dp: "DataPlane"):
        self.dp = dp

    def _writes(self, b: BackendPlan) -> list[tuple[str, str, dict[str, Any], Any]]:
        """The requests (method, path, query, body) that apply one backend's plan inside a
        transaction. v3: one full-section write carrying every field and child list read and
        every server, ours and others' (client-native structured_backends.go rebuilds the
        section from the body alone). v2 has no full sections: one request per change."""
        conf = "/services/haproxy/configuration"
        if self.dp.api == "v3":
            full = {**b.fields, "servers": b.servers}
            if b.create:
                return [("POST", f"{conf}/backends", {"full_section": "true"}, full)]
            return [("PUT", f"{conf}/backends/{_q(b.name)}", {"full_section": "true"}, full)]
        if b.create:
            return [("POST", f"{conf}/backends", {}, b.fields),
                    *(("POST", f"{conf}/servers", {"backend": b.name}, body) for body
                      in b.servers.values())]
        out = [("PUT", f"{conf}/backends/{_q(b.name)}", {}, b.fields)] if b.fields_changed else []
        for c in b.changes:
            if c.action == "add":
                out.append(("POST", f"{conf}/servers", {"backend": b.name}, c.body))
            elif c.action == "update":
                out.append(("PUT", f"{conf}/servers/{c.name}", {"backend": b.name}, c.body))
            else:
                out.append(("DELETE", f"{conf}/servers/{c.name}", {"backend": b.name}, None))
        return out

    def apply(self, plan: Plan, version: int, stop: StopFlag) -> Applied:
        """Every write of the plan in one transaction started at `version`, then commit.

        A backend whose write the API refuses (400/422) is left out and named in the result's
        `refused`; the others then go in a fresh transaction. When the commit itself is
        refused because the resulting configuration fails `haproxy -c` (400), one bad value
        would keep every backend out: the backends are committed in halves, and halves of
        those, until the ones HAProxy refuses are named and the others are applied.
        TransactionConflict when the configuration moved under it."""
        groups, reloads, refused = [list(plan.backends)], [], {}
        while groups:
            group = [b for b in groups.pop(0) if b.name not in refused]
            if not group:
                continue
            try:
                done = self._commit(group, version, stop)
            except CommitRefused as exc:
                if len(group) == 1:
                    refused[group[0].name] = str(exc)
                else:
                    groups[:0] = [group[:len(group) // 2], group[len(group) // 2:]]
                continue
            refused.update(done.refused)
            reloads += [r for r in done.reloads if r not in reloads]
            if done.version is not None or groups:
                version = done.version if done.version is not None else self.dp.version()
        return Applied(version, tuple(reloads), refused)

    def _commit(self, backends: Sequence[BackendPlan], version: int, stop: StopFlag) -> Applied:
        """These backends' writes in one transaction, committed; the ones whose writes were
        refused are left out (Applied.refused). The refused transaction cannot be committed
        as it is: client-native keeps an explicit transaction open after a failed write,
        holding whatever that write changed before it failed (configuration/transaction.go
        HandleError; structured_backends.go EditStructuredBackend deletes the section before
        rebuilding it). Whatever happens before a commit, the transaction is deleted; a
        commit refused by the configuration check (400: the transaction is marked failed)
        is CommitRefused."""
        refused: dict[str, str] = {}
        for _ in range(len(backends) + 1):      # each pass refuses one more backend, or commits
            backends = [b for b in backends if b.name not in refused]
            if not backends:
                return Applied(version, (), refused)
            txn, committed = self.start(version), False
            try:
                more = self._write_backends(backends, txn, stop)
                if not more:
                    done = self._commit_transaction(txn)
                    committed = True
                    return dataclasses.replace(done, refused=refused)
                refused.update(more)
            finally:
                if not committed:
                    self.delete(txn)
        raise DataPlaneError("the Data Plane API kept refusing backends")  # pragma: no cover

    def _commit_transaction(self, txn: str) -> Applied:
        try:
            status, _, headers = self.dp.request("PUT", f"/services/haproxy/transactions/{txn}")
        except DataPlaneError as exc:
            if exc.status == 400 and not isinstance(exc, TransactionConflict):
                raise CommitRefused(f"HAProxy refuses the configuration with it: {exc.body}",
                                    400, exc.body) from None
            raise
        return Applied(_int_header(headers.get("Configuration-Version")),
                       _reload_ids(status, headers))

    def start(self, version: int) -> str:
        """A new transaction at `version`, its id. dataplaneapi refuses one past
        --max-open-transactions (20) in progress (429: handlers/transaction.go,
        configure_data_plane.go actualCount counts status in_progress); then the transactions
        that can never commit are deleted and the start is tried once more."""
        path = "/services/haproxy/transactions"
        for attempt in (1, 2):
            try:
                _, payload, _ = self.dp.request("POST", path, {"version": version},
                                             shape=Shape(_transaction, "a transaction"))
                return payload["id"]
            except DataPlaneError as exc:
                if exc.status != 429 or attempt == 2 or not self._delete_dead_transactions(version):
                    if exc.status == 429:
                        raise DataPlaneError(f"{exc}; {self._transactions_advice(version)}",
                                             429) from None
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_transactions(self) -> list[Mapping[str, Any]]:
        _, payload, _ = self.dp.request("GET", "/services/haproxy/transactions",
                                        shape=Shape(_transactions, "a list of transactions"))
        return payload or []

    def _delete_dead_transactions(self, version: int) -> int:
        """Delete the transactions that can never commit: outdated, failed, or started on a
        version older than `version` (a commit checks it: client-native commitTransaction). An
        in_progress transaction on the current version may be another client's, about to
        commit: never touched. The number deleted."""
        dead = [t["id"] for t in self._open_transactions()
                if t.get("status") in ("outdated", "failed")
                or (t.get("status") == "in_progress" and _is_count(t.get("_version"))
                    and t["_version"] < version)]
        for txn in dead:
            self.delete(txn)
        if dead:
            log.warning(
                "the Data Plane API had too many open transactions: deleted %d that could never "
                "commit (outdated, failed or on a version older than %d)", len(dead), version,
                extra={"event": "transactions_deleted", "count": len(dead)})
        return len(dead)

    def _transactions_advice(self, version: int) -> str:
        live = [t["id"] for t in self._open_transactions() if t.get("status") == "in_progress"]
        return (f"{len(live)} transaction(s) in progress on version {version}, none of them this "
                "program's: another client's, or leaked by a client that died mid-transaction. "
                "They "
                "are not deleted here (one may be about to commit); if no other client writes to "
                "this "
                f"HAProxy, delete them (DELETE /{self.dp.api}/services/haproxy/transactions/ID: "
                f"{', '.join(live[:5])}{' ...' if len(live) > 5 else ''}) or restart dataplaneapi")

    def _write_backends(self, backends: Sequence[BackendPlan], txn: str,
                        stop: StopFlag) -> dict[str, str]:
        """Send each backend's writes in transaction `txn`; the backends refused, and why."""
        refused = {}
        for b in backends:
            try:
                for method, path, query, body in self._writes(b):
                    if stop.is_set():
                        raise Aborted("shutdown requested: transaction abandoned")
                    self.dp.request(method, path, {**query, "transaction_id": txn}, body)
            except DataPlaneError as exc:
                if exc.status not in REFUSED_STATUSES or isinstance(exc, TransactionConflict):
                    raise
                # A peer's commit while ours is open marks ours outdated and drops it: the next
                # write gets 400 "transaction ... does not exist", not 406/409 (dataplaneapi 2.9
                # misc/misc.go:84-89, handlers/transaction.go:88-94). That is a conflict.
                if not self.transaction_open(txn):
                    raise TransactionConflict(f"transaction {txn} ended under us (another client "
                                              f"committed): {exc}", 409) from None
                refused[b.name] = str(exc)
        return refused

    def transaction_open(self, txn: str) -> bool:
        """Whether transaction `txn` is still in progress (a peer's commit ends it)."""
        try:
            _, payload, _ = self.dp.request("GET", f"/services/haproxy/transactions/{txn}",
                                         shape=Shape(_transaction, "a transaction"))
        except DataPlaneError as exc:
            if exc.status == 404:
                return False
            raise
        return payload.get("status") == "in_progress"

    def delete(self, txn: str) -> None:
        """Delete a transaction; one that is already gone is fine; a failure is logged."""
        try:
            self.dp.request("DELETE", f"/services/haproxy/transactions/{txn}",
                            timeout=CLEANUP_TIMEOUT, urgent=True)
        except DataPlaneError as exc:
            if exc.status != 404:
                log.error("could not delete transaction %s: %s", txn, exc,
                          extra={"event": "transaction_leak", "transaction": txn})


def _runtime_steps(change: ServerChange) -> list[Mapping[str, Any]]:
    """The bodies of one hybrid write. dataplaneapi lifts maintenance before it changes the
    address (v2.9 handlers/runtime.go: `set server state ready`, then `set server addr`), so
    one PUT that unparks a slot sends traffic to the parked address for a moment: first
    move the address while still in maintenance, then lift maintenance."""
    body = change.body or {}
    return [{**body, "maintenance": "enabled"}, body] if change.unparks else [body]


def _reload_ids(status: int, headers: Mapping[str, str]) -> tuple[str, ...]:
    """The reload a 202 announces ("" when it names none); a 200 or 201 caused none."""
    if status != 202:
        return ()
    return (headers.get("Reload-ID") or "",)


def _release(info: Any) -> tuple[int, ...]:
    """(3, 4, 2) from /info's api.version "v3.4.2 ..."; (0,) when it says nothing readable."""
    version = ((info or {}).get("api") or {}).get("version") if isinstance(info, dict) else None
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", str(version or ""))
    return (int(found[1]), int(found[2]), int(found[3] or 0)) if found else (0,)


# The shapes of the answers the program reads (testing/spec: version is an integer;
# transaction {id, status, _version}; backends lists of named objects, v3 full sections
# carrying servers as a map by name; v2 GET bodies wrapped in {"_version", "data"}).
def _is_count(value: Any) -> bool:
    """A JSON number that counts something (a version, a port, a total, a time): an int >= 0,
    not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_header(value: str | None) -> int | None:
    return int(value) if value and value.isascii() and value.isdigit() else None


def _named(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                           for i in items)


def _full_sections(payload: Any) -> bool:
    return payload is None or (_named(payload)
                               and all(_server_map(b.get("servers", {})) for b in payload))


def _server_map(servers: Any) -> bool:
    return servers is None or (isinstance(servers, dict) and all(map(_server, servers.values())))


def _server(s: Any) -> bool:
    """A server object whose fields the planner compares have the model's types."""
    return (isinstance(s, dict) and isinstance(s.get("address", ""), str)
            and (s.get("port") is None or _is_count(s["port"]))
            and isinstance(s.get("maintenance", ""), str))


def _wrapped_list(payload: Any) -> bool:
    return (isinstance(payload, dict) and _is_count(payload.get("_version", 0))
            and _named(payload.get("data")))


def _wrapped_servers(payload: Any) -> bool:
    return _wrapped_list(payload) and all(map(_server, payload["data"]))


def _transaction(payload: Any) -> bool:
    # Real ids are UUIDs; the id goes into request paths, so nothing else is taken.
    return isinstance(payload, dict) and isinstance(payload.get("id"), str) \
        and re.fullmatch(r"[A-Za-z0-9-]{1,64}", payload["id"]) is not None


def _transactions(payload: Any) -> bool:
    return payload is None or (isinstance(payload, list) and all(map(_transaction, payload)))


def _reloads(payload: Any) -> bool:
    return payload is None or (isinstance(payload, list)
                               and all(isinstance(r, dict) for r in payload))


def _reload_order(reload_id: Any) -> tuple[str, int] | None:
    """(date, N) of a reload id DATE-N (YYYY-MM-DD-N, the spec's pattern); None for another."""
    found = re.fullmatch(r"(\d{4}-\d{2}-\d{2})-(\d{1,18})",
                         reload_id) if isinstance(reload_id, str) else None
    return (found[1], int(found[2])) if found else None


def _native_stats(payload: Any) -> bool:
    """v2: a list of collections, one per runtime API; v3: one collection (testing/spec
    native_stats). Each collection: {"runtimeAPI", "error"?, "stats": [native_stat]}."""
    collections = payload if isinstance(payload, list) else [payload]
    return all(isinstance(c, dict) and isinstance(c.get("stats") or [], list)
               and all(isinstance(i, dict) for i in c.get("stats") or []) for c in collections)


def current_sessions(payload: Any, backend: str) -> dict[str, int | None]:
    """scur of each server of `backend`, summed over the runtime APIs (v2 may have several);
    None for a server one collection gives no integer for."""
    found: dict[str, int | None] = {}
    for c in payload if isinstance(payload, list) else [payload]:
        for i in c.get("stats") or []:
            if i.get("type") == "server" and i.get("backend_name") == backend and isinstance(i.get(
                    "name"), str):
                n = (i.get("stats") or {}).get("scur") if isinstance(i.get("stats"), dict) else None
                before = found.get(i["name"], 0)
                found[i["name"]] = before + n if _is_count(n) and before is not None else None
    return found


def _backend_state(full: Mapping[str, Any]) -> BackendState:
    """A v3 full-section backend: its servers apart, every other field and child list kept."""
    return BackendState(full["name"], {k: v for k, v in full.items() if k != "servers"},
                        full.get("servers") or {})


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# === Logging ===
_LOG_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                                  "asctime"}


# .target: the HAProxy target the current thread works for; its lines carry it as a field.
_log_context = threading.local()


class _Redacting(logging.Formatter):
    """Keeps passwords, tokens and Authorization headers out of every line, including
    tracebacks: known secret values and anything shaped like a credential are masked."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = list(secrets)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def format(self, record: logging.LogRecord) -> str:
        target = getattr(_log_context, "target", None)
        if target and not hasattr(record, "target"):
            record.target = target
        return self.redact(self.render(record))

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class JsonFormatter(_Redacting):
    """One JSON object per line: ts (UTC RFC 3339, ms), level, msg, event, then fields."""

    def render(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S",
                           time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"ts": ts, "level": record.levelname.lower(), "msg": record.getMessage(),
               "event": getattr(record, "event", "log")}
        out.update((k, v) for k, v in vars(record).items() if k not in _LOG_RESERVED and k
                   != "event")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(_Redacting):
    """For people; no timestamp under journald, which adds its own."""

    def __init__(self, secrets: Iterable[str] = (), timestamps: bool = True):
        super().__init__(secrets)
        self.timestamps = timestamps

    def render(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _LOG_RESERVED)
        line = f"{record.levelname.lower()}: {record.getMessage()}" + (f" [{fields}]" if fields
                                                                       else "")
        if self.timestamps:
            line = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(record.created)) + line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str, fmt: str, secrets: Iterable[str], stream: Any = None,
                  env: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json"
                         else TextFormatter(secrets, timestamps="JOURNAL_STREAM"
                                            not in (os.environ if env is None else env)))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)             # the SDK's loggers stay quiet ...
    log.setLevel(getattr(logging, level))      # ... ours speaks at the configured level


def secrets_of(cfg: Config, env: Mapping[str, str]) -> list[str]:
    """What no printed line may show: every target's Data Plane password and its Basic header
    value, and every secret-named environment variable (so also config values taken from one)."""
    haproxy = [cfg.haproxy, *(c.haproxy for _, c in target_configs(cfg))]
    return [*(s for h in haproxy for s in (h.password, basic_credentials(h))), *secret_values(env)]


# === Cycle ===
MAX_ATTEMPTS = 3


@dataclass
class CycleReport:
    """What a cycle did, for logs, metrics and the exit code."""
    # "steady", "unchanged", "draining", "applied", "held", "partial" or "failed"
    result: str = "failed"
    plan: Plan | None = None
    instances: int = 0
    skipped: int = 0
    skips: tuple[Skip, ...] | None = None   # None until discovery has succeeded
    azure_requests: int = 0
    # Azure's read buckets: the least left
    azure_quota: Mapping[str, int] = field(default_factory=dict)
    azure_wait: float = 0.0       # the next cycle waits this long at least (Azure's buckets refill)
    dataplane_requests: int = 0
    transactions: dict[str, int] = field(default_factory=dict)   # "committed", "conflict", ...
    reloads: int = 0              # HAProxy reloads the cycle's writes caused (Reload-IDs seen)
    duration: float = 0.0
    error: str = ""
    refused: dict[str, str] = field(default_factory=dict)        # backend -> the API's refusal
    view: dict[str, Any] | None = None     # status_view once planned (after applying: what it left)
    target: str = ""              # the target's name (haproxy.targets[i].name, else its base_url)
    failure: Exception | None = None       # why this target's cycle failed, when it did
    reload_failures: int = 0      # reloads seen failing (or lost) this cycle
    # fields found not kept this cycle (_end_write_loops)
    ignored: list[str] = field(default_factory=list)
    behind: ReloadFailed | None = None     # the reload HAProxy still owes after the cycle
    # since when the mass-drain guard holds servers (wall clock)
    held_since: float | None = None
    drift: dict[str, list[str]] = field(default_factory=dict)   # backend -> what HAProxy held
                                           # differently from what this program wrote (drifted)


@dataclass(frozen=True)
class Seen:
    """One discovery, selected and grouped: what every target's cycle plans from."""
    groups: Mapping[ServiceKey, list[Member]]
    skipped: list[Skip]
    fingerprint: str


@dataclass(frozen=True)
class Clocks:
    """The two clocks: `monotonic` times intervals, deadlines and backoff; `wall` is what a
    person is shown, and what drains are timed by (HAProxy's drains outlive this process)."""
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


@dataclass(frozen=True)
class Pass:
    """What every target's part of one cycle shares: the discovery, the shutdown flag,
    whether it only looks (--dry-run, --status), when it began (monotonic), the clocks."""
    seen: Seen
    stop: StopFlag
    dry_run: bool = False
    started: float = 0.0
    clocks: Clocks = Clocks()


class _Look(typing.NamedTuple):
    """What one attempt at a target planned with: the configuration (less the fields its
    Data Plane API does not keep), the backends read, and the wall clock's time then."""
    cfg: Config
    actual: Mapping[str, BackendState]
    now: float


def discover(cfg: Config, source: Source, stop: StopFlag, report: CycleReport) -> Seen:
    """Read Azure once and group what it holds; fills the discovery part of `report`."""
    discovery = source.discover()
    report.azure_requests, report.azure_quota = discovery.requests, discovery.quota
    report.azure_wait = discovery.wait
    groups, skipped = select_instances(discovery.instances, cfg)
    skipped = [*discovery.skipped, *skipped]
    report.instances, report.skipped = sum(map(len, groups.values())), len(skipped)
    report.skips = tuple(skipped)
    if stop.is_set():
        raise Aborted("shutdown requested")
    return Seen(groups, skipped, fingerprint(groups))


def reconcile_target(run: "TargetRun", p: Pass, report: CycleReport) -> Plan | None:
    """Plan against what HAProxy holds, apply; re-plan on a conflict. Fills `report` as it
    goes; the plan applied (None when steady).

    Steady state costs one Data Plane request: the configuration version, when it and
    the discovery are what the last cycle left and nothing is draining. The version is
    read before the backends it guards, so a change landing between the two reads is a
    conflict, not overwritten.
    """
    if not run.state.looked:
        _first_look(run)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return _attempt(run, p, report, attempt)
        except TransactionConflict as exc:
            report.transactions["conflict"] = report.transactions.get("conflict", 0) + 1
            log.warning("configuration changed under us (attempt %d of %d): %s", attempt,
                        MAX_ATTEMPTS,
                        exc, extra={"event": "conflict", "attempt": attempt})
    raise DataPlaneError(f"gave up after {MAX_ATTEMPTS} attempts: the configuration kept changing")


def _attempt(run: "TargetRun", p: Pass, report: CycleReport, attempt: int) -> Plan | None:
    """One try at a target: a reload it owes first, then steady, a look (dry run), or the
    plan applied and what HAProxy holds after it recorded."""
    state, target = run.state, run.dp
    version = target.version()
    if state.debt is not None and not p.dry_run:
        version = _pay_debt(target, state, version, p.stop, report)
    # The discovery our last cycle left HAProxy settled with, and no drain under way: whatever
    # the plan changes now was changed in HAProxy by someone else (drift), not by Azure.
    same = state.fingerprint == p.seen.fingerprint and not state.draining
    if attempt == 1 and not p.dry_run and same and version == state.version:
        report.result = "steady"
        return None
    cfg = without_fields(run.cfg, state.unkept)
    prefix = cfg.haproxy.backend.name_prefix + cfg.haproxy.backend.name_separator
    look = _Look(cfg, target.read_backends(prefix), p.clocks.wall())
    decision, sessions = _decide(run, p, look)
    if p.dry_run:
        draining = state.draining or _under_way(target, decision.plan)
        report.view = status_view(p.seen, look.actual, decision, cfg, run.name, look.now, draining)
        return decision.plan
    decision, sessions, look, rewrites = _guard_rewrites(run, p, look, decision, sessions, report)
    try:
        new_version = _apply(decision.plan, target, version, p.stop, look.cfg, report)
    except ReloadFailed as exc:
        state.debt, report.reload_failures = exc, report.reload_failures + 1
        raise
    report.drift = drifted(decision.plan, look.actual) if same else {}
    _runtime_states(decision.plan, target, report)
    _record(decision, new_version, state, report)
    state.rewrites = rewrites
    _conclude(run, p, look, decision, sessions, report)
    return decision.plan


def drifted(plan: Plan, actual: Mapping[str, BackendState]) -> dict[str, list[str]]:
    """For each backend of `plan`, what HAProxy held differently from it: "backend" (gone),
    "backend.KEY", "server.KEY" (of a server updated), "add.NAME" or "delete.NAME"."""
    return {b.name: sorted(_differing(b.wanted, actual[b.name].fields, b.changes))
            if b.name in actual else ["backend"] for b in plan.backends}


def _guard_rewrites(run: "TargetRun", p: Pass, look: _Look, decision: "Decision",
                    sessions: dict[str, int | None], report: CycleReport
                    ) -> tuple["Decision", dict[str, int | None], _Look, dict[str, Rewrite]]:
    """The rewrite guard (rewrite_guard) on the plan: a backend written with the same desired
    state REWRITE_LIMIT cycles running and read back different each time is refused (not
    written again until it changes); fields found not kept are planned without from now on.
    The guard's count, for State.rewrites once the writes are done."""
    rewrites, looping = rewrite_guard(decision.plan, look.actual, run.state.rewrites)
    if looping and _end_write_loops(looping, run.state, run.name, report):
        # plan again without them
        look = look._replace(cfg=without_fields(look.cfg, run.state.unkept))
        decision, sessions = _decide(run, p, look)
        rewrites, looping = rewrite_guard(decision.plan, look.actual, run.state.rewrites)
    report.refused = {
        b: f"written with the same desired state {REWRITE_LIMIT} cycles running and read "
        f"back different each time ({', '.join(sorted(keys))}): not written again until "
        "it changes" for b, keys in looping.items()}
    return decision, sessions, look, rewrites


def _conclude(run: "TargetRun", p: Pass, look: _Look, decision: "Decision",
              sessions: dict[str, int | None], report: CycleReport) -> None:
    """After the writes: what HAProxy holds now, planned again, for the view's drift (a held
    drain, a refused backend) and to know whether this is a fixpoint. The shortcut to steady
    is only taken from one: slots parked now that a later shrink may remove need the next
    cycle to plan again."""
    plan, seen, state = decision.plan, p.seen, run.state
    done = state_after(look.actual,
                       Plan(tuple(b for b in plan.backends if b.name not in report.refused)))
    after = decision if plan.empty else plan_cycle(seen.groups, seen.skipped, done, state, look.cfg,
                                                   look.now, sessions)
    after = dataclasses.replace(after, plan=dataclasses.replace(after.plan, held=plan.held),
                                drain_since=decision.drain_since)
    report.view = status_view(seen, done, after, look.cfg, run.name, look.now, state.draining)
    settled = not plan.held and not report.refused and after.plan.empty
    state.fingerprint = seen.fingerprint if settled else None
    report.plan = plan
    report.result = ("partial" if report.refused else "held" if plan.held
                     else "applied" if not plan.empty or report.reloads
                     else "draining" if plan.draining else "unchanged")
    _log_refused(report.refused, seen.groups, look.cfg)


def _first_look(run: "TargetRun") -> None:
    """What a fresh State learns from its target once: a reload HAProxy still owes (from the
    API's reload records), and the fields its release answers 2xx to and forgets."""
    state = run.state
    state.debt = state.debt or run.dp.reload_debt()
    gone = run.dp.dropped_fields()
    for key in sorted(gone & configured_fields(run.cfg)):
        log.warning("the Data Plane API at %s does not keep %s (gone since dataplaneapi %s); it is "
                    "ignored from now on: remove it from the configuration", run.name,
                    key.replace(".", " field ", 1), ".".join(map(str, FIELDS_GONE[key])),
                    extra={"event": "field_ignored", "field": key})
    state.unkept |= gone
    state.looked = True


def _end_write_loops(looping: Mapping[str, frozenset[str]], state: State, name: str,
                     report: CycleReport) -> bool:
    """The params among the fields `looping` backends were read back without, ignored for this
    target from now on (one warning each); True when there are new ones to plan without. The
    other fields the program owns (addresses, names...): their backends are left out of the
    writes while their desired state is unchanged (rewrite_guard keeps counting)."""
    new: set[str] = set()
    for backend, keys in sorted(looping.items()):
        params = {k for k in keys if k.split(".", 1)[1] in
                  {"backend": BACKEND_PARAMS, "server": SERVER_PARAMS}.get(k.split(".", 1)[0], ())}
        for key in sorted(params - state.unkept - new):
            log.warning(
                "the Data Plane API at %s does not keep %s: backend %s was written with it %d "
                "cycles "
                "running and read back without it each time; it is ignored from now on", name,
                key.replace(".", " field ", 1), backend, REWRITE_LIMIT,
                extra={"event": "field_ignored", "field": key, "backend": backend})
        new |= params - state.unkept
    state.unkept |= new
    report.ignored += sorted(new)
    return bool(new)


def _pay_debt(target: Target, state: State, version: int, stop: StopFlag,
              report: CycleReport) -> int:
    """Reload HAProxy with what the API shows (State.debt: a reload failed, never confirmed or
    was lost); the version after it. Until that reload succeeds nothing is steady: the cycle
    fails (ReloadFailed) and the next one tries again, after the cycle's backoff."""
    log.error("%s; reloading it now", state.debt,
              extra={"event": "config_behind", "reload_id": state.debt.reload_id})
    try:
        done = target.make_reload(version, stop)
    except ReloadFailed as exc:
        state.debt, report.reload_failures = exc, report.reload_failures + 1
        raise
    report.reloads += len(done.reloads)
    report.transactions["committed"] = report.transactions.get("committed", 0) + 1
    log.info("HAProxy reloaded: it runs the configuration the Data Plane API shows",
             extra={"event": "config_caught_up", "reload_id": ",".join(done.reloads)})
    state.debt, state.fingerprint = None, None
    return done.version if done.version is not None else target.version()


def _record(decision: Decision, version: int | None, state: State, report: CycleReport) -> None:
    """What an applied cycle leaves in State. A refused backend keeps the slots HAProxy
    holds: the next cycle plans it afresh."""
    state.version = version
    state.assignments = {**decision.assignments,
                         **{n: state.assignments.get(n, {}) for n in report.refused}}
    state.drain_fingerprint, state.drain_streak = decision.drain_fingerprint, decision.drain_streak
    state.drain_since = decision.drain_since
    state.draining = decision.draining
    state.settled = {n: s for n, s in decision.settled.items() if n not in report.refused}


def _decide(run: "TargetRun", p: Pass, look: _Look) -> tuple[Decision, dict[str, int | None]]:
    """plan_cycle, and the sessions it was given. With servers to drain, each is set to
    drain (again: a reload forgets it), its sessions are read once no new ones can come,
    and the cycle is planned again: a server with none left is parked now."""
    groups, skipped = p.seen.groups, p.seen.skipped
    decision = plan_cycle(groups, skipped, look.actual, run.state, look.cfg, look.now)
    if p.dry_run or not decision.plan.draining:
        return decision, {}
    by_backend: dict[str, list[str]] = {}
    for d in decision.plan.draining:
        by_backend.setdefault(d.backend, []).append(d.server)
    sessions = {f"{b}/{s}": n for b, servers in by_backend.items()
                for s, n in _drain(run.dp, b, servers).items()}
    return plan_cycle(groups, skipped, look.actual, run.state, look.cfg, look.now,
                      sessions), sessions


def _drain(target: Target, backend: str, servers: Sequence[str]) -> dict[str, int | None]:
    """Set these servers of one backend to drain, then read their sessions (one stats
    request for the backend). A drain the API refuses is no drain: the server would only
    stay in rotation, so it counts as done (0, parked now). A drain or a count that does
    not come (no answer, an error, past DRAIN_CALL_TIMEOUT) is unknown: the server drains
    until its time is up, and the rest of the cycle goes on."""
    results = {s: _admin_state(target, backend, s, "drain") for s in servers}
    counts: dict[str, int | None] = {s: None if set_ is None else 0 for s, set_ in results.items()
                                     if not set_}
    draining = [s for s, set_ in results.items() if set_]
    if not draining:
        return counts
    try:
        read, why = target.sessions(backend, draining), "the native stats give no count for it"
    except DataPlaneError as exc:
        read, why = dict.fromkeys(draining), str(exc)
    for s in draining:
        if read.get(s) is None:
            log.warning("server %s/%s: sessions not readable, it drains until its time is up: %s",
                        backend,
                        s, why,
                        extra={"event": "drain_sessions_unknown", "backend": backend, "server": s})
    return {**counts, **{s: read.get(s) for s in draining}}


def _under_way(target: Target, plan: Plan) -> dict[str, dict[str, Drain]]:
    """For a look without memory (--status, --dry-run): the drains the plan would start that
    HAProxy runs already (another process began them, when: unknown, so since is NaN)."""
    out: dict[str, dict[str, Drain]] = {}
    for d in plan.draining:
        try:
            running = target.admin_state(d.backend, d.server) == "drain"
        except DataPlaneError:
            running = False          # unknown: shown as a drain to start
        if running:
            out.setdefault(d.backend, {})[d.server] = d._replace(since=math.nan, until=math.nan)
    return out


def _admin_state(target: Target, backend: str, server: str, admin_state: str) -> bool | None:
    """One runtime admin-state write: True when done, False (a warning) when the API refuses it
    (4xx), None (a warning) when it failed otherwise (no answer in time, a server error)."""
    try:
        target.set_admin_state(backend, server, admin_state)
    except DataPlaneError as exc:
        refused = exc.status is not None and 400 <= exc.status < 500
        then = (" (parked now instead)" if refused else " (it drains until its time is up)") \
            if admin_state == "drain" else ""
        log.warning("server %s/%s: could not set it %s at runtime%s: %s", backend, server,
                    admin_state, then, exc,
                    extra={"event": "admin_state_failed", "backend": backend, "server": server})
        return False if refused else None
    return True


def _runtime_states(plan: Plan, target: Target, report: CycleReport) -> None:
    """After the writes: a reload they caused forgot the runtime drains (they are sent
    again), and a server whose instance came back during its drain is set ready."""
    for d in plan.draining if report.reloads else ():
        if d.backend not in report.refused:
            _admin_state(target, d.backend, d.server, "drain")
    for name in plan.ready:
        backend, server = name.rsplit("/", 1)
        _admin_state(target, backend, server, "ready")


def _apply(plan: Plan, target: Target, version: int, stop: StopFlag, cfg: Config,
           report: CycleReport) -> int | None:
    """Transaction or runtime writes, as the mode and the plan say, leaving out the backends
    already in report.refused (the rewrite guard's); the version it ends at. The backends
    the API refuses join report.refused."""
    plan = dataclasses.replace(plan, backends=tuple(b for b in plan.backends if b.name
                                                    not in report.refused))
    if plan.empty:
        return version     # an empty transaction would still reload HAProxy: send none
    # Hybrid: runtime writes need no reload, but the Data Plane API checks the whole
    # configuration with `haproxy -c` for each of them; past hybrid_max_writes one
    # transaction (one check, one reload) is quicker.
    if (cfg.haproxy.apply_mode == "hybrid" and plan.runtime_only
            and plan.runtime_writes <= cfg.haproxy.hybrid_max_writes):
        done = target.apply_runtime(plan, version, stop)
    else:
        try:
            done = target.apply_transaction(plan, version, stop)
        except DiscoveryError as exc:
            if not isinstance(exc, TransactionConflict):
                report.transactions["failed"] = report.transactions.get("failed", 0) + 1
            raise
        if len(done.refused) < len(plan.backends):
            report.transactions["committed"] = report.transactions.get("committed", 0) + 1
    report.refused.update(done.refused)
    # Only a reload that ran makes the new version HAProxy's: until then (or when it
    # failed) the cycle has not applied anything, and the next one plans again.
    report.reloads += len(done.reloads)
    target.await_reloads(done.reloads, stop)
    return done.version


def _log_refused(refused: Mapping[str, str], groups: Mapping[ServiceKey, list[Member]],
                 cfg: Config) -> None:
    """One error line per refused backend, naming the instances that wait for it."""
    members = {backend_name(k, cfg.haproxy.backend): ms for k, ms in groups.items()}
    for name, error in sorted(refused.items()):
        served = ", ".join(f"{m.label} ({endpoint(m.address, m.port)})"
                           for m in members.get(name, [])) or "none"
        log.error("backend %s refused by the Data Plane API, its writes are left out of this cycle "
                  "(retried next cycle): %s; instances: %s", name, error, served,
                  extra={"event": "backend_refused", "backend": name,
                         "count": len(members.get(name, []))})


# Targets are applied at once, each from its own thread: a hanging HAProxy holds only itself.
TARGET_WORKERS = 8


@dataclass
class TargetRun:
    """One HAProxy target: its name, the configuration it runs with, its Data Plane client,
    what it remembers between cycles, and its own backoff."""
    name: str
    cfg: Config
    dp: Target
    state: State = field(default_factory=State)
    failures: int = 0             # its cycles failed in a row
    due: float = 0.0              # the clock time its backoff ends


def run_cycle(source: Source, runs: Sequence[TargetRun], stop: StopFlag, dry_run: bool = False,
              memory: State | None = None, clocks: Clocks = Clocks()) -> list[CycleReport]:
    """One discovery, planned and applied to each of `runs` independently and at the same
    time: a report per target, a failed one with its `failure`. A target that fails, or
    hangs until its timeout, costs the others nothing. A failed discovery raises (nothing
    is applied anywhere), and so does a shutdown, once every target has stopped.
    `memory` keeps the skips already warned about (default: the first target's state)."""
    started, first = clocks.monotonic(), CycleReport()
    p = Pass(discover(runs[0].cfg, source, stop, first), stop, dry_run, started, clocks)
    _log_skips(first, memory or runs[0].state)
    reports = [CycleReport(target=run.name, instances=first.instances, skipped=first.skipped,
                           skips=first.skips, azure_requests=first.azure_requests,
                           azure_quota=first.azure_quota, azure_wait=first.azure_wait) for run
               in runs]
    if len(runs) == 1:
        _target_cycle(runs[0], p, reports[0])
    else:
        pool = _Pool(min(len(runs), TARGET_WORKERS), "target")
        try:
            for job in [pool.submit(_target_cycle, run, p, report) for run, report
                        in zip(runs, reports)]:
                job.result()
        finally:
            pool.close()
    failed = [r for r in reports if r.failure is not None]
    if failed and (stop.is_set() or any(isinstance(r.failure, Aborted) for r in failed)):
        raise Aborted(failed[0].error)     # whatever failed, the shutdown is the news
    return reports


def _target_cycle(run: TargetRun, p: Pass, report: CycleReport) -> None:
    """One target's part of a cycle; whatever happens ends in `report`, and every line it
    logs carries the target's name."""
    _log_context.target = run.name
    try:
        _reconcile_into(run, p, report)
        if not p.dry_run and report.failure is None:
            _log_report(report, run.state)
    finally:
        _log_context.target = None


def _reconcile_into(run: TargetRun, p: Pass, report: CycleReport) -> None:
    """reconcile_target, its failure (whatever it is: it is this target's own) and its
    figures in `report`."""
    before = run.dp.requests
    try:
        report.plan = reconcile_target(run, p, report) or report.plan
    except Exception as exc:  # one target's failure, whatever it is, is its own
        _target_failed(run, p, report, exc)
    finally:
        report.duration = p.clocks.monotonic() - p.started
        report.dataplane_requests = run.dp.requests - before
        report.behind = run.state.debt
        held = report.plan is not None and report.plan.held
        report.held_since = run.state.drain_since if held else None
        for t in report.view["targets"] if report.view and report.behind else ():
            t["behind"] = str(report.behind)


def _target_failed(run: TargetRun, p: Pass, report: CycleReport, exc: Exception) -> None:
    """A target's failure in its report; a bug's traceback is logged where it happened (the
    caller logs the cycle_failed record, which knows what comes next)."""
    report.result, report.failure, report.error = "failed", exc, failure_text(exc)
    report.view = {"discovery": discovery_view(p.seen.groups, p.seen.skipped, run.cfg),
                   "targets": [{"target": run.name, "ok": False, "error": report.error}]}
    if not isinstance(exc, DiscoveryError):
        log.exception("cycle failed unexpectedly",
                      extra={"event": "unexpected_error", "target": run.name})


def failure_text(exc: BaseException) -> str:
    """Why a cycle failed, in one line: the message of an error the program expects, else
    the bug's type and message."""
    if isinstance(exc, DiscoveryError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def log_cycle_failed(error: str, failures: int = 0, target: str = "",
                     next_try: float | None = None) -> None:
    """The cycle_failed record: why, how many cycles in a row (the daemon), the target that
    failed alone, and (the daemon) the seconds until the next try."""
    fields: dict[str, Any] = {"event": "cycle_failed"}
    if failures:
        fields["failures"] = failures
    if target:
        fields["target"] = target
    then = ""
    if next_try is not None:
        fields["next_try_in_seconds"] = round(next_try, 1)
        then = f"; next try in {round(next_try, 1):g} s"
    log.warning("cycle failed: %s%s", error, then, extra=fields)


def _log_skips(report: CycleReport, state: State) -> None:
    """Each skip is warned about once, when it first appears, whatever the cycle's result:
    a steady cycle logs nothing else, and skips are not part of its fingerprint."""
    if report.skips is None:       # discovery failed: nothing is known about skips
        return
    reasons = {f"{s.instance}" + (f" ({s.id})" if s.id else "") + f": {s.reason}" for s
               in report.skips}
    for reason in sorted(reasons - state.skipped):
        log.warning("instance skipped: %s", reason, extra={"event": "skip"})
    state.skipped = frozenset(reasons)


def _log_backends(plan: Plan, drift: Mapping[str, list[str]]) -> None:
    """One line per backend written: a change in discovery, or drift repaired (`drift`)."""
    for b in plan.backends:
        if b.name not in drift:
            log.info("backend %s changed: %d servers", b.name, len(b.changes),
                     extra={"event": "backend_changed", "backend": b.name, "count": len(b.changes),
                            "slots": b.slots, "live": b.live})
            continue
        servers = [c.name for c in b.changes]
        log.warning("backend %s differed from what was written (%s%s), with no change in Azure: "
                    "repaired", b.name, ", ".join(drift[b.name]),
                    f"; servers {', '.join(servers)}" if servers else "",
                    extra={"event": "drift_repaired", "backend": b.name, "fields": drift[b.name],
                           "servers": servers, "count": len(servers)})


def _log_report(report: CycleReport, state: State) -> None:
    plan = report.plan
    if plan is not None:
        for warning in sorted(set(plan.warnings) - state.warned):     # each warning once
            log.warning("%s", warning, extra={"event": "server_id_taken"})
        state.warned = frozenset(plan.warnings)
        for held in plan.held:
            log.warning("mass-drain guard holds %s live", held,
                        extra={"event": "drain_held", "server": held})
        if plan.held and state.drain_since is not None:
            log.warning(
                "the mass-drain guard holds %d servers live since %s (the same discovery %d cycles "
                "in a "
                "row); it lets them park once that discovery has lasted "
                "safety.drain_confirm_cycles "
                "cycles and safety.drain_confirm_seconds. If it is real, apply it now: run --once "
                "--confirm-drain, or set safety.drain_confirm_seconds to 0 and send SIGHUP",
                len(plan.held), utc(state.drain_since), state.drain_streak,
                extra={"event": "drain_held_summary", "count": len(plan.held)})
        for d in plan.draining:
            log.info("server %s/%s (%s) draining since %s, parked by %s at the latest", d.backend,
                     d.server, endpoint(d.address, d.port), utc(d.since), utc(d.until),
                     extra={"event": "draining", "backend": d.backend, "server": d.server})
        _log_backends(plan, report.drift)
    log.info("cycle %s", report.result,
             extra={"event": "cycle", "target": report.target, "result": report.result,
                    "instances": report.instances,
                    "skipped": report.skipped, "azure_requests": report.azure_requests,
                    "dataplane_requests": report.dataplane_requests,
                    "duration_ms": round(report.duration * 1000)})


# === Metrics and health endpoint ===
class Metrics:
    """Counters and gauges in the Prometheus text format; updated by the loop only. What is
    per target carries the label target="NAME"; what is per discovery carries none."""

    # Each family's type and help line (# TYPE, # HELP), by name without the prefix.
    HELP = {
        "azure_quota_remaining": ("gauge", "The least left in each of Azure's read buckets "
                                  "during the last discovery, by bucket"),
        "azure_requests_total": ("counter", "Requests sent to Azure by discoveries"),
        "backends": ("gauge", "Our backends in HAProxy"),
        "backends_refused_total": ("counter", "Backend writes the Data Plane API refused "
                                   "(400, 422)"),
        "cycle_duration_seconds": ("summary", "Time the cycles took"),
        "cycles_total": ("counter", "Cycles, by result: steady, unchanged, draining, applied, "
                         "held, partial, failed"),
        "dataplane_requests_total": ("counter", "Requests sent to the Data Plane API"),
        "drain_deadline_timestamp_seconds": ("gauge", "When the first draining server is due to "
                                             "be parked (Unix time; 0: none draining)"),
        "drain_held_since_timestamp_seconds": ("gauge", "Since when the mass-drain guard holds "
                                               "servers live (Unix time; 0: not holding)"),
        "fields_ignored_total": ("counter", "Fields found not kept by the Data Plane API"),
        "haproxy_config_behind": ("gauge", "1 while HAProxy owes a reload: it may run an older "
                                  "configuration than the Data Plane API shows"),
        "held_drains_total": ("counter", "Parks the mass-drain guard held back, cycle after cycle"),
        "instances_discovered": ("gauge", "Instances the last successful discovery serves"),
        "instances_skipped": ("gauge", "Instances with the service tags that the last successful "
                              "discovery skipped (a bad tag value, no address)"),
        "last_success_timestamp_seconds": ("gauge", "When the last successful cycle ended "
                                           "(Unix time)"),
        "polling_interval_seconds": ("gauge", "polling.interval_seconds: /healthz fails after "
                                     "three of them without a successful cycle"),
        "reload_failures_total": ("counter", "HAProxy reloads seen failing, lost or never "
                                  "confirmed"),
        "reloads_total": ("counter", "HAProxy reloads our writes caused"),
        "servers_draining": ("gauge", "Servers draining, per target and per backend"),
        "servers_held": ("gauge", "Servers the mass-drain guard keeps live"),
        "servers_live": ("gauge", "Servers pointing at an instance, per target and per backend"),
        "servers_parked": ("gauge", "Servers parked in maintenance, per target and per backend"),
        "services": ("gauge", "Services discovered"),
        "transactions_total": ("counter", "Data Plane API transactions, by result"),
    }

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock      # health is measured on `clock`
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.gauges: dict[tuple[str, str], float] = {}
        # (name, labels) per target and backend
        self.backend_gauges: dict[tuple[str, str], float] = {}
        # the last status view's parts, for /state
        self.discovery: dict[str, Any] | None = None
        self.views: dict[str, dict[str, Any]] = {}               # ... by target
        self.targets: list[str] = []                             # the targets in use, in order
        self._success: dict[str, float] = {}        # time.monotonic() of each target's last success
        # targets whose HAProxy runs an older configuration
        self.behind: dict[str, str] = {}

    def use(self, targets: Sequence[str]) -> None:
        """The targets a (re)loaded configuration runs: one added by a reload has three
        intervals for its first success, as at start; a removed one's views and gauges go."""
        with self._lock:
            started = self.clock()
            self._success = {t: self._success.get(t, started) for t
                             in targets} if self._success else {}
            self.views = {t: v for t, v in self.views.items() if t in targets}
            self.behind = {t: v for t, v in self.behind.items() if t in targets}
            labels = {"", *(_target_label(t) for t in targets)}
            self.gauges = {k: v for k, v in self.gauges.items() if k[1] in labels}
            self.backend_gauges = backend_gauges({"targets": list(self.views.values())})
            self.targets = list(targets)

    def record(self, reports: Sequence[CycleReport], now: float) -> None:
        """A cycle's reports, one per target it ran on: the discovery's figures once."""
        with self._lock:
            self._inc("azure_requests_total", "", reports[0].azure_requests)
            for bucket, left in reports[0].azure_quota.items():
                self.gauges[("azure_quota_remaining", f'bucket="{_label_value(bucket)}"')] = left
            if reports[0].skips is not None:      # a failed discovery keeps the last figures
                self.gauges[("instances_discovered", "")] = reports[0].instances
                self.gauges[("instances_skipped", "")] = reports[0].skipped
            for report in reports:
                self._record_target(report, now)
            if any(r.view is not None for r in reports):     # steady cycles read no backends
                self.backend_gauges = backend_gauges({"targets": list(self.views.values())})

    def _inc(self, name: str, label: str, by: float = 1) -> None:
        self.counters[(name, label)] = self.counters.get((name, label), 0) + by

    def _record_target(self, report: CycleReport, now: float) -> None:
        t = _target_label(report.target)
        self._inc("cycles_total", f'{t},result="{report.result}"')
        self._inc("cycle_duration_seconds_count", t)
        for name, by in (("cycle_duration_seconds_sum", report.duration),
                         ("reloads_total", report.reloads),
                         ("dataplane_requests_total", report.dataplane_requests),
                         ("backends_refused_total", len(report.refused)),
                         ("reload_failures_total", report.reload_failures),
                         ("fields_ignored_total", len(report.ignored))):
            self._inc(name, t, by)
        self.gauges[("haproxy_config_behind", t)] = 1 if report.behind else 0
        if report.behind:
            self.behind[report.target] = str(report.behind)
        else:
            self.behind.pop(report.target, None)
        for result, n in report.transactions.items():
            self._inc("transactions_total", f'{t},result="{result}"', n)
        if report.plan is not None:
            plan = report.plan
            self._inc("held_drains_total", t, len(plan.held))
            self.gauges[("servers_held", t)] = len(plan.held)
            self.gauges[("drain_held_since_timestamp_seconds", t)] = report.held_since or 0
            self.gauges[("drain_deadline_timestamp_seconds", t)] = min(
                (d.until for d in plan.draining), default=0)
            self.gauges[("services", "")] = plan.services
            self.gauges.update({("backends", t): plan.our_backends, ("servers_live", t): plan.live,
                                ("servers_parked", t): plan.slots - plan.live - len(plan.draining),
                                ("servers_draining", t): len(plan.draining)})
        if report.view is not None:      # a steady cycle reads nothing: the last view holds
            self.discovery = report.view["discovery"]
            entry = report.view["targets"][0]
            # A target that failed keeps what it held last, marked as not readable now.
            self.views[report.target] = entry if entry["ok"] else {**self.views.get(report.target,
                                                                                    {}), **entry}
        if report.result != "failed":
            self._success[report.target] = self.clock()
            self.gauges[("last_success_timestamp_seconds", t)] = now
            if report.view is None and report.target in self.views:
                self.views[report.target] = {k: v for k, v in self.views[report.target].items() if k
                                             != "error"}
                self.views[report.target]["ok"] = True

    def stale(self, now: float | None = None) -> list[str]:
        """The targets without a success for three intervals, on the monotonic clock (`now`
        from it too): a step of the wall clock must not flip the health check."""
        now = self.clock() if now is None else now
        with self._lock:
            return [t for t in self.targets or list(self._success) or [""]
                    if now - self._success.get(t, -math.inf) >= 3 * self.interval]

    def healthy(self, now: float | None = None) -> bool:
        """Every target succeeded within three intervals (see stale)."""
        return not self.stale(now)

    def render(self) -> str:
        """Every sample, grouped by family under its # HELP and # TYPE lines."""
        with self._lock:
            samples = [*self.counters.items(), *self.gauges.items(), *self.backend_gauges.items(),
                       (("polling_interval_seconds", ""), self.interval)]
        lines, family = [], None
        for (name, label), value in sorted(samples, key=lambda s: (_family(s[0][0]), s[0])):
            if _family(name) != family:
                family = _family(name)
                kind, text = self.HELP.get(family, ("untyped", family))
                lines += [f"# HELP haproxy_azure_discovery_{family} {text}",
                          f"# TYPE haproxy_azure_discovery_{family} {kind}"]
            series = f"haproxy_azure_discovery_{name}" + (f"{{{label}}}" if label else "")
            lines.append(f"{series} {_sample(value)}")
        return "\n".join(lines) + "\n"

    def state(self) -> str | None:
        with self._lock:
            if self.discovery is None:
                return None
            view = {"discovery": self.discovery,
                    "targets": [self.views[t] for t in self.targets or self.views
                                                             if t in self.views]}
            return json.dumps(view, indent=1, sort_keys=True) + "\n"


def _family(name: str) -> str:
    """The metric family a sample's name belongs to: a summary's _sum and _count are its."""
    base = name.rpartition("_")[0]
    return base if name.endswith(("_sum", "_count")) and base in Metrics.HELP else name


def _sample(value: float) -> str:
    """A sample's value, exact: `g` would cut a timestamp to six digits (hours)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _target_label(name: str) -> str:
    return f'target="{_label_value(name)}"'


def backend_gauges(view: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """servers_live / servers_parked / servers_draining per target and backend."""
    out = {}
    for t in view["targets"]:
        for b in t.get("backends", []):
            labels = f'target="{_label_value(t["target"])}",backend="{_label_value(b["backend"])}"'
            for state in ("live", "parked", "draining"):
                out[(f"servers_{state}", labels)] = sum(s["state"] == state for s in b["servers"])
    return out


def _label_value(text: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# The metrics listener serves scrapers, never the other way round: each connection gets
# METRICS_DEADLINE seconds in all, and past METRICS_CONNECTIONS at once more are closed.
METRICS_DEADLINE, METRICS_CONNECTIONS = 5.0, 16


class _MetricsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, family: socket.AddressFamily):
        self.address_family, self.metrics = family, metrics
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(address, _MetricsHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)          # too many at once: this one is closed
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """/metrics, /state and /healthz, each connection cut after METRICS_DEADLINE seconds."""
    timeout = METRICS_DEADLINE            # per read; the timer below bounds the whole
    server: _MetricsServer

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(METRICS_DEADLINE, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self._deadline.cancel()
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.wfile.write(self._answer())

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer()

    def _answer(self) -> bytes:
        """Sends the status and headers; returns the body."""
        status, kind, body = metrics_page(self.path, self.server.metrics)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def log_message(self, *args: Any) -> None:
        pass


def metrics_page(path: str, metrics: Metrics) -> tuple[int, str, str]:
    """(status, content type, body) of one page of the metrics listener."""
    if path == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()
    if path == "/state":
        state = metrics.state()
        if not state:
            return 503, "application/json", '{"error": "no cycle has read HAProxy yet"}\n'
        return 200, "application/json", state
    if path == "/healthz":
        stale, behind = metrics.stale(), dict(metrics.behind)
        named = f" for {', '.join(stale)}" if len(metrics.targets) > 1 else ""
        problems = ([f"no successful cycle recently{named}"] if stale else []) + [
            f"{t}: {why}" for t, why in sorted(behind.items())]
        if problems:
            return 503, "text/plain; charset=utf-8", "\n".join(problems) + "\n"
        return 200, "text/plain; charset=utf-8", "ok\n"
    return 404, "text/plain; charset=utf-8", "not found\n"


def serve_metrics(listen: str, metrics: Metrics) -> http.server.ThreadingHTTPServer:
    """/metrics and /healthz (GET or HEAD) from daemon threads that never block the loop.
    ConfigError when metrics.listen cannot be bound."""
    host, port = listen_address(listen) or ("", 0)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = _MetricsServer((host, port), metrics, family)
    except OSError as exc:
        raise ConfigError([
            f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}"]) from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


# === Daemon ===
def sd_notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send a systemd notification (READY=1, WATCHDOG=1, STATUS=...); no-op without
    NOTIFY_SOCKET. Never raises: the daemon must not fail because systemd went away."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]             # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


class Notifier:
    """systemd notifications from any thread: READY=1 once, WATCHDOG=1 whenever work
    progresses (after every Azure page, at each cycle's start, in the sleep), so that only
    a real hang starves the watchdog, however slow Azure is, and STOPPING=1 on the way out."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = os.environ if env is None else env
        self.ready = False
        self._lock = threading.Lock()
        try:     # WATCHDOG_PID names the process the watchdog is for (sd_watchdog_enabled(3))
            ours = self.env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
            usec = int(self.env.get("WATCHDOG_USEC") or 0) if ours else 0
        except ValueError:
            usec = 0
        # Keep-alives at least every half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
        self.interval = usec / 2e6 or None

    def keepalive(self) -> None:
        if self.interval:
            sd_notify("WATCHDOG=1", self.env)

    def notify(self, message: str, ready: bool = False) -> None:
        """Send `message`, preceded by READY=1 when `ready` and not sent before."""
        with self._lock:
            first = ready and not self.ready
            self.ready = self.ready or ready
        sd_notify(("READY=1\n" if first else "") + message, self.env)


class Signals:
    """SIGTERM/SIGINT set `stop`, SIGHUP sets `reload`; either wakes whatever waits on it.
    The handlers only set a flag: they take no lock."""

    def __init__(self) -> None:
        self.stop, self.reload = Flag(), Flag()

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def restore(self) -> None:
        """Put back the handlers install() replaced (main() may run inside another program)."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self._set(self.reload if signum == signal.SIGHUP else self.stop)

    def _set(self, flag: Flag) -> None:
        flag.set()

    def sleep(self, seconds: float, watchdog: Notifier | None = None) -> None:
        """Sleep until `stop` or `reload` is set or `seconds` pass, sending the watchdog's
        keep-alive every `watchdog.interval` meanwhile."""
        deadline = time.monotonic() + seconds
        every = watchdog.interval if watchdog is not None else None
        while (left := deadline - time.monotonic()) > 0:
            if wait_any([self.stop, self.reload], min(left, every or left)) is not None:
                return
            if watchdog is not None and deadline > time.monotonic():
                watchdog.keepalive()


def next_delay(failures: int, cfg: PollingConfig, rand: float) -> float:
    """Seconds to sleep: the interval plus jitter after a success, else exponential
    backoff from backoff_base_seconds with up to 10% jitter, never past max_backoff_seconds
    (rand in [0, 1))."""
    if failures == 0:
        return cfg.interval_seconds + rand * cfg.jitter_seconds
    backoff = cfg.backoff_base_seconds * 2 ** min(failures - 1, 30) * (1 + 0.1 * rand)
    return min(cfg.max_backoff_seconds, backoff)


# A cycle woken for a drain's end comes this long after it: never a moment early.
DRAIN_SLACK = 0.1


def drain_wake(delay: float, state: State, now: float) -> float:
    """The sleep before the next cycle: `delay`, or less when a drain's time is up sooner,
    so that its slot is parked on time rather than a polling interval late."""
    ends = [d.until for drains in state.draining.values() for d in drains.values()]
    return min(delay, max(0.0, min(ends) - now) + DRAIN_SLACK) if ends else delay


# READY=1 comes after the first cycle, or after this many seconds of it, whichever is first:
# a first listing of a large estate on a slow Resource Manager must not outlast the unit's
# TimeoutStartSec= (nor make Restart= repeat it).
START_BUDGET = 60.0


@dataclass
class _InUse:
    """A configuration put to use: its Azure source, its targets (each with its Data Plane
    client, state and backoff) and metrics listener."""
    cfg: Config
    source: Any
    runs: list[TargetRun] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None
    listen: str = ""               # where `server` listens (kept when a move needs a restart)
    memory: State = field(default_factory=State)    # the skips already warned about


class Daemon:
    """The daemon: owns what lives between cycles (the configuration in use, its Azure
    source, its targets with their state and backoff, the metrics and their listener).
    `step` is one cycle, `reload` puts a re-read configuration to use, `run` is the loop.

    `load` reads the configuration; `make_source` and `make_dataplane` build the Azure
    source and each target's Data Plane client for it (once per target, with that
    target's configuration); `configure` applies its logging."""

    def __init__(self, load: Callable[[], Config], make_source: Callable[[Config], Source],
                 make_dataplane: Callable[[Config], Target],
                 configure: Callable[[Config], None] = lambda cfg: None,
                 notifier: Notifier | None = None, clocks: Clocks = Clocks(),
                 rand: Callable[[], float] = random.random):
        self._load, self._make_source, self._make_dataplane = load, make_source, make_dataplane
        self._configure, self.clocks, self._rand = configure, clocks, rand
        self.notifier = notifier or Notifier()
        cfg = load()
        self.metrics = Metrics(cfg.polling.interval_seconds, clocks.monotonic)
        self.using = self._put_to_use(cfg, None)
        self.cycles = 0
        self.reports: list[CycleReport] = []     # the last cycle's

    def step(self, stop: StopFlag) -> float | None:
        """One cycle over the targets that are due (a failing target backs off alone: it sits
        out the cycles until its backoff ends); the seconds to sleep after it: the interval
        and jitter (less when a drain's time is up sooner), or the backoff while every
        target fails. None when a shutdown cut it short."""
        self.notifier.keepalive()
        due, failed = _due(self.using.runs, self.clocks.monotonic()), None
        try:
            self.reports = run_cycle(self.using.source, due, stop, memory=self.using.memory,
                                     clocks=self.clocks)
        except Aborted:
            log.info("cycle aborted for shutdown", extra={"event": "shutdown"})
            return None
        except Exception as exc:  # the daemon outlives bugs; they are logged whole
            self.reports, failed = _discovery_failed(exc, due), exc
        self.cycles += 1
        delay = self._delay(due, failed)
        self.metrics.record(self.reports, self.clocks.wall())
        # else READY came with the start budget
        first = self.cycles == 1 and not self.notifier.ready
        self.notifier.notify("WATCHDOG=1\nSTATUS=" + _status(self.reports, self.using.runs, first),
                             ready=True)
        return delay

    def _delay(self, due: Sequence[TargetRun], failed: Exception | None = None) -> float:
        """Each target's backoff after this cycle, and the sleep before the next; the
        cycle_failed records (one for a failed discovery, `failed`, else one per failed
        target), each with its next try: a failed target's comes with the first cycle after
        its backoff (the loop wakes for it only while every target fails)."""
        now, runs = self.clocks.monotonic(), self.using.runs
        for run, report in zip(due, self.reports):
            run.failures = run.failures + 1 if report.result == "failed" else 0
            run.due = now + next_delay(run.failures, run.cfg.polling,
                                       self._rand()) if run.failures else 0.0
        if any(not run.failures for run in runs):
            delay = max(next_delay(0, self.using.cfg.polling, self._rand()),
                        self.reports[0].azure_wait)
            wall = self.clocks.wall()
            delay = min(drain_wake(delay, run.state, wall) for run in runs if not run.failures)
        else:
            delay = max(0.0, round(min(run.due for run in runs) - now, 6))
        if failed is not None:
            log_cycle_failed(failure_text(failed), due[0].failures,
                             next_try=max(delay, min(run.due for run in due) - now))
        for run, report in zip(due, self.reports):
            if report.failure is not None:
                log_cycle_failed(report.error, run.failures, run.name, max(delay, run.due - now))
        return delay

    def reload(self) -> None:
        """SIGHUP: a re-read configuration wholly in use, with all state forgotten, or (with
        an error) the old one still."""
        try:
            new = self._put_to_use(self._load(), self.using)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old configuration running
            self._configure(self.using.cfg)
            message = str(exc) if isinstance(exc,
                                             DiscoveryError) else f"{type(exc).__name__}: {exc}"
            log.error("configuration reload failed, keeping the old one: %s", message,
                      extra={"event": "reload_failed"})
            return
        _retire(self.using, new)
        self.using = new
        log.info("configuration reloaded; next cycle reconciles everything",
                 extra={"event": "reloaded"})
        if new.listen != new.cfg.metrics.listen:
            log.warning("metrics.listen %s needs a restart: %s holds its port",
                        new.cfg.metrics.listen,
                        new.listen, extra={"event": "restart_needed"})

    def run(self, signals: "Signals", max_cycles: int | None = None,
            start_budget: float = START_BUDGET) -> int:
        """Cycles and sleeps until `signals.stop` (or `max_cycles`); READY=1 after the first
        cycle, or at `start_budget` seconds if that comes first. Returns the exit code."""
        budget = threading.Timer(start_budget, self.notifier.notify, (
            f"WATCHDOG=1\nSTATUS=ready after the {start_budget:g} s start budget; first cycle "
            "still "
            "running", True))
        budget.daemon = True
        budget.start()
        try:
            while not signals.stop.is_set() and (max_cycles is None or self.cycles < max_cycles):
                if signals.reload.is_set():
                    signals.reload.clear()
                    self.reload()
                delay = self.step(signals.stop)
                budget.cancel()
                if delay is None:
                    break
                if max_cycles is None or self.cycles < max_cycles:
                    signals.sleep(delay, self.notifier)
        finally:
            budget.cancel()
            if signals.stop.is_set():      # systemd shows the unit deactivating from here on
                self.notifier.notify("STOPPING=1\nSTATUS=stopping")
            self.close()
        log.info("stopped", extra={"event": "stopped", "cycles": self.cycles})
        return EX_OK

    def close(self) -> None:
        """Close the clients and the listener."""
        _retire(self.using, None)

    def _put_to_use(self, cfg: Config, old: _InUse | None) -> _InUse:
        """Build what `cfg` runs with; whatever fails, what was built so far is closed again."""
        using = _clients(cfg, self._make_source, self._make_dataplane, old)
        try:
            using.server, using.listen = _listener(cfg.metrics.listen, old, self.metrics)
            self._configure(cfg)
        except BaseException:
            _retire(using, old)
            raise
        self.metrics.interval = cfg.polling.interval_seconds
        self.metrics.use([run.name for run in using.runs])
        return using


def _discovery_failed(exc: Exception, due: Sequence[TargetRun]) -> list[CycleReport]:
    """A failed cycle's reports: every target it was for failed with it. A bug's traceback is
    logged here (Daemon._delay logs the cycle_failed record)."""
    known = isinstance(exc, DiscoveryError)
    if not known:
        log.exception("cycle failed unexpectedly", extra={"event": "unexpected_error"})
    return [CycleReport(target=run.name, error=str(exc) if known else "unexpected error")
            for run in due]


def _due(runs: Sequence[TargetRun], now: float) -> list[TargetRun]:
    """The targets whose backoff has ended, or else those it ends for first."""
    earliest = min(run.due for run in runs)
    return [run for run in runs if run.due <= max(now, earliest)]


def _status(reports: Sequence[CycleReport], runs: Sequence[TargetRun], first: bool = False) -> str:
    """systemd's STATUS: the last cycle's result, per target when there are several."""
    ready, report = "ready after the first cycle; " if first else "", reports[0]
    if all(r.result == "failed" for r in reports) and (len(runs) == 1 or report.skips is None):
        failures = max(r.failures for r in runs)
        return f"{ready}last cycle failed ({failures} in a row): {report.error}"[:200]
    if len(runs) == 1:
        return (f"{ready}last cycle {report.result}: {report.instances} instances, "
                f"{report.skipped} skipped")
    results = {r.target: r.result for r in reports}
    each = ", ".join(f"{run.name} {results.get(run.name, 'backing off')}"
                     + (f" ({run.failures} in a row)" if run.failures else "") for run in runs)
    return (f"{ready}last cycle: {report.instances} instances, {report.skipped} skipped; "
            f"targets: {each}")[:200]


def _listener(listen: str, old: _InUse | None, metrics: Metrics) -> tuple[Any, str]:
    """The metrics listener for `listen` and the address it really has: the running one
    when unchanged, else a new one. Moving to the same port on another address cannot
    bind while the old listener holds it: that one is kept, and the reload says so."""
    if old is not None and listen == old.listen:
        return old.server, old.listen
    try:
        return (serve_metrics(listen, metrics) if listen else None), listen
    except ConfigError:           # serve_metrics: the address cannot be bound
        held = old is not None and old.server is not None and \
            (listen_address(listen) or ("", 0))[1] == (listen_address(old.listen) or ("", -1))[1]
        if not held:
            raise
        return old.server, old.listen


def _clients(cfg: Config, make_source: Callable[[Config], Any],
             make_dataplane: Callable[[Config], Target], old: _InUse | None = None) -> _InUse:
    """`cfg`'s Azure source, and each of its targets with a Data Plane client; whatever fails,
    what was built so far is closed again (but for what `old`, still in use, shares)."""
    using = _InUse(cfg, make_source(cfg))
    try:
        for name, target_cfg in target_configs(cfg):
            using.runs.append(TargetRun(name, target_cfg, make_dataplane(target_cfg)))
    except BaseException:
        _retire(using, old)
        raise
    return using


def _retire(using: _InUse, successor: _InUse | None) -> None:
    """Close what `using` holds and `successor` does not share: the Azure client and
    credential (their sockets would wait for the garbage collector), the listener."""
    kept = [] if successor is None else [successor.source, *(run.dp for run in successor.runs)]
    for part in (using.source, *(run.dp for run in using.runs)):
        close = getattr(part, "close", None)
        if close is not None and not any(part is k for k in kept):
            close()
    if using.server is not None and (successor is None or using.server is not successor.server):
        using.server.shutdown()
        using.server.server_close()


# === Explain ===
# --explain NAME|ID: one discovery and every target read and planned as --status does (no
# write), then one instance's story: where it was found, each rule it passed or failed, its
# service, its slot in each target, and a verdict.


class _Remembered:
    """A Source that keeps the discovery it returned: --explain reads every instance listed,
    those the selection left out too."""

    def __init__(self, source: Source):
        self.source, self.discovery = source, Discovery(())

    def discover(self) -> Discovery:
        self.discovery = self.source.discover()
        return self.discovery


def explain(query: str, discovery: Discovery, reports: Sequence[CycleReport],
            runs: Sequence[TargetRun], cfg: Config) -> dict[str, Any]:
    """The story of the instance `query` names (its name or resource id, any case), as data:
    "exit" 0 when it is served on every target, 1 when not, 2 when no instance or more than
    one answers to it."""
    q = query.strip().lower()
    hits = [i for i in discovery.instances if q in _names_of(i.name, i.id)]
    unreadable = [k for k in discovery.skipped if q in _names_of(k.instance, k.id)]
    if len(hits) + len(unreadable) != 1:
        return _not_found(query, [i.id for i in hits] + [k.id for k in unreadable],
                          len(discovery.instances), cfg)
    if unreadable:
        skip = unreadable[0]
        story = {"query": query, "found": True, "instance": {"name": skip.instance, "id": skip.id},
                 "rules": [{"rule": "tags", "ok": False, "detail": skip.reason}], "targets": []}
        return {**story, "served": False, "verdict": f"not served: {skip.reason}", "exit": EX_FAIL}
    inst = hits[0]
    rules = instance_rules(inst, cfg, [k for r in reports if r.plan for k in r.plan.skipped])
    found = service_of(inst, cfg)
    story = {"query": query, "found": True, "instance": _instance_facts(inst, cfg),
             "tags": folded(inst.tags), "rules": rules, "service": None, "targets": []}
    if isinstance(found, tuple):        # its slots, even when a rule fails: it may be draining
        key, port, _ = found
        story["service"] = {"service": key.name, "port": key.port, "region": key.region}
        story["targets"] = [_slot_story(run, report, key, (inst.address, port))
                            for run, report in zip(runs, reports)]
        _waits_in_its_slot(rules, story["targets"], inst)
    failed = next((r["detail"] for r in rules if r["ok"] is False), None)
    return {**story, **_verdict(story["targets"], failed)}


def _waits_in_its_slot(rules: list[dict[str, Any]], targets: Sequence[Mapping[str, Any]],
                       inst: Instance) -> None:
    """An instance that waits for Healthy keeps the live slot it holds: then readiness passes."""
    if inst.health in HEALTH_WAITS and targets and all(t["state"] == "live" for t in targets):
        for r in rules:
            if r["rule"] == "readiness":
                r.update(ok=True, detail=f"Application Health {inst.health}: it keeps the live "
                                         "slot it holds until Healthy or gone")


def _names_of(name: str, iid: str) -> tuple[str, ...]:
    return name.lower(), iid.lower(), iid.rsplit("/", 1)[-1].lower()


def _not_found(query: str, matches: Sequence[str], listed: int, cfg: Config) -> dict[str, Any]:
    a = cfg.azure
    scope = {"subscriptions": list(a.subscriptions), "resource_groups": list(a.resource_groups),
             "cloud": a.cloud or a.resource_manager_url or "public", "source": a.source}
    if matches:
        verdict = f"{len(matches)} instances answer to {query!r}: name one by its resource id"
    else:
        verdict = (f"not found among the {listed} instances listed in subscription(s) "
                   f"{', '.join(a.subscriptions)}, "
                   + (f"resource group(s) {', '.join(a.resource_groups)}" if a.resource_groups
                      else "every resource group")
                   + f", cloud {scope['cloud']}: is it in another subscription, resource group or "
                   "cloud? (Uniform scale-set instances are listed only for sets that carry the "
                   f"{cfg.tags.service_name_tag} tag.)")
    return {"query": query, "found": False, "matches": list(matches), "listed": scope,
            "served": False, "verdict": verdict, "exit": EX_USAGE}


def _instance_facts(inst: Instance, cfg: Config) -> dict[str, Any]:
    parts = inst.id.split("/")
    where = {k.lower(): v for k, v in zip(parts[1::2], parts[2::2])}
    listing = {"vm": "the VM listing",
               "flexible": "the VM listing (a Flexible scale-set member)",
               "uniform": "the instances of Uniform scale set "
               f"{where.get('virtualmachinescalesets')}"}
    source = "Resource Graph" if cfg.azure.source == "resource_graph" else "Resource Manager"
    return {"name": inst.name, "id": inst.id, "kind": inst.kind, "region": inst.region,
            "power_state": inst.power_state, "address": inst.address,
            "listing": f"{listing[inst.kind]} ({source})",
            "subscription": where.get("subscriptions"),
            "resource_group": where.get("resourcegroups")}


def instance_rules(inst: Instance, cfg: Config, plan_skips: Sequence[Skip]) -> list[dict[str, Any]]:
    """Each rule of the selection, in order, with whether `inst` passes it ("ok": True, False,
    or None when an earlier rule of its tags decided and it was not checked) and why."""
    t, tags, a = cfg.tags, folded(inst.tags), cfg.azure
    name = tags.get(t.service_name_tag.lower())
    rules = [("service-name tag", name is not None, f"{t.service_name_tag} = {_shown(name)}"
              if name is not None else f"no {t.service_name_tag} tag: not an instance to serve")]
    rules += _service_rules(service_of(inst, cfg) if name is not None else None, name is not None)
    missing = [f"{k}={v}" for k, v in t.allowlist.items() if tags.get(k.lower()) != v]
    present = [f"{k}={v}" for k, v in t.denylist.items() if tags.get(k.lower()) == v]
    leaving = inst.power_state in LEAVING_STATES
    stopped = a.running_only and inst.power_state != "running"
    rules += [
        ("allowlist", not missing, f"allowlist tag {missing[0]} missing" if missing
         else "every allowlist tag present" if t.allowlist else "no allowlist"),
        ("denylist", not present, f"denylist tag {present[0]}" if present
         else "no denylist tag present" if t.denylist else "no denylist"),
        ("power state", not (leaving or stopped), f"power state {inst.power_state}"
         + (" (on its way out)" if leaving else " (azure.running_only)" if stopped else "")),
        ("address", inst.address is not None, inst.address or no_address(a)),
        ("readiness", (blocked := health_blocks(inst, cfg)) is None, blocked or (
            "azure.require_healthy is off" if not a.require_healthy
            else f"Application Health {inst.health}" if inst.health
            else "no Application Health reported: served as before")),
    ]
    full = next((k for k in plan_skips if k.id == inst.id and k.rule == "server_slots.max"), None)
    rules.append(("server_slots.max", full is None,
                  full.reason if full else "within haproxy.server_slots.max"))
    return [{"rule": r, "ok": ok, "detail": detail} for r, ok, detail in rules]


def _service_rules(found: tuple | Skip | None, tagged: bool) -> list[tuple[str, bool | None, str]]:
    """service_of's checks, in its order: the one that failed, those before it passed."""
    rules = []
    for rule in ("service name", "service port", "weight", "region"):
        if not tagged or (rules and rules[-1][1] is not True):
            rules.append((rule, None, "not checked"))
        elif isinstance(found, Skip) and found.rule == rule:
            rules.append((rule, False, found.reason))
        else:
            rules.append((rule, True, _passed(rule, found)))
    return rules


def _passed(rule: str, found: tuple | Skip | None) -> str:
    if not isinstance(found, tuple):
        return "valid"
    key, port, weight = found
    return {"service name": key.name, "service port": f"{key.port}" + (
                f" (served on {port})" if port != key.port else ""),
            "weight": "no weight tag" if weight is None else f"{weight}",
            "region": key.region}[rule]


def _slot_story(run: TargetRun, report: CycleReport, key: ServiceKey,
                endpoint: tuple[str | None, int]) -> dict[str, Any]:
    """Where one target holds the instance: the slot at its address in HAProxy (live or
    draining), else the slot the next cycle would write it to, else nowhere."""
    backend = backend_name(key, run.cfg.haproxy.backend)
    entry: dict[str, Any] = {"target": report.target, "backend": backend, "slot": None,
                             "state": "unknown" if report.failure else "missing"}
    if report.failure is not None or not report.view:
        return {**entry, "detail": report.error or "not read"}
    view = next((b for t in report.view["targets"] for b in t["backends"]
                 if b["backend"] == backend), {"servers": []})
    slots = {v["slot"]: v for v in view["servers"]}
    at = _endpoint({"address": endpoint[0], "port": endpoint[1]})
    here = next((v for v in slots.values() if v.get("address") == at), None)
    if here is None:
        planned = next((b for b in report.plan.backends if b.name == backend),
                       None) if report.plan else None
        name = next((n for n, body in (planned.servers.items() if planned else ())
                     if (body.get("address"), body.get("port")) == endpoint), None)
        if name is None:
            return {**entry, "detail": _no_slot(slots, service_haproxy(run.cfg, key.name))}
        here = slots.get(name, {"slot": name, "state": "missing"})
        entry["detail"] = f"not in HAProxy yet: the next cycle writes it to {name}"
    entry.update(slot=here["slot"], state=here["state"])
    for k in ("seconds_left", "drift"):
        if k in here:
            entry[k] = here[k]
    return entry


def _no_slot(slots: Mapping[str, Mapping[str, Any]], cfg: HAProxyConfig) -> str:
    """Why a selected instance has no slot in a backend (`slots`: its view's, by name)."""
    if len(slots) < cfg.server_slots.max:
        return "not in HAProxy, and no cycle would put it there now"
    draining = [n for n, v in slots.items() if v["state"] == "draining"]
    return (f"waits for a slot: the backend has its {len(slots)} (haproxy.server_slots.max)"
            + (f", {', '.join(draining)} draining" if draining else ""))


def _verdict(targets: Sequence[Mapping[str, Any]], failed: str | None) -> dict[str, Any]:
    """Served when every rule passed and every target holds it live; else why not: the first
    rule it failed, and where it is not live (draining, with the seconds left)."""
    live = [t for t in targets if t["state"] == "live"]
    if failed is None and targets and len(live) == len(targets):
        slots = sorted({t["slot"] for t in live})
        on = " and ".join(t["target"] for t in live)
        return {"served": True, "verdict": f"served by {', '.join(slots)} on {on}", "exit": EX_OK}
    why = [failed] if failed else []
    for t in targets:
        if t["state"] == "draining":
            left = t.get("seconds_left")
            why.append(f"draining on {t['target']} ({t['slot']}"
                       + (f", {left} s left)" if left is not None else ")"))
        elif t["state"] != "live" and failed is None:
            why.append(f"{t.get('detail') or t.get('drift') or t['state']} (on {t['target']})")
    return {"served": False, "verdict": "not served: " + ("; ".join(why) or "not selected"),
            "exit": EX_FAIL}


def format_explain(story: Mapping[str, Any]) -> str:
    """The story for people, one fact a line, the verdict last."""
    if not story["found"]:
        lines = [f"{story['query']}: {story['verdict']}"]
        lines += [f"  {m}" for m in story["matches"]]
        return "\n".join(lines) + "\n"
    inst = story["instance"]
    lines = [f"{inst['name']}  {inst['id']}"]
    if "listing" in inst:
        lines.append(f"  found in {inst['listing']}, subscription {inst['subscription']}, resource "
                     f"group {inst['resource_group']}; region {inst['region']}, power state "
                     f"{inst['power_state']}, address {inst['address'] or 'none'}")
    if story.get("tags") is not None:
        lines.append("  tags: " + (", ".join(f"{k}={v}" for k, v in sorted(story["tags"].items()))
                                   or "none"))
    for r in story["rules"]:
        mark = {True: "ok", False: "FAIL", None: "-"}[r["ok"]]
        lines.append(f"  {mark:<4} {r['rule']:<17} {r['detail']}")
    if story.get("service"):
        sv = story["service"]
        lines.append(f"  service {sv['service']} port {sv['port']} in {sv['region']}")
    for t in story["targets"]:
        where = f"{t['slot']} {t['state']}" if t["slot"] else t["state"]
        extra = [t[k] for k in ("drift", "detail") if t.get(k)]
        if t.get("seconds_left") is not None:
            extra.insert(0, f"{t['seconds_left']} s left")
        lines.append(f"  target {t['target']}: backend {t['backend']}, {where}"
                     + (f" ({'; '.join(extra)})" if extra else ""))
    lines.append(f"verdict: {story['verdict']}")
    return "\n".join(lines) + "\n"


# === CLI ===
class _VersionAction(argparse.Action):
    """--version: this program, and the Azure SDK packages found (read from their
    metadata, never imported)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="print versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib import metadata
        lines = [f"haproxy-azure-discovery {__version__} (python {sys.version.split()[0]})"]
        for package in SDK_PACKAGES:
            try:
                lines.append(f"{package} {metadata.version(package)}")
            except metadata.PackageNotFoundError:
                lines.append(f"{package} not installed")
        print("\n".join(lines))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="haproxy-azure-discovery",
        description="Keep HAProxy backends in sync with tagged Azure VMs and scale-set instances.",
        epilog="Exit codes: 0 ok, 1 cycle failed, 2 usage, 69 Azure SDK missing, 78 bad "
        "configuration. "
               "Environment: NOTIFY_SOCKET (systemd), JOURNAL_STREAM (no timestamps in text logs), "
               "the Azure SDK's credential variables, and any ${VAR} the configuration names.")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"configuration file (default {DEFAULT_CONFIG_PATHS[0]}, then .toml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one cycle and exit")
    parser.add_argument("--confirm-drain", action="store_true",
                        help="with --once: apply a drain the mass-drain guard holds, at once (it "
                        "is real)")
    mode.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    mode.add_argument("--validate", action="store_true", help="check the configuration and exit")
    mode.add_argument("--status", action="store_true",
                      help="print discovery and HAProxy's backends side by side, differences "
                      "marked; change nothing")
    mode.add_argument("--explain", metavar="NAME|ID",
                      help="why one VM or scale-set instance is (not) served: its rules, its slot "
                      "in "
                           "each target, a verdict; change nothing (exit 0 served, 1 not, 2 not "
                      "found)")
    parser.add_argument("--json", action="store_true",
                        help="with --status or --explain: print it as JSON")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        type=str.upper,
                        help="override logging.level")
    parser.add_argument("--version", action=_VersionAction)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The program; `env` stands for the process environment (os.environ by default)."""
    args = parse_arguments(argv)
    if isinstance(args, int):
        return args
    env = dict(os.environ if env is None else env)
    path = find_config(args.config)
    signals = Signals()
    say = _Say(secret_values(env))      # every line printed here is masked, as log lines are
    try:
        return _command(args, path, env, signals, say)
    except ConfigError as exc:
        for problem in exc.problems:
            say(f"error: {path}: {problem}" if not problem.startswith(path)
                else f"error: {problem}")
        return exc.exit_code
    except DiscoveryError as exc:
        if signals.stop.is_set():     # SIGTERM/SIGINT during --once: nothing is left half done
            say(f"stopped: {exc}")
            return EX_OK
        say(f"error: {exc}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last resort: one line, and the traceback in the log
        log.exception("unexpected error")
        say(f"error: unexpected {type(exc).__name__}: {exc}")
        return EX_FAIL
    finally:
        signals.restore()


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The command line, or the exit code when argparse has already printed (--help,
    --version, a usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.json and not (args.status or args.explain):
            parser.error("--json goes with --status or --explain")
        if args.confirm_drain and not args.once:
            parser.error("--confirm-drain goes with --once")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    return args


class _Say:
    """Prints one line for people, the secrets it knows masked (stderr unless told)."""

    def __init__(self, secrets: Iterable[str]):
        self.secrets = secrets

    def __call__(self, line: str, stream: Any = None) -> None:
        print(redact(line, self.secrets), file=stream or sys.stderr)


def _command(args: argparse.Namespace, path: str, env: Mapping[str, str], signals: Signals,
             say: _Say) -> int:
    """What the command line asks for, with the configuration at `path`."""
    cfg = load_config(path, env)
    say.secrets = secrets_of(cfg, env)
    if args.confirm_drain:      # the guard lets through what it sees now
        cfg = dataclasses.replace(cfg, safety=dataclasses.replace(
            cfg.safety, drain_confirm_cycles=1, drain_confirm_seconds=0.0))
    if args.validate:
        for warning in config_warnings(cfg):
            say(f"warning: {warning}")
        say(f"{path}: configuration ok", sys.stdout)
        return EX_OK
    setup_logging(args.log_level or cfg.logging.level, cfg.logging.format, say.secrets, env=env)
    for warning in config_warnings(cfg):
        log.warning(warning, extra={"event": "config_warning"})
    signals.install()
    if not (args.status or args.explain or args.dry_run or args.once):
        return _run_daemon(args, path, env, signals, say)
    with _one_shot(cfg, env, signals.stop) as (source, runs):
        if args.status:
            return _run_status(source, runs, args.json, signals.stop, say)
        if args.explain:
            return _run_explain(source, runs, cfg, args.explain, args.json, signals.stop, say)
        return _once_or_dry_run(source, runs, args.dry_run, signals.stop, say)


def _run_daemon(args: argparse.Namespace, path: str, env: Mapping[str, str], signals: Signals,
                say: _Say) -> int:
    """The daemon until a signal ends it; a reload re-reads `path`."""
    notifier = Notifier(env)

    def configure(c: Config) -> None:      # a reload's logging, and its secrets masked everywhere
        say.secrets = secrets_of(c, env)
        setup_logging(args.log_level or c.logging.level, c.logging.format, say.secrets)
    return Daemon(lambda: load_config(path, env),
                  lambda c: AzureSource(c, env, signals.stop, notifier.keepalive),
                  lambda c: DataPlane(c.haproxy, notifier.keepalive, signals.stop),
                  configure=configure, notifier=notifier).run(signals)


@contextlib.contextmanager
def _one_shot(cfg: Config, env: Mapping[str, str],
              stop: StopFlag) -> Iterator[tuple[AzureSource, list[TargetRun]]]:
    """A one-shot command's Azure source and targets (a Data Plane client each), closed when
    the command ends, however it ends, as the daemon closes its own at a reload and at exit.
    `stop` (SIGTERM, SIGINT) ends the discovery between pages and the targets' calls."""
    using = _clients(cfg, lambda c: AzureSource(c, env, stop),
                     lambda c: DataPlane(c.haproxy, stop=stop))
    try:
        yield using.source, using.runs
    finally:
        _retire(using, None)


def _once_or_dry_run(source: Source, runs: list[TargetRun], dry_run: bool, stop: StopFlag,
                     say: Callable[[str], None]) -> int:
    """--once and --dry-run: one cycle over every target; the plans (dry run) on stdout.
    A failed discovery raises; a failed target is one error line, and exit 1. A failed
    --once is logged as the daemon logs it (cycle_failed), besides the error line. A --once
    that serves no instance while some carry the service tags (all skipped) exits 1 too."""
    try:
        reports = run_cycle(source, runs, stop, dry_run=dry_run)
    except Exception as exc:
        # A shutdown is no failure, nor a missing Azure SDK (69) or configuration (78) a cycle's.
        if not dry_run and not stop.is_set() and getattr(exc, "exit_code", EX_FAIL) == EX_FAIL:
            log_cycle_failed(failure_text(exc))
        raise
    for report in reports:
        if dry_run and report.plan is not None:
            head = f"target {report.target}:\n" if len(runs) > 1 else ""
            say(head + format_plan(report.plan).rstrip("\n"), sys.stdout)
        elif report.failure is not None and not dry_run:
            log_cycle_failed(report.error, target=report.target)
    code, seen = _failed(reports, len(runs) > 1, say), reports[0]
    if not dry_run and seen.skipped and not seen.instances:   # tagged instances, and none served
        say(f"error: every one of the {seen.skipped} tagged instances was skipped; "
            "see the warnings above")
        return EX_FAIL
    return code


def _failed(reports: Sequence[CycleReport], several: bool, say: Callable[[str], None]) -> int:
    """One `error:` line per target that failed or had backends refused (named when there are
    several); exit 1 if any did, else 0."""
    for report in reports:
        where = f"target {report.target}: " if several else ""
        if report.failure is not None:
            say(f"error: {where}{report.error}")
        elif report.refused:      # the rest applied; the refused backends are in the log
            refused = ", ".join(sorted(report.refused))
            say(f"error: {where}the Data Plane API refused backend(s) {refused}; the rest of the "
                "cycle applied")
    return EX_FAIL if any(r.failure is not None or r.refused for r in reports) else EX_OK


def _run_status(source: Source, runs: list[TargetRun], as_json: bool, stop: StopFlag,
                say: Callable[..., None]) -> int:
    """--status: discover, read every target, print both side by side; change nothing. Drift
    is shown, not an error (the daemon repairs it); a target that cannot be read is shown as
    unreachable and makes the exit code 1, as an unreachable Azure does."""
    reports = run_cycle(source, runs, stop, dry_run=True)
    view = combined_view([r.view for r in reports if r.view])
    say(json.dumps(view, indent=1, sort_keys=True) if as_json else format_status(view).rstrip("\n"),
        sys.stdout)
    return _failed(reports, len(runs) > 1, say)


def _run_explain(source: Source, runs: list[TargetRun], cfg: Config, query: str, as_json: bool,
                 stop: StopFlag, say: Callable[..., None]) -> int:
    """--explain: discover, read and plan every target as --status does, then tell one
    instance's story (explain). Exit 0 served, 1 not served, 2 not found or ambiguous."""
    source = _Remembered(source)
    reports = run_cycle(source, runs, stop, dry_run=True)
    story = explain(query, source.discovery, reports, runs, cfg)
    say(json.dumps(story, indent=1, sort_keys=True) if as_json
        else format_explain(story).rstrip("\n"),
        sys.stdout)
    return story["exit"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
