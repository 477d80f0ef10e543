"""The pure parts of save and of repositories: names, layers, destinations, locks, sweeping."""

from __future__ import annotations

import dataclasses
import fcntl
from pathlib import Path

import pytest

from tests.support_vm import disk_boot, vm_plan
from vcluster.cli.save import _destination, _disk
from vcluster.cluster import DiskPlan
from vcluster.config.templates import ImageRef
from vcluster.errors import ImageError, InputError
from vcluster.hostpaths import VmFiles
from vcluster.images.repo import Image, ImageInfo, Repository, resolve_image, split_repository
from vcluster.vm.save import SaveRequest, chain_depth, freeze_marker, thaw_if_abandoned


def revision(repo: Repository, name: str, parent: int | None = None) -> Image:
    with repo.staging(name) as staging:
        (staging / "disk.qcow2").write_bytes(b"")
        return repo.commit(staging, ImageInfo(name=name, kind="disk", parent=parent,
                                              files={"disk": "disk.qcow2"}))


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Repository, Repository]:
    user, site = Repository(tmp_path / "user"), Repository(tmp_path / "site")
    revision(site, "debian")
    revision(user, "debian")
    revision(user, "mine")
    return user, site


def test_a_repository_prefix_looks_in_that_repository_alone(
        repos: tuple[Repository, Repository]) -> None:
    user, site = repos
    roots = [user.root, site.root]
    assert resolve_image("debian", roots).repo == user.root  # the user's first
    assert resolve_image("site:debian", roots).repo == site.root
    assert resolve_image("user:mine@0", roots).repo == user.root
    with pytest.raises(ImageError, match="'mine' not found"):
        resolve_image("site:mine", roots)
    with pytest.raises(InputError, match="unknown repository 'nope'"):
        split_repository("nope:debian")
    assert split_repository("mine@2") == (None, "mine@2")


def test_templates_name_images_with_a_repository() -> None:
    assert str(ImageRef(name="mine", revision=2, repo="user")) == "user:mine@2"
    assert str(ImageRef(name="debian")) == "debian"


def test_a_save_is_a_layer_of_the_same_image_unless_full_or_too_deep(
        repos: tuple[Repository, Repository]) -> None:
    user, site = repos
    head = user.get("debian")
    assert head is not None
    for _ in range(3):
        head = revision(user, "debian", parent=head.info.revision)
    assert chain_depth(head) == 4
    request = SaveRequest("1", 0, head, user, "debian", False, True, "me", max_depth=16)
    assert request.layered
    assert not dataclasses.replace(request, full=True).layered
    assert not dataclasses.replace(request, max_depth=4).layered  # would be 5 deep: flattened
    assert not dataclasses.replace(request, name="other").layered
    assert not dataclasses.replace(request, dest=site).layered


def test_where_a_save_goes(tmp_path: Path) -> None:
    disk = tmp_path / "site" / "debian" / "2" / "disk.qcow2"
    data = tmp_path / "user" / "data" / "0" / "disk.qcow2"
    vm = vm_plan(0, dataclasses.replace(disk_boot(), disk=disk, repository=tmp_path / "site",
                                        image="debian@2"))
    vm = dataclasses.replace(vm, disks=(
        DiskPlan("scratch", 1 << 30, False),
        DiskPlan("data", None, False, "data@0", data, tmp_path / "user")))
    named = {"user": tmp_path / "user", "site": tmp_path / "site"}
    root = _disk(vm, "root", "5")
    assert (root.device, root.image) == ("disk0", "debian@2")
    assert _destination(None, root, named, "5") == (tmp_path / "site", "debian", False)
    assert _destination("mine", root, named, "5") == (tmp_path / "user", "mine", True)
    assert _destination("site:ci", root, named, "5") == (tmp_path / "site", "ci", True)
    for bad, problem in (("a/b", "'a/b' is not an image name"), ("..", "'..' is not"),
                         ("my image", "'my image' is not"), ("x:y", "unknown repository 'x'")):
        with pytest.raises(InputError, match=problem):
            _destination(bad, root, named, "5")
    # the template's disks: after the root disk, in order; a data disk from an image
    assert _disk(vm, "scratch", "5").device == "disk1"
    assert _destination(None, _disk(vm, "data", "5"), named, "5") == (
        tmp_path / "user", "data", False)
    with pytest.raises(InputError, match="disk 'scratch' of vm0 of job 5 started empty, not "
                                         "from an image repository: save it as an image with "
                                         "-d user:NAME"):
        _destination(None, _disk(vm, "scratch", "5"), named, "5")
    with pytest.raises(InputError, match=r"-i nope: vm0 of job 5 has no disk 'nope' \(its "
                                         r"disks: root, scratch, data\)"):
        _disk(vm, "nope", "5")
    tiny = dataclasses.replace(vm, boot=dataclasses.replace(disk_boot(), kind="initramfs",
                                                           disk=None))
    assert _disk(tiny, "scratch", "5").device == "disk0"  # no root disk before it
    with pytest.raises(InputError, match="a kernel and initramfs image: it has no disk"):
        _disk(tiny, "root", "5")
    from_file = vm_plan(0, dataclasses.replace(disk_boot(), disk=disk, repository=None,
                                               image=str(disk)))
    with pytest.raises(InputError, match=r"was started from the file .*, not from an image "
                                         r"repository: save it as an image with -d user:NAME"):
        _destination(None, _disk(from_file, "root", "5"), named, "5")


def test_the_runner_thaws_only_a_guest_whose_save_died(tmp_path: Path) -> None:
    files = VmFiles(tmp_path)
    assert not thaw_if_abandoned(files)  # nothing frozen
    freeze_marker(files).touch()
    with open(files.save_lock, "a") as held:  # a save that is alive holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not thaw_if_abandoned(files)
        assert freeze_marker(files).exists()
    # its save died: thawed (here there is no guest agent to ask: a warning) and forgotten
    assert thaw_if_abandoned(files)
    assert not freeze_marker(files).exists()


def test_sweeping_removes_only_dead_staging_directories(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    with repo.staging("live") as live:
        dead = tmp_path / "repo" / ".build-dead-x"
        dead.mkdir()
        (dead / ".lock").write_text("")  # nobody holds it
        half = tmp_path / "repo" / ".build-half-y"
        half.mkdir()  # killed before its lock file was made
        assert sorted(p.name for p in repo.sweep()) == [".build-dead-x", ".build-half-y"]
        assert live.exists()
    assert not live.exists()


def test_a_vm_of_an_image_you_cannot_write_is_told_to_use_d(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal comes before anything is asked of the VM's host (here there is none)."""
    from click.testing import CliRunner

    from tests.support_vm import cluster_spec
    from vcluster.cli.main import cli
    from vcluster.identity import user_name
    from vcluster.lifecycle import VmState
    from vcluster.store.keys import Keys
    from vcluster.store.memory import MemoryStore
    from vcluster.store.records import VmRecord, to_json

    site = tmp_path / "site"
    disk = site / "debian" / "2" / "disk.qcow2"
    boot = dataclasses.replace(disk_boot(), disk=disk, repository=site, image="debian@2")
    keys, me, store = Keys("/vcluster"), user_name(), MemoryStore()
    store.put(keys.cluster_spec(me, "12"), to_json(cluster_spec("12", [vm_plan(0, boot)],
                                                                user=me)))
    store.put(keys.vm(me, "12", 0), to_json(VmRecord(VmState.READY, host="h1")))
    monkeypatch.setattr("vcluster.cli.clusters.with_store", lambda ctx: (store, keys, me))
    monkeypatch.setattr("vcluster.cli.common.writable", lambda root: root != site)
    result = CliRunner().invoke(cli, ["save", "-j", "12", "vm0"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"vcluster: error: vm0's image debian@2 is in the repository {site}, which you "
        "cannot write: save it as an image of your own with -d user:NAME"]
    result = CliRunner().invoke(cli, ["save", "-j", "12", "vm9"])
    assert result.exit_code == 2 and "'vm9': no such VM in job 12" in result.output


def test_the_depth_limit_is_site_configuration(tmp_path: Path) -> None:
    from vcluster.config.batch import parse_batch
    from vcluster.errors import ConfigError
    from vcluster.schema.source import load_yaml

    path = tmp_path / "batch.yaml"
    path.write_text("images:\n  max-depth: 4\n")
    assert parse_batch(load_yaml(path), path).images.max_depth == 4
    path.write_text("images:\n  max-depth: 0\n")
    with pytest.raises(ConfigError, match="max-depth"):
        parse_batch(load_yaml(path), path)
    path.write_text("qemu:\n  accel: tcg\n")
    assert parse_batch(load_yaml(path), path).images.max_depth == 16


def test_a_templates_disk_needs_a_size_or_an_image(tmp_path: Path) -> None:
    from vcluster.config.templates import parse_templates
    from vcluster.errors import ConfigError
    from vcluster.schema.source import load_yaml

    path = tmp_path / "templates.yaml"
    path.write_text("a:\n  image: debian\n  disks: [{name: data, image: user:data@2}, "
                    "{size: 1G}]\n")
    raw = parse_templates(load_yaml(path), path, "user")
    disks = raw["a"].values["disks"]
    assert [(d.name, d.size, str(d.image) if d.image else None) for d in disks] == [
        ("data", None, "user:data@2"), ("disk1", 1 << 30, None)]
    path.write_text("a:\n  image: debian\n  disks: [{name: data}]\n")
    with pytest.raises(ConfigError, match="size"):
        parse_templates(load_yaml(path), path, "user")
