"""Bringing a sandbox up and tearing it down.

``up`` records each namespace, mount and process in the state file the moment
it exists; if a step fails it tears down what was made and re-raises.
``down`` works from the state file alone, in the reverse order, and is
idempotent: run it again after a failure and it finishes the job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vcluster.errors import SandboxError, VclusterError
from vcluster.rootdirs import not_root_only
from vcluster.sandbox import agents, daemons, network, process, store, vconf
from vcluster.sandbox.state import (
    CONTROLLER,
    CONTROLLER_ADDRESS,
    MAX_HOSTS,
    STATE_FILE,
    Host,
    Process,
    SandboxState,
    host_address,
    host_names,
    load,
    new_id,
)

Progress = Callable[[str], None]
NEEDED = ("munged", "slurmctld", "slurmd", "scontrol", "squeue", "sinfo", "etcd", "etcdctl",
          "openssl", "nsenter", "unshare", "umount", "setpriv")
# Stop order: slurmd first (else it retries slurmctld for 10 s), then the agents (the
# epilog needs them), munged last.
STOP_ORDER = ("slurmd", "agent", "slurmctld", "etcd", "munged")


@dataclass(frozen=True)
class UpOptions:
    hosts: int = 3
    images: Path = Path("/var/lib/vcluster/images")
    cpus: int = 0  # 0: this machine's CPU count (slurmd refuses more than it sees)
    memory_mb: int = 0  # 0: half of this machine's memory, at most 8 GiB


def _check_prerequisites(options: UpOptions) -> None:
    if os.geteuid() != 0:
        raise SandboxError("vcluster sandbox up needs root (it creates network namespaces "
                           "and runs munged, slurmctld and slurmd)")
    if not 1 <= options.hosts <= MAX_HOSTS:
        raise SandboxError(f"--hosts {options.hosts}: expected a number from 1 to {MAX_HOSTS}")
    missing = [tool for tool in NEEDED if shutil.which(tool, path=daemons.SYSTEM_PATH) is None]
    if missing:
        raise SandboxError("missing programs: " + ", ".join(missing)
                           + " (install munge, slurmctld, slurmd, slurm-client, etcd-server, "
                           "etcd-client, openssl, util-linux)")


def _prepare_dir(directory: Path) -> bool:
    """Make ``directory`` (returns whether it was created); refuse one in use."""
    existing = load(directory)
    if existing is not None:
        running = [p for p in existing.processes if process.alive(p)]
        what = "runs" if running else "left files"
        raise SandboxError(f"sandbox {existing.id} {what} in {directory}; stop it first "
                           f"with: vcluster sandbox down --dir {directory}")
    _check_searchable(directory)
    _check_owned_by_root(directory)
    if directory.exists():
        if not directory.is_dir():
            raise SandboxError(f"--dir {directory}: not a directory")
        if any(directory.iterdir()):
            raise SandboxError(f"--dir {directory}: not empty and not a sandbox "
                               "(expected a new or empty directory)")
        created = False
    else:
        for path in reversed([directory, *directory.parents]):
            if not path.exists():
                path.mkdir(mode=0o755)
                path.chmod(0o755)  # whatever the umask
        created = True
    directory.chmod(0o755)  # users of the sandbox read slurm.conf and reach munge's socket
    return created


def _check_owned_by_root(directory: Path) -> None:
    """Root keeps scripts slurmd runs as root, and etcd's root password, in ``directory``."""
    why = not_root_only(directory)
    if why is not None:
        raise SandboxError(f"--dir {directory}: {why}; root keeps files there that slurmd "
                           "runs as root, so it must be root's alone (choose another --dir)")


def _check_searchable(directory: Path) -> None:
    """munged (and the sandbox's unprivileged users) must reach files inside ``directory``."""
    for path in [directory, *directory.parents]:
        if path.exists() and not path.stat().st_mode & 0o001:
            raise SandboxError(
                f"--dir {directory}: {path} is mode {path.stat().st_mode & 0o777:o}; munged and "
                "the sandbox's users need every directory above the sandbox searchable by all "
                f"(chmod o+x {path}, or choose another --dir)")


def _machine(state: SandboxState, name: str, address: str) -> Host:
    base = Path(state.dir)
    return Host(name=name, address=address, netns=state.netns_name(name),
                uts=str(base / "ns" / f"{name}.uts"), conf=str(base / "conf" / name))


def up(directory: Path, options: UpOptions, progress: Progress) -> SandboxState:
    """Bring a sandbox up in ``directory``; on failure, undo everything and raise."""
    _check_prerequisites(options)
    directory = directory.absolute()
    created = _prepare_dir(directory)
    state = SandboxState(id=new_id(), dir=str(directory), created_dir=created)
    for sub in ("log", "ns", "conf", "hosts"):
        (directory / sub).mkdir(mode=0o755)
    state.save()
    progress(f"sandbox {state.id} in {directory}")
    try:
        _bring_up(state, options, progress)
    except BaseException as e:
        progress(f"failed ({e}); removing what was made")
        try:
            teardown(state, lambda _msg: None)
        except VclusterError as cleanup:
            progress(f"cleanup incomplete: {cleanup}")
        raise
    return state


def _bring_up(state: SandboxState, options: UpOptions, progress: Progress) -> None:
    base = Path(state.dir)
    state.controller = _machine(state, CONTROLLER, CONTROLLER_ADDRESS)
    state.hosts = [_machine(state, name, host_address(i))
                   for i, name in enumerate(host_names(options.hosts))]
    state.save()
    for machine in (state.controller, *state.hosts):
        network.create_machine(state, machine)
    network.wire(state)
    progress(f"namespaces: {state.controller.netns} ({state.controller.address}, bridge "
             f"{state.bridge}), " + ", ".join(f"{h.name} {h.address}" for h in state.hosts))

    daemons.start_munge(state)
    munged = state.process("munged")
    assert munged is not None
    progress(f"munged runs, pid {munged.pid}, socket {state.munge_socket}")

    access = store.start(state, base / "etcd", progress)

    for machine in (state.controller, *state.hosts):
        vconf.write_machine_conf(Path(machine.conf), machine=machine.name,
                                 machine_dir=vconf.machine_dir(base, machine.name), store=access,
                                 images=options.images)
    progress(f"vcluster configuration per machine in {base / 'conf'}")

    daemons.write_slurm(state, options.cpus, options.memory_mb)
    progress(f"slurm.conf written: {state.slurm_conf}")
    daemons.start_slurm(state, progress)
    agents.start_all(state, progress)
    state.phase = "up"
    state.save()


def _stop_order(proc: Process) -> int:
    name = proc.name.split("@", 1)[0]
    return STOP_ORDER.index(name) if name in STOP_ORDER else len(STOP_ORDER)


def _leftover_processes(state: SandboxState) -> list[Process]:
    """Anything still running inside the sandbox's network namespaces (job steps, commands)."""
    from pyroute2 import netns

    ours = set(state.netns)
    found: list[Process] = []
    for ns, pids in netns.ns_pids().items():
        if ns in ours:
            found.extend(p for pid in pids if (p := process.adopt(f"pid {pid} in {ns}", pid)))
    return found


def teardown(state: SandboxState, progress: Progress) -> None:
    """Stop every process, remove namespaces and files; raise if something remains."""
    state.phase = "stopping"
    with contextlib.suppress(OSError):
        state.save()
    problems: list[str] = []
    groups: dict[int, list[Process]] = {}
    for proc in state.processes:
        groups.setdefault(_stop_order(proc), []).append(proc)
    for order in sorted(groups):
        procs = groups[order]
        live = [p for p in procs if process.alive(p)]
        try:
            killed = process.stop_all(live)
        except SandboxError as e:
            problems.append(str(e))
            continue
        for proc in procs:
            state.processes.remove(proc)
        if live:
            note = f" ({', '.join(p.name for p in killed)} needed SIGKILL)" if killed else ""
            progress("stopped " + ", ".join(f"{p.name} (pid {p.pid})" for p in live) + note)
    with contextlib.suppress(OSError):
        state.save()
    try:
        stray = _leftover_processes(state)
        if stray:
            process.stop_all(stray, timeout=5)
            progress("stopped leftover " + ", ".join(p.name for p in stray))
    except (SandboxError, OSError) as e:
        problems.append(f"leftover processes: {e}")
    if state.netns or state.mounts:
        problems.extend(network.remove_machines(state))
        progress("removed namespaces")
    if problems:
        with contextlib.suppress(OSError):
            state.save()
        raise SandboxError(f"sandbox {state.id} is not completely gone ("
                           + "; ".join(problems) + "); run vcluster sandbox down again")
    _remove_files(state)
    progress(f"removed {state.dir}")


def _remove_files(state: SandboxState) -> None:
    directory = Path(state.dir)
    try:
        for item in directory.iterdir():
            if item.name == STATE_FILE:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        (directory / STATE_FILE).unlink()
        if state.created_dir:
            directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SandboxError(f"cannot remove {directory}: {e.strerror} ({e.filename})") from e


def down(directory: Path, progress: Progress) -> SandboxState | None:
    """Tear down the sandbox in ``directory``; ``None`` if there was none (not an error)."""
    directory = directory.absolute()
    state = load(directory)
    if state is None:
        return None
    if os.geteuid() != 0:
        raise SandboxError("vcluster sandbox down needs root")
    teardown(state, progress)
    return state
