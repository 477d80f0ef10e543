"""Test doubles for the agent's seams: a host's devices and firewall, SLURM, a store that goes away.

Each keeps what it was asked in memory and answers as the real one would, so
``Jobs``, the reconcile pass and the service run in tests without root,
SLURM or etcd.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from vcluster.agent.firewall import SourceFilter, job_of_table, table_name
from vcluster.agent.natrules import NatRules
from vcluster.agent.netdev import Vxlan
from vcluster.agent.peer import JobInfo
from vcluster.agent.protocol import failed
from vcluster.config.batch import StoreConfig
from vcluster.errors import ResourceError, StoreUnavailable
from vcluster.store.base import Store


@dataclass
class Link:
    kind: str  # "bridge", "tap", "vxlan", or "ether" (a host interface)
    mtu: int
    master: str | None = None
    vxlan: Vxlan | None = None  # a VXLAN device's settings and flood entries
    addresses: tuple[str, ...] = ()  # IPv4 addresses


@dataclass
class FakeDevices:
    """A host's interfaces, bridges, taps and VXLANs, in memory (``netdev.Devices``).

    Taps open /dev/null.  The host has one underlay interface, ``eth0``
    (``address``, MTU ``underlay_mtu``), unless ``underlay`` is set to None.
    """

    links: dict[str, Link] = field(default_factory=dict)
    opened: list[int] = field(default_factory=list)  # fds handed out (the caller closes them)
    forwarding: bool = True  # net.ipv4.ip_forward

    def add_interface(self, name: str, mtu: int, *addresses: str) -> None:
        """A host interface (not the agent's) with ``addresses``."""
        self.links[name] = Link("ether", mtu, addresses=addresses)

    def ensure_bridge(self, name: str, mtu: int) -> None:
        link = self.links.setdefault(name, Link("bridge", mtu))
        if link.kind != "bridge":
            raise ResourceError(f"{name} exists and is not a bridge; remove it")
        link.mtu = mtu

    def ensure_tap(self, name: str, bridge: str, mtu: int) -> None:
        if self.links.get(bridge, Link("none", 0)).kind != "bridge":
            raise ResourceError(f"bridge {bridge} is missing")
        link = self.links.setdefault(name, Link("tap", mtu, bridge))
        if link.kind != "tap":
            raise ResourceError(f"{name} exists and is not a tap; remove it")
        link.mtu, link.master = mtu, bridge

    def ensure_vxlan(self, name: str, vxlan: Vxlan, bridge: str) -> None:
        if self.links.get(bridge, Link("none", 0)).kind != "bridge":
            raise ResourceError(f"bridge {bridge} is missing")
        link = self.links.setdefault(name, Link("vxlan", vxlan.mtu, bridge, vxlan))
        if link.kind != "vxlan" or link.vxlan is None:
            raise ResourceError(f"{name} exists and is not a VXLAN device; remove it")
        have = (link.vxlan.vni, link.vxlan.local, link.vxlan.port)
        if have != (vxlan.vni, vxlan.local, vxlan.port):
            raise ResourceError(f"{name} exists with VXLAN id {have[0]}, local {have[1]}, "
                                f"port {have[2]}, not {vxlan.vni}, {vxlan.local}, {vxlan.port}; "
                                "remove it")
        link.mtu, link.master, link.vxlan = vxlan.mtu, bridge, vxlan

    def ensure_gateway(self, bridge: str, address: str) -> None:
        link = self.links.get(bridge)
        if link is None or link.kind != "bridge":
            raise ResourceError(f"bridge {bridge} is missing")
        if address.split("/")[0] not in link.addresses:
            link.addresses += (address.split("/")[0],)

    def ipv4_forwarding(self) -> bool:
        return self.forwarding

    def interface_ipv4(self, name: str) -> list[str] | None:
        link = self.links.get(name)
        return None if link is None else list(link.addresses)

    def underlay_of(self, address: str) -> tuple[str, int] | None:
        for name, link in sorted(self.links.items()):
            if address in link.addresses:
                return name, link.mtu
        return None

    def open_tap(self, name: str) -> int:
        if self.links.get(name, Link("none", 0)).kind != "tap":
            raise ResourceError(f"cannot open tap {name}: no such device")
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.opened.append(fd)
        return fd

    def remove_link(self, name: str) -> bool:
        link = self.links.pop(name, None)
        if link is None:
            return False
        for other in self.links.values():
            if other.master == name:
                other.master = None  # as the kernel does when a bridge goes
        return True

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        return sorted(n for n in self.links if n.startswith(prefixes))


@dataclass
class FakeFirewall:
    """A host's nftables, in memory (``firewall.Firewall``): the tables and their filters.

    ``others`` are tables that are not the agent's (a site's own rules); ``broken``:
    every change fails as nftables would refuse it.
    """

    filters: dict[str, dict[int, SourceFilter]] = field(default_factory=dict)  # table: index
    nats: dict[str, dict[int, NatRules]] = field(default_factory=dict)  # table: index: rules
    others: set[str] = field(default_factory=set)
    broken: bool = False

    def ensure_filter(self, job: str, flt: SourceFilter) -> None:
        if self.broken:
            raise ResourceError(f"cannot filter the tunnel of network {flt.network!r}: "
                                "nftables says: Operation not permitted")
        self.filters.setdefault(table_name(job), {})[flt.index] = flt

    def ensure_nat(self, job: str, nat: NatRules) -> None:
        if self.broken:
            raise ResourceError(f"cannot set up the NAT of network {nat.network!r}: "
                                "nftables says: Operation not permitted")
        self.filters.setdefault(table_name(job), {})
        self.nats.setdefault(table_name(job), {})[nat.index] = nat

    def remove_table(self, name: str) -> bool:
        if job_of_table(name) is None:
            raise ResourceError(f"nftables table {name} is not a job's; not removing it")
        self.nats.pop(name, None)
        return self.filters.pop(name, None) is not None

    def tables(self) -> list[str]:
        return sorted(self.filters)


@dataclass
class FakeSlurm:
    """SLURM's answers, canned (``peer.SlurmQueries``).

    ``holding`` None: SLURM cannot say which jobs hold the node; ``broken``:
    every question fails as an unreachable slurmctld does.
    """

    node: str = "unit"
    jobs: dict[str, JobInfo] = field(default_factory=dict)
    pids: dict[int, str] = field(default_factory=dict)  # pid: job
    holding: set[str] | None = field(default_factory=set)
    broken: bool = False
    asked: int = 0  # how often jobs_holding_node was called

    def _check(self) -> None:
        if self.broken:
            raise failed("cannot ask SLURM (scontrol: slurmctld does not answer)")

    def job_of_pid(self, pid: int) -> str | None:
        self._check()
        return self.pids.get(pid)

    def job(self, job: str) -> JobInfo | None:
        self._check()
        return self.jobs.get(job)

    def jobs_holding_node(self) -> set[str] | None:
        self.asked += 1
        self._check()
        return None if self.holding is None else set(self.holding)

    def hostnames(self, nodelist: str) -> list[str]:
        """A node list written out (``h1,h2``): the fake expands no brackets."""
        self._check()
        return [n for n in nodelist.split(",") if n]

    def run(self, info: JobInfo, pids: Iterable[int] = ()) -> None:
        """``info`` runs on this node (and ``pids`` are its processes)."""
        self.jobs[info.job] = info
        if self.holding is not None:
            self.holding.add(info.job)
        self.pids.update({pid: info.job for pid in pids})

    def end(self, job: str) -> None:
        """The job is over: SLURM forgets it."""
        self.jobs.pop(job, None)
        if self.holding is not None:
            self.holding.discard(job)


@dataclass
class Opener:
    """Opens ``store`` for a StoreLink, unless ``down`` (then: unreachable)."""

    store: Store
    down: bool = False
    opened: int = 0

    def __call__(self, config: StoreConfig) -> Store:
        if self.down:
            raise StoreUnavailable(f"{', '.join(config.endpoints)}: connection refused")
        self.opened += 1
        return self.store
