#!/usr/bin/env python3
"""A real HAProxy in master-worker mode for the test bed, driven the way dataplaneapi drives it.

The Data Plane API emulator (testing/fake_dataplane.py, ``live=True`` or ``live=LiveHAProxy()``)
writes each new configuration to ``cfg_path``, reloads through the master CLI and sends
runtime commands to the stats socket; tests send real traffic through it. Tests that want
HAProxy's own word read it here: ``reload_count()`` (``show proc``), ``show_stat()``.

Usage in tests::

    from fake_dataplane import FakeDataPlane
    from live_haproxy import LiveHAProxy

    with FakeDataPlane(personality="3.2", reload_delay=0.05, base_config=base, live=LiveHAProxy()) as fake:
        ... fake.live.reload_count() ...

The binary is $FAKE_DATAPLANE_HAPROXY, or /usr/sbin/haproxy.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

HAPROXY_BIN = os.environ.get("FAKE_DATAPLANE_HAPROXY", "/usr/sbin/haproxy")


def _unix_command(path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command to an HAProxy CLI socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


_RUNTIME_OK = re.compile(r"^$|changed from|no need to change|New server registered", re.S)


class LiveHAProxy:
    """A real HAProxy in master-worker mode, driven the way dataplaneapi drives it.

    The emulator writes each new configuration to `cfg_path`, reloads through
    the master CLI (`reload`) and applies runtime-capable server changes on the
    stats socket. Everything lives in `workdir` (unix sockets, pid file, log).
    """

    def __init__(self, workdir: str | None = None, haproxy_bin: str = HAPROXY_BIN,
                 timeout: float = 10.0):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="fdp-live-")
        self.haproxy_bin = haproxy_bin
        self.timeout = timeout
        self.cfg_path = os.path.join(self.workdir, "haproxy.cfg")
        self.master_socket = os.path.join(self.workdir, "master.sock")
        self.stats_socket = os.path.join(self.workdir, "stats.sock")
        self.pid_file = os.path.join(self.workdir, "haproxy.pid")
        self.log_path = os.path.join(self.workdir, "haproxy.log")
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def global_lines(self) -> list[str]:
        """Lines for the global section: the admin stats socket that also hands over listeners."""
        return [f"stats socket {self.stats_socket} mode 600 level admin expose-fd listeners",
                "stats timeout 30s"]

    def write_config(self, text: str) -> None:
        tmp = self.cfg_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.cfg_path)

    def start(self, text: str) -> None:
        """Write `text` and start `haproxy -W -S master.sock -f cfg -p pidfile`."""
        self.write_config(text)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.haproxy_bin, "-W", "-S", self.master_socket, "-f", self.cfg_path,
                 "-p", self.pid_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)     # its own process group: stop() kills master and workers
        try:
            self._wait_for(lambda: self._worker_pid_if_ready(None) and self._master_answers(),
                           "HAProxy to start")
        except Exception:
            self.stop()
            raise

    def reload(self) -> tuple[bool, str]:
        """Reload through the master CLI and wait for the new worker: (succeeded, message)."""
        before = self.show_proc()
        try:
            _unix_command(self.master_socket, "reload", timeout=self.timeout)
        except OSError:
            pass                             # the master closes the CLI while it re-executes
        state = self._wait_for(lambda: self._reload_settled(before), "HAProxy to reload")
        if state["failed"] > before["failed"]:
            return False, "reload failed: " + self.log_tail(4)
        self._wait_for(lambda: self._worker_pid_if_ready(state["workers"][0]), "the new worker")
        return True, ""

    def runtime(self, command: str) -> tuple[bool, str]:
        """Run a stats-socket command: (looks successful, answer)."""
        try:
            answer = _unix_command(self.stats_socket, command, timeout=self.timeout).strip()
        except OSError as exc:
            return False, str(exc)
        return bool(_RUNTIME_OK.search(answer)), answer

    def show_stat(self) -> dict:
        """{(backend, server): {"scur": n, "status": "UP"...}} from `show stat` (CSV)."""
        _, answer = self.runtime("show stat")
        lines = answer.lstrip("# ").splitlines()
        if not lines:
            return {}
        head = lines[0].split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND") and row.get("scur", "").isdigit():
                out[(row["pxname"], row["svname"])] = {"scur": int(row["scur"]), "status": row.get("status", "")}
        return out

    def master(self, command: str) -> str:
        """Run a master CLI command (the master keeps the connection open, hence `; quit`)."""
        return _unix_command(self.master_socket, f"{command}; quit", timeout=self.timeout)

    def show_proc(self) -> dict:
        """Parse `show proc`: {"reloads": N, "failed": N, "workers": [current worker pids]}."""
        text = self.master("show proc")
        head = re.search(r"^\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", text, re.M)
        if not head:
            raise RuntimeError(f"unexpected `show proc` answer: {text!r}")
        section = text.split("# workers", 1)[1].split("#", 1)[0] if "# workers" in text else ""
        workers = [int(line.split()[0]) for line in section.splitlines() if line.strip()]
        return {"reloads": int(head.group(1)), "failed": int(head.group(2)), "workers": workers}

    def reload_count(self) -> int:
        """Reloads HAProxy's master reports in `show proc` (it counts failed ones too)."""
        return self.show_proc()["reloads"]

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the master and every worker (their process group), then reap them."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:                                   # workers orphaned by the master's death
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        """Stop, and remove the work directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _worker_pid_if_ready(self, wanted: int | None):
        """The pid answering on the stats socket, once it is `wanted` (or any, if None)."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("HAProxy exited:\n" + self.log_tail())
        try:
            info = _unix_command(self.stats_socket, "show info", timeout=1.0)
        except OSError:
            return None
        pid = re.search(r"^Pid: (\d+)", info, re.M)
        if pid and (wanted is None or int(pid.group(1)) == wanted):
            return int(pid.group(1))
        return None

    def _master_answers(self) -> bool:
        """The master CLI listens a moment after the first worker is up."""
        try:
            self.show_proc()
        except (OSError, RuntimeError):
            return False
        return True

    def _reload_settled(self, before: dict):
        try:
            state = self.show_proc()
        except (OSError, RuntimeError):
            return None
        if state["failed"] > before["failed"]:
            return state
        if state["reloads"] > before["reloads"] and state["workers"] \
                and state["workers"][0] not in before["workers"]:
            return state
        return None

    def _wait_for(self, probe, what: str):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            result = probe()
            if result:
                return result
            time.sleep(0.02)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.log_tail()}")
