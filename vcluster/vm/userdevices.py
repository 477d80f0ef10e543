"""A local VM's devices: what its launcher made, read from ``<run>/local-<job>.json``.

The launcher of a local cluster makes, before it starts the runners
(``vcluster.local.rootless``), a host port on 127.0.0.1 per VM for ssh
through QEMU's user-mode NAT (a local cluster's nat networks, whoever runs
it: the machine's forwarding and firewall stay as they are) and, without
root, everything else a VM needs: the FAM regions (files in the user's run
directory) and one user-space switch per private network.  It writes them
to the job's devices file (a ``LocalDevices``); the runner's
``LocalDeviceSource`` answers ``vm_resources`` from that file, as the agent
would, with NIC backends instead of taps, and asks root's in-process agent
(``vcluster.agent.local``) for the rest when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vcluster import codec
from vcluster.agent.protocol import FamRegion, FamSpec, NetworkSpec
from vcluster.errors import VmError
from vcluster.hostpaths import HostLayout

if TYPE_CHECKING:  # the runner's side only: the launcher writes the records
    from vcluster.agent.client import AgentClient, VmDevices
    from vcluster.qemu import NicBackend, UserNet, VdeSwitch


@dataclass(frozen=True)
class Port:
    """One NIC's backend: the agent's tap, a switch's socket, or user-mode NAT."""

    network: str
    kind: str  # "tap" (root's agent makes it), "switch" or "user"
    switch: Path | None = None
    ssh_port: int | None = None  # user: the 127.0.0.1 port forwarded to the guest's 22

    def backend(self) -> VdeSwitch | UserNet:
        from vcluster.qemu import UserNet, VdeSwitch

        if self.kind == "switch":
            assert self.switch is not None
            return VdeSwitch(self.switch)
        return UserNet(ssh_port=self.ssh_port)


@dataclass(frozen=True)
class VmPorts:
    ports: tuple[Port, ...]
    fam: FamRegion | None = None  # rootless: the launcher's; else the agent's


@dataclass(frozen=True)
class LocalDevices:
    """Every VM's devices, by VM index (as text: JSON keys are strings)."""

    workdir: Path
    vms: dict[str, VmPorts]


class LocalDeviceSource:
    """``vm_resources`` for a local runner: the launcher's devices file, and ``agent``
    (root's, in the launcher) for taps and FAM regions, or none (rootless)."""

    def __init__(self, layout: HostLayout, agent: AgentClient | None = None) -> None:
        self.layout = layout
        self.agent = agent

    def vm_resources(self, job: str, vm: int, networks: Sequence[NetworkSpec],
                     fam: FamSpec | None) -> VmDevices:
        from vcluster.agent.client import VmDevices

        path = self.layout.local_devices(job)
        try:
            made = codec.from_json(LocalDevices, path.read_text(), what=str(path))
        except OSError as e:
            raise VmError(f"cannot read the devices of job {job} ({path}: {e.strerror}); "
                          "its local launcher writes them before it starts the VMs") from None
        mine = made.vms.get(str(vm))
        if mine is None:
            raise VmError(f"{path} has no devices for vm{vm}")
        if [p.network for p in mine.ports] != [n.name for n in networks]:
            raise VmError(f"{path}: vm{vm}'s ports are for networks "
                          f"{[p.network for p in mine.ports]}, not {[n.name for n in networks]}")
        if self.agent is not None:
            return self._with_agent(self.agent, job, vm, networks, fam, mine)
        if (mine.fam is None) != (fam is None):
            raise VmError(f"{path}: vm{vm}'s FAM region does not match its plan")
        return VmDevices(taps=(), fam=mine.fam, workdir=made.workdir,
                         ports=tuple(p.backend() for p in mine.ports))

    @staticmethod
    def _with_agent(agent: AgentClient, job: str, vm: int, networks: Sequence[NetworkSpec],
                    fam: FamSpec | None, mine: VmPorts) -> VmDevices:
        """Taps of the agent where the port says so, the file's backends elsewhere."""
        from vcluster.agent.client import VmDevices

        tapped = [n for n, p in zip(networks, mine.ports, strict=True) if p.kind == "tap"]
        got = agent.vm_resources(job, vm, tapped, fam)
        taps = iter(got.taps)
        ports: list[NicBackend] = [next(taps).fd if p.kind == "tap" else p.backend()
                                   for p in mine.ports]
        return VmDevices(taps=got.taps, fam=got.fam, workdir=got.workdir, ports=tuple(ports))
