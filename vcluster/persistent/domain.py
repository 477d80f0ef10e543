"""A persistent VM's libvirt domain XML, written from the same ``qemu.VmSpec`` as a job VM's
QEMU command line (pure: no libvirt here).

What ``qemu.build_argv`` turns into options, this turns into elements, so a
persistent cluster's VM is the machine an alloc cluster's is: direct kernel
boot, the overlay as ``vda`` and the extra disks after it with their names
as serial numbers, the seed, NICs with the same MACs, the FAM region as an
``ivshmem-plain`` ``<shmem>`` at the same pinned PCI slot
(``qemu.FAM_PCI_ADDR``; libvirt maps it from ``/dev/shm/<name>``), the
serial console on a unix socket with a log, a virtio-rng.  libvirt has its
own monitor (a spec for a domain has no QMP socket of the runner's); the
tools' monitor and the guest agent's port are passed to QEMU as they are on
a job VM's command line (``<qemu:commandline>``, as the template's
qemu-args after them), so that vcluster's exec, console and save reach a
persistent VM through the same sockets as a job VM's (a guest agent channel
declared to libvirt would be libvirt's: it connects to it itself).  Disk
``i`` has the alias ``ua-disk<i>``, which save looks for.  A session's VMs
(qemu:///session: no libvirt networks) have QEMU's own NICs, passed the same
way at the PCI slots below the agent's.  QEMU runs as the cluster's owner
with no relabelling (``<seclabel model='dac' relabel='no'>``; a session has
no DAC driver, its QEMU is the user's anyway): libvirt's dynamic ownership
would otherwise chown the image files, backing files included.  The
cluster's record goes in ``<metadata>`` (``METADATA_NS``), so the domains
alone can rebuild it.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree as ET

from vcluster.qemu import (
    DISK_ALIAS_PREFIX,
    FAM_PCI_ADDR,
    LibvirtNetwork,
    UserNet,
    VdeSwitch,
    VmSpec,
    guest_agent_args,
    nic_args,
    qmp_args,
)

METADATA_NS = "https://vcluster.invalid/xmlns/cluster/1"
METADATA_PREFIX = "vcluster"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
SHM_DIR = Path("/dev/shm")
# libvirt gives its devices PCI slots from 2 up and knows nothing of those past it: the
# guest agent's controller takes the last slot of the bus
PASSED_PCI_ADDR = 0x1F
NIC_MODELS = {"virtio-net-pci": "virtio", "e1000": "e1000", "rtl8139": "rtl8139"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def disk_target(index: int) -> str:
    """``vda``, ``vdb``, ... ``vdz``, ``vdaa``: the guest's name of virtio disk ``index``."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def _os(domain: ET.Element, spec: VmSpec) -> None:
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel is not None:
        _sub(os_, "kernel", os.fspath(spec.kernel))
        if spec.initrd is not None:
            _sub(os_, "initrd", os.fspath(spec.initrd))
        if spec.append:
            _sub(os_, "cmdline", spec.append)
    elif spec.initrd is not None or spec.append:
        raise ValueError("initrd and append need a kernel")
    else:
        _sub(os_, "boot", dev="hd")


def _cpu(domain: ET.Element, spec: VmSpec) -> None:
    if spec.cpu in (None, "host"):
        _sub(domain, "cpu", mode="host-passthrough", check="none")
    else:
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", spec.cpu, fallback="allow")


def _disks(devices: ET.Element, spec: VmSpec) -> None:
    for i, disk in enumerate(spec.disks):
        element = _sub(devices, "disk", type="file", device="disk")
        if disk.shareable:
            # GFS2, OCFS2: every VM writes the same image, so no cache and no format layer
            _sub(element, "driver", name="qemu", type="raw", cache="none", io="native")
        else:
            _sub(element, "driver", name="qemu", type=disk.fmt)
        _sub(element, "source", file=os.fspath(disk.path))
        _sub(element, "target", dev=disk_target(i), bus="virtio")
        _sub(element, "alias", name=f"{DISK_ALIAS_PREFIX}disk{i}")
        if disk.serial is not None:
            _sub(element, "serial", disk.serial)
        if disk.readonly:
            _sub(element, "readonly")
        if disk.shareable:
            _sub(element, "shareable")
    if spec.seed is None:
        return
    if spec.seed_interface == "cdrom":
        seed = _sub(devices, "disk", type="file", device="cdrom")
        _sub(seed, "driver", name="qemu", type="raw")
        _sub(seed, "source", file=os.fspath(spec.seed))
        _sub(seed, "target", dev="hdc", bus="ide")
    else:
        seed = _sub(devices, "disk", type="file", device="disk")
        _sub(seed, "driver", name="qemu", type="raw")
        _sub(seed, "source", file=os.fspath(spec.seed))
        _sub(seed, "target", dev=disk_target(len(spec.disks)), bus="virtio")
    _sub(seed, "readonly")


def shmem_name(path: Path) -> str:
    """The ``<shmem>`` name of a FAM region libvirt maps from ``/dev/shm/<name>``."""
    if path.parent != SHM_DIR or not path.name:
        raise ValueError(f"a domain's FAM region is a file in {SHM_DIR}, not {path}")
    return path.name


def _devices(domain: ET.Element, spec: VmSpec) -> None:
    if spec.qmp_socket is not None:
        raise ValueError(f"{spec.name}: a domain's monitor is libvirt's: no QMP socket")
    devices = _sub(domain, "devices")
    _sub(devices, "emulator", spec.binary)
    if spec.fam is not None:
        shmem = _sub(devices, "shmem", name=shmem_name(spec.fam.path))
        _sub(shmem, "model", type="ivshmem-plain")
        _sub(shmem, "size", str(spec.fam.size), unit="B")
        _sub(shmem, "address", type="pci", domain="0x0000", bus="0x00",
             slot=f"{FAM_PCI_ADDR:#04x}", function="0x0")
    _disks(devices, spec)
    for nic in spec.nics:
        if not isinstance(nic.backend, LibvirtNetwork):
            continue  # QEMU's own (a session's): passed_args
        interface = _sub(devices, "interface", type="network")
        _sub(interface, "source", network=nic.backend.name)
        _sub(interface, "mac", address=nic.mac)
        _sub(interface, "model", type=NIC_MODELS.get(nic.model, nic.model))
    if spec.serial_socket is not None:
        serial = _sub(devices, "serial", type="unix")
        _sub(serial, "source", mode="bind", path=os.fspath(spec.serial_socket))
        if spec.serial_log is not None:
            _sub(serial, "log", file=os.fspath(spec.serial_log), append="on")
        _sub(serial, "target", port="0")
    elif spec.serial_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=os.fspath(spec.serial_log))
        _sub(serial, "target", port="0")
    if spec.entropy:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")


def passed_args(spec: VmSpec) -> list[str]:
    """What goes to QEMU past libvirt: the tools' monitor, the guest agent, qemu-args."""
    args = []
    if spec.tools_qmp_socket is not None:
        args += qmp_args(spec.tools_qmp_socket, chardev_id="qmp-tools")
    if spec.guest_agent_socket is not None:
        args += guest_agent_args(spec.guest_agent_socket, addr=PASSED_PCI_ADDR)
    own = [nic for nic in spec.nics if not isinstance(nic.backend, LibvirtNetwork)]
    for n, nic in enumerate(own):  # the slots below the agent's, which libvirt never reaches
        if not isinstance(nic.backend, (UserNet, VdeSwitch)):
            raise ValueError(f"{spec.name}: a domain's NICs are on libvirt networks, QEMU's "
                             f"user-mode NAT or user-space switches, not {nic.backend!r}")
        args += nic_args(nic.backend, nic.mac, net_id=f"vcnet{n}", model=nic.model,
                         addr=PASSED_PCI_ADDR - 1 - n)
    return args + list(spec.extra)


def domain_xml(spec: VmSpec, *, name: str, owner: tuple[int, int] | None, metadata: str,
               title: str = "") -> str:
    """The domain of ``spec`` named ``name``, QEMU running as ``owner`` (uid, gid; None: as
    the session's user), with ``metadata`` (the cluster's record, as text) under
    ``METADATA_NS``."""
    if spec.accel not in ("kvm", "tcg"):
        raise ValueError(f"accelerator {spec.accel!r} is not kvm or tcg")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(domain, "name", name)
    if title:
        _sub(domain, "title", title)
    meta = _sub(domain, "metadata")
    _sub(meta, f"{{{METADATA_NS}}}cluster", metadata)
    _sub(domain, "memory", str(spec.memory), unit="B")
    _sub(domain, "vcpu", str(spec.cpus))
    _os(domain, spec)
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _cpu(domain, spec)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    _devices(domain, spec)
    if owner is not None:  # a session's libvirtd has no DAC driver: QEMU runs as its user
        seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
        _sub(seclabel, "label", f"+{owner[0]}:+{owner[1]}")
    passed = passed_args(spec)
    if passed:
        commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
        for arg in passed:
            _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def metadata_of(xml: str) -> str | None:
    """The cluster record a domain's XML carries (``domain_xml``'s ``metadata``), if any."""
    found = ET.fromstring(xml).find(f"metadata/{{{METADATA_NS}}}cluster")
    return found.text if found is not None else None
