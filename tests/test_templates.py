"""Template inheritance across levels and provenance of every value."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_tree
from vcluster.config.loader import load_config
from vcluster.config.templates import Disk, Fam, ImageRef, UserData
from vcluster.errors import ConfigError, Origin

SYSTEM = {
    "etc/resources.yaml": "default:\n  networks: []\nbig:\n  networks: []\n"
                          "  fam: {max-size: 4G, default-size: 1G}\n",
    "etc/templates.yaml": (
        "base:\n"                      # 1
        "  description: the base\n"    # 2
        "  image: debian@3\n"          # 3
        "  memory: 2G\n"               # 4
        "  fam:\n"                     # 5
        "    size: 128M\n"             # 6
        "    name: shared\n"           # 7
        "  disks:\n"                   # 8
        "    - {size: 1G}\n"           # 9
        "    - {name: data, size: 10G, shared: true}\n"  # 10
    ),
    "etc/templates.d/extra.yaml": (
        "child:\n"                     # 1
        "  inherits: base\n"           # 2
        "  fam: {size: 2G}\n"          # 3
        "  resource-set: big\n"        # 4
        "  qemu-args: -device virtio-rng-pci\n"  # 5
    ),
}


def load(tmp_path: Path, extra: dict[str, str] | None = None) -> object:
    write_tree(tmp_path, {**SYSTEM, **(extra or {})})
    return load_config(tmp_path / "etc", tmp_path / "home")


def test_inheritance_and_provenance(tmp_path: Path) -> None:
    config = load_config(write_tree(tmp_path, SYSTEM) / "etc", tmp_path / "home")
    child = config.templates["child"]
    etc = tmp_path / "etc"
    assert child.inherits == ("base",)
    assert child.image == ImageRef(name="debian", revision=3)
    assert child.memory == 2 << 30
    # A child's field replaces the parent's whole: the region name falls back to the default.
    assert child.fam == Fam(size=2 << 30, name="fam")
    assert child.disks == (Disk("disk0", 1 << 30), Disk("data", 10 << 30, shared=True))
    assert child.qemu_args == ("-device", "virtio-rng-pci")
    assert child.origins["image"] == Origin(etc / "templates.yaml", 3)
    assert child.origins["memory"] == Origin(etc / "templates.yaml", 4)
    assert child.origins["fam"] == Origin(etc / "templates.d/extra.yaml", 3)
    assert child.origins["inherits"] == Origin(etc / "templates.d/extra.yaml", 2)
    assert "fam.name" not in child.origins
    assert child.origin == Origin(etc / "templates.d/extra.yaml", 1)
    assert "vcpus" not in child.origins  # a default has no origin


def test_user_template_shadows_and_extends_system(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir(parents=True)
    (tmp_path / "home/ud.yaml").write_text("#cloud-config\npackages: [fio]\n")
    config = load_config(write_tree(tmp_path, {**SYSTEM, "home/templates.yaml": (
        "base:\n  inherits: base\n  memory: 4G\n  user-data: ud.yaml\n"
        "mine:\n  inherits: child\n  user-data: {packages: [git]}\n")}) / "etc", tmp_path / "home")
    base = config.templates["base"]
    assert base.level == "user"
    assert base.memory == 4 << 30 and base.image == ImageRef(name="debian", revision=3)
    assert base.user_data == UserData(file=tmp_path / "home/ud.yaml")
    mine = config.templates["mine"]
    # child (system) inherits "base": at the system level that is the system base.
    assert mine.inherits == ("child", "base")
    assert mine.memory == 2 << 30
    assert mine.user_data == UserData(inline={"packages": ["git"]})
    assert mine.origins["user-data"] == Origin(tmp_path / "home/templates.yaml", 7)


def test_template_defined_twice_in_one_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, {"etc/templates.d/again.yaml": "base:\n  image: x\n"})
    assert str(e.value) == (
        f"{tmp_path}/etc/templates.d/again.yaml:1: base: template defined twice "
        f"(first at {tmp_path}/etc/templates.yaml:1) (expected one definition per template "
        "and level)")


@pytest.mark.parametrize(("text", "message"), [
    ("a:\n  image: bad@x\n", "a.image: 'bad@x' is not an image reference"),
    ("a:\n  disks: [{size: 1G}, {name: disk0, size: 2G}]\n",
     "a.disks[1].name: duplicate disk name 'disk0'"),
    ("a:\n  vcpus: 0\n", "a.vcpus: 0 is out of range"),
    ("a:\n  memory: 1M\n", "a.memory: 1M is too small"),
    ("a:\n  kernel: /no/such/vmlinuz\n", "a.kernel: '/no/such/vmlinuz': no such file"),
    ("a:\n  fam: 64M\n", "a.fam: '64M' is not a mapping"),
    ("a b:\n  image: x\n", "a b: is not a valid template name"),
])
def test_field_errors(tmp_path: Path, text: str, message: str) -> None:
    write_tree(tmp_path, {"etc/templates.yaml": text})
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "etc", tmp_path / "home")
    assert message in str(e.value)
    assert str(e.value).startswith(f"{tmp_path}/etc/templates.yaml:")


def test_a_disk_is_formatted_and_mounted_by_cloud_init_and_bad_words_are_refused(
        tmp_path: Path) -> None:
    from vcluster.config.templates import parse_templates
    from vcluster.errors import ConfigError
    from vcluster.schema.source import load_yaml
    from vcluster.vm.guest import disk_config

    path = tmp_path / "templates.yaml"
    path.write_text("a:\n  image: debian\n  disks:\n"
                    "    - {name: data, size: 1G, format: ext4, mount: /data}\n"
                    "    - {name: shared, size: 64M, shared: true}\n")
    disks = parse_templates(load_yaml(path), path, "user")["a"].values["disks"]
    assert [(d.name, d.format, d.mount, d.shared) for d in disks] == [
        ("data", "ext4", "/data", False), ("shared", None, None, True)]
    from vcluster.cluster import DiskPlan

    class Vm:  # the one field disk_config reads
        disks = (DiskPlan("data", 1 << 30, False, format="ext4", mount="/data"),
                 DiskPlan("shared", 64 << 20, True))

    assert disk_config(Vm()) == {  # type: ignore[arg-type]
        "fs_setup": [{"device": "/dev/disk/by-id/virtio-data", "filesystem": "ext4",
                      "label": "data", "partition": "none", "overwrite": False}],
        "mounts": [["/dev/disk/by-id/virtio-data", "/data", "ext4",
                    "defaults,nofail,x-systemd.device-timeout=0,x-systemd.before=cloud-final"
                    ".service,x-systemd.wanted-by=cloud-final.service", "0", "2"]]}
    bad = {"{name: d, size: 1G, format: ntfs}": r"format: 'ntfs' is not a file system",
           "{name: d, size: 1G, format: ext4, shared: true}": r"a shared disk is formatted",
           "{name: d, size: 1G, mount: data}": r"'data' is not an absolute path",
           "{name: d, size: 1G, mount: /data}": r"an empty disk has no file system",
           "{name: d, image: /x.qcow2, shared: true}": r"a shared disk is one empty raw"}
    for disk, message in bad.items():
        path.write_text(f"a:\n  image: debian\n  disks: [{disk}]\n")
        with pytest.raises(ConfigError, match=message) as e:
            parse_templates(load_yaml(path), path, "user")
        assert f"{path}:3" in str(e.value), e.value
