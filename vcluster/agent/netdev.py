"""A job's network devices: one bridge per private network, one tap per (VM, network).

Devices are made with pyroute2 (netlink; taps through its tuntap support) and
are persistent, so they outlive the agent and the file descriptors handed
out.  Names identify the job (IFNAMSIZ leaves 15 characters; numbers in base
36): ``vcb<job>n<net>`` for a bridge, ``vct<job>v<vm>n<net>`` for a tap.

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
import struct
from typing import Protocol

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


def job_prefixes(job: str) -> tuple[str, str]:
    """Name prefixes of every device of ``job``: (bridges, taps)."""
    tag = base36(int(job))
    return f"vcb{tag}n", f"vct{tag}v"


class Devices(Protocol):
    """A host's network devices, as the agent's job code uses them."""

    def ensure_bridge(self, name: str, mtu: int) -> None:
        """Bridge ``name`` exists, is up and has ``mtu`` (made if missing)."""

    def ensure_tap(self, name: str, bridge: str, mtu: int) -> None:
        """Persistent tap ``name`` exists, is a port of ``bridge``, has ``mtu`` and is up."""

    def open_tap(self, name: str) -> int:
        """An open file descriptor on tap ``name``; the caller closes it."""

    def remove_link(self, name: str) -> bool:
        """Delete interface ``name``; False if it did not exist (that is fine)."""

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        """Names of the interfaces here that start with one of ``prefixes``, sorted."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else str(info.get_attr("IFLA_INFO_KIND"))


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


def tap_of_fd(fd: int) -> tuple[str, int]:
    """(interface name, flags) of an open tap file descriptor (TUNGETIFF)."""
    raw = fcntl.ioctl(fd, TUNGETIFF, bytes(IFNAMSIZ + 24))
    name, flags = struct.unpack_from("16sH", raw)
    return name.rstrip(b"\0").decode(), int(flags)
