"""A job's nat networks on this host: its block of the subnet, its VMs' ssh ports.

Users' etcd roles reach only ``users/<user>/``, so the VM's host agent takes,
in the store, what a nat network gives the job on this host:

- a **block** of the network's ``subnet`` (``networks.nat.block_prefix``:
  room for the job's task count), aligned, overlapping no block held by
  another job here: ``pools/nat/<network>/<host>/<first address>`` =
  ``NatHolder``.  The bridge's address is the block's gateway; VM ``i`` is
  at ``i + 2``;
- a **port** of this host's from ``ssh-ports`` per VM, forwarded to its
  port 22: ``pools/ssh-ports/<host>/<port>`` = ``PortHolder``.  Ports are
  the host's, so one pool serves every nat network of the host.

Only this host's agent writes this host's entries, under one lock
(``Allocator``), and each is created by compare-and-swap (absent → put), so
a stale reading never gives a block or a port twice.  Asking again gives
the same block and port (the job's entries are looked up first).  They go
when the job is released: ``jobs.Jobs._delete_keys`` deletes every pool entry
naming the job, on every host of the job, even if the launcher died.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

from vcluster.agent.natrules import Forward
from vcluster.agent.protocol import failed
from vcluster.errors import StoreError
from vcluster.networks.nat import block_prefix, gateway, vm_address
from vcluster.store.base import Put, Store, absent
from vcluster.store.keys import Keys
from vcluster.store.records import NatHolder, PortHolder, from_json, to_json

SHOWN_JOBS = 8  # jobs named in an exhaustion message


@dataclass(frozen=True)
class NatSite:
    """A site's nat network, as the agent needs it."""

    name: str
    subnet: ipaddress.IPv4Network
    ssh_ports: tuple[int, int] | None
    origin: str  # file:line of the network


@dataclass(frozen=True)
class NatShare:
    """What one VM of a job gets of a nat network on this host."""

    network: str
    block: ipaddress.IPv4Network
    address: ipaddress.IPv4Address  # the VM's
    gateway: ipaddress.IPv4Address  # the bridge's
    port: int | None  # the host port forwarded to the VM's port 22 (None: no ssh-ports)
    forwards: tuple[Forward, ...]  # every forward of the job's network on this host


def _jobs_named(jobs: set[str]) -> str:
    ordered = sorted(jobs, key=lambda j: (len(j), j))
    shown = ", ".join(ordered[:SHOWN_JOBS])
    if len(ordered) > SHOWN_JOBS:
        shown += f" and {len(ordered) - SHOWN_JOBS} more"
    return f"job{'' if len(ordered) == 1 else 's'} {shown}" if ordered else "no job"


class Allocator:
    """Takes blocks and ports for this host's jobs (one at a time: ``lock``)."""

    def __init__(self, keys: Keys, node: str) -> None:
        self.keys = keys
        self.node = node
        self.lock = threading.Lock()

    def _blocks(self, store: Store, site: NatSite) -> dict[ipaddress.IPv4Network, NatHolder]:
        out: dict[ipaddress.IPv4Network, NatHolder] = {}
        prefix = self.keys.nat_pool_prefix(site.name, self.node)
        for entry in store.get_prefix(prefix):
            try:
                holder = from_json(NatHolder, entry.value)
                block = ipaddress.IPv4Network(f"{entry.key[len(prefix):]}/{holder.prefix}")
            except (StoreError, ValueError):
                continue  # not a block (nothing of ours): never given out, never overlapped
            out[block] = holder
        return out

    def block(self, store: Store, site: NatSite, job: str, user: str,
              tasks: int) -> ipaddress.IPv4Network:
        """The job's block of ``site`` here: the one it holds, or a free one taken now."""
        held = self._blocks(store, site)
        for block, holder in held.items():
            if holder.job == job:
                return block
        length = block_prefix(tasks)
        if length < site.subnet.prefixlen:
            raise failed(f"network {site.name!r}: {site.subnet} ({site.origin}) has no room "
                         f"for the {tasks} VMs of job {job} on {self.node}")
        value = to_json(NatHolder(job=job, user=user, prefix=length))
        for candidate in site.subnet.subnets(new_prefix=length):
            if any(candidate.overlaps(b) for b in held):
                continue
            key = self.keys.nat_block(site.name, self.node, str(candidate.network_address))
            if store.txn([absent(key)], [Put(key, value)]).succeeded:
                return candidate
        holders = _jobs_named({h.job for h in held.values()})
        raise failed(f"network {site.name!r}: no free block of {site.subnet} ({site.origin}) "
                     f"on {self.node} for {tasks} VMs (held by {holders}); try again when one "
                     "ends, or widen the subnet")

    def _ports(self, store: Store) -> dict[int, PortHolder]:
        out: dict[int, PortHolder] = {}
        prefix = self.keys.port_pool_prefix(self.node)
        for entry in store.get_prefix(prefix):
            text = entry.key[len(prefix):]
            try:
                out[int(text)] = from_json(PortHolder, entry.value)
            except (StoreError, ValueError):
                if text.isdigit():
                    out[int(text)] = PortHolder(job="?", user="?", vm=-1, network="?")
        return out

    def port(self, store: Store, site: NatSite, job: str, user: str, vm: int) -> int | None:
        """The host port forwarded to VM ``vm``'s port 22: its own, or a free one taken now."""
        if site.ssh_ports is None:
            return None
        held = self._ports(store)
        for port, holder in held.items():
            if holder.job == job and holder.vm == vm and holder.network == site.name:
                return port
        first, last = site.ssh_ports
        value = to_json(PortHolder(job=job, user=user, vm=vm, network=site.name))
        for port in range(first, last + 1):
            if port in held:
                continue
            if store.txn([absent(self.keys.port(self.node, port))],
                         [Put(self.keys.port(self.node, port), value)]).succeeded:
                return port
        jobs = {h.job for p, h in held.items() if first <= p <= last}
        raise failed(f"network {site.name!r}: no free port in ssh-ports {first}-{last} "
                     f"({site.origin}) on {self.node} (held by {_jobs_named(jobs)}); try "
                     "again when one ends, or widen the range")

    def share(self, store: Store, site: NatSite, job: str, user: str, vm: int,
              tasks: int) -> NatShare:
        """Everything VM ``vm`` of ``job`` gets of ``site`` here, taken now if need be."""
        with self.lock:
            block = self.block(store, site, job, user, tasks)
            port = self.port(store, site, job, user, vm)
            forwards = tuple(sorted(
                (Forward(port=p, vm=h.vm, address=str(vm_address(block, h.vm)))
                 for p, h in self._ports(store).items()
                 if h.job == job and h.network == site.name and 0 <= h.vm < tasks),
                key=lambda f: f.vm))
        return NatShare(network=site.name, block=block, address=vm_address(block, vm),
                        gateway=gateway(block), port=port, forwards=forwards)
