"""Where a VM's files live on its host: ``<job work directory>/vm<i>``.

Overlay, seed, extra disks, the console and QMP sockets, the console log and
QEMU's stderr all go in the VM's directory inside the job's work directory,
which the host agent makes (the job user's, mode 0700, so other users cannot
reach the sockets) and removes with everything in it when the job ends,
however it ends.  ``console-attach`` finds the same directory from this
host's configuration, the job id and the VM index alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from vcluster.errors import VclusterError


def job_workdir(state: Path, job: str) -> Path:
    """The job's work directory on this host (``directories.state`` of batch.yaml)."""
    from vcluster.agent.workdir import work_path

    return work_path(state, job)


@dataclass(frozen=True)
class VmFiles:
    """The paths of one VM's files (nothing here touches the disk)."""

    dir: Path

    @classmethod
    def of(cls, workdir: Path, index: int) -> VmFiles:
        return cls(workdir / f"vm{index}")

    @property
    def overlay(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.iso"

    @property
    def console_socket(self) -> Path:
        return self.dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.dir / "qga.sock"

    @property
    def qemu_stderr(self) -> Path:
        return self.dir / "qemu.stderr"

    def disk(self, name: str) -> Path:
        return self.dir / f"disk-{name}.qcow2"


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
