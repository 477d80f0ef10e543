"""A file-system developer's persistent cluster: three Debian VMs through a real libvirtd,
each with a formatted scratch disk mounted at /data, all attached to one shared disk.

The cluster is made once for the module; the tests then write on it, shut it
down, clone vm0 to vm3 while it is down, start all four and look: the data
disks keep their content, the VMs their addresses and ssh host keys (ssh
checks them against the recorded ones), and vm3 has a hostname, addresses,
machine-id and host keys of its own, its own /data and the shared disk, and
reaches vm0 on the private network.  vm1's data disk is saved as an image
(its file read back from the revision), and remove then leaves nothing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support_images import image_owners, require_image
from tests.support_libvirt import clear_stale, running_libvirtd, virsh
from tests.support_local import LocalUser, local_user

pytestmark = [pytest.mark.qemu, pytest.mark.images, pytest.mark.libvirt]

NAME = "fs"
TEMPLATE = """\
fsdeb:
  inherits: debian
  description: Debian with a scratch disk at /data and a disk all the VMs share
  disks:
    - {name: data, size: 1G, format: ext4, mount: /data}
    - {name: shared, size: 64M, shared: true}
"""
SHARED = "/dev/disk/by-id/virtio-shared"


@pytest.fixture(scope="module")
def fs() -> Iterator[LocalUser]:
    require_root("root's persistent clusters are qemu:///system's")
    require_image("debian")
    with running_libvirtd(), local_user("root") as user:
        clear_stale("root", NAME, user.state)
        (user.home / ".vcluster" / "templates.yaml").write_text(TEMPLATE)
        before = image_owners()
        made = user.run("cluster", "create", NAME, "fsdeb:3")
        assert made.returncode == 0, made.stdout + made.stderr
        try:
            started = user.run("cluster", "start", NAME, "--timeout", "900", timeout=960)
            assert started.returncode == 0, started.stdout + started.stderr
            print(started.stderr)
            yield user
        finally:
            gone = user.run("cluster", "remove", "--force", NAME)
            assert gone.returncode == 0, gone.stdout + gone.stderr
            print(gone.stderr)
            assert f"vc-root-{NAME}-" not in virsh("list", "--all", "--name")
            assert f"vc-root-{NAME}-" not in virsh("net-list", "--all", "--name")
            assert not (user.state / "work" / NAME).exists()  # its disks and seeds
            assert not [p for p in Path("/dev/shm").iterdir()
                        if p.name.startswith(f"vcluster-root-{NAME}-")]
            assert image_owners() == before  # no image file changed owner or mode


def run_in(user: LocalUser, *args: str) -> str:
    done = user.run("exec", "-C", NAME, *args, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_vm_has_data_mounted_and_sees_the_shared_disk(fs: LocalUser) -> None:
    mounts = run_in(fs, "--all", "--", "findmnt", "-n", "-o", "FSTYPE", "/data")
    assert sorted(mounts.splitlines()) == ["vm0: ext4", "vm1: ext4", "vm2: ext4"], mounts
    run_in(fs, "vm0", "--", "sh", "-c",
           f"printf '%-4096s' 'written by vm0' | dd of={SHARED} bs=4096 count=1 oflag=direct")
    read = run_in(fs, "vm2", "--", "sh", "-c",
                  f"dd if={SHARED} bs=4096 count=1 iflag=direct 2>/dev/null | head -c 14")
    assert read == "written by vm0", read
    ssh = fs.run("ssh", "-C", NAME, "vm2", "--", "hostname")
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm2"), ssh.stderr
    dumped = virsh("dumpxml", f"vc-root-{NAME}-vm1")
    assert "<shareable/>" in dumped, dumped


@pytest.fixture(scope="module")
def restarted(fs: LocalUser) -> dict[str, str]:
    """The cluster shut down, vm0 cloned to vm3 meanwhile, and all four started: one boot
    of the three (and vm3's first) for the restart's checks and the clone's."""
    run_in(fs, "vm1", "--", "sh", "-c", "echo kept-across-a-restart > /data/keep && sync")
    outputs = {"before": fs.run("cluster", "show", NAME).stdout}
    down = fs.run("cluster", "shutdown", NAME, "--timeout", "300", timeout=360)
    assert down.returncode == 0, down.stdout + down.stderr
    outputs["down"] = down.stderr
    assert virsh("list", "--name").count(f"vc-root-{NAME}-") == 0
    cloned = fs.run("cluster", "clone", NAME, "vm0", "vm3")
    assert cloned.returncode == 0, cloned.stdout + cloned.stderr
    outputs["clone"] = cloned.stderr
    up = fs.run("cluster", "start", NAME, "--timeout", "900", timeout=960)
    assert up.returncode == 0, up.stdout + up.stderr
    outputs["up"] = up.stderr
    outputs["after"] = fs.run("cluster", "show", NAME).stdout
    return outputs


def test_shutdown_and_start_keep_the_disks_addresses_and_host_keys(
        fs: LocalUser, restarted: dict[str, str]) -> None:
    assert "vm0: shut off" in restarted["down"] and "vm2: shut off" in restarted["down"]
    before, after = restarted["before"].splitlines(), restarted["after"].splitlines()
    # the same VMs, addresses and disks, running again (and vm3 after them)
    assert after[:len(before)] == before, (before, after)
    kept = run_in(fs, "vm1", "--", "cat", "/data/keep")
    assert kept.strip() == "kept-across-a-restart"
    # ssh checks each VM's host key against the one recorded at create: the same keys
    for vm in ("vm0", "vm1", "vm2"):
        ssh = fs.run("ssh", "-C", NAME, vm, "--", "hostname")
        assert (ssh.returncode, ssh.stdout.strip()) == (0, vm), ssh.stderr


def test_a_clone_has_its_own_identity_and_joins_the_private_network(
        fs: LocalUser, restarted: dict[str, str]) -> None:
    print(restarted["clone"])
    assert "vm3 cloned from vm0" in restarted["clone"]
    assert "vm3: ready" in restarted["up"]
    line = next(x for x in restarted["after"].splitlines() if x.startswith("vm3\t"))
    private, nat = line.split("\t")[2].split(",")
    assert private == "10.200.0.4", line
    ident = ("hostname; cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub; echo; "
             "ip -4 -o addr")
    of = {vm: run_in(fs, vm, "--", "sh", "-c", ident) for vm in ("vm0", "vm3")}
    print(of)
    assert of["vm3"].splitlines()[0] == "vm3"
    assert f"inet {private}/16" in of["vm3"] and f"inet {nat}/" in of["vm3"]
    for n in (1, 2):  # machine-id, ssh host key: not vm0's
        assert of["vm3"].splitlines()[n] != of["vm0"].splitlines()[n], of
    # the machine-id is the one its domain gives systemd on the kernel's command line
    assert f"systemd.machine_id={of['vm3'].splitlines()[1]}" in virsh(
        "dumpxml", f"vc-root-{NAME}-vm3")
    # ssh checks vm3's host key against the new one the clone recorded
    ssh = fs.run("ssh", "-C", NAME, "vm3", "--", "hostname")
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "vm3"), ssh.stderr
    # on the private network both ways; its own /data, the cluster's shared disk
    run_in(fs, "vm3", "--", "ping", "-c", "1", "-W", "10", "10.200.0.1")
    run_in(fs, "vm0", "--", "ping", "-c", "1", "-W", "10", private)
    assert run_in(fs, "vm3", "--", "findmnt", "-n", "-o", "FSTYPE", "/data").strip() == "ext4"
    assert run_in(fs, "vm3", "--", "ls", "-A", "/data").split() == ["lost+found"]  # its own
    read = run_in(fs, "vm3", "--", "sh", "-c",
                  f"dd if={SHARED} bs=4096 count=1 iflag=direct 2>/dev/null | head -c 14")
    assert read == "written by vm0", read


def test_save_keeps_a_persistent_vms_data_disk_with_its_file(
        fs: LocalUser, restarted: dict[str, str], tmp_path: Path) -> None:
    saved = fs.run("save", "-C", NAME, "-i", "data", "-d", "user:fsdata", "vm1", timeout=600)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    image = fs.home / ".vcluster" / "images" / "fsdata" / "0"
    [disk] = [p for p in image.iterdir() if p.suffix == ".qcow2"]
    raw = tmp_path / "data.raw"  # the revision's file system, read off line by debugfs
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True,
                   timeout=300)
    read = subprocess.run(["debugfs", "-R", "cat /keep", str(raw)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert read.stdout.strip() == "kept-across-a-restart", read.stdout + read.stderr
