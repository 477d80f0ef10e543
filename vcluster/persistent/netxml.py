"""A persistent cluster's libvirt networks as XML (pure: no libvirt here).

Each cluster gets its own networks, named after it: a nat network of the
template's resource set becomes a libvirt NAT network on a bridge of the
cluster's, its gateway the block's first address (as the agent's nat
networks have it) and a DHCP reservation per VM for the very address its
seed sets; a private network becomes an isolated libvirt network (no
forward, no host address: the segment is the cluster's alone, VM ``i`` at
the subnet's ``i + 1`` as in job clusters).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET


@dataclass(frozen=True)
class Lease:
    """One VM's DHCP reservation on a nat network."""

    mac: str
    name: str
    address: ipaddress.IPv4Address


def _network(name: str, bridge: str, mtu: int) -> ET.Element:
    network = ET.Element("network")
    ET.SubElement(network, "name").text = name
    ET.SubElement(network, "bridge", name=bridge, stp="off", delay="0")
    ET.SubElement(network, "mtu", size=str(mtu))
    return network


def _text(network: ET.Element) -> str:
    ET.indent(network)
    return ET.tostring(network, encoding="unicode")


def nat_network_xml(name: str, bridge: str, mtu: int, block: ipaddress.IPv4Network,
                    leases: Sequence[Lease]) -> str:
    """A NAT network on ``bridge``: the host at ``block``'s first address, each VM's
    address reserved for its MAC."""
    network = _network(name, bridge, mtu)
    ET.SubElement(network, "forward", mode="nat")
    ip = ET.SubElement(network, "ip", address=str(block.network_address + 1),
                       netmask=str(block.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    for lease in leases:
        if lease.address not in block:
            raise ValueError(f"{lease.name}'s address {lease.address} is not in {block}")
        dhcp.append(_host(lease))
    return _text(network)


def _host(lease: Lease) -> ET.Element:
    return ET.Element("host", mac=lease.mac, name=lease.name, ip=str(lease.address))


def lease_xml(lease: Lease) -> str:
    """One reservation, as ``virNetwork.update`` adds it to a running network."""
    return ET.tostring(_host(lease), encoding="unicode")


def private_network_xml(name: str, bridge: str, mtu: int) -> str:
    """An isolated network on ``bridge``: no forward, no address of the host's."""
    return _text(_network(name, bridge, mtu))
