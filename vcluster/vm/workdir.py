"""Making and removing a VM's directory on its host: ``<job work directory>/vm<i>``.

Overlay, seed, extra disks, the console and QMP sockets, the console log and
QEMU's stderr all go in the VM's directory inside the job's work directory,
which the host agent makes (the job user's, mode 0700, so other users cannot
reach the sockets) and removes with everything in it when the job ends,
however it ends.  The paths themselves are ``vcluster.hostpaths``'s, so
``console-attach`` finds the same directory from this host's configuration,
the job id and the VM index alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat

from vcluster.errors import VclusterError
from vcluster.hostpaths import VmFiles


def make_vm_dir(files: VmFiles) -> None:
    """The VM's directory, in the job's work directory (which must be ours and private)."""
    workdir = files.dir.parent
    info = os.lstat(workdir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise VclusterError(f"{workdir} is not your private work directory for this job "
                            "(the agent makes it, yours and mode 0700)")
    with contextlib.suppress(FileExistsError):
        os.mkdir(files.dir, 0o700)


def remove_vm_files(files: VmFiles) -> None:
    """Remove the VM's directory (the agent removes the job's work directory at the end)."""
    shutil.rmtree(files.dir, ignore_errors=True)
