"""The sandbox's daemons: munged, slurmctld and one slurmd per host.

Each is started detached, recorded in the state file at once, and waited for
until it answers; etcd has its own module (``store``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from vcluster.errors import SandboxError
from vcluster.run import run
from vcluster.sandbox import network, process, slurmconf
from vcluster.sandbox.state import CONTROLLER, Process, SandboxState

Progress = Callable[[str], None]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_TIMEOUT = 30.0


def tool_path() -> str:
    """PATH for sandbox commands: this vcluster's bin directory, then the system's."""
    return f"{Path(sys.executable).parent}:{SYSTEM_PATH}"


def slurm_env(state: SandboxState) -> dict[str, str]:
    """A minimal environment for SLURM commands the sandbox runs itself."""
    return {"PATH": tool_path(), "SLURM_CONF": state.slurm_conf, "LANG": "C.UTF-8"}


def record(state: SandboxState, proc: Process) -> Process:
    state.processes.append(proc)
    state.save()
    return proc


def start_munge(state: SandboxState) -> None:
    base = Path(state.dir)
    munge = base / "munge"
    munge.mkdir(mode=0o755)
    munge.chmod(0o755)  # munged insists: the socket's directory is world-readable
    key = munge / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    socket = munge / "munge.socket"
    if len(str(socket)) > 100:
        raise SandboxError(f"--dir {base}: too long for a unix socket path "
                           f"({socket} has {len(str(socket))} characters, at most 100)")
    state.munge_socket = str(socket)
    proc = record(state, process.start("munged", [
        "munged", "--foreground", f"--key-file={key}", f"--socket={socket}",
        f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
        f"--log-file={base / 'log' / 'munged.log'}",
    ], base / "log" / "munged.out"))
    process.wait_until("munged's socket", socket.exists, READY_TIMEOUT, watch=[proc])


def write_slurm(state: SandboxState, cpus: int, memory_mb: int) -> None:
    base = Path(state.dir)
    layout = slurmconf.SlurmLayout(base / "slurm")
    for path in (layout.root, layout.state_save, layout.spool):
        path.mkdir(mode=0o755, exist_ok=True)
    for host in state.hosts:
        (layout.spool / host.name).mkdir(mode=0o755)
    source = slurmconf.slurm_dir()
    assert state.controller is not None
    layout.conf.write_text(slurmconf.render_conf(
        cluster=state.tag, layout=layout, controller=state.controller, hosts=state.hosts,
        munge_socket=Path(state.munge_socket), cpus=cpus or os.cpu_count() or 1,
        memory_mb=memory_mb or default_memory_mb(),
        fragment=source / slurmconf.FRAGMENT,
    ))
    layout.conf.chmod(0o644)
    for name in slurmconf.SCRIPTS:
        wrapper = layout.script(name)
        wrapper.write_text(slurmconf.render_wrapper(
            sandbox=state.id, script=source / name, log=scripts_log(state),
            conf_root=base / "conf", path=tool_path()))
        wrapper.chmod(0o755)
    task_prolog = layout.script(slurmconf.TASK_PROLOG)
    task_prolog.write_text(slurmconf.render_task_prolog(sandbox=state.id, conf_root=base / "conf"))
    task_prolog.chmod(0o755)
    state.slurm_conf = str(layout.conf)
    state.save()


def scripts_log(state: SandboxState) -> Path:
    """Where the sandbox's prolog and epilog log, one line per run."""
    return Path(state.dir) / "log" / "prolog-epilog.log"


def default_memory_mb() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    return max(256, min(8192, total // 2))


def scontrol_ping(state: SandboxState) -> bool:
    assert state.controller is not None
    result = run([*network.enter(state.controller), "scontrol", "ping"],
                 env=slurm_env(state), check=False, timeout=10)
    return result.returncode == 0 and "UP" in result.stdout


def node_states(state: SandboxState) -> dict[str, str]:
    """SLURM's state of each sandbox node ({} when slurmctld does not answer)."""
    assert state.controller is not None
    result = run([*network.enter(state.controller), "sinfo", "--noheader", "--Node",
                  "--format=%N %T"], env=slurm_env(state), check=False, timeout=10)
    if result.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)


def start_slurm(state: SandboxState, progress: Progress) -> None:
    base = Path(state.dir)
    assert state.controller is not None
    conf = ["-D", "-f", state.slurm_conf]
    ctld = record(state, process.start(
        "slurmctld", [*network.enter(state.controller), "slurmctld", *conf],
        base / "log" / "slurmctld.log", env=slurm_env(state)))
    process.wait_until("slurmctld to answer", lambda: scontrol_ping(state), READY_TIMEOUT,
                       watch=[ctld])
    progress(f"slurmctld runs on {CONTROLLER} ({state.controller.address}), pid {ctld.pid}")
    slurmds = [
        record(state, process.start(
            f"slurmd@{host.name}", [*network.enter(host), "slurmd", *conf],
            base / "log" / f"slurmd-{host.name}.log", env=slurm_env(state)))
        for host in state.hosts
    ]
    names = {h.name for h in state.hosts}

    def all_idle() -> bool:
        states = node_states(state)
        return all(states.get(name, "").startswith("idle") for name in names)

    process.wait_until("every slurmd to register", all_idle, READY_TIMEOUT,
                       watch=[ctld, *slurmds])
    progress(f"slurmd runs on {', '.join(sorted(names, key=host_order))}; all nodes idle")


def host_order(name: str) -> int:
    return int(name[1:]) if name[1:].isdigit() else 0
