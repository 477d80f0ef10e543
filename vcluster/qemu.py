"""QEMU command lines, built from small pure functions returning argv fragments.

Each function covers one concern (machine, memory, direct boot, a disk, the
seed, the serial console, QMP, shared memory, a NIC, the guest agent) and
``build_argv`` composes them from a ``VmSpec``.  Nothing here touches the
system: the VM runner starts the result with ``vcluster.run.spawn``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PathLike = str | os.PathLike[str]

FAM_PCI_ADDR = 0x4
"""The PCI slot of the ivshmem device: pinned, so the guest path is stable
(``/sys/bus/pci/devices/0000:00:04.0/resource2``)."""

# A persistent VM's disk N is libvirt's device ``ua-diskN`` (libvirt's prefix for aliases
# given by the user), as a job VM's QEMU names its drive ``diskN``: save finds either.
DISK_ALIAS_PREFIX = "ua-"

SEED_INTERFACES = ("virtio", "cdrom")


def optval(value: PathLike | int) -> str:
    """Quote one value inside a ``key=value,...`` option: commas are doubled."""
    return os.fspath(value).replace(",", ",,") if not isinstance(value, int) else str(value)


def options(*head: str, **kv: PathLike | int | bool | None) -> str:
    """``options("virtio-blk-pci", drive="d0")`` -> ``virtio-blk-pci,drive=d0``.

    Underscores in keys become dashes (a trailing one is dropped: ``if_``); booleans
    become on/off; None is left out.
    """
    parts = list(head)
    for key, value in kv.items():
        if value is None:
            continue
        name = key.rstrip("_").replace("_", "-")
        if isinstance(value, bool):
            parts.append(f"{name}={'on' if value else 'off'}")
        else:
            parts.append(f"{name}={optval(value)}")
    return ",".join(parts)


def base_args() -> list[str]:
    """No default devices, no display, no configuration files: only what we ask for."""
    return ["-nodefaults", "-nographic", "-no-user-config"]


def default_cpu(accel: str) -> str:
    """``host`` under KVM; ``qemu64`` under TCG (boots noticeably faster than ``max``)."""
    return "host" if accel == "kvm" else "qemu64"


def machine_args(accel: str, *, machine: str = "pc", cpu: str | None = None) -> list[str]:
    """Machine type, accelerator (``kvm`` or ``tcg``) and CPU model."""
    return ["-machine", machine, "-accel", accel, "-cpu", cpu or default_cpu(accel)]


def memory_args(memory: int, cpus: int) -> list[str]:
    """Guest RAM in bytes (rounded down to MiB) and the number of vCPUs."""
    if memory < 1 << 20:
        raise ValueError(f"memory {memory} is below 1 MiB")
    if cpus < 1:
        raise ValueError(f"cpus {cpus} is below 1")
    return ["-m", f"{memory >> 20}M", "-smp", str(cpus)]


def kernel_args(kernel: PathLike, initrd: PathLike | None = None, append: str = "") -> list[str]:
    """Direct kernel boot: no bootloader in the image."""
    argv = ["-kernel", os.fspath(kernel)]
    if initrd is not None:
        argv += ["-initrd", os.fspath(initrd)]
    if append:
        argv += ["-append", append]
    return argv


def drive_args(path: PathLike, *, drive_id: str, fmt: str = "qcow2", readonly: bool = False,
               serial: str | None = None, shareable: bool = False) -> list[str]:
    """A disk image as a virtio-blk device; ``shareable``: one raw image that every VM of
    the cluster writes (GFS2, OCFS2): no host cache, no image lock, shared writes allowed."""
    if shareable:
        if fmt != "raw":
            raise ValueError(f"a shared disk is raw, not {fmt}")
        drive = options(file=path, if_="none", id=drive_id, format="raw", cache="none")
        return ["-drive", drive + ",file.locking=off",
                "-device", options("virtio-blk-pci", drive=drive_id, serial=serial,
                                   share_rw=True)]
    return [
        "-drive", options(file=path, if_="none", id=drive_id, format=fmt,
                          readonly=True if readonly else None),
        "-device", options("virtio-blk-pci", drive=drive_id, serial=serial),
    ]


def seed_args(path: PathLike, *, interface: str = "virtio") -> list[str]:
    """The cloud-init NoCloud seed ISO, read-only, as a virtio disk or an IDE cdrom."""
    if interface == "virtio":
        return drive_args(path, drive_id="seed", fmt="raw", readonly=True)
    if interface == "cdrom":
        return [
            "-drive", options(file=path, if_="none", id="seed", format="raw", media="cdrom",
                              readonly=True),
            "-device", options("ide-cd", drive="seed"),
        ]
    raise ValueError(f"seed interface {interface!r} is not one of {', '.join(SEED_INTERFACES)}")


def serial_args(*, socket: PathLike | None = None, log: PathLike | None = None) -> list[str]:
    """The first serial port (ttyS0): a unix socket server, a log file, or both.

    With a socket, the log records everything the guest writes whether or not
    anyone is connected; the socket never blocks the guest (``wait=off``).
    """
    if socket is not None:
        chardev = options("socket", id="serial0", path=socket, server=True, wait=False,
                          logfile=log, logappend=True if log is not None else None)
    elif log is not None:
        chardev = options("file", id="serial0", path=log)
    else:
        chardev = options("null", id="serial0")
    return ["-chardev", chardev, "-serial", "chardev:serial0"]


def qmp_args(socket: PathLike, *, chardev_id: str = "qmp") -> list[str]:
    """A QMP monitor on a unix socket (server, non-blocking)."""
    return [
        "-chardev", options("socket", id=chardev_id, path=socket, server=True, wait=False),
        "-mon", options(chardev=chardev_id, mode="control"),
    ]


def ivshmem_args(mem_path: PathLike, size: int, *, mem_id: str = "fam",
                 addr: int = FAM_PCI_ADDR) -> list[str]:
    """A shared memory region (file-backed, ``share=on``) as ivshmem-plain BAR2 at a pinned slot."""
    return [
        "-object", options("memory-backend-file", id=mem_id, share=True, mem_path=mem_path,
                           size=size),
        "-device", options("ivshmem-plain", memdev=mem_id, addr=f"{addr:#x}"),
    ]


@dataclass(frozen=True)
class VdeSwitch:
    """A port on a user-space Ethernet switch (``vde_switch -s SOCKET``): no root, no tap."""

    socket: Path


@dataclass(frozen=True)
class UserNet:
    """QEMU's user-mode NAT (slirp): the guest's address, its gateway, and ssh forwarded
    from ``ssh_host:ssh_port`` on the host (127.0.0.1 only) to the guest's port 22."""

    net: str = "10.0.2.0/24"
    guest: str = "10.0.2.15"
    gateway: str = "10.0.2.2"
    dns: str = "10.0.2.3"
    ssh_host: str = "127.0.0.1"
    ssh_port: int | None = None


@dataclass(frozen=True)
class LibvirtNetwork:
    """A NIC that libvirt attaches to one of its networks (a persistent cluster's VMs are
    libvirt's domains): no QEMU option of ours, ``persistent.domain`` writes it."""

    name: str


NicBackend = int | VdeSwitch | UserNet | LibvirtNetwork  # an int: an open tap's fd


def netdev_option(backend: NicBackend, net_id: str) -> str:
    """``-netdev``'s value for one NIC's backend."""
    if isinstance(backend, LibvirtNetwork):
        raise ValueError(f"{net_id} is on libvirt network {backend.name}: a domain's NIC, "
                         "not a QEMU command line's")
    if isinstance(backend, VdeSwitch):
        return options("vde", id=net_id, sock=backend.socket)
    if isinstance(backend, UserNet):
        forward = (f"tcp:{backend.ssh_host}:{backend.ssh_port}-:22"
                   if backend.ssh_port is not None else None)
        return options("user", id=net_id, net=backend.net, host=backend.gateway,
                       dns=backend.dns, dhcpstart=backend.guest, hostfwd=forward)
    return options("tap", id=net_id, fd=backend)


def nic_args(backend: NicBackend, mac: str, *, net_id: str = "net0",
             model: str = "virtio-net-pci", addr: int | None = None) -> list[str]:
    """A NIC on a tap device the caller already opened (its fd passed to QEMU), a
    user-space switch's port or QEMU's user-mode NAT (at PCI slot ``addr``, if given)."""
    return [
        "-netdev", netdev_option(backend, net_id),
        "-device", options(model, netdev=net_id, mac=mac,
                           addr=f"{addr:#x}" if addr is not None else None),
    ]


def guest_agent_args(socket: PathLike, *, addr: int | None = None) -> list[str]:
    """A virtio-serial port named for qemu-guest-agent, served on a unix socket (its
    controller at PCI slot ``addr``, if given)."""
    return [
        "-chardev", options("socket", id="qga0", path=socket, server=True, wait=False),
        "-device", options("virtio-serial-pci", id="vserial0",
                           addr=f"{addr:#x}" if addr is not None else None),
        "-device", options("virtserialport", bus="vserial0.0", chardev="qga0",
                           name="org.qemu.guest_agent.0"),
    ]


@dataclass(frozen=True)
class Disk:
    path: Path
    fmt: str = "qcow2"
    readonly: bool = False
    serial: str | None = None
    shareable: bool = False  # the cluster's VMs all write it (``drive_args``)


@dataclass(frozen=True)
class Nic:
    backend: NicBackend
    mac: str
    model: str = "virtio-net-pci"


@dataclass(frozen=True)
class SharedMemory:
    path: Path
    size: int


@dataclass(frozen=True)
class VmSpec:
    """Everything one QEMU process needs; ``build_argv`` turns it into a command line."""

    name: str
    accel: str = "tcg"
    binary: str = "qemu-system-x86_64"
    machine: str = "pc"
    cpu: str | None = None
    memory: int = 512 << 20
    cpus: int = 1
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[Disk, ...] = ()
    seed: Path | None = None
    seed_interface: str = "virtio"
    serial_socket: Path | None = None
    serial_log: Path | None = None
    qmp_socket: Path | None = None
    # a second monitor for tools (vcluster save), the first being the runner's for good
    tools_qmp_socket: Path | None = None
    guest_agent_socket: Path | None = None
    # A virtio-rng from the host's random source: without it a TCG guest waits about a
    # second for its random pool before it can make or read a key (ssh servers do)
    entropy: bool = True
    fam: SharedMemory | None = None
    nics: tuple[Nic, ...] = ()
    extra: tuple[str, ...] = field(default=())

    def pass_fds(self) -> tuple[int, ...]:
        """The file descriptors QEMU must inherit (tap devices)."""
        return tuple(nic.backend for nic in self.nics if isinstance(nic.backend, int))


def build_argv(spec: VmSpec) -> list[str]:
    """The full QEMU command line for ``spec``."""
    argv = [spec.binary, "-name", options(spec.name, process=f"qemu-{spec.name}")]
    argv += base_args()
    argv += machine_args(spec.accel, machine=spec.machine, cpu=spec.cpu)
    argv += memory_args(spec.memory, spec.cpus)
    if spec.kernel is not None:
        argv += kernel_args(spec.kernel, spec.initrd, spec.append)
    elif spec.initrd is not None or spec.append:
        raise ValueError("initrd and append need a kernel")
    # The ivshmem device goes first so its pinned slot cannot collide with an
    # automatically placed device.
    if spec.fam is not None:
        argv += ivshmem_args(spec.fam.path, spec.fam.size)
    for i, disk in enumerate(spec.disks):
        argv += drive_args(disk.path, drive_id=f"disk{i}", fmt=disk.fmt, readonly=disk.readonly,
                           serial=disk.serial, shareable=disk.shareable)
    if spec.seed is not None:
        argv += seed_args(spec.seed, interface=spec.seed_interface)
    for i, nic in enumerate(spec.nics):
        argv += nic_args(nic.backend, nic.mac, net_id=f"net{i}", model=nic.model)
    argv += serial_args(socket=spec.serial_socket, log=spec.serial_log)
    if spec.qmp_socket is not None:
        argv += qmp_args(spec.qmp_socket)
    if spec.tools_qmp_socket is not None:
        argv += qmp_args(spec.tools_qmp_socket, chardev_id="qmp-tools")
    if spec.guest_agent_socket is not None:
        argv += guest_agent_args(spec.guest_agent_socket)
    if spec.entropy:
        argv += ["-device", "virtio-rng-pci"]
    argv += list(spec.extra)
    return argv


def show_argv(argv: Sequence[str]) -> str:
    """The command line as a shell would need it (for ``--dry-run``/``show``)."""
    return shlex.join(argv)
