"""Saving a running VM's disk as an image revision, on the VM's host, as its user.

``vcluster internal save`` (run by ``vcluster save`` through the job) holds
the VM's save lock (``flock``: a dead save holds nothing), then on QEMU's
tools monitor:

1. removes what a killed save left in QEMU (its block job, its target node);
2. makes the target in a hidden staging directory of the destination
   repository: a qcow2 layer over the VM's image (only the VM's own
   changes: ``blockdev-backup sync=top``), or with ``full`` a standalone
   compressed qcow2 of the whole disk (``sync=full``);
3. freezes the guest's file systems through its guest agent (bounded; if
   there is none, or with ``freeze=False``, the save is crash-consistent),
   starts the backup job (its point in time is its start: copy-before-write
   keeps it), and thaws at once; a marker file says the guest is frozen,
   and the VM's runner thaws a guest whose saver died (``thaw_if_abandoned``);
4. waits for the job, printing progress for long copies, then checks the
   target (``qemu-img check``), syncs it and commits the revision
   (``Repository.commit``: renamed into place whole, the next free number).

The VM keeps running throughout; whatever fails, the guest is thawed and
the staging directory removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcluster.errors import VclusterError
from vcluster.hostpaths import VmFiles
from vcluster.images.repo import Image, ImageInfo, Repository
from vcluster.qemu import DISK_ALIAS_PREFIX
from vcluster.run import run
from vcluster.vm.control import Qmp, QmpError

log = logging.getLogger("vcluster")
PREFIX = "vcluster-save"  # of our block jobs and target nodes in QEMU
ROOT_DEVICE = "disk0"  # the root disk's drive id (qemu.build_argv numbers the disks)
FREEZE_TIMEOUT = 30.0
THAW_TIMEOUT = 10.0
JOB_POLL = 0.1
PROGRESS_EVERY = 2.0
QEMU_IMG_TIMEOUT = 600.0


class SaveError(VclusterError):
    """A save that could not be done (nothing was stored)."""


@dataclass(frozen=True)
class SaveRequest:
    """What to save, and where."""

    job: str
    index: int
    source: Image | None  # the image revision the disk started as (None: it was empty)
    dest: Repository
    name: str  # the image to add a revision to (the source's own name, or -d's)
    full: bool  # a standalone, flattened revision (else a layer when the source allows)
    freeze: bool
    made_by: str
    max_depth: int = 16
    device: str = ROOT_DEVICE  # QEMU's drive: disk0 the root disk, then the extra disks
    what: str = "the root disk"  # for messages and the revision's source

    @property
    def layered(self) -> bool:
        """A layer over the source: a new revision of the same image, not too deep."""
        return (self.source is not None and not self.full
                and self.dest.root == self.source.repo
                and self.name == self.source.info.name
                and chain_depth(self.source) < self.max_depth)


def chain_depth(image: Image) -> int:
    """How many layers the image's disk is: 1 for a standalone revision."""
    depth, info = 1, image.info
    repo = Repository(image.repo)
    while info.parent is not None:
        parent = repo.get(info.name, info.parent)
        if parent is None:
            break
        depth, info = depth + 1, parent.info
    return depth


@contextlib.contextmanager
def save_lock(files: VmFiles) -> Iterator[None]:
    """The VM's save lock, held for the block (saves of one VM run one at a time)."""
    with open(files.save_lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def freeze_marker(files: VmFiles) -> Path:
    return files.dir / "frozen-by-save"


def thaw_if_abandoned(files: VmFiles) -> bool:
    """The runner's check: a guest a dead save left frozen is thawed; whether it was."""
    marker = freeze_marker(files)
    if not marker.exists():
        return False
    with open(files.save_lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # the save is alive: it thaws itself
        _thaw(files)
        marker.unlink(missing_ok=True)
    return True


def _thaw(files: VmFiles) -> None:
    from vcluster.vm.guestexec import GuestAgent

    try:
        with GuestAgent(files.guest_agent_socket, "save") as agent:
            if agent.execute("guest-fsfreeze-status", timeout=THAW_TIMEOUT) == "frozen":
                agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
    except VclusterError as e:
        log.warning("could not thaw the guest's file systems: %s", e)


@contextlib.contextmanager
def _frozen(files: VmFiles, wanted: bool, say: Callable[[str], None]) -> Iterator[bool]:
    """The guest's file systems frozen for the block (whether they are), thawed after."""
    from vcluster.vm.guestexec import GuestAgent

    if not wanted:
        say("warning: not freezing the guest (--no-freeze): the save is crash-consistent")
        yield False
        return
    marker = freeze_marker(files)
    with contextlib.ExitStack() as stack:
        try:
            agent = stack.enter_context(GuestAgent(files.guest_agent_socket, "save"))
            marker.touch()
            count = agent.execute("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
        except VclusterError as e:
            if marker.exists():
                _thaw(files)
                marker.unlink(missing_ok=True)
            say(f"warning: cannot freeze the guest's file systems ({e}): the save is "
                "crash-consistent")
            agent = None
        if agent is None:
            yield False
            return
        log.info("froze %s file system(s)", count)
        try:
            yield True
        finally:
            try:
                agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
                marker.unlink(missing_ok=True)
            except VclusterError as e:  # the marker stays: the runner thaws it
                log.warning("could not thaw the guest's file systems: %s", e)


def _forget_stale(qmp: Qmp) -> None:
    """Our block jobs and nodes that a killed save left behind (we hold the lock)."""
    for job in qmp.execute("query-jobs"):
        if str(job.get("id", "")).startswith(PREFIX):
            if job.get("status") not in ("concluded", "null"):
                with contextlib.suppress(QmpError):
                    qmp.execute("job-cancel", {"id": job["id"]})
                _wait_job(qmp, job["id"], lambda _done, _total: None, cancelled=True)
            with contextlib.suppress(QmpError):
                qmp.execute("job-dismiss", {"id": job["id"]})
    for node in qmp.execute("query-named-block-nodes", {"flat": True}):
        if str(node.get("node-name", "")).startswith(PREFIX):
            with contextlib.suppress(QmpError):
                qmp.execute("blockdev-del", {"node-name": node["node-name"]})


def _wait_job(qmp: Qmp, job_id: str, progress: Callable[[int, int], None],
              cancelled: bool = False) -> None:
    """Until the block job has concluded; SaveError with QEMU's reason if it failed."""
    while True:
        jobs = {j["id"]: j for j in qmp.execute("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            return
        progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
        if job.get("status") in ("concluded", "null"):
            if job.get("error") and not cancelled:
                raise SaveError(f"the copy failed: {job['error']}")
            return
        time.sleep(JOB_POLL)


def _block(qmp: Qmp, device: str) -> tuple[str, int]:
    """What blockdev-backup copies for disk ``device`` (``disk0``...), and its virtual size.

    A job VM's QEMU names the drive ``device``; a persistent VM's (libvirt's
    -blockdev) has the disk at its device alias ``ua-<device>`` and names the
    node itself."""
    alias = f"/machine/peripheral/{DISK_ALIAS_PREFIX}{device}/"
    for block in qmp.execute("query-block"):
        inserted = block.get("inserted")
        if inserted is None:
            continue
        size = int(inserted["image"]["virtual-size"])
        if block.get("device") == device:
            return device, size
        if str(block.get("qdev", "")).startswith(alias):
            return str(inserted["node-name"]), size
    raise SaveError(f"QEMU has no disk {device!r}: nothing to save")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Progress:
    """Bytes copied / total and the rate, every few seconds once a copy takes long."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.start = time.monotonic()
        self.last = self.start

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total and now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = done / max(now - self.start, 1e-3)
            self.say(f"copied {_size(done)} of {_size(total)} ({100 * done // total}%), "
                     f"{_size(int(rate))}/s")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def save_vm(request: SaveRequest, files: VmFiles, say: Callable[[str], None]) -> Image:
    """Save one of the VM's disks as a new revision of ``request.name``; the revision."""
    source = request.source
    if source is not None and (source.disk is None or source.info.kind != "disk"):
        raise SaveError(f"image {source.ref} has no disk to save")
    with save_lock(files):
        request.dest.sweep()  # what killed saves and builds left
        return _locked(request, files, say)


def _locked(request: SaveRequest, files: VmFiles, say: Callable[[str], None]) -> Image:
    with request.dest.staging(request.name) as staging:
        qmp = Qmp(files.tools_qmp_socket, f"save-{os.getpid()}")
        try:
            qmp.connect(time.monotonic() + 10, lambda: files.tools_qmp_socket.exists())
            return _save(request, files, qmp, staging, say)
        finally:
            qmp.close()


def _save(request: SaveRequest, files: VmFiles, qmp: Qmp, staging: Path,
          say: Callable[[str], None]) -> Image:
    source = request.source
    _forget_stale(qmp)
    target = staging / "disk.qcow2"
    device, size = _block(qmp, request.device)
    if request.layered:
        assert source is not None and source.disk is not None
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b",
             str(source.disk.resolve()), str(target), str(size)], timeout=60)
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd",
             str(target), str(size)], timeout=60)
    node = f"{PREFIX}-{os.getpid()}"
    job_id = node
    qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                                 "file": {"driver": "file", "filename": str(target)}})
    started = time.monotonic()
    try:
        with _frozen(files, request.freeze, say):
            backup: dict[str, Any] = {"job-id": job_id, "device": device, "target": node,
                                      "sync": "top" if request.layered else "full",
                                      "auto-dismiss": False}
            if not request.layered:
                backup["compress"] = True
            qmp.execute("blockdev-backup", backup)
        _wait_job(qmp, job_id, Progress(say))
    except BaseException:
        with contextlib.suppress(QmpError):
            qmp.execute("job-cancel", {"id": job_id})
        raise
    finally:
        with contextlib.suppress(QmpError):
            _wait_job(qmp, job_id, lambda _d, _t: None, cancelled=True)
        with contextlib.suppress(QmpError):
            qmp.execute("job-dismiss", {"id": job_id})
        with contextlib.suppress(QmpError):
            qmp.execute("blockdev-del", {"node-name": node})
    check = run(["qemu-img", "check", "-q", "--output=json", str(target)], check=False,
                timeout=QEMU_IMG_TIMEOUT)
    if check.returncode != 0:
        raise SaveError(f"the saved disk does not pass qemu-img check: {check.stdout.strip()}")
    _fsync(target)
    files_of = {"disk": "disk.qcow2"}
    for role in ("kernel", "initrd"):
        path = source.file(role) if source is not None else None
        if source is None or path is None:
            continue
        if request.dest.root == source.repo:
            files_of[role] = str(path.resolve())  # shared with the revision it came from
        else:  # standalone in another repository
            shutil.copy2(path, staging / path.name)
            _fsync(staging / path.name)
            files_of[role] = path.name
    origin = f" ({source.ref})" if source is not None else ""
    what = "" if request.what == "the root disk" else f"{request.what} of "
    info = ImageInfo(name=request.name, kind="disk", files=files_of,
                     parent=source.info.revision if source is not None and request.layered
                     else None,
                     append=source.info.append if source is not None else "",
                     user=source.info.user if source is not None else "root",
                     made_by=request.made_by,
                     source=f"{what}vm{request.index} of job {request.job}{origin}")
    image = request.dest.commit(staging, info)
    layer = f"a layer over {source.ref}" if source is not None and request.layered else (
        "standalone")
    say(f"saved {request.what} as {image.ref} in {request.dest.root} ({layer}, "
        f"{_size(target_size(image))}) in {time.monotonic() - started:.1f} s")
    return image


def target_size(image: Image) -> int:
    """Bytes the revision's disk takes on disk."""
    disk = image.disk
    return disk.stat().st_blocks * 512 if disk is not None and disk.exists() else 0
