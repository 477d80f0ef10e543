"""libvirtd for the persistent clusters' tests: started by the test as ../shared/TESTBED.md
says (no systemd here: ``virtlogd`` and ``libvirtd`` run by hand), stopped by PID.

A libvirtd that answers already (a developer's, or systemd's) is used as it is
and left running.  One the test starts runs under ``helpers/reaper.py``,
which reaps its QEMUs once they exit (see there why pytest cannot).
``virsh`` lines are for looking, as a user would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

SOCKET = Path("/run/libvirt/libvirt-sock")
REAPER = Path(__file__).resolve().parent / "helpers" / "reaper.py"
# A new libvirtd probes QEMU's capabilities before it answers its first call: a few
# seconds alone, but it has taken over 30 s on a busy two-core machine.
START_TIMEOUT = 120.0
ASK_TIMEOUT = 30.0  # one "virsh version": one that takes longer counts as no answer yet


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.stdout + done.stderr


def answers() -> bool:
    if not SOCKET.exists():
        return False
    return _version("qemu:///system")


def _version(uri: str, **popen: Any) -> bool:
    """Whether ``virsh version`` on ``uri`` answers within ASK_TIMEOUT."""
    try:
        done = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True,
                              timeout=ASK_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
                              **popen)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@dataclass(frozen=True)
class SessionOf:
    """Whose qemu:///session to run: the user and the environment of their commands (its
    HOME decides where the session's sockets are)."""

    user: str
    env: Mapping[str, str]

    def answers(self) -> bool:
        return _version("qemu:///session", **self.popen_args())

    def popen_args(self) -> dict[str, Any]:
        """As the user, in their environment, where a client that finds no session daemon
        fails at once: by default it would start one of its own (``libvirtd --timeout=120``,
        daemonized), and the one the test starts would exit 1 on the taken pid file."""
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
                "env": {**self.env, "LIBVIRT_AUTOSTART": "0"}, "cwd": "/"}


@contextlib.contextmanager
def running_libvirtd(session: SessionOf | None = None) -> Iterator[None]:
    """libvirtd (and virtlogd, for the consoles' logs) until the block ends: the system's,
    or with ``session`` that user's session daemons, which libvirt would otherwise start
    itself for the user's first command, daemonized, out of the test's reach."""
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: .ci/run installs libvirt-daemon-system")
    if session is None and answers():
        yield
        return
    ready = answers if session is None else session.answers
    extra = {} if session is None else session.popen_args()
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    with contextlib.ExitStack() as logs:
        try:
            for daemon in ("virtlogd", "libvirtd"):
                out: IO[bytes] = logs.enter_context(tempfile.TemporaryFile())
                started.append((subprocess.Popen([sys.executable, str(REAPER), daemon],
                                                 stdin=subprocess.DEVNULL, stdout=out,
                                                 stderr=out, start_new_session=True, **extra),
                                out))
            deadline = time.monotonic() + START_TIMEOUT
            while not ready():
                for proc, log in started:
                    if proc.poll() is not None:
                        pytest.fail(f"{proc.args!r} exited with status {proc.returncode}; "
                                    f"its last lines:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"libvirtd did not answer within {START_TIMEOUT:g} s; its "
                                f"last lines:\n{_tail(started[-1][1])}")
                time.sleep(0.2)
            yield
        finally:
            for proc, _log in reversed(started):
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:  # the reaper and its daemon: one group
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _tail(log: IO[bytes], lines: int = 20) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


def clear_stale(user: str, cluster: str, state: Path) -> None:
    """What an earlier run of the same test left of its cluster ``cluster`` (a CI run killed
    midway): its domains, networks, directory and FAM files, so that this run starts clean.
    Only in CI (``CI=true``), whose machines are the tests' own; elsewhere such leftovers are
    a developer's to look at, and the test's create refuses them in one line."""
    if os.environ.get("CI") != "true":
        return
    prefix = f"vc-{user}-{cluster}-"
    for name in virsh("list", "--all", "--name").split():
        if name.startswith(prefix):
            virsh("destroy", name)
            virsh("undefine", name)
    for name in virsh("net-list", "--all", "--name").split():
        if name.startswith(prefix):
            virsh("net-destroy", name)
            virsh("net-undefine", name)
    shutil.rmtree(state / "work" / cluster, ignore_errors=True)
    for path in Path("/dev/shm").glob(f"vcluster-{user}-{cluster}-*"):
        path.unlink(missing_ok=True)
