"""A job's network devices: a bridge per network, a tap per (VM, network), a VXLAN.

Devices are made with pyroute2 (netlink; taps through its tuntap support) and
are persistent, so they outlive the agent and the file descriptors handed
out.  Names identify the job (IFNAMSIZ leaves 15 characters; numbers in base
36): ``vcb<job>n<net>`` for a bridge, ``vct<job>v<vm>n<net>`` for a tap,
``vcx<job>n<net>`` for the VXLAN device that joins a network's bridges on the
job's hosts.

A VXLAN device (``ensure_vxlan``) is a port of its network's bridge, with
the job's VXLAN id, this host's tunnel address as its source, the network's
UDP port, learning on, and the network's MTU; its forwarding database holds
one all-zeros entry per other host of the job (head-end replication:
broadcast, unknown unicast and ARP go to every peer, no multicast needed),
and exactly those.  The entries belong to the device: deleting it deletes
them.  ``interface_ipv4`` and ``underlay_of`` tell which host interface
carries a tunnel address and its MTU.  A nat network's bridge has the
gateway's address (``ensure_gateway``); the address goes with the bridge.

A tap is handed to the VM runner as an open file descriptor: ``/dev/net/tun``
attached with TUNSETIFF ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, the flags QEMU
uses when it opens a tap itself (``-netdev tap,fd=N`` probes IFF_VNET_HDR and
uses the virtio-net header when present), so QEMU needs no privilege.

``Devices`` is what the agent's job code needs of a host's devices;
``Netlink`` is the real one (tests give the agent one that keeps links in
memory).  The names are pure functions of the job, VM and network index.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vcluster.errors import ResourceError

IFNAMSIZ = 16  # with the terminating NUL
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(number: int) -> str:
    if number < 0:
        raise ValueError(f"{number} is negative")
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = _DIGITS[digit] + out
        if number == 0:
            return out


def _checked(name: str) -> str:
    if len(name) >= IFNAMSIZ:
        raise ResourceError(f"device name {name} is longer than {IFNAMSIZ - 1} characters "
                            "(job id or VM index too large)")
    return name


def bridge_name(job: str, network: int) -> str:
    return _checked(f"vcb{base36(int(job))}n{base36(network)}")


def tap_name(job: str, vm: int, network: int) -> str:
    return _checked(f"vct{base36(int(job))}v{base36(vm)}n{base36(network)}")


def vxlan_name(job: str, network: int) -> str:
    return _checked(f"vcx{base36(int(job))}n{base36(network)}")


class JobPrefixes(NamedTuple):
    """Name prefixes of every device of a job (a tuple, for ``str.startswith``)."""

    bridges: str
    taps: str
    vxlans: str


def job_prefixes(job: str) -> JobPrefixes:
    """Name prefixes of every device of ``job``: bridges, taps, VXLAN devices."""
    tag = base36(int(job))
    return JobPrefixes(f"vcb{tag}n", f"vct{tag}v", f"vcx{tag}n")


FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")  # of the agent's network namespace
FLOOD = "00:00:00:00:00:00"  # the forwarding entry for broadcast and unknown destinations


@dataclass(frozen=True)
class Vxlan:
    """What a job's VXLAN device is: its id, ends, port, MTU and peers."""

    vni: int
    local: str  # this host's tunnel address (IPv4)
    port: int  # UDP destination port (networks.yaml vxlan-port)
    mtu: int  # the network's
    peers: tuple[str, ...]  # the other hosts' tunnel addresses: one flood entry each


class Devices(Protocol):
    """A host's network devices, as the agent's job code uses them."""

    def ensure_bridge(self, name: str, mtu: int) -> None:
        """Bridge ``name`` exists, is up and has ``mtu`` (made if missing)."""

    def ensure_gateway(self, bridge: str, address: str) -> None:
        """Bridge ``bridge`` has IPv4 ``address`` (CIDR; a nat network's gateway)."""

    def ipv4_forwarding(self) -> bool:
        """Whether this host forwards IPv4 (``net.ipv4.ip_forward``)."""

    def ensure_tap(self, name: str, bridge: str, mtu: int) -> None:
        """Persistent tap ``name`` exists, is a port of ``bridge``, has ``mtu`` and is up."""

    def open_tap(self, name: str) -> int:
        """An open file descriptor on tap ``name``; the caller closes it."""

    def ensure_vxlan(self, name: str, vxlan: Vxlan, bridge: str) -> None:
        """VXLAN device ``name`` is ``vxlan``, a port of ``bridge``, flooding to its peers
        only, and up (made if missing; one with other settings is refused)."""

    def remove_link(self, name: str) -> bool:
        """Delete interface ``name``; False if it did not exist (that is fine)."""

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        """Names of the interfaces here that start with one of ``prefixes``, sorted."""

    def interface_ipv4(self, name: str) -> list[str] | None:
        """The IPv4 addresses of interface ``name``; None if there is no such interface."""

    def underlay_of(self, address: str) -> tuple[str, int] | None:
        """(name, MTU) of the interface holding IPv4 ``address`` here; None if none does."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else str(info.get_attr("IFLA_INFO_KIND"))


def _vxlan_of(ipr: IPRoute, index: int) -> tuple[int, str, int] | None:
    """(id, local address, port) of VXLAN device ``index``; None if it is not one."""
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    return (int(data.get_attr("IFLA_VXLAN_ID")), str(data.get_attr("IFLA_VXLAN_LOCAL")),
            int(data.get_attr("IFLA_VXLAN_PORT")))


def _flood_entries(ipr: IPRoute, index: int) -> set[str]:
    """The destinations of device ``index``'s all-zeros forwarding entries."""
    found: set[str] = set()
    for entry in ipr.fdb("dump", ifindex=index):
        dst = entry.get_attr("NDA_DST")
        if entry["ifindex"] == index and entry.get_attr("NDA_LLADDR") == FLOOD and dst:
            found.add(str(dst))
    return found


def _ipv4_addresses(ipr: IPRoute, index: int | None = None) -> list[tuple[int, str]]:
    """(interface index, address) of the IPv4 addresses here (of ``index`` only, if given)."""
    query: dict[str, Any] = {"family": socket.AF_INET}
    if index is not None:
        query["index"] = index
    out: list[tuple[int, str]] = []
    for addr in ipr.get_addr(**query):
        local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
        if local:
            out.append((int(addr["index"]), str(local)))
    return out


class Netlink:
    """The host's real devices, through pyroute2 (``Devices``)."""

    def ensure_bridge(self, name: str, mtu: int) -> None:
        try:
            with IPRoute() as ipr:
                index = _index(ipr, name)
                if index is None:
                    ipr.link("add", ifname=name, kind="bridge")
                    index = _index(ipr, name)
                    assert index is not None
                elif _kind(ipr, index) != "bridge":
                    raise ResourceError(f"{name} exists and is not a bridge; remove it")
                ipr.link("set", index=index, mtu=mtu, state="up")
        except NetlinkError as e:
            raise ResourceError(f"cannot make bridge {name}: {e}") from e

    def ensure_gateway(self, bridge: str, address: str) -> None:
        local, _, length = address.partition("/")
        try:
            with IPRoute() as ipr:
                index = _index(ipr, bridge)
                if index is None:
                    raise ResourceError(f"bridge {bridge} is missing")
                if local not in {a for _, a in _ipv4_addresses(ipr, index)}:
                    ipr.addr("add", index=index, address=local, prefixlen=int(length))
        except NetlinkError as e:
            raise ResourceError(f"cannot give bridge {bridge} the address {address}: "
                                f"{e}") from e

    def ipv4_forwarding(self) -> bool:
        try:
            return FORWARDING.read_text().strip() == "1"
        except OSError:
            return False

    def ensure_tap(self, name: str, bridge: str, mtu: int) -> None:
        try:
            with IPRoute() as ipr:
                master = _index(ipr, bridge)
                if master is None:
                    raise ResourceError(f"bridge {bridge} is missing")
                index = _index(ipr, name)
                if index is None:
                    ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                             ifr={"no_pi": True, "vnet_hdr": True})
                    index = _index(ipr, name)
                    assert index is not None
                elif _kind(ipr, index) != "tun":
                    raise ResourceError(f"{name} exists and is not a tap; remove it")
                ipr.link("set", index=index, mtu=mtu, master=master, state="up")
        except (NetlinkError, OSError) as e:
            raise ResourceError(f"cannot make tap {name}: {e}") from e

    def ensure_vxlan(self, name: str, vxlan: Vxlan, bridge: str) -> None:
        try:
            with IPRoute() as ipr:
                master = _index(ipr, bridge)
                if master is None:
                    raise ResourceError(f"bridge {bridge} is missing")
                index = _index(ipr, name)
                if index is None:
                    ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vxlan.vni,
                             vxlan_local=vxlan.local, vxlan_port=vxlan.port,
                             vxlan_learning=1, mtu=vxlan.mtu)
                    index = _index(ipr, name)
                    assert index is not None
                else:
                    have = _vxlan_of(ipr, index)
                    want = (vxlan.vni, vxlan.local, vxlan.port)
                    if have is None:
                        raise ResourceError(f"{name} exists and is not a VXLAN device; "
                                            "remove it")
                    if have != want:
                        raise ResourceError(
                            f"{name} exists with VXLAN id {have[0]}, local {have[1]}, port "
                            f"{have[2]}, not {want[0]}, {want[1]}, {want[2]}; remove it")
                ipr.link("set", index=index, mtu=vxlan.mtu, master=master)
                _set_flood(ipr, index, vxlan.peers)
                ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise ResourceError(f"cannot make VXLAN device {name}: {e}") from e

    def interface_ipv4(self, name: str) -> list[str] | None:
        try:
            with IPRoute() as ipr:
                index = _index(ipr, name)
                if index is None:
                    return None
                return [address for _i, address in _ipv4_addresses(ipr, index)]
        except NetlinkError as e:
            raise ResourceError(f"cannot read the addresses of {name}: {e}") from e

    def underlay_of(self, address: str) -> tuple[str, int] | None:
        try:
            with IPRoute() as ipr:
                for index, local in _ipv4_addresses(ipr):
                    if local == address:
                        link = ipr.get_links(index)[0]
                        return str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU"))
        except NetlinkError as e:
            raise ResourceError(f"cannot read the interfaces' addresses: {e}") from e
        return None

    def open_tap(self, name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                raise ResourceError(f"tap {name} is in use by another process (is another "
                                    "runner of this VM still running?)") from e
            raise ResourceError(f"cannot open tap {name}: {e.strerror}") from e
        return fd

    def remove_link(self, name: str) -> bool:
        try:
            with IPRoute() as ipr:
                index = _index(ipr, name)
                if index is None:
                    return False
                ipr.link("del", index=index)
                return True
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise ResourceError(f"cannot remove {name}: {e}") from e

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        try:
            with IPRoute() as ipr:
                names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
        except NetlinkError as e:
            raise ResourceError(f"cannot list the network devices: {e}") from e
        return sorted(n for n in names if n.startswith(prefixes))


def _set_flood(ipr: IPRoute, index: int, peers: Sequence[str]) -> None:
    """Device ``index`` floods to ``peers``, and to no one else."""
    have = _flood_entries(ipr, index)
    for peer in sorted(set(peers) - have):
        ipr.fdb("append", ifindex=index, lladdr=FLOOD, dst=peer)
    for stale in sorted(have - set(peers)):
        ipr.fdb("del", ifindex=index, lladdr=FLOOD, dst=stale)


def tap_of_fd(fd: int) -> tuple[str, int]:
    """(interface name, flags) of an open tap file descriptor (TUNGETIFF)."""
    raw = fcntl.ioctl(fd, TUNGETIFF, bytes(IFNAMSIZ + 24))
    name, flags = struct.unpack_from("16sH", raw)
    return name.rstrip(b"\0").decode(), int(flags)
