"""A real sandbox (munge, etcd, slurmctld, N slurmd in namespaces) for tests.

Use the session-scoped ``sandbox`` fixture (import it into a test module or a
conftest: ``from tests.support_sandbox import sandbox``) for a 3-host sandbox
shared by the session, or ``running_sandbox(dir, hosts)`` for one of your own.
Both go through the real ``vcluster sandbox`` CLI and always tear down.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PR_SET_CHILD_SUBREAPER = 36


def vcluster(*args: str, timeout: float = 60,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``vcluster ARGS`` as a process, the way a user does."""
    return subprocess.run([sys.executable, "-m", "vcluster", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


def become_subreaper() -> None:
    """Adopt the sandbox's daemons when the CLI that started them exits.

    Their parent exits right after ``up``; where PID 1 does not reap orphans
    (as in some containers) they would stay zombies after ``down``. As their
    subreaper, the test process can reap them and check that they are gone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap(pids: Sequence[int], timeout: float = 5.0) -> None:
    """Collect those of ``pids`` that are (adopted) children of ours and have exited."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not ours, or reaped already
            if done:
                break
            time.sleep(0.02)


SANDBOX_PROGRAMS = {"slurmstepd", "slurmd", "slurmctld", "slurmscriptd", "munged", "etcd"}


def reap_adopted_zombies() -> None:
    """Collect exited sandbox programs (job steps too) that were handed to us as subreaper."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z" and int(fields[1]) == me and comm in SANDBOX_PROGRAMS:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


@dataclass
class Sandbox:
    """A running sandbox seen from a test."""

    directory: Path

    @property
    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "state.json").read_text())
        return data

    @property
    def id(self) -> str:
        return str(self.state["id"])

    @property
    def hosts(self) -> list[str]:
        return [h["name"] for h in self.state["hosts"]]

    def pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.state["processes"]]

    def conf(self, host: str | None = None) -> Path:
        """The vcluster configuration directory of the controller or ``host``."""
        return self.directory / "conf" / (host or "ctl")

    def run(self, argv: Sequence[str], host: str | None = None, user: str | None = None, *,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``vcluster sandbox run [--host H] [--user U] -- ARGV``; raises on failure if check."""
        options = ["--dir", str(self.directory)]
        if host:
            options += ["--host", host]
        if user:
            options += ["--user", user]
        proc = vcluster("sandbox", "run", *options, "--", *argv, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}) on "
                                 f"{host or 'ctl'}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> subprocess.CompletedProcess[str]:
        return vcluster("sandbox", "status", "--dir", str(self.directory))

    def restart_agent(self, host: str) -> int:
        """Kill the agent of ``host`` by PID and start it again; its new PID.

        Agents read their site policy (networks.yaml, resources.yaml) when they start.
        """
        from vcluster.sandbox import agents, state

        return agents.restart(state.require(self.directory), host).pid

    def script_log(self) -> list[str]:
        """Lines the prolog and epilog wrote (``<time> prolog job=J node=N uid=U ...``)."""
        path = self.directory / "log" / "prolog-epilog.log"
        return path.read_text().splitlines() if path.exists() else []


def up(directory: Path, hosts: int = 3) -> Sandbox:
    from tests.support_images import images_dir

    proc = vcluster("sandbox", "up", "--dir", str(directory), "--hosts", str(hosts),
                    "--images", str(images_dir()))
    if proc.returncode != 0:
        raise AssertionError(f"vcluster sandbox up failed:\n{proc.stdout}\n{proc.stderr}")
    return Sandbox(directory)


def down(directory: Path, pids: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    proc = vcluster("sandbox", "down", "--dir", str(directory))
    reap(pids)
    reap_adopted_zombies()
    return proc


@contextlib.contextmanager
def running_sandbox(directory: Path, hosts: int = 3) -> Iterator[Sandbox]:
    """A sandbox for the duration of the block, torn down even if the block fails."""
    from tests.conftest import require_root

    require_root("the sandbox makes namespaces and runs SLURM's daemons")
    become_subreaper()
    pids: list[int] = []
    try:
        box = up(directory, hosts)
        pids = box.pids()
        yield box
    finally:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            pids = pids or Sandbox(directory).pids()
        proc = down(directory, pids)
        if proc.returncode != 0:
            raise AssertionError(f"vcluster sandbox down failed:\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def sandbox_parent() -> Iterator[Path]:
    """A new directory for sandboxes (removed afterwards).

    Not under pytest's tmp_path: that is mode 700, and munged (like the
    sandbox's unprivileged users) needs every directory above its socket
    searchable by all.
    """
    parent = Path(tempfile.mkdtemp(prefix="vcluster-test-", dir="/var/tmp"))
    try:
        parent.chmod(0o755)
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """A 3-host sandbox shared by the whole session."""
    with sandbox_parent() as parent, running_sandbox(parent / "sb", hosts=3) as box:
        yield box


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A directory (not yet existing) for a sandbox of the test's own."""
    with sandbox_parent() as parent:
        yield parent / "sb"
