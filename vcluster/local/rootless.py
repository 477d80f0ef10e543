"""A local cluster's devices made without root, before its VMs start.

Every local cluster's nat networks are QEMU's user-mode NAT: the machine's
forwarding and firewall stay as they are, whoever runs it.  For a normal
user, what the agent makes as root has a rootless stand-in here as well,
all of it the user's and none of it reachable from outside the machine:

- a private network is a ``vde_switch`` on a unix socket in the job's run
  directory (``<run>/jobs/<job>/net-<name>``); each VM's NIC is a port on
  it (QEMU ``-netdev vde``).  The switch reads commands on its stdin and
  ends when that closes, so it is started with a pipe the launcher holds:
  however the launcher ends, even killed, its switches end with it.
- a nat network is QEMU's user-mode NAT (slirp, ``-netdev user``), with ssh
  forwarded from a free port on 127.0.0.1 to the guest's port 22.
- a FAM region is a file of the region's size in the job's run directory
  (``<run>/jobs/<job>/fam/<name>``, 0600), shared by every VM naming it.

``prepare`` makes all of it and writes the job's devices file for the
runners (``vcluster.vm.userdevices``); ``Made.remove`` undoes it.  The pids of the
switches go into the job's ``LocalJob`` record, for ``local.reconcile``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vcluster import codec, files
from vcluster.agent.protocol import FamRegion
from vcluster.cluster import ClusterPlan
from vcluster.errors import ResourceError
from vcluster.hostpaths import HostLayout
from vcluster.networks.nat import KIND as NAT
from vcluster.networks.nat import free_port
from vcluster.networks.private import KIND as PRIVATE
from vcluster.run import spawn, stop
from vcluster.vm.userdevices import LocalDevices, Port, VmPorts

SWITCH = "vde_switch"
SWITCH_WAIT = 10.0  # seconds a switch gets to make its socket
SWITCH_STOP = 5.0


def missing_tools(plan: ClusterPlan) -> str | None:
    """What a rootless cluster of ``plan`` needs that this machine lacks, in one line."""
    if plan.private_networks() and shutil.which(SWITCH) is None:
        return (f"{SWITCH} not found: a normal user's private network is a user-space switch "
                "(install the vde2 package: apt-get install vde2)")
    return None


@dataclass
class Made:
    """Everything ``prepare`` made for one job, and how to undo it."""

    layout: HostLayout
    job: str
    rootless: bool
    switches: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def switch_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.switches.items()}

    def remove(self) -> None:
        """Stop the switches (their stdin closes: they clean up and end), remove the files."""
        for proc in self.switches.values():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.switches.values():
            stop(proc, SWITCH_STOP, signum=None)
        remove_job_files(self.layout, self.job, rootless=self.rootless)


def remove_job_files(layout: HostLayout, job: str, *, rootless: bool = True) -> None:
    """The job's devices file and (rootless) its run and work directories, whatever is
    in them (root's are the agent's to remove, by its undo log)."""
    with contextlib.suppress(FileNotFoundError):
        layout.local_devices(job).unlink()
    if rootless:
        for path in (layout.run_job(job), layout.work_dir(job)):
            shutil.rmtree(path, ignore_errors=True)


def _own_dir(path: Path) -> None:
    """``path`` as a directory of ours alone (0700), refusing one of somebody else's."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        raise ResourceError(f"{path} is not a directory of yours: remove it, or set "
                            "XDG_RUNTIME_DIR / XDG_STATE_HOME to directories you own")
    path.chmod(0o700)


def _start_switch(sock: Path) -> subprocess.Popen[bytes]:
    # stdin: a pipe we hold and never write; its end is the switch's end.
    proc = spawn(["setpriv", "--pdeathsig", "TERM", "--", SWITCH, "-s", str(sock)],
                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 process_group=0)
    deadline = time.monotonic() + SWITCH_WAIT
    while not (sock / "ctl").exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise ResourceError(f"{SWITCH} -s {sock} ended at once: "
                                f"{err.splitlines()[-1] if err else proc.returncode}")
        if time.monotonic() > deadline:
            stop(proc, 1.0)
            raise ResourceError(f"{SWITCH} made no socket in {sock} within {SWITCH_WAIT:g} s")
        time.sleep(0.02)
    return proc


def prepare(job: str, plan: ClusterPlan, layout: HostLayout, made: Made, *,
            rootless: bool) -> LocalDevices:
    """Make the job's devices (recorded in ``made`` as they come); the runners' view of them.

    Without ``rootless`` (root's cluster) only the ssh ports: root's agent makes
    the rest (taps on bridges, FAM regions).
    """
    if rootless:
        for root in (layout.state, layout.run, layout.work_root, layout.run_jobs):
            _own_dir(root)
        _own_dir(layout.work_dir(job))
        _own_dir(layout.run_job(job))
    else:
        layout.run.mkdir(mode=0o755, parents=True, exist_ok=True)
    regions: dict[str, FamRegion] = {}
    switches: dict[str, Path] = {}
    if rootless:
        for name in plan.private_networks():
            sock = layout.run_job(job) / f"net-{name}"
            made.switches[name] = _start_switch(sock)
            switches[name] = sock
    vms: dict[str, VmPorts] = {}
    for vm in plan.vms:
        ports = []
        for nic in vm.nics:
            if nic.type == NAT.name:
                ports.append(Port(nic.network, "user", ssh_port=free_port()))
            elif nic.type == PRIVATE.name:
                ports.append(Port(nic.network, "switch", switch=switches[nic.network])
                             if rootless else Port(nic.network, "tap"))
            else:
                raise ResourceError(f"network {nic.network!r} is of type {nic.type}, which a "
                                    "local cluster cannot make (private and nat only)")
        region = None
        if vm.fam is not None and rootless:
            region = regions.get(vm.fam.name)
            if region is None:
                region = regions[vm.fam.name] = _fam_file(layout, job, vm.fam.name, vm.fam.size)
        vms[str(vm.index)] = VmPorts(tuple(ports), region)
    devices = LocalDevices(layout.work_dir(job), vms)
    files.write_atomically(layout.local_devices(job), codec.to_json(devices, indent=2))
    return devices


def _fam_file(layout: HostLayout, job: str, name: str, size: int) -> FamRegion:
    """A FAM region as a file of the user's (0600) of ``size`` bytes."""
    path = layout.fam_region(job, name)
    _own_dir(path.parent)
    with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), "wb") as f:
        f.truncate(size)
    return FamRegion(path, size)
