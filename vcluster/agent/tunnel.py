"""Planning a job's tunnel on this host: its peers, their addresses, the underlay and its MTU.

A private network with a VXLAN id joins the job's bridges on all of the
job's hosts (SLURM's node list, never the caller's word; every host of a job
is allocated up front, so the peers are known at the first request and never
change).  Each host's *tunnel address* comes from networks.yaml:

- ``interface: NAME``: this host's IPv4 address on NAME; another host's is
  the address its agent registered for NAME (``HostRecord.interfaces``), or
  else the address it registered;
- ``interface-suffix: SUFFIX``: what ``<host>SUFFIX`` resolves to (IPv4);
- neither: the address each host's agent registered (``hosts/<host>``: its
  address towards the store).

The *underlay* is the interface here that holds this host's address; it must
carry the network's MTU plus VXLAN's 50 bytes of headers.  Every refusal is a
TunnelError whose message starts with this host's name and says what to do;
nothing is made before the plan stands (``plan``), so a refused network
leaves nothing behind.  ``peer_destinations`` (the forwarding entries) and
``tunnel_addresses`` are pure.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vcluster.agent.netdev import Devices
from vcluster.agent.policy import Tunnel
from vcluster.errors import InputError, StoreError, TunnelError
from vcluster.networks.private import VXLAN_OVERHEAD
from vcluster.store.base import Store
from vcluster.store.keys import Keys
from vcluster.store.records import HostRecord, from_json

Resolver = Callable[[str], str | None]


@dataclass(frozen=True)
class TunnelPlan:
    """What this host makes for one tunneled network of a job."""

    network: str
    vni: int
    port: int
    mtu: int  # the network's: the VXLAN device's and the VMs'
    local: str  # this host's tunnel address
    underlay: str  # the interface holding it
    peers: tuple[str, ...]  # the other hosts' tunnel addresses: one forwarding entry each
    sources: tuple[str, ...]  # every host's tunnel address: what the filter accepts


def _literal_ipv4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def resolve_ipv4(name: str) -> str | None:
    """The IPv4 address ``name`` is (a literal) or resolves to; None if it does not."""
    literal = _literal_ipv4(name)
    if literal is not None:
        return literal
    try:
        found = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    return str(found[0][4][0]) if found else None


def peer_destinations(node: str, addresses: Mapping[str, str]) -> tuple[str, ...]:
    """Where ``node`` floods the network's frames: every other host's address, once.

    Sorted; never this host's own address (two host names for one address
    would otherwise make a host send to itself).
    """
    local = addresses[node]
    return tuple(sorted({a for host, a in addresses.items() if host != node and a != local}))


def tunnel_addresses(tunnel: Tunnel, node: str, hosts: Sequence[str],
                     records: Mapping[str, HostRecord | None],
                     local_ipv4: Callable[[str], list[str] | None],
                     resolve: Resolver = resolve_ipv4) -> dict[str, str]:
    """Every host's tunnel address for ``tunnel`` (see the module docstring).

    ``records`` are the hosts' registrations (None: not registered),
    ``local_ipv4`` gives this host's addresses on an interface (None: no
    such interface).  A TunnelError names what is missing.
    """
    where = f"network {tunnel.name!r} ({tunnel.origin})"
    out: dict[str, str] = {}
    for host in hosts:
        if tunnel.interface_suffix is not None:
            name = host + tunnel.interface_suffix
            address = resolve(name)
            if address is None:
                raise TunnelError(f"{node}: {name} (host {host} + interface-suffix "
                                  f"{tunnel.interface_suffix!r} of {where}) does not resolve "
                                  "to an IPv4 address; add it to the hosts' DNS or "
                                  "/etc/hosts")
        elif tunnel.interface is not None and host == node:
            found = local_ipv4(tunnel.interface)
            if not found:
                what = "does not exist" if found is None else "has no IPv4 address"
                raise TunnelError(f"{node}: interface {tunnel.interface} of {where} {what} "
                                  f"on {node}")
            address = found[0]
        else:
            address = _registered(tunnel, node, host, records.get(host), resolve)
        out[host] = address
    return out


def _registered(tunnel: Tunnel, node: str, host: str, record: HostRecord | None,
                resolve: Resolver) -> str:
    """``host``'s tunnel address as its agent registered it."""
    if record is None:
        raise TunnelError(f"{node}: host {host} of the job is not registered in the store, so "
                          f"network {tunnel.name!r} cannot reach it (is the vcluster agent "
                          f"running on {host}?)")
    said = record.address
    if tunnel.interface is not None:
        said = record.interfaces.get(tunnel.interface, said)
    address = _literal_ipv4(said) or resolve(said)
    if address is None:
        raise TunnelError(f"{node}: host {host} registered the address {said!r}, which is "
                          f"not IPv4 and does not resolve to IPv4, so network {tunnel.name!r} "
                          "cannot reach it (VXLAN tunnels run over IPv4)")
    return address


def mtu_refusal(node: str, interface: str, mtu: int, tunnel: Tunnel) -> str:
    return (f"{node}: interface {interface} has MTU {mtu}, too small for network "
            f"{tunnel.name!r} (MTU {tunnel.mtu} + {VXLAN_OVERHEAD} bytes of VXLAN headers = "
            f"{tunnel.underlay_mtu}); lower the network's mtu or raise the interface's")


def read_hosts(store: Store, keys: Keys, hosts: Sequence[str]) -> dict[str, HostRecord | None]:
    """The registrations of ``hosts`` (None for a host not registered)."""
    records: dict[str, HostRecord | None] = {}
    try:
        for host in hosts:
            entry = store.get(keys.host(host))
            records[host] = None if entry is None else from_json(HostRecord, entry.value)
    except InputError as e:
        raise TunnelError(f"a host name of the job cannot be looked up: {e}") from e
    except StoreError as e:
        raise StoreError(f"cannot read the registrations of the job's hosts: {e}") from e
    return records


def plan(tunnel: Tunnel, vni: int, job: str, node: str, hosts: Sequence[str],
         records: Mapping[str, HostRecord | None], devices: Devices,
         resolve: Resolver = resolve_ipv4) -> TunnelPlan:
    """What this host (``node``) makes for ``tunnel`` of ``job``; TunnelError if it cannot."""
    if node not in hosts:
        listed = ", ".join(hosts) or "none"
        raise TunnelError(f"{node}: is not one of the hosts SLURM gave job {job} ({listed}), "
                          f"so it cannot join network {tunnel.name!r}")
    addresses = tunnel_addresses(tunnel, node, hosts, records, devices.interface_ipv4, resolve)
    local = addresses[node]
    held = devices.underlay_of(local)
    if held is None:
        raise TunnelError(f"{node}: no interface of {node} holds its tunnel address {local} "
                          f"for network {tunnel.name!r} ({tunnel.origin}); check the "
                          "network's interface or interface-suffix, or the host's addresses")
    interface, mtu = held
    if mtu < tunnel.underlay_mtu:
        raise TunnelError(mtu_refusal(node, interface, mtu, tunnel))
    return TunnelPlan(network=tunnel.name, vni=vni, port=tunnel.port, mtu=tunnel.mtu,
                      local=local, underlay=interface,
                      peers=peer_destinations(node, addresses),
                      sources=tuple(sorted(set(addresses.values()))))
