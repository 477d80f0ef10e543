"""A job's FAM regions: ``<directories.run>/jobs/<job>/fam/<name>``.

Why the run directory: it is per host and, at a site, ``/run/vcluster`` on a
tmpfs, so a region is plain memory (QEMU maps it ``share=on``; a disk-backed
file would write the guests' stores back to disk), is gone after a reboot,
and never lands on a shared /dev/shm where every job of every user sits side
by side.  A site that needs regions larger than its /run points
``directories.run`` at a larger tmpfs; a region that does not fit is refused
with that advice.

The directories are the agent's, so root's (``jobs/<job>`` and
``jobs/<job>/fam`` mode 0711: others cannot list them, and the job's user
cannot plant links in them); the
file is the job's user's, mode 0600, sized with ftruncate (sparse: memory is
used as the guests touch it).  Every VM of the job asking for the same name
gets the same file.  Paths come from ``vcluster.hostpaths.HostLayout``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from vcluster.agent.undo import JobLog, Kind, UndoEntry
from vcluster.errors import ResourceError
from vcluster.hostpaths import HostLayout


def _ensure_dir(path: Path, log: JobLog) -> None:
    log.record(UndoEntry(Kind.DIR, str(path)))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o711)
    info = os.lstat(path)
    # The agent's own uid (root's at a site), so that the job's user cannot have made it.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ResourceError(f"{path} is not a directory of the agent's; remove it")
    os.chmod(path, 0o711)


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:g} {unit}"
        size //= 1024
    return str(size)


def ensure_region(layout: HostLayout, log: JobLog, name: str, size: int, uid: int,
                  gid: int) -> Path:
    """The job's region ``name`` of ``size`` bytes, made if missing; its path."""
    path = layout.fam_region(log.job, name)
    try:
        layout.run_jobs.mkdir(mode=0o711, parents=True, exist_ok=True)
        _ensure_dir(layout.run_job(log.job), log)
        _ensure_dir(layout.fam_dir(log.job), log)
    except OSError as e:
        raise ResourceError(f"cannot make {e.filename or path.parent} for FAM region {name}: "
                            f"{e.strerror}") from e
    log.record(UndoEntry(Kind.FILE, str(path)))
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
                raise ResourceError(f"{path} is not a plain file; remove it")
            if new or info.st_size == 0:
                free = os.fstatvfs(fd)
                available = free.f_bavail * free.f_frsize
                if size > available:
                    raise ResourceError(f"FAM region {name} of {_human(size)} does not fit "
                                        f"in {path.parent} ({_human(available)} free); ask "
                                        "for less or point directories.run at a larger tmpfs")
                os.ftruncate(fd, size)
            elif info.st_size != size:
                raise ResourceError(f"FAM region {name} of job {log.job} exists with "
                                    f"{info.st_size} bytes, not {size}; every VM of a job "
                                    "must ask for the same size")
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as e:
        raise ResourceError(f"cannot make FAM region {path}: {e.strerror}") from e
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
        raise ResourceError(f"cannot remove {path}: {e.strerror}") from e
