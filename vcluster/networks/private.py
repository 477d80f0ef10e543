"""``type: private``: one Ethernet segment per cluster, tunneled between hosts.

Each host of a job gets a bridge; a VXLAN device with the cluster's VNI joins
the hosts' bridges, sent over the host interface named by hostname +
``interface-suffix`` (or over ``interface``).  The MTU defaults to 1450 so that
full frames fit in a 1500-byte underlay with VXLAN's 50 bytes of headers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vcluster.networks import Network
from vcluster.networks.addressing import port_range, subnet
from vcluster.schema.fields import Section

VNI_MAX = (1 << 24) - 1


@dataclass(frozen=True)
class PrivateNetwork(Network):
    subnet: ipaddress.IPv4Network
    mtu: int
    vni_range: tuple[int, int]
    vxlan_port: int
    interface_suffix: str | None
    interface: str | None


def parse(name: str, section: Section) -> PrivateNetwork:
    suffix = section.string("interface-suffix")
    interface = section.string("interface")
    if suffix is not None and interface is not None:
        raise section.error("interface", "interface and interface-suffix exclude each other",
                            "one of interface or interface-suffix")
    vnis = port_range(section, "vni-range", (4096, 65535), low=1, high=VNI_MAX)
    assert vnis is not None
    net = PrivateNetwork(
        name=name,
        type="private",
        origin=section.node.origin,
        subnet=subnet(section),
        mtu=section.integer("mtu", 1450, minimum=576, maximum=9000) or 1450,
        vni_range=vnis,
        vxlan_port=section.integer("vxlan-port", 4789, minimum=1, maximum=65535) or 4789,
        interface_suffix=suffix,
        interface=interface,
    )
    section.done()
    return net
