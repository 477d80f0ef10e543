"""A job's work directory on this host: ``<directories.state>/work/<job>``.

The VM runners keep everything of their VMs there (qcow2 overlays, seeds,
extra disks, console and QMP sockets, logs).  The agent makes it, owned by
the job's user and mode 0700 (other users cannot reach the sockets), and
records it in the job's undo log, so release removes the whole tree even when
a runner was killed with SIGKILL.  It lives under ``directories.state``
(disk), not the tmpfs of ``directories.run``: overlays grow with the guests'
writes.  The tree is the user's; it is removed with ``shutil.rmtree``, which
on Linux works through directory file descriptors and never follows a link
the user planted.  Its path comes from ``vcluster.hostpaths.HostLayout``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from vcluster.agent.undo import JobLog, Kind, UndoEntry
from vcluster.errors import ResourceError
from vcluster.hostpaths import HostLayout


def ensure_workdir(layout: HostLayout, log: JobLog, uid: int, gid: int) -> Path:
    """The job's work directory, made (and recorded) if missing; its path."""
    path = layout.work_dir(log.job)
    try:
        layout.work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        log.record(UndoEntry(Kind.TREE, str(path)))
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
        # Made by the agent (root at a site) and then given away, or the user's already.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (os.geteuid(), uid):
            raise ResourceError(f"{path} is not the job's work directory; remove it")
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, 0o700, follow_symlinks=False)
    except OSError as e:
        raise ResourceError(f"cannot make the work directory {path}: {e.strerror}") from e
    return path


def remove_tree(path: Path) -> None:
    """Remove a work directory and everything in it; missing is fine."""
    assert shutil.rmtree.avoids_symlink_attacks
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ResourceError(f"cannot remove {path}: {e.strerror}") from e
