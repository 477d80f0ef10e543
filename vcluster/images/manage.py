"""Managing images in repositories: import, export, copy, delete, resize and gc.

Every new revision is made in a staging directory and committed whole
(``Repository.commit``); a deletion first renames the revision out of
sight, then removes it.  A revision is not deleted while another revision
is a layer over it, or while a QEMU on this host has its disk open (qemu
holds a lock on every image it uses: opening it for writing is refused).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vcluster.errors import ImageError, InputError
from vcluster.images.repo import INFO_FILE, STAGING_PREFIX, Image, ImageInfo, Repository
from vcluster.run import run

QEMU_IMG_TIMEOUT = 3600.0
FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "qed")
DELETING_PREFIX = ".delete-"


def _convert(source: Path, target: Path, fmt: str, *, source_format: str | None = None,
             compress: bool = False, progress: bool = False) -> None:
    argv = ["qemu-img", "convert", "-O", fmt]
    if source_format:
        argv += ["-f", source_format]
    if compress:
        argv += ["-c", "-o", "compression_type=zstd"]
    if progress:
        argv.append("-p")
    run([*argv, "-U", str(source), str(target)], timeout=QEMU_IMG_TIMEOUT, capture=not progress)


def disk_format(path: Path) -> str:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)], timeout=60).stdout
    return str(json.loads(out)["format"])


def virtual_size(path: Path) -> int:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)], timeout=60).stdout
    return int(json.loads(out)["virtual-size"])


def _copy_boot_files(source: Image, staging: Path) -> dict[str, str]:
    """The kernel and initrd of ``source`` copied into ``staging``: role -> file name."""
    files = {}
    for role in ("kernel", "initrd", "initramfs"):
        path = source.file(role)
        if path is not None:
            shutil.copy2(path, staging / path.name)
            files[role] = path.name
    return files


def import_disk(repo: Repository, name: str, disk: Path, *, fmt: str | None = None,
                kernel: Path | None = None, initrd: Path | None = None, append: str = "",
                user: str = "root", made_by: str | None = None,
                progress: bool = False) -> Image:
    """A disk file (any format qemu-img reads) as a new revision of ``name``."""
    if not disk.is_file():
        raise InputError(f"FILE {disk}: no such file")
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"-t {fmt}: not a disk format (expected one of: {', '.join(FORMATS)})")
    with repo.staging(name) as staging:
        _convert(disk, staging / "disk.qcow2", "qcow2", source_format=fmt, compress=True,
                 progress=progress)
        files = {"disk": "disk.qcow2"}
        for role, path in (("kernel", kernel), ("initrd", initrd)):
            if path is not None:
                shutil.copy2(path, staging / path.name)
                files[role] = path.name
        return repo.commit(staging, ImageInfo(name=name, kind="disk", files=files,
                                              append=append, user=user, made_by=made_by,
                                              source=f"imported from {disk}"))


def export_disk(image: Image, target: Path, fmt: str = "qcow2", progress: bool = False) -> None:
    """The image's disk, flattened, written to ``target`` (through a temporary file)."""
    if image.disk is None:
        raise InputError(f"image {image.ref} is a kernel and initramfs: it has no disk to "
                         "export")
    if fmt not in FORMATS:
        raise InputError(f"-t {fmt}: not a disk format (expected one of: {', '.join(FORMATS)})")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    os.close(fd)
    try:
        _convert(image.disk, Path(tmp), fmt, progress=progress)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def copy_image(source: Image, repo: Repository, name: str, made_by: str | None = None,
               progress: bool = False) -> Image:
    """``source`` as a standalone (flattened) new revision of ``name`` in ``repo``."""
    with repo.staging(name) as staging:
        files = _copy_boot_files(source, staging)
        if source.disk is not None:
            _convert(source.disk, staging / "disk.qcow2", "qcow2", compress=True,
                     progress=progress)
            files["disk"] = "disk.qcow2"
        info = ImageInfo(name=name, kind=source.info.kind, files=files,
                         append=source.info.append, user=source.info.user, made_by=made_by,
                         recipe=source.info.recipe, content_hash=source.info.content_hash,
                         source=f"copied from {source.ref} in {source.repo}")
        return repo.commit(staging, info)


def resize_image(image: Image, size: int, made_by: str | None = None) -> Image:
    """A new revision of ``image``: a layer over it whose disk is ``size`` bytes."""
    if image.disk is None:
        raise InputError(f"image {image.ref} is a kernel and initramfs: it has no disk to "
                         "resize")
    current = virtual_size(image.disk)
    if size < current:
        raise InputError(f"SIZE {size}: smaller than the disk of {image.ref} ({current} "
                         "bytes); a disk only grows")
    repo = Repository(image.repo)
    with repo.staging(image.info.name) as staging:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format(image.disk), "-b",
             str(image.disk.resolve()), str(staging / "disk.qcow2"), str(size)], timeout=60)
        files = {role: str(path.resolve()) for role in ("kernel", "initrd")
                 if (path := image.file(role)) is not None}
        files["disk"] = "disk.qcow2"
        info = ImageInfo(name=image.info.name, kind="disk", files=files,
                         parent=image.info.revision, append=image.info.append,
                         user=image.info.user, made_by=made_by,
                         source=f"{image.ref} resized to {size} bytes")
        return repo.commit(staging, info)


def dependents(image: Image) -> list[str]:
    """The revisions that are layers over ``image`` (NAME@REV): only a new revision of the
    same image is ever made a layer (a save, a resize)."""
    repo = Repository(image.repo)
    found = []
    for rev in repo.revisions(image.info.name):
        other = repo.get(image.info.name, rev)
        if other is not None and other.info.parent == image.info.revision:
            found.append(other.ref)
    return found


def in_use_here(image: Image) -> bool:
    """Whether a QEMU of this host has the image's disk open (its lock refuses writers)."""
    if image.disk is None:
        return False
    done = run(["qemu-io", "-c", "quit", str(image.disk)], check=False, timeout=60)
    return done.returncode != 0 and "lock" in (done.stderr + done.stdout).lower()


def delete_revision(image: Image, used_by: Callable[[Image], list[str]]) -> None:
    """Remove one revision; InputError naming what depends on it, if anything does."""
    layers = dependents(image)
    if layers:
        raise InputError(f"image {image.ref} is the base of {', '.join(layers)}: delete "
                         "those first")
    users = used_by(image) + (["a QEMU on this host"] if in_use_here(image) else [])
    if users:
        raise InputError(f"image {image.ref} is in use by {', '.join(users)}: delete it once "
                         "they have ended")
    hidden = image.repo / f"{DELETING_PREFIX}{image.info.name}-{image.info.revision}-{os.getpid()}"
    try:
        os.rename(image.path, hidden)
    except OSError as e:
        raise ImageError(f"cannot delete {image.ref} from {image.repo}: {e.strerror}") from e
    shutil.rmtree(hidden, ignore_errors=True)
    base = image.repo / image.info.name
    if base.is_dir() and not any(base.iterdir()):
        base.rmdir()


def gc(repo: Repository) -> list[Path]:
    """Remove what nothing references: dead staging and deletions, files no image.json
    names, empty image directories; what was removed."""
    removed = repo.sweep()
    if not repo.root.is_dir():
        return removed
    for leftover in repo.root.glob(f"{DELETING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    for name_dir in sorted(p for p in repo.root.iterdir()
                           if p.is_dir() and not p.name.startswith(".")):
        for rev_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            if not (rev_dir / INFO_FILE).is_file():
                continue  # not a revision vcluster made: not ours to judge
            info = ImageInfo.from_json((rev_dir / INFO_FILE).read_text(), rev_dir / INFO_FILE)
            named = {INFO_FILE} | {f for f in info.files.values() if "/" not in f}
            for entry in rev_dir.iterdir():
                if entry.name not in named and not entry.name.startswith(STAGING_PREFIX):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
        if not any(name_dir.iterdir()):
            name_dir.rmdir()
            removed.append(name_dir)
    return removed
