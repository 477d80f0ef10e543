"""The sandbox's vcluster agents: one on the controller and one on every host.

Each runs inside its machine's network and UTS namespaces (so its devices are
the machine's and its hostname is the machine's), with the machine's
VCLUSTER_CONF and the sandbox's SLURM_CONF, and serves on the machine's own
``directories.run``.  They are recorded as ``agent@<machine>`` and stopped
after the slurmds (the epilog needs them) and before etcd.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from vcluster.agent.client import AgentClient, AgentError
from vcluster.errors import SandboxError
from vcluster.sandbox import daemons, network, process, vconf
from vcluster.sandbox.state import Host, Process, SandboxState

RECONCILE_INTERVAL = 3.0  # seconds; short, so tests see the reconcile pass quickly
READY_TIMEOUT = 30.0


def name(machine: Host) -> str:
    return f"agent@{machine.name}"


def agent_socket(state: SandboxState, machine: Host) -> Path:
    return vconf.machine_layout(Path(state.dir), machine.name).agent_socket


def argv(state: SandboxState, machine: Host) -> list[str]:
    binary = shutil.which("vcluster-agent", path=daemons.tool_path())
    command = [binary] if binary else [sys.executable, "-m", "vcluster.agent"]
    # The controller is the login node: it serves credentials but is no SLURM host.
    role = ["--login-node"] if machine is state.controller else ["--node", machine.name]
    return [*network.enter(machine), *command, "--config", machine.conf, "serve", *role,
            "--reconcile-interval", f"{RECONCILE_INTERVAL:g}"]


def _answers(path: Path) -> bool:
    try:
        AgentClient(path, timeout=5).ping()
    except AgentError:
        return False
    return True


def start(state: SandboxState, machine: Host) -> Process:
    """Start the agent of ``machine``, record it, and wait until it answers."""
    env = daemons.slurm_env(state) | {"VCLUSTER_CONF": machine.conf}
    log = Path(state.dir) / "log" / f"agent-{machine.name}.log"
    proc = daemons.record(state, process.start(name(machine), argv(state, machine), log, env=env))
    process.wait_until(f"the agent on {machine.name} to answer",
                       lambda: _answers(agent_socket(state, machine)), READY_TIMEOUT,
                       watch=[proc])
    return proc


def start_all(state: SandboxState, progress: Callable[[str], None]) -> None:
    machines = [m for m in (state.controller, *state.hosts) if m is not None]
    procs = [start(state, machine) for machine in machines]
    progress("vcluster-agent runs on " + ", ".join(
        f"{m.name} (pid {p.pid})" for m, p in zip(machines, procs, strict=True)))


def restart(state: SandboxState, host: str) -> Process:
    """Stop (by PID) and start again the agent of ``host``; the new record is saved."""
    machine = state.host(host)
    old = state.process(name(machine))
    if old is not None:
        if process.alive(old):
            process.stop_all([old])
        state.processes.remove(old)
        state.save()
    if state.phase != "up":
        raise SandboxError(f"sandbox {state.id} is {state.phase}, not up")
    return start(state, machine)
