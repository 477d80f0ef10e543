"""Cluster plans: templates + images + networks resolved before anything is submitted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import write_tree
from vcluster.cluster import ClusterPlan, ClusterSpec, Readiness, mac_address, plan_cluster
from vcluster.config.loader import load_config
from vcluster.errors import InputError
from vcluster.images.repo import ImageInfo, Repository
from vcluster.launch.submit import _has_option, split_definition
from vcluster.store.records import from_json, to_json


def fake_repo(root: Path) -> Path:
    """An image repository with a tiny (initramfs) and a disk image (files empty)."""
    repo = Repository(root)
    for name, kind, files, append in (
            ("tiny", "initramfs", {"kernel": "vmlinuz", "initramfs": "initramfs.img"},
             "console=ttyS0"),
            ("deb", "disk", {"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"},
             "")):
        with repo.staging(name) as staging:
            for f in files.values():
                (staging / f).write_text("")
            repo.commit(staging, ImageInfo(name=name, kind=kind, files=files, append=append))
    return root


CONF = {
    "etc/networks.yaml": "cluster:\n  type: private\n  subnet: 10.9.0.0/29\n  mtu: 1400\n",
    "etc/resources.yaml": "default:\n  networks: [cluster]\n  fam: {max-size: 1G, "
                          "default-size: 128M}\n",
    "etc/templates.yaml": ("tiny:\n  image: tiny\n  memory: 256M\n  fam: {name: f}\n"
                           "deb:\n  image: deb\n  vcpus: 2\n  user-data: {packages: [fio]}\n"
                           "gone:\n  image: nosuch@3\n"),
}


def plan(tmp_path: Path, definition: str, **kw: int) -> ClusterPlan:
    write_tree(tmp_path, CONF)
    config = load_config(tmp_path / "etc", tmp_path / "home")
    return plan_cluster(config, definition, repos=[fake_repo(tmp_path / "images")], **kw)


def test_plan_resolves_images_addresses_and_fam(tmp_path: Path) -> None:
    p = plan(tmp_path, "tiny:2,deb", cpus_per_task=3)
    tiny, _, deb = p.vms
    assert [vm.name for vm in p.vms] == ["vm0", "vm1", "vm2"]
    assert tiny.boot.kind == "initramfs" and tiny.boot.readiness is Readiness.TINY_INIT
    assert tiny.boot.initrd == tmp_path / "images/tiny/0/initramfs.img"
    assert tiny.boot.disk is None and tiny.boot.image == "tiny@0"
    assert deb.boot.disk == tmp_path / "images/deb/0/disk.qcow2"
    assert deb.boot.readiness is Readiness.FINAL_MESSAGE
    assert deb.boot.append == "root=/dev/vda rw console=ttyS0"
    assert tiny.vcpus == 3 and deb.vcpus == 2  # SLURM's -c unless the template says
    assert tiny.fam is not None and (tiny.fam.name, tiny.fam.size) == ("f", 128 << 20)
    assert [vm.nics[0].address for vm in p.vms] == ["10.9.0.1/29", "10.9.0.2/29", "10.9.0.3/29"]
    assert deb.nics[0].mtu == 1400
    assert deb.user_data == "#cloud-config\npackages:\n- fio\n"
    assert p.hosts() == [("10.9.0.1", "vm0"), ("10.9.0.2", "vm1"), ("10.9.0.3", "vm2")]


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = ClusterSpec("42", "vcluster", "alice", 1000, 1.5, "ssh-ed25519 AAAA x",
                       plan(tmp_path, "tiny,deb:2"), vnis={"cluster": 4096})
    assert from_json(ClusterSpec, to_json(spec)) == spec
    # A spec written before VNIs were recorded still reads, with none.
    older = json.loads(to_json(spec))
    del older["vnis"]
    assert from_json(ClusterSpec, json.dumps(older)).vnis == {}


def test_the_private_networks_are_those_that_need_a_vni(tmp_path: Path) -> None:
    assert plan(tmp_path, "tiny,deb").private_networks() == ["cluster"]
    bare = plan(tmp_path, "tiny")
    assert dataclasses.replace(bare, vms=()).private_networks() == []


def test_missing_image_is_refused_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        plan(tmp_path, "tiny,gone")
    assert str(e.value) == (
        f"{tmp_path}/etc/templates.yaml:10: gone.image: image 'nosuch@3' not found in "
        f"{tmp_path}/images (images there: deb, tiny); build one with: vcluster image build "
        "RECIPE")
    assert e.value.exit_code == 2


def test_cluster_larger_than_its_subnet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        plan(tmp_path, "tiny:7")
    assert "has room for 6 VMs, not 7" in str(e.value)


def test_macs_are_local_unicast_and_distinct() -> None:
    macs = {mac_address("1234", vm, nic) for vm in range(300) for nic in range(3)}
    assert len(macs) == 900
    first = int(mac_address("1", 0, 0).split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


@pytest.mark.parametrize(("args", "options", "definition"), [
    (["tiny:2"], [], "tiny:2"),
    (["-p", "debug", "--mem=2G", "-t", "10", "tiny:2,deb"], ["-p", "debug", "--mem=2G", "-t",
                                                             "10"], "tiny:2,deb"),
])
def test_alloc_arguments_split(args: list[str], options: list[str], definition: str) -> None:
    assert split_definition(args) == (options, definition)


@pytest.mark.parametrize("args", [[], ["-p", "debug", "--exclusive"]])
def test_alloc_without_definition_is_refused(args: list[str]) -> None:
    with pytest.raises(InputError, match="missing DEFINITION"):
        split_definition(args)


def test_job_name_option_detection() -> None:
    assert _has_option(["-J", "x"], "-J", "--job-name")
    assert _has_option(["-Jx"], "-J", "--job-name")
    assert _has_option(["--job-name=x"], "-J", "--job-name")
    assert not _has_option(["--jobs=3", "-p", "x"], "-J", "--job-name")
