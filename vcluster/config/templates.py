"""Templates: what a VM is made of, read from templates.yaml and templates.d/.

Parsing happens in two steps.  ``parse_templates`` reads one file into
``RawTemplate``s, each field validated on its own and kept with the line it
came from.  ``resolve_templates`` then follows ``inherits`` chains (across the
system and user levels), refuses cycles and unknown parents, and builds frozen
``Template``s that remember, field by field, the file and line of each value.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcluster.errors import ConfigError, Origin
from vcluster.schema.fields import Section, describe
from vcluster.schema.source import Node

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_EXPECTED = "a name of letters, digits, '.', '_' or '-'"
IMAGE_EXPECTED = ("an image [REPO:]NAME[@REVISION] from an image repository (REPO: user or "
                  "site), or a path")

# Field names as written in YAML, in display order.
FIELDS = (
    "description", "inherits", "image", "resource-set", "user-data", "vcpus", "memory",
    "disks", "fam", "kernel", "initrd", "append", "machine", "cpu-model", "nic-model",
    "qemu-args",
)


REPOSITORIES = ("user", "site")  # the names of the image repositories, in lookup order


@dataclass(frozen=True)
class ImageRef:
    """``[repo:]name[@revision]`` in an image repository, or a ``path``."""

    name: str | None = None
    revision: int | None = None
    path: Path | None = None
    repo: str | None = None  # user or site; None: the user's first, then the site's

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        text = f"{self.repo}:{self.name}" if self.repo else str(self.name)
        return f"{text}@{self.revision}" if self.revision is not None else text


@dataclass(frozen=True)
class UserData:
    """Cloud-init user-data: an inline mapping or a file (read when the seed is made)."""

    inline: Mapping[str, Any] | None = None
    file: Path | None = None

    def __str__(self) -> str:
        return str(self.file) if self.file is not None else "(inline mapping)"


@dataclass(frozen=True)
class Disk:
    name: str
    size: int | None  # None: the size of its image's disk
    shared: bool = False
    image: ImageRef | None = None  # its first content (a layer over it); None: empty
    format: str | None = None  # a file system the guest makes on it at first boot
    mount: str | None = None  # where the guest mounts it


@dataclass(frozen=True)
class Fam:
    """A fabric-attached memory region; VMs naming the same region share it."""

    size: int | None  # None: the resource set's default size
    name: str = "fam"


@dataclass(frozen=True)
class RawTemplate:
    """One template as written in one file, before inheritance."""

    name: str
    origin: Origin
    level: str  # "system" or "user"
    values: Mapping[str, Any]
    origins: Mapping[str, Origin]


@dataclass(frozen=True)
class Template:
    """A resolved template; ``origins`` says where each set field came from."""

    name: str
    origin: Origin
    level: str
    description: str = ""
    inherits: tuple[str, ...] = ()  # the whole chain, nearest parent first
    image: ImageRef | None = None
    resource_set: str | None = None
    user_data: UserData | None = None
    vcpus: int | None = None  # None: SLURM's cpus per task
    memory: int = 1 << 30
    disks: tuple[Disk, ...] = ()
    fam: Fam | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    machine: str = "pc"
    cpu_model: str | None = None  # None: chosen by accelerator (host under KVM, qemu64 under TCG)
    nic_model: str = "virtio-net-pci"
    qemu_args: tuple[str, ...] = ()
    origins: Mapping[str, Origin] = field(default_factory=dict)


def _name(sec: Section, key: str) -> str | None:
    value = sec.string(key, expected=NAME_EXPECTED)
    if value is not None and not NAME_RE.match(value):
        raise sec.error(key, f"{value!r} is not a valid name", NAME_EXPECTED)
    return value


def _image(sec: Section, base: Path) -> ImageRef | None:
    text = sec.string("image", expected=IMAGE_EXPECTED)
    if text is None:
        return None
    if "/" in text or text.startswith(("~", ".")):
        path = Path(text).expanduser()
        return ImageRef(path=path if path.is_absolute() else base / path)
    repo, colon, rest = text.rpartition(":")
    name, sep, rev = rest.partition("@")
    if (not NAME_RE.match(name) or (sep and not rev.isdigit())
            or (colon and repo not in REPOSITORIES)):
        raise sec.error("image", f"{text!r} is not an image reference", IMAGE_EXPECTED)
    return ImageRef(name=name, revision=int(rev) if sep else None, repo=repo or None)


def _user_data(sec: Section, base: Path) -> UserData | None:
    expected = "a file name or an inline cloud-config mapping"
    node = sec.raw("user-data")
    if node is None:
        return None
    if node.is_mapping:
        return UserData(inline=node.plain())
    if not isinstance(node.value, str):
        raise sec.error("user-data", f"{describe(node.value)} is not user-data", expected)
    path = sec.file_path("user-data", base)
    assert path is not None
    if not path.is_file():
        raise sec.error("user-data", f"{node.value!r}: no such file", expected)
    return UserData(file=path)


DISK_FORMATS = ("ext4", "xfs")


def _disks(sec: Section, base: Path) -> tuple[Disk, ...]:
    expected = ("a list of mappings with size or image, and optionally name, shared, format "
                "and mount")
    node = sec.raw("disks")
    if node is None:
        return ()
    if not node.is_sequence:
        raise sec.error("disks", f"{describe(node.value)} is not a list", expected)
    disks: list[Disk] = []
    for i, item in enumerate(node.value):
        d = Section(item, f"{sec.path('disks')}[{i}]", expected)
        image = _image(d, base)
        shared = d.boolean("shared", False)
        fmt = d.string("format")
        if fmt is not None and fmt not in DISK_FORMATS:
            raise d.error("format", f"{fmt!r} is not a file system vcluster makes",
                          " or ".join(DISK_FORMATS))
        if fmt is not None and shared:
            raise d.error("format", "a shared disk is formatted by the cluster file system "
                          "that shares it (GFS2, OCFS2), not at boot",
                          "no format on a shared disk")
        if image is not None and shared:
            raise d.error("image", "a shared disk is one empty raw image the VMs write "
                          "together, not a layer over an image", "size and no image")
        mount = d.string("mount")
        if mount is not None and not mount.startswith("/"):
            raise d.error("mount", f"{mount!r} is not an absolute path", "a path such as /data")
        if mount is not None and fmt is None and image is None:
            raise d.error("mount", "an empty disk has no file system to mount",
                          "format: ext4 (or an image with a file system) with mount")
        disk = Disk(name=_name(d, "name") or f"disk{i}",
                    size=d.size("size", required=image is None), shared=shared, image=image,
                    format=fmt, mount=mount)
        d.done()
        if any(other.name == disk.name for other in disks):
            raise d.error("name", f"duplicate disk name {disk.name!r}", "distinct disk names")
        disks.append(disk)
    return tuple(disks)


def _fam(sec: Section) -> Fam | None:
    node = sec.raw("fam")
    if node is None:
        return None
    f = Section(node, sec.path("fam"), "a mapping with size and name")
    fam = Fam(size=f.size("size"), name=_name(f, "name") or "fam")
    f.done()
    return fam


def _path(sec: Section, key: str, base: Path) -> Path | None:
    path = sec.file_path(key, base)
    if path is not None and not path.is_file():
        raise sec.error(key, f"{str(sec.raw(key).value)!r}: no such file",  # type: ignore[union-attr]
                        "an existing file")
    return path


def _qemu_args(sec: Section) -> tuple[str, ...]:
    node = sec.raw("qemu-args")
    if node is not None and isinstance(node.value, str):
        try:
            return tuple(shlex.split(node.value))
        except ValueError as e:
            raise sec.error("qemu-args", f"cannot split {node.value!r}: {e}",
                            "a list of arguments") from e
    return sec.strings("qemu-args", expected="a list of QEMU arguments")


def _parse_one(name: str, origin: Origin, sec: Section, level: str, base: Path) -> RawTemplate:
    readers: dict[str, Any] = {
        "description": lambda: sec.string("description"),
        "inherits": lambda: _name(sec, "inherits"),
        "image": lambda: _image(sec, base),
        "resource-set": lambda: _name(sec, "resource-set"),
        "user-data": lambda: _user_data(sec, base),
        "vcpus": lambda: sec.integer("vcpus", minimum=1, maximum=1024),
        "memory": lambda: _memory(sec),
        "disks": lambda: _disks(sec, base),
        "fam": lambda: _fam(sec),
        "kernel": lambda: _path(sec, "kernel", base),
        "initrd": lambda: _path(sec, "initrd", base),
        "append": lambda: sec.string("append"),
        "machine": lambda: sec.string("machine"),
        "cpu-model": lambda: sec.string("cpu-model"),
        "nic-model": lambda: sec.string("nic-model"),
        "qemu-args": lambda: _qemu_args(sec),
    }
    sec.done(FIELDS)  # unknown keys first: a typo is the likeliest mistake
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for key in FIELDS:
        if sec.has(key):
            values[key] = readers[key]()
            origins[key] = sec.node.value[key].origin
            sub = sec.node.value[key]
            if sub.is_mapping:
                origins.update((f"{key}.{k}", o) for k, o, _ in sub.items())
    return RawTemplate(name, origin, level, values, origins)


def _memory(sec: Section) -> int | None:
    size = sec.size("memory")
    if size is not None and size < 16 << 20:
        raise sec.error("memory", f"{sec.raw('memory').value} is too small",  # type: ignore[union-attr]
                        "at least 16M")
    return size


def parse_templates(node: Node | None, path: Path, level: str) -> dict[str, RawTemplate]:
    """Read the templates of one file (``level`` is "system" or "user")."""
    if node is None:
        return {}
    top = Section(node, "", "a mapping of template names to templates")
    out: dict[str, RawTemplate] = {}
    for name in top.names():
        if not NAME_RE.match(name):
            raise ConfigError(top.key_origin(name), name, "is not a valid template name",
                              NAME_EXPECTED)
        sub = top.raw(name)
        if sub is None:
            sub = Node({}, top.key_origin(name), {})
        out[name] = _parse_one(name, top.key_origin(name), Section(sub, name), level, path.parent)
    return out
