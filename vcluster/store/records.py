"""What the store holds: frozen dataclasses, written and read by the project's codec.

``to_json`` and ``from_json`` are ``vcluster.codec``'s, with the store's words:
a record that does not decode is a StoreError naming the record type and the
field path (``stored VmRecord.state: ...``).  The store is shared across hosts
and vcluster versions: an unknown field is refused (a newer writer), a missing
one is accepted only where the dataclass gives a default (an older writer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from vcluster import codec
from vcluster.codec import to_json
from vcluster.errors import StoreError
from vcluster.lifecycle import VmState, check_transition

T = TypeVar("T")

__all__ = ["HostRecord", "HostSetup", "JobOwner", "SetupState", "VmRecord", "VniHolder",
           "from_json", "to_json"]


def from_json(cls: type[T], text: str | bytes) -> T:
    """A record read from the store; StoreError if it does not decode into ``cls``."""
    return codec.from_json(cls, text, what="stored", error=StoreError)


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class HostRecord:
    """An agent's registration under ``hosts/<host>`` (kept alive by a lease)."""

    name: str
    address: str  # underlay address other hosts reach (VXLAN tunnels)
    version: str  # vcluster version of the agent
    since: float  # when the agent registered (seconds since the epoch)
    # IPv4 addresses of the tunnel interfaces networks.yaml names (``interface``), by name
    interfaces: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOwner:
    """Who owns a job (``jobs/<jobid>/owner``), written by the agent from SLURM."""

    uid: int
    user: str


@dataclass(frozen=True)
class VniHolder:
    """Who holds a VXLAN id (``pools/vni/<id>``), taken by an agent for a job's network."""

    job: str
    user: str
    network: str


@dataclass(frozen=True)
class NatHolder:
    """Who holds a block of a nat network on a host (``pools/nat/<network>/<host>/<block>``)."""

    job: str
    user: str
    prefix: int  # the block's prefix length (its key is its first address)


@dataclass(frozen=True)
class PortHolder:
    """Who holds a host port forwarded to a VM's ssh port (``pools/ssh-ports/<host>/<port>``)."""

    job: str
    user: str
    vm: int
    network: str


class SetupState(Enum):
    """How far an agent got setting up a job on its host."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HostSetup:
    """An agent's state for one job on its host (``jobs/<jobid>/hosts/<host>/setup``)."""

    state: SetupState
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.state is SetupState.FAILED) != (self.error is not None):
            raise ValueError("an error message goes with the failed state, and only with it")


@dataclass(frozen=True)
class SshEndpoint:
    """Where a VM's ssh server is reached from outside its host: a host port forwarded to it."""

    address: str  # the VM's host's (its registered address)
    port: int


@dataclass(frozen=True)
class VmRecord:
    """One VM's published state (``users/<user>/clusters/<jobid>/vms/<i>``)."""

    state: VmState
    host: str | None = None  # set once a runner picked the VM up
    addresses: tuple[str, ...] = ()
    since: float = 0.0  # when the VM entered this state (seconds since the epoch)
    error: str | None = None
    console_tail: tuple[str, ...] = ()  # last console lines, published when a VM fails
    ssh: SshEndpoint | None = None  # set once the VM's host forwards a port to it
    host_key: str | None = None  # the guest's ssh host key ("ssh-ed25519 AAAA..."), made by
    # its runner: what the cluster's known_hosts holds for it

    def __post_init__(self) -> None:
        if (self.state is VmState.FAILED) != (self.error is not None):
            raise ValueError("an error message goes with the failed state, and only with it")

    def moved_to(self, state: VmState, since: float, *, error: str | None = None,
                 host: str | None = None, addresses: tuple[str, ...] | None = None,
                 console_tail: tuple[str, ...] = (), ssh: SshEndpoint | None = None,
                 host_key: str | None = None) -> VmRecord:
        """The record after a legal transition (IllegalTransition otherwise); a field
        given as None keeps its value."""
        check_transition(self.state, state)
        return VmRecord(
            state=state,
            host=self.host if host is None else host,
            addresses=self.addresses if addresses is None else addresses,
            since=since,
            error=error,
            console_tail=console_tail,
            ssh=self.ssh if ssh is None else ssh,
            host_key=self.host_key if host_key is None else host_key,
        )
