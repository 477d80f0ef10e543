"""The VM runner's pure parts: plan -> QEMU argv, seed contents, readiness matching."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support_vm import SSH_KEY, cluster_spec, disk_boot, vm_plan
from vcluster.cluster import BootPlan, FamPlan, Readiness, mac_address
from vcluster.hostpaths import VmFiles
from vcluster.qemu import FAM_PCI_ADDR, SharedMemory, build_argv
from vcluster.seed import read_seed, write_seed
from vcluster.vm import guest, machine
from vcluster.vm.readiness import LogWatcher, ReadyMatcher

TINY = BootPlan(image="tiny@2", kind="initramfs", kernel=Path("/img/vmlinuz"),
                initrd=Path("/img/initrd"), disk=None, append="console=ttyS0 quiet",
                readiness=Readiness.TINY_INIT)
FILES = VmFiles(Path("/tmp/vcluster-0/job-7/vm1"))


def argv_of(**kw: object) -> list[str]:
    vm = vm_plan(1, kw.pop("boot", TINY), **kw)  # type: ignore[arg-type]
    spec = cluster_spec("7", [vm_plan(0, TINY), vm])
    fam = SharedMemory(Path("/run/vc/jobs/7/fam/fam"), 1 << 26) if vm.fam else None
    return build_argv(machine.vm_spec(spec, vm, FILES, accel="tcg",
                                      nics=[10 + n for n in range(len(vm.nics))], fam=fam))


def after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tiny_argv_has_every_device() -> None:
    argv = argv_of(fam=FamPlan("fam", 1 << 26), qemu_args=("-device", "virtio-rng-pci"))
    assert argv[0] == "qemu-system-x86_64"
    assert after(argv, "-accel") == ["tcg"] and after(argv, "-cpu") == ["qemu64"]
    assert after(argv, "-kernel") == ["/img/vmlinuz"] and after(argv, "-initrd") == ["/img/initrd"]
    devices = after(argv, "-device")
    assert f"ivshmem-plain,memdev=fam,addr={FAM_PCI_ADDR:#x}" in devices
    assert "memory-backend-file,id=fam,share=on,mem-path=/run/vc/jobs/7/fam/fam,size=67108864" \
        in after(argv, "-object")
    assert after(argv, "-netdev") == ["tap,id=net0,fd=10"]
    assert f"virtio-net-pci,netdev=net0,mac={mac_address('7', 1, 0)}" in devices
    chardevs = after(argv, "-chardev")
    assert any(c.startswith("socket,id=serial0,path=/tmp/vcluster-0/job-7/vm1/console.sock,"
                            "server=on,wait=off,logfile=/tmp/vcluster-0/job-7/vm1/console.log")
               for c in chardevs)
    assert any("id=qmp,path=/tmp/vcluster-0/job-7/vm1/qmp.sock" in c for c in chardevs)
    assert any("id=qga0,path=/tmp/vcluster-0/job-7/vm1/qga.sock" in c for c in chardevs)
    assert any("name=org.qemu.guest_agent.0" in d for d in devices)
    # the seed is the only disk of an initramfs VM; the template's arguments come last
    assert after(argv, "-drive") == ["file=/tmp/vcluster-0/job-7/vm1/seed.iso,if=none,id=seed,"
                                     "format=raw,readonly=on"]
    assert argv[-2:] == ["-device", "virtio-rng-pci"]


def test_disk_vm_boots_its_overlay_and_keeps_the_template_cpu() -> None:
    argv = argv_of(boot=disk_boot(), nics=2, cpu_model="Haswell", memory=1 << 30)
    drives = after(argv, "-drive")
    assert drives[0] == "file=/tmp/vcluster-0/job-7/vm1/root.qcow2,if=none,id=disk0,format=qcow2"
    assert drives[1].startswith("file=/tmp/vcluster-0/job-7/vm1/seed.iso")
    assert after(argv, "-cpu") == ["Haswell"] and after(argv, "-m") == ["1024M"]
    assert after(argv, "-netdev") == ["tap,id=net0,fd=10", "tap,id=net1,fd=11"]


def test_taps_and_fam_must_match_the_plan() -> None:
    vm = vm_plan(0, TINY, nics=1)
    spec = cluster_spec("7", [vm])
    with pytest.raises(ValueError, match="1 NICs but 0 backends"):
        machine.vm_spec(spec, vm, FILES, accel="tcg")
    with pytest.raises(ValueError, match="FAM"):
        machine.vm_spec(spec, vm, FILES, accel="tcg", nics=[3],
                        fam=SharedMemory(Path("/x"), 4096))


def test_overlay_uses_an_absolute_backing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    monkeypatch.chdir(tmp_path)
    argv = machine.overlay_argv(Path("base.qcow2"), "qcow2", Path("o.qcow2"))
    assert argv[argv.index("-b") + 1] == str(tmp_path / "base.qcow2")
    assert argv[argv.index("-F") + 1] == "qcow2"


def read_back(spec_vm: int, tmp_path: Path, **kw: object) -> dict[str, str]:
    vms = [vm_plan(i, kw.get("boot", TINY), user_data=kw.get("user_data"))  # type: ignore[arg-type]
           for i in range(3)]
    spec = cluster_spec("42", vms)
    files = guest.seed_files(spec, vms[spec_vm])
    path = tmp_path / "seed.iso"
    write_seed(path, meta_data=files.meta_data, user_data=files.user_data,
               network_config=files.network_config)
    return read_seed(path)


def test_cloud_init_seed_sets_what_vcluster_promises(tmp_path: Path) -> None:
    seed = read_back(1, tmp_path, boot=disk_boot(),
                     user_data="#cloud-config\nruncmd: [[touch, /tmp/x]]\nhostname: evil\n")
    meta = yaml.safe_load(seed["meta-data"])
    assert meta == {"instance-id": "vcluster-42-vm1", "local-hostname": "vm1"}
    user = yaml.safe_load(seed["user-data"])
    assert seed["user-data"].startswith("#cloud-config")
    assert user["hostname"] == "vm1" and user["manage_etc_hosts"] is True
    assert user["ssh_authorized_keys"] == [SSH_KEY]
    assert user["final_message"] == "vcluster: vm1 ready after $UPTIME s"
    assert user["runcmd"] == [["touch", "/tmp/x"]]
    hosts = user["write_files"][0]["content"]
    for i in range(3):
        assert f"10.77.0.{i + 1} vm{i}" in hosts
    net = yaml.safe_load(seed["network-config"])
    assert net["config"] == [{"type": "physical", "name": "eth0",
                              "mac_address": mac_address("42", 1, 0), "mtu": 1450,
                              "subnets": [{"type": "static", "address": "10.77.0.2/24"}]}]


def test_tiny_seed_is_a_script_that_writes_hosts_then_runs_the_template(tmp_path: Path) -> None:
    template = "#!/bin/sh\necho template ran\nVCLUSTER_TEMPLATE\n"
    seed = read_back(2, tmp_path, user_data=template)
    script = seed["user-data"]
    assert script.startswith("#!/bin/sh\n")
    assert "10.77.0.1 vm0\n10.77.0.2 vm1\n10.77.0.3 vm2\n" in script
    # a delimiter line inside the template does not end the here-document early
    assert "<<'VCLUSTER_TEMPLATE_'\n" + template + "VCLUSTER_TEMPLATE_\n" in script
    assert script.rstrip().endswith("exec /run/vcluster-template-user-data")


def test_ready_markers() -> None:
    assert guest.ready_marker(vm_plan(3, TINY)) == "vcluster-tiny: ready hostname=vm3"
    assert guest.ready_marker(vm_plan(3, disk_boot())) == "vcluster: vm3 ready after"
    assert guest.tiny_ignores_user_data(vm_plan(0, TINY, user_data="#cloud-config\n{}"))
    assert not guest.tiny_ignores_user_data(vm_plan(0, TINY, user_data="#!/bin/sh\n"))


def test_matcher_needs_a_whole_word_and_handles_split_lines() -> None:
    m = ReadyMatcher("vcluster-tiny: ready hostname=vm1")
    assert not m.feed("vcluster-tiny: ready hostname=vm10\r\n")
    assert not m.feed("[  2.0] vcluster-tiny: ready host")
    assert not m.feed("name=vm1")  # the line is not complete yet
    assert m.feed("\r\n")
    assert m.feed("anything")  # stays matched


def test_log_watcher_follows_a_growing_file(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    watcher = LogWatcher(log, "vcluster: vm0 ready after")
    assert not watcher.poll()  # no file yet
    log.write_bytes(b"Booting...\r\ncloud-init: vcluster: vm0 re")
    assert not watcher.poll()
    with open(log, "ab") as f:
        f.write(b"ady after 41.5 s\r\n")
    assert watcher.poll()
