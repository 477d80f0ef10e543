"""``type: nat``: a per-host bridge with NAT to the outside and ssh reachability.

VMs on different hosts cannot talk over a nat network: each host of a job
has a bridge of the job's own whose host side is the gateway, masquerading
what leaves towards the host's route out.  ``subnet`` is the pool every job
on a host draws from: the VM's host agent gives the job an aligned block of
it (``block_prefix``: room for the job's VMs, the network address, the
gateway and the broadcast address), the gateway is the block's first
address and VM ``i`` gets ``i + 2``.  So the address is known only on the
VM's host (``nic_address`` is None: the agent's answer carries it).  Each VM
also gets a port of the host's from ``ssh-ports``, forwarded to its port 22.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass

from vcluster.errors import InputError
from vcluster.networks import Network, NetworkKind
from vcluster.networks.addressing import port_range, subnet
from vcluster.schema.fields import Section

KIND = NetworkKind("nat", default_mtu=1500, planned=True, built_by_agent=True)
RESERVED = 3  # a block's network, gateway and broadcast addresses
SSH_PORT = 22  # the guest port the host's ssh port is forwarded to


def block_prefix(vms: int) -> int:
    """The prefix length of a block with room for ``vms`` VMs (VM ``i`` at ``i + 2``)."""
    return 32 - max(2, math.ceil(math.log2(vms + RESERVED)))


def vm_address(block: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Address:
    """The address of VM ``index`` in ``block``."""
    return block.network_address + 2 + index


def gateway(block: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return block.network_address + 1


@dataclass(frozen=True)
class NatNetwork(Network):
    subnet: ipaddress.IPv4Network
    ssh_ports: tuple[int, int] | None

    def nic_address(self, index: int, total: int) -> str | None:
        if block_prefix(total) < self.subnet.prefixlen:
            room = 2 ** (32 - self.subnet.prefixlen) - RESERVED
            raise InputError(f"{self.origin}: network {self.name!r} ({self.subnet}) has room "
                             f"for {room} VMs of one job on a host, not {total} (expected a "
                             "larger subnet)")
        return None  # the VM's host agent gives it


def parse(name: str, section: Section) -> NatNetwork:
    addresses = subnet(section)
    mtu = section.integer("mtu", KIND.default_mtu, minimum=576, maximum=9000)
    net = NatNetwork(
        name=name,
        type=KIND.name,
        origin=section.node.origin,
        subnet=addresses,
        mtu=mtu or KIND.default_mtu,
        ssh_ports=port_range(section, "ssh-ports", None, low=1024),
    )
    section.done()
    return net


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the kernel picks it): where a VM on QEMU's
    user-mode NAT (a local or session cluster's nat network) has its ssh forwarded from."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
