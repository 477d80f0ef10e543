"""A session cluster's private networks: one ``vde_switch`` per network while its VMs run.

A normal user's libvirtd makes no networks, so a session cluster's private
network is a user-space switch on a unix socket directory of the user's (as
a rootless local cluster's): no root, no multicast, no address outside the
machine, nobody else's QEMU on it.  libvirt knows nothing of it: ``cluster
start`` starts the switch (daemonized, its pid in a file beside its socket)
before the first VM, ``shutdown`` and ``destroy`` stop it once no VM of the
cluster runs, ``remove`` stops it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from vcluster.errors import InputError, VclusterError
from vcluster.run import run

SWITCH = "vde_switch"
WAIT = 10.0  # seconds a switch gets to make its socket, or to end


def require() -> None:
    """InputError saying how to install the switch, if it is not."""
    if shutil.which(SWITCH) is None:
        raise InputError(f"{SWITCH} not found: a normal user's persistent cluster has its "
                         "private network on a user-space switch (install the vde2 package: "
                         "apt-get install vde2)")


def pidfile(sock: Path) -> Path:
    return sock.with_name(f"{sock.name}.pid")


def _pid(sock: Path) -> int | None:
    """The pid in ``sock``'s pid file, if that process is a live switch."""
    try:
        pid = int(pidfile(sock).read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == SWITCH and state != "Z" else None


def running(sock: Path) -> int | None:
    """The pid of the switch serving ``sock``, if one does."""
    pid = _pid(sock)
    return pid if pid is not None and (sock / "ctl").exists() else None


def ensure(sock: Path) -> None:
    """A switch on ``sock``, started if none runs (what a stopped one left is cleared)."""
    if running(sock) is not None:
        return
    stop(sock)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run([SWITCH, "--daemon", "--sock", str(sock), "--dirmode", "0700", "--mode", "0600",
         "--pidfile", str(pidfile(sock))], timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while running(sock) is None:
        if time.monotonic() > deadline:
            raise VclusterError(f"{SWITCH} --sock {sock} did not answer within {WAIT:g} s")
        time.sleep(0.02)


def stop(sock: Path) -> None:
    """Stop the switch on ``sock`` (if any) and remove its socket and pid file."""
    pid = _pid(sock)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT
        while _pid(sock) == pid and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid(sock) == pid:
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(sock, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        pidfile(sock).unlink()
