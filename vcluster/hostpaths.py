"""Every path vcluster uses on a host, built in one place: the host-side twin of store/keys.py.

Two roots come from batch.yaml's ``directories``: ``state`` (disk: undo logs
and the jobs' work directories, whose overlays grow) and ``run`` (a tmpfs at
a site: the agent's socket and the FAM regions, plain memory gone at
reboot)::

    <run>/agent.sock                         the agent's socket
    <run>/jobs/<job>/fam/<name>              a FAM region (the user's, 0600; dirs root's 0711)
    <state>/jobs/<job>/undo.json             the job's undo log (root's, 0700)
    <state>/work/<job>/                      the job's work directory (the user's, 0700)
    <state>/work/<job>/vm<i>/                one VM's files (VmFiles): overlay, seed, disks,
                                             console and QMP sockets, guest-agent socket,
                                             console log, QEMU's stderr

The agent, the VM runner, the console relay, the benchmarks and the tests
all ask this module; nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AGENT_SOCKET = "agent.sock"
UNDO_LOG = "undo.json"


def shared_disk(workdir: Path, name: str) -> Path:
    """The one image of the cluster's shared disk ``name`` on this host, beside the VMs'
    directories in the work directory: every VM of the cluster here attaches it."""
    return workdir / f"shared-{name}.raw"


@dataclass(frozen=True)
class VmFiles:
    """The paths of one VM's files, in its directory inside the job's work directory."""

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
    def tools_qmp_socket(self) -> Path:
        """QEMU's second monitor, for tools such as vcluster save (one client at a time)."""
        return self.dir / "qmp-tools.sock"

    @property
    def save_lock(self) -> Path:
        """Held (flock) by the save of this VM that is running."""
        return self.dir / "save.lock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.dir / "qga.sock"

    @property
    def qemu_stderr(self) -> Path:
        return self.dir / "qemu.stderr"

    def disk(self, name: str) -> Path:
        return self.dir / f"disk-{name}.qcow2"

    def shared_disk(self, name: str) -> Path:
        return shared_disk(self.dir.parent, name)


@dataclass(frozen=True)
class HostLayout:
    """The paths under one host's ``directories.state`` and ``directories.run``."""

    state: Path
    run: Path

    # ------------------------------------------------------------ the run directory

    @property
    def agent_socket(self) -> Path:
        return self.run / AGENT_SOCKET

    @property
    def run_jobs(self) -> Path:
        return self.run / "jobs"

    def run_job(self, job: str) -> Path:
        """The job's directory in the run directory (root's, 0711): its FAM directory."""
        return self.run_jobs / job

    def local_agent_socket(self, job: str) -> Path:
        """Where the launcher of local ``job`` serves its agent (root's local cluster)."""
        return self.run / f"local-{job}.sock"

    def local_devices(self, job: str) -> Path:
        """The devices the launcher of local ``job`` made for its runners (``vm.userdevices``)."""
        return self.run / f"local-{job}.json"

    def fam_dir(self, job: str) -> Path:
        return self.run_job(job) / "fam"

    def fam_region(self, job: str, name: str) -> Path:
        return self.fam_dir(job) / name

    # ------------------------------------------------------------ the state directory

    @property
    def undo_logs(self) -> Path:
        """Where the undo logs live, one directory per job (root's, 0700)."""
        return self.state / "jobs"

    def undo_dir(self, job: str) -> Path:
        return self.undo_logs / job

    def undo_log(self, job: str) -> Path:
        return self.undo_dir(job) / UNDO_LOG

    @property
    def work_root(self) -> Path:
        return self.state / "work"

    def work_dir(self, job: str) -> Path:
        """The job's work directory on this host (made by the agent, the user's, 0700)."""
        return self.work_root / job

    def vm(self, job: str, index: int) -> VmFiles:
        """The files of VM ``index`` of ``job`` on this host."""
        return VmFiles.of(self.work_dir(job), index)

    def job_paths(self, job: str) -> tuple[Path, ...]:
        """Everything a job may have on this host; none of it exists once it is released."""
        return (self.run_job(job), self.undo_dir(job), self.work_dir(job))
