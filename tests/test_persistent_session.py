"""A normal user's persistent cluster on qemu:///session: the user's own libvirtd, which
libvirt starts for the user's first command (no root, no libvirt networks).

One tiny-fam:2 cluster: the VMs share their FAM region, reach each other on
the private network (a vde_switch of the user's, started by ``cluster
start``) and are reached by ssh through QEMU's user-mode NAT; a clone of vm1
is vm2, on the same switch; remove leaves nothing of it (no switch either).
The session's libvirtd and virtlogd are the test's, started as the user under
a subreaper that reaps the QEMUs they leave (see support_libvirt), and stopped
at the end.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support_agent import unix_users
from tests.support_images import require_image
from tests.support_libvirt import SessionOf, running_libvirtd
from tests.support_local import LocalUser, leftovers, local_user, qemus

pytestmark = [pytest.mark.qemu, pytest.mark.images, pytest.mark.libvirt]

DAVE = "vclt-dave"
NAME = "sp"


def live(uid: int, *programs: str) -> list[int]:
    """The user's live processes of ``programs`` (exited ones not reaped yet aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != uid:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm in programs and state != "Z":
            found.append(int(entry.name))
    return found


def session_daemons(uid: int) -> list[int]:
    return live(uid, "libvirtd", "virtlogd")


def switches(uid: int) -> list[int]:
    return live(uid, "vde_switch")


def virsh(user: LocalUser, *args: str) -> str:
    done = subprocess.run(["runuser", "-u", user.name, "--", "env", "-i",
                           f"HOME={user.home}", "LIBVIRT_AUTOSTART=0", "virsh", "-c",
                           "qemu:///session", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def dave() -> Iterator[LocalUser]:
    require_root("the test makes a unix user")
    require_image("tiny")
    with unix_users(DAVE), local_user(DAVE) as user:
        with running_libvirtd(SessionOf(DAVE, user.env())):
            try:
                made = user.run("cluster", "create", NAME, "tiny-fam:2")
                assert made.returncode == 0, made.stdout + made.stderr
                started = user.run("cluster", "start", NAME, timeout=300)
                assert started.returncode == 0, started.stdout + started.stderr
                yield user
            finally:
                user.run("cluster", "remove", "--force", NAME)
        assert session_daemons(user.uid) == []


def run_in(user: LocalUser, *args: str) -> str:
    done = user.run("exec", "-C", NAME, *args, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_a_users_cluster_shares_fam_and_a_network_on_the_session(dave: LocalUser) -> None:
    shown = dave.run("cluster", "show", NAME).stdout
    assert f"cluster {NAME}: tiny-fam:2, defined, qemu:///session" in shown, shown
    assert f"vc-{DAVE}-{NAME}-vm0" in virsh(dave, "list", "--name")
    assert session_daemons(dave.uid), "no libvirtd of the user's"
    run_in(dave, "vm0", "--", "fam", "write", "8", "0x0c0ffee3")
    assert run_in(dave, "vm1", "--", "fam", "read", "8").upper() == "0X0C0FFEE3"
    run_in(dave, "vm1", "--", "ping", "-c", "1", "-W", "10", "10.200.0.1")
    ssh = dave.run("ssh", "-C", NAME, "vm1", "--", "hostname")
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm1"), ssh.stderr
    qemu = qemus(dave.uid)
    assert len(qemu) == 2, qemu  # QEMU runs as the user
    assert switches(dave.uid), "no vde_switch of the user's"


def test_a_clone_joins_the_segment_and_remove_leaves_nothing(dave: LocalUser) -> None:
    down = dave.run("cluster", "destroy", NAME, "vm1")
    assert down.returncode == 0, down.stderr
    cloned = dave.run("cluster", "clone", NAME, "vm1", "vm2")
    assert cloned.returncode == 0, cloned.stdout + cloned.stderr
    up = dave.run("cluster", "start", NAME, "vm2", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert run_in(dave, "vm2", "--", "hostname") == "vm2"
    run_in(dave, "vm2", "--", "ping", "-c", "1", "-W", "10", "10.200.0.1")
    ssh = dave.run("ssh", "-C", NAME, "vm2", "--", "hostname")
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm2"), ssh.stderr
    gone = dave.run("cluster", "remove", "--force", NAME)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    print(gone.stderr)
    assert f"vc-{DAVE}-{NAME}" not in virsh(dave, "list", "--all", "--name")
    assert not any(p.name.startswith(f"vcluster-{DAVE}-{NAME}-")
                   for p in Path("/dev/shm").iterdir())
    assert leftovers(dave) == []
    assert switches(dave.uid) == []
