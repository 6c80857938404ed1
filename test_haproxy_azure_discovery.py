"""Tests of haproxy_azure_discovery, in the order of the module's sections.

The pure core is tested with plain values; the adapters against the test bed in
testing/ (a local HTTPS fake of Azure Resource Manager, a Data Plane API emulator).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import gc
import http.client
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import socket
import threading
import time
import urllib.error
import urllib.parse

import pytest

import haproxy_azure_discovery as m
from conftest import connections_to, free_port, one_cycle, steps

HERE = os.path.dirname(os.path.abspath(__file__))
SUB = "00000000-0000-0000-0000-000000000001"
EXAMPLE_ENV = {"AZURE_SUBSCRIPTION_ID": SUB, "DATAPLANE_PASSWORD": "s3cret-pass"}
WEB = "azure-web-8080-eastus"      # the backend of make_instance's default service


# === Test bed helpers ===
def make_config(**sections) -> m.Config:
    """A valid Config; keyword arguments are sections merged over the minimum."""
    raw = {"azure": {"subscription_id": SUB}, "haproxy": {"password": "pw"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return m.parse_config(raw, {})


def new_server(name, member, cfg):
    """The server object a plan writes for slot `name` as a new server: serving `member`, or parked."""
    return m.slot_body(name, member, None, cfg, True, m.slot_fields(cfg))


def make_instance(n: int, service="web", port="8080", region="eastus", state="running", **kw) -> m.Instance:
    tags = {"HAProxy:Service:Name": service, "HAProxy:Service:Port": port, **kw.pop("tags", {})}
    return m.Instance(id=kw.pop("id", f"/subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/"
                                      f"virtualmachines/vm{n}"),
                      name=kw.pop("name", f"vm{n}"), region=region, tags=tags,
                      address=kw.pop("address", f"10.0.{n // 250}.{n % 250 + 4}"), power_state=state, **kw)


def run_plan(instances, actual=None, state=None, cfg=None, drain=0, now=0.0, sessions=None):
    """plan_cycle on these instances. The slot tests park a leaving server at once
    (safety.drain_seconds `drain` 0); the draining tests set it."""
    cfg = cfg or make_config()
    cfg = dataclasses.replace(cfg, safety=dataclasses.replace(cfg.safety, drain_seconds=drain))
    groups, skipped = m.select_instances(instances, cfg)
    return m.plan_cycle(groups, skipped, actual or {}, state or m.State(), cfg, now, sessions)


def apply_to(actual: dict, plan: m.Plan) -> dict:
    """What HAProxy holds after a plan: the test's stand-in for a commit."""
    out = dict(actual)
    for b in plan.backends:
        out[b.name] = m.BackendState(b.name, dict(b.fields), {n: dict(s) for n, s in b.servers.items()})
    return out


def assert_slots(backend: m.BackendState, expected: dict):
    """expected: slot name -> "addr:port" or "parked"."""
    got = {n: ("parked" if s["maintenance"] == "enabled" else f"{s['address']}:{s['port']}")
           for n, s in backend.servers.items()}
    assert got == expected


def run_py(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def write_config(tmp_path, raw, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return str(path)


def spec_definitions():
    """(file name, definitions) of the v2 and v3 Data Plane API specifications in testing/spec."""
    yaml = pytest.importorskip("yaml")
    for spec in ("dataplaneapi-v2.yaml", "dataplaneapi-v3.yaml"):
        with open(os.path.join(HERE, "testing", "spec", spec)) as f:
            yield spec, yaml.safe_load(f)["definitions"]


def spec_properties(defs, name) -> dict:
    """Every property of model `name`, its allOf parts and their references included."""
    out = {}
    for part in [defs[name], *defs[name].get("allOf", [])]:
        if "$ref" in part:
            out.update(spec_properties(defs, part["$ref"].split("/")[-1]))
        out.update(part.get("properties", {}))
    return out


# === Configuration ===
class TestConfig:
    def test_defaults_fill_every_key(self):
        cfg = make_config()
        assert cfg.haproxy.server_slots == m.SlotsConfig(10, 1.5, "linear")
        assert cfg.haproxy.base_url == "http://localhost:5555"
        assert cfg.polling.interval_seconds == 30 and cfg.safety.drain_confirm_cycles == 2
        assert cfg.azure.subscriptions == (SUB,)

    def test_example_file_is_complete_and_valid(self):
        """config.example.json shows every key of the Config dataclasses."""
        with open(os.path.join(HERE, "config.example.json")) as f:
            raw = json.load(f)
        cfg = m.parse_config(raw, EXAMPLE_ENV)
        assert cfg.haproxy.password == "s3cret-pass"

        def keys(obj, prefix=""):
            for f in m.dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if m.dataclasses.is_dataclass(value):
                    yield from keys(value, f"{prefix}{f.name}.")
                else:
                    yield prefix + f.name

        def present(raw, path):
            for part in path.split("."):
                if part not in raw:
                    return False
                raw = raw[part]
            return True
        assert [k for k in keys(cfg) if not present(raw, k)] == []

    @pytest.mark.parametrize("raw, problem", [
        ({"azure": {"subscription_id": SUB, "colour": 1}}, "azure.colour: unknown key"),
        ({"polling": {"interval_seconds": "soon"}}, "polling.interval_seconds: must be a number"),
        ({"haproxy": {"server_slots": {"base": 2.5}}}, "haproxy.server_slots.base: must be an integer"),
        ({"haproxy": {"server_slots": {"growth_type": "expo"}}},
         'haproxy.server_slots.growth_type: must be "linear" or "exponential", got "expo"'),
        ({"haproxy": {"verify_ssl": "yes"}}, "haproxy.verify_ssl: must be true or false"),
        ({"haproxy": {"timeout": 0}}, "haproxy.timeout: must be greater than 0"),
        ({"polling": {"jitter_seconds": -1}}, "polling.jitter_seconds: must be 0 or more"),
        ({"haproxy": {"password": ""}}, "haproxy.password: is required"),
        ({"azure": {"subscription_id": ""}}, "azure.subscription_id: required"),
        ({"azure": {"subscription_id": "prod"}}, "azure.subscription_id: must be a subscription GUID"),
        ({"azure": {"subscription_ids": [SUB, 5]}}, "azure.subscription_ids: must be a list of non-empty strings"),
        ({"azure": {"resource_groups": ["ok", "bad/rg"]}}, "azure.resource_groups[1]: not a resource group name"),
        ({"tags": {"allowlist": {"env": 1}}}, "tags.allowlist: must be an object of strings"),
        ({"haproxy": {"base_url": "localhost:5555"}}, "haproxy.base_url: must be an http(s) URL"),
        ({"azure": {"resource_manager_url": "http://arm"}}, "azure.resource_manager_url: must be an https URL"),
        ({"azure": {"require_healthy": "yes"}}, "azure.require_healthy: must be true or false"),
        ({"azure": {"require_healthy": True, "source": "resource_graph"}},
         'azure.require_healthy: needs azure.source "arm": Resource Graph rows carry no'),
        ({"metrics": {"listen": "9777"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"haproxy": {"server": {"params": {"address": "x"}}}},
         "haproxy.server.params: may not set address (the program sets it)"),
        ({"haproxy": {"server": {"params": {"colour": "red"}}}},
         "haproxy.server.params: unknown field(s) colour"),
        ({"haproxy": {"backend": {"params": {"name": "x"}}}}, "haproxy.backend.params: may not set name"),
        ({"haproxy": {"backend": {"balance": "fastest"}}}, "haproxy.backend.balance: must be"),
        ({"haproxy": {"server_slots": {"growth_type": "exponential", "growth_factor": 1}}},
         "haproxy.server_slots.growth_factor: must be greater than 1 for exponential growth"),
        ({"haproxy": {"server_slots": {"growth_factor": 0.5}}},
         "haproxy.server_slots.growth_factor: must be at least 1 for linear growth"),
        ({"polling": {"backoff_base_seconds": 10, "max_backoff_seconds": 5}},
         "polling.max_backoff_seconds: must be at least polling.backoff_base_seconds"),
        ({"safety": {"max_drain_percent": 150}}, "safety.max_drain_percent: must be between 0 and 100"),
        ({"logging": {"format": "xml"}}, 'logging.format: must be "json" or "text"'),
        ({"haproxy": "none"}, "haproxy: must be an object"),
        ({"haproxy": {"password": "${NOPE}"}}, "haproxy.password: environment variable NOPE is not set"),
    ])
    def test_each_error_names_its_key(self, raw, problem):
        base = {"azure": {"subscription_id": SUB}, "haproxy": {"password": "pw"}}
        for section, values in raw.items():
            base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
        with pytest.raises(m.ConfigError) as err:
            m.parse_config(base, {})
        assert any(p.startswith(problem) for p in err.value.problems), err.value.problems

    def test_require_healthy_is_off_by_default_and_takes_the_arm_source(self):
        assert make_config().azure.require_healthy is False
        cfg = make_config(azure={"require_healthy": "${HEALTHY:-true}"})
        assert cfg.azure.require_healthy is True
        assert make_config(azure={"require_healthy": False, "source": "resource_graph"})

    def test_every_problem_is_reported_at_once(self, tmp_path, capsys):
        path = write_config(tmp_path, {
            "azure": {"subscription_id": "x", "cloud": "mars"},
            "haproxy": {"password": "p", "timeout": -1, "server_slots": {"growth_type": "expo"}},
            "polling": {"intervall": 3}})
        assert m.main(["--validate", "-c", path]) == 78
        err = capsys.readouterr().err
        for key in ("azure.subscription_id", "azure.cloud", "haproxy.timeout",
                    "haproxy.server_slots.growth_type", "polling.intervall"):
            assert f"error: {path}: {key}:" in err
        assert len(err.splitlines()) == 5

    def test_cross_key_problems_come_with_the_others(self):
        with pytest.raises(m.ConfigError) as err:
            m.parse_config({"azure": {"cloud": "mars"}, "haproxy": {"password": "p"},
                            "polling": {"backoff_base_seconds": 10, "max_backoff_seconds": 5}}, {})
        assert [p.split(":")[0] for p in err.value.problems] == [
            "azure.cloud", "azure.subscription_id", "polling.max_backoff_seconds"]

    def test_interpolation(self):
        env = {"PW": "hunter2", "PORT": "7000"}
        cfg = m.parse_config({"azure": {"subscription_id": "${SUB:-" + SUB + "}"},
                              "haproxy": {"password": "${PW}", "base_url": "http://h:${PORT}",
                                          "timeout": "${TIMEOUT:-3}", "verify_ssl": "${V:-false}"},
                              "tags": {"allowlist": {"env": "${ENV:-prod}"}}}, env)
        assert cfg.azure.subscription_id == SUB and cfg.haproxy.password == "hunter2"
        assert cfg.haproxy.base_url == "http://h:7000" and cfg.haproxy.timeout == 3.0
        assert cfg.haproxy.verify_ssl is False and cfg.tags.allowlist == {"env": "prod"}

    def test_underscore_keys_are_comments(self):
        cfg = m.parse_config({"_comment": "x", "azure": {"_note": 1, "subscription_id": SUB},
                              "haproxy": {"password": "p", "server": {"params": {"_why": "x", "inter": 2000}}}}, {})
        assert cfg.haproxy.server.params == {"inter": 2000}

    @pytest.mark.parametrize("name, text, problem", [
        ("c.json", "{not json", "not valid JSON"),
        ("c.toml", "[azure\n", "not valid TOML"),
        ("c.json", "[1, 2]", "configuration: must be an object"),
    ])
    def test_unreadable_files(self, tmp_path, name, text, problem):
        path = write_config(tmp_path, text, name)
        with pytest.raises(m.ConfigError, match=problem):
            m.load_config(path, {})

    def test_missing_file(self, tmp_path):
        with pytest.raises(m.ConfigError, match="cannot read"):
            m.load_config(str(tmp_path / "absent.json"), {})

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
    def test_toml(self, tmp_path):
        path = write_config(tmp_path, textwrap.dedent(f"""
            [azure]
            subscription_id = "{SUB}"
            [haproxy]
            password = "${{PW}}"
            [haproxy.server_slots]
            growth_type = "exponential"
            growth_factor = 2
            """), "c.toml")
        cfg = m.load_config(path, {"PW": "x"})
        assert cfg.haproxy.server_slots.growth_type == "exponential" and cfg.haproxy.password == "x"

    def test_param_lists_exist_in_both_specifications(self):
        for spec, defs in spec_definitions():
            assert m.BACKEND_PARAMS <= set(spec_properties(defs, "backend")), spec
            assert m.SERVER_PARAMS <= set(spec_properties(defs, "server")), spec
            assert set(m.BALANCE_ALGORITHMS) == set(defs["balance"]["properties"]["algorithm"]["enum"])

    def test_short_interval_warns_but_is_accepted(self):
        cfg = make_config(polling={"interval_seconds": 2})
        assert any("Azure Resource Manager read quotas" in w for w in m.config_warnings(cfg))


# === Discovery: filter and group ===
    @pytest.mark.parametrize("raw, problem", [
        ({"polling": {"interval_seconds": 86401}}, "polling.interval_seconds: must be at most 86400 s"),
        ({"polling": {"jitter_seconds": 1e9}}, "polling.jitter_seconds: must be at most 86400 s"),
        ({"polling": {"backoff_base_seconds": 1e300, "max_backoff_seconds": 1e300}},
         "polling.backoff_base_seconds: must be at most 86400 s"),
        ({"polling": {"max_backoff_seconds": 90000}}, "polling.max_backoff_seconds: must be at most 86400 s"),
        ({"haproxy": {"timeout": 3601}}, "haproxy.timeout: must be at most 3600 s"),
        ({"azure": {"timeout": 1e20}}, "azure.timeout: must be at most 3600 s"),
        ({"azure": {"retries": 1000}}, "azure.retries: must be between 0 and 20"),
        ({"azure": {"workers": 10000}}, "azure.workers: must be between 1 and 64"),
        ({"haproxy": {"server_slots": {"growth_factor": 1e6}}}, "haproxy.server_slots.growth_factor: must be at most 100"),
        ({"haproxy": {"server_slots": {"max": 0}}}, "haproxy.server_slots.max: must be between 1 and 100000"),
        ({"haproxy": {"server_slots": {"max": 5}}}, "haproxy.server_slots.max: must be at least haproxy.server_slots.base"),
        ({"haproxy": {"server_slots": {"base": 10 ** 400}}}, "haproxy.server_slots.base: must be an integer, got \"1000"),
        ({"polling": {"interval_seconds": 10 ** 400}}, "polling.interval_seconds: must be a number, got \"1000"),
        ({"polling": {"interval_seconds": "1e999"}}, "polling.interval_seconds: must be a number"),
        ({"safety": {"drain_confirm_cycles": 10 ** 9}}, "safety.drain_confirm_cycles: must be between 1 and 1000"),
        ({"safety": {"drain_seconds": 86401}}, "safety.drain_seconds: must be at most 86400 s, got 86401"),
        ({"safety": {"drain_seconds": -1}}, "safety.drain_seconds: must be 0 or more, got -1"),
        ({"safety": {"drain_seconds": "soon"}}, 'safety.drain_seconds: must be a number, got "soon"'),
        ({"safety": {"drain_seconds": float("nan")}}, "safety.drain_seconds: must be a number"),
        ({"haproxy": {"base_url": "http://admin:pw@localhost:5555"}},
         "haproxy.base_url: must not carry credentials (user:password@)"),
        ({"haproxy": {"base_url": "http://admin@localhost:5555"}}, "haproxy.base_url: must not carry credentials"),
        ({"metrics": {"listen": "::1:9777"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"metrics": {"listen": "[::1:9777"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"metrics": {"listen": "[fe80::zz]:9777"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"metrics": {"listen": "example.com:9777"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"metrics": {"listen": "127.0.0.1:70000"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"metrics": {"listen": "127.0.0.1:٩٧"}}, 'metrics.listen: must be "HOST:PORT"'),
        ({"haproxy": {"server": {"params": {"inter": "fast"}}}},
         'haproxy.server.params: inter: must be an integer 1-2147483647, got "fast"'),
        ({"haproxy": {"server": {"params": {"inter": 10 ** 12}}}},
         "haproxy.server.params: inter: must be an integer 1-2147483647, got 1000000000000"),
        ({"haproxy": {"server": {"params": {"weight": 300}}}}, "haproxy.server.params: weight: must be an integer 0-256"),
        ({"haproxy": {"server": {"params": {"rise": 0}}}}, "haproxy.server.params: rise: must be an integer 1-"),
        ({"haproxy": {"server": {"params": {"maxconn": 2 ** 31}}}}, "haproxy.server.params: maxconn: must be an integer 0-"),
        ({"haproxy": {"backend": {"params": {"server_timeout": 2 ** 31}}}},
         "haproxy.backend.params: server_timeout: must be an integer 0-2147483647"),
        ({"haproxy": {"base_url": "http://localhost:5555/\nx"}}, "haproxy.base_url: must not contain spaces or control"),
        ({"haproxy": {"base_url": "http://localhost:5555/v3?x=1"}}, "haproxy.base_url: must not have a query or a fragment"),
        ({"haproxy": {"base_url": "http://localhost:5555#top"}}, "haproxy.base_url: must not have a query or a fragment"),
        ({"haproxy": {"base_url": "http://localhost:0"}}, "haproxy.base_url: port must be 1-65535"),
        ({"haproxy": {"base_url": "http://localhost:99999"}}, "haproxy.base_url: port must be 1-65535"),
        ({"tags": {"service_name_tag": ""}}, "tags.service_name_tag: must be a tag name"),
        ({"tags": {"instance_weight_tag": "a\tb"}}, "tags.instance_weight_tag: must be a tag name"),
        ({"haproxy": {"server": {"params": {"inter": -1}}}}, "haproxy.server.params: inter: must be an integer"),
        ({"haproxy": {"server": {"params": {"ssl": "yes"}}}},
         'haproxy.server.params: ssl: must be enabled or disabled, got "yes"'),
        ({"haproxy": {"server": {"params": {"verify": "none\nbackend evil"}}}}, "haproxy.server.params: verify: must be"),
        ({"haproxy": {"server": {"params": {"sni": "a b"}}}}, "haproxy.server.params: sni: must be one word"),
        ({"haproxy": {"server": {"params": {"agent-send": "x\ny"}}}},
         "haproxy.server.params: agent-send: must be a string without control characters"),
        ({"haproxy": {"server": {"params": {"health_check_port": 0}}}},
         "haproxy.server.params: health_check_port: must be an integer 1-65535"),
        ({"haproxy": {"server": {"params": {"allow_0rtt": "true"}}}},
         'haproxy.server.params: allow_0rtt: must be true or false, got "true"'),
        ({"haproxy": {"server": {"params": {"resolve_opts": "allow-dup-ip,bogus"}}}},
         "haproxy.server.params: resolve_opts: must match"),
        ({"haproxy": {"backend": {"params": {"http_reuse": "sometimes"}}}},
         "haproxy.backend.params: http_reuse: must be aggressive or always or never or safe"),
        ({"haproxy": {"backend": {"params": {"cookie": "SRV"}}}}, "haproxy.backend.params: cookie: must be a object"),
        ({"haproxy": {"backend": {"params": {"from": "bad name"}}}}, "haproxy.backend.params: from: must be one word"),
    ])
    def test_bounds_and_models(self, raw, problem):
        self.test_each_error_names_its_key(raw, problem)

    @pytest.mark.parametrize("listen, host, port", [
        ("127.0.0.1:9777", "127.0.0.1", 9777), ("[::1]:9777", "::1", 9777), (":9777", "", 9777),
        ("localhost:1", "localhost", 1), ("[::]:65535", "::", 65535)])
    def test_listen_addresses_accepted(self, listen, host, port):
        assert make_config(metrics={"listen": listen}).metrics.listen == listen
        assert m.listen_address(listen) == (host, port)

    def test_param_values_that_the_model_allows_run(self):
        cfg = make_config(haproxy={"password": "p", "server": {"params": {
            "inter": 2000, "rise": 2, "ssl": "enabled", "verify": "none", "sni": "str(example.com)",
            "health_check_port": 8081, "allow_0rtt": False, "proxy-v2-options": ["ssl"]}},
            "backend": {"params": {"http_reuse": "safe", "cookie": {"name": "SRV"}, "retries": 3}}})
        assert cfg.haproxy.server.params["inter"] == 2000

    def test_param_kinds_follow_both_specifications(self):
        for spec, defs in spec_definitions():
            for model, kinds, names in (("server", m.SERVER_PARAM_KINDS, m.SERVER_PARAMS),
                                        ("backend", m.BACKEND_PARAM_KINDS, m.BACKEND_PARAMS)):
                assert set(kinds) == names
                fields = spec_properties(defs, model)
                for name, kind in kinds.items():
                    node = fields[name]
                    node = defs[node["$ref"].split("/")[-1]] if "$ref" in node else node
                    want = {"integer": ("int", "port"), "boolean": ("bool",), "array": ("list",),
                            "object": ("object",)}.get(node.get("type"))
                    if node.get("enum"):
                        assert set(kind.split("|")) <= set(node["enum"]), (spec, name)
                    elif want:
                        assert kind in want, (spec, name, kind)
                        if kind == "port":
                            assert (node.get("minimum"), node.get("maximum")) == (1, 65535), (spec, name)
                    elif node.get("pattern"):
                        expected = {"^[^\\s]+$": "word", "^[A-Za-z0-9-_.:]+$": "name"}.get(
                            node["pattern"], "re:" + node["pattern"][1:-1])
                        assert kind == expected, (spec, name)
                    else:
                        assert kind in ("text", "object"), (spec, name, kind)

    def test_ca_file_must_exist_and_hold_pem(self, tmp_path):
        import trustme
        good = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(good))
        (tmp_path / "junk.pem").write_text("not a certificate\n")
        base = {"azure": {"subscription_id": SUB}, "haproxy": {"password": "pw"}}
        for ca, problem in [(str(tmp_path / "missing.pem"), "cannot read"),
                            (str(tmp_path / "junk.pem"), "holds no PEM certificate"),
                            (str(tmp_path), "cannot read"), (str(good), None)]:
            path = write_config(tmp_path, {**base, "haproxy": {"password": "pw", "ca_file": ca}})
            if problem is None:
                assert m.load_config(path, {}).haproxy.ca_file == ca
                continue
            with pytest.raises(m.ConfigError) as err:
                m.load_config(path, {})
            assert err.value.problems[0].startswith("haproxy.ca_file: ") and problem in err.value.problems[0]
            assert m.main(["--validate", "-c", path]) == 78

    def test_toml_dates_and_non_finite_numbers_are_problems(self, tmp_path):
        path = write_config(tmp_path, textwrap.dedent(f"""\
            [azure]
            subscription_id = "{SUB}"
            [haproxy]
            password = 1979-05-27T07:32:00Z
            [polling]
            interval_seconds = inf
            jitter_seconds = nan
            """), "config.toml")
        with pytest.raises(m.ConfigError) as err:
            m.load_config(path, {})
        assert sorted(err.value.problems) == [
            'haproxy.password: must be a string, got (not shown, being a secret)',
            "polling.interval_seconds: must be a number, got Infinity",
            "polling.jitter_seconds: must be a number, got NaN"]

    def test_any_exception_is_a_problem_of_its_key(self, monkeypatch):
        monkeypatch.setitem(m.CHECKS, "haproxy.timeout", lambda v: 1 / 0)
        with pytest.raises(m.ConfigError) as err:
            make_config(haproxy={"password": "p", "timeout": 5})
        assert err.value.problems == ("haproxy.timeout: cannot be read (ZeroDivisionError: division by zero)",)

    def test_deeply_nested_json_is_78(self, tmp_path, capsys):
        path = write_config(tmp_path, "[" * 100000)
        assert m.main(["--validate", "-c", path]) == 78
        assert "nested too deeply" in capsys.readouterr().err

    def test_a_value_from_a_secret_variable_is_not_echoed(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("DP_TOKEN", "t0ps3cret-value")
        monkeypatch.setenv("DATAPLANE_PASSWORD", "pw-from-env-123")
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB},
                                       "haproxy": {"password": "${DATAPLANE_PASSWORD}", "timeout": "${DP_TOKEN}",
                                                   "username": "${DATAPLANE_PASSWORD}x"}})
        assert m.main(["--validate", "-c", path]) == 78
        err = capsys.readouterr().err
        assert "haproxy.timeout: must be a number" in err and "t0ps3cret-value" not in err
        assert m.secret_values({"DP_TOKEN": "abcd", "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}) == ["abcd"]

    @pytest.mark.parametrize("edge", [
        {"polling": {"interval_seconds": 86400, "jitter_seconds": 86400, "max_backoff_seconds": 86400}},
        {"haproxy": {"password": "p", "timeout": 3600, "server_slots": {"base": 1, "max": 1}}},
        {"haproxy": {"password": "p", "server_slots": {"growth_type": "exponential", "growth_factor": 100,
                                                       "max": 100000}}},
        {"metrics": {"listen": "[::1]:9777"}},
        {"safety": {"drain_seconds": 86400}},
    ])
    def test_the_edges_that_validate_run(self, edge):
        cfg = make_config(**edge)
        drain = m.Drain(WEB, "srv1", "10.0.0.4", 80, 0.0, cfg.safety.drain_seconds)
        assert m.drain_wake(30, m.State(draining={WEB: {"srv1": drain}}), 0.0) <= 30
        slots = cfg.haproxy.server_slots
        assert all(m.slot_target(n, slots) <= slots.max for n in (0, 1, 10, 999, 1000, 5000, 10 ** 6))
        assert m.next_delay(1000, cfg.polling, 0.999) <= 86400 * 1.1


class TestServices:
    """services: per-service overrides of haproxy.backend, haproxy.server and haproxy.server_slots."""

    def test_overrides_merge_over_the_top_level_keys(self):
        cfg = make_config(haproxy={"password": "p", "backend": {"balance": "roundrobin", "params": {"retries": 2}},
                                   "server": {"params": {"inter": 2000, "rise": 2}},
                                   "server_slots": {"base": 10, "max": 50}},
                          services={"api": {"backend": {"balance": "leastconn", "params": {"fullconn": 10}},
                                            "server": {"params": {"inter": 500}},
                                            "server_slots": {"base": 4}},
                                    "not-yet-seen": {"backend": {"mode": "tcp"}}})
        api = m.service_haproxy(cfg, "api")
        assert (api.backend.balance, api.backend.mode) == ("leastconn", "http")
        assert api.backend.params == {"retries": 2, "fullconn": 10}
        assert api.server.params == {"inter": 500, "rise": 2}
        assert (api.server_slots.base, api.server_slots.max, api.server_slots.growth_factor) == (4, 50, 1.5)
        assert m.service_haproxy(cfg, "web") is cfg.haproxy
        assert m.service_haproxy(cfg, "not-yet-seen").backend.mode == "tcp"

    @pytest.mark.parametrize("services, problem", [
        ({"api": {"backend": {"balance": "fastest"}}},
         'services.api.backend.balance: must be "roundrobin" or'),
        ({"api": {"backend": {"name_prefix": "x"}}}, "services.api.backend.name_prefix: unknown key"),
        ({"api": {"backend": {"params": {"mode": "tcp"}}}}, "services.api.backend.params: may not set mode"),
        ({"api": {"server": {"params": {"address": "1.2.3.4"}}}}, "services.api.server.params: may not set address"),
        ({"api": {"server": {"params": {"inter": -1}}}}, "services.api.server.params: inter: must be an integer"),
        ({"api": {"server": {"params": {"weight": 300}}}}, "services.api.server.params: weight: must be an integer 0-256"),
        ({"api": {"server_slots": {"base": 0}}}, "services.api.server_slots.base: must be between 1 and 10000"),
        ({"api": {"server_slots": {"base": 2000}}}, "services.api.server_slots.max: must be at least"),
        ({"api": {"colour": 1}}, "services.api.colour: unknown key"),
        ({"api": []}, "services.api: must be an object"),
        ({"web app": {}}, "services.web app: not a service name"),
        ([], "services: must be an object"),
    ])
    def test_each_problem_names_its_key(self, services, problem):
        with pytest.raises(m.ConfigError) as e:
            make_config(services=services) if isinstance(services, dict) else m.parse_config(
                {"azure": {"subscription_id": SUB}, "haproxy": {"password": "p"}, "services": services}, {})
        assert any(p.startswith(problem) for p in e.value.problems), e.value.problems

    def test_validate_exits_78_naming_the_key(self, tmp_path, capsys):
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB}, "haproxy": {"password": "p"},
                                       "services": {"api": {"backend": {"balance": "fastest"}}}})
        assert m.main(["--validate", "-c", path]) == 78
        assert "services.api.backend.balance" in capsys.readouterr().err

    def test_settings_land_in_their_backends_only(self):
        cfg = make_config(haproxy={"password": "p", "server": {"params": {"inter": 2000}}},
                          services={"api": {"backend": {"balance": "leastconn"}, "server": {"params": {"rise": 5}},
                                            "server_slots": {"base": 3}}})
        first = run_plan([make_instance(1), make_instance(2, service="api", port="9000")], cfg=cfg)
        held = apply_to({}, first.plan)
        api, web = held["azure-api-9000-eastus"], held["azure-web-8080-eastus"]
        assert (api.fields["balance"], web.fields["balance"]) == ({"algorithm": "leastconn"},
                                                                 {"algorithm": "roundrobin"})
        assert len(api.servers) == 3 and len(web.servers) == 10
        assert (api.servers["srv1"]["rise"], api.servers["srv1"]["inter"]) == (5, 2000)
        assert "rise" not in web.servers["srv1"] and web.servers["srv1"]["inter"] == 2000
        # The service vanishes: its backend keeps its own settings while parked.
        later = run_plan([make_instance(1)], actual=held, cfg=cfg,
                         state=m.State(assignments=first.assignments))
        (parked,) = later.plan.backends
        assert parked.name == "azure-api-9000-eastus" and not parked.fields_changed and parked.slots == 3


class TestTargets:
    """haproxy.targets: several HAProxy hosts, each entry's connection keys over haproxy.*."""

    def test_entries_take_the_top_level_keys_they_leave_out(self):
        cfg = make_config(haproxy={"password": "top", "username": "ops", "timeout": 7, "apply_mode": "hybrid",
                                   "targets": [{"base_url": "http://10.0.0.1:5555", "name": "hap-1"},
                                               {"base_url": "https://10.0.0.2:5555", "password": "two",
                                                "api_version": "v2", "verify_ssl": False}]})
        (n1, c1), (n2, c2) = m.target_configs(cfg)
        assert (n1, c1.haproxy.base_url, c1.haproxy.password, c1.haproxy.username, c1.haproxy.timeout) == (
            "hap-1", "http://10.0.0.1:5555", "top", "ops", 7)
        assert (n2, c2.haproxy.password, c2.haproxy.api_version, c2.haproxy.verify_ssl) == (
            "https://10.0.0.2:5555", "two", "v2", False)
        assert c1.haproxy.apply_mode == c2.haproxy.apply_mode == "hybrid" and c1.haproxy.targets == ()
        assert c1.services == cfg.services and c2.polling == cfg.polling
        single = make_config()
        assert m.target_configs(single) == [("http://localhost:5555", single)]
        assert m.target_configs(make_config(haproxy={"password": "p", "targets": []})) == [
            ("http://localhost:5555", make_config(haproxy={"password": "p", "targets": []}))]

    def test_every_targets_password_and_basic_value_are_secrets(self):
        cfg = make_config(haproxy={"password": "top-secret", "targets": [
            {"base_url": "http://a:5555"}, {"base_url": "http://b:5555", "username": "u2", "password": "second-pw"}]})
        secrets = m.secrets_of(cfg, {})
        assert {"top-secret", "second-pw", m.basic_credentials(m.HAProxyConfig(username="u2", password="second-pw")),
                m.basic_credentials(m.HAProxyConfig(password="top-secret"))} <= set(secrets)

    @pytest.mark.parametrize("targets, problem", [
        ([{"base_url": "http://a:5555"}, {"base_url": "localhost:5555"}],
         "haproxy.targets[1].base_url: must be an http(s) URL"),
        ([{"base_url": "http://admin:pw@a:5555"}], "haproxy.targets[0].base_url: must not carry credentials"),
        ([{"base_url": "http://a:5555", "timeout": 0}], "haproxy.targets[0].timeout: must be greater than 0"),
        ([{"base_url": "http://a:5555", "timeout": 7200}], "haproxy.targets[0].timeout: must be at most 3600"),
        ([{"base_url": "http://a:5555", "api_version": "v4"}], 'haproxy.targets[0].api_version: must be "auto"'),
        ([{"base_url": "http://a:5555", "verify_ssl": "yes"}], "haproxy.targets[0].verify_ssl: must be true or false"),
        ([{"base_url": "http://a:5555", "username": ""}], "haproxy.targets[0].username: must not be empty"),
        ([{"base_url": "http://a:5555", "apply_mode": "hybrid"}], "haproxy.targets[0].apply_mode: unknown key"),
        ([{"base_url": "http://a:5555", "name": "hap 1"}], "haproxy.targets[0].name: must be 1-100 characters"),
        ([{"base_url": "http://a:5555"}, {"base_url": "HTTP://A:5555/"}],
         "haproxy.targets[1].base_url: HTTP://A:5555/ is haproxy.targets[0]'s Data Plane API too"),
        ([{"base_url": "http://127.0.0.1:5555"}, {"base_url": "http://localhost:5555/v3"}],
         "haproxy.targets[1].base_url: http://localhost:5555/v3 is haproxy.targets[0]'s Data Plane API too"),
        ([{"base_url": "http://[::1]:5555"}, {"base_url": "http://127.0.0.2:5555"}],
         "haproxy.targets[1].base_url: http://127.0.0.2:5555 is haproxy.targets[0]'s Data Plane API too"),
        ([{"base_url": "https://h.example:443"}, {"base_url": "https://H.example"}],
         "haproxy.targets[1].base_url: https://H.example is haproxy.targets[0]'s Data Plane API too"),
        ([{"base_url": "http://a:5555", "name": "x"}, {"base_url": "http://b:5555", "name": "x"}],
         'haproxy.targets[1].name: "x" names haproxy.targets[0] too'),
        ([{"base_url": "http://a:5555", "ca_file": "/etc/ssl/certs/ca-certificates.crt", "verify_ssl": False}],
         "haproxy.targets[0].ca_file: set, but verify_ssl is false"),
        (["http://a:5555"], "haproxy.targets[0]: must be an object"),
        ({"base_url": "http://a:5555"}, "haproxy.targets: must be a list"),
        ([{"base_url": f"http://h{i}:5555"} for i in range(101)], "haproxy.targets: must be a list of at most 100"),
    ])
    def test_each_problem_names_its_entry_and_key(self, targets, problem):
        with pytest.raises(m.ConfigError) as e:
            make_config(haproxy={"password": "p", "targets": targets})
        assert any(p.startswith(problem) for p in e.value.problems), e.value.problems

    def test_a_target_without_a_password_anywhere_is_refused(self):
        with pytest.raises(m.ConfigError) as e:
            m.parse_config({"azure": {"subscription_id": SUB}, "haproxy": {"targets": [
                {"base_url": "http://a:5555", "password": "p"}, {"base_url": "http://b:5555"}]}}, {})
        assert e.value.problems == ("haproxy.targets[1].password: is required (here or as haproxy.password)",)

    def test_validate_lists_every_problem_with_its_path_and_echoes_no_secret(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("DP2_PASSWORD", "second-s3cret")
        (tmp_path / "not-pem").write_text("hello")
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB}, "haproxy": {"password": "p", "targets": [
            {"base_url": "http://a:5555", "timeout": "${DP2_PASSWORD}"},
            {"base_url": "http://b:5555", "ca_file": str(tmp_path / "not-pem")},
            {"base_url": "http://c:5555", "ca_file": str(tmp_path / "missing.pem")},
            {"base_url": "http://d:5555", "password": "${DP2_PASSWORD}", "colour": "red"}]}})
        assert m.main(["--validate", "-c", path]) == 78
        err = capsys.readouterr().err
        assert "second-s3cret" not in err
        assert [line.split(": ", 3)[2] for line in err.splitlines()] == [
            "haproxy.targets[0].timeout", "haproxy.targets[3].colour"]
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB}, "haproxy": {"password": "p", "targets": [
            {"base_url": "http://b:5555", "ca_file": str(tmp_path / "not-pem")},
            {"base_url": "http://c:5555", "ca_file": str(tmp_path / "missing.pem")}]}})
        assert m.main(["--validate", "-c", path]) == 78
        err = capsys.readouterr().err.splitlines()
        assert err[0].endswith(f"haproxy.targets[0].ca_file: {tmp_path}/not-pem holds no PEM certificate")
        assert err[1].endswith(f"haproxy.targets[1].ca_file: cannot read {tmp_path}/missing.pem: "
                               "No such file or directory")

    @pytest.mark.parametrize("password", [None, {"x": "pw-in-an-object"}, ["pw-in-a-list"], 12345678])
    def test_a_missing_or_non_string_password_is_refused_without_echo(self, tmp_path, capsys, password):
        haproxy = {} if password is None else {"password": password}
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB}, "haproxy": haproxy})
        assert m.main(["--validate", "-c", path]) == 78
        err = capsys.readouterr().err
        assert "haproxy.password: " in err and "pw-in-a" not in err and "12345678" not in err
        assert ("is required" if password is None else "(not shown, being a secret)") in err

    def test_an_unchecked_certificate_is_warned_about_per_target(self):
        cfg = make_config(haproxy={"password": "p", "targets": [{"base_url": "https://a:5555"},
                                                                 {"base_url": "https://b:5555", "verify_ssl": False}]})
        assert m.config_warnings(cfg) == [("haproxy.targets[1].verify_ssl is false: the Data Plane API certificate "
                                           "of https://b:5555 is not checked")]


class TestWeightTag:
    def weighted(self, n, value, **kw):
        return make_instance(n, tags={"HAProxy:Instance:Weight": value}, **kw)

    @pytest.mark.parametrize("value, weight", [("0", 0), ("256", 256), (" 17 ", 17), ("100", 100)])
    def test_a_weight_becomes_the_servers_weight(self, value, weight):
        (backend,) = run_plan([self.weighted(1, value)]).plan.backends
        assert backend.servers["srv1"]["weight"] == weight

    @pytest.mark.parametrize("value", ["257", "-1", "1.5", "", "ten", "1e2", "0x10", "\x1c5"])
    def test_a_bad_weight_is_a_skip_naming_the_tag(self, value):
        decision = run_plan([self.weighted(1, value), make_instance(2)])
        (skip,) = decision.plan.skipped
        assert skip.instance == "vm1" and "tag HAProxy:Instance:Weight" in skip.reason and "0-256" in skip.reason
        assert decision.plan.live == 1

    def test_the_tag_name_is_configurable_and_case_insensitive(self):
        cfg = make_config(tags={"instance_weight_tag": "lb-weight"})
        (backend,) = run_plan([make_instance(1, tags={"LB-Weight": "7"})], cfg=cfg).plan.backends
        assert backend.servers["srv1"]["weight"] == 7

    def test_a_removed_tag_or_a_refilled_slot_goes_back_to_the_default(self):
        cfg = make_config(safety={"drain_confirm_cycles": 1, "drain_confirm_seconds": 0})   # nothing left: parked now
        first = run_plan([self.weighted(1, "0")])
        held = apply_to({}, first.plan)
        state = m.State(assignments=first.assignments)
        (backend,) = run_plan([make_instance(1)], actual=held, state=state).plan.backends
        (change,) = backend.changes
        assert change.body["weight"] == 1 and change.runtime_only
        # A parked slot that kept weight 0, refilled by another instance: it does not inherit it.
        parked = apply_to(held, run_plan([], actual=held, state=state, cfg=cfg).plan)
        parked[WEB].servers["srv1"]["weight"] = 0
        (refill,) = run_plan([make_instance(5)], actual=parked).plan.backends
        assert refill.servers["srv1"]["weight"] == 1

    def test_a_weight_change_is_seen_by_the_steady_shortcut(self):
        g1, _ = m.select_instances([self.weighted(1, "10")], make_config())
        g2, _ = m.select_instances([self.weighted(1, "20")], make_config())
        assert m.fingerprint(g1) != m.fingerprint(g2)


HOSTILE = ["web\nbackend evil", "web app", "web#1", "w" * 10_000, "wéb", "", "web;x", "a/b"]


class TestSelect:
    def test_allowlist_is_and_denylist_is_or(self):
        cfg = make_config(tags={"allowlist": {"env": "prod", "team": "a"}, "denylist": {"drain": "yes", "x": "1"}})
        cases = {1: {"env": "prod", "team": "a"}, 2: {"env": "prod"}, 3: {"env": "prod", "team": "a", "drain": "yes"},
                 4: {"env": "prod", "team": "a", "x": "1"}, 5: {"env": "prod", "team": "a", "drain": "no"}}
        groups, skipped = m.select_instances([make_instance(n, tags=t) for n, t in cases.items()], cfg)
        assert [mb.label for mb in groups[m.ServiceKey("web", 8080, "eastus")]] == ["vm1", "vm5"]
        assert skipped == []

    @pytest.mark.parametrize("running_only, served", [(True, ["vm1"]), (False, ["vm1", "vm2", "vm3", "vm4"])])
    def test_power_state(self, running_only, served):
        cfg = make_config(azure={"running_only": running_only})
        states = ["running", "stopped", "deallocated", "unknown"]
        groups, _ = m.select_instances([make_instance(i + 1, state=s) for i, s in enumerate(states)], cfg)
        assert sorted(mb.label for ms in groups.values() for mb in ms) == served

    def test_grouping_by_name_port_region_and_instance_port(self):
        insts = [make_instance(1), make_instance(2, tags={"HAProxy:Instance:Port": "9090"}),
                 make_instance(3, port="8081"), make_instance(4, region="westeurope"),
                 make_instance(5, service="api")]
        groups, _ = m.select_instances(insts, make_config())
        names = {m.backend_name(k, make_config().haproxy.backend): [(x.label, x.port) for x in v]
                 for k, v in groups.items()}
        assert names == {"azure-web-8080-eastus": [("vm1", 8080), ("vm2", 9090)],
                         "azure-web-8081-eastus": [("vm3", 8081)],
                         "azure-web-8080-westeurope": [("vm4", 8080)],
                         "azure-api-8080-eastus": [("vm5", 8080)]}

    def test_backend_name_uses_prefix_and_separator(self):
        cfg = make_config(haproxy={"password": "p", "backend": {"name_prefix": "az", "name_separator": "_"}})
        assert m.backend_name(m.ServiceKey("web", 80, "eastus"), cfg.haproxy.backend) == "az_web_80_eastus"

    @pytest.mark.parametrize("value", HOSTILE)
    @pytest.mark.parametrize("tag", ["HAProxy:Service:Name", "HAProxy:Service:Port", "HAProxy:Instance:Port"])
    def test_hostile_tags_are_skipped_not_served(self, tag, value):
        inst = make_instance(1, tags={tag: value})
        decision = run_plan([inst, make_instance(2)])
        assert [s.instance for s in decision.plan.skipped] == ["vm1"]
        assert tag in decision.plan.skipped[0].reason
        assert len(decision.plan.skipped[0].reason) < 200 and "\n" not in decision.plan.skipped[0].reason
        for b in decision.plan.backends:
            assert m.NAME_RE.fullmatch(b.name) and all(m.slot_index(n) for n in b.servers)
            assert value not in b.name or value in ("", "a")

    def test_hostile_region_is_skipped(self):
        decision = run_plan([make_instance(1, region="east us\n")])
        assert "location" in decision.plan.skipped[0].reason and decision.plan.empty

    def test_missing_address_is_a_skip(self):
        decision = run_plan([make_instance(1, address=None)])
        assert decision.plan.skipped == (m.Skip("vm1", "no private ipv4 address: primary network interface or "
                                                "IP configuration missing", make_instance(1).id),)

    def test_duplicates_count_once(self):
        groups, _ = m.select_instances([make_instance(1), make_instance(1)], make_config())
        assert len(groups[m.ServiceKey("web", 8080, "eastus")]) == 1

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_the_order_instances_come_in_does_not_matter(self, data):
        """Members and skips come out in instance-id order, whatever order the instances came in
        (the loop reads them as they come, for speed)."""
        st = self.st
        estate = [make_instance(n, service=data.draw(st.sampled_from(["web", "api", "web\n"])),
                                port=data.draw(st.sampled_from(["8080", "x"])),
                                address=data.draw(st.sampled_from(["10.0.0.4", "10.0.0.5", None])),
                                id=f"/subscriptions/{SUB}/x/vm{data.draw(st.integers(0, 10 ** 6))}-{n}")
                  for n in range(data.draw(st.integers(0, 30)))]
        shuffled = data.draw(st.permutations(estate))
        groups, skipped = m.select_instances(shuffled, make_config())
        assert (groups, skipped) == m.select_instances(estate, make_config())
        assert all([mb.instance for mb in ms] == sorted(mb.instance for mb in ms) for ms in groups.values())
        assert [s.id for s in skipped] == sorted(s.id for s in skipped)

    @pytest.mark.parametrize("regex, text", [
        (m.NAME_RE, "web\n"), (m.REGION_RE, "eastus\n"), (m.GUID_RE, SUB + "\n"),
        (m.RESOURCE_GROUP_RE, "rg\n"), (m.RESOURCE_GROUP_RE, "rg.")])
    def test_patterns_hold_at_both_ends(self, regex, text):
        assert regex.fullmatch(text.rstrip("\n.")) and not regex.fullmatch(text)

    @pytest.mark.parametrize("name", ["srv1\n", "srv01", "srv", "srv1234567", "srv\u0661", "xsrv1", "srv-1"])
    def test_only_srv_and_a_plain_number_is_a_slot(self, name):
        assert m.slot_index(name) is None and m.slot_index("srv1") == 1 and m.slot_index("srv123456") == 123456

    @pytest.mark.parametrize("section, value, key", [
        ("azure", {"subscription_id": SUB + "\n"}, "azure.subscription_id"),
        ("azure", {"subscription_ids": [SUB + "\n"]}, "azure.subscription_ids[0]"),
        ("azure", {"resource_groups": ["rg\n"]}, "azure.resource_groups[0]"),
        ("haproxy", {"password": "p", "backend": {"name_prefix": "azure\n"}}, "haproxy.backend.name_prefix"),
        ("haproxy", {"password": "p", "backend": {"name_separator": "-\n"}}, "haproxy.backend.name_separator"),
    ])
    def test_configured_names_with_a_trailing_newline_are_refused(self, section, value, key):
        with pytest.raises(m.ConfigError) as err:
            make_config(**{section: value})
        assert [p for p in err.value.problems if p.startswith(key + ":")], err.value.problems

    def test_web_newline_is_one_skip_and_the_other_services_are_served(self):
        bad = make_instance(1, tags={"HAProxy:Service:Name": "web\n"})
        decision = run_plan([bad, make_instance(2), make_instance(3, service="api")])
        assert decision.plan.skipped == (m.Skip("vm1", 'tag HAProxy:Service:Name "web\\n" is not a service name '
                                                "(1-64 of A-Z a-z 0-9 _ . : -)", bad.id),)
        assert sorted(b.name for b in decision.plan.backends) == ["azure-api-8080-eastus", "azure-web-8080-eastus"]

    def test_untagged_instances_are_not_ours_and_not_skips(self):
        untagged = [m.Instance(f"/subscriptions/{SUB}/x/vm{n}", f"vm{n}", "eastus", {"env": "prod"}, None)
                    for n in range(10)]
        port_only = m.Instance(f"/subscriptions/{SUB}/x/p", "p", "eastus", {"HAProxy:Service:Port": "x"}, None)
        groups, skipped = m.select_instances([*untagged, port_only, make_instance(1)], make_config())
        assert skipped == [] and sum(map(len, groups.values())) == 1

    def test_tag_names_compare_case_insensitively_and_values_exactly(self):
        cfg = make_config(tags={"allowlist": {"Env": "prod"}, "denylist": {"TIER": "old"}})
        lower = make_instance(1, tags={"env": "prod"})
        lower = lower._replace(tags={k.lower(): v for k, v in lower.tags.items()})
        upper = make_instance(2, tags={"ENV": "prod"})
        wrong_case_value = make_instance(3, tags={"env": "Prod"})
        denied = make_instance(4, tags={"env": "prod", "tier": "old"})
        groups, skipped = m.select_instances([lower, upper, wrong_case_value, denied], cfg)
        assert sorted(mb.label for ms in groups.values() for mb in ms) == ["vm1", "vm2"] and skipped == []
        assert m.scale_sets_to_list([{"tags": {"haproxy:service:name": "web"}}], cfg) != []

    @pytest.mark.parametrize("port", ["0\x1f", "8080\x1c", "\x1f80", "8080\n", "８０", "80 80"])
    def test_ports_with_odd_whitespace_or_digits_are_skips_not_crashes(self, port):
        # str.strip() takes \x1c-\x1f but int() refuses them: found by the property test.
        (skip,) = run_plan([make_instance(1, port=port), make_instance(2)]).plan.skipped
        assert skip.instance == "vm1" and "is not a port" in skip.reason

    def test_bidi_and_line_separators_in_names_are_escaped(self):
        inst = make_instance(1, name="vm\u202eevil\u2028x", address=None)
        (skip,) = run_plan([inst]).plan.skipped
        assert skip.instance == "vm\\u202eevil\\u2028x" and skip.instance.isascii()

    def test_skip_names_the_instance_and_its_id_escaped(self):
        inst = make_instance(1, name="vm\x1b[31m\nfake", address=None)
        (skip,) = run_plan([inst]).plan.skipped
        assert skip.instance == "vm\\u001b[31m\\nfake" and skip.id == inst.id


# Names as the Data Plane API's own specification allows them (Go's `$` ends the text).
@functools.lru_cache(maxsize=None)
def spec_pattern(model: str, field: str) -> re.Pattern:
    import yaml
    with open(os.path.join(HERE, "testing", "spec", "dataplaneapi-v2.yaml")) as f:
        node = yaml.safe_load(f)["definitions"][model]
    props = node.get("properties") or next(p["properties"] for p in node["allOf"] if "properties" in p)
    return re.compile(props[field]["pattern"].removeprefix("^").removesuffix("$"))


def near(*valid):
    """A valid value, the same with a few arbitrary characters before or after, or any text:
    the hostile values that look almost right are the ones worth trying."""
    from hypothesis import strategies as st
    chars = st.characters(codec="utf-8")
    singles = st.sampled_from(["\n", " ", "\r\n", "\t", "\x00", "\u2028", "\u202e", "é", "#", "/", "-", ".", ":", "0"])
    edited = st.builds(lambda v, extra, before: extra + v if before else v + extra,
                       st.sampled_from(valid), st.one_of(singles, singles, st.text(chars, min_size=1, max_size=3)),
                       st.booleans())
    return st.one_of(st.sampled_from(valid), edited, edited, st.text(chars, max_size=80))


class TestHostileNames:
    """Property tests: arbitrary tag values, locations and prefixes never produce a name the
    Data Plane API would refuse; every instance that is not served is a skip."""
    from hypothesis import given, settings, strategies as st, HealthCheck
    SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow])
    text = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
        ["web", "web\n", "8080", "8080\n", " 80", "eastus", "east us", "eastus\n", "", "a b", "x" * 65])

    VALID = {"name": ("web", "api", "a.b:c_d-1", "x" * 64), "port": ("8080", "80", "65535"),
             "region": ("eastus", "westeurope"), "instance_port": ("8443", "1")}

    @pytest.mark.parametrize("field", sorted(VALID))
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), key_case=st.sampled_from([str, str.lower, str.upper]))
    def test_planner_names_match_the_specification(self, field, data, key_case):
        """One field hostile at a time, the others valid: every backend and server name the
        planner produces is one the Data Plane API accepts, and every other instance is a skip."""
        backend_re, server_re = spec_pattern("backend", "name"), spec_pattern("server", "name")
        values = data.draw(self.st.lists(near(*self.VALID[field]), min_size=1, max_size=8))
        instances = []
        for i, value in enumerate(values):
            given_ = {k: v[i % len(v)] for k, v in self.VALID.items()} | {field: value}
            tags = {key_case("HAProxy:Service:Name"): given_["name"], key_case("HAProxy:Service:Port"): given_["port"]}
            if field == "instance_port":
                tags[key_case("HAProxy:Instance:Port")] = given_["instance_port"]
            instances.append(m.Instance(f"/subscriptions/{SUB}/x/vm{i}", f"vm{i}", given_["region"], tags,
                                        f"10.0.0.{i + 4}", "running"))
        decision = run_plan(instances)
        for b in decision.plan.backends:
            assert backend_re.fullmatch(b.name), b.name
            assert all(server_re.fullmatch(n) and server_re.fullmatch(s["address"]) for n, s in b.servers.items())
            assert 0 < int(b.name.split("-")[-2]) < 65536
        assert decision.plan.live + len(decision.plan.skipped) == len(instances)
        for skip in decision.plan.skipped:
            assert "\n" not in skip.reason and len(skip.reason) < 200

    @SETTINGS
    @given(prefix=text, separator=text)
    def test_accepted_prefixes_make_valid_names(self, prefix, separator):
        try:
            cfg = make_config(haproxy={"password": "p", "backend": {"name_prefix": prefix,
                                                                    "name_separator": separator}})
        except m.ConfigError as exc:
            assert all(p.startswith("haproxy.backend.name_") for p in exc.problems)
            return
        decision = run_plan([make_instance(1)], cfg=cfg)
        assert [spec_pattern("backend", "name").fullmatch(b.name) is not None
                for b in decision.plan.backends] == [True]


# === Slots and diff ===
LINEAR = m.SlotsConfig(10, 1.5, "linear", m.MAX_SLOTS)
EXPONENTIAL = m.SlotsConfig(10, 1.5, "exponential", m.MAX_SLOTS)


class TestSlots:
    @pytest.mark.parametrize("cfg, n, want", [
        (LINEAR, 0, 10), (LINEAR, 1, 10), (LINEAR, 10, 10), (LINEAR, 11, 12), (LINEAR, 30, 40),
        (LINEAR, 1000, 1495), (EXPONENTIAL, 0, 10), (EXPONENTIAL, 1, 10), (EXPONENTIAL, 10, 10),
        (EXPONENTIAL, 11, 15), (EXPONENTIAL, 30, 34), (EXPONENTIAL, 1000, 1298),
        (m.SlotsConfig(10, 1.1, "linear"), 20, 21), (m.SlotsConfig(10, 1.1, "exponential"), 11, 11),
        (m.SlotsConfig(3, 2, "exponential"), 13, 24), (m.SlotsConfig(10, 1.0001, "exponential"), 1000, 1000),
        (m.SlotsConfig(1, 2, "exponential"), 2, 2), (m.SlotsConfig(1, 2, "exponential"), 3, 4),
        (m.SlotsConfig(10, 1, "linear"), 37, 37),
    ])
    def test_target(self, cfg, n, want):
        assert m.slot_target(n, cfg) == want
        assert m.slot_target(n, cfg) >= max(n, cfg.base)

    @pytest.mark.parametrize("n, current, highest_live, want", [
        (11, 10, 10, 12),    # growth is immediate, to the target for n
        (12, 12, 12, 12),    # the slots fit: no growth ...
        (13, 12, 12, 15),    # ... until they are outgrown
        (51, 70, 50, 70),    # a parked slot is free: filling it needs no growth (and no reload)
        (0, 0, 0, 10), (3, 0, 0, 10), (3, 4, 3, 10),   # a new or short backend gets at least base
        (10, 12, 10, 12),    # target 10 > 12/2: no shrink (no flapping at the boundary)
        (5, 40, 5, 10),      # target 10 <= 40/2: shrink to the target
        (5, 40, 33, 33),     # ... but never below a live slot
        (0, 20, 0, 10),      # 10 <= 20/2: shrink, never below base
        (0, 19, 0, 19),
    ])
    def test_count_hysteresis(self, n, current, highest_live, want):
        assert m.slot_count(n, current, highest_live, LINEAR) == want

    def test_fifty_cycle_churn_never_moves_a_live_server(self):
        rng = random.Random(7)
        cfg = make_config(safety={"max_drain_percent": 100, "drain_confirm_cycles": 1, "drain_confirm_seconds": 0})
        alive = {i: make_instance(i) for i in range(1, 9)}
        actual, state, next_id = {}, m.State(), 9
        backend = "azure-web-8080-eastus"
        for cycle in range(50):
            for _ in range(rng.randint(0, 4)):
                if alive and rng.random() < 0.5:
                    alive.pop(rng.choice(sorted(alive)))
                else:
                    alive[next_id] = make_instance(next_id)
                    next_id += 1
            before = {s["address"]: n for n, s in actual[backend].servers.items()
                      if s["maintenance"] == "disabled"} if backend in actual else {}
            decision = run_plan(list(alive.values()), actual, state, cfg)
            actual = apply_to(actual, decision.plan)
            state.assignments = decision.assignments
            after = {s["address"]: n for n, s in actual[backend].servers.items() if s["maintenance"] == "disabled"}
            assert sorted(after) == sorted(i.address for i in alive.values()), cycle
            for address, slot in before.items():
                if address in after:
                    assert after[address] == slot, f"cycle {cycle}: {address} moved"
            assert run_plan(list(alive.values()), actual, state, cfg).plan.empty, cycle
            servers = actual[backend].servers
            count, target = len(servers), m.slot_target(len(alive), cfg.haproxy.server_slots)
            assert sorted(servers, key=m.slot_index) == [f"srv{i}" for i in range(1, count + 1)], cycle
            assert all(s["id"] == m.slot_index(n) for n, s in servers.items()), cycle
            assert count >= max(len(alive), cfg.haproxy.server_slots.base), cycle
            # no shrink is due: below twice the target, or the top slot is live
            assert count < 2 * target or servers[f"srv{count}"]["maintenance"] == "disabled", cycle

    def test_new_instance_takes_lowest_parked_slot(self):
        cfg = make_config()
        d1 = run_plan([make_instance(i) for i in (1, 2, 3)], cfg=cfg)
        actual = apply_to({}, d1.plan)
        d2 = run_plan([make_instance(i) for i in (1, 3)], actual, m.State(assignments=d1.assignments), cfg)
        actual = apply_to(actual, d2.plan)
        d3 = run_plan([make_instance(i) for i in (1, 3, 4, 5)], actual, m.State(assignments=d2.assignments), cfg)
        actual = apply_to(actual, d3.plan)
        b = actual["azure-web-8080-eastus"]
        assert_slots(b, {"srv1": "10.0.0.5:8080", "srv2": "10.0.0.8:8080", "srv3": "10.0.0.7:8080",
                         "srv4": "10.0.0.9:8080", **{f"srv{i}": "parked" for i in range(5, 11)}})

    def test_restart_matches_by_address_and_port(self):
        """After a restart (no memory) an unchanged estate produces an empty plan, even
        when HAProxy's slot order differs from what a first sync would choose."""
        cfg = make_config()
        servers = {f"srv{i}": new_server(f"srv{i}", None, cfg.haproxy) for i in range(1, 11)}
        for slot, n in (("srv7", 1), ("srv2", 2), ("srv9", 3)):
            inst = make_instance(n)
            servers[slot] = new_server(slot, m.Member(inst.id, inst.name, inst.address, 8080), cfg.haproxy)
        backend = m.BackendState("azure-web-8080-eastus", m.backend_fields("azure-web-8080-eastus",
                                                                           cfg.haproxy.backend), servers)
        decision = run_plan([make_instance(n) for n in (1, 2, 3)], {backend.name: backend}, cfg=cfg)
        assert decision.plan.empty
        assert decision.assignments[backend.name] == {make_instance(1).id: "srv7", make_instance(2).id: "srv2",
                                                      make_instance(3).id: "srv9"}

    def test_foreign_servers_are_left_alone(self):
        cfg = make_config()
        d1 = run_plan([make_instance(1)], cfg=cfg)
        actual = apply_to({}, d1.plan)
        b = actual["azure-web-8080-eastus"]
        servers = {**b.servers, "manual": {"name": "manual", "address": "10.9.9.9", "port": 1}}
        actual = {b.name: m.BackendState(b.name, b.fields, servers)}
        d2 = run_plan([make_instance(1), make_instance(2)], actual, m.State(assignments=d1.assignments), cfg)
        assert [c.name for bp in d2.plan.backends for c in bp.changes] == ["srv2"]
        assert d2.plan.backends[0].servers["manual"] == servers["manual"]

    def test_shrink_removes_only_trailing_parked_slots(self):
        cfg = make_config()
        many = [make_instance(i) for i in range(1, 41)]
        actual = apply_to({}, run_plan(many, cfg=cfg).plan)
        assert len(actual["azure-web-8080-eastus"].servers) == 55
        keep = [many[0], many[30]]           # vm31 lives in srv31
        state = m.State(assignments=run_plan(many, actual, cfg=cfg).assignments)
        d = run_plan(keep, actual, state, make_config(safety={"max_drain_percent": 100}))
        # the 38 drained servers are parked; only slots parked already are deleted
        changes = d.plan.backends[0].changes
        assert sum(c.action == "update" and c.body["maintenance"] == "enabled" for c in changes) == 38
        assert [c.name for c in changes if c.action == "delete"] == [f"srv{i}" for i in range(41, 56)]
        assert all(c.before["maintenance"] == "enabled" for c in changes if c.action == "delete")
        actual = apply_to(actual, d.plan)
        d = run_plan(keep, actual, m.State(assignments=d.assignments), cfg)
        changes = d.plan.backends[0].changes
        top = m.slot_index(d.assignments["azure-web-8080-eastus"][many[30].id])
        assert top > 10 and [c.name for c in changes] == [f"srv{i}" for i in range(top + 1, 41)]
        assert {c.action for c in changes} == {"delete"}
        assert all(c.before["maintenance"] == "enabled" for c in changes)
        actual = apply_to(actual, d.plan)
        assert run_plan(keep, actual, m.State(assignments=d.assignments), cfg).plan.empty   # 31: no flapping

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_in_sync_only_when_there_is_nothing_to_plan_or_drain(self, data):
        """in_sync, the shortcut that spares an unchanged backend its server bodies, holds for a
        backend exactly as plan_backend wrote it, and never where plan_backend has work or a live
        server of ours would be parked or pointed elsewhere (drained)."""
        st, name = self.st, "azure-web-8080-eastus"
        cfg = make_config(haproxy={"password": "p", "apply_mode": data.draw(st.sampled_from(["transaction", "hybrid"])),
                                   "server": {"params": data.draw(st.sampled_from(
                                       [{}, {"inter": 2000}, {"weight": 50}, {"check": "disabled", "rise": 2}]))}}).haproxy
        member = st.builds(m.Member, st.sampled_from(["i1", "i2"]), st.just("vm"), st.sampled_from(["10.0.0.4", "10.0.0.5"]),
                           st.sampled_from([80, 8080]), st.sampled_from([None, 0, 7]))
        slots = data.draw(st.lists(st.none() | member, min_size=1, max_size=12))
        taken = data.draw(st.sampled_from([{}, {2: "other"}]))
        servers = {**({"other": {"name": "other", "address": "10.9.9.9", "port": 1, "id": 2}} if taken else {}),
                   **m.plan_backend(name, slots, None, cfg, taken).servers}
        actual = m.BackendState(name, m.backend_fields(name, cfg.backend), servers)
        assert m.in_sync(name, slots, actual, cfg, taken)
        for _ in range(data.draw(st.integers(1, 3))):         # then someone changes something
            server = data.draw(st.sampled_from(sorted(servers) + [f"srv{len(slots) + 1}"]))
            key = data.draw(st.sampled_from(["address", "port", "maintenance", "check", "weight", "id", "name",
                                             "inter", "rise", "added by haproxy", None]))
            value = data.draw(st.sampled_from([None, "10.0.0.4", 80, 8080, "enabled", "disabled", 1, 2, 7, 50, 2000]))
            changed = {k: v for k, v in {**servers.get(server, {}), key: value}.items() if v is not None}
            servers = {**servers, server: changed} if key else {n: s for n, s in servers.items() if n != server}
        actual = m.BackendState(name, m.backend_fields(name, cfg.backend), servers)
        if m.in_sync(name, slots, actual, cfg, taken):
            drains = [n for n, mb in zip(m.slot_names(len(slots)), slots) if (h := actual.servers.get(n))
                      and h.get("maintenance") != "enabled"
                      and (mb is None or (mb.address, mb.port) != (h.get("address"), h.get("port")))]
            assert m.plan_backend(name, slots, actual, cfg, taken) is None and drains == []

    def test_a_settled_backend_is_taken_as_it_is_only_while_what_it_was_planned_from_is_equal(self):
        cfg, name = make_config(), "azure-web-8080-eastus"
        estate = [make_instance(i) for i in (1, 2, 3)]
        d = run_plan(estate, cfg=cfg)
        actual = apply_to({}, d.plan)
        d = run_plan(estate, actual, m.State(assignments=d.assignments), cfg)
        assert d.plan.empty and list(d.settled) == [name]
        state = m.State(assignments=d.assignments, settled=d.settled)
        again = run_plan(estate, {name: m.BackendState(name, dict(actual[name].fields),
                                                       {n: dict(s) for n, s in actual[name].servers.items()})},
                         state, cfg)                                     # equal, not the same objects
        assert again.plan.empty and again.settled[name] is d.settled[name]
        # Anything it was planned from that differs: planned afresh.
        srv = {**actual[name].servers, "srv1": {**actual[name].servers["srv1"], "maintenance": "enabled"}}
        drifted = run_plan(estate, {name: m.BackendState(name, actual[name].fields, srv)}, state, cfg)
        assert [(c.name, c.body["maintenance"]) for b in drifted.plan.backends for c in b.changes] == [
            ("srv1", "disabled")]
        grown = run_plan([*estate, make_instance(4)], actual, state, cfg)
        assert [c.body["address"] for b in grown.plan.backends for c in b.changes] == ["10.0.0.8"]
        moved = m.State(assignments={name: {estate[0].id: "srv2", estate[1].id: "srv1", estate[2].id: "srv3"}},
                        settled=d.settled)
        planned = run_plan(estate, actual, moved, cfg)
        assert planned.settled.get(name) is not d.settled[name]
        assert planned.plan == run_plan(estate, actual, dataclasses.replace(moved, settled={}), cfg).plan

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_planning_with_settled_backends_decides_as_planning_without(self, data):
        """State.settled only spares work: over cycles of discovery changes and changes made by
        others, the decision is the one planned from scratch (what it records aside)."""
        st = self.st
        cfg = make_config(safety={"max_drain_percent": data.draw(st.sampled_from([0, 50, 100])),
                                  "drain_seconds": data.draw(st.sampled_from([0, 30]))},
                          haproxy={"password": "p", "server_slots": {"base": data.draw(st.sampled_from([1, 2, 10]))}})
        pool = [make_instance(i, service=data.draw(st.sampled_from(["web", "api"])),
                              address=f"10.0.0.{data.draw(st.integers(1, 6))}") for i in range(1, 13)]
        actual, state, now = {}, m.State(), 1000.0
        for _ in range(data.draw(st.integers(2, 5))):
            estate = [i for i in pool if data.draw(st.booleans())]
            for name, b in list(actual.items()):          # someone else edits HAProxy, now and then
                srv = data.draw(st.sampled_from(sorted(b.servers) + [None]))
                if srv is not None:
                    field = data.draw(st.sampled_from([("maintenance", "enabled"), ("address", "10.0.0.9"),
                                                       ("weight", 7), ("id", None)]))
                    changed = {k: v for k, v in {**b.servers[srv], field[0]: field[1]}.items() if v is not None}
                    actual[name] = m.BackendState(name, b.fields, {**b.servers, srv: changed})
            groups, skipped = m.select_instances(estate, cfg)
            decided = m.plan_cycle(groups, skipped, actual, state, cfg, now)
            fresh = m.plan_cycle(groups, skipped, actual, dataclasses.replace(state, settled={}), cfg, now)
            assert (decided.plan, decided.assignments, decided.draining, decided.drain_streak) == (
                fresh.plan, fresh.assignments, fresh.draining, fresh.drain_streak)
            actual = apply_to(actual, decided.plan)
            state = m.State(assignments=decided.assignments, draining=decided.draining, settled=decided.settled,
                            drain_fingerprint=decided.drain_fingerprint, drain_streak=decided.drain_streak)
            now += data.draw(st.sampled_from([1, 40]))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_a_hybrid_body_never_drops_a_pointer_field_the_server_has(self, data):
        """dataplaneapi's runtime path dereferences the new value of each changed runtime field:
        a nil weight, port or health-check port where the server on disk has one panics into a
        reload. Whatever HAProxy holds, a hybrid body carries each of them that the server has."""
        st, name = self.st, "azure-web-8080-eastus"
        params = data.draw(st.sampled_from([{}, {"weight": 50}, {"health_check_port": 9000}, {"inter": 2000}]))
        cfg = make_config(haproxy={"password": "p", "apply_mode": "hybrid", "server": {"params": params}}).haproxy
        member = st.builds(m.Member, st.sampled_from(["i1", "i2"]), st.just("vm"), st.just("10.0.0.4"),
                           st.just(8080), st.sampled_from([None, 0, 7]))
        slots = data.draw(st.lists(st.none() | member, min_size=1, max_size=4))
        held = {}
        for n in m.slot_names(len(slots)):
            server = {"name": n, "address": data.draw(st.sampled_from(["127.0.0.1", "10.0.0.4", "10.0.0.9"])),
                      "port": data.draw(st.sampled_from([80, 8080])),
                      "maintenance": data.draw(st.sampled_from(["enabled", "disabled"]))}
            for key in ("weight", "health_check_port"):
                if (value := data.draw(st.sampled_from([None, 1, 5]))) is not None:
                    server[key] = value
            held[n] = server
        plan = m.plan_backend(name, slots, m.BackendState(name, m.backend_fields(name, cfg.backend), held), cfg, {})
        for c in plan.changes if plan else ():
            assert {k for k in ("weight", "port", "health_check_port") if k in c.before} <= set(c.body), c
            if c.runtime_only:
                assert all(c.body[k] is not None for k in ("weight", "port", "health_check_port") if k in c.before)

    def test_hybrid_parked_slots_differ_only_in_runtime_fields(self):
        cfg = make_config(haproxy={"password": "p", "apply_mode": "hybrid",
                                   "server": {"params": {"inter": 2000, "weight": 50}}})
        live = new_server("srv1", m.Member("id", "vm", "10.0.0.4", 8080), cfg.haproxy)
        parked = new_server("srv1", None, cfg.haproxy)
        assert {k for k in live if live[k] != parked.get(k)} == {"address", "port", "maintenance"}
        assert m.ServerChange("update", "srv1", live, parked).runtime_only
        transaction = make_config(haproxy={"password": "p", "server": {"params": {"inter": 2000}}}).haproxy
        assert parked["check"] == "enabled" and new_server("srv1", None, transaction) == {
            "name": "srv1", "id": 1, "address": "127.0.0.1", "port": 80, "maintenance": "enabled",
            "check": "disabled"}


# === Slots and diff: plans, drains and the guard ===
class TestPlan:
    def synced(self, instances, cfg=None):
        cfg = cfg or make_config()
        d = run_plan(instances, cfg=cfg)
        return apply_to({}, d.plan), m.State(assignments=d.assignments)

    def test_selecting_and_planning_pause_the_collector(self):
        seen = []

        class Watched(dict):
            def items(self):
                seen.append(gc.isenabled())
                return super().items()

        def instances():
            seen.append(gc.isenabled())
            yield make_instance(1)
        cfg = make_config()
        groups, skipped = m.select_instances(instances(), cfg)
        d = m.plan_cycle(Watched(groups), skipped, {}, m.State(), cfg)
        assert seen == [False, False] and gc.isenabled()
        assert [b.name for b in d.plan.backends] == ["azure-web-8080-eastus"]

    def test_first_sync_golden(self):
        d = run_plan([make_instance(1), make_instance(2, address="10.0.0.9")], cfg=make_config(
            haproxy={"password": "p", "server_slots": {"base": 3}}))
        assert m.format_plan(d.plan) == textwrap.dedent("""\
            backend azure-web-8080-eastus (create, 3 slots, 2 live)
              + srv1 10.0.0.5:8080
              + srv2 10.0.0.9:8080
              + srv3 parked
            1 services, 2 live servers, 1 backends to change
            """)
        b = d.plan.backends[0]
        assert b.fields == {"name": "azure-web-8080-eastus", "mode": "http", "balance": {"algorithm": "roundrobin"}}
        assert b.servers["srv1"] == {"name": "srv1", "id": 1, "address": "10.0.0.5", "port": 8080,
                                     "check": "enabled", "maintenance": "disabled"}

    def test_add_remove_golden(self):
        actual, state = self.synced([make_instance(1), make_instance(2)])
        d = run_plan([make_instance(1), make_instance(3), make_instance(4, tags={"HAProxy:Service:Port": "x"})],
                     actual, state)
        assert m.format_plan(d.plan) == textwrap.dedent("""\
            backend azure-web-8080-eastus (10 slots, 2 live)
              ~ srv2 10.0.0.6:8080 -> parked
              ~ srv3 parked -> 10.0.0.7:8080 (vm3)
            skipped: vm4: tag HAProxy:Service:Port "x" is not a port (1-65535)
            1 services, 2 live servers, 1 backends to change
            """)

    def test_vanished_service_parks_every_slot_and_keeps_the_backend(self):
        actual, state = self.synced([make_instance(1), make_instance(2, service="api")])
        d = run_plan([make_instance(2, service="api")], actual, state)
        assert m.format_plan(d.plan) == textwrap.dedent("""\
            backend azure-web-8080-eastus (10 slots, 0 live)
              ~ srv1 10.0.0.5:8080 -> parked
            1 services, 1 live servers, 1 backends to change
            """)
        assert not any(c.action == "delete" for b in d.plan.backends for c in b.changes)

    def test_no_op_golden(self):
        actual, state = self.synced([make_instance(1)])
        d = run_plan([make_instance(1)], actual, state)
        assert d.plan.empty and m.format_plan(d.plan) == "1 services, 1 live servers, no changes\n"

    def test_growth_golden(self):
        cfg = make_config(haproxy={"password": "p", "server_slots": {"base": 2, "growth_factor": 1}})
        actual, state = self.synced([make_instance(1), make_instance(2)], cfg)
        d = run_plan([make_instance(i) for i in (1, 2, 3)], actual, state, cfg)
        assert m.format_plan(d.plan) == textwrap.dedent("""\
            backend azure-web-8080-eastus (3 slots, 3 live)
              + srv3 10.0.0.7:8080 (vm3)
            1 services, 3 live servers, 1 backends to change
            """)
        assert d.plan.backends[0].structural and not d.plan.runtime_only

    def test_drift_is_repaired(self):
        actual, state = self.synced([make_instance(1)])
        b = actual["azure-web-8080-eastus"]
        servers = {**b.servers, "srv1": {**b.servers["srv1"], "address": "10.6.6.6"},
                   "srv2": {**b.servers["srv2"], "check": "enabled"}}
        fields = {**b.fields, "balance": {"algorithm": "leastconn"}}
        d = run_plan([make_instance(1)], {b.name: m.BackendState(b.name, fields, servers)}, state)
        assert m.format_plan(d.plan).splitlines()[:4] == [
            "backend azure-web-8080-eastus (10 slots, 1 live)", "  ~ backend settings",
            "  ~ srv1 10.6.6.6:8080 -> 10.0.0.5:8080 (vm1)", "  ~ srv2 parked -> parked"]

    def test_absent_switches_equal_disabled(self):
        """The API leaves out switches that are off; that is no drift."""
        actual, state = self.synced([make_instance(1)])
        b = actual["azure-web-8080-eastus"]
        servers = {n: {k: v for k, v in s.items() if v != "disabled"} for n, s in b.servers.items()}
        assert run_plan([make_instance(1)], {b.name: m.BackendState(b.name, b.fields, servers)}, state).plan.empty

    def test_mass_drain_is_held_until_confirmed(self):
        cfg = make_config(safety={"drain_confirm_seconds": 0})
        everyone = [make_instance(i) for i in range(1, 11)]
        actual, state = self.synced(everyone, cfg)
        partial = everyone[:2] + [make_instance(11)]
        d1 = run_plan(partial, actual, state, cfg)
        assert len(d1.plan.held) == 8
        assert [(c.name, c.action) for c in d1.plan.backends[0].changes] == [
            ("srv11", "add"), ("srv12", "add")]   # grows to 12 slots: nothing parked
        assert d1.assignments == state.assignments | {"azure-web-8080-eastus": {
            **state.assignments["azure-web-8080-eastus"], make_instance(11).id: "srv11"}}
        state = m.State(assignments=state.assignments, drain_fingerprint=d1.drain_fingerprint,
                        drain_streak=d1.drain_streak)
        d2 = run_plan(partial, actual, state, cfg)
        assert d2.plan.held == ()
        after = apply_to(actual, d2.plan)["azure-web-8080-eastus"].servers.values()
        assert sorted(s["address"] for s in after if s["maintenance"] == "disabled") == sorted(
            i.address for i in partial)

    def test_small_scale_in_is_never_held(self):
        everyone = [make_instance(i) for i in range(1, 11)]
        actual, state = self.synced(everyone)
        d = run_plan(everyone[:7], actual, state)
        assert d.plan.held == () and len(d.plan.backends[0].changes) == 3

    @pytest.mark.parametrize("drains, live, empty, streak, since, now, confirm, seconds, want", [
        (1, 1, False, 0, None, 0, 2, 0, (False, 0, None)), (5, 10, False, 0, None, 0, 2, 0, (False, 0, None)),
        (6, 10, False, 0, None, 7, 2, 0, (True, 1, 7)), (6, 10, False, 1, 7, 8, 2, 0, (False, 2, 7)),
        (6, 10, False, 1, 7, 8, 3, 0, (True, 2, 7)), (6, 10, False, 0, None, 7, 1, 0, (False, 1, 7)),
        # and drain_confirm_seconds since it was first seen, whichever is longer
        (6, 10, False, 5, 100, 399, 2, 300, (True, 6, 100)), (6, 10, False, 1, 100, 400, 2, 300, (False, 2, 100)),
        # an empty discovery is held however few servers it parks
        (1, 1, True, 0, None, 50, 2, 300, (True, 1, 50)), (0, 0, True, 0, None, 50, 2, 300, (False, 0, None)),
        (1, 1, True, 3, 50, 350, 2, 300, (False, 4, 50)),
    ])
    def test_drain_held(self, drains, live, empty, streak, since, now, confirm, seconds, want):
        assert m.drain_held(drains, live, empty, streak, since, now, m.SafetyConfig(50, confirm, seconds)) == want

    def test_an_empty_discovery_parks_only_after_the_confirm_seconds(self):
        cfg = make_config(safety={"drain_confirm_seconds": 300})
        everyone = [make_instance(i) for i in range(1, 4)]
        actual, state = self.synced(everyone, cfg)
        for n, now in enumerate((1000, 1030, 1100, 1299)):        # the cycles keep coming, 300 s not yet
            d = run_plan([], actual, state, cfg, now=now)
            assert len(d.plan.held) == 3 and d.plan.empty and d.drain_since == 1000, n
            state = m.State(assignments=state.assignments, drain_fingerprint=d.drain_fingerprint,
                            drain_streak=d.drain_streak, drain_since=d.drain_since)
        d = run_plan([], actual, state, cfg, now=1300)
        assert d.plan.held == () and {c.body["maintenance"] for b in d.plan.backends for c in b.changes} == {"enabled"}

    def test_a_backend_never_grows_past_max_and_the_surplus_are_skips(self):
        cfg = make_config(haproxy={"password": "p", "server_slots": {"base": 2, "max": 3}})
        first = run_plan([make_instance(i) for i in range(1, 3)], cfg=cfg)
        state = m.State(assignments=first.assignments)
        decision = run_plan([make_instance(i) for i in range(1, 6)], actual=apply_to({}, first.plan),
                            state=state, cfg=cfg)
        (backend,) = decision.plan.backends
        assert backend.slots == 3 and backend.live == 3
        assert sorted(s.instance for s in decision.plan.skipped) == ["vm4", "vm5"]
        assert all("is full (haproxy.server_slots.max = 3)" in s.reason for s in decision.plan.skipped)
        served = {s["address"] for s in backend.servers.values()}
        assert {make_instance(1).address, make_instance(2).address} <= served   # slot holders stay


class TestDraining:
    """safety.drain_seconds: a live server whose instance left drains, then is parked."""
    T = 1_800_000_000.0          # "now" of the first cycle

    def synced(self, instances, base=10):
        cfg = make_config(haproxy={"password": "p", "server_slots": {"base": base}},
                          safety={"drain_confirm_seconds": 0})
        d = run_plan(instances, cfg=cfg)
        return apply_to({}, d.plan), m.State(assignments=d.assignments), cfg

    def drained(self, d):
        return {(x.backend, x.server): (x.address, x.port, x.since, x.until) for x in d.plan.draining}

    def test_a_leaving_server_drains_first_and_keeps_its_slot(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)], base=2)
        d = run_plan([make_instance(1), make_instance(3)], actual, state, cfg, drain=30, now=self.T)
        assert self.drained(d) == {(WEB, "srv2"): ("10.0.0.6", 8080, self.T, self.T + 30)}
        assert d.draining == {WEB: {"srv2": d.plan.draining[0]}}
        # srv2 stays live as it is (no write for it); the new instance grows the backend
        (b,) = d.plan.backends
        assert [(c.action, c.name, c.label) for c in b.changes] == [("add", "srv3", "vm3"), ("add", "srv4", "")]
        assert m.format_plan(d.plan) == textwrap.dedent("""\
            backend azure-web-8080-eastus (4 slots, 3 live)
              + srv3 10.0.0.7:8080 (vm3)
              + srv4 parked
            draining: azure-web-8080-eastus/srv2 10.0.0.6:8080 since 2027-01-15T08:00:00Z, parked by 2027-01-15T08:00:30Z
            1 services, 2 live servers, 1 backends to change
            """)
        assert d.plan.live == 2 and d.assignments[WEB][make_instance(2).id] == "srv2"

    def continuing(self, sessions=None, now=None, drain=30):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        first = run_plan([make_instance(1)], actual, state, cfg, drain=drain, now=self.T)
        state = m.State(assignments=first.assignments, draining=first.draining)
        return actual, run_plan([make_instance(1)], actual, state, cfg, drain=drain,
                                now=self.T + 10 if now is None else now, sessions=sessions)

    def test_each_cycle_drains_again_for_the_remaining_time(self):
        """A reload forgets the runtime drain: the next cycle sends it again, same deadline."""
        _, d = self.continuing()
        assert self.drained(d) == {(WEB, "srv2"): ("10.0.0.6", 8080, self.T, self.T + 30)} and d.plan.empty

    @pytest.mark.parametrize("sessions, now, parked", [
        ({f"{WEB}/srv2": 0}, None, True),       # sessions 0: parked early
        ({f"{WEB}/srv2": 3}, None, False),
        ({f"{WEB}/srv2": None}, None, False),   # unknown: drains on
        ({}, T + 30, True),                     # time is up
        ({f"{WEB}/srv2": 3}, T + 29.9, False),
    ])
    def test_parked_once_its_sessions_are_0_or_its_time_is_up(self, sessions, now, parked):
        actual, d = self.continuing(sessions, now)
        assert (d.plan.draining == ()) is parked and (d.draining == {}) is parked
        if parked:
            assert_slots(apply_to(actual, d.plan)[WEB], {"srv1": "10.0.0.5:8080", "srv2": "parked",
                                                         **{f"srv{i}": "parked" for i in range(3, 11)}})

    def test_after_a_restart_a_drain_starts_again(self):
        actual, _, cfg = self.synced([make_instance(1), make_instance(2)])
        d = run_plan([make_instance(1)], actual, m.State(), cfg, drain=30, now=self.T + 500)
        assert self.drained(d) == {(WEB, "srv2"): ("10.0.0.6", 8080, self.T + 500, self.T + 530)}

    def test_a_slot_whose_server_changed_is_a_new_drain(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        old = m.Drain(WEB, "srv2", "10.9.9.9", 8080, self.T - 100, self.T - 70)
        d = run_plan([make_instance(1)], actual, m.State(assignments=state.assignments,
                                                          draining={WEB: {"srv2": old}}), cfg, drain=30, now=self.T)
        assert self.drained(d) == {(WEB, "srv2"): ("10.0.0.6", 8080, self.T, self.T + 30)}

    def test_a_server_without_a_port_drains_on_to_its_deadline(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        b = actual[WEB]
        actual = {WEB: m.BackendState(WEB, b.fields, {**b.servers, "srv2": {**b.servers["srv2"], "port": None}})}
        first = run_plan([make_instance(1)], actual, state, cfg, drain=30, now=self.T)
        state = m.State(assignments=first.assignments, draining=first.draining)
        later = run_plan([make_instance(1)], actual, state, cfg, drain=30, now=self.T + 10)
        assert self.drained(later) == {(WEB, "srv2"): ("10.0.0.6", None, self.T, self.T + 30)}
        assert "10.0.0.6:None since" in m.format_plan(later.plan)

    @pytest.mark.parametrize("power", ["stopping", "deallocating", "deleting"])
    def test_an_instance_on_its_way_out_drains_even_when_not_running_only(self, power):
        cfg = make_config(azure={"subscription_id": SUB, "running_only": False})
        d0 = run_plan([make_instance(1), make_instance(2, state="stopped")], cfg=cfg)
        actual, state = apply_to({}, d0.plan), m.State(assignments=d0.assignments)
        assert d0.plan.live == 2           # a stopped instance is served without running_only
        d = run_plan([make_instance(1), make_instance(2, state=power)], actual, state, cfg, drain=30, now=self.T)
        assert [(x.server, x.address) for x in d.plan.draining] == [("srv2", "10.0.0.6")] and d.plan.live == 1

    def test_drain_seconds_0_parks_at_once(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        d = run_plan([make_instance(1)], actual, state, cfg, drain=0, now=self.T)
        assert d.plan.draining == () and d.draining == {}
        assert [(c.name, m._endpoint(c.body)) for c in d.plan.backends[0].changes] == [("srv2", "parked")]

    def test_the_guard_counts_drain_starts_and_a_held_one_does_not_start(self):
        everyone = [make_instance(i) for i in range(1, 11)]
        actual, state, cfg = self.synced(everyone)
        d = run_plan(everyone[:2], actual, state, cfg, drain=30, now=self.T)
        assert len(d.plan.held) == 8 and d.plan.draining == () and d.plan.empty
        confirmed = m.State(assignments=d.assignments, drain_fingerprint=d.drain_fingerprint,
                            drain_streak=d.drain_streak)
        d2 = run_plan(everyone[:2], actual, confirmed, cfg, drain=30, now=self.T + 5)
        assert d2.plan.held == () and len(d2.plan.draining) == 8 and d2.plan.empty
        # Draining ones are not counted again, neither as starts nor as live: one of the two
        # left serving goes now (no mass drain), both would be (held).
        state3 = m.State(assignments=d2.assignments, draining=d2.draining)
        d3 = run_plan(everyone[:1], actual, state3, cfg, drain=30, now=self.T + 10)
        assert d3.plan.held == () and len(d3.plan.draining) == 9
        d4 = run_plan([], actual, state3, cfg, drain=30, now=self.T + 10)
        assert len(d4.plan.held) == 2 and len(d4.plan.draining) == 8 and d4.plan.empty

    def test_a_draining_slot_is_not_reused_while_parked_ones_are_left(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)], base=3)
        d = run_plan([make_instance(1), make_instance(3)], actual, state, cfg, drain=30, now=self.T)
        (b,) = d.plan.backends
        assert [(c.name, m._endpoint(c.body)) for c in b.changes] == [("srv3", "10.0.0.7:8080")]

    def test_an_instance_back_during_its_drain_is_set_ready(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        first = run_plan([make_instance(1)], actual, state, cfg, drain=30, now=self.T)
        back = run_plan([make_instance(1), make_instance(2)], actual,
                        m.State(assignments=first.assignments, draining=first.draining), cfg, drain=30, now=self.T + 5)
        assert back.plan.ready == (f"{WEB}/srv2",) and back.plan.draining == () and back.plan.empty
        assert "ready: azure-web-8080-eastus/srv2 (its instance is back)" in m.format_plan(back.plan)

    def test_the_view_shows_a_drain_under_way_and_one_a_cycle_would_start(self):
        actual, state, cfg = self.synced([make_instance(1), make_instance(2)])
        groups, skipped = m.select_instances([make_instance(1)], cfg)
        seen = m.Seen(groups, skipped, m.fingerprint(groups))
        d = run_plan([make_instance(1)], actual, state, cfg, drain=30, now=self.T)
        fresh = m.status_view(seen, actual, d, cfg, "t", self.T)
        srv2 = fresh["targets"][0]["backends"][0]["servers"][1]
        assert srv2["state"] == "live" and srv2["drift"] == "want draining (its instance left), then parked"
        view = m.status_view(seen, actual, d, cfg, "t", self.T + 12, d.draining)
        (b,) = view["targets"][0]["backends"]
        assert b["servers"][1] == {"slot": "srv2", "state": "draining", "since": "2027-01-15T08:00:00Z",
                                   "seconds_left": 18, "address": "10.0.0.6:8080", "instance": None}
        assert (b["live"], b["draining"], b["parked"], b["drift"]) == (1, 1, 8, 0)
        assert "  srv2     draining 10.0.0.6:8080          since 2027-01-15T08:00:00Z, 18 s left" in \
            m.format_status(view)
        assert m.backend_gauges(view)[("servers_draining", f'target="t",backend="{WEB}"')] == 1

    def test_ipv6_servers_are_shown_in_brackets(self, caplog):
        """Plan lines, the status table and the log lines of a drain and of a refused backend
        write an IPv6 server as [ADDRESS]:PORT."""
        six = [make_instance(i, address=f"fd00::{i}") for i in (1, 2, 3)]
        actual, state, cfg = self.synced(six[:2], base=3)
        d = run_plan([six[0], six[2]], actual, state, cfg, drain=30, now=self.T)
        assert m.format_plan(d.plan).splitlines()[1:3] == [
            "  ~ srv3 parked -> [fd00::3]:8080 (vm3)",
            f"draining: {WEB}/srv2 [fd00::2]:8080 since 2027-01-15T08:00:00Z, "
            "parked by 2027-01-15T08:00:30Z"]
        groups, skipped = m.select_instances([six[0], six[2]], cfg)
        seen = m.Seen(groups, skipped, m.fingerprint(groups))
        view = m.status_view(seen, actual, d, cfg, "t", self.T)
        rows = m.format_status(view).splitlines()
        assert rows[4:] == [
            "    srv1     live     [fd00::1]:8080         vm1",
            "  ! srv2     live     [fd00::2]:8080         (no discovered instance)  "
            "<- want draining (its instance left), then parked",
            "  ! srv3     parked  <- want [fd00::3]:8080 (vm3)"]
        with caplog.at_level(logging.INFO, logger="haproxy_azure_discovery"):
            m._log_report(m.CycleReport(result="applied", plan=d.plan), m.State())
            m._log_refused({WEB: "HTTP 422"}, groups, cfg)
        lines = [r.getMessage() for r in caplog.records]
        assert f"server {WEB}/srv2 ([fd00::2]:8080) draining since 2027-01-15T08:00:00Z, " \
               "parked by 2027-01-15T08:00:30Z at the latest" in lines
        refused = "instances: vm1 ([fd00::1]:8080), vm3 ([fd00::3]:8080)"
        assert any(line.endswith(refused) for line in lines)
        assert m.endpoint("10.0.0.4", 80) == "10.0.0.4:80"

    def test_wake_by_the_earliest_drain_deadline(self):
        drains = {WEB: {"srv2": m.Drain(WEB, "srv2", "a", 1, 0, self.T + 4),
                        "srv3": m.Drain(WEB, "srv3", "a", 1, 0, self.T + 9)}}
        assert m.drain_wake(30, m.State(draining=drains), self.T) == pytest.approx(4 + m.DRAIN_SLACK)
        assert m.drain_wake(2, m.State(draining=drains), self.T) == 2
        assert m.drain_wake(30, m.State(), self.T) == 30
        assert m.drain_wake(30, m.State(draining=drains), self.T + 60) == m.DRAIN_SLACK


# === Azure: what the listings mean ===
EXAMPLES = os.path.join(HERE, "testing", "azure-examples")


def example(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        return json.load(f)["responses"]["200"]["body"]["value"]


def instances_of(listing, cfg, skipped=None):
    """The listings' JSON read and joined, as a discovery does it."""
    return m.join(m.inventory_of(listing), cfg, skipped)


class TestAzureParsing:
    """The pure join over the shapes of Azure's own example responses."""

    def test_vm_joined_to_its_nic_by_case_insensitive_id(self):
        nic = example("NetworkInterfaceListAll.json")[0]
        vm = {**example("VirtualMachine_ListAll_MaximumSet_Gen.json")[0],
              "id": nic["properties"]["virtualMachine"]["id"].upper(), "name": "vm1",
              "tags": {"HAProxy:Service:Name": "web", "HAProxy:Service:Port": "80"}}
        status = {"id": vm["id"].lower(), "properties": {"instanceView": {"statuses": [
            {"code": "ProvisioningState/succeeded"}, {"code": "PowerState/running"}]}}}
        [inst] = instances_of(m.AzureListing(vms=[vm], statuses=[status], nics=[nic]),
                                        make_config().azure)
        assert (inst.id, inst.address, inst.power_state) == (vm["id"].lower(), "172.20.2.4", "running")
        assert inst.tags["HAProxy:Service:Name"] == "web" and inst.region == vm["location"]

    def test_scale_set_instance_overlays_its_sets_tags(self):
        vmss_vm = example("VirtualMachineScaleSetVM_List_MaximumSet_Gen.json")[0]
        nic = example("VmssNetworkInterfaceList.json")[0]
        vid = nic["properties"]["virtualMachine"]["id"]
        set_id = vid.rsplit("/virtualMachines/", 1)[0]
        scale_set = {"id": set_id, "name": "vmss1", "tags": {"HAProxy:Service:Name": "web",
                                                             "HAProxy:Service:Port": "80", "env": "prod"}}
        raw = {**vmss_vm, "id": vid, "tags": {"env": "canary"}, "properties": {
            **vmss_vm["properties"], "instanceView": {"statuses": [{"code": "PowerState/deallocated"}]}}}
        [inst] = instances_of(m.AzureListing(set_instances=[raw], scale_sets=[scale_set], nics=[nic]),
                                        make_config().azure)
        assert inst.tags == {**scale_set["tags"], "env": "canary"}
        assert (inst.kind, inst.address, inst.power_state) == ("uniform", "10.0.0.4", "deallocated")

    def test_public_address_comes_from_the_public_ip_list(self):
        nic = example("VmssNetworkInterfaceList.json")[0]
        pip = example("VmssPublicIpListAll.json")[0]
        config_id = nic["properties"]["ipConfigurations"][0]["id"]
        pip = {**pip, "id": nic["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]["id"].lower(),
               "properties": {**pip["properties"], "ipConfiguration": {"id": config_id}}}
        raw = {"id": nic["properties"]["virtualMachine"]["id"], "instanceId": "0", "location": "eastus"}
        cfg = make_config(azure={"address": "public"}).azure
        [inst] = instances_of(m.AzureListing(set_instances=[raw], nics=[nic], public_ips=[pip]), cfg)
        assert inst.address == "13.67.119.72" and inst.name == "vmss1_0"
        [inst] = instances_of(m.AzureListing(set_instances=[raw], nics=[nic]), cfg)
        assert inst.address is None

    @pytest.mark.parametrize("codes, want", [
        (["ProvisioningState/succeeded", "PowerState/running"], "running"),
        (["ProvisioningState/deleting", "PowerState/running"], "deleting"),     # on its way out: drains
        (["PowerState/deallocating"], "deallocating"),
        ([None, {"code": 7}, "PowerState/stopping"], "stopping"),
        ([], None),
    ])
    def test_power_state_of_an_instance_view(self, codes, want):
        statuses = [c if not isinstance(c, str) else {"code": c} for c in codes]
        assert m.power_state({"statuses": statuses}) == want

    @pytest.mark.parametrize("view, want", [
        ({"vmHealth": {"status": {"code": "HealthState/healthy", "level": "Info"}}}, "healthy"),
        ({"vmHealth": {"status": {"code": "HealthState/Unhealthy"}}}, "unhealthy"),
        ({"vmHealth": {"status": {"code": "HealthState/initializing"}}}, "initializing"),
        ({"vmHealth": {"status": {"code": "HealthState/unknown"}}}, "unknown"),
        ({"vmHealth": {"status": {"code": "HealthState/degraded"}}}, "unknown"),   # undocumented
        ({"vmHealth": {"status": {"code": 7}}}, None),
        ({"vmHealth": {"status": None}}, None),
        ({"vmHealth": "healthy"}, None),
        ({"statuses": [{"code": "PowerState/running"}]}, None),     # no extension
        (None, None),
    ])
    def test_health_of_an_instance_view(self, view, want):
        assert m.vm_health(view) == want

    def test_the_join_reads_the_health_of_uniform_instances_only(self):
        """A Uniform instance's health is in its scale set's listing; a VM's status-only view
        is not read for it (the option covers Uniform sets)."""
        nic = example("VmssNetworkInterfaceList.json")[0]
        vid = nic["properties"]["virtualMachine"]["id"]
        view = {"statuses": [{"code": "PowerState/running"}],
                "vmHealth": {"status": {"code": "HealthState/initializing"}}}
        uniform = {"id": vid, "instanceId": "0", "properties": {"instanceView": view}}
        vm = {"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
                    "virtualMachines/vm1", "name": "vm1"}
        status = {"id": vm["id"], "properties": {"instanceView": view}}
        listing = m.AzureListing(vms=[vm], statuses=[status], set_instances=[uniform], nics=[nic])
        found = {i.kind: i for i in instances_of(listing, make_config().azure)}
        assert (found["uniform"].health, found["vm"].health) == ("initializing", None)
        assert found["vm"].power_state == "running"
        del view["vmHealth"]
        [inst] = instances_of(m.AzureListing(set_instances=[uniform], nics=[nic]),
                                        make_config().azure)
        assert inst.health is None and inst._fields[-1] == "health"

    def test_example_shapes_never_crash_the_join(self):
        """Placeholders everywhere (string tags, availability-set ids, odd status codes)."""
        listing = m.AzureListing(
            vms=example("VirtualMachine_ListAll_MaximumSet_Gen.json"),
            statuses=example("VirtualMachine_ListAll_MaximumSet_Gen.json"),
            nics=example("NetworkInterfaceListAll.json") + example("VmssNetworkInterfaceList.json"),
            public_ips=example("PublicIpAddressListAll.json") + example("VmssPublicIpListAll.json"),
            set_instances=example("VirtualMachineScaleSetVM_List_MaximumSet_Gen.json"))
        for address in ("private", "public"):
            instances = instances_of(listing, make_config(azure={"address": address}).azure)
            assert instances and all(i.power_state == "unknown" and i.address is None for i in instances)
            assert run_plan(instances).plan.empty

    @pytest.mark.parametrize("configs, version, want", [
        ([("IPv4", True, "10.0.0.4"), ("IPv6", False, "fd00::4")], "ipv4", "10.0.0.4"),
        ([("IPv4", True, "10.0.0.4"), ("IPv6", False, "fd00::4")], "ipv6", "fd00::4"),
        ([("IPv4", False, "10.0.0.4"), ("IPv4", True, "10.0.0.5")], "ipv4", "10.0.0.5"),
        ([("IPv4", True, "not-an-ip")], "ipv4", None),
        ([("IPv4", True, "fd00::4")], "ipv4", None),
        ([], "ipv4", None),
    ])
    def test_address_choice(self, configs, version, want):
        nic = {"properties": {"ipConfigurations": [
            {"id": f"c{i}", "properties": {"privateIPAddressVersion": v, "primary": p, "privateIPAddress": a}}
            for i, (v, p, a) in enumerate(configs)]}}
        assert m.nic_address(m.listed_nic(nic), {}, make_config(azure={"ip_version": version}).azure) == want

    def test_only_uniform_sets_with_the_name_tag_are_listed(self):
        sets = [{"name": "a", "tags": {"HAProxy:Service:Name": "web"}, "properties": {"orchestrationMode": "Uniform"}},
                {"name": "b", "tags": {}, "properties": {"orchestrationMode": "Uniform"}},
                {"name": "c", "tags": {"HAProxy:Service:Name": "web"}, "properties": {"orchestrationMode": "Flexible"}},
                {"name": "d", "tags": {"HAProxy:Service:Name": "web"}}]
        assert [s["name"] for s in m.scale_sets_to_list(sets, make_config())] == ["a", "d"]

    def test_could_serve_is_tagged_and_in_scope(self):
        cfg = make_config(tags={"allowlist": {"env": "prod"}, "denylist": {"drain": "yes"}})
        tagged = make_instance(1, tags={"env": "prod"})
        assert m.could_serve(tagged, cfg)
        lower = m.Instance(tagged.id, "x", "eastus", {"haproxy:service:name": "web", "env": "prod"}, None)
        assert m.could_serve(lower, cfg)                     # tag keys compare as Azure compares them
        assert not m.could_serve(make_instance(2), cfg)      # outside the allowlist
        assert not m.could_serve(make_instance(3, tags={"env": "prod", "drain": "yes"}), cfg)
        assert not m.could_serve(m.Instance(tagged.id, "y", "eastus", {"env": "prod"}, None), cfg)

    def test_status_list_filtered_to_the_configured_groups(self):
        items = [{"id": f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/v"}
                 for rg in ("RG-A", "rg-b", "rg-c")]
        assert m.in_resource_groups(items, ["rg-a", "RG-B"]) == items[:2]
        assert m.in_resource_groups(items, []) == items

    @pytest.mark.parametrize("azure, metadata, want", [
        ({}, False, ("https://management.azure.com", "login.microsoftonline.com")),
        ({"cloud": "china"}, False, ("https://management.chinacloudapi.cn", "login.chinacloudapi.cn")),
        ({"resource_manager_url": "https://rm.example", "cloud": "public"}, False,
         ("https://management.azure.com", "login.microsoftonline.com")),
        ({"resource_manager_url": "https://rm.example"}, True, ("https://aud.example/", "https://login.example")),
        ({"resource_manager_url": "https://rm.example", "token_audience": "https://mine.example"}, True,
         ("https://mine.example", "https://login.example")),
        ({"resource_manager_url": "https://rm.example", "token_audience": "https://mine.example",
          "login_endpoint": "https://login.mine.example"}, False,
         ("https://mine.example", "https://login.mine.example")),
    ])
    def test_cloud_endpoints(self, azure, metadata, want):
        cfg = make_config(azure=azure).azure
        document = {"resourceManager": "https://rm.example/", "authentication": {
            "loginEndpoint": "https://login.example/", "audiences": ["https://aud.example/"]}}
        assert m.needs_cloud_metadata(cfg) == metadata
        assert m.cloud_endpoints(cfg, document if metadata else None) == want

    def test_graph_rows_are_read_into_the_records_the_join_reads(self):
        vid = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
        nic_id = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n1"
        rows = [{"id": vid, "name": "vm1", "type": "microsoft.compute/virtualmachines", "location": "eastus",
                 "tags": {"HAProxy:Service:Name": "web"}, "powerState": "PowerState/stopped",
                 "networkInterfaces": [{"id": nic_id}], "virtualMachineScaleSet": None},
                {"id": nic_id, "name": "n1", "type": "Microsoft.Network/networkInterfaces", "location": "eastus",
                 "tags": {}, "virtualMachine": vid.upper(), "primary": True, "ipConfigurations": [
                     {"id": "c", "properties": {"primary": True, "privateIPAddress": "10.1.2.3",
                                                "privateIPAddressVersion": "IPv4"}}]},
                {"id": "x", "type": "microsoft.storage/storageaccounts"}]
        shaped = m.GraphListing()
        shaped.add(m.GraphRow(*(row.get(c) for c in m.GraphRow._fields)) for row in rows)
        listing = shaped.inventory
        assert (len(listing.vms), len(listing.nics), len(listing.set_instances)) == (1, 1, 0)
        [inst] = m.join(listing, make_config().azure)
        assert (inst.id, inst.address, inst.power_state, inst.kind) == (vid.lower(), "10.1.2.3", "stopped", "vm")


class ConnectProxy:
    """A loopback HTTP CONNECT proxy that relays bytes and records the host:port of each tunnel."""

    def __init__(self):
        self.tunnels: list[str] = []
        self.auth: list[str] = []          # Proxy-Authorization values, as received
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> "ConnectProxy":
        return self

    def __exit__(self, *_):
        self.server.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return client.close()
            head += chunk
        method, target = head.split(b" ", 2)[:2]
        if method != b"CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            return client.close()
        self.tunnels.append(target.decode())
        self.auth += [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"proxy-authorization:")]
        host, port = target.decode().rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=self._relay, args=(upstream, client), daemon=True).start()
        self._relay(client, upstream)

    @staticmethod
    def _relay(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def discovered(arm_config, **azure):
    """One discovery with these azure keys over arm_config's: (the Discovery, its instances by name, the Config)."""
    cfg = arm_config(azure=azure)
    discovery = m.AzureSource(cfg).discover()
    return discovery, {i.name: i for i in discovery.instances}, cfg


class TestAzure:
    """The real SDK and DefaultAzureCredential against the HTTPS fake of Resource Manager."""

    def test_every_kind_of_instance(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3, uniform_sets=1, flexible_sets=1, per_set=2,
                                 regions=("eastus", "westeurope"), services=(("web", 8080), ("api", 9000)),
                                 overrides={"vm-0001": {"power_state": "deallocated"}})
        arm.estate.update("uvmss-00_1", tags={"HAProxy:Instance:Port": "9443"})
        discovery, found, cfg = discovered(arm_config)
        expected = {p.inst.name: p for p in arm.estate.machines()}
        assert sorted(found) == sorted(expected)
        for name, p in expected.items():
            inst = found[name]
            assert inst.id == p.vm_id.lower() and inst.address == p.inst.private_ip
            assert inst.power_state == p.inst.power_state and inst.region == p.home.location
        assert (found["uvmss-00_0"].kind, found["fvmss-00_0"].kind, found["vm-0000"].kind) == (
            "uniform", "flexible", "vm")
        groups, skipped = m.select_instances(discovery.instances, cfg)
        served = {mb.label: (k.name, k.port, k.region, mb.port) for k, ms in groups.items() for mb in ms}
        assert "vm-0001" not in served and skipped == []
        assert served["uvmss-00_1"][3] == 9443 and served["uvmss-00_0"][3] == served["uvmss-00_0"][1]
        assert served["vm-0000"] == ("web", 8080, "eastus", 8080)
        assert served["vm-0001" if "vm-0001" in served else "vm-0002"][2] == "westeurope"

    def test_discovery_leaves_the_collector_as_it_found_it(self, arm, arm_config, monkeypatch):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3)
        seen = []
        join = m.join
        monkeypatch.setattr(m, "join", lambda *a: seen.append(gc.isenabled()) or join(*a))
        assert gc.isenabled()
        discovered(arm_config)
        assert seen == [False] and gc.isenabled()
        gc.disable()
        try:
            discovered(arm_config)
            assert seen == [False, False] and not gc.isenabled()
        finally:
            gc.enable()

    def test_running_only_off_serves_stopped_instances(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=4, overrides={"vm-0000": {"power_state": "stopped"}})
        discovery, found, cfg = discovered(arm_config, running_only=False)
        assert found["vm-0000"].power_state == "unknown"      # not asked for: no power-state request
        assert arm.counts["vms_status"] == 0 and arm.counts["vm_instance_view"] == 0
        groups, _ = m.select_instances(discovery.instances, cfg)
        assert sum(map(len, groups.values())) == 4

    def test_resource_groups_and_subscriptions(self, arm, arm_config):
        from fake_arm import make_estate
        subs = ("00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b")
        arm.estate = make_estate(vms=8, uniform_sets=2, per_set=2, subscriptions=subs,
                                 resource_groups=("rg-a", "rg-b"))
        everything = {p.inst.name for p in arm.estate.machines()}
        _, found, _ = discovered(arm_config, subscription_id=subs[0], subscription_ids=[subs[1]])
        assert set(found) == everything
        arm.reset_counts()
        _, found, _ = discovered(arm_config, subscription_id=subs[0], subscription_ids=[subs[1]],
                                 resource_groups=["RG-A"])
        assert set(found) == {p.inst.name for p in arm.estate.machines() if p.home.resource_group == "rg-a"}
        # Power states from each subscription's status-only list, the only documented way to list them.
        assert arm.counts["vms"] == 0 and arm.counts["vms_rg"] == 2 and arm.counts["vms_status"] == 2
        assert all("$expand" not in r.query for r in arm.requests if r.endpoint in ("vms", "vms_rg"))

    def test_public_and_ipv6_addresses(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2, uniform_sets=1, per_set=2, ipv6_base="fd00::10", public_ip_base="20.0.0.1")
        _, found, _ = discovered(arm_config, address="public")
        assert {n: i.address for n, i in found.items()} == {p.inst.name: p.inst.public_ip
                                                          for p in arm.estate.machines()}
        assert arm.counts["pips"] == 1 and arm.counts["vmss_pips"] == 1
        _, found, _ = discovered(arm_config, ip_version="ipv6")
        assert {n: i.address for n, i in found.items()} == {p.inst.name: p.inst.private_ipv6
                                                          for p in arm.estate.machines()}

    def test_missing_nic_skips_one_instance(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3, overrides={"vm-0001": {"has_nic": False}})
        discovery, found, cfg = discovered(arm_config)
        groups, skipped = m.select_instances(discovery.instances, cfg)
        assert [s.instance for s in skipped] == ["vm-0001"] and "network interface" in skipped[0].reason
        assert sorted(mb.label for ms in groups.values() for mb in ms) == ["vm-0000", "vm-0002"]

    @pytest.mark.parametrize("fault, outcome", [
        (dict(kind="429", endpoint="nics", retry_after=1), "ok"),
        (dict(kind="500", endpoint="nics", times=1), "ok"),                 # the SDK's retry absorbs one
        (dict(kind="500", endpoint="vms", times=None), "failed"),
        (dict(kind="500", endpoint="vms_status", page=2, times=None), "failed"),   # a page mid-listing
        (dict(kind="slow", endpoint="vmss", delay=4, times=None), "failed"),
        (dict(kind="slow", endpoint="vmss", delay=3, times=1), "ok"),      # one read timeout, retried
        (dict(kind="bad_json", endpoint="nics", times=None), "failed"),
        (dict(kind="no_value", endpoint="vms", times=None), "failed"),
        (dict(kind="403", endpoint="vmss_vms", times=None), "failed"),
    ])
    def test_faults(self, arm, arm_config, fault, outcome):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=150, uniform_sets=1, per_set=3)
        arm.add_fault(**fault)
        if outcome == "ok":
            discovery, found, _ = discovered(arm_config, timeout=2)
            assert len(found) == 153
        else:
            with pytest.raises(m.AzureError, match="listing .* failed"):
                discovered(arm_config, timeout=2)

    @pytest.mark.parametrize("endpoint", ["vms", "nics", "vmss_vms"])
    def test_an_item_not_shaped_as_documented_fails_the_discovery_by_name(self, arm, arm_config, endpoint):
        # Not a traceback, and not the item dropped (its server would drain): the cycle fails, as
        # for a malformed page, and nothing is applied.
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3, uniform_sets=1, per_set=2)
        arm.add_fault("bad_item", endpoint=endpoint, times=None)
        with pytest.raises(m.AzureError, match=r"failed: malformed page 1 \(item \d is a string, not an object\)"):
            discovered(arm_config)

    @pytest.mark.parametrize("cloud, resource", [("public", "https://management.azure.com"),
                                                  ("china", "https://management.chinacloudapi.cn"),
                                                  ("usgovernment", "https://management.usgovcloudapi.net")])
    def test_token_scope_follows_the_cloud(self, arm, arm_config, cloud, resource):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=1)
        arm.cloud_audiences = [resource + "/"]          # the fake takes tokens for this cloud only
        _, found, _ = discovered(arm_config, cloud=cloud)
        assert list(found) == ["vm-0000"]
        tokens = [r for r in arm.requests if r.endpoint == "token"]
        assert tokens and {str(t.query.get("resource")).rstrip("/") for t in tokens} == {resource}
        assert arm.counts["metadata"] == 0          # a named cloud needs no metadata

    def test_custom_cloud_takes_audience_and_login_from_its_metadata(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        arm.cloud_audiences = ["https://management.stack.example/", "https://management.azure.com/"]
        cfg = arm_config()
        source = m.AzureSource(cfg)
        assert arm.counts["metadata"] == 0            # read on the first discovery, inside the cycle
        assert len(source.discover().instances) == 2 and len(source.discover().instances) == 2
        assert arm.counts["metadata"] == 1
        [metadata] = [r for r in arm.requests if r.endpoint == "metadata"]
        assert metadata.query == {"api-version": "2022-09-01"}
        tokens = [r for r in arm.requests if r.endpoint == "token"]
        assert {t.query["resource"].rstrip("/") for t in tokens} == {"https://management.stack.example"}
        # The login endpoint too: a client secret is checked at the authority the metadata names.
        env = {"AZURE_TENANT_ID": arm.tenant_id, "AZURE_CLIENT_ID": arm.client_id,
               "AZURE_CLIENT_SECRET": arm.client_secret}
        arm.reset_counts()
        assert len(m.AzureSource(arm_config(azure={"credential_type": "client_secret"}), env).discover().instances) == 2
        assert arm.counts["aad_token"] >= 1 and arm.counts["metadata"] == 1 and arm.counts["token"] == 0

    @pytest.mark.parametrize("no_proxy, tunnels", [("", True), ("127.0.0.1,localhost", False)])
    def test_proxy_from_the_environment_is_used_unless_no_proxy_names_the_host(self, arm, arm_config, monkeypatch,
                                                                                no_proxy, tunnels):
        # The proxy settings are read once when the client is built: HTTPS_PROXY and NO_PROXY still rule.
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                    "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(key, raising=False)
        with ConnectProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", no_proxy)
            source = m.AzureSource(arm_config())
            assert len(source.discover().instances) == 2 and len(source.discover().instances) == 2
        host = urllib.parse.urlsplit(arm.url).netloc
        assert (proxy.tunnels and set(proxy.tunnels) == {host}) if tunnels else not proxy.tunnels

    def test_proxy_credentials_in_its_url_are_sent_to_the_proxy(self, arm, arm_config, monkeypatch):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        for key in ("https_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(key, raising=False)
        with ConnectProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("//", "//ops:p%40ss@"))
            assert len(m.AzureSource(arm_config()).discover().instances) == 2
        assert proxy.auth and set(proxy.auth) == {"Basic " + base64.b64encode(b"ops:p@ss").decode()}

    def test_a_proxy_the_listings_cannot_use_is_refused_by_name(self, arm, arm_config, monkeypatch):
        monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with pytest.raises(m.AzureError, match=r"proxy socks5:// \(HTTPS_PROXY or ALL_PROXY\) is not supported"):
            m.AzureSource(arm_config(azure={"token_audience": "https://management.azure.com/",
                                            "login_endpoint": arm.url}))

    def test_explicit_audience_and_login_need_no_metadata(self, arm, arm_config):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=1)
        cfg = arm_config(azure={"token_audience": "https://management.private.example/", "login_endpoint": arm.url})
        arm.cloud_audiences = ["https://management.private.example/"]
        assert len(m.AzureSource(cfg).discover().instances) == 1
        assert arm.counts["metadata"] == 0
        assert {r.query["resource"].rstrip("/") for r in arm.requests if r.endpoint == "token"} == {
            "https://management.private.example"}

    def test_missing_cloud_metadata_fails_the_cycle_clearly(self, arm, arm_config):
        arm.add_fault("404", endpoint="metadata", times=None)
        source = m.AzureSource(arm_config())
        with pytest.raises(m.AzureError, match=r"cloud metadata from https://.*/metadata/endpoints.*HTTP 404"):
            source.discover()

    @pytest.mark.parametrize("document, want", [
        ({"resourceManager": "https://rm.example/", "authentication": {
            "loginEndpoint": "https://login.example/", "audiences": ["https://rm-aud.example/"]}},
         ("https://rm-aud.example/", "https://login.example")),
        ([{"resourceManager": "https://other.example/", "authentication": {
            "loginEndpoint": "https://login.other/", "audiences": ["https://other/"]}},
          {"resourceManager": "https://RM.example", "authentication": {
              "loginEndpoint": "https://login.example/", "audiences": ["https://rm-aud.example/"]}}],
         ("https://rm-aud.example/", "https://login.example")),
        ({"resourceManager": "https://rm.example/", "authentication": {"audiences": []}}, None),
        ({"authentication": {"loginEndpoint": "http://login.example/", "audiences": ["https://a/"]}}, None),
        ("not a document", None),
    ])
    def test_metadata_document_shapes(self, document, want):
        if want is None:
            with pytest.raises(m.AzureError, match="set azure.token_audience and azure.login_endpoint"):
                m.metadata_endpoints(document, "https://rm.example")
        else:
            assert m.metadata_endpoints(document, "https://rm.example") == want

    @pytest.mark.parametrize("kind, env, expected", [
        ("default", {}, "DefaultAzureCredential"),
        ("managed_identity", {}, "ManagedIdentityCredential"),
        ("azure_cli", {}, "AzureCliCredential"),
        ("client_secret", {"AZURE_TENANT_ID": "tenant", "AZURE_CLIENT_ID": "client",
                           "AZURE_CLIENT_SECRET": "s3cret-value"}, "ClientSecretCredential"),
    ])
    def test_credential_types(self, monkeypatch, kind, env, expected):
        import azure.identity
        for key in list(os.environ):
            if key.startswith("AZURE_"):
                monkeypatch.delenv(key)
        cfg = make_config(azure={"credential_type": kind}).azure
        assert type(m._credential(cfg, azure.identity, "login.microsoftonline.com", env)).__name__ == expected

    @pytest.mark.parametrize("kind, problem", [
        ("client_secret", "client_secret needs AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET"),
        ("workload_identity", "azure.credential_type: workload_identity:"),
    ])
    def test_credential_without_its_environment_is_a_config_error(self, monkeypatch, kind, problem):
        import azure.identity
        for key in list(os.environ):
            if key.startswith("AZURE_"):
                monkeypatch.delenv(key)
        with pytest.raises(m.ConfigError, match=problem):
            m._credential(make_config(azure={"credential_type": kind}).azure, azure.identity,
                          "login.microsoftonline.com", {})

    def test_requests_grow_with_pages_not_instances(self, arm, arm_config):
        """Subscription scope, private addresses: with P(n) = ceil(n / page) pages (at least 1),
        requests = 2 P(VMs incl. Flexible members) [full + status-only] + P(NICs) + P(scale sets)
                   + sum over tagged Uniform sets of 2 P(instances) [instances + their NICs]."""
        from fake_arm import make_estate
        page = 100

        def pages(n):
            return max(1, -(-n // page))

        def formula(vms, sets, per_set):
            return 2 * pages(vms) + pages(vms) + pages(sets) + sets * 2 * pages(per_set)
        results = []
        for vms in (2000, 4000):
            arm.estate = make_estate(vms=vms, uniform_sets=20, per_set=50)
            arm.reset_counts()
            discovery, found, _ = discovered(arm_config)
            assert len(found) == vms + 1000
            azure = arm.counts["total"] - arm.counts["token"] - arm.counts["metadata"]
            assert azure == discovery.requests == formula(vms, 20, 50)
            results.append(azure)
        assert results == [2 * 20 + 20 + 1 + 40, 2 * 40 + 40 + 1 + 40]   # 101, then 161: pages only

    def test_warns_once_when_vm_list_calls_would_outrun_computes_refill(self, arm, arm_config, caplog):
        """200 VMs at 10 a page: 20 pages of VMs and 20 of power states a cycle. Every 7 s that is 343
        VM list calls a minute, over Compute's 300; every 30 s, 80."""
        from fake_arm import make_estate
        arm.estate, arm.page_size = make_estate(vms=200), 10
        caplog.set_level(logging.WARNING, logger="haproxy_azure_discovery")

        def warnings():
            return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "azure_quota_warning"]
        own = {"retries": 3, "timeout": 30}           # the program's defaults
        m.AzureSource(arm_config(azure=own, polling={"interval_seconds": 30})).discover()
        assert warnings() == []
        source = m.AzureSource(arm_config(azure=own, polling={"interval_seconds": 7}))
        source.discover()
        source.discover()
        [warning] = warnings()
        assert "40 VM list calls" in warning and "343 a minute" in warning and "resource_graph" in warning
        caplog.clear()
        m.AzureSource(arm_config(azure={**own, "source": "resource_graph"},
                                 polling={"interval_seconds": 7})).discover()
        assert warnings() == []

    @pytest.mark.parametrize("calls, interval, warned", [(150, 30, False), (151, 30, True), (10, 1, True),
                                                         (0, 0.5, False)])
    def test_vm_list_budget(self, calls, interval, warned):
        assert (m.vm_list_budget_warning(calls, interval) is not None) == warned


# === Azure transport ===
class TestPageTransport:
    """The listings' transport on its own, against loopback sockets that answer what Resource
    Manager's path can: a refusal, a cut-off body, a compressed page."""

    @staticmethod
    def send(url, **options):
        from azure.core.rest import HttpRequest
        transport = m._PageTransport({}, workers=1, connect=2, read=2)
        try:
            return transport.send(HttpRequest("GET", url), **options)
        finally:
            transport.close()

    @staticmethod
    def answer(reply: bytes):
        """A one-shot HTTP server: reads a request head, sends `reply`, closes; the head is kept."""
        server = socket.create_server(("127.0.0.1", 0))
        heads: list[bytes] = []

        def serve():
            client, _ = server.accept()
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            heads.append(head)
            client.sendall(reply)
            client.close()
            server.close()
        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}/page", heads

    def test_a_refused_connection_is_a_request_error_the_retry_policy_retries(self):
        from azure.core.exceptions import ServiceRequestError
        with pytest.raises(ServiceRequestError):
            self.send(f"http://127.0.0.1:{free_port()}/page")

    def test_a_body_cut_short_is_a_response_error(self):
        from azure.core.exceptions import ServiceResponseError
        url, _ = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"value\": [")
        with pytest.raises(ServiceResponseError):
            self.send(url)

    def test_a_silent_server_is_a_read_timeout(self):
        from azure.core.exceptions import ServiceResponseTimeoutError
        server = socket.create_server(("127.0.0.1", 0))
        try:
            with pytest.raises(ServiceResponseTimeoutError):
                self.send(f"http://127.0.0.1:{server.getsockname()[1]}/page", read_timeout=0.3)
        finally:
            server.close()

    def test_a_page_is_asked_for_compressed_and_read_whole(self):
        import gzip
        page = json.dumps({"value": [{"id": str(n)} for n in range(500)]}).encode()
        packed = gzip.compress(page)
        url, heads = self.answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nX-Ms-Request-Id: r1\r\n"
                                 + f"Content-Length: {len(packed)}\r\n\r\n".encode() + packed)
        response = self.send(url)
        assert b"accept-encoding: gzip" in heads[0].lower()
        assert (response.status_code, response.body(), response.json()["value"][499]) == (200, page, {"id": "499"})
        assert response.headers["x-ms-request-id"] == "r1"          # headers compare case-insensitively


# === Data Plane API ===
def dp_section(fake, **haproxy) -> dict:
    """The haproxy section for the emulator `fake`; keyword arguments are keys over it."""
    return {"base_url": fake.url, "username": fake.username, "password": fake.password, "timeout": 3, **haproxy}


def dp_config(fake, **sections):
    return make_config(haproxy=dp_section(fake, **sections.pop("haproxy", {})), **sections)


class Harness:
    """The real DataPlane client and reconcile() against the emulator, with a scripted estate."""

    def __init__(self, fake, **sections):
        self.fake, self.cfg = fake, dp_config(fake, **sections)
        self.dp, self.state, self.stop = (m.DataPlane(self.cfg.haproxy), m.State(),
                                        m.Flag())

    def cycle(self, instances, clock=time.time) -> m.CycleReport:
        """One cycle over these instances; `clock` is the wall clock (drains are timed by it)."""
        self.fake.reset_requests()
        return one_cycle(self.cfg, ScriptedSource(m.Discovery(tuple(instances))), self.dp, self.state,
                           self.stop, m.Clocks(wall=clock))

    def writes(self):
        return [(r.method, r.path) for r in self.fake.requests if r.method != "GET"]

    def servers(self, backend):
        return {n: ("parked" if s.get("maintenance") == "enabled" else f"{s['address']}:{s['port']}")
                for n, s in self.fake.backends[backend]["servers"].items()}



class TestDataPlane:
    def test_first_sync_then_steady_state(self, dataplane):
        h = Harness(dataplane, haproxy={"backend": {"balance": "leastconn", "params": {"retries": 2}},
                                        "server": {"params": {"inter": 2000, "rise": 2, "fall": 3}}})
        report = h.cycle([make_instance(1), make_instance(2), make_instance(3, service="api", port="9000")])
        assert report.result == "applied" and report.transactions == {"committed": 1}
        backends = dataplane.backends
        assert sorted(backends) == ["azure-api-9000-eastus", WEB]
        web = backends[WEB]
        assert (web["mode"], web["balance"]["algorithm"], web["retries"]) == ("http", "leastconn", 2)
        assert web["servers"]["srv1"] == {"name": "srv1", "id": 1, "address": "10.0.0.5", "port": 8080,
                                          "check": "enabled", "inter": 2000, "rise": 2, "fall": 3,
                                          "maintenance": "disabled"}
        parked = {k: v for k, v in web["servers"]["srv10"].items() if v is not None}
        assert parked == {"name": "srv10", "id": 10, "address": "127.0.0.1", "port": 80, "maintenance": "enabled",
                          "check": "disabled"}
        assert len(web["servers"]) == 10 and dataplane.checks >= 1 and dataplane.open_transactions() == []
        config = dataplane.render()
        line = next(x.split() for x in config.splitlines() if x.strip().startswith("server srv1 10.0.0.5:8080"))
        assert "check" in line and line[line.index("inter") + 1] == "2000"
        if dataplane.api == "v3":   # one full-section write per new backend
            writes = h.writes()
            assert writes[:3] == [("POST", "/v3/services/haproxy/transactions"),
                                  ("POST", "/v3/services/haproxy/configuration/backends"),
                                  ("POST", "/v3/services/haproxy/configuration/backends")]
            assert len(writes) == 4 and writes[3][0] == "PUT" and "/transactions/" in writes[3][1]
            # the commit's reload is confirmed before the version is recorded
            assert dataplane.requests[-1].path.startswith("/v3/services/haproxy/reloads/")
        # nothing changed: one request
        report = h.cycle([make_instance(1), make_instance(2), make_instance(3, service="api", port="9000")])
        assert report.result == "steady" and len(dataplane.requests) == 1
        assert dataplane.requests[0].path.endswith("/services/haproxy/configuration/version")

    def test_state_and_per_backend_gauges_from_the_metrics_listener(self, dataplane):
        import urllib.error
        import urllib.request
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = dp_config(dataplane, metrics={"listen": f"127.0.0.1:{port}"})
        estates = [m.Discovery((make_instance(1), make_instance(2), make_instance(3, service="api")),),
                   *[m.Discovery((make_instance(1), make_instance(3, service="api")),)] * 3]
        pages = []

        def probe(_delay):
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                metrics = r.read().decode()
            with urllib.request.urlopen(url + "/state", timeout=5) as r:
                assert r.headers["Content-Type"] == "application/json"
                pages.append((metrics, json.loads(r.read())))

        steps(m.Daemon(lambda: cfg, lambda c: ScriptedSource(*estates), lambda c: m.DataPlane(c.haproxy),
                       rand=lambda: 0.0), 4, probe)
        (metrics1, state1), (metrics2, state2), (metrics3, state3) = pages
        assert f'cycles_total{{target="{dataplane.url}",result="steady"}} 1' in metrics3
        assert state3 == state2   # a steady cycle keeps it
        labels = f'target="{dataplane.url}",backend="{WEB}"'
        assert f"haproxy_azure_discovery_servers_live{{{labels}}} 2\n" in metrics1
        assert f"haproxy_azure_discovery_servers_parked{{{labels}}} 8\n" in metrics1
        assert f"haproxy_azure_discovery_servers_draining{{{labels}}} 0\n" in metrics1
        assert f"haproxy_azure_discovery_servers_live{{{labels}}} 1\n" in metrics2
        api = f'target="{dataplane.url}",backend="azure-api-8080-eastus"'
        assert f"haproxy_azure_discovery_servers_live{{{api}}} 1\n" in metrics2
        # /state: what HAProxy holds once the cycle applied, the instance in each live slot.
        (target,) = state2["targets"]
        web = next(b for b in target["backends"] if b["backend"] == WEB)
        assert [(s["slot"], s["state"], s.get("instance")) for s in web["servers"][:3]] == [
            ("srv1", "live", "vm1"), ("srv2", "parked", None), ("srv3", "parked", None)]
        assert target["drift"] == 0 and state1["discovery"]["instances"] == 3
        with pytest.raises(OSError):     # the listener is gone with the loop
            urllib.request.urlopen(url + "/state", timeout=2)

    def test_state_before_any_cycle_is_503(self):
        metrics = m.Metrics(30)
        port = free_port()
        server = m.serve_metrics(f"127.0.0.1:{port}", metrics)
        try:
            import urllib.error
            import urllib.request
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=5)
            assert e.value.code == 503 and json.loads(e.value.read())["error"]
        finally:
            server.shutdown()
            server.server_close()

    def test_one_new_instance_is_one_write(self, dataplane):
        h = Harness(dataplane)
        h.cycle([make_instance(1)])
        reloads = dataplane.reloads
        report = h.cycle([make_instance(1), make_instance(2)])
        writes = h.writes()
        assert writes[0][1].endswith("/transactions") and writes[-1][0] == "PUT" and len(writes) == 3
        # v3: the backend's full section; v2: the one server
        assert writes[1] == ("PUT", f"/v3/services/haproxy/configuration/backends/{WEB}") if dataplane.api == "v3" \
            else writes[1] == ("PUT", "/v2/services/haproxy/configuration/servers/srv2")
        assert h.servers(WEB)["srv2"] == "10.0.0.6:8080" and report.reloads == 1
        assert dataplane.reloads == reloads + 1

    def test_vanished_service_is_parked_never_deleted(self, dataplane):
        h = Harness(dataplane)
        h.cycle([make_instance(1), make_instance(2, service="api")])
        h.cycle([make_instance(2, service="api")])
        assert set(h.servers(WEB).values()) == {"parked"} and len(dataplane.backends) == 2
        assert not any(method == "DELETE" and "transactions" not in path for method, path in h.writes())

    def test_drift_is_repaired_next_cycle(self, dataplane):
        h = Harness(dataplane)
        estate = [make_instance(i) for i in (1, 2, 3)]
        h.cycle(estate)
        dataplane.edit_server(WEB, "srv1", address="10.9.9.9")
        dataplane.edit_server(WEB, "srv5", maintenance="disabled", address="10.9.9.8", port=80)
        h.cycle(estate)
        assert h.servers(WEB)["srv1"] == "10.0.0.5:8080" and h.servers(WEB)["srv5"] == "parked"

    def test_drift_repair_is_logged_as_such_naming_what_differed(self, dataplane, caplog):
        """A write with no change in Azure since HAProxy was last left as planned is drift
        repaired (drift_repaired, naming the fields); a change in discovery is backend_changed,
        and so is the first write after a restart (nothing to compare with)."""
        h = Harness(dataplane)
        estate = [make_instance(i) for i in (1, 2, 3)]
        said = []

        def events():
            records = [r for r in caplog.records
                       if getattr(r, "event", "") in ("drift_repaired", "backend_changed")]
            said.extend(r.getMessage() for r in records if r.event == "drift_repaired")
            caplog.clear()
            return [(r.event, getattr(r, "fields", None), getattr(r, "servers", None))
                    for r in records]
        with caplog.at_level(logging.INFO, logger="haproxy_azure_discovery"):
            h.cycle(estate)
            assert events() == [("backend_changed", None, None)]
            dataplane.edit_server(WEB, "srv1", address="10.9.9.9")
            dataplane.edit_server(WEB, "srv5", maintenance="disabled", address="10.9.9.8")
            assert h.cycle(estate).result == "applied"
            assert events() == [("drift_repaired", ["server.address", "server.maintenance"],
                                 ["srv1", "srv5"])]
            assert said == [f"backend {WEB} differed from what was written (server.address, "
                            "server.maintenance; servers srv1, srv5), with no change in Azure: "
                            "repaired"]
            assert h.cycle(estate).result == "steady" and events() == []
            dataplane.edit_server(WEB, "srv2", maintenance="enabled")
            assert h.cycle([*estate, make_instance(4)]).result == "applied"     # Azure changed too
            assert events() == [("backend_changed", None, None)]
            dataplane.edit_server(WEB, "srv2", maintenance="enabled")
            h.state = m.State()                                             # a restart
            h.cycle([*estate, make_instance(4)])
            assert events() == [("backend_changed", None, None)]
            dataplane.sessions[(WEB, "srv4")] = 1                  # vm4 leaves: srv4 drains ...
            assert h.cycle(estate).result == "draining" and events() == []
            later = time.time() + 60                               # ... and is parked in time
            assert h.cycle(estate, clock=lambda: later).result == "applied"
            assert events() == [("backend_changed", None, None)]

    def test_foreign_backends_and_servers_are_left_alone(self, dataplane):
        dataplane.seed({"be_static": {"mode": "http", "servers": {"s1": {"address": "10.1.1.1", "port": 80}}}})
        h = Harness(dataplane)
        h.cycle([make_instance(1)])
        dataplane.edit_server(WEB, "srv1", {})    # bump the version only
        backends = dataplane.backends
        backends[WEB]["servers"]["manual"] = {"name": "manual", "address": "10.2.2.2", "port": 81}
        dataplane.seed({n: b for n, b in backends.items()})
        h.cycle([make_instance(1), make_instance(2)])
        after = dataplane.backends
        assert after["be_static"]["servers"]["s1"]["address"] == "10.1.1.1"
        assert after[WEB]["servers"]["manual"]["address"] == "10.2.2.2" and h.servers(WEB)["srv2"] == "10.0.0.6:8080"

    def test_growth_and_shrink(self, dataplane):
        h = Harness(dataplane, haproxy={"server_slots": {"base": 2, "growth_factor": 1}},
                    safety={"max_drain_percent": 100})
        h.cycle([make_instance(i) for i in range(1, 6)])
        assert len(h.servers(WEB)) == 5
        h.cycle([make_instance(1)])
        assert sum(v != "parked" for v in h.servers(WEB).values()) == 1 and len(h.servers(WEB)) == 5
        assert h.cycle([make_instance(1)]).result == "applied"     # not steady: a shrink is due
        live_slot = next(n for n, v in h.servers(WEB).items() if v != "parked")
        assert len(h.servers(WEB)) == max(2, m.slot_index(live_slot))
        assert h.cycle([make_instance(1)]).result == "steady"

    def test_restart_against_a_synced_haproxy_writes_nothing(self, dataplane):
        estate = [make_instance(i) for i in range(1, 8)]
        Harness(dataplane).cycle(estate)
        h = Harness(dataplane)                  # a new process: no memory
        report = h.cycle(list(reversed(estate)))
        assert report.result == "unchanged" and h.writes() == []

    def test_conflict_on_commit_is_retried(self, dataplane):
        from fake_dataplane import PATH_TRANSACTION
        h = Harness(dataplane)
        dataplane.add_fault("PUT", PATH_TRANSACTION, status=409, message="version mismatch", times=1)
        report = h.cycle([make_instance(1)])
        assert report.result == "applied" and report.transactions == {"conflict": 1, "committed": 1}
        assert dataplane.open_transactions() == [] and h.servers(WEB)["srv1"] == "10.0.0.5:8080"

    @pytest.mark.parametrize("status", [406, 409])
    def test_persistent_conflict_fails_after_three_attempts(self, dataplane, status):
        from fake_dataplane import PATH_TRANSACTION
        h = Harness(dataplane)
        version = dataplane.version
        dataplane.add_fault("PUT", PATH_TRANSACTION, status=status, message="outdated", times=4)
        with pytest.raises(m.DataPlaneError, match="gave up after 3 attempts"):
            h.cycle([make_instance(1)])
        assert dataplane.count_requests("PUT", r"/transactions/") == 3
        assert dataplane.open_transactions() == [] and dataplane.backends == {} and dataplane.version == version
        assert h.cycle([make_instance(1)]).result == "applied"     # the next healthy cycle converges

    @pytest.mark.parametrize("fault, error", [
        (dict(method="PUT", path=r"/transactions/[^/]+$", status=500, message="reload failed"), "HTTP 500"),
        (dict(method="POST", path=r"/transactions$", status=429, message="too many open transactions"), "HTTP 429"),
        (dict(method="PUT", path=r"/(servers|backends)/[^/]+$", status=500), "HTTP 500"),
        (dict(method="*", path=r"/backends", status=500), "HTTP 500"),
        (dict(method="PUT", path=r"/transactions/[^/]+$", delay=5), "timed out"),
        (dict(method="PUT", path=r"/transactions/[^/]+$", drop=True), "Remote end closed"),
    ])
    def test_failures_leave_no_transaction_and_no_half_cycle(self, dataplane, fault, error):
        h = Harness(dataplane)
        h.cycle([make_instance(1)])
        before, version = dataplane.backends, dataplane.version
        dataplane.add_fault(times=1, **fault)
        estate = [make_instance(1), make_instance(2), make_instance(3, service="api")]
        with pytest.raises(m.DataPlaneError, match=error):
            h.cycle(estate)
        dataplane.clear_faults()
        time.sleep(0.1 if not fault.get("delay") else 2.5)
        assert dataplane.open_transactions() == []
        if not fault.get("delay"):
            assert dataplane.backends == before and dataplane.version == version
        h.cycle(estate)
        assert sorted(dataplane.backends) == ["azure-api-8080-eastus", WEB] and h.servers(WEB)["srv2"] != "parked"

    def test_shutdown_mid_transaction_deletes_it(self, dataplane):
        h = Harness(dataplane)
        original = h.dp.request

        def request(method, path, query=None, body=None, **kw):
            result = original(method, path, query, body, **kw)
            if query and "transaction_id" in query:
                h.stop.set()             # SIGTERM arrives after the first write
            return result
        h.dp.request = request
        with pytest.raises(m.Aborted):
            h.cycle([make_instance(1), make_instance(2, service="api")])
        assert dataplane.open_transactions() == [] and dataplane.backends == {}
        assert dataplane.count_requests("DELETE", r"/transactions/") == 1

    def test_wrong_password_never_shows_the_password(self, dataplane):
        cfg = dp_config(dataplane, haproxy={"password": "wrong-secret-123"})
        with pytest.raises(m.DataPlaneError) as err:
            m.DataPlane(cfg.haproxy).version()
        assert "401" in str(err.value) and "wrong-secret-123" not in str(err.value)

    def test_api_version_is_probed(self, dataplane):
        dp = m.DataPlane(dp_config(dataplane).haproxy)
        assert dp.version() == dataplane.version and dp.api == dataplane.api
        assert dataplane.requests[0].path == "/v3/info"

    def test_unreachable(self):
        cfg = make_config(haproxy={"password": "p", "base_url": f"http://127.0.0.1:{free_port()}", "timeout": 2})
        with pytest.raises(m.DataPlaneError, match="Connection refused"):
            m.DataPlane(cfg.haproxy).version()

    @pytest.mark.parametrize("after", [False, True], ids=["refused", "refused-after-writing"])
    def test_a_refused_backend_is_left_out_and_the_rest_commits(self, dataplane, caplog, after):
        # The first backend written (azure-api-…, sorted first) is refused with 422; with
        # `after` the emulator has already written it into the transaction, as client-native
        # may have before it failed: committing that transaction would create it anyway.
        h = Harness(dataplane)
        estate = [make_instance(1), make_instance(2, service="db"), make_instance(3, service="api")]
        dataplane.add_fault("POST", r"/backends$", status=422, message="invalid backend", after=after)
        with caplog.at_level("ERROR", logger="haproxy_azure_discovery"):
            report = h.cycle(estate)
        api = "azure-api-8080-eastus"
        assert report.result == "partial" and list(report.refused) == [api]
        assert sorted(dataplane.backends) == ["azure-db-8080-eastus", WEB]
        assert dataplane.open_transactions() == [] and report.transactions == {"committed": 1}
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and api in errors[0] and "vm3 (10.0.0.7:8080)" in errors[0], errors
        assert "HTTP 422 invalid backend" in errors[0]
        metrics = m.Metrics(30)
        metrics.record([report], 0)
        assert f'cycles_total{{target="{dataplane.url}",result="partial"}} 1' in metrics.render()
        assert f'backends_refused_total{{target="{dataplane.url}"}} 1' in metrics.render()
        # The next cycle tries it again (no steady-state shortcut) and the rest stays as it is.
        report = h.cycle(estate)
        assert report.result == "applied" and [b.name for b in report.plan.backends] == [api]
        assert sorted(dataplane.backends) == [api, "azure-db-8080-eastus", WEB]
        assert h.cycle(estate).result == "steady"

    def test_every_backend_refused_sends_no_commit(self, dataplane):
        h = Harness(dataplane)
        version = dataplane.version
        dataplane.add_fault("POST", r"/backends$", status=400, message="refused", times=None)
        report = h.cycle([make_instance(1), make_instance(2, service="api")])
        assert report.result == "partial" and len(report.refused) == 2 and report.transactions == {}
        assert dataplane.count_requests("PUT", r"/transactions/") == 0
        assert dataplane.open_transactions() == [] and dataplane.version == version

    def test_a_transaction_dropped_by_a_peer_commit_is_a_conflict_not_a_refusal(self, dataplane):
        h = Harness(dataplane)
        peer = m.DataPlane(h.cfg.haproxy)
        original, done = h.dp.request, []

        def request(method, path, query=None, body=None, **kw):
            result = original(method, path, query, body, **kw)
            if query and "transaction_id" in query and not done:
                done.append(1)      # another client commits: ours is outdated and dropped
                _, txn, _ = peer.request("POST", "/services/haproxy/transactions", {"version": peer.version()})
                peer.request("PUT", f"/services/haproxy/transactions/{txn['id']}")
            return result
        h.dp.request = request
        report = h.cycle([make_instance(1), make_instance(2, service="api")])
        assert report.result == "applied" and report.refused == {}
        assert report.transactions == {"conflict": 1, "committed": 1}
        assert sorted(dataplane.backends) == ["azure-api-8080-eastus", WEB]
        assert dataplane.open_transactions() == []


ONE_BACKEND = m.BackendPlan(name="azure-x-80-eastus", create=True, fields_changed=False,
                            fields={"name": "azure-x-80-eastus"}, servers={}, changes=(), slots=0, live=0)


class Meddler:
    """A loopback HTTP server standing in front of the Data Plane API (or alone): `rule(method,
    path)` returns (status, headers, body[, trickle seconds per byte]) to answer itself, or None
    to forward to `upstream`. Records every request it receives with its headers."""

    def __init__(self, rule, upstream=None):
        import http.server
        import urllib.parse
        meddler = self
        self.rule, self.seen = rule, []
        up = urllib.parse.urlsplit(upstream) if upstream else None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                meddler.seen.append((self.command, self.path, dict(self.headers)))
                answer = meddler.rule(self.command, self.path)
                if answer is None:
                    import http.client
                    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
                    conn.request(self.command, self.path, body or None, dict(self.headers))
                    r = conn.getresponse()
                    answer = (r.status, {k: v for k, v in r.getheaders()
                                         if k.lower() not in ("transfer-encoding", "connection")}, r.read())
                    conn.close()
                status, headers, payload, *trickle = answer
                payload = payload.encode() if isinstance(payload, str) else payload
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for i in range(len(payload)) if trickle else ():
                        self.wfile.write(payload[i:i + 1])
                        self.wfile.flush()
                        time.sleep(trickle[0])
                    if not trickle:
                        self.wfile.write(payload)
                except OSError:
                    pass
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


JSON = {"Content-Type": "application/json"}
HTML = {"Content-Type": "text/html"}
PASSWORD = "hunter2-very-secret"


def meddled(url, **haproxy):
    return m.DataPlane(make_config(haproxy={"base_url": url, "password": PASSWORD, "api_version": "v3",
                                            "timeout": 2, **haproxy}).haproxy)


# === Data Plane transport ===
class TestHostileDataPlane:
    """Whatever answers in the Data Plane API's place: redirects, proxies' HTML, truncated or
    mis-shaped JSON, a body trickled past the deadline, error bodies that echo secrets."""

    @pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
    def test_no_redirect_is_followed(self, status):
        with Meddler(lambda *_: (200, JSON, "1")) as elsewhere, \
                Meddler(lambda meth, path: (status, {"Location": elsewhere.url + path}, "")) as front:
            with pytest.raises(m.DataPlaneError) as err:
                meddled(front.url).version()
        assert f"HTTP {status} redirect to {elsewhere.url}/v3/services/haproxy/configuration/version" \
            " not followed" in str(err.value)
        assert elsewhere.seen == []

    def test_once_against_a_redirecting_api_exits_1_and_sends_no_credentials_away(
            self, tmp_path, arm, arm_config, monkeypatch, capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        with Meddler(lambda *_: (200, JSON, "{}")) as elsewhere, \
                Meddler(lambda meth, path: (302, {"Location": elsewhere.url + path}, "")) as front:
            raw = arm_config.raw(azure={"timeout": 30},
                                 haproxy={"base_url": front.url, "password": PASSWORD, "timeout": 3})
            assert m.main(["--once", "-c", write_config(tmp_path, raw)]) == 1
        err = capsys.readouterr().err
        assert "HTTP 302 redirect to" in err.splitlines()[-1] and elsewhere.seen == []
        assert front.seen and all("Authorization" in h for _, _, h in front.seen)

    @pytest.mark.parametrize("answer, what", [
        ((200, HTML, "<html><body>502 Bad Gateway</body></html>"), 'not JSON (text/html): "<html><body>502'),
        ((200, JSON, '{"id": "abc'), 'not valid JSON (application/json): "{\\"id\\": \\"abc"'),
        ((200, JSON, "[" * 100000), "not valid JSON"),
        ((200, JSON, '"12a"'), "not an integer version"),
        ((200, JSON, "true"), "not an integer version"),
        ((200, JSON, "-3"), "not an integer version"),
        ((200, JSON, '{"data": 5}'), "not an integer version"),
    ])
    def test_answers_that_are_not_the_documented_json(self, answer, what):
        with Meddler(lambda *_: answer) as front:
            with pytest.raises(m.DataPlaneError) as err:
                meddled(front.url).version()
        assert str(err.value).startswith("GET /v3/services/haproxy/configuration/version: HTTP 200 answer is ")
        assert what in str(err.value) and len(str(err.value)) < 400

    @pytest.mark.parametrize("path, body, what", [
        ("/backends", "{}", "not a list of backends"),
        ("/backends", '[{"name": 5}]', "not a list of backends"),
        ("/backends", '[{"name": "azure-x", "servers": []}]', "not a list of backends"),
        ("/backends", '[{"name": "azure-x", "servers": {"srv1": "x"}}]', "not a list of backends"),
        ("/backends", '[{"name": "azure-x", "servers": {"srv1": {"name": "srv1", "address": ["10.0.0.1"]}}}]',
         "not a list of backends"),
        ("/backends", '[{"name": "azure-x", "servers": {"srv1": {"name": "srv1", "port": "80"}}}]',
         "not a list of backends"),
        ("/transactions", '{"id": "../../configuration/backends/x"}', "not a transaction"),
        ("/transactions", "[]", "not a transaction"),
    ])
    def test_mis_shaped_answers(self, path, body, what):
        def rule(method, target):
            if target.split("?")[0].endswith(path):
                return 201 if method == "POST" else 200, JSON, body
            return 200, {**JSON, "Configuration-Version": "x"}, "7"
        with Meddler(rule) as front:
            dp = meddled(front.url)
            with pytest.raises(m.DataPlaneError, match=what):
                if path == "/backends":
                    dp.read_backends("azure-")
                else:
                    dp.apply_transaction(m.Plan(backends=(ONE_BACKEND,)), 7, m.Flag())

    def test_a_non_numeric_version_header_is_not_read(self):
        # The version comes from its own call, made before the backends are read.
        def rule(method, target):
            if "/backends" in target:
                return 200, {**JSON, "Configuration-Version": "7; drop"}, "[]"
            return 200, JSON, "7"
        with Meddler(rule) as front:
            dp = meddled(front.url)
            assert dp.version() == 7 and dp.read_backends("azure-") == {}

    @pytest.mark.parametrize("where", [r"/transactions/[^/?]+$", r"/configuration/backends\?"])
    @pytest.mark.parametrize("answer", [(200, HTML, "<html>proxy error</html>"), (202, JSON, '{"id": "ab')],
                             ids=["html", "truncated"])
    def test_a_garbled_answer_mid_cycle_leaves_no_transaction(self, dataplane, where, answer):
        # A proxy garbles one answer inside the transaction (a write, or the commit itself):
        # the cycle fails with a clear error and no transaction stays open.
        rule = lambda method, target: answer if method in ("PUT", "POST") and re.search(where, target) else None
        with Meddler(rule, dataplane.url) as front:
            cfg = dp_config(dataplane, haproxy={"base_url": front.url})
            dp, state = m.DataPlane(cfg.haproxy), m.State()
            with pytest.raises(m.DataPlaneError, match="HTTP 20[02] answer is not"):
                reconcile(cfg, ScriptedSource(m.Discovery((make_instance(1),))), dp, state,
                            m.Flag(), m.CycleReport())
        assert dataplane.open_transactions() == []

    def test_an_endless_answer_is_cut_at_the_size_bound(self):
        with Meddler(lambda *_: (200, JSON, "[" + "1," * 600_000 + "1]")) as front:
            with pytest.raises(m.DataPlaneError, match=r"answer is larger than haproxy.max_answer_mb \(1 MiB\)"):
                meddled(front.url, max_answer_mb=1).version()

    def test_a_body_trickled_past_the_timeout(self):
        started = time.monotonic()
        with Meddler(lambda *_: (200, JSON, "1" * 200, 0.05)) as front:
            with pytest.raises(m.DataPlaneError, match=r"timed out, no complete answer within haproxy.timeout \(1 s\)"):
                meddled(front.url, timeout=1).version()
        assert time.monotonic() - started < 2.5

    def test_headers_trickled_past_the_timeout(self):
        import socket as socketlib
        listener = socketlib.create_server(("127.0.0.1", 0))
        stop = threading.Event()

        def serve():
            conn, _ = listener.accept()
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.05):
                    break
                conn.send(bytes([byte]))
            conn.close()
        threading.Thread(target=serve, daemon=True).start()
        started = time.monotonic()
        try:
            with pytest.raises(m.DataPlaneError, match="timed out"):
                meddled(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1).version()
        finally:
            stop.set()
            listener.close()
        assert time.monotonic() - started < 2.5

    def test_an_error_body_echoing_the_secrets_is_masked_everywhere(self, tmp_path, arm, arm_config, monkeypatch,
                                                                     capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=1)
        basic = m.basic_credentials(m.HAProxyConfig(username="admin", password=PASSWORD))
        echo = json.dumps({"code": 500, "message": f"denied admin:{PASSWORD} (Basic {basic}); "
                                                   f"raw {basic} / {PASSWORD}"})
        with Meddler(lambda *_: (500, JSON, echo)) as front:
            with pytest.raises(m.DataPlaneError) as err:
                meddled(front.url).version()
            assert PASSWORD not in str(err.value) and basic not in str(err.value) and "***" in str(err.value)
            monkeypatch.setenv("DP_PASSWORD", PASSWORD)
            raw = arm_config.raw(azure={"timeout": 30},
                                 haproxy={"base_url": front.url, "password": "${DP_PASSWORD}", "timeout": 3},
                                 logging={"format": "text", "level": "DEBUG"})
            for mode in ("--once", "--dry-run"):
                assert m.main([mode, "-c", write_config(tmp_path, raw)]) == 1
        out, err = capsys.readouterr()
        assert "HTTP 500" in err and PASSWORD not in out + err and basic not in out + err


    ODD_PASSWORDS = ['quo"te-secret', "back\\slash-secret", "tab\tbed-secret", "héllo wörld secret"]

    @pytest.mark.parametrize("password", ODD_PASSWORDS)
    @pytest.mark.parametrize("shape", ["json message", "html", "location", "reload"])
    def test_an_odd_password_echoed_any_way_is_masked(self, password, shape):
        """However an answer carries the password (as is, JSON- or URL-escaped, whitespace
        folded), no error text shows it, nor its start when the text is cut short."""
        escaped = json.dumps(password)[1:-1]
        spellings = [password, escaped, urllib.parse.quote(password), " ".join(password.split())]
        echo = " ".join(spellings)
        answers = {
            "json message": (500, JSON, json.dumps({"code": 500, "message": echo})),
            "html": (200, {"Content-Type": "text/html"}, f"<html>{echo}</html>"),
            "location": (302, {"Location": "http://elsewhere/" + urllib.parse.quote(password)}, ""),
            "reload": (200, JSON, json.dumps({"id": "2026-12-07-1", "status": "failed", "response": echo})),
        }
        with Meddler(lambda *_: answers[shape]) as front:
            dp = meddled(front.url, password=password)
            with pytest.raises(m.DataPlaneError) as err:
                dp.await_reloads(["2026-12-07-1"], m.Flag()) if shape == "reload" else dp.version()
        text = str(err.value)
        assert "***" in text
        for spelling in spellings:
            assert spelling[:6] not in text, (spelling, text)

    @pytest.mark.parametrize("cut", [200, 300])
    def test_a_secret_straddling_a_cut_leaves_nothing_behind(self, cut):
        for shape in ("json message", "html"):
            pad = "x" * (cut - 8)           # the password starts 8 characters before the cut
            body = json.dumps({"code": 500, "message": pad + PASSWORD}) if shape == "json message" \
                else f"{pad[6:]}{PASSWORD}"
            answer = (500, JSON, body) if shape == "json message" else (200, {"Content-Type": "text/html"}, body)
            with Meddler(lambda *_: answer) as front:
                with pytest.raises(m.DataPlaneError) as err:
                    meddled(front.url).version()
            assert PASSWORD[:4] not in str(err.value), (shape, str(err.value)[-40:])


# === Data Plane API: hybrid mode and drains ===
class TestHybrid:
    @pytest.mark.parametrize("limit, added, transactions", [(25, 3, 0), (2, 3, 1)])
    def test_runtime_writes_up_to_the_limit(self, dataplane, limit, added, transactions):
        h = Harness(dataplane, haproxy={"apply_mode": "hybrid", "hybrid_max_writes": limit})
        h.cycle([make_instance(1)])
        reloads = dataplane.reloads
        report = h.cycle([make_instance(i) for i in range(1, 2 + added)])
        assert report.transactions.get("committed", 0) == transactions
        assert dataplane.reloads - reloads == transactions
        assert sum(v != "parked" for v in h.servers(WEB).values()) == 1 + added

    def test_a_weight_tag_change_is_a_runtime_write_without_reload(self, dataplane):
        h = Harness(dataplane, haproxy={"apply_mode": "hybrid"})
        h.cycle([make_instance(1), make_instance(2)])
        reloads = dataplane.reloads
        report = h.cycle([make_instance(1, tags={"HAProxy:Instance:Weight": "40"}), make_instance(2)])
        assert report.result == "applied" and report.transactions == {}
        assert dataplane.reloads == reloads
        assert dataplane.backends[WEB]["servers"]["srv1"]["weight"] == 40
        assert any("weight" in c and "srv1" in c for c in dataplane.runtime_changes)
        assert "weight 40" in next(x for x in dataplane.render().splitlines() if "server srv1 " in x)

    def test_per_service_settings_pass_haproxy_c(self, dataplane):
        h = Harness(dataplane, haproxy={"apply_mode": "hybrid", "server": {"params": {"inter": 2000}}},
                    services={"api": {"backend": {"balance": "leastconn", "mode": "tcp"},
                                      "server": {"params": {"rise": 5}}, "server_slots": {"base": 2}}})
        report = h.cycle([make_instance(1), make_instance(2, service="api", port="9000")])
        assert report.result == "applied" and dataplane.checks >= 1
        api, web = dataplane.backends["azure-api-9000-eastus"], dataplane.backends[WEB]
        assert (api["balance"]["algorithm"], api["mode"], len(api["servers"])) == ("leastconn", "tcp", 2)
        assert (web["balance"]["algorithm"], web["mode"], len(web["servers"])) == ("roundrobin", "http", 10)
        assert api["servers"]["srv1"]["rise"] == 5 and web["servers"]["srv1"].get("rise") is None
        assert h.cycle([make_instance(1), make_instance(2, service="api", port="9000")]).result == "steady"

    def test_a_refused_runtime_write_leaves_only_its_backend_out(self, dataplane):
        h = Harness(dataplane, haproxy={"apply_mode": "hybrid"}, safety={"drain_confirm_seconds": 0})
        h.cycle([make_instance(1), make_instance(2, service="api")])
        # The first runtime PUT is azure-api-…'s (backends go in name order).
        dataplane.add_fault("PUT", r"/servers/srv1$", status=422, message="refused")
        moved = [make_instance(1, address="10.9.0.1"), make_instance(2, service="api", address="10.9.0.2")]
        report = h.cycle(moved)
        assert report.result == "partial" and list(report.refused) == ["azure-api-8080-eastus"]
        assert h.servers(WEB)["srv1"] == "10.9.0.1:8080"
        assert h.servers("azure-api-8080-eastus")["srv1"] == "10.0.0.6:8080"
        assert h.cycle(moved).result == "applied"
        assert h.servers("azure-api-8080-eastus")["srv1"] == "10.9.0.2:8080"


class TestDrainingDataPlane:
    """Draining through the runtime server endpoint and the native stats of both APIs."""

    class Clock:
        def __init__(self, t=1_800_000_000.0):
            self.t = t

        def __call__(self):
            return self.t

    def bed(self, dataplane, mode="hybrid", seconds=30):
        h = Harness(dataplane, haproxy={"apply_mode": mode}, safety={"drain_seconds": seconds})
        clock = self.Clock()
        h.cycle([make_instance(1), make_instance(2)], clock=clock)
        dataplane.sessions[(WEB, "srv2")] = 2
        return h, clock

    def runtime_requests(self, dataplane):
        return [(r.method, r.path.split("/services/haproxy/")[1], r.body) for r in dataplane.requests
                if "/runtime/" in r.path or "/stats/" in r.path]

    def test_servers_draining_in_one_backend_cost_one_stats_request(self, dataplane):
        h = Harness(dataplane, haproxy={"apply_mode": "hybrid"}, safety={"max_drain_percent": 100})
        clock = self.Clock()
        h.cycle([make_instance(i) for i in range(1, 5)], clock=clock)
        dataplane.sessions[(WEB, "srv3")] = 1
        del dataplane.requests[:]
        report = h.cycle([make_instance(1), make_instance(2)], clock=clock)
        stats = [r for r in dataplane.requests if "/stats/" in r.path]
        assert len(stats) == 1 and stats[0].query == {"type": "server", "parent": WEB}
        drained = [r.path.rsplit("/", 1)[1] for r in dataplane.requests
                   if "/runtime/" in r.path and r.body == {"admin_state": "drain"}]
        assert drained == ["srv3", "srv4"]
        # srv3 still has a session and drains on; srv4 has none and is parked in the same cycle.
        assert report.result == "applied" and h.servers(WEB)["srv4"] == "parked"
        assert h.servers(WEB)["srv3"] != "parked" and list(h.state.draining[WEB]) == ["srv3"]

    def test_hybrid_drain_then_park_once_the_sessions_are_0_without_a_reload(self, dataplane):
        h, clock = self.bed(dataplane)
        reloads, version = dataplane.reloads, dataplane.version
        report = h.cycle([make_instance(1)], clock=clock)
        assert report.result == "draining" and h.servers(WEB)["srv2"] == "10.0.0.6:8080"
        assert dataplane.admin_states == {(WEB, "srv2"): "drain"}
        path = "runtime/servers/srv2" if dataplane.api == "v2" else f"runtime/backends/{WEB}/servers/srv2"
        assert self.runtime_requests(dataplane) == [("PUT", path, {"admin_state": "drain"}),
                                                    ("GET", "stats/native", None)]
        assert (dataplane.version, dataplane.reloads) == (version, reloads)
        clock.t += 5
        assert h.cycle([make_instance(1)], clock=clock).result == "draining"   # no steady shortcut
        assert report.view["targets"][0]["backends"][0]["servers"][1]["state"] == "draining"
        dataplane.sessions[(WEB, "srv2")] = 0
        clock.t += 5
        report = h.cycle([make_instance(1)], clock=clock)
        assert report.result == "applied" and h.servers(WEB)["srv2"] == "parked" and h.state.draining == {}
        assert dataplane.reloads == reloads and report.transactions == {}
        assert h.cycle([make_instance(1)], clock=clock).result == "steady"

    def test_parked_when_the_time_is_up(self, dataplane):
        h, clock = self.bed(dataplane, mode="transaction", seconds=20)
        h.cycle([make_instance(1)], clock=clock)
        clock.t += 19.9
        assert h.cycle([make_instance(1)], clock=clock).result == "draining"
        clock.t += 0.1
        assert h.cycle([make_instance(1)], clock=clock).result == "applied" and h.servers(WEB)["srv2"] == "parked"

    def test_a_reload_in_between_loses_nothing(self, dataplane):
        h, clock = self.bed(dataplane)
        h.cycle([make_instance(1)], clock=clock)
        dataplane.seed({}, replace=False)   # another client's change: HAProxy reloads, the drain is gone
        assert dataplane.admin_states == {}
        clock.t += 10
        report = h.cycle([make_instance(1)], clock=clock)
        assert report.result == "draining" and dataplane.admin_states == {(WEB, "srv2"): "drain"}
        (drain,) = report.plan.draining
        assert drain.until - clock.t == 20      # the time left, not a fresh start

    def test_a_refused_drain_parks_at_once(self, dataplane, caplog):
        """A drain the API refuses is no drain: keeping the server live would only keep it in
        rotation, so it is parked now, as with drain_seconds 0."""
        h, clock = self.bed(dataplane)
        dataplane.add_fault("PUT", r"/runtime/", status=404, message="Runtime server srv2 not found")
        report = h.cycle([make_instance(1)], clock=clock)
        assert report.result == "applied" and h.servers(WEB)["srv2"] == "parked" and h.state.draining == {}
        assert "could not set it drain at runtime (parked now instead)" in caplog.text
        assert "Traceback" not in caplog.text and dataplane.open_transactions() == []

    def test_sessions_not_given_drain_on_until_the_time_is_up(self, dataplane, caplog):
        h, clock = self.bed(dataplane, seconds=10)
        dataplane.sessions[(WEB, "srv2")] = 0
        dataplane.add_fault("GET", r"/stats/native", status=200, message="not stats", times=1)
        report = h.cycle([make_instance(1)], clock=clock)
        assert report.result == "draining" and "sessions not readable" in caplog.text
        dataplane.add_fault("GET", r"/stats/native", status=500, message="no runtime API", times=1)
        clock.t += 1
        assert h.cycle([make_instance(1)], clock=clock).result == "draining"
        assert "no runtime API" in caplog.text and dataplane.open_transactions() == []
        clock.t += 1
        assert h.cycle([make_instance(1)], clock=clock).result == "applied"   # read again: 0, parked

    def test_the_daemon_wakes_when_the_drain_is_due(self, dataplane):
        cfg = dp_config(dataplane, safety={"drain_seconds": 5}, polling={"jitter_seconds": 0})
        dataplane.sessions[(WEB, "srv2")] = 1
        both, one = (m.Discovery((make_instance(1), make_instance(2))), m.Discovery((make_instance(1),)))
        sleeps = steps(m.Daemon(lambda: cfg, lambda c: ScriptedSource(both, one),
                                lambda c: m.DataPlane(c.haproxy), rand=lambda: 0.0), 3)
        assert sleeps[0] == 30 and 4.5 < sleeps[1] <= 5 + m.DRAIN_SLACK

    def test_an_instance_back_during_its_drain_is_ready_again(self, dataplane):
        h, clock = self.bed(dataplane)
        h.cycle([make_instance(1)], clock=clock)
        clock.t += 3
        report = h.cycle([make_instance(1), make_instance(2)], clock=clock)
        assert report.plan.ready == (f"{WEB}/srv2",) and dataplane.admin_states == {}
        assert h.servers(WEB)["srv2"] == "10.0.0.6:8080" and h.state.draining == {}


# === Logging ===
class TestLogging:
    def capture(self, fmt="json", secrets=("hunter2-secret",)):
        stream = io.StringIO()
        m.setup_logging("DEBUG", fmt, secrets, stream)
        return stream

    def test_json_lines_have_stable_keys(self):
        stream = self.capture()
        m.log.info("cycle %s", "applied", extra={"event": "cycle", "backend": "b", "count": 3})
        record = json.loads(stream.getvalue())
        assert list(record)[:4] == ["ts", "level", "msg", "event"]
        assert record["msg"] == "cycle applied" and record["count"] == 3 and record["level"] == "info"
        assert m.re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["ts"])

    @pytest.mark.parametrize("fmt", ["json", "text"])
    def test_secrets_never_reach_a_line(self, fmt):
        stream = self.capture(fmt)
        m.log.warning("password is hunter2-secret")
        m.log.error("headers {'Authorization': 'Basic YWRtaW46aHVudGVy'} and Bearer eyJ0eXAi.abc.def")
        try:
            raise m.DataPlaneError("token=abcdef123 failed")
        except m.DataPlaneError:
            m.log.exception("boom", extra={"event": "x", "detail": "client_secret=zzz999"})
        out = stream.getvalue()
        for secret in ("hunter2-secret", "YWRtaW46aHVudGVy", "eyJ0eXAi", "abcdef123", "zzz999"):
            assert secret not in out
        if fmt == "json":
            assert all(json.loads(line) for line in out.splitlines() if line.startswith("{"))

    @pytest.mark.parametrize("fmt", ["json", "text"])
    def test_one_masking_for_password_basic_value_tokens_and_identity_header(self, fmt):
        cfg = make_config(haproxy={"password": "dp-pass-4242", "username": "ops"})
        env = {"IDENTITY_HEADER": "idh-7f3a9c", "AZURE_CLIENT_SECRET": "cs-0xdeadbeef", "HOME": "/root"}
        basic = m.basic_credentials(cfg.haproxy)
        stream = self.capture(fmt, m.secrets_of(cfg, env))
        m.log.error("echo %s / %s / %s / %s", "dp-pass-4242", basic, "idh-7f3a9c", "cs-0xdeadbeef")
        m.log.error("X-IDENTITY-HEADER: other-value-1 Authorization: Bearer tok.en.value")
        out = stream.getvalue()
        for secret in ("dp-pass-4242", basic, "idh-7f3a9c", "cs-0xdeadbeef", "other-value-1", "tok.en.value"):
            assert secret not in out
        assert out.count("***") >= 6


# === Cycle: the core's decisions against an in-memory Target ===
class MemoryTarget:
    """HAProxy as a dict behind the Target protocol: plans applied in memory; `conflicts`
    transactions fail with a conflict first (each moving the version, as a peer's commit does)."""

    def __init__(self, conflicts=0, reload_fails=0, debt=None):
        self.backends, self.ver, self.requests = {}, 1, 0
        self.conflicts, self.reload_fails, self.debt = conflicts, reload_fails, debt
        self.calls, self.waited = [], []

    def version(self):
        self.requests += 1
        return self.ver

    def read_backends(self, prefix):
        self.requests += 1
        return {n: b for n, b in self.backends.items() if n.startswith(prefix)}

    def apply_transaction(self, plan, version, stop):
        self.calls.append(("transaction", version))
        self.ver += 1
        if self.conflicts:
            self.conflicts -= 1
            raise m.TransactionConflict("version mismatch", 409)
        self.backends = m.state_after(self.backends, plan)
        return m.Applied(self.ver, (f"reload-{self.ver}",))

    def apply_runtime(self, plan, version, stop):
        self.calls.append(("runtime", plan.runtime_writes))
        self.backends = m.state_after(self.backends, plan)
        self.ver += plan.runtime_writes
        return m.Applied(self.ver)

    def await_reloads(self, reloads, stop):
        self.waited += reloads
        if reloads and self.reload_fails:
            self.reload_fails -= 1
            raise m.ReloadFailed(reloads[0], None, "reload failed")

    def reload_debt(self):
        self.requests += 1
        return self.debt

    def dropped_fields(self):
        return frozenset()

    def make_reload(self, version, stop):
        self.calls.append(("reload", version))
        done = m.Applied(self.ver + 1, (f"reload-{self.ver + 1}",))
        self.ver += 1
        self.await_reloads(done.reloads, stop)
        return done


def reconcile(cfg, source, target, state, stop, report):
    """One target's cycle as the daemon runs it: discover, then plan and apply."""
    run = m.TargetRun(cfg.haproxy.base_url, cfg, target, state)
    return m.reconcile_target(run, m.Pass(m.discover(cfg, source, stop, report), stop), report)


class TestApply:
    def cycle(self, target, instances, state=None, **sections):
        report, state = m.CycleReport(), state or m.State()
        reconcile(make_config(**sections), ScriptedSource(m.Discovery(tuple(instances))), target, state,
                    m.Flag(), report)
        return report, state

    def test_a_conflict_is_replanned_at_the_new_version(self):
        target = MemoryTarget(conflicts=1)
        report, state = self.cycle(target, [make_instance(1)])
        assert target.calls == [("transaction", 1), ("transaction", 2)]
        assert report.transactions == {"conflict": 1, "committed": 1} and report.reloads == 1
        assert target.waited == ["reload-3"] and state.version == 3

    def test_three_conflicts_give_up_and_record_nothing(self):
        target = MemoryTarget(conflicts=3)
        with pytest.raises(m.DataPlaneError, match="gave up after 3 attempts"):
            self.cycle(target, [make_instance(1)], state := m.State())
        assert len(target.calls) == 3 and state.version is None and target.backends == {}

    def test_steady_costs_one_version_read(self):
        target = MemoryTarget()
        _, state = self.cycle(target, [make_instance(1)])
        target.requests = 0
        report, _ = self.cycle(target, [make_instance(1)], state)
        assert report.result == "steady" and target.requests == 1 and len(target.calls) == 1

    def test_a_failed_reload_records_no_version(self):
        target = MemoryTarget(reload_fails=1)
        with pytest.raises(m.ReloadFailed, match="reload failed"):
            self.cycle(target, [make_instance(1)], state := m.State())
        assert state.version is None and state.fingerprint is None and state.debt.reload_id == "reload-2"

    def test_a_field_the_server_forgets_ends_its_write_loop_after_three_writes(self, caplog):
        class Forgetful(MemoryTarget):          # keeps no `retries`, as a release without it in its model
            def apply_transaction(self, plan, version, stop):
                done = super().apply_transaction(plan, version, stop)
                self.backends = {n: m.BackendState(n, {k: v for k, v in b.fields.items() if k != "retries"},
                                                   b.servers) for n, b in self.backends.items()}
                return done
        target, state, written = Forgetful(), m.State(), []
        sections = {"haproxy": {"password": "p", "backend": {"params": {"retries": 3}}}}
        with caplog.at_level(logging.WARNING, logger="haproxy_azure_discovery"):
            for n in range(10):
                target.ver += n < 7            # another client writes elsewhere: every cycle reads HAProxy
                calls = len(target.calls)
                report, state = self.cycle(target, [make_instance(1)], state, **sections)
                written.append(len(target.calls) - calls)
        assert written == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0] and report.result == "steady"
        assert state.unkept == {"backend.retries"} and report.ignored == []
        warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "field_ignored"]
        assert len(warned) == 1 and "backend field retries" in warned[0]

    def test_a_write_another_writer_undoes_each_time_is_held_after_three(self):
        class Undone(MemoryTarget):             # someone puts srv1 back in maintenance after every write
            def apply_transaction(self, plan, version, stop):
                done = super().apply_transaction(plan, version, stop)
                b = self.backends[WEB]
                self.backends[WEB] = m.BackendState(WEB, b.fields, {**b.servers, "srv1": {
                    **b.servers["srv1"], "maintenance": "enabled"}})
                return done
        target, state, results = Undone(), m.State(), []
        for _ in range(5):
            target.ver += 1
            calls = len(target.calls)
            report, state = self.cycle(target, [make_instance(1)], state)
            results.append((report.result, len(target.calls) - calls))
        assert results == [("applied", 1), ("applied", 1), ("applied", 1), ("partial", 0), ("partial", 0)]
        assert "(server.maintenance)" in report.refused[WEB] and state.unkept == frozenset()
        report, state = self.cycle(target, [make_instance(1), make_instance(2)], state)
        assert report.result == "applied"          # another desired state: written again

    def test_rewrite_guard_counts_one_desired_state_written_again_and_again(self):
        servers = {"srv1": {"name": "srv1", "address": "10.0.0.4", "port": 80, "maintenance": "disabled"}}

        def plan(wanted):
            change = m.ServerChange("update", "srv1", servers["srv1"], {**servers["srv1"], "maintenance": "enabled"})
            return m.Plan(backends=(m.BackendPlan("b", False, True, wanted, servers, (change,), 1, 1, wanted),))
        actual = {"b": m.BackendState("b", {"name": "b", "a": 2}, {})}
        rewrites, looping = {}, {}
        for _ in range(4):
            rewrites, looping = m.rewrite_guard(plan({"name": "b", "a": 1}), actual, rewrites)
        assert rewrites["b"].count == 4 and looping == {"b": {"backend.a", "server.maintenance"}}
        rewrites, looping = m.rewrite_guard(plan({"name": "b", "a": 3}), actual, rewrites)
        assert rewrites["b"].count == 1 and looping == {}                  # another desired state: anew
        assert m.rewrite_guard(m.Plan(), actual, rewrites) == ({}, {})    # not planned: the streak ends

    def test_a_reload_debt_is_paid_before_anything_is_steady(self):
        target = MemoryTarget(reload_fails=2)
        with pytest.raises(m.ReloadFailed):
            self.cycle(target, [make_instance(1)], state := m.State())
        with pytest.raises(m.ReloadFailed):        # the reload that pays it fails too: still owed
            self.cycle(target, [make_instance(1)], state)
        assert state.debt.reload_id == "reload-3" and target.calls[-1] == ("reload", 2)
        report, _ = self.cycle(target, [make_instance(1)], state)
        assert report.result == "applied" and report.reloads == 1 and state.debt is None
        assert target.calls[-1] == ("reload", 3)
        assert self.cycle(target, [make_instance(1)], state)[0].result == "steady"

    def test_a_fresh_process_finds_the_debt_in_the_reload_records(self):
        target = MemoryTarget(debt=m.ReloadFailed("2026-12-07-4", 1765000000, "[ALERT] cannot bind"))
        report, state = self.cycle(target, [make_instance(1)])
        assert target.calls[0] == ("reload", 1) and report.reloads == 2 and state.debt is None
        report, _ = self.cycle(target, [make_instance(1)], state)
        assert report.result == "steady"            # the records are read once per state

    def test_shutdown_before_applying_sends_nothing(self):
        target, stop = MemoryTarget(), m.Flag()
        stop.set()
        with pytest.raises(m.Aborted):
            reconcile(make_config(), ScriptedSource(m.Discovery((make_instance(1),))), target, m.State(),
                        stop, m.CycleReport())
        assert target.calls == [] and target.requests == 0

    @pytest.mark.parametrize("estate, limit, want", [
        ((1, 2), 25, ("runtime", 2)),        # one slot unparked: two runtime writes
        ((1, 2), 1, ("transaction", 2)),     # ... past the limit: one transaction
        ((1, 2, 3, 4), 25, ("runtime", 6)),
        (range(1, 12), 25, ("transaction", 2)),   # growth past 10 slots is structural
    ])
    def test_hybrid_decides_runtime_or_transaction(self, estate, limit, want):
        hybrid = {"password": "p", "apply_mode": "hybrid", "hybrid_max_writes": limit}
        target = MemoryTarget()
        _, state = self.cycle(target, [make_instance(1)], haproxy=hybrid)
        report, _ = self.cycle(target, [make_instance(i) for i in estate], state, haproxy=hybrid)
        assert target.calls[-1] == want and report.result == "applied"


class TestTargetsCycle:
    """run_cycle: one discovery, each target planned from its own state and failing alone."""

    def runs(self, *targets):
        cfg = make_config()
        return [m.TargetRun(name, cfg, t) for name, t in targets]

    def test_each_target_plans_from_its_own_state_and_drain_guard(self):
        a, b = MemoryTarget(), MemoryTarget()
        runs = self.runs(("a", a), ("b", b))
        four = ScriptedSource(m.Discovery(tuple(make_instance(i) for i in range(1, 5))))
        assert [r.result for r in m.run_cycle(four, runs[:1], m.Flag())] == ["applied"]     # only a
        a.requests = 0
        one = ScriptedSource(m.Discovery((make_instance(1),)))
        reports = m.run_cycle(one, runs, m.Flag())
        assert [(r.target, r.result) for r in reports] == [("a", "held"), ("b", "applied")]
        assert len(reports[0].plan.held) == 3 and reports[1].plan.held == ()   # the guard is a's alone
        assert a.requests == 2 and runs[0].state.drain_streak == 1 and runs[1].state.drain_streak == 0

    def test_one_targets_bug_is_its_own_failure(self, caplog):
        class Broken(MemoryTarget):
            def version(self):
                raise KeyError("bug")
        good = MemoryTarget()
        reports = m.run_cycle(ScriptedSource(m.Discovery((make_instance(1),))),
                              self.runs(("broken", Broken()), ("good", good)), m.Flag())
        assert [(r.target, r.result, r.error) for r in reports] == [
            ("broken", "failed", "unexpected KeyError: 'bug'"), ("good", "applied", "")]
        assert reports[0].view["targets"] == [{"target": "broken", "ok": False, "error": "unexpected KeyError: 'bug'"}]
        assert any(r.exc_info and getattr(r, "target", "") == "broken" for r in caplog.records)

    def test_a_failed_discovery_applies_nowhere(self):
        a, b = MemoryTarget(), MemoryTarget()
        with pytest.raises(m.AzureError):
            m.run_cycle(ScriptedSource(m.AzureError("down")), self.runs(("a", a), ("b", b)), m.Flag())
        assert a.requests == b.requests == 0

    def test_shutdown_during_the_targets_is_aborted_once_all_stopped(self):
        stop = m.Flag()

        class Stopping(MemoryTarget):
            def version(self):
                stop.set()
                raise m.DataPlaneError("connection reset")
        with pytest.raises(m.Aborted, match="connection reset"):
            m.run_cycle(ScriptedSource(m.Discovery((make_instance(1),))),
                        self.runs(("a", Stopping()), ("b", MemoryTarget())), stop)


# === Daemon ===
class ScriptedSource:
    """Discovery results (or exceptions) in order; the last repeats."""
    def __init__(self, *results):
        self.results = list(results)

    def discover(self):
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result


class EmptyDataPlane:
    """Holds no backends and takes no writes: enough for loops over empty estates."""
    requests = 0

    def version(self):
        self.requests += 1
        return 1

    def read_backends(self, prefix):
        self.requests += 1
        return {}

    def await_reloads(self, reloads, stop):
        pass

    def reload_debt(self):
        return None

    def dropped_fields(self):
        return frozenset()


class TestLoop:
    def test_backoff_grows_and_resets(self):
        ok = m.Discovery(())
        fail = m.AzureError("listing failed")
        source = ScriptedSource(fail, fail, fail, ok, fail, ok)
        cfg = make_config(polling={"jitter_seconds": 0})
        daemon = m.Daemon(lambda: cfg, lambda c: source, lambda c: EmptyDataPlane(), rand=lambda: 0.0)
        assert steps(daemon, 7) == [5, 10, 20, 30, 5, 30]

    def test_a_failure_record_says_when_the_next_try_comes(self, caplog):
        fail = m.AzureError("listing failed")
        source = ScriptedSource(fail, fail, m.Discovery(()))
        cfg = make_config(polling={"jitter_seconds": 0})
        daemon = m.Daemon(lambda: cfg, lambda c: source, lambda c: EmptyDataPlane(),
                          rand=lambda: 0.0)
        assert steps(daemon, 3) == [5, 10]
        failed = [r for r in caplog.records if getattr(r, "event", "") == "cycle_failed"]
        assert [(r.getMessage(), r.failures, r.next_try_in_seconds) for r in failed] == [
            ("cycle failed: listing failed; next try in 5 s", 1, 5),
            ("cycle failed: listing failed; next try in 10 s", 2, 10)]

    def test_unexpected_errors_are_logged_and_the_loop_goes_on(self, caplog):
        source = ScriptedSource(KeyError("bug"), m.Discovery(()))
        daemon = m.Daemon(make_config, lambda c: source, lambda c: EmptyDataPlane(), rand=lambda: 0.0)
        assert steps(daemon, 2) == [5]
        assert any(r.exc_info and "cycle failed unexpectedly" in r.getMessage() for r in caplog.records)

    def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid(self):
        configs = [make_config(polling={"interval_seconds": 60, "jitter_seconds": 0}),
                   m.ConfigError(["x: bad"]), make_config(polling={"interval_seconds": 90, "jitter_seconds": 0})]

        def load():
            c = configs.pop(0)
            if isinstance(c, Exception):
                raise c
            return c
        sources = []

        def make_source(c):
            sources.append(c)
            return ScriptedSource(m.Discovery(()))
        daemon = m.Daemon(load, make_source, lambda c: EmptyDataPlane(), rand=lambda: 0.0)
        assert steps(daemon, 3, lambda delay: daemon.reload()) == [60, 60]   # the invalid config changed nothing ...
        assert [c.polling.interval_seconds for c in sources] == [60, 90]   # ... the valid one did

    def test_stop_interrupts_the_sleep(self):
        signals = m.Signals()
        threading.Timer(0.2, lambda: signals._set(signals.stop)).start()
        started = time.monotonic()
        m.Daemon(lambda: make_config(polling={"interval_seconds": 600}),
                 lambda c: ScriptedSource(m.Discovery(())), lambda c: EmptyDataPlane()).run(signals)
        assert time.monotonic() - started < 5

    def test_real_signals_wake_the_sleep_through_the_self_pipe(self):
        signals = m.Signals()
        signals.install()
        try:
            threading.Timer(0.2, os.kill, [os.getpid(), signal.SIGHUP]).start()
            started = time.monotonic()
            signals.sleep(10)
            assert time.monotonic() - started < 2 and signals.reload.is_set() and not signals.stop.is_set()
            signals.reload.clear()
            os.kill(os.getpid(), signal.SIGTERM)     # before the sleep: its byte waits in the pipe
            signals.sleep(10)
            assert signals.stop.is_set()
        finally:
            signals.restore()
        assert signal.getsignal(signal.SIGTERM) is not signals._handle

    def test_any_failure_putting_a_reload_to_use_keeps_the_old_one(self, caplog):
        class Closing(ScriptedSource):
            def close(self):
                closed.append(self.name)
        closed, built = [], []

        def make_source(c):
            built.append(c.polling.interval_seconds)
            source = Closing(m.Discovery(()))
            source.name = c.polling.interval_seconds
            return source

        def make_dataplane(c):
            if c.polling.interval_seconds == 90:
                raise FileNotFoundError(2, "No such file or directory")
            return EmptyDataPlane()
        configs = [make_config(polling={"interval_seconds": i, "jitter_seconds": 0}) for i in (60, 90, 120)]
        daemon = m.Daemon(lambda: configs.pop(0), make_source, make_dataplane, rand=lambda: 0.0)
        assert steps(daemon, 3, lambda delay: daemon.reload()) == [60, 60]   # the reload to 90 failed, the one to 120 worked
        assert built == [60, 90, 120] and closed == [90, 60, 120]   # each client closed once
        failed = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "reload_failed"]
        assert failed == ["configuration reload failed, keeping the old one: "
                          "FileNotFoundError: [Errno 2] No such file or directory"]

    def test_a_reload_applies_logging_level_format_and_masking(self):
        stream = io.StringIO()
        configs = [make_config(logging={"level": "INFO", "format": "json"}),
                   make_config(logging={"level": "WARNING", "format": "text"}, haproxy={"password": "n3w-s3cret"})]
        seen = []

        def load():
            return configs.pop(0) if configs else seen[-1]

        def configure(c):
            seen.append(c)
            m.setup_logging(c.logging.level, c.logging.format, m.secrets_of(c, {}), stream)
        try:
            daemon = m.Daemon(load, lambda c: ScriptedSource(m.Discovery(())), lambda c: EmptyDataPlane(),
                              configure=configure)
            steps(daemon, 2, lambda delay: daemon.reload())
            m.log.warning("password n3w-s3cret in a message")
            m.log.info("not at WARNING")
        finally:
            for handler in m.logging.getLogger().handlers[:]:
                m.logging.getLogger().removeHandler(handler)
        lines = stream.getvalue().splitlines()
        assert json.loads(lines[0])["event"] == "cycle"             # json at INFO before the reload
        assert lines[-1].endswith(" warning: password *** in a message")   # text, masked, at WARNING
        assert not any("not at WARNING" in line or "n3w-s3cret" in line for line in lines)

    def test_a_listener_moved_to_a_held_port_is_kept_and_needs_a_restart(self, caplog):
        import urllib.request
        port = free_port()
        configs = [make_config(metrics={"listen": f"127.0.0.1:{port}"}, polling={"jitter_seconds": 0}),
                   make_config(metrics={"listen": f"0.0.0.0:{port}"},
                               polling={"interval_seconds": 90, "jitter_seconds": 0})]
        served = []

        def between(delay):
            if not served:
                daemon.reload()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                served.append(r.status)
        daemon = m.Daemon(lambda: configs.pop(0), lambda c: ScriptedSource(m.Discovery(())),
                          lambda c: EmptyDataPlane(), rand=lambda: 0.0)
        sleeps = steps(daemon, 3, between)
        assert sleeps == [30, 90] and served == [200, 200]    # the rest of the reload applied
        restart = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "restart_needed"]
        assert restart == [f"metrics.listen 0.0.0.0:{port} needs a restart: 127.0.0.1:{port} holds its port"]

    def test_health_is_measured_on_the_monotonic_clock(self, monkeypatch):
        metrics = m.Metrics(interval=10)
        assert not metrics.healthy()
        metrics.record([m.CycleReport(result="steady")], time.time())
        assert metrics.healthy()
        wall = time.time
        monkeypatch.setattr(m.time, "time", lambda: wall() + 86400)    # the wall clock steps a day
        assert metrics.healthy()
        assert not metrics.healthy(time.monotonic() + 31)

    def test_a_skip_is_warned_about_once_whatever_the_result(self, caplog):
        bad = m.Discovery((make_instance(2, port="80x"),))
        source = ScriptedSource(m.Discovery(()), bad, m.AzureError("down"), bad, bad)
        state, dp = m.State(), EmptyDataPlane()
        results = []
        for _ in range(5):
            try:
                results.append(one_cycle(make_config(), source, dp, state, m.Flag()).result)
            except m.DiscoveryError:
                results.append("failed")
        warned = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "skip"]
        assert results == ["unchanged", "steady", "failed", "steady", "steady"]
        assert len(warned) == 1 and "vm2" in warned[0] and "80x" in warned[0], warned


class TestTargetBackoff:
    def run(self, name, failures=0, due=0.0):
        return m.TargetRun(name, make_config(), EmptyDataPlane(), failures=failures, due=due)

    def test_due_targets_are_those_out_of_backoff_or_else_the_first_to_be(self):
        a, b, c = self.run("a"), self.run("b", 2, 110.0), self.run("c", 3, 105.0)
        assert m._due([a, b, c], 100.0) == [a]
        assert m._due([b, c], 100.0) == [c] and m._due([b, c], 120.0) == [b, c]

    def test_a_failing_target_backs_off_while_the_others_keep_the_interval(self):
        cfg = make_config(polling={"jitter_seconds": 0}, haproxy={"password": "p", "targets": [
            {"base_url": "http://a:5555"}, {"base_url": "http://b:5555"}]})

        class FailingB(EmptyDataPlane):
            def __init__(self, url):
                self.url = url

            def version(self):
                if "b" in self.url:
                    raise m.DataPlaneError("refused")
                return super().version()
        now = [0.0]
        clocks = m.Clocks(monotonic=lambda: now[0])

        def sleep(seconds):
            now[0] += seconds
        daemon = m.Daemon(lambda: cfg, lambda c: ScriptedSource(m.Discovery(())),
                          lambda c: FailingB(c.haproxy.base_url), clocks=clocks, rand=lambda: 0.0)
        assert steps(daemon, 4, sleep) == [30, 30, 30]
        only_b = make_config(polling={"jitter_seconds": 0},
                             haproxy={"password": "p", "targets": [{"base_url": "http://b:5555"}]})
        daemon = m.Daemon(lambda: only_b, lambda c: ScriptedSource(m.Discovery(())),
                          lambda c: FailingB(c.haproxy.base_url), clocks=clocks, rand=lambda: 0.0)
        assert steps(daemon, 4, sleep) == [5, 10, 20]     # every target failing: the backoff is the sleep

    def test_a_failing_targets_next_try_comes_with_the_next_cycle_after_its_backoff(self, caplog):
        """b fails (a DataPlaneError, then a bug) beside a healthy a: b's backoff is 5 s, then
        10 s, but the next cycle comes after a's interval: the records say so."""
        cfg = make_config(polling={"jitter_seconds": 0}, haproxy={"password": "p", "targets": [
            {"base_url": "http://a:5555"}, {"base_url": "http://b:5555"}]})
        errors = [m.DataPlaneError("refused"), KeyError("bug")]

        class FailingB(EmptyDataPlane):
            def __init__(self, url):
                self.url = url

            def version(self):
                if "b" in self.url:
                    raise errors.pop(0)
                return super().version()
        now = [0.0]

        def sleep(seconds):
            now[0] += seconds
        daemon = m.Daemon(lambda: cfg, lambda c: ScriptedSource(m.Discovery(())),
                          lambda c: FailingB(c.haproxy.base_url),
                          clocks=m.Clocks(monotonic=lambda: now[0]), rand=lambda: 0.0)
        assert steps(daemon, 2, sleep) == [30]
        failed = [r for r in caplog.records if getattr(r, "event", "") == "cycle_failed"]
        assert [(r.getMessage(), r.target, r.failures, r.next_try_in_seconds) for r in failed] == [
            ("cycle failed: refused; next try in 30 s", "http://b:5555", 1, 30),
            ("cycle failed: unexpected KeyError: 'bug'; next try in 30 s", "http://b:5555", 2, 30)]
        bugs = [r for r in caplog.records if getattr(r, "event", "") == "unexpected_error"]
        assert len(bugs) == 1 and bugs[0].exc_info and bugs[0].target == "http://b:5555"

    def test_status_names_each_target(self):
        runs = [self.run("hap-1"), self.run("hap-2", 3), self.run("hap-3", 1)]
        reports = [m.CycleReport(result="steady", target="hap-1", instances=4, skips=()),
                   m.CycleReport(result="failed", target="hap-2", skips=(), error="refused")]
        assert m._status(reports, runs) == ("last cycle: 4 instances, 0 skipped; targets: hap-1 steady, "
                                            "hap-2 failed (3 in a row), hap-3 backing off (1 in a row)")
        failed = [m.CycleReport(target=n, error="listing failed") for n in ("hap-1", "hap-2")]
        assert m._status(failed, runs[:2]) == "last cycle failed (3 in a row): listing failed"

    def test_state_keeps_a_failing_targets_last_view_marked_and_drops_a_removed_one(self):
        metrics = m.Metrics(10)
        metrics.use(["a", "b"])
        backends = [{"backend": WEB, "servers": [{"slot": "srv1", "state": "live"}]}]
        views = {t: {"discovery": {"instances": 1}, "targets": [{"target": t, "ok": True, "backends": backends,
                                                                  "drift": 0}]} for t in "ab"}
        metrics.record([m.CycleReport(result="applied", target=t, view=views[t]) for t in "ab"], 0)
        down = {"discovery": {"instances": 1}, "targets": [{"target": "b", "ok": False, "error": "refused"}]}
        metrics.record([m.CycleReport(target="b", view=down, failure=m.DataPlaneError("refused"), error="refused")], 0)
        state = json.loads(metrics.state())
        assert [(t["target"], t["ok"], t.get("error"), len(t["backends"])) for t in state["targets"]] == [
            ("a", True, None, 1), ("b", False, "refused", 1)]
        metrics.record([m.CycleReport(result="steady", target="b")], 0)       # back, and nothing read
        assert json.loads(metrics.state())["targets"][1] == {"target": "b", "ok": True, "backends": backends,
                                                             "drift": 0}
        metrics.use(["b"])
        assert [t["target"] for t in json.loads(metrics.state())["targets"]] == ["b"]
        gauges = [line for line in metrics.render().splitlines()
                  if not line.split("{")[0].endswith(("_total", "_sum", "_count"))]
        assert not [line for line in gauges if 'target="a"' in line]       # its counters stay: they only grow

    def test_health_needs_every_target_and_a_reload_gives_a_new_one_three_intervals(self):
        now = [0.0]
        metrics = m.Metrics(10, clock=lambda: now[0])
        metrics.use(["a", "b"])
        assert metrics.stale() == ["a", "b"]
        metrics.record([m.CycleReport(result="applied", target="a"), m.CycleReport(target="b", error="x")], 0)
        assert metrics.stale() == ["b"] and not metrics.healthy()
        metrics.record([m.CycleReport(result="steady", target="b")], 0)
        now[0] = 25.0
        metrics.use(["b", "c"])
        assert metrics.healthy() and metrics.targets == ["b", "c"]
        now[0] = 31.0
        assert metrics.stale() == ["b"]
        now[0] = 56.0
        assert metrics.stale() == ["b", "c"]


class TestDelay:
    @pytest.mark.parametrize("failures, rand, want", [
        (0, 0.0, 30), (0, 0.5, 32.5), (1, 0.0, 5), (2, 0.0, 10), (3, 0.0, 20), (7, 0.0, 300), (60, 0.0, 300),
    ])
    def test_next_delay(self, failures, rand, want):
        assert m.next_delay(failures, m.PollingConfig(), rand) == want

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(failures=st.integers(1, 10**6), rand=st.floats(0, 1, exclude_max=True),
           base=st.floats(0.001, 86400), extra=st.floats(0, 86400))
    def test_backoff_never_exceeds_the_cap(self, failures, rand, base, extra):
        """Jitter included, a backoff lies between the base and max_backoff_seconds."""
        cfg = m.PollingConfig(backoff_base_seconds=base,
                              max_backoff_seconds=min(86400, base + extra))
        assert base <= m.next_delay(failures, cfg, rand) <= cfg.max_backoff_seconds


# === Metrics and health endpoint; systemd's notifications ===
@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""
    import socket
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def received(sock) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages


class TestOperations:
    def test_sd_notify_without_socket_is_a_no_op(self):
        assert m.sd_notify("READY=1", env={}) is False
        assert m.sd_notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/socket"}) is False

    def test_ready_once_then_watchdog_and_status_each_cycle(self, notify_socket):
        source = ScriptedSource(m.Discovery(()), m.AzureError("listing VMs failed: HTTP 500"), m.Discovery(()))
        steps(m.Daemon(make_config, lambda c: source, lambda c: EmptyDataPlane(), rand=lambda: 0.0), 3)
        messages = received(notify_socket)
        assert messages == [
            "READY=1\nWATCHDOG=1\nSTATUS=ready after the first cycle; last cycle unchanged: 0 instances, 0 skipped",
            "WATCHDOG=1\nSTATUS=last cycle failed (1 in a row): listing VMs failed: HTTP 500",
            "WATCHDOG=1\nSTATUS=last cycle steady: 0 instances, 0 skipped"]

    def test_watchdog_is_pinged_during_a_long_sleep(self, notify_socket):
        signals = m.Signals()
        notifier = m.Notifier({"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "200000"})
        threading.Timer(0.35, signals._set, [signals.stop]).start()
        started = time.monotonic()
        signals.sleep(10, notifier)
        assert time.monotonic() - started < 1
        assert 2 <= received(notify_socket).count("WATCHDOG=1") <= 4
        signals.restore()

    def test_abstract_socket_address(self):
        import socket
        name = f"had-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            assert m.sd_notify("STATUS=x", env={"NOTIFY_SOCKET": "@" + name})
            assert sock.recv(100) == b"STATUS=x"

    def test_metrics_and_health_over_http(self):
        import urllib.error
        import urllib.request
        port = free_port()
        cfg = make_config(metrics={"listen": f"127.0.0.1:{port}"}, polling={"interval_seconds": 0.2})
        inst = make_instance(1)
        results = [m.Discovery((inst,), requests=4), m.AzureError("down"), m.AzureError("down"),
                   m.AzureError("down"), m.AzureError("down")]
        pages = {}

        sleeps = []

        def probe(delay):
            sleeps.append(delay)
            url = f"http://127.0.0.1:{port}"
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                pages[len(sleeps)] = r.read().decode()
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                    pages[f"health{len(sleeps)}"] = r.status
            except urllib.error.HTTPError as e:
                pages[f"health{len(sleeps)}"] = e.code
            time.sleep(0.25)

        class OneBackend(EmptyDataPlane):
            def apply_transaction(self, plan, version, stop):
                return m.Applied(version + 1, ("r1",))

        steps(m.Daemon(lambda: cfg, lambda c: ScriptedSource(*results), lambda c: OneBackend(),
                       rand=lambda: 0.0), 5, probe)
        first, last = pages[1], pages[4]
        t = 'target="http://localhost:5555"'       # per target: labelled; per discovery: not
        assert f'haproxy_azure_discovery_cycles_total{{{t},result="applied"}} 1' in first
        assert f"haproxy_azure_discovery_servers_live{{{t}}} 1\n" in first
        assert f"haproxy_azure_discovery_servers_parked{{{t}}} 9\n" in first
        assert "haproxy_azure_discovery_azure_requests_total 4\n" in first
        assert f'haproxy_azure_discovery_transactions_total{{{t},result="committed"}} 1' in first
        assert f"haproxy_azure_discovery_reloads_total{{{t}}} 1\n" in first
        assert f'haproxy_azure_discovery_cycles_total{{{t},result="failed"}} 3' in last
        assert pages["health1"] == 200 and pages["health4"] == 503   # no success for 3 intervals
        with pytest.raises(OSError):     # the server is gone with the loop
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)

    def test_metrics_render_exact_values_each_family_once_under_help_and_type(self):
        metrics = m.Metrics(30)
        view = {"discovery": {}, "targets": [{"target": "t", "ok": True, "backends": [
            {"backend": WEB, "servers": [{"slot": "srv1", "state": "live"}]}]}]}
        plan = m.Plan(live=1, slots=10, our_backends=1)
        metrics.record([m.CycleReport(result="applied", target="t", plan=plan, view=view, skips=(),
                                      duration=0.25)], 1796630000.123)
        metrics.record([m.CycleReport(target="t", error="down")], 1796630031.5)
        lines = metrics.render().splitlines()
        last = 'haproxy_azure_discovery_last_success_timestamp_seconds{target="t"}'
        assert f"{last} 1796630000.123" in lines        # not 1.79663e+09: hours off
        assert "haproxy_azure_discovery_polling_interval_seconds 30" in lines
        assert 'haproxy_azure_discovery_cycle_duration_seconds_count{target="t"} 2' in lines
        assert "# TYPE haproxy_azure_discovery_cycle_duration_seconds summary" in lines
        families = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
        helped = [line.split()[2] for line in lines if line.startswith("# HELP ")]
        assert families == helped and len(families) == len(set(families))
        assert {f.removeprefix("haproxy_azure_discovery_") for f in families} <= set(m.Metrics.HELP)
        live = [n for n, line in enumerate(lines)
                if line.startswith("haproxy_azure_discovery_servers_live")]
        assert len(live) == 2 and live[1] == live[0] + 1     # one family: per target, per backend
        assert lines[live[0] - 1] == "# TYPE haproxy_azure_discovery_servers_live gauge"

    def test_a_failed_discovery_keeps_the_instance_gauges(self):
        metrics = m.Metrics(30)
        metrics.record([m.CycleReport(result="applied", target="t", instances=5, skipped=2,
                                      skips=())], 0)
        metrics.record([m.CycleReport(target="t", error="listing failed")], 0)       # skips None
        text = metrics.render()
        assert "haproxy_azure_discovery_instances_discovered 5\n" in text
        assert "haproxy_azure_discovery_instances_skipped 2\n" in text

    def test_drain_deadline_is_the_first_drains_end_and_holds_while_cycles_fail(self):
        metrics = m.Metrics(30)
        drains = (m.Drain(WEB, "srv2", "10.0.0.5", 80, 100.0, 130.0),
                  m.Drain(WEB, "srv1", "10.0.0.4", 80, 90.0, 120.0))
        gauge = 'haproxy_azure_discovery_drain_deadline_timestamp_seconds{target="t"} '
        draining = m.Plan(draining=drains)
        metrics.record([m.CycleReport(result="draining", target="t", plan=draining)], 0)
        assert gauge + "120\n" in metrics.render()
        metrics.record([m.CycleReport(target="t", error="down")], 0)       # no plan: it holds
        assert gauge + "120\n" in metrics.render()
        metrics.record([m.CycleReport(result="applied", target="t", plan=m.Plan())], 0)
        assert gauge + "0\n" in metrics.render()

    def test_metrics_listener_binds_ipv6_and_answers_head(self):
        import http.client
        port = free_port()
        server = m.serve_metrics(f"[::1]:{port}", m.Metrics(30))
        try:
            conn = http.client.HTTPConnection("::1", port, timeout=5)
            conn.request("HEAD", "/metrics")
            r = conn.getresponse()
            assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""
            conn = http.client.HTTPConnection("::1", port, timeout=5)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 503          # no successful cycle yet
        finally:
            server.shutdown()
            server.server_close()

    def test_metrics_listen_that_cannot_bind_is_a_config_error(self):
        import socket
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(m.ConfigError, match="metrics.listen: cannot listen on 127.0.0.1:"):
                m.serve_metrics(f"127.0.0.1:{busy.getsockname()[1]}", m.Metrics(30))

    def test_slow_and_surplus_clients_are_cut_and_others_served(self, monkeypatch):
        import socket
        import urllib.request
        monkeypatch.setattr(m, "METRICS_DEADLINE", 0.6)
        monkeypatch.setattr(m, "METRICS_CONNECTIONS", 2)
        port = free_port()
        server = m.serve_metrics(f"127.0.0.1:{port}", m.Metrics(30))
        try:
            slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            for sock in slow:
                sock.sendall(b"GET /metr")                  # and never the rest
            time.sleep(0.2)
            surplus = socket.create_connection(("127.0.0.1", port), timeout=2)
            assert surplus.recv(100) == b""                 # past the bound: closed at once
            started = time.monotonic()
            for sock in slow:
                sock.settimeout(3)
                sock.recv(100)                              # the deadline cuts them
            assert time.monotonic() - started < 2.0
            # A cut connection's slot is freed by its thread just after the client sees the
            # close: a scrape in that instant is still surplus. Within a second it is served.
            deadline, status = time.monotonic() + 1.0, None
            while status is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        status = r.status
                except (ConnectionError, urllib.error.URLError, http.client.RemoteDisconnected):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert status == 200
        finally:
            server.shutdown()
            server.server_close()


# === CLI ===
BLOCK_SDK = "import sys; sys.modules['azure'] = None\nimport haproxy_azure_discovery as m\n"


class TestCli:
    def example(self):
        return os.path.join(HERE, "config.example.json")

    def test_validate_imports_no_azure_module(self):
        r = run_py("import sys\nimport haproxy_azure_discovery as m\n"
                   f"rc = m.main(['--validate', '-c', {self.example()!r}])\n"
                   "assert not [k for k in sys.modules if k.startswith('azure')], 'azure imported'\n"
                   "sys.exit(rc)", EXAMPLE_ENV)
        assert r.returncode == 0, r.stderr
        assert "configuration ok" in r.stdout

    @pytest.mark.parametrize("args", [["--help"], ["--version"]])
    def test_help_and_version_without_sdk(self, args):
        r = run_py(BLOCK_SDK + f"raise SystemExit(m.main({args!r}))")
        assert r.returncode == 0, r.stderr
        assert ("usage:" in r.stdout) if args == ["--help"] else r.stdout.startswith(
            f"haproxy-azure-discovery {m.__version__}")

    def test_missing_sdk_exits_69_with_install_hint(self):
        r = run_py(BLOCK_SDK + f"raise SystemExit(m.main(['--once', '-c', {self.example()!r}]))", EXAMPLE_ENV)
        assert r.returncode == 69
        assert r.stderr.startswith("error: Azure SDK not importable") and "azure-mgmt-compute" in r.stderr

    def test_missing_variable_names_key_and_variable(self, capsys):
        env = {k: v for k, v in os.environ.items() if k != "DATAPLANE_PASSWORD"}
        os.environ.pop("DATAPLANE_PASSWORD", None)
        os.environ["AZURE_SUBSCRIPTION_ID"] = SUB
        try:
            assert m.main(["--validate", "-c", self.example()]) == 78
        finally:
            os.environ.clear()
            os.environ.update(env)
        assert "haproxy.password: environment variable DATAPLANE_PASSWORD is not set" in capsys.readouterr().err

    def test_usage_error_is_2(self):
        assert m.main(["--once", "--validate"]) == 2

    @pytest.mark.parametrize("how", [["haproxy_azure_discovery.py"], ["-m", "haproxy_azure_discovery"]])
    def test_runs_as_script_and_module(self, how):
        r = subprocess.run([sys.executable, *how, "--validate", "-c", self.example()], cwd=HERE,
                           capture_output=True, text=True, timeout=60, env={**os.environ, **EXAMPLE_ENV})
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, *how, "-c", "/nonexistent.json", "--validate"], cwd=HERE,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 78 and r.stderr.startswith("error: /nonexistent.json: cannot read")

    def test_import_has_no_side_effects(self):
        r = run_py("import logging, signal, sys\nh = signal.getsignal(signal.SIGTERM)\n"
                   "import haproxy_azure_discovery\n"
                   "assert signal.getsignal(signal.SIGTERM) is h\n"
                   "assert not logging.getLogger().handlers and not logging.getLogger('haproxy_azure_discovery').handlers\n")
        assert r.returncode == 0, r.stderr

    def test_the_environment_is_an_argument(self, tmp_path, monkeypatch, capsys):
        """main(argv, env) reads ${VAR} from `env`, not from the process environment."""
        monkeypatch.delenv("DP_SECRET", raising=False)
        path = write_config(tmp_path, {"azure": {"subscription_id": SUB}, "haproxy": {"password": "${DP_SECRET}"}})
        assert m.main(["--validate", "-c", path], env={"DP_SECRET": "from-the-argument"}) == 0
        assert m.main(["--validate", "-c", path], env={}) == 78
        assert "DP_SECRET" in capsys.readouterr().err


class TestOnce:
    """The CLI's --once and --dry-run against the fake Resource Manager and the emulator."""

    def config(self, tmp_path, arm_config, dataplane, azure=None, **extra):
        """arm_config's, the emulator's haproxy section (`haproxy` replaces it whole), JSON logs."""
        haproxy = extra.pop("haproxy", {"base_url": dataplane.url, "password": "${DP_PASSWORD}", "timeout": 5,
                                        "server_slots": {"base": 4}})
        raw = arm_config.raw(azure={"timeout": 30, **(azure or {})}, haproxy=haproxy, logging={"format": "json"},
                             **extra)
        return write_config(tmp_path, raw)

    def test_once_syncs_the_estate(self, tmp_path, arm, arm_config, dataplane, monkeypatch, capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3, uniform_sets=1, flexible_sets=1, per_set=2,
                                 services=(("web", 8080), ("api", 9000)),
                                 overrides={"vm-0002": {"power_state": "stopped"}})
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == 0
        expected = {}
        for p in arm.estate.machines():
            if p.inst.power_state == "running":
                tags = {**(p.ss.tags if p.ss else {}), **p.inst.tags}
                name = f"azure-{tags['HAProxy:Service:Name']}-{tags['HAProxy:Service:Port']}-{p.home.location}"
                expected.setdefault(name, set()).add(f"{p.inst.private_ip}:{tags['HAProxy:Service:Port']}")
        got = {name: {f"{s['address']}:{s['port']}" for s in b["servers"].values() if s.get("maintenance") != "enabled"}
               for name, b in dataplane.backends.items()}
        assert got == expected and sum(map(len, got.values())) == 6
        slots = m.SlotsConfig(4, 1.5, "linear")
        assert {n: len(b["servers"]) for n, b in dataplane.backends.items()} == {
            n: m.slot_target(len(e), slots) for n, e in expected.items()}
        err = capsys.readouterr().err
        lines = [json.loads(line) for line in err.splitlines()]
        assert lines[-1]["event"] == "cycle" and lines[-1]["result"] == "applied"
        assert dataplane.password not in err and arm.token not in err

    @pytest.mark.parametrize("command, fault, code", [
        (["--once"], None, 0), (["--dry-run"], None, 0), (["--status"], None, 0),
        (["--explain", "vm-0001"], None, 1), (["--once"], "500", 1), (["--status"], "500", 1)])
    def test_a_one_shot_command_closes_its_connections(self, command, fault, code, tmp_path, arm, arm_config,
                                                       dataplane, monkeypatch):
        """--once, --dry-run, --status and --explain close their Azure and Data Plane clients when
        they end, also when Azure fails them: no connection to either is left open in the process."""
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3)
        if fault:
            arm.add_fault(fault, endpoint="vms", times=None)
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        ports = (urllib.parse.urlsplit(arm.url).port, dataplane.port)
        assert m.main([*command, "-c", self.config(tmp_path, arm_config, dataplane)]) == code
        assert arm.counts["vms"] >= 1 and (dataplane.requests or fault)     # both were spoken to
        assert connections_to(*ports) == 0

    def test_dry_run_prints_the_plan_and_changes_nothing(self, tmp_path, arm, arm_config, dataplane, monkeypatch,
                                                          capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        version = dataplane.version
        assert m.main(["--dry-run", "-c", self.config(tmp_path, arm_config, dataplane)]) == 0
        assert capsys.readouterr().out == textwrap.dedent("""\
            backend azure-web-8080-eastus (create, 4 slots, 2 live)
              + srv1 10.0.0.4:8080
              + srv2 10.0.0.5:8080
              + srv3 parked
              + srv4 parked
            1 services, 2 live servers, 1 backends to change
            """)
        assert dataplane.version == version and dataplane.backends == {}
        assert not [r for r in dataplane.requests if r.method != "GET"]

    def test_dry_run_and_status_show_ipv6_servers_in_brackets(self, tmp_path, arm, arm_config,
                                                              dataplane, monkeypatch, capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2, ipv6_base="fd00::4")
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        path = self.config(tmp_path, arm_config, dataplane, azure={"ip_version": "ipv6"})
        assert m.main(["--dry-run", "-c", path]) == 0
        assert capsys.readouterr().out.splitlines()[1:3] == [
            "  + srv1 [fd00::4]:8080", "  + srv2 [fd00::5]:8080"]
        assert m.main(["--once", "-c", path]) == 0
        assert dataplane.server(WEB, "srv1")["address"] == "fd00::4"
        capsys.readouterr()
        assert m.main(["--status", "-c", path]) == 0
        assert capsys.readouterr().out.splitlines()[4:6] == [
            "    srv1     live     [fd00::4]:8080         vm-0000",
            "    srv2     live     [fd00::5]:8080         vm-0001"]
        assert m.main(["--status", "--json", "-c", path]) == 0
        servers = json.loads(capsys.readouterr().out)["targets"][0]["backends"][0]["servers"]
        assert [s.get("address") for s in servers] == [
            "[fd00::4]:8080", "[fd00::5]:8080", None, None]

    def test_status_shows_both_sides_and_marks_drift(self, tmp_path, arm, arm_config, dataplane, monkeypatch, capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3)
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        path = self.config(tmp_path, arm_config, dataplane)
        assert m.main(["--once", "-c", path]) == 0
        capsys.readouterr()
        assert m.main(["--status", "-c", path]) == 0
        assert capsys.readouterr().out == textwrap.dedent("""\
            discovery: 1 services, 3 instances, 0 skipped
              azure-web-8080-eastus: 3 instances
            target %s: 1 backends, in sync
              backend azure-web-8080-eastus: 4 slots, 3 live, 1 parked
                srv1     live     10.0.0.4:8080          vm-0000
                srv2     live     10.0.0.5:8080          vm-0001
                srv3     live     10.0.0.6:8080          vm-0002
                srv4     parked
            """ % dataplane.url)
        # Azure loses one instance, and someone turns off another slot's health check.
        arm.estate.update("vm-0001", power_state="deallocated")
        dataplane.edit_server(WEB, "srv3", check="disabled")
        version, writes = dataplane.version, dataplane.count_requests("PUT") + dataplane.count_requests("POST")
        assert m.main(["--status", "-c", path]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[2] == f"target {dataplane.url}: 1 backends, 2 differences from the desired state"
        assert out[5] == ("  ! srv2     live     10.0.0.5:8080          (no discovered instance)  "
                          "<- want draining (its instance left), then parked")
        assert out[6] == "  ! srv3     live     10.0.0.6:8080          vm-0002  <- settings differ (check)"
        assert m.main(["--status", "--json", "-c", path]) == 0
        view = json.loads(capsys.readouterr().out)
        (target,) = view["targets"]
        assert view["discovery"]["instances"] == 2 and target["drift"] == 2
        (backend,) = target["backends"]
        assert (backend["live"], backend["parked"], backend["slots"]) == (3, 1, 4)
        assert [s.get("drift") for s in backend["servers"]] == [
            None, "want draining (its instance left), then parked", "settings differ (check)", None]
        assert dataplane.version == version      # --status changes nothing
        assert dataplane.count_requests("PUT") + dataplane.count_requests("POST") == writes

    def test_status_and_dry_run_see_a_drain_under_way(self, tmp_path, arm, arm_config, dataplane, monkeypatch, capsys):
        """--once starts a drain (the server still has sessions) and exits; a later --status,
        which has no memory, reads from HAProxy that it runs and marks no drift."""
        from fake_arm import make_estate
        arm.estate = make_estate(vms=3)
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        path = self.config(tmp_path, arm_config, dataplane)
        assert m.main(["--once", "-c", path]) == 0
        dataplane.sessions[(WEB, "srv2")] = 1
        arm.estate.update("vm-0001", power_state="deallocating")
        assert m.main(["--once", "-c", path]) == 0
        assert dataplane.admin_states == {(WEB, "srv2"): "drain"} and dataplane.server(WEB, "srv2")["port"] == 8080
        capsys.readouterr()
        assert m.main(["--status", "-c", path]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[2].endswith(": 1 backends, in sync") and out[3].endswith("4 slots, 2 live, 1 parked, 1 draining")
        assert out[5] == "    srv2     draining 10.0.0.5:8080          under way"
        assert m.main(["--dry-run", "-c", path]) == 0
        assert "draining: azure-web-8080-eastus/srv2 10.0.0.5:8080 since" in capsys.readouterr().out
        dataplane.sessions[(WEB, "srv2")] = 0           # its last session ended: the next run parks it
        assert m.main(["--once", "-c", path]) == 0 and dataplane.server(WEB, "srv2")["maintenance"] == "enabled"

    def test_status_of_an_unreachable_haproxy_is_exit_1(self, tmp_path, arm_config, monkeypatch, capsys):
        raw = arm_config.raw(azure={"timeout": 30},
                             haproxy={"base_url": f"http://127.0.0.1:{free_port()}", "password": "p", "timeout": 2})
        assert m.main(["--status", "-c", write_config(tmp_path, raw)]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")

    def test_json_without_status_is_a_usage_error(self, capsys):
        assert m.main(["--once", "--json"]) == 2
        assert "--json goes with --status" in capsys.readouterr().err

    def test_once_fails_with_exit_1_and_one_error_line(self, tmp_path, arm, arm_config, dataplane, monkeypatch, capsys):
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        arm.add_fault("500", endpoint="nics", times=None)
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("error: listing network interfaces of subscription") and "HTTP 500" in err[-1]
        assert dataplane.backends == {}

    @pytest.mark.parametrize("where", ["azure", "dataplane"])
    def test_a_failed_once_logs_cycle_failed_before_its_error_line(self, tmp_path, arm, arm_config,
                                                                    dataplane, monkeypatch, capsys,
                                                                    where):
        """JSON logs: a failed discovery, or a failed target, is a cycle_failed record as in the
        daemon (no next try: --once has none), then the plain error line."""
        from fake_dataplane import PATH_VERSION
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        if where == "azure":
            arm.add_fault("500", endpoint="nics", times=None)
        else:
            dataplane.add_fault("GET", PATH_VERSION, status=500, message="boom", times=None)
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == 1
        *logged, last = capsys.readouterr().err.splitlines()
        failed = [r for r in map(json.loads, logged) if r["event"] == "cycle_failed"]
        assert len(failed) == 1 and failed[0]["level"] == "warning"
        assert last.startswith("error: ")
        assert failed[0]["msg"] == "cycle failed: " + last[len("error: "):]
        assert "next_try_in_seconds" not in failed[0] and "next try" not in failed[0]["msg"]
        assert failed[0].get("target") == (None if where == "azure" else dataplane.url)

    @pytest.mark.parametrize("tagged, code", [(True, 1), (False, 0)])
    def test_once_exits_1_when_every_tagged_instance_was_skipped(self, tmp_path, arm, arm_config,
                                                                 dataplane, monkeypatch, capsys,
                                                                 tagged, code):
        """Two tagged VMs, both with a bad port tag: none is served, exit 1 with an error line
        after the warnings. Nothing tagged at all is an empty estate: exit 0."""
        from fake_arm import make_estate
        tags = {"HAProxy:Service:Name": "web", "HAProxy:Service:Port": "80x"} if tagged else {}
        arm.estate = make_estate(vms=2, overrides={f"vm-000{i}": {"tags": tags} for i in (0, 1)})
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == code
        *logged, last = capsys.readouterr().err.splitlines()
        skips = [r for r in map(json.loads, logged) if r["event"] == "skip"]
        assert len(skips) == 2 * tagged
        if tagged:
            assert last == ("error: every one of the 2 tagged instances was skipped; "
                            "see the warnings above")
        else:
            assert json.loads(last)["event"] == "cycle"

    def test_sigterm_during_once_leaves_no_transaction(self, tmp_path, arm, arm_config, dataplane):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2)
        dataplane.add_fault("POST", r"/backends$", delay=10, times=None)
        env = {**os.environ, "DP_PASSWORD": dataplane.password}
        proc = subprocess.Popen([sys.executable, "haproxy_azure_discovery.py", "--once", "-c",
                                 self.config(tmp_path, arm_config, dataplane, haproxy={
                                     "base_url": dataplane.url, "password": "${DP_PASSWORD}", "timeout": 3})],
                                cwd=HERE, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not dataplane.count_requests("POST", "/backends$") and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        dataplane.clear_faults()
        assert dataplane.open_transactions() == [] and dataplane.backends == {}

    def test_one_hostile_vm_among_healthy_services(self, tmp_path, arm, arm_config, dataplane, monkeypatch, capsys):
        """A VM tagged "web\\n", ten untagged VMs, one with lower-case tag names: exit 0,
        every healthy service applied, one warning naming the hostile VM, nothing else skipped."""
        from fake_arm import make_estate
        untagged = {f"vm-{i:04d}": {"tags": {"owner": "team-b"}} for i in range(4, 14)}
        arm.estate = make_estate(vms=14, services=(("web", 8080), ("api", 9000)), overrides={
            "vm-0000": {"tags": {"HAProxy:Service:Name": "web\n", "HAProxy:Service:Port": "8080"}},
            "vm-0001": {"tags": {"haproxy:service:name": "api", "HAPROXY:SERVICE:PORT": "9000"}},
            **untagged})
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == 0
        live = {n: sorted(s["address"] for s in b["servers"].values() if s.get("maintenance") != "enabled")
                for n, b in dataplane.backends.items()}
        assert live == {"azure-api-9000-eastus": ["10.0.0.5", "10.0.0.7"],
                        "azure-web-8080-eastus": ["10.0.0.6"]}
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        warnings = [r for r in lines if r["level"] == "warning"]
        assert len(warnings) == 1 and warnings[0]["event"] == "skip", warnings
        assert "vm-0000 (/subscriptions/" in warnings[0]["msg"] and "/virtualmachines/vm-0000)" in warnings[0]["msg"]
        assert '"web\\n" is not a service name' in warnings[0]["msg"]
        assert lines[-1]["event"] == "cycle" and lines[-1]["skipped"] == 1 and lines[-1]["instances"] == 3

    def test_once_with_a_refused_backend_applies_the_rest_and_exits_1(self, tmp_path, arm, arm_config, dataplane,
                                                                      monkeypatch, capsys):
        from fake_arm import make_estate
        arm.estate = make_estate(vms=2, services=(("web", 8080), ("api", 9000)))
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        dataplane.add_fault("POST", r"/backends$", status=422, message="invalid")   # the first: azure-api-…
        assert m.main(["--once", "-c", self.config(tmp_path, arm_config, dataplane)]) == 1
        err = capsys.readouterr().err.splitlines()
        assert sorted(dataplane.backends) == ["azure-web-8080-eastus"] and dataplane.open_transactions() == []
        refused = [json.loads(line) for line in err[:-1] if '"backend_refused"' in line]
        assert len(refused) == 1 and "vm-0001 (10.0.0.5:9000)" in refused[0]["msg"]
        assert err[-1] == ("error: the Data Plane API refused backend(s) azure-api-9000-eastus; "
                           "the rest of the cycle applied")


    @pytest.mark.parametrize("source", ["arm", "resource_graph"])
    def test_once_in_a_resource_group_with_a_group_only_reader(self, tmp_path, arm, arm_config, dataplane, monkeypatch,
                                                               source):
        """Both sources, Reader on rg-a only, public addresses: the running, tagged instances of rg-a."""
        from fake_arm import make_estate
        arm.estate = make_estate(vms=8, resource_groups=("rg-a", "rg-b"), public_ip_base="20.0.0.4",
                                 overrides={"vm-0002": {"power_state": "stopped"}, "vm-0004": {"tags": {}}})
        arm.reader_groups = {"rg-a"}
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        path = self.config(tmp_path, arm_config, dataplane, azure={
            "source": source, "resource_groups": ["rg-a"], "address": "public"})
        assert m.main(["--once", "-c", path]) == 0
        live = {f"{s['address']}:{s['port']}" for b in dataplane.backends.values() for s in b["servers"].values()
                if s.get("maintenance") != "enabled"}
        assert live == {f"{arm.estate.find(n).public_ip}:8080" for n in ("vm-0000", "vm-0006")}
        assert arm.counts["vm_instance_view"] == (3 if source == "arm" else 0)   # vm-0000, -0002, -0006


# === Explain ===
# The JSON form of --explain: what an operator's tooling may rely on.
EXPLAIN_SCHEMA = {
    "type": "object",
    "required": ["query", "found", "served", "verdict", "exit"],
    "properties": {
        "query": {"type": "string"}, "found": {"type": "boolean"}, "served": {"type": "boolean"},
        "verdict": {"type": "string", "minLength": 1}, "exit": {"enum": [0, 1, 2]},
        "matches": {"type": "array", "items": {"type": "string"}},
        "listed": {"type": "object", "required": ["subscriptions", "resource_groups", "cloud", "source"]},
        "instance": {"type": "object", "required": ["name", "id"],
                     "properties": {"kind": {"enum": ["vm", "flexible", "uniform"]},
                                    "address": {"type": ["string", "null"]}}},
        "tags": {"type": "object", "additionalProperties": {"type": "string"},
                 "propertyNames": {"pattern": "^[^A-Z]*$"}},
        "rules": {"type": "array", "items": {
            "type": "object", "required": ["rule", "ok", "detail"], "additionalProperties": False,
            "properties": {"rule": {"type": "string"}, "ok": {"type": ["boolean", "null"]},
                           "detail": {"type": "string"}}}},
        "service": {"type": ["object", "null"], "required": ["service", "port", "region"]},
        "targets": {"type": "array", "items": {
            "type": "object", "required": ["target", "backend", "slot", "state"],
            "properties": {"slot": {"type": ["string", "null"]},
                           "state": {"enum": ["live", "draining", "parked", "missing", "unknown"]},
                           "seconds_left": {"type": ["integer", "null"]}}}},
    },
    "allOf": [{"if": {"properties": {"found": {"const": False}}},
               "then": {"required": ["listed", "matches"], "properties": {"exit": {"const": 2}}},
               "else": {"required": ["instance", "rules", "targets"]}},
              {"if": {"properties": {"served": {"const": True}}},
               "then": {"properties": {"exit": {"const": 0}}}}],
}


class TestExplain:
    """--explain over a tricky estate through the real SDK and the emulator: a served VM, a
    Uniform instance, a denylisted VM, a stopped one, a bad port tag, one past
    server_slots.max, one draining, one not found."""

    @pytest.fixture
    def bed(self, tmp_path, arm, arm_config, dataplane, monkeypatch):
        from fake_arm import make_estate, service_tags
        arm.estate = make_estate(vms=6, uniform_sets=1, per_set=2, overrides={
            "vm-0001": {"tags": {**service_tags("web", 8080), "Drain": "yes"}},
            "vm-0002": {"power_state": "stopped"},
            "vm-0003": {"tags": service_tags("web", "80a")}})
        monkeypatch.setenv("DP_PASSWORD", dataplane.password)
        raw = arm_config.raw(azure={"timeout": 30}, tags={"denylist": {"Drain": "yes"}},
                             haproxy={"base_url": dataplane.url, "password": "${DP_PASSWORD}", "timeout": 5,
                                      "server_slots": {"base": 2, "max": 4}})
        path = write_config(tmp_path, raw)
        assert m.main(["--once", "-c", path]) == 0
        return path, dataplane

    def start_drain(self, path, arm, dataplane, name):
        """`name` leaves with a session open: its server drains. Its slot."""
        slot = next(n for n, s in dataplane.backends[WEB]["servers"].items()
                    if s.get("address") == arm.estate.find(name).private_ip)
        dataplane.sessions[(WEB, slot)] = 1
        arm.estate.update(name, power_state="deallocating")
        assert m.main(["--once", "-c", path]) == 0
        assert dataplane.admin_states == {(WEB, slot): "drain"}
        return slot

    def explain(self, path, query, capsys):
        """(exit code, the text form, the JSON form, checked against EXPLAIN_SCHEMA)."""
        import jsonschema
        capsys.readouterr()
        code = m.main(["--explain", query, "-c", path])
        text = capsys.readouterr().out
        assert m.main(["--explain", query, "--json", "-c", path]) == code
        story = json.loads(capsys.readouterr().out)
        jsonschema.validate(story, EXPLAIN_SCHEMA)
        assert story["exit"] == code and text.rstrip("\n").splitlines()[-1].endswith(story["verdict"])
        return code, text, story

    def failed(self, story):
        return [(r["rule"], r["detail"]) for r in story["rules"] if r["ok"] is False]

    def test_each_verdict_and_exit_code(self, bed, arm, capsys):
        path, dataplane = bed
        version = dataplane.version
        code, text, story = self.explain(path, "VM-0000", capsys)        # any case
        slot = story["targets"][0]["slot"]
        assert code == 0 and story["served"] and story["verdict"] == f"served by {slot} on {dataplane.url}"
        assert story["instance"]["kind"] == "vm" and story["tags"]["haproxy:service:name"] == "web"
        assert all(r["ok"] for r in story["rules"]) and story["targets"][0]["state"] == "live"
        assert "  ok   denylist          no denylist tag present" in text

        code, _, story = self.explain(path, "uvmss-00_0", capsys)
        assert code == 0 and story["instance"]["kind"] == "uniform"
        assert "Uniform scale set uvmss-00" in story["instance"]["listing"]

        code, _, story = self.explain(path, "vm-0001", capsys)
        assert code == 1 and self.failed(story) == [("denylist", "denylist tag Drain=yes")]
        assert story["verdict"] == "not served: denylist tag Drain=yes"

        code, _, story = self.explain(path, "vm-0002", capsys)
        assert code == 1 and self.failed(story) == [("power state", "power state stopped (azure.running_only)")]

        code, _, story = self.explain(path, "vm-0003", capsys)
        assert code == 1 and [r for r, _ in self.failed(story)] == ["service port"]
        assert '"80a" is not a port' in story["verdict"]
        assert [r["ok"] for r in story["rules"] if r["rule"] in ("weight", "region")] == [None, None]

        # vm-0000, vm-0004, vm-0005 and uvmss-00_0 fill the 4 slots: the last by id is left out.
        code, text, story = self.explain(path, "uvmss-00_1", capsys)
        assert code == 1 and self.failed(story) == [
            ("server_slots.max", f"backend {WEB} is full (haproxy.server_slots.max = 4)")]
        assert dataplane.version == version            # nothing was written

        draining_slot = self.start_drain(path, arm, dataplane, "vm-0005")
        code, text, story = self.explain(path, "vm-0005", capsys)
        (target,) = story["targets"]
        assert code == 1 and (target["slot"], target["state"]) == (draining_slot, "draining")
        assert story["verdict"] == (f"not served: power state deallocating (on its way out); "
                                    f"draining on {dataplane.url} ({draining_slot})")
        # Now within the maximum, uvmss-00_1 waits for the draining slot.
        code, text, story = self.explain(path, "uvmss-00_1", capsys)
        assert code == 1 and not self.failed(story) and story["verdict"] == (
            f"not served: waits for a slot: the backend has its 4 (haproxy.server_slots.max), "
            f"{draining_slot} draining (on {dataplane.url})")

    def test_an_instance_not_found_names_the_scopes_listed(self, bed, capsys):
        path, _ = bed
        code, text, story = self.explain(path, "vm-9999", capsys)
        assert code == 2 and not story["found"] and story["matches"] == []
        assert story["listed"]["subscriptions"] == [SUB]
        assert f"subscription(s) {SUB}, every resource group" in story["verdict"]
        assert "another subscription, resource group or cloud" in text

    def test_explain_by_resource_id(self, bed, arm, capsys):
        path, _ = bed
        vm = arm.estate.find("vm-0004")
        rid = (f"/subscriptions/{vm.subscription}/resourceGroups/{vm.resource_group}"
               f"/providers/Microsoft.Compute/virtualMachines/vm-0004").upper()
        code, _, story = self.explain(path, rid, capsys)
        assert code == 0 and story["instance"]["id"] == rid.lower()

    @pytest.mark.parametrize("health, required, ok, detail", [
        ("healthy", True, True, "Application Health healthy"),
        ("initializing", True, False, "Application Health initializing: not added until Healthy"),
        ("unhealthy", True, False, "Application Health unhealthy: not served (its server drains)"),
        (None, True, True, "no Application Health reported: served as before"),
        ("unhealthy", False, True, "azure.require_healthy is off"),
    ])
    def test_the_readiness_rule(self, health, required, ok, detail):
        cfg = make_config(azure={"require_healthy": required})
        inst = make_instance(1, kind="uniform", health=health)
        (rule,) = [r for r in m.instance_rules(inst, cfg, []) if r["rule"] == "readiness"]
        assert rule["ok"] is ok and rule["detail"].startswith(detail)
        if not ok:      # the verdict names it
            story = m.explain("vm1", m.Discovery((inst,)), [], [], cfg)
            assert story["exit"] == 1 and story["verdict"] == f"not served: {rule['detail']}"
