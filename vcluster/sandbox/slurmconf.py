"""The sandbox's slurm.conf, built from the site-facing ``slurm/slurm.conf.fragment``.

The fragment's KEY=VALUE lines are taken as they are, except the few the
sandbox must override (script paths, and process tracking, since the
sandbox's hosts share one machine and its cgroup tree), so the settings
vcluster relies on are the same on a site and in the test bed.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from vcluster.config.paths import source_root
from vcluster.errors import SandboxError
from vcluster.sandbox.state import CONTROLLER, Host

FRAGMENT = "slurm.conf.fragment"
SCRIPTS = ("prolog", "epilog")
TASK_PROLOG = "task-prolog"
SLURMCTLD_PORT = 6817  # each in the sandbox's own namespaces: no clash with a real SLURM
SLURMD_PORT = 6818
PARTITION = "sandbox"

# Fragment keys the sandbox replaces, and why (shown in the generated file).
SANDBOX_OVERRIDES = {
    "ProctrackType": ("proctrack/linuxproc", "the hosts share one machine's cgroup tree"),
    "TaskPlugin": ("task/none", "the hosts share one machine's CPUs"),
}


def slurm_dir() -> Path:
    """Where ``prolog``, ``epilog`` and ``slurm.conf.fragment`` are (checkout or install)."""
    root = source_root()
    candidates = [root / "slurm"] if root else []
    candidates.append(Path(sys.prefix) / "share" / "vcluster" / "slurm")
    for directory in candidates:
        if (directory / FRAGMENT).is_file():
            return directory
    raise SandboxError(f"cannot find vcluster's slurm/{FRAGMENT} (looked in "
                       + ", ".join(str(d) for d in candidates) + ")")


def parse_fragment(path: Path) -> list[tuple[str, str]]:
    """The KEY=VALUE settings of a slurm.conf fragment, in order."""
    settings: list[tuple[str, str]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise SandboxError(f"{path}:{number}: {raw.strip()!r} is not a KEY=VALUE line")
        settings.append((key.strip(), value.strip()))
    return settings


@dataclass(frozen=True)
class SlurmLayout:
    """Where the sandbox's SLURM files live."""

    root: Path  # <sandbox>/slurm

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def state_save(self) -> Path:
        return self.root / "ctld"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def script(self, name: str) -> Path:
        return self.root / name


def render_conf(
    *,
    cluster: str,
    layout: SlurmLayout,
    controller: Host,
    hosts: list[Host],
    munge_socket: Path,
    cpus: int,
    memory_mb: int,
    fragment: Path,
) -> str:
    """The complete slurm.conf of a sandbox."""
    spool = layout.spool
    lines = [
        f"# slurm.conf of vcluster sandbox {cluster}; generated, do not edit.",
        f"ClusterName={cluster}",
        f"SlurmctldHost={CONTROLLER}({controller.address})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"SlurmctldPort={SLURMCTLD_PORT}",
        f"SlurmdPort={SLURMD_PORT}",
        f"StateSaveLocation={layout.state_save}",
        f"SlurmdSpoolDir={spool}/%n",
        f"SlurmctldPidFile={layout.root}/slurmctld.pid",
        f"SlurmdPidFile={spool}/%n/slurmd.pid",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        f"DefMemPerCPU={max(64, memory_mb // max(1, cpus) // 4)}",
        "",
        f"# From {fragment}:",
    ]
    for key, value in parse_fragment(fragment):
        if key in ("Prolog", "Epilog"):
            value = str(layout.script(key.lower()))
            lines.append(f"# sandbox: a wrapper logging into the sandbox, then {fragment.parent}/"
                         f"{key.lower()}")
        elif key in SANDBOX_OVERRIDES:
            value, why = SANDBOX_OVERRIDES[key]
            lines.append(f"# sandbox: {why}")
        lines.append(f"{key}={value}")
    lines.append("# sandbox: every task sees its own host's vcluster configuration, as it "
                 "would on separate machines")
    lines.append(f"TaskProlog={layout.script(TASK_PROLOG)}")
    lines.append("")
    for host in hosts:
        lines.append(f"NodeName={host.name} NodeAddr={host.address} NodeHostname={host.name} "
                     f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def render_task_prolog(*, sandbox: str, conf_root: Path) -> str:
    """A TaskProlog: what it prints as ``export K=V`` lands in the task's environment."""
    return "\n".join([
        "#!/bin/sh",
        f"# task prolog of vcluster sandbox {sandbox}; generated, do not edit.",
        f'echo "export VCLUSTER_CONF={shlex.quote(str(conf_root))}/$SLURMD_NODENAME"',
        "",
    ])


def render_wrapper(*, sandbox: str, script: Path, log: Path, conf_root: Path, path: str) -> str:
    """A per-sandbox prolog/epilog: set where to log and which configuration, then exec."""
    q = shlex.quote
    return "\n".join([
        "#!/bin/sh",
        f"# {script.name} of vcluster sandbox {sandbox}; generated, do not edit.",
        f"export VCLUSTER_SLURM_LOG={q(str(log))}",
        f'export VCLUSTER_CONF={q(str(conf_root))}/"$SLURMD_NODENAME"',
        f"export PATH={q(path)}",
        f'exec {q(str(script))} "$@"',
        "",
    ])
