"""vcluster save's cost: revision size over bytes changed, and save time, for 10, 50 and 200 MB
changed, next to a plain ``qemu-img convert`` of the whole disk, in one run.

A running QEMU has the debian test image's disk under a qcow2 overlay, as a
VM's runner starts it (the root drive ``disk0``, the tools monitor), with no
machine to boot: the changes are written through QEMU's own block layer
(``qemu-io`` on the monitor, 1 MiB writes of varied patterns), the path a guest's writes take
to its overlay.  For each change size, on two bases (the image as built,
and the same with 1 GiB more data in its base), one layered save
(``vm/save.save_vm``, as ``vcluster save`` runs it) of that change alone
is timed, and its revision's size on disk is compared with the bytes
changed (target: at most 1.1 x, plus 1 MiB).  Then ``qemu-img convert`` of
the VM's whole disk (base and overlay) to a new qcow2 is timed: what a save
that copied the disk would cost.

    python3 bench/save.py [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as ``python3 bench/save.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "bench/save.py"
CHANGES_MB = (10, 50, 200)
EXTRA_BASE = 1 << 30


def fail(message: str) -> None:
    raise SystemExit(f"{NAME}: {message}")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


class Vm:
    """A QEMU running a disk: overlay over ``base``; changes written through QEMU."""

    def __init__(self, root: Path, base: Path) -> None:
        from vcluster.hostpaths import VmFiles

        self.files = VmFiles(root / "vm0")
        self.files.dir.mkdir(parents=True)
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                 str(self.files.overlay))
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-drive", f"file={self.files.overlay},if=none,id=disk0,format=qcow2",
             "-chardev", f"socket,id=qmp-tools,path={self.files.tools_qmp_socket},server=on,"
                         "wait=off", "-mon", "chardev=qmp-tools,mode=control"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.files.tools_qmp_socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                fail("QEMU did not start")
            time.sleep(0.05)

    def write(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` through QEMU, 1 MiB writes of varied patterns."""
        from vcluster.vm.control import Qmp

        qmp = Qmp(self.files.tools_qmp_socket, "bench")
        qmp.connect(time.monotonic() + 10, lambda: self.proc.poll() is None)
        try:
            step = 1 << 20
            for i, at in enumerate(range(offset, offset + length, step)):
                qmp.execute("human-monitor-command", {
                    "command-line": f"qemu-io disk0 \"write -P {(i * 37 + 11) % 255 + 1} {at} "
                                    f"{step}\""}, timeout=60)
            qmp.execute("human-monitor-command", {"command-line": "qemu-io disk0 flush"})
        finally:
            qmp.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def base_image(images: Path, root: Path, extra: int) -> Path:
    """A private standalone copy of the debian image's disk, with ``extra`` bytes more data."""
    from vcluster.images.repo import resolve_image

    image = resolve_image("debian", [images])
    if image.disk is None:
        fail(f"{image.ref} has no disk")
    assert image.disk is not None
    base = root / f"base-{extra}.qcow2"
    qemu_img("convert", "-O", "qcow2", str(image.disk), str(base))
    if extra:
        size = int(json.loads(qemu_img("info", "--output=json", str(base)))["virtual-size"])
        qemu_img("resize", "-q", str(base), str(size + extra))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 3 {size} {extra}",
                        str(base)], check=True, capture_output=True)
    return base


def bench(images: Path) -> None:
    from vcluster.images.repo import Image, ImageInfo, Repository
    from vcluster.vm.save import SaveRequest, save_vm

    with tempfile.TemporaryDirectory(prefix="vcluster-bench-save-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        print(f"{NAME}: layered saves of a running QEMU's disk (debian test image), "
              "changes written through QEMU")
        for extra in (0, EXTRA_BASE):
            work = root / f"extra-{extra}"
            work.mkdir()
            base = base_image(images, work, extra)
            used = base.stat().st_blocks * 512
            repo = Repository(work / "repo")
            with repo.staging("debian") as staging:
                shutil.move(str(base), staging / "disk.qcow2")
                source: Image = repo.commit(staging, ImageInfo(
                    name="debian", kind="disk", files={"disk": "disk.qcow2"}))
            assert source.disk is not None
            print(f"  base with {used / 2**20:.0f} MiB of data:")
            offset = 64 << 20
            for mb in CHANGES_MB:
                vm = Vm(work / f"vm-{mb}", source.disk)
                try:
                    vm.write(offset, mb << 20)
                    started = time.monotonic()
                    saved = save_vm(SaveRequest("1", 0, source, repo, "debian", False, False,
                                                "bench"), vm.files, lambda _: None)
                    took = time.monotonic() - started
                    assert saved.disk is not None
                    size = saved.disk.stat().st_blocks * 512
                    ratio = (size - (1 << 20)) / (mb << 20)
                    verdict = "ok" if size <= 1.1 * (mb << 20) + (1 << 20) else "OVER TARGET"
                    started = time.monotonic()
                    qemu_img("convert", "-U", "-O", "qcow2", str(vm.files.overlay),
                             str(work / f"whole-{mb}.qcow2"))
                    convert = time.monotonic() - started
                    (work / f"whole-{mb}.qcow2").unlink()
                    print(f"    {mb:4d} MB changed: revision {size / 2**20:7.1f} MiB, "
                          f"(size - 1 MiB) / change {ratio:.3f} ({verdict}); save "
                          f"{took:5.2f} s, whole-disk qemu-img convert {convert:5.2f} s "
                          f"({convert / took:.1f} x the save)")
                finally:
                    vm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=Path, default=None,
                        help="the repository holding debian (default $VCLUSTER_TEST_IMAGES "
                             "or /var/cache/vcluster-test/images)")
    args = parser.parse_args()
    from bench.boot_tiny import DEFAULT_IMAGES

    bench((args.images or DEFAULT_IMAGES).absolute())


if __name__ == "__main__":
    main()
