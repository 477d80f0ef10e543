"""A job's FAM regions: ``<directories.run>/jobs/<job>/fam/<name>``.

Why the run directory: it is per host and, at a site, ``/run/vcluster`` on a
tmpfs, so a region is plain memory (QEMU maps it ``share=on``; a disk-backed
file would write the guests' stores back to disk), is gone after a reboot,
and never lands on a shared /dev/shm where every job of every user sits side
by side.  A site that needs regions larger than its /run points
``directories.run`` at a larger tmpfs; a region that does not fit is refused
with that advice.

The directories are root's (``jobs/<job>`` and ``jobs/<job>/fam`` mode 0711:
others cannot list them, and the job's user cannot plant links in them); the
file is the job's user's, mode 0600, sized with ftruncate (sparse: memory is
used as the guests touch it).  Every VM of the job asking for the same name
gets the same file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from vcluster.agent.protocol import failed
from vcluster.agent.undo import JobLog, Kind, UndoEntry


def region_path(run: Path, job: str, name: str) -> Path:
    return run / "jobs" / job / "fam" / name


def _ensure_dir(path: Path, log: JobLog) -> None:
    log.record(UndoEntry(Kind.DIR, str(path)))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o711)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise failed(f"{path} is not a directory of root's; remove it")
    os.chmod(path, 0o711)


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:g} {unit}"
        size //= 1024
    return str(size)


def ensure_region(run: Path, log: JobLog, name: str, size: int, uid: int, gid: int) -> Path:
    """The job's region ``name`` of ``size`` bytes, made if missing; its path."""
    path = region_path(run, log.job, name)
    jobs = path.parent.parent.parent
    jobs.mkdir(mode=0o711, parents=True, exist_ok=True)
    _ensure_dir(path.parent.parent, log)
    _ensure_dir(path.parent, log)
    entry = UndoEntry(Kind.FILE, str(path))
    log.record(entry)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
            new = True
        except FileExistsError:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            new = False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise failed(f"{path} is not a plain file; remove it")
            if new or info.st_size == 0:
                free = os.fstatvfs(fd)
                available = free.f_bavail * free.f_frsize
                if size > available:
                    raise failed(f"FAM region {name} of {_human(size)} does not fit in "
                                 f"{path.parent} ({_human(available)} free); ask for less or "
                                 "point directories.run at a larger tmpfs")
                os.ftruncate(fd, size)
            elif info.st_size != size:
                raise failed(f"FAM region {name} of job {log.job} exists with "
                             f"{info.st_size} bytes, not {size}; every VM of a job must "
                             "ask for the same size")
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as e:
        raise failed(f"cannot make FAM region {path}: {e.strerror}") from e
    finally:
        os.close(dirfd)
    return path


def remove_path(kind: Kind, path: Path) -> None:
    """Remove a file or an (emptied) directory the agent made; missing is fine."""
    try:
        if kind is Kind.FILE:
            path.unlink()
        else:
            path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise failed(f"cannot remove {path}: {e.strerror}") from e
