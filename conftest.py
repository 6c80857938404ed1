"""Shared fixtures: the test bed of testing/ (fake Resource Manager, Data Plane emulator)."""
import os
import socket
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testing"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    """predicate()'s first true value within `timeout` seconds, else an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log_lines(path) -> list[str]:
    """The whole lines of a log a running process appends to: the line it is writing as we read may
    come in part (a write across a page boundary shows its first page first), and waits for the
    next read."""
    with open(path) as f:
        text = f.read()
    return text[:text.rfind("\n") + 1].splitlines()


def connections_to(*ports: int) -> int:
    """This process's open TCP connections to one of these loopback ports (the client side of a
    connection to a fake), once their number stops changing (at most 3 s): the fakes serve from
    threads of this process and close their side a moment after the client did. The fakes' own
    side, and sockets of anything else, are not counted."""
    count, deadline = _connections_to(ports), time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.1)
        count, before = _connections_to(ports), count
        if count == before:
            break
    return count


def _connections_to(ports) -> int:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                count += remote_port in ports and fields[9] in inodes
    return count


def one_cycle(cfg, source, dp, state, stop, clocks=None):
    """run_cycle() for one target (its name: haproxy.base_url), as the daemon runs a cycle with one
    target; its failure raises."""
    import haproxy_azure_discovery as m
    (report,) = m.run_cycle(source, [m.TargetRun(cfg.haproxy.base_url, cfg, dp, state)], stop,
                            clocks=clocks or m.Clocks())
    if report.failure is not None:
        raise report.failure
    return report


def steps(daemon, cycles: int, between=lambda delay: None, stop=None) -> list[float]:
    """Drive `daemon` as its loop does, `cycles` steps at most (fewer if a shutdown cuts one
    short), with `between(delay)` run where the loop would sleep; the sleeps asked for between
    cycles. The daemon is closed after."""
    import haproxy_azure_discovery as m
    stop, delays = stop or m.Flag(), []
    try:
        for n in range(cycles):
            delay = daemon.step(stop)
            if delay is None:
                break
            if n < cycles - 1:
                delays.append(delay)
                between(delay)
    finally:
        daemon.close()
    return delays


@pytest.fixture(autouse=True)
def clients_closed_after_the_test(monkeypatch):
    """Every Data Plane client and Azure source a test builds is closed when the test ends. The
    program closes its own (a reload, a one-shot command's end: tested); tests that build them by
    hand would leave their connections open in this process, ~1,500 sockets over the suite, more
    than a soft limit of 1,024 open files allows."""
    import haproxy_azure_discovery as m
    built = []
    for cls in (m.DataPlane, m.AzureSource):
        def init(self, *args, _init=cls.__init__, **kwargs):
            _init(self, *args, **kwargs)
            built.append(self)
        monkeypatch.setattr(cls, "__init__", init)
    yield
    for client in built:
        client.close()


def azure_env(monkeypatch, fake=None) -> None:
    """Clear every variable that could steer the Azure SDK's credentials; with a fake of
    Resource Manager, set the ones that make DefaultAzureCredential ask it for tokens."""
    for key in list(os.environ):
        if key.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            monkeypatch.delenv(key)
    for key, value in (fake.env() if fake is not None else {}).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def arm(monkeypatch):
    """A running fake of Azure Resource Manager (empty estate), and an environment in
    which the real DefaultAzureCredential gets its token from it."""
    from fake_arm import FakeArm
    with FakeArm(page_size=100) as fake:
        azure_env(monkeypatch, fake)
        yield fake


class ArmConfig:
    """Configurations pointing at one fake of Resource Manager: `raw(**sections)` the dict,
    calling it the parsed Config. Each keyword is a section merged one level deep over the
    defaults (subscription DEFAULT_SUBSCRIPTION, the fake's URL, 1 retry, a 5 s timeout, a
    Data Plane API password), so `azure={"source": "resource_graph"}` keeps the other azure keys."""

    def __init__(self, fake):
        self.fake = fake

    def raw(self, **sections) -> dict:
        from fake_arm import DEFAULT_SUBSCRIPTION
        raw = {"azure": {"subscription_id": DEFAULT_SUBSCRIPTION, "resource_manager_url": self.fake.url,
                         "retries": 1, "timeout": 5},
               "haproxy": {"password": "pw"}}
        for name, values in sections.items():
            base = raw.get(name)
            raw[name] = {**base, **values} if isinstance(base, dict) and isinstance(values, dict) else values
        return raw

    def __call__(self, **sections):
        import haproxy_azure_discovery as m
        return m.parse_config(self.raw(**sections), {})


@pytest.fixture
def arm_config(arm):
    """Configurations pointing at `arm`: arm_config(**sections) -> Config, arm_config.raw(**sections)
    -> dict (see ArmConfig)."""
    return ArmConfig(arm)


# The emulator reloads on dataplaneapi's ticker; 5 s there, shortened (never to 0) in tests.
RELOAD_DELAY = 0.05
# Every dataplaneapi release the emulator plays, and the two the bulk of the tests run against
# (the v2 API of 2.9, and the newest v3).
PERSONALITIES = ("2.9", "3.0", "3.2", "3.3.6", "3.4")


def _emulator(personality: str):
    from fake_dataplane import FakeDataPlane
    with FakeDataPlane(personality=personality, reload_delay=RELOAD_DELAY) as fake:
        yield fake
        assert fake.violations == [], fake.violations
        assert fake.errors == [], fake.errors
        assert fake.check_failures == 0, fake.last_check_output


@pytest.fixture(params=["2.9", "3.4"])
def dataplane(request):
    """A Data Plane API emulator (dataplaneapi 2.9: v2, and 3.4: v3) that checks every body
    against the official specification and every committed configuration with the real
    `haproxy -c`, and reloads on a (short) ticker."""
    yield from _emulator(request.param)


@pytest.fixture(params=PERSONALITIES)
def any_dataplane(request):
    """The emulator as each dataplaneapi release it plays (see fake_dataplane.PERSONALITIES)."""
    yield from _emulator(request.param)


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """haproxy-azure-discovery.pyz, built once per test session by build_pyz.sh."""
    import time
    from pathlib import Path
    from test_packaging import PYZ_NAME, build
    out = Path(tmp_path_factory.mktemp("build")) / PYZ_NAME
    started = time.monotonic()
    result = build(out)
    print(f"\nbuild_pyz.sh: {time.monotonic() - started:.1f} s; {result.stdout.strip().splitlines()[-1]}")
    return out
