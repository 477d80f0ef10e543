"""Saving a running QEMU's disk (``vm/save.py``), against real QEMU processes and qemu-img.

No guest is needed to copy a disk: each VM here is a QEMU with no machine
(``-machine none``) whose only device is the root drive ``disk0``, a qcow2
overlay over a revision of a small test image, with its tools monitor on
the VM's socket, as the runner starts it.  Data is written into the
overlay through QEMU (``qemu-io`` on the monitor), so QEMU owns the disk as
it does a guest's.  What is checked is the content: ``qemu-img compare`` of
each saved revision with the VM's own disk, ``qemu-img check`` of every
revision, and what a killed save leaves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_for
from vcluster.hostpaths import HostLayout, VmFiles
from vcluster.images.repo import Image, ImageInfo, Repository
from vcluster.vm.control import Qmp
from vcluster.vm.save import SaveRequest, save_vm

pytestmark = [pytest.mark.qemu]

JOB = "77"
SIZE = 256 << 20


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


@dataclass
class Vm:
    files: VmFiles
    proc: subprocess.Popen[bytes]
    disk: Path = Path()  # its disk0 (default: its overlay)

    def __post_init__(self) -> None:
        if self.disk == Path():
            self.disk = self.files.overlay

    def write(self, offset: int, length: int, pattern: int) -> None:
        """Write ``pattern`` bytes into the VM's disk through QEMU."""
        qmp = Qmp(self.files.tools_qmp_socket, "test")
        qmp.connect(time.monotonic() + 10, lambda: self.proc.poll() is None)
        try:
            # flushed, so that qemu-img reading the overlay beside QEMU sees the data
            for command in (f"write -P {pattern} {offset} {length}", "flush"):
                out = qmp.execute("human-monitor-command", {
                    "command-line": f"qemu-io disk0 \"{command}\""}, timeout=60)
                assert "error" not in str(out).lower(), out
        finally:
            qmp.close()

    def same_as(self, image: Image) -> bool:
        assert image.disk is not None
        done = subprocess.run(["qemu-img", "compare", "-U", str(self.disk),
                               str(image.disk)], capture_output=True, text=True, check=False)
        return done.returncode == 0


@dataclass
class Site:
    root: Path
    base: Image
    layout: HostLayout

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def user(self) -> Repository:
        return Repository(self.root / "home" / "images")  # $VCLUSTER_HOME/images

    @property
    def site(self) -> Repository:
        return Repository(self.base.repo)

    def request(self, vm: Vm, *, dest: Repository | None = None, name: str = "base",
                full: bool = False, source: Image | None = None) -> SaveRequest:
        return SaveRequest(JOB, int(vm.files.dir.name[2:]), source or self.base,
                           dest or self.site, name, full, False, "tester")

    def save_argv(self, vm: Vm, *extra: str) -> list[str]:
        return [sys.executable, "-m", "vcluster", "internal", "save", "--job", JOB,
                f"--vm={vm.files.dir.name[2:]}", f"--source={self.base.path}",
                f"--dest={self.site.root}", "--name=base", "--no-freeze", *extra]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "VCLUSTER_CONF": str(self.conf)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("save")
    layout = HostLayout(state=root / "state", run=root / "run")
    (root / "conf").mkdir()
    (root / "conf" / "batch.yaml").write_text(json.dumps({"directories": {
        "state": str(layout.state), "run": str(layout.run), "images": str(root / "site")}}))
    repo = Repository(root / "site")
    with repo.staging("base") as staging:
        qemu_img("create", "-q", "-f", "qcow2", str(staging / "disk.qcow2"), str(SIZE))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4M",
                        str(staging / "disk.qcow2")], check=True, capture_output=True)
        (staging / "vmlinuz").write_bytes(b"kernel")
        (staging / "initrd.img").write_bytes(b"initrd")
        base = repo.commit(staging, ImageInfo(
            name="base", kind="disk", recipe="test", append="root=/dev/vda",
            files={"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}))
    return Site(root, base, layout)


@pytest.fixture(scope="module")
def vms(site: Site) -> Iterator[list[Vm]]:
    made = []
    try:
        for index in range(2):
            files = site.layout.vm(JOB, index)
            files.dir.mkdir(parents=True)
            assert site.base.disk is not None
            qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                     str(site.base.disk), str(files.overlay))
            proc = subprocess.Popen(
                ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                 "-drive", f"file={files.overlay},if=none,id=disk0,format=qcow2",
                 "-chardev", f"socket,id=qmp-tools,path={files.tools_qmp_socket},server=on,"
                             "wait=off", "-mon", "chardev=qmp-tools,mode=control"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            made.append(Vm(files, proc))
            wait_for("QEMU's monitor", files.tools_qmp_socket.exists, 10)
        yield made
    finally:
        for vm in made:
            vm.proc.terminate()
            vm.proc.wait(10)


def test_a_layered_save_holds_only_what_the_vm_changed(site: Site, vms: list[Vm]) -> None:
    vm = vms[0]
    vm.write(16 << 20, 8 << 20, 0xAB)
    lines: list[str] = []
    saved = save_vm(site.request(vm), vm.files, lines.append)
    assert saved.info.revision == site.base.info.revision + 1
    assert saved.info.parent == site.base.info.revision and saved.info.made_by == "tester"
    assert vm.same_as(saved)
    assert saved.disk is not None
    info = json.loads(qemu_img("info", "-U", "--output=json", str(saved.disk)))
    assert info["full-backing-filename"] == str(site.base.disk)
    used = saved.disk.stat().st_blocks * 512
    assert used <= 1.1 * (8 << 20) + (1 << 20), used
    assert saved.kernel == site.base.kernel  # shared with the revision it is a layer over
    assert any("warning" not in line and "as base@1" in line for line in lines), lines
    assert vm.proc.poll() is None


def test_a_full_save_into_another_repository_stands_alone(site: Site, vms: list[Vm]) -> None:
    vm = vms[0]
    saved = save_vm(site.request(vm, dest=site.user, name="mine", full=True), vm.files,
                    lambda _: None)
    assert (saved.repo, saved.info.name, saved.info.revision, saved.info.parent) == (
        site.user.root, "mine", 0, None)
    assert vm.same_as(saved)
    assert saved.disk is not None
    info = json.loads(qemu_img("info", "--output=json", str(saved.disk)))
    assert "backing-filename" not in info
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert saved.kernel is not None and saved.kernel.parent == saved.path
    assert saved.kernel.read_bytes() == b"kernel"


def test_a_chain_deeper_than_the_limit_is_flattened(site: Site, vms: list[Vm]) -> None:
    vm = vms[1]
    vm.write(48 << 20, 1 << 20, 0x33)
    request = dataclasses.replace(site.request(vm, name="chain"), dest=site.user, full=True)
    head = save_vm(request, vm.files, lambda _: None)  # chain@0, standalone
    depths = []
    for _ in range(3):
        head = save_vm(dataclasses.replace(request, source=head, full=False, max_depth=2),
                       vm.files, lambda _: None)
        depths.append(head.info.parent)
        assert vm.same_as(head)
    # chain@1 is a layer over chain@0; chain@2 would be 3 deep: flattened; chain@3 over it
    assert depths == [0, None, 2]
    assert head.disk is not None
    info = json.loads(qemu_img("info", "-U", "--output=json", str(head.disk)))
    assert info["full-backing-filename"].endswith("/chain/2/disk.qcow2")


def test_two_concurrent_saves_into_one_image_get_two_revisions(site: Site,
                                                               vms: list[Vm]) -> None:
    vms[1].write(0, 2 << 20, 0x11)
    before = set(site.site.revisions("base"))
    procs = [subprocess.Popen(site.save_argv(vm), env=site.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for vm in vms]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    refs = [out.split()[0] for out, _ in outs]
    assert len(set(refs)) == 2, refs
    assert set(site.site.revisions("base")) - before == {int(r.split("@")[1]) for r in refs}
    for vm, ref in zip(vms, refs, strict=True):
        image = site.site.get("base", int(ref.split("@")[1]))
        assert image is not None and vm.same_as(image)


def test_a_save_killed_at_any_moment_leaves_no_partial_revision(site: Site,
                                                                vms: list[Vm]) -> None:
    vm = vms[0]
    vm.write(32 << 20, 96 << 20, 0x5A)  # enough to copy that a kill lands mid-copy
    started = time.monotonic()
    done = subprocess.run(site.save_argv(vm), env=site.env, capture_output=True, text=True,
                          check=False)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    rng = random.Random(20261201)
    for _ in range(20):
        proc = subprocess.Popen(site.save_argv(vm), env=site.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, took))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert vm.proc.poll() is None, "QEMU died with the save"
        for rev in site.site.revisions("base"):
            image = site.site.get("base", rev)
            assert image is not None and image.disk is not None
            check = subprocess.run(["qemu-img", "check", "-U", str(image.disk)],
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, (rev, check.stdout, check.stderr)
        assert all(n.isdigit() or n.startswith(".") for n in
                   (p.name for p in (site.site.root / "base").iterdir())), "a visible partial"
    saved = save_vm(site.request(vm), vm.files, lambda _: None)
    assert vm.same_as(saved)
    # the next save swept what the killed ones staged
    assert [p.name for p in site.site.root.iterdir() if p.name.startswith(".")] == []
    print(f"a save of 96 MiB took {took:.2f} s; 20 kills within it")


# -- the image commands, on the same repositories -------------------------------------

def image_cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vcluster", "image", *args],
                          env={**site.env, "VCLUSTER_HOME": str(site.root / "home")},
                          capture_output=True, text=True, check=False, timeout=300)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_then_export_round_trips_the_content(site: Site, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(3 << 20) + bytes(5 << 20))
    made = image_cli(site, "import", "-t", "raw", str(raw), "user:imported")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("imported@0 ")
    out = tmp_path / "back.raw"
    done = image_cli(site, "export", "-t", "raw", "user:imported", str(out))
    assert done.returncode == 0, done.stderr
    assert sha256(out) == sha256(raw)
    listing = image_cli(site, "list", "-R", "user", "^imp")
    assert listing.stdout.splitlines()[1].split()[:2] == ["user:imported@0", "disk"]


def test_copy_and_resize_make_new_revisions(site: Site, tmp_path: Path) -> None:
    copied = image_cli(site, "copy", "site:base@0", "user:copied")
    assert copied.returncode == 0, copied.stderr
    grown = image_cli(site, "resize", "user:copied", "512M")
    assert grown.returncode == 0, grown.stderr
    ref, path = grown.stdout.split()
    assert ref == "copied@1"
    info = json.loads(qemu_img("info", "--output=json", f"{path}/disk.qcow2"))
    assert info["virtual-size"] == 512 << 20
    assert json.loads((Path(path) / "image.json").read_text())["parent"] == 0
    shrink = image_cli(site, "resize", "user:copied", "1M")
    assert shrink.returncode == 2 and "a disk only grows" in shrink.stderr


def test_delete_refuses_a_base_of_another_revision_or_one_in_use(site: Site,
                                                                 vms: list[Vm]) -> None:
    assert (site.user.root / "copied" / "1").is_dir()
    refused = image_cli(site, "delete", "user:copied@0")
    assert refused.returncode == 2, refused.stderr
    assert "image copied@0 is the base of copied@1: delete those first" in refused.stderr
    # base@0 backs the running QEMUs' disks (and the saved layers too)
    refused = image_cli(site, "delete", "site:base@0")
    assert refused.returncode == 2 and "is the base of" in refused.stderr, refused.stderr
    gone = image_cli(site, "delete", "user:copied")  # newest first: @1, then @0
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines() == ["deleted copied@1", "deleted copied@0"]
    assert not (site.user.root / "copied").exists()
    missing = image_cli(site, "delete", "user:copied@7")
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1


def test_a_revision_a_qemu_uses_is_not_deleted(site: Site, vms: list[Vm]) -> None:
    from vcluster.images.manage import in_use_here

    assert in_use_here(site.base)  # the VMs' overlays are over it
    made = image_cli(site, "import", str(site.user.root / "imported" / "0" / "disk.qcow2"),
                     "user:idle")
    assert made.returncode == 0, made.stderr
    idle = Repository(site.user.root).get("idle")
    assert idle is not None and not in_use_here(idle)


def test_gc_removes_only_what_nothing_references(site: Site) -> None:
    repo = site.user.root
    revision = repo / "imported" / "0"
    (revision / "stray.tmp").write_text("left over")
    (repo / ".build-dead-1").mkdir()
    (repo / ".delete-old-2").mkdir()
    (repo / "empty").mkdir()
    before = {p: sha256(p) for p in repo.rglob("*") if p.is_file() and p.name != "stray.tmp"
              and ".build-" not in str(p) and ".delete-" not in str(p)}
    done = image_cli(site, "gc", "-R", "user")
    assert done.returncode == 0, done.stderr
    removed = {line.removeprefix("removed ") for line in done.stdout.splitlines()}
    assert removed == {str(revision / "stray.tmp"), str(repo / ".build-dead-1"),
                       str(repo / ".delete-old-2"), str(repo / "empty")}
    assert {p: sha256(p) for p in before} == before


def test_a_data_disk_is_saved_as_a_layer_over_its_image(site: Site, tmp_path: Path) -> None:
    """A VM's second drive (a template's disk started from an image), saved with -i."""
    from tests.support_vm import fake_tiny_boot, vm_plan
    from vcluster.cluster import DiskPlan
    from vcluster.vm.disks import make_disks

    data_repo = site.user
    with data_repo.staging("data") as staging:
        qemu_img("create", "-q", "-f", "qcow2", str(staging / "disk.qcow2"), str(8 << 20))
        data = data_repo.commit(staging, ImageInfo(name="data", kind="disk",
                                                   files={"disk": "disk.qcow2"}))
    assert data.disk is not None
    files = site.layout.vm("78", 0)
    files.dir.mkdir(parents=True)
    plan = dataclasses.replace(vm_plan(0, fake_tiny_boot()), disks=(
        DiskPlan("data", 32 << 20, False, data.ref, data.disk, data.repo),))
    make_disks(plan, files)  # a layer over data@0, grown to the template's size
    disk = files.disk("data")
    info = json.loads(qemu_img("info", "--output=json", str(disk)))
    assert (info["virtual-size"], info["full-backing-filename"]) == (32 << 20, str(data.disk))
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-drive", f"file={disk},if=none,id=disk0,format=qcow2",
         "-chardev", f"socket,id=qmp-tools,path={files.tools_qmp_socket},server=on,wait=off",
         "-mon", "chardev=qmp-tools,mode=control"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("QEMU's monitor", files.tools_qmp_socket.exists, 10)
        vm = Vm(files, proc, disk)
        vm.write(1 << 20, 1 << 20, 0x42)
        request = SaveRequest("78", 0, data, data_repo, "data", False, False, "tester",
                              device="disk0", what="disk 'data'")
        saved = save_vm(request, files, lambda _: None)
        assert (saved.ref, saved.info.parent, saved.info.source) == (
            "data@1", 0, "disk 'data' of vm0 of job 78 (data@0)")
        assert vm.same_as(saved)
    finally:
        proc.terminate()
        proc.wait(10)
