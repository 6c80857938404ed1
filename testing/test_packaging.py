"""The .pyz and the systemd unit, as an operator gets them.

build_pyz.sh builds the .pyz once per run (PyPI needed). Then, for each CPython 3.10-3.13 found
(pyenv, else /usr/bin/python3.X), the .pyz runs alone in an empty directory with a clean environment:
--version shows the SDK it carries, --validate gives 0 / 78, and a --once cycle gets as far as an
Azure error (exit 1, not 69), also under MemoryDenyWriteExecute's kernel equivalent. The unit must pass
`systemd-analyze verify` and score 2.0 or below in `systemd-analyze security` (Debian package: systemd).

To run the .pyz another way, add a row to CASES, or call run_pyz() from a new test.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build_pyz.sh"
UNIT = ROOT / "haproxy-azure-discovery.service"
PYZ_NAME = "haproxy-azure-discovery.pyz"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MAX_EXPOSURE = 2.0

# Valid, but nothing listens on port 9: a cycle fails inside the Azure SDK, quickly.
CONFIG = {"azure": {"subscription_id": "00000000-0000-0000-0000-000000000001",
                    "resource_manager_url": "https://127.0.0.1:9/", "retries": 0, "timeout": 2},
          "haproxy": {"password": "x", "base_url": "http://127.0.0.1:9"}}
BAD_CONFIG = {"azure": {}, "haproxy": {"base_url": "ftp://nowhere"}}   # no subscription; not HTTP

# Runs its arguments (a .pyz and its arguments) with W+X memory refused, as MemoryDenyWriteExecute=yes
# does; PR_SET_MDWE (Linux 6.3+) is kept across execve, so pex's re-exec into its venv inherits it.
MDWE_WRAPPER = """\
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE unsupported (errno {ctypes.get_errno()})")
os.execv(sys.executable, [sys.executable, "-I", *sys.argv[1:]])
"""

# Imports the SDK through the daemon's own gateway and the compiled parts, uses OpenSSL through
# cryptography, and prints where each module came from (all must come from PEX_ROOT).
IMPORT_CHECK = """\
import json, sys, haproxy_azure_discovery
haproxy_azure_discovery._azure_sdk()
import _cffi_backend
from cryptography.hazmat.bindings import _rust
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
tops = ("azure", "cryptography", "_cffi_backend", "msal", "requests", "haproxy_azure_discovery")
print(json.dumps({name: module.__file__ for name, module in sorted(sys.modules.items())
                  if name.split(".")[0] in tops and getattr(module, "__file__", None)}))
"""


# --- helpers -------------------------------------------------------------------------------------------

def find_python(version: str) -> str | None:
    """The newest CPython `version`.N: pyenv's, else the distribution's /usr/bin/python3.X."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        root = out.stdout.strip() or root
    found = [p for p in glob.glob(f"{root}/versions/{version}.*/bin/python3")
             if re.fullmatch(rf"{re.escape(version)}\.\d+", Path(p).parent.parent.name)]
    found.sort(key=lambda p: int(Path(p).parent.parent.name.rsplit(".", 1)[1]))
    if found:
        return found[-1]
    system = f"/usr/bin/python{version}"
    return system if os.access(system, os.X_OK) else None


def sdk_packages() -> tuple[str, ...]:
    """The distributions --version reports: the module's SDK_PACKAGES, read from its source."""
    tree = ast.parse((ROOT / "haproxy_azure_discovery.py").read_text())
    return next(tuple(ast.literal_eval(node.value)) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", "") == "SDK_PACKAGES" for t in node.targets))


def clean_env(pex_root: Path, **extra: str) -> dict[str, str]:
    """What a bare host gives a service: PATH, PEX_ROOT, and only what the test adds. No HOME."""
    return {"PATH": "/usr/bin:/bin", "PEX_ROOT": str(pex_root), **extra}


def run_pyz(python: str, args: list[str], env: dict[str, str], cwd: Path, *, mdwe: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -I cwd/haproxy-azure-discovery.pyz ARGS` in `env`, exactly; optionally under MDWE."""
    pyz = str(cwd / PYZ_NAME)
    cmd = [python, "-I", "-c", MDWE_WRAPPER, pyz, *args] if mdwe else [python, "-I", pyz, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build(out: Path) -> subprocess.CompletedProcess:
    """build_pyz.sh -o OUT, with the test environment's pex when it is the pinned version."""
    env = dict(os.environ)
    pinned = re.search(r"^pex_version=(\S+)", BUILD.read_text(), re.M).group(1)
    pex = Path(sys.executable).with_name("pex")
    try:
        if pex.exists() and metadata.version("pex") == pinned:
            env["PEX"] = str(pex)
    except metadata.PackageNotFoundError:
        pass                                         # build_pyz.sh makes build/venv with the pinned pex
    result = subprocess.run(["bash", str(BUILD), "-o", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"build_pyz.sh failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-5000:]}")
    return result


def distributions(pyz: Path) -> dict[str, str]:
    """Wheel file name -> fingerprint, from the pex's PEX-INFO."""
    return json.loads(zipfile.ZipFile(pyz).read("PEX-INFO"))["distributions"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def need_systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install the Debian/Ubuntu package 'systemd' "
                    "(apt-get install systemd)")
    return path


# --- fixtures ------------------------------------------------------------------------------------------

# `pyz` (the .pyz built once per session with build() below) comes from ../conftest.py.


@dataclass
class Target:
    """One interpreter with the .pyz alone in an empty directory, its own PEX_ROOT and configs."""
    version: str
    python: str
    dir: Path
    pex_root: Path
    conf: Path
    start_times: list[float] = field(default_factory=list)   # --version: first start, second start
    version_output: str = ""

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.pex_root, **extra)

    def run(self, args: list[str], *, mdwe: bool = False, **extra_env: str) -> subprocess.CompletedProcess:
        return run_pyz(self.python, args, self.env(**extra_env), self.dir, mdwe=mdwe)


_TARGETS: dict[str, Target] = {}


def make_target(version: str, pyz: Path, tmp_path_factory) -> Target:
    """Set up (once per run) CPython `version` with the .pyz, and time its first two starts."""
    if version in _TARGETS:
        return _TARGETS[version]
    python = find_python(version)
    if python is None:
        pytest.skip(f"CPython {version} not found (neither $(pyenv root)/versions/{version}.N/bin/python3 "
                    f"nor /usr/bin/python{version}); install it with `pyenv install {version}`")
    base = tmp_path_factory.mktemp(f"py{version}")
    t = Target(version, python, base / "app", base / "pex-root", base / "conf")
    t.dir.mkdir()
    t.conf.mkdir()
    shutil.copy(pyz, t.dir / PYZ_NAME)
    (t.conf / "config.json").write_text(json.dumps(CONFIG))
    (t.conf / "bad.json").write_text(json.dumps(BAD_CONFIG))
    for _ in range(2):                   # the first start unpacks into PEX_ROOT; the second reuses it
        started = time.monotonic()
        result = t.run(["--version"])
        t.start_times.append(time.monotonic() - started)
        assert result.returncode == 0, result.stderr
        t.version_output = result.stdout
    _TARGETS[version] = t
    return t


@pytest.fixture(scope="module", params=PYTHONS, ids=[f"py{v}" for v in PYTHONS])
def target(request, pyz, tmp_path_factory) -> Target:
    return make_target(request.param, pyz, tmp_path_factory)


# --- the .pyz on each Python ---------------------------------------------------------------------------

def test_version_lists_the_sdk_it_carries(target, record_testsuite_property):
    first, second = target.start_times
    print(f"\npython {target.version} ({target.python}): --version first start {first:.2f} s, "
          f"second start {second:.2f} s")
    record_testsuite_property(f"py{target.version}_first_start_s", round(first, 2))
    record_testsuite_property(f"py{target.version}_second_start_s", round(second, 2))
    lines = target.version_output.splitlines()
    assert re.match(rf"haproxy-azure-discovery \S+ \(python {re.escape(target.version)}\.\d+\)", lines[0])
    for package in sdk_packages():
        assert any(re.fullmatch(rf"{package} \d+(\.\d+)+", line) for line in lines), target.version_output


# (arguments, extra environment, exit code, regexes stdout/stderr must match, regexes stderr must not)
# "{conf}" is the directory holding config.json and bad.json.
CASES = [
    pytest.param(["--validate", "-c", "{conf}/config.json"], {}, 0, [r"configuration ok"], [r"(?m)^error:"],
                 id="validate-ok"),
    pytest.param(["--validate", "-c", "{conf}/bad.json"], {}, 78,
                 [r"(?m)^error: \S*bad\.json: haproxy\.base_url"], [], id="validate-bad"),
    # Exit 1 with the SDK's own error shows the SDK imported and ran (69 would mean it did not).
    pytest.param(["--once", "-c", "{conf}/config.json"], {}, 1, [r"error: .*Error"],
                 [r"not importable", r"Traceback"], id="once-unreachable"),
]


@pytest.mark.parametrize("args, extra_env, code, must, must_not", CASES)
def test_run(target, args, extra_env, code, must, must_not):
    result = target.run([a.format(conf=target.conf) for a in args], **extra_env)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    for pattern in must:
        assert re.search(pattern, output), f"{pattern!r} not in:\n{output[-3000:]}"
    for pattern in must_not:
        assert not re.search(pattern, result.stderr), f"{pattern!r} in:\n{result.stderr[-3000:]}"


@pytest.fixture
def fakes(arm):
    """The fake Resource Manager (3 VMs) and the Data Plane emulator, for a real --once."""
    from fake_arm import make_estate
    from conftest import RELOAD_DELAY
    from fake_dataplane import FakeDataPlane
    arm.estate = make_estate(vms=3)
    with FakeDataPlane(api="v3", reload_delay=RELOAD_DELAY) as dp:
        yield arm, dp
        assert dp.violations == [] and dp.errors == []


def test_once_against_the_fakes(target, fakes, arm_config, tmp_path):
    """The .pyz alone, in a clean environment, runs a whole cycle: the real SDK carried inside
    gets its token from the fake's managed identity and lists the estate; the emulator ends
    up holding it."""
    arm, dp = fakes
    config = tmp_path / "once.json"
    config.write_text(json.dumps(arm_config.raw(azure={"timeout": 30},
                                                haproxy={"base_url": dp.url, "password": "${DP_PASSWORD}"})))
    env = {k: v for k, v in arm.env().items() if k != "FAKE_ARM_URL"}
    result = target.run(["--once", "-c", str(config)], DP_PASSWORD=dp.password, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    servers = dp.backends["azure-web-8080-eastus"]["servers"]
    assert sorted(s["address"] for s in servers.values() if s["maintenance"] == "disabled") == [
        "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    assert dp.password not in result.stderr and arm.token not in result.stderr


def test_sdk_imports_from_the_pex(target):
    result = target.run(["-c", IMPORT_CHECK], PEX_INTERPRETER="1")
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("azure.identity", "_cffi_backend", "cryptography.hazmat.bindings._rust"):
        assert name in files, sorted(files)
    outside = {name: path for name, path in files.items()
               if not Path(path).resolve().is_relative_to(target.pex_root.resolve())}
    assert not outside, f"imported from outside PEX_ROOT: {outside}"


def test_runs_under_memory_deny_write_execute(target):
    """The unit sets MemoryDenyWriteExecute=yes; this is the same refusal, from the kernel."""
    probe = run_pyz(target.python, ["-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                    target.env(PEX_INTERPRETER="1"), target.dir, mdwe=True)
    if "PR_SET_MDWE unsupported" in probe.stderr:
        pytest.skip(f"this kernel ({os.uname().release}) has no PR_SET_MDWE (Linux 6.3+)")
    assert "PermissionError" in probe.stderr, "W+X memory was not refused: the MDWE wrapper is broken"
    imports = target.run(["-c", IMPORT_CHECK], mdwe=True, PEX_INTERPRETER="1")
    assert imports.returncode == 0, imports.stderr[-3000:]
    once = target.run(["--once", "-c", f"{target.conf}/config.json"], mdwe=True)
    assert once.returncode == 1 and "not importable" not in once.stderr, once.stderr[-3000:]


def test_plain_module_without_sdk(target, tmp_path):
    """Vendoring the one file: --validate works without the SDK; a cycle says what to install."""
    shutil.copy(ROOT / "haproxy_azure_discovery.py", tmp_path)
    run = [target.python, "-I", "-S", str(tmp_path / "haproxy_azure_discovery.py")]   # -S: no site-packages
    ok = subprocess.run([*run, "--validate", "-c", f"{target.conf}/config.json"], cwd=tmp_path,
                        env=target.env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    once = subprocess.run([*run, "--once", "-c", f"{target.conf}/config.json"], cwd=tmp_path,
                          env=target.env(), capture_output=True, text=True, timeout=60)
    assert once.returncode == 69 and "azure-identity" in once.stderr, once.stderr


def test_systemd_notify_through_the_pex(pyz, tmp_path_factory, tmp_path):
    """Type=notify with NotifyAccess=main: READY=1 and WATCHDOG=1 must come from the PID systemd
    started, so pex's re-exec into its venv has to keep it (execv, not a child). SIGHUP reloads,
    SIGTERM stops with 0."""
    version = next((v for v in reversed(PYTHONS) if find_python(v)), None)
    if version is None:
        pytest.skip(f"none of CPython {', '.join(PYTHONS)} found")
    t = make_target(version, pyz, tmp_path_factory)
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(90)
        proc = subprocess.Popen([t.python, "-I", str(t.dir / PYZ_NAME), "-c", f"{t.conf}/config.json"],
                                cwd=t.dir, env=t.env(NOTIFY_SOCKET=address), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            proc.send_signal(signal.SIGHUP)
            reloaded, _, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        except (TimeoutError, subprocess.TimeoutExpired):
            proc.kill()
            pytest.fail(f"no notification or no exit in time:\n{proc.communicate()[1][-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    creds = [d for level, kind, d in ancillary
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    sender_pid = struct.unpack("iII", creds[0])[0] if creds else None     # struct ucred: pid, uid, gid
    assert sender_pid == proc.pid, f"sd_notify came from pid {sender_pid}, not the main pid {proc.pid}"
    first, after_reload = (set(m.decode().splitlines()) for m in (data, reloaded))
    assert {"READY=1", "WATCHDOG=1"} <= first, data
    assert "WATCHDOG=1" in after_reload and "READY=1" not in after_reload, reloaded
    assert proc.returncode == 0, stderr[-3000:]


# --- the build -----------------------------------------------------------------------------------------

def test_carries_exactly_the_lock(pyz):
    """Every wheel is a pin from requirements.lock (nothing resolved beside it), every unconditional
    pin is there, and each target Python has its own cffi."""
    lock = set()
    unconditional = set()
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        pin, _, marker = spec.partition(";")
        name, _, version = pin.strip().partition("==")
        lock.add((canonical(name), version.strip()))
        if not marker.strip():
            unconditional.add((canonical(name), version.strip()))
    wheels = distributions(pyz)
    carried = {(canonical(w.split("-")[0]), w.split("-")[1]) for w in wheels}
    assert carried <= lock, f"not pinned in requirements.lock: {sorted(carried - lock)}"
    assert unconditional <= carried, f"missing from the .pyz: {sorted(unconditional - carried)}"
    for v in PYTHONS:
        tag = "cp" + v.replace(".", "")
        assert any(w.startswith("cffi-") and f"-{tag}-{tag}-" in w for w in wheels), (v, sorted(wheels))


def test_build_is_reproducible(pyz, tmp_path):
    again = tmp_path / PYZ_NAME
    build(again)
    assert distributions(again) == distributions(pyz)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (pyz, again)]
    assert digest[0] == digest[1], "same distributions, but the .pyz bytes differ"


# --- the systemd unit ----------------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_what_the_spec_asks():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["DynamicUser"] == ["yes"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["69 78"]
    assert s["CacheDirectory"] == ["haproxy-azure-discovery"]
    assert "PEX_ROOT=%C/haproxy-azure-discovery" in s["Environment"]
    assert any(v.startswith("-/etc/haproxy-azure-discovery/") for v in s["EnvironmentFile"])
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert re.match(r"/usr/bin/python3 \S+/haproxy-azure-discovery\.pyz( |$)", s["ExecStart"][0])
    assert "WatchdogSec" in s


def test_unit_security_exposure():
    analyze = need_systemd_analyze()
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    print(f"\n{UNIT.name}: exposure {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_verifies(tmp_path):
    analyze = need_systemd_analyze()
    text = UNIT.read_text()
    if not os.access("/usr/bin/python3", os.X_OK):   # verify checks that ExecStart's binary exists
        text = text.replace("ExecStart=/usr/bin/python3 ", f"ExecStart={sys.executable} ")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
