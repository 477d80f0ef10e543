"""A cluster's plan: everything the VM runners need, resolved once on the login node.

The CLI builds a ``ClusterPlan`` from the configuration and a definition, and
so refuses bad input (an unknown template, a missing image, a network that
does not fit) before anything is submitted.  The launcher adds the job and
stores the result, a ``ClusterSpec``, under ``users/<user>/clusters/<job>/spec``;
each VM runner reads it back, so compute hosts never re-read templates.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from vcluster.config.loader import Config
from vcluster.config.templates import Disk, Template
from vcluster.definition import expand_definition
from vcluster.errors import ImageError, InputError


class Readiness(Enum):
    """How a runner knows its guest is up."""

    FINAL_MESSAGE = "final-message"  # cloud-init printed the seed's final_message
    TINY_INIT = "tiny-init"  # the tiny image's /init printed its ready line

    @property
    def stop_timeout(self) -> float:
        """Seconds a guest gets to power down by default (``--stop-timeout`` overrides).

        Debian shuts down in seconds; the tiny image ignores the ACPI power
        button, so waiting for it is time lost.
        """
        return {Readiness.FINAL_MESSAGE: 20.0, Readiness.TINY_INIT: 1.0}[self]

    def ready_timeout(self, accel: str) -> float:
        """Seconds a guest gets to become ready by default, under ``accel``.

        Generous under TCG: two 1-vCPU Debian VMs on two cores took 66 s to
        cloud-init's end.
        """
        tcg = accel != "kvm"
        if self is Readiness.FINAL_MESSAGE:
            return 300.0 if tcg else 120.0
        return 60.0 if tcg else 30.0


@dataclass(frozen=True)
class BootPlan:
    image: str  # the resolved image, name@revision or a path
    kind: str  # "disk" or "initramfs"
    kernel: Path
    initrd: Path | None
    disk: Path | None  # the base disk the VM's overlay is made over
    append: str
    readiness: Readiness
    user: str = "root"  # the image's default login user (ssh, exec)
    repository: Path | None = None  # the image repository it came from (None: a path)


@dataclass(frozen=True)
class NicPlan:
    network: str
    type: str  # network type (a plug-in of vcluster.networks)
    mtu: int
    address: str | None  # CIDR, e.g. 10.200.0.1/16; None: the VM's host agent gives it (nat)
    model: str


@dataclass(frozen=True)
class FamPlan:
    name: str
    size: int


@dataclass(frozen=True)
class DiskPlan:
    name: str
    size: int | None  # None: its image's size
    shared: bool
    image: str | None = None  # the image revision it starts as (NAME@REV), None: empty
    base: Path | None = None  # that revision's disk, the disk's backing file
    repository: Path | None = None  # where that image is
    format: str | None = None  # the file system the guest makes on it at first boot
    mount: str | None = None  # where the guest mounts it


@dataclass(frozen=True)
class VmPlan:
    index: int
    template: str
    vcpus: int
    memory: int
    boot: BootPlan
    nics: tuple[NicPlan, ...]
    fam: FamPlan | None
    disks: tuple[DiskPlan, ...]
    user_data: str | None  # the template's user-data: cloud-config YAML or a #! script
    machine: str
    cpu_model: str | None
    qemu_args: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"vm{self.index}"


@dataclass(frozen=True)
class ClusterPlan:
    definition: str
    vms: tuple[VmPlan, ...]
    accel: str
    qemu_binary: str

    def hosts(self) -> list[tuple[str, str]]:
        """(address, name) of every VM on its first network that spans the cluster, for
        /etc/hosts (a nat network's addresses are its host's business)."""
        out = []
        for vm in self.vms:
            planned = [nic.address for nic in vm.nics if nic.address is not None]
            if planned:
                out.append((planned[0].split("/")[0], vm.name))
        return out

    def private_networks(self) -> list[str]:
        """The networks the VMs' NICs are on that tunnel between hosts (each needs a VNI),
        in order of first use."""
        # NetworkKind says nothing of tunnels yet: ``private`` is the one type that has them.
        from vcluster.networks.private import KIND as PRIVATE

        names = [nic.network for vm in self.vms for nic in vm.nics if nic.type == PRIVATE.name]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class ClusterSpec:
    """A plan bound to its job: what the store holds under ``.../spec``."""

    job: str
    name: str  # the SLURM job name
    user: str
    uid: int
    created: float
    ssh_public_key: str
    plan: ClusterPlan
    vnis: dict[str, int] = field(default_factory=dict)  # private network -> its VXLAN id
    mode: str = "alloc"  # how it was submitted: alloc or batch
    local: bool = False  # run by the local backend: its VMs are on this machine, no SLURM


def mac_address(job: str, vm: int, nic: int) -> str:
    """A locally administered MAC, unique within a job (and very likely across jobs)."""
    tag = zlib.crc32(job.encode()) & 0xFFFFFF
    raw = [0x02, tag >> 16, (tag >> 8) & 0xFF, tag & 0xFF, (vm >> 4) & 0xFF,
           ((vm & 0xF) << 4) | (nic & 0xF)]
    return ":".join(f"{b:02x}" for b in raw)


def _boot(t: Template, repos: Sequence[Path]) -> BootPlan:
    from vcluster.images.repo import INFO_FILE, Image, ImageInfo, resolve_image

    if t.image is None and t.kernel is None:
        origin = t.origin
        raise InputError(f"{origin}: {t.name}: no image and no kernel (expected image: "
                         "NAME[@REVISION] or a path, or kernel: FILE)")
    image: Image | None = None
    disk: Path | None = None
    if t.image is not None:
        origin = t.origins.get("image", t.origin)
        try:
            if t.image.path is None:
                image = resolve_image(str(t.image), repos)
            elif (t.image.path / INFO_FILE).is_file():
                info_path = t.image.path / INFO_FILE
                info = ImageInfo.from_json(info_path.read_text(), info_path)
                image = Image(t.image.path.parent.parent, info, t.image.path)
            elif t.image.path.is_file():
                disk = t.image.path
            else:
                raise ImageError(f"{t.image.path}: no such image file or directory")
        except ImageError as e:
            raise InputError(f"{origin}: {t.name}.image: {e}") from e
    kind = image.info.kind if image else "disk"
    kernel = t.kernel or (image.kernel if image else None)
    if kernel is None:
        raise InputError(f"{t.origin}: {t.name}: image {t.image} has no kernel "
                         "(expected kernel: FILE in the template)")
    if t.append is not None:
        append = t.append
    elif image is not None and image.info.append:
        append = image.info.append
    else:
        append = "root=/dev/vda rw console=ttyS0"
    return BootPlan(
        image=image.ref if image else str(t.image or t.kernel),
        kind=kind,
        kernel=kernel,
        initrd=t.initrd or (image.initrd if image else None),
        disk=(image.disk if image else disk) if kind == "disk" else None,
        repository=image.repo if image else None,
        append=append,
        readiness=Readiness.TINY_INIT if kind == "initramfs" else Readiness.FINAL_MESSAGE,
        user=image.info.user if image else "root",
    )


def _disk(t: Template, disk: Disk, repos: Sequence[Path]) -> DiskPlan:
    """An extra disk: empty, or a layer over an image revision's disk."""
    from vcluster.images.repo import resolve_image

    if disk.image is None:
        return DiskPlan(disk.name, disk.size, disk.shared, format=disk.format,
                        mount=disk.mount)
    origin = t.origins.get("disks", t.origin)
    where = f"{origin}: {t.name}.disks[{disk.name}].image"
    if disk.image.path is not None:
        if not disk.image.path.is_file():
            raise InputError(f"{where}: {disk.image.path}: no such file")
        return DiskPlan(disk.name, disk.size, disk.shared, str(disk.image.path),
                        disk.image.path, None, format=disk.format, mount=disk.mount)
    try:
        image = resolve_image(str(disk.image), repos)
    except ImageError as e:
        raise InputError(f"{where}: {e}") from e
    if image.disk is None:
        raise InputError(f"{where}: image {image.ref} is a kernel and initramfs, not a disk")
    return DiskPlan(disk.name, disk.size, disk.shared, image.ref, image.disk, image.repo,
                    format=disk.format, mount=disk.mount)


def _nics(config: Config, t: Template, index: int, total: int) -> tuple[NicPlan, ...]:
    from vcluster.networks import kind, planned_types

    rs_name = t.resource_set or "default"
    rs = config.resource_sets.get(rs_name)
    if rs is None:
        if t.resource_set is None:
            return ()  # no resource sets configured: no networks
        raise InputError(f"template {t.name!r}: unknown resource set {rs_name!r}")
    nics = []
    for net_name in rs.networks:
        net = config.networks[net_name]
        net_kind = kind(net.type)
        if net_kind is None or not net_kind.planned:
            raise InputError(f"{net.origin}: network {net_name!r} of type {net.type} is not "
                             "supported by this version of vcluster yet (expected type: "
                             f"{' or '.join(planned_types())})")
        nics.append(NicPlan(net_name, net.type, net.mtu, net.nic_address(index, total),
                            t.nic_model))
    return tuple(nics)


def user_data_text(t: Template) -> str | None:
    """The template's user-data as the guest gets it (a file's text, or inline YAML)."""
    import yaml

    if t.user_data is None:
        return None
    if t.user_data.inline is not None:
        return "#cloud-config\n" + yaml.safe_dump(dict(t.user_data.inline), sort_keys=False)
    assert t.user_data.file is not None
    try:
        return t.user_data.file.read_text()
    except OSError as e:
        raise InputError(f"template {t.name!r}: user-data {t.user_data.file}: "
                         f"cannot read: {e.strerror}") from e


def image_repositories(config: Config) -> list[Path]:
    """Where images are looked up: the user's repository, then the site's."""
    from vcluster.config.paths import user_dir

    return [user_dir() / "images", config.batch.directories.images]


def named_repositories(config: Config) -> dict[str, Path]:
    """``user`` and ``site``: the repositories an image reference ``REPO:NAME`` names."""
    from vcluster.images.repo import REPOSITORIES

    return dict(zip(REPOSITORIES, image_repositories(config), strict=True))


def plan_cluster(config: Config, definition: str, *, cpus_per_task: int | None = None,
                 repos: Sequence[Path] | None = None) -> ClusterPlan:
    """Resolve a definition into the plan of every VM; any problem is an InputError."""
    specs = expand_definition(definition, config.templates)
    repos = list(repos) if repos is not None else image_repositories(config)
    boots: dict[str, BootPlan] = {}
    vms = []
    for spec in specs:
        t = config.templates[spec.template]
        if t.name not in boots:
            boots[t.name] = _boot(t, repos)
            mounted = [d.name for d in t.disks if d.format or d.mount]
            if mounted and boots[t.name].readiness is Readiness.TINY_INIT:
                raise InputError(f"{t.origins.get('disks', t.origin)}: {t.name}.disks"
                                 f"[{mounted[0]}]: the tiny image has no cloud-init to "
                                 "format or mount a disk (expected an image with cloud-init, "
                                 "such as debian, or no format and mount)")
        rs = config.resource_sets.get(t.resource_set or "default")
        fam = None
        if t.fam is not None:
            size = t.fam.size or (rs.fam_default_size if rs else 64 << 20)
            fam = FamPlan(t.fam.name, size)
        vms.append(VmPlan(
            index=spec.index,
            template=t.name,
            vcpus=t.vcpus or cpus_per_task or 1,
            memory=t.memory,
            boot=boots[t.name],
            nics=_nics(config, t, spec.index, len(specs)),
            fam=fam,
            disks=tuple(_disk(t, d, repos) for d in t.disks),
            user_data=user_data_text(t),
            machine=t.machine,
            cpu_model=t.cpu_model,
            qemu_args=t.qemu_args,
        ))
    sizes = {(vm.fam.name, vm.fam.size) for vm in vms if vm.fam}
    names = [name for name, _ in sizes]
    if len(names) != len(set(names)):
        raise InputError(f"cluster definition {definition!r}: templates ask for FAM region "
                         "sizes that differ under one name (expected one size per region name)")
    return ClusterPlan(definition, tuple(vms), config.batch.qemu.accel, config.batch.qemu.binary)
