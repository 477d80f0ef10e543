"""The pure parts of ssh, scp and exec: arguments, VM lists, known hosts, ssh_config, summaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vcluster.cli.clusters import Cluster
from vcluster.cli.exec import parse_vms
from vcluster.cli.reach import (
    Target,
    check_reachable,
    known_hosts,
    split_ssh_args,
    ssh_config,
    write_access,
)
from vcluster.cluster import BootPlan, ClusterPlan, ClusterSpec, NicPlan, Readiness, VmPlan
from vcluster.errors import InputError, VclusterError
from vcluster.launch.vmexec import summary
from vcluster.lifecycle import VmState
from vcluster.store.records import SshEndpoint, VmRecord
from vcluster.vm.guestexec import as_user


def cluster(nat: bool = True) -> Cluster:
    boot = BootPlan(image="tiny@1", kind="initramfs", kernel=Path("/k"), initrd=Path("/i"),
                    disk=None, append="", readiness=Readiness.TINY_INIT, user="root")
    nics = (NicPlan("cluster", "private", 1450, "10.200.0.1/16", "virtio-net-pci"),) + (
        (NicPlan("nat", "nat", 1500, None, "virtio-net-pci"),) if nat else ())
    vms = tuple(VmPlan(index=i, template="tiny", vcpus=1, memory=1 << 28, boot=boot, nics=nics,
                       fam=None, disks=(), user_data=None, machine="q35", cpu_model=None,
                       qemu_args=()) for i in range(3))
    spec = ClusterSpec(job="12", name="vcluster", user="u", uid=1000, created=0.0,
                       ssh_public_key="ssh-ed25519 AAAA c",
                       plan=ClusterPlan("tiny:3", vms, "tcg", "qemu-system-x86_64"))
    records = {
        0: VmRecord(VmState.READY, host="h1", addresses=("10.200.0.1", "10.250.0.2"),
                    ssh=SshEndpoint("10.199.0.11", 20000), host_key="ssh-ed25519 AAAkey0"),
        1: VmRecord(VmState.READY, host="h2", ssh=SshEndpoint("10.199.0.12", 20003),
                    host_key="ssh-ed25519 AAAkey1"),
        2: VmRecord(VmState.PREPARING, host="h3"),
    }
    return Cluster(spec, records)


def test_ssh_arguments_split_at_the_vm() -> None:
    assert split_ssh_args(["vm1"]) == ([], Target(None, "vm1"), [])
    assert split_ssh_args(["-v", "-o", "ConnectTimeout=3", "debian@vm2", "uname", "-a"]) == \
        (["-v", "-o", "ConnectTimeout=3"], Target("debian", "vm2"), ["uname", "-a"])
    assert split_ssh_args(["-t", "--", "vm0", "-x"]) == (["-t"], Target(None, "vm0"), ["-x"])
    with pytest.raises(InputError, match=r"VM: 'h1' is not a VM \(expected \[USER@\]vmN"):
        split_ssh_args(["h1", "true"])
    with pytest.raises(InputError, match="VM: missing"):
        split_ssh_args(["-i", "key"])


def test_vm_lists() -> None:
    assert parse_vms("vm1", 4) == [1]
    assert parse_vms("vm0,vm2", 4) == [0, 2]
    assert parse_vms("vm[0-3]", 4) == [0, 1, 2, 3]
    assert parse_vms("vm[0-1,3],2", 4) == [0, 1, 3, 2]
    with pytest.raises(InputError, match=r"VMS: 'vm9': there is no vm9 \(expected VMs of this "
                                         r"cluster, vm0 to vm1"):
        parse_vms("vm9", 2)
    with pytest.raises(InputError, match="is not a VM or a range"):
        parse_vms("vmx", 2)


def test_the_summary_names_the_vms_that_failed() -> None:
    assert summary({0: 0, 1: 0}) is None
    assert summary({0: 0, 1: 7}) == "1 of 2 VMs failed: vm1 (exit 7)"
    assert summary({0: 1, 1: 1, 2: 1}) == \
        "every VM failed: vm0 (exit 1), vm1 (exit 1), vm2 (exit 1)"


def test_known_hosts_and_config_cover_the_vms_that_published_theirs(tmp_path: Path) -> None:
    c = cluster()
    assert known_hosts(c) == ("vcluster-12-vm0 ssh-ed25519 AAAkey0\n"
                              "vcluster-12-vm1 ssh-ed25519 AAAkey1\n")
    config = ssh_config(c, tmp_path / "k", tmp_path / "kh")
    assert "Host vm0\n  HostName 10.199.0.11\n  Port 20000\n  User root\n" \
           "  HostKeyAlias vcluster-12-vm0\n" in config
    assert "Host vm2" not in config
    assert "  StrictHostKeyChecking yes\n" in config
    assert "StrictHostKeyChecking no" not in config


def test_access_files_are_private(tmp_path: Path) -> None:
    access = write_access(tmp_path / "ssh", cluster(), "PRIVATE KEY\n")
    assert stat.S_IMODE(access.directory.stat().st_mode) == 0o700
    for path in (access.key, access.known_hosts, access.config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert access.key.read_text() == "PRIVATE KEY\n"
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(InputError, match="not a private directory of yours"):
        write_access(shared, cluster(), "k")


def test_unreachable_vms_say_why() -> None:
    with pytest.raises(VclusterError, match=r"vm2 of job 12 has no ssh port yet \(state: "
                                            "preparing"):
        check_reachable(cluster(), 2)
    with pytest.raises(VclusterError, match="vm2 of job 12 has no nat network, so no ssh port"):
        check_reachable(cluster(nat=False), 2)
    check_reachable(cluster(), 0)


def test_commands_run_as_a_user_through_su() -> None:
    assert as_user(None, ["id"]) == ["id"]
    assert as_user("root", ["id"]) == ["id"]
    assert as_user("debian", ["sh", "-c", "echo $HOME"]) == \
        ["su", "-s", "/bin/sh", "-c", "exec sh -c 'echo $HOME'", "debian"]


def test_the_status_line_is_found_after_output_without_a_newline() -> None:
    import io

    from vcluster.execwire import status_line
    from vcluster.launch.vmexec import relay

    out, got = io.BytesIO(), dict[int, int]()
    relay(io.BytesIO(b"one\nno newline" + status_line({"vm2": 0, "vm3": 4})), got, out)
    assert (out.getvalue(), got) == (b"one\nno newline", {2: 0, 3: 4})
