"""A VM's plan and its host devices, turned into a ``qemu.VmSpec`` (pure, no system calls).

The root disk is the VM's overlay (``/dev/vda``, as the images' ``root=``
expects), extra disks follow with their names as serial numbers (the guest
finds them under /dev/disk/by-id/virtio-<name>; a shared disk is the
cluster's one raw image, attached for shared writes), then the seed.  The FAM
region is ivshmem-plain at the pinned slot, NICs are taps passed by fd (or,
rootless, user-space switch ports and user-mode NAT), the
console a unix socket plus a log, QMP and the guest agent unix sockets; the
template's qemu-args come last, so they can add to all of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vcluster.cluster import ClusterSpec, VmPlan, mac_address
from vcluster.hostpaths import VmFiles
from vcluster.qemu import Disk, Nic, NicBackend, SharedMemory, VmSpec, default_cpu


def disks(vm: VmPlan, files: VmFiles) -> tuple[Disk, ...]:
    """The VM's block devices in guest order (overlay first for a disk image)."""
    out: list[Disk] = []
    if vm.boot.kind == "disk":
        out.append(Disk(files.overlay))
    out += [Disk(files.shared_disk(d.name), fmt="raw", serial=d.name, shareable=True)
            if d.shared else Disk(files.disk(d.name), serial=d.name) for d in vm.disks]
    return tuple(out)


def vm_spec(spec: ClusterSpec, vm: VmPlan, files: VmFiles, *, accel: str,
            nics: Sequence[NicBackend] = (), fam: SharedMemory | None = None,
            binary: str | None = None) -> VmSpec:
    """The QEMU process of ``vm``: ``nics``' backends in the order of ``vm.nics``."""
    if len(nics) != len(vm.nics):
        raise ValueError(f"{vm.name} has {len(vm.nics)} NICs but {len(nics)} backends "
                         "were given")
    if (fam is None) != (vm.fam is None):
        raise ValueError(f"{vm.name}: a FAM region goes with a fam plan, and only with it")
    devices = tuple(Nic(backend, mac_address(spec.job, vm.index, n), nic.model)
                    for n, (backend, nic) in enumerate(zip(nics, vm.nics, strict=True)))
    return VmSpec(
        name=vm.name,
        accel=accel,
        binary=binary or spec.plan.qemu_binary,
        machine=vm.machine,
        cpu=vm.cpu_model or default_cpu(accel),
        memory=vm.memory,
        cpus=vm.vcpus,
        kernel=vm.boot.kernel,
        initrd=vm.boot.initrd,
        append=vm.boot.append,
        disks=disks(vm, files),
        seed=files.seed,
        serial_socket=files.console_socket,
        serial_log=files.console_log,
        qmp_socket=files.qmp_socket,
        tools_qmp_socket=files.tools_qmp_socket,
        guest_agent_socket=files.guest_agent_socket,
        fam=fam,
        nics=devices,
        extra=vm.qemu_args,
    )


def overlay_argv(base: Path, base_format: str, overlay: Path,
                 size: int | None = None) -> list[str]:
    """``qemu-img`` making a qcow2 overlay over ``base`` by its absolute path (of ``size``
    bytes, else the base's size)."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
            "-b", str(base.resolve()), str(overlay), *([str(size)] if size else [])]


def disk_argv(path: Path, size: int) -> list[str]:
    """``qemu-img`` making an empty qcow2 disk of ``size`` bytes."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)]
