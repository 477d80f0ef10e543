"""Persistent clusters through a real libvirtd, started by the test (TESTBED.md): root's
clusters on ``qemu:///system``, the embedded default (no /etc/vcluster, the sqlite store).

One tiny-fam:2 cluster is made for the module: its VMs share their FAM region
through libvirt's ``<shmem>``, exec and ssh reach them with ``-C``, and remove
leaves no domain, network, file or store row, nor any image file with another
owner.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support_images import image_owners, require_image
from tests.support_libvirt import clear_stale, running_libvirtd, virsh
from tests.support_local import LocalUser, local_user
from vcluster.persistent.record import Phase, bridge_name
from vcluster.persistent.store import ClusterStore
from vcluster.store.keys import Keys
from vcluster.store.sqlite import SqliteStore

pytestmark = [pytest.mark.qemu, pytest.mark.images, pytest.mark.libvirt]

NAME = "famp"


@pytest.fixture(scope="module")
def root() -> Iterator[LocalUser]:
    require_root("root's persistent clusters are qemu:///system's")
    require_image("tiny")
    with running_libvirtd(), local_user("root") as user:
        for name in (NAME, "gone", "cut", "cp"):
            clear_stale("root", name, user.state)
        yield user


@pytest.fixture(scope="module")
def fam_cluster(root: LocalUser) -> Iterator[LocalUser]:
    before = image_owners()
    made = root.run("cluster", "create", NAME, "tiny-fam:2")
    assert made.returncode == 0, made.stdout + made.stderr
    try:
        started = root.run("cluster", "start", NAME, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "vm0: ready" in started.stderr and "vm1: ready" in started.stderr
        yield root
    finally:
        gone = root.run("cluster", "remove", "--force", NAME)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert image_owners() == before  # no image file changed owner or mode


def test_vm1_reads_what_vm0_wrote_in_the_fam_region_through_libvirt(
        fam_cluster: LocalUser) -> None:
    user = fam_cluster
    wrote = user.run("exec", "-C", NAME, "vm0", "--", "fam", "write", "8", "0x0c0ffee1")
    assert wrote.returncode == 0, wrote.stdout + wrote.stderr
    read = user.run("exec", "-C", NAME, "vm1", "--", "fam", "read", "8")
    assert read.returncode == 0, read.stdout + read.stderr
    print(f"vm1 read: {read.stdout.strip()}")
    assert read.stdout.strip().upper() == "0X0C0FFEE1"
    dumped = virsh("dumpxml", f"vc-root-{NAME}-vm1")
    assert "<shmem name='vcluster-root-famp-fam'>" in dumped, dumped
    assert "slot='0x04'" in dumped
    assert Path("/dev/shm/vcluster-root-famp-fam").exists()


def test_the_cluster_is_listed_shown_and_reached_by_ssh(fam_cluster: LocalUser) -> None:
    user = fam_cluster
    listed = user.run("cluster", "list")
    assert listed.returncode == 0 and NAME in listed.stdout and "tiny-fam:2" in listed.stdout
    shown = user.run("cluster", "show", NAME)
    assert shown.returncode == 0, shown.stderr
    assert "vm0\trunning" in shown.stdout and "vm1\trunning" in shown.stdout, shown.stdout
    assert "/dev/shm/vcluster-root-famp-fam" in shown.stdout
    ssh = user.run("ssh", "-C", NAME, "vm1", "--", "hostname")
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm1"), ssh.stderr
    ps = user.run("ps")
    assert NAME in ps.stdout and "persistent" in ps.stdout, ps.stdout
    log = user.run("console", "-C", NAME, "-l", "vm1")
    assert log.returncode == 0 and "vcluster-tiny: ready hostname=vm1" in log.stdout, log.stderr
    sent = user.home / "sent.txt"
    sent.write_text("copied to a persistent VM\n")
    copied = user.run("scp", "-C", NAME, str(sent), "vm1:/tmp/sent.txt")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    back = user.run("exec", "-C", NAME, "vm1", "--", "cat", "/tmp/sent.txt")
    assert back.stdout == "copied to a persistent VM\n", back.stdout + back.stderr


def test_what_cannot_be_done_is_one_line_and_changes_nothing(fam_cluster: LocalUser) -> None:
    user = fam_cluster
    again = user.run("cluster", "create", NAME, "tiny:1")
    assert again.returncode != 0
    assert f"cluster {NAME} exists already" in again.stderr, again.stderr
    running = user.run("cluster", "remove", NAME)
    assert running.returncode != 0 and "--force" in running.stderr, running.stderr
    assert f"vc-root-{NAME}-vm0" in virsh("list", "--name")
    no_vm = user.run("cluster", "start", NAME, "vm7")
    assert no_vm.returncode != 0 and "there is no vm7" in no_vm.stderr, no_vm.stderr
    unknown = user.run("cluster", "show", "nope")
    assert unknown.returncode != 0 and "no persistent cluster 'nope'" in unknown.stderr
    down = user.run("cluster", "create", "other", "tiny:1", "--connect",
                    "qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert down.returncode != 0
    assert "cannot reach libvirtd" in down.stderr and "libvirtd -d" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "Traceback" not in again.stderr + running.stderr + down.stderr
    assert "vc-root-other" not in virsh("list", "--all", "--name")


def test_repair_puts_back_a_lost_store_and_a_lost_domain(fam_cluster: LocalUser) -> None:
    user = fam_cluster
    before = user.run("cluster", "show", NAME).stdout
    user.store.unlink()  # the whole store, as on a new machine
    assert NAME not in user.run("cluster", "list").stdout
    back = user.run("cluster", "repair", NAME)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"cluster {NAME}: back in your store from libvirt (2 VMs" in back.stderr, back.stderr
    assert user.run("cluster", "show", NAME).stdout == before
    ssh = user.run("ssh", "-C", NAME, "vm1", "--", "hostname")  # the key pair is back too
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm1"), ssh.stderr
    # libvirt loses vm1's domain: defined again from the store, on the same files
    assert user.run("cluster", "destroy", NAME, "vm1").returncode == 0
    virsh("undefine", f"vc-root-{NAME}-vm1")
    assert "missing in libvirt" in user.run("cluster", "show", NAME).stdout
    mended = user.run("cluster", "repair", NAME)
    assert mended.returncode == 0, mended.stdout + mended.stderr
    assert f"put back domain vc-root-{NAME}-vm1" in mended.stderr, mended.stderr
    started = user.run("cluster", "start", NAME, "vm1", timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    read = user.run("exec", "-C", NAME, "vm1", "--", "fam", "read", "8")
    assert read.stdout.strip().upper() == "0X0C0FFEE1", read.stdout + read.stderr
    again = user.run("cluster", "repair", NAME)
    assert "nothing to put back" in again.stderr, again.stderr
    lost = user.run("cluster", "repair", "nosuch")
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1, lost.stderr
    assert "no persistent cluster 'nosuch' in your store, nor a domain of it" in lost.stderr


def cut_short(user: LocalUser, name: str, phase: Phase) -> None:
    """The store as a create or remove killed midway leaves it: the record's phase."""
    with SqliteStore(user.store) as store:
        clusters = ClusterStore(store, Keys("/vcluster"), user.name)
        found = clusters.read(name)
        assert found is not None
        clusters.put_record(replace(found[1], phase=phase))


def test_a_create_or_remove_cut_short_is_finished_by_running_it_again(
        root: LocalUser) -> None:
    made = root.run("cluster", "create", "cut", "tiny:2")
    assert made.returncode == 0, made.stderr
    cut_short(root, "cut", Phase.CREATING)
    other = root.run("cluster", "create", "cut", "tiny:1")
    assert other.returncode == 2 and "cut short while being created from tiny:2" in \
        other.stderr, other.stderr
    again = root.run("cluster", "create", "cut", "tiny:2")
    assert again.returncode == 0, again.stderr
    assert "its creation was cut short; making it anew" in again.stderr
    assert "defined" in root.run("cluster", "list").stdout
    # a remove killed after its first domain: the same command takes the rest
    cut_short(root, "cut", Phase.REMOVING)
    virsh("undefine", "vc-root-cut-vm0")
    refused = root.run("cluster", "start", "cut")
    assert refused.returncode == 2 and "remove" in refused.stderr, refused.stderr
    gone = root.run("cluster", "remove", "cut")
    assert gone.returncode == 0, gone.stderr
    assert "vc-root-cut" not in virsh("list", "--all", "--name")
    assert "vc-root-cut" not in virsh("net-list", "--all", "--name")
    assert not (root.state / "work" / "cut").exists()
    assert "cut" not in root.run("cluster", "list").stdout


def test_copy_gives_a_vm_a_whole_disk_of_its_own(root: LocalUser) -> None:
    require_image("debian")
    made = root.run("cluster", "create", "--copy", "cp", "debian:1", timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    try:
        disk = root.state / "work" / "cp" / "vm0" / "root.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                          str(disk)], capture_output=True, text=True,
                                         check=True, timeout=60).stdout)
        assert "backing-filename" not in info, info  # no image revision under it
        assert str(disk) in root.run("cluster", "show", "cp").stdout
    finally:
        gone = root.run("cluster", "remove", "cp")
        assert gone.returncode == 0, gone.stderr


def test_remove_leaves_nothing_of_the_cluster(root: LocalUser) -> None:
    made = root.run("cluster", "create", "gone", "tiny-fam:2")
    assert made.returncode == 0, made.stderr
    started = root.run("cluster", "start", "gone", "vm0", timeout=300)
    assert started.returncode == 0, started.stderr
    workdir = root.state / "work" / "gone"
    assert workdir.is_dir()
    removed = root.run("cluster", "remove", "--force", "gone")
    assert removed.returncode == 0, removed.stderr
    print(removed.stderr)
    assert "vc-root-gone" not in virsh("list", "--all", "--name")
    assert "vc-root-gone" not in virsh("net-list", "--all", "--name")
    assert not workdir.exists()
    assert not any(p.name.startswith("vcluster-root-gone-") for p in Path("/dev/shm").iterdir())
    bridges = {bridge_name("root", "gone", n) for n in range(2)}
    assert not bridges & set(os.listdir("/sys/class/net"))
    listed = root.run("cluster", "list")
    assert "gone" not in listed.stdout
