"""``type: nat``: a per-host bridge with NAT to the outside and ssh reachability.

Every host has its own copy of the subnet (VMs on different hosts cannot talk
over it); the host is the gateway and forwards a port of its own to each VM's
ssh port, so users reach VMs from the login node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vcluster.networks import Network
from vcluster.networks.addressing import port_range, subnet
from vcluster.schema.fields import Section


@dataclass(frozen=True)
class NatNetwork(Network):
    subnet: ipaddress.IPv4Network
    mtu: int
    ssh_ports: tuple[int, int] | None


def parse(name: str, section: Section) -> NatNetwork:
    net = NatNetwork(
        name=name,
        type="nat",
        origin=section.node.origin,
        subnet=subnet(section),
        mtu=section.integer("mtu", 1500, minimum=576, maximum=9000) or 1500,
        ssh_ports=port_range(section, "ssh-ports", None, low=1024),
    )
    section.done()
    return net
