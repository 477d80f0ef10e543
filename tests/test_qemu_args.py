"""The QEMU argv builders: one test per fragment, then the composed command line."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from vcluster import qemu
from vcluster.qemu import Disk, Nic, SharedMemory, VmSpec
from vcluster.run import run, spawn
from vcluster.seed import meta_data, write_seed


def test_optval_doubles_commas() -> None:
    assert qemu.optval("/tmp/a,b/c.qcow2") == "/tmp/a,,b/c.qcow2"
    assert qemu.optval(Path("/x")) == "/x"
    assert qemu.optval(4) == "4"


def test_options_formats_keys_and_booleans() -> None:
    assert qemu.options("socket", id="s", server=True, wait=False, logfile=None,
                        if_="none", mem_path="/m") == \
        "socket,id=s,server=on,wait=off,if=none,mem-path=/m"


def test_base_args() -> None:
    assert qemu.base_args() == ["-nodefaults", "-nographic", "-no-user-config"]


def test_machine_args_tcg_defaults_to_qemu64() -> None:
    assert qemu.machine_args("tcg") == ["-machine", "pc", "-accel", "tcg", "-cpu", "qemu64"]


def test_machine_args_kvm_defaults_to_host_cpu() -> None:
    assert qemu.machine_args("kvm", machine="q35") == \
        ["-machine", "q35", "-accel", "kvm", "-cpu", "host"]
    assert qemu.machine_args("kvm", cpu="max")[-1] == "max"


def test_memory_args() -> None:
    assert qemu.memory_args(1 << 30, 2) == ["-m", "1024M", "-smp", "2"]
    with pytest.raises(ValueError):
        qemu.memory_args(1000, 1)
    with pytest.raises(ValueError):
        qemu.memory_args(1 << 30, 0)


def test_kernel_args() -> None:
    assert qemu.kernel_args("/k") == ["-kernel", "/k"]
    assert qemu.kernel_args(Path("/k"), Path("/i"), "root=/dev/vda console=ttyS0") == \
        ["-kernel", "/k", "-initrd", "/i", "-append", "root=/dev/vda console=ttyS0"]


def test_drive_args_virtio() -> None:
    assert qemu.drive_args("/d,1.qcow2", drive_id="disk0") == [
        "-drive", "file=/d,,1.qcow2,if=none,id=disk0,format=qcow2",
        "-device", "virtio-blk-pci,drive=disk0",
    ]
    assert qemu.drive_args("/s.img", drive_id="d1", fmt="raw", readonly=True, serial="sh0") == [
        "-drive", "file=/s.img,if=none,id=d1,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=d1,serial=sh0",
    ]


def test_seed_args_virtio_and_cdrom() -> None:
    assert qemu.seed_args("/seed.iso") == [
        "-drive", "file=/seed.iso,if=none,id=seed,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=seed",
    ]
    assert qemu.seed_args("/seed.iso", interface="cdrom") == [
        "-drive", "file=/seed.iso,if=none,id=seed,format=raw,media=cdrom,readonly=on",
        "-device", "ide-cd,drive=seed",
    ]
    with pytest.raises(ValueError, match="virtio, cdrom"):
        qemu.seed_args("/seed.iso", interface="floppy")


def test_serial_args() -> None:
    assert qemu.serial_args(socket="/c.sock", log="/c.log") == [
        "-chardev", "socket,id=serial0,path=/c.sock,server=on,wait=off,logfile=/c.log,logappend=on",
        "-serial", "chardev:serial0",
    ]
    assert qemu.serial_args(log="/c.log") == [
        "-chardev", "file,id=serial0,path=/c.log", "-serial", "chardev:serial0"]
    assert qemu.serial_args(socket="/c.sock")[1] == \
        "socket,id=serial0,path=/c.sock,server=on,wait=off"
    assert qemu.serial_args()[1] == "null,id=serial0"


def test_qmp_args() -> None:
    assert qemu.qmp_args("/q.sock") == [
        "-chardev", "socket,id=qmp,path=/q.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]


def test_ivshmem_args_pin_the_pci_slot() -> None:
    assert qemu.ivshmem_args("/dev/shm/fam", 64 << 20) == [
        "-object", "memory-backend-file,id=fam,share=on,mem-path=/dev/shm/fam,size=67108864",
        "-device", "ivshmem-plain,memdev=fam,addr=0x4",
    ]


def test_nic_args() -> None:
    assert qemu.nic_args(5, "52:54:00:00:00:01") == [
        "-netdev", "tap,id=net0,fd=5",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01",
    ]
    assert qemu.nic_args(6, "52:54:00:00:00:02", net_id="net1", model="e1000")[3] == \
        "e1000,netdev=net1,mac=52:54:00:00:00:02"


def test_guest_agent_args() -> None:
    assert qemu.guest_agent_args("/g.sock") == [
        "-chardev", "socket,id=qga0,path=/g.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=vserial0",
        "-device", "virtserialport,bus=vserial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]


def full_spec() -> VmSpec:
    return VmSpec(
        name="vm0", accel="tcg", memory=1 << 30, cpus=2,
        kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"), append="root=/dev/vda",
        disks=(Disk(Path("/run/vm0.qcow2")), Disk(Path("/shared.raw"), fmt="raw", serial="s1")),
        seed=Path("/run/seed.iso"), serial_socket=Path("/run/console.sock"),
        serial_log=Path("/run/console.log"), qmp_socket=Path("/run/qmp.sock"),
        guest_agent_socket=Path("/run/qga.sock"), fam=SharedMemory(Path("/dev/shm/f"), 1 << 20),
        nics=(Nic(7, "52:54:00:00:00:07"),), extra=("-rtc", "base=utc"),
    )


def test_build_argv_composes_every_fragment_in_order() -> None:
    spec = full_spec()
    argv = qemu.build_argv(spec)
    assert argv[:3] == ["qemu-system-x86_64", "-name", "vm0,process=qemu-vm0"]
    text = " ".join(argv)
    for fragment in (qemu.base_args(), qemu.machine_args("tcg"), qemu.memory_args(1 << 30, 2),
                     qemu.kernel_args("/img/vmlinuz", "/img/initrd.img", "root=/dev/vda"),
                     qemu.ivshmem_args("/dev/shm/f", 1 << 20),
                     qemu.drive_args("/run/vm0.qcow2", drive_id="disk0"),
                     qemu.seed_args("/run/seed.iso"), qemu.nic_args(7, "52:54:00:00:00:07"),
                     qemu.serial_args(socket="/run/console.sock", log="/run/console.log"),
                     qemu.qmp_args("/run/qmp.sock"), qemu.guest_agent_args("/run/qga.sock")):
        assert " ".join(fragment) in text
    # The root disk is the first virtio disk (/dev/vda), before the seed; the
    # ivshmem device is placed before any automatically placed PCI device.
    ivshmem = argv.index("ivshmem-plain,memdev=fam,addr=0x4")
    assert ivshmem < argv.index("virtio-blk-pci,drive=disk0")
    assert argv.index("virtio-blk-pci,drive=disk0") < argv.index("virtio-blk-pci,drive=seed")
    assert argv[-2:] == ["-rtc", "base=utc"]
    assert spec.pass_fds() == (7,)


def test_build_argv_minimal() -> None:
    argv = qemu.build_argv(VmSpec(name="t"))
    assert argv == ["qemu-system-x86_64", "-name", "t,process=qemu-t", "-nodefaults",
                    "-nographic", "-no-user-config", "-machine", "pc", "-accel", "tcg",
                    "-cpu", "qemu64", "-m", "512M", "-smp", "1",
                    "-chardev", "null,id=serial0", "-serial", "chardev:serial0",
                    "-device", "virtio-rng-pci"]
    assert "virtio-rng-pci" not in qemu.build_argv(VmSpec(name="t", entropy=False))


def test_build_argv_refuses_initrd_without_kernel() -> None:
    with pytest.raises(ValueError, match="need a kernel"):
        qemu.build_argv(VmSpec(name="t", initrd=Path("/i")))


def test_show_argv_quotes_for_a_shell() -> None:
    assert qemu.show_argv(["qemu", "-append", "root=/dev/vda console=ttyS0"]) == \
        "qemu -append 'root=/dev/vda console=ttyS0'"


@pytest.mark.qemu
def test_qemu_accepts_the_composed_command_line(tmp_path: Path) -> None:
    """The real QEMU parses the full argv (every device exists); it stops before running."""
    disk = tmp_path / "d,1.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"])
    seed = tmp_path / "seed.iso"
    write_seed(seed, meta_data=meta_data("i-0", "parse"), user_data="#cloud-config\n")
    fam = tmp_path / "fam"
    fam.write_bytes(b"\0" * (1 << 20))
    spec = VmSpec(name="parse", disks=(Disk(disk),), seed=seed, seed_interface="cdrom",
                  serial_log=tmp_path / "c.log", qmp_socket=tmp_path / "q.sock",
                  guest_agent_socket=tmp_path / "g.sock", fam=SharedMemory(fam, 1 << 20),
                  extra=("-S", "-no-shutdown", "-action", "reboot=shutdown"))
    argv = qemu.build_argv(spec)
    # -S: no CPU runs; the QMP socket exists once QEMU parsed and created everything.
    proc = spawn(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "q.sock").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_rootless_nic_backends() -> None:
    switch = qemu.nic_args(qemu.VdeSwitch(Path("/run/user/1000/sw,1")), "52:54:00:00:00:03")
    assert switch[:2] == ["-netdev", "vde,id=net0,sock=/run/user/1000/sw,,1"]
    user = qemu.nic_args(qemu.UserNet(ssh_port=20022), "52:54:00:00:00:04", net_id="net1")
    assert user[1] == ("user,id=net1,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,"
                       "dhcpstart=10.0.2.15,hostfwd=tcp:127.0.0.1:20022-:22")
    spec = VmSpec(name="vm0", nics=(Nic(qemu.UserNet(), "52:54:00:00:00:05"), Nic(
        9, "52:54:00:00:00:06")))
    assert spec.pass_fds() == (9,)  # only taps are inherited
