"""``type: private``: one Ethernet segment per cluster, tunneled between hosts.

Each host of a job gets a bridge; a VXLAN device with the cluster's VNI joins
the hosts' bridges, sent over the host's tunnel address: the address of
``interface``, or what hostname + ``interface-suffix`` resolves to, or else
the address the host's agent registered.  The MTU defaults to 1450 so that
full frames fit in a 1500-byte underlay with VXLAN's 50 bytes of headers
(``VXLAN_OVERHEAD``; ``underlay_mtu`` is what the underlay must carry).
VM ``i`` gets the subnet's address ``i + 1``: the segment is the cluster's
alone, no host takes an address on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vcluster.errors import InputError, Origin
from vcluster.networks import Network, NetworkKind
from vcluster.networks.addressing import port_range, subnet
from vcluster.schema.fields import Section

KIND = NetworkKind("private", default_mtu=1450, planned=True, built_by_agent=True)
VNI_MAX = (1 << 24) - 1
# What VXLAN over IPv4 adds around a VM's frame: outer Ethernet (14), IPv4 (20),
# UDP (8) and VXLAN (8) headers.
VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class PrivateNetwork(Network):
    subnet: ipaddress.IPv4Network
    vni_range: tuple[int, int]
    vxlan_port: int
    interface_suffix: str | None
    interface: str | None
    vni_origin: Origin | None = None  # where vni-range is set (None: the default range)

    @property
    def underlay_mtu(self) -> int:
        """The MTU the hosts' tunnel interfaces need: the network's plus VXLAN's headers."""
        return self.mtu + VXLAN_OVERHEAD

    def tunnel_host(self, host: str) -> str | None:
        """The name to resolve for ``host``'s tunnel address (``interface-suffix``), if any."""
        return None if self.interface_suffix is None else host + self.interface_suffix

    def nic_address(self, index: int, total: int) -> str:
        room = self.subnet.num_addresses - 2  # network and broadcast addresses
        if total > room:
            raise InputError(f"{self.origin}: network {self.name!r} ({self.subnet}) has room "
                             f"for {room} VMs, not {total} (expected a larger subnet)")
        address = ipaddress.IPv4Address(int(self.subnet.network_address) + 1 + index)
        return f"{address}/{self.subnet.prefixlen}"


def parse(name: str, section: Section) -> PrivateNetwork:
    suffix = section.string("interface-suffix")
    interface = section.string("interface")
    if suffix is not None and interface is not None:
        raise section.error("interface", "interface and interface-suffix exclude each other",
                            "one of interface or interface-suffix")
    vnis = port_range(section, "vni-range", (4096, 65535), low=1, high=VNI_MAX)
    assert vnis is not None
    vni_origin = section.key_origin("vni-range") if section.has("vni-range") else None
    addresses = subnet(section)
    mtu = section.integer("mtu", KIND.default_mtu, minimum=576, maximum=9000)
    net = PrivateNetwork(
        name=name,
        type=KIND.name,
        origin=section.node.origin,
        subnet=addresses,
        mtu=mtu or KIND.default_mtu,
        vni_range=vnis,
        vxlan_port=section.integer("vxlan-port", 4789, minimum=1, maximum=65535) or 4789,
        interface_suffix=suffix,
        interface=interface,
        vni_origin=vni_origin,
    )
    section.done()
    return net
