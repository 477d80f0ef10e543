"""A persistent VM's domain XML from a ``qemu.VmSpec`` (pure: no libvirt)."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from vcluster.persistent.domain import QEMU_NS, disk_target, domain_xml, metadata_of
from vcluster.qemu import (
    Disk,
    LibvirtNetwork,
    Nic,
    SharedMemory,
    UserNet,
    VdeSwitch,
    VmSpec,
    build_argv,
    drive_args,
)

SPEC = VmSpec(name="vm0", accel="tcg", binary="/usr/bin/qemu-system-x86_64", cpu="qemu64",
              memory=256 << 20, cpus=2, kernel=Path("/img/vmlinuz"),
              initrd=Path("/img/initramfs.img"), append="console=ttyS0",
              disks=(Disk(Path("/c/vm0/overlay.qcow2")),
                     Disk(Path("/c/vm0/data.qcow2"), serial="data"),
                     Disk(Path("/c/shared.raw"), fmt="raw", serial="shared", shareable=True)),
              seed=Path("/c/vm0/seed.iso"), serial_socket=Path("/c/vm0/console.sock"),
              serial_log=Path("/c/vm0/console.log"), guest_agent_socket=Path("/c/vm0/qga.sock"),
              fam=SharedMemory(Path("/dev/shm/vcluster-root-fs-fam0"), 16 << 20),
              nics=(Nic(LibvirtNetwork("vc-fs-private"), "02:dc:00:00:00:00"),),
              extra=("-global", "x=1"))


def at(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    assert found is not None, path
    return found


def test_the_domain_is_the_machine_the_qemu_command_line_is() -> None:
    xml = domain_xml(SPEC, name="vcluster-fs-vm0", owner=(0, 0), metadata='{"a": 1}')
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu" and root.findtext("name") == "vcluster-fs-vm0"
    assert root.findtext("memory") == str(256 << 20) and root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("features/acpi") is not None
    assert root.findtext("cpu/model") == "qemu64"
    disks = root.findall("devices/disk")
    assert [at(d, "target").get("dev") for d in disks] == ["vda", "vdb", "vdc", "vdd"]
    assert [d.findtext("serial") for d in disks] == [None, "data", "shared", None]
    shared = disks[2]
    assert shared.find("shareable") is not None
    assert at(shared, "driver").attrib == {"name": "qemu", "type": "raw", "cache": "none",
                                             "io": "native"}
    assert at(disks[3], "source").get("file") == "/c/vm0/seed.iso"
    assert disks[3].find("readonly") is not None
    shmem = at(root, "devices/shmem")
    assert shmem.get("name") == "vcluster-root-fs-fam0"
    assert at(shmem, "model").get("type") == "ivshmem-plain"
    assert at(shmem, "address").get("slot") == "0x04"  # qemu.FAM_PCI_ADDR, as alloc's
    assert shmem.findtext("size") == str(16 << 20)
    nic = at(root, "devices/interface")
    assert at(nic, "source").get("network") == "vc-fs-private"
    assert at(nic, "mac").get("address") == "02:dc:00:00:00:00"
    assert at(nic, "model").get("type") == "virtio"
    serial = at(root, "devices/serial")
    assert at(serial, "source").get("path") == "/c/vm0/console.sock"
    assert at(serial, "log").get("file") == "/c/vm0/console.log"
    label = at(root, "seclabel")
    assert label.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == "+0:+0"
    args = root.findall("{http://libvirt.org/schemas/domain/qemu/1.0}commandline/"
                        "{http://libvirt.org/schemas/domain/qemu/1.0}arg")
    values = [a.get("value") for a in args]
    assert values[-2:] == ["-global", "x=1"]  # the template's qemu-args last
    assert "virtserialport,bus=vserial0.0,chardev=qga0,name=org.qemu.guest_agent.0" in values
    assert "socket,id=qga0,path=/c/vm0/qga.sock,server=on,wait=off" in values
    assert root.find("devices/channel") is None  # libvirt would take the agent for itself
    assert metadata_of(xml) == '{"a": 1}'


def test_what_a_domain_cannot_be_is_refused() -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="monitor is libvirt's"):
        domain_xml(replace(SPEC, qmp_socket=Path("/q")), name="x", owner=(0, 0), metadata="")
    with pytest.raises(ValueError, match="libvirt networks, QEMU's user-mode NAT or user-space"):
        domain_xml(replace(SPEC, nics=(Nic(3, "02:00:00:00:00:01"),)),  # a tap's fd
                   name="x", owner=(0, 0), metadata="")
    with pytest.raises(ValueError, match="/dev/shm"):
        domain_xml(replace(SPEC, fam=SharedMemory(Path("/run/x/fam"), 1 << 20)), name="x",
                   owner=(0, 0), metadata="")
    with pytest.raises(ValueError, match="a domain's NIC"):
        build_argv(SPEC)  # a libvirt network is no QEMU option


def test_a_sessions_nics_are_qemus_own_past_libvirt() -> None:
    from dataclasses import replace

    nics = (Nic(VdeSwitch(Path("/run/u/cluster-x-net")), "02:00:00:00:00:01"),
            Nic(UserNet(ssh_port=2222), "02:00:00:00:00:02"))
    root = ET.fromstring(domain_xml(replace(SPEC, nics=nics), name="x", owner=(1000, 1000),
                                    metadata=""))
    assert root.find("devices/interface") is None  # no libvirt network
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert "vde,id=vcnet0,sock=/run/u/cluster-x-net" in args
    assert "virtio-net-pci,netdev=vcnet0,mac=02:00:00:00:00:01,addr=0x1e" in args
    assert any(a and a.startswith("user,id=vcnet1,") and "hostfwd=tcp:127.0.0.1:2222-:22" in a
               for a in args), args
    assert "virtio-net-pci,netdev=vcnet1,mac=02:00:00:00:00:02,addr=0x1d" in args


def test_disk_names_and_a_shared_disk_on_a_qemu_command_line() -> None:
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa",
                                                           "vdab"]
    argv = drive_args("/c/shared.raw", drive_id="disk2", fmt="raw", serial="shared",
                      shareable=True)
    assert argv == ["-drive", "file=/c/shared.raw,if=none,id=disk2,format=raw,cache=none,"
                              "file.locking=off",
                    "-device", "virtio-blk-pci,drive=disk2,serial=shared,share-rw=on"]
    with pytest.raises(ValueError, match="raw"):
        drive_args("/c/x.qcow2", drive_id="d", shareable=True)
