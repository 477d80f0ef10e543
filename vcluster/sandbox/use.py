"""Using a running sandbox: what runs (status) and running commands on its machines."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vcluster.errors import InputError, SandboxError
from vcluster.sandbox import daemons, network, process
from vcluster.sandbox.state import SandboxState, require


@dataclass(frozen=True)
class Command:
    """A command ready to run on a sandbox machine."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None


def command(
    state: SandboxState,
    argv: Sequence[str],
    *,
    host: str | None = None,
    user: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Command:
    """``argv`` on the controller (or ``host``), as root (or ``user``), with its configuration.

    The environment is ``environ`` (default: ours) plus VCLUSTER_CONF (the
    machine's configuration), SLURM_CONF, VCLUSTER_SANDBOX and a PATH on which
    ``vcluster`` and SLURM's commands resolve.
    """
    if not argv:
        raise InputError("no command given (expected: vcluster sandbox run [--host H] -- CMD...)")
    if state.phase != "up":
        raise SandboxError(f"sandbox {state.id} is {state.phase}, not up "
                           f"(see vcluster sandbox status --dir {state.dir})")
    machine = state.host(host)
    env = dict(os.environ if environ is None else environ)
    env.update({
        "VCLUSTER_CONF": machine.conf,
        "VCLUSTER_SANDBOX": state.dir,
        "SLURM_CONF": state.slurm_conf,
        "PATH": daemons.tool_path(),
    })
    prefix = network.enter(machine)
    cwd: str | None = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise InputError(f"--user {user}: no such user on this machine "
                             "(expected an existing unix user, e.g. one made with useradd)"
                             ) from None
        env.update({"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
                    "SHELL": entry.pw_shell or "/bin/sh"})
        prefix += ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                   "--init-groups", "--"]
        cwd = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
    return Command(argv=[*prefix, *argv], env=env, cwd=cwd)


def status_lines(state: SandboxState) -> list[str]:
    """What ``vcluster sandbox status`` prints."""
    lines = [f"sandbox {state.id} in {state.dir}: {state.phase}"]
    lines.append("daemons:")
    for proc in state.processes:
        mark = "alive" if process.alive(proc) else "dead"
        lines.append(f"  {proc.name:<14} pid {proc.pid:<8} {mark}")
    if not state.processes:
        lines.append("  (none)")
    slurmctld = state.process("slurmctld")
    nodes = daemons.node_states(state) if slurmctld and process.alive(slurmctld) else {}
    lines.append("machines:")
    for machine in [m for m in (state.controller,) if m] + state.hosts:
        role = "controller, login" if machine is state.controller else \
            f"slurm: {nodes.get(machine.name, 'unknown')}"
        lines.append(f"  {machine.name:<4} {machine.address:<12} netns {machine.netns:<16} "
                     f"({role})")
    if state.etcd_endpoint:
        lines.append(f"etcd: {state.etcd_endpoint}")
    if state.slurm_conf:
        lines.append(f"slurm.conf: {state.slurm_conf}")
        lines.append(f"prolog/epilog log: {daemons.scripts_log(state)}")
    return lines


def healthy(state: SandboxState) -> bool:
    """Up, and every daemon alive."""
    return state.phase == "up" and all(process.alive(p) for p in state.processes)


def ensure_dir(directory: Path) -> SandboxState:
    return require(directory.absolute())
