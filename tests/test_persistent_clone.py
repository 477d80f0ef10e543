"""A clone's plan (pure: no libvirt): the next VM, addresses of its own on each network,
refusals in one line.  The real clone, booted, is in test_persistent_fs.py."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import write_tree
from tests.test_cluster_plan import fake_repo
from vcluster.cluster import ClusterSpec, plan_cluster
from vcluster.config.loader import load_config
from vcluster.errors import InputError
from vcluster.persistent.clone import CLONING, _new_index, plan_clone
from vcluster.persistent.control import Cluster
from vcluster.persistent.record import PersistentRecord, PersistentVm, Phase

CONF = {
    "etc/networks.yaml": ("cluster:\n  type: private\n  subnet: 10.9.0.0/29\n  mtu: 1400\n"
                          "nat:\n  type: nat\n  subnet: 10.250.0.0/16\n  mtu: 1500\n"
                          "  ssh-ports: 20000-29999\n"),
    "etc/resources.yaml": "default:\n  networks: [nat, cluster]\n",
    "etc/templates.yaml": "deb:\n  image: deb\n",
}
NAT = ipaddress.IPv4Network("10.250.0.16/28")


def cluster(tmp_path: Path, count: int) -> Cluster:
    write_tree(tmp_path, CONF)
    config = load_config(tmp_path / "etc", tmp_path / "home")
    plan = plan_cluster(config, f"deb:{count}", repos=[fake_repo(tmp_path / "images")])
    spec = ClusterSpec("fs", "fs", "root", 0, 0.0, "ssh-ed25519 AAAA", plan, mode="persistent",
                       local=True)
    vms = tuple(PersistentVm(i, f"vc-root-fs-vm{i}", (f"10.250.0.{18 + i}", f"10.9.0.{1 + i}"),
                             f"10.250.0.{18 + i}", "ssh-ed25519 K") for i in range(count))
    record = PersistentRecord("fs", "qemu:///system", Phase.DEFINED, tmp_path / "work", vms,
                              {"nat": "vc-root-fs-nat", "cluster": "vc-root-fs-cluster"})
    return Cluster(spec, record)


def test_the_clone_is_the_next_vm_with_addresses_of_its_own(tmp_path: Path) -> None:
    c = cluster(tmp_path, 3)
    made = plan_clone(c.spec, c.record, 0, 3, NAT, "ssh-ed25519 NEW")
    assert made.vm.name == "vm3" and made.vm.template == c.spec.plan.vms[0].template
    assert [nic.address for nic in made.vm.nics] == [None, "10.9.0.4/29"]
    assert made.given[0].address == "10.250.0.21/28" and made.given[0].gateway == "10.250.0.17"
    assert made.pvm == PersistentVm(3, "vc-root-fs-vm3", ("10.250.0.21", "10.9.0.4"),
                                    "10.250.0.21", "ssh-ed25519 NEW")
    # from another VM, the same: a clone's numbers are its own, not its source's plus one
    assert plan_clone(c.spec, c.record, 2, 3, NAT, "k").pvm.addresses == made.pvm.addresses


def test_no_room_on_a_network_is_one_line(tmp_path: Path) -> None:
    c = cluster(tmp_path, 6)  # 10.9.0.0/29: room for six
    with pytest.raises(InputError, match=r"network 'cluster' \(10.9.0.0/29\) has no room for "
                                         r"vm6 \(expected a cluster made with a larger"):
        plan_clone(c.spec, c.record, 0, 6, NAT, "k")
    small = ipaddress.IPv4Network("10.250.0.0/29")  # .2 to .6: five VMs
    c = cluster(tmp_path, 5)
    with pytest.raises(InputError, match=r"NEWVM: the nat network of cluster fs \(10.250.0.0/29"
                                         r"\) has no room for vm5"):
        plan_clone(c.spec, c.record, 0, 5, small, "k")


def test_newvm_must_be_the_next_one(tmp_path: Path) -> None:
    c = cluster(tmp_path, 3)
    assert _new_index(c, "vm3") == (3, False)
    with pytest.raises(InputError, match=r"^NEWVM: vm1 exists already \(expected vm3: cluster "
                                         r"fs has vm0, vm1, vm2\)$"):
        _new_index(c, "vm1")
    with pytest.raises(InputError, match=r"^NEWVM: db1 is not the cluster's next VM"):
        _new_index(c, "db1")
    cut = replace(c, record=replace(c.record, extra={CLONING: "vm2"}))
    assert _new_index(cut, "vm2") == (2, True)  # carried on
    with pytest.raises(InputError, match=r"a clone of vm2 was cut short"):
        _new_index(cut, "vm3")
