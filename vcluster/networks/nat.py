"""``type: nat``: a per-host bridge with NAT to the outside and ssh reachability.

Every host has its own copy of the subnet (VMs on different hosts cannot talk
over it); the host is the gateway (the subnet's first address) and forwards a
port of its own to each VM's ssh port, so users reach VMs from the login
node.  VM ``i`` gets the address ``i + 2``.  Neither the planner nor the agent
makes nat networks yet (``KIND``): configuring one is accepted, using it is
refused before anything is submitted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vcluster.errors import InputError
from vcluster.networks import Network, NetworkKind
from vcluster.networks.addressing import port_range, subnet
from vcluster.schema.fields import Section

KIND = NetworkKind("nat", default_mtu=1500, planned=False, built_by_agent=False)


@dataclass(frozen=True)
class NatNetwork(Network):
    subnet: ipaddress.IPv4Network
    ssh_ports: tuple[int, int] | None

    def nic_address(self, index: int, total: int) -> str:
        room = self.subnet.num_addresses - 3  # network, gateway and broadcast addresses
        if total > room:
            raise InputError(f"{self.origin}: network {self.name!r} ({self.subnet}) has room "
                             f"for {room} VMs, not {total} (expected a larger subnet)")
        address = ipaddress.IPv4Address(int(self.subnet.network_address) + 2 + index)
        return f"{address}/{self.subnet.prefixlen}"


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
