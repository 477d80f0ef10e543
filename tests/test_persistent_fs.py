"""A file-system developer's persistent cluster: three Debian VMs through a real libvirtd,
each with a formatted scratch disk mounted at /data, all attached to one shared disk.

The cluster is made once for the module; the tests then write on it, shut it
down, start it again and look: the data disks keep their content, the VMs
their addresses and ssh host keys (ssh checks them against the recorded ones).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_root
from tests.support_images import require_image
from tests.support_libvirt import running_libvirtd, virsh
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
        (user.home / ".vcluster" / "templates.yaml").write_text(TEMPLATE)
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
            assert f"vc-root-{NAME}-" not in virsh("list", "--all", "--name")


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


def test_shutdown_and_start_keep_the_disks_addresses_and_host_keys(fs: LocalUser) -> None:
    run_in(fs, "vm1", "--", "sh", "-c", "echo kept-across-a-restart > /data/keep && sync")
    before = fs.run("cluster", "show", NAME).stdout
    down = fs.run("cluster", "shutdown", NAME, "--timeout", "300", timeout=360)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "vm0: shut off" in down.stderr and "vm2: shut off" in down.stderr
    assert virsh("list", "--name").count(f"vc-root-{NAME}-") == 0
    up = fs.run("cluster", "start", NAME, "--timeout", "900", timeout=960)
    assert up.returncode == 0, up.stdout + up.stderr
    after = fs.run("cluster", "show", NAME).stdout
    assert after == before, (before, after)  # same VMs, addresses and disks, running again
    kept = run_in(fs, "vm1", "--", "cat", "/data/keep")
    assert kept.strip() == "kept-across-a-restart"
    # ssh checks each VM's host key against the one recorded at create: the same keys
    for vm in ("vm0", "vm1", "vm2"):
        ssh = fs.run("ssh", "-C", NAME, vm, "--", "hostname")
        assert (ssh.returncode, ssh.stdout.strip()) == (0, vm), ssh.stderr
