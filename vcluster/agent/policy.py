"""The site's limits, which the agent enforces whatever a caller asks for.

A VM runner's request is the user's: it may name any network, MTU, VM index
or region size.  The agent therefore checks it against the site policy in its
*own* configuration directory (the one holding its batch.yaml, never a
user's), read with the project's loaders when the agent starts:

- a network must be defined in ``networks.yaml``, with the type the request
  names, and that type must be one the agent makes (its plug-in in
  ``vcluster.networks`` says so; ``private`` today); its bridge and taps get
  the MTU given there (a request naming another MTU is refused, so a runner
  and the agent that disagree say so);
- a FAM region may not be larger than the largest ``fam.max-size`` of any
  resource set in ``resources.yaml`` (a set without a ``fam`` section allows
  the loaders' default, 1G); without any resource set there are no regions;
- a job has at most ``protocol.MAX_REGIONS`` distinct region names on a host;
- the VM index must be below the job's task count (SLURM's NumTasks; one
  task per VM), which ``jobs.py`` checks against what SLURM says;
- a nat network's ``subnet`` (the pool of every job's block on a host) and
  ``ssh-ports`` come from here (``nat.NatSite``);
- a network joined between hosts (a VXLAN id: the ``vnis`` request, or a
  VM's network naming one) must be a site network whose type tunnels
  (``private``): its ``vni-range``, ``vxlan-port`` and underlay
  (``interface`` or ``interface-suffix``) come from here (``Tunnel``).

Changing these files takes effect when the agent restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vcluster import networks as network_types
from vcluster.agent.nat import NatSite
from vcluster.agent.protocol import MAX_REGIONS, NetworkSpec, bad_request, denied
from vcluster.config.resources import parse_networks, parse_resources
from vcluster.networks.nat import NatNetwork
from vcluster.networks.private import VXLAN_OVERHEAD, PrivateNetwork
from vcluster.schema.fields import format_size
from vcluster.schema.source import load_yaml

NETWORKS = "networks.yaml"
RESOURCES = "resources.yaml"


@dataclass(frozen=True)
class Tunnel:
    """How a site network is joined between the hosts of a job (VXLAN)."""

    name: str
    mtu: int  # the network's (the VMs')
    vni_range: tuple[int, int]
    vni_origin: str  # file:line of vni-range (of the network, when it is the default)
    port: int  # vxlan-port
    interface: str | None  # the underlay interface on every host, or
    interface_suffix: str | None  # appended to a host's name to find its tunnel address
    origin: str  # file:line of the network

    @property
    def underlay_mtu(self) -> int:
        return self.mtu + VXLAN_OVERHEAD


@dataclass(frozen=True)
class SiteNetwork:
    name: str
    type: str
    mtu: int
    origin: str  # file:line of its definition
    tunnel: Tunnel | None = None  # set for the types whose networks span hosts
    nat: NatSite | None = None  # set for nat networks


@dataclass(frozen=True)
class Policy:
    """What the site allows on this host."""

    directory: Path
    networks: dict[str, SiteNetwork]
    fam_max: int  # 0: no FAM regions
    fam_max_from: str  # where fam_max is configured
    max_regions: int = MAX_REGIONS

    def network_mtu(self, spec: NetworkSpec, where: str) -> int:
        """The site's MTU for network ``spec``; a refusal unless the agent may make it."""
        made = network_types.agent_types()
        kind = network_types.kind(spec.type)
        if kind is None or not kind.built_by_agent:
            what = "is not a network type" if kind is None else "is not supported by this agent"
            raise bad_request(f"{where}type: {spec.type!r} {what} (expected "
                              f"{' or '.join(map(repr, made))})")
        site = self.networks.get(spec.name)
        if site is None:
            known = ", ".join(sorted(n for n, s in self.networks.items()
                                     if s.type in made)) or "none"
            raise denied(f"{where}name: network {spec.name!r} is not defined in "
                         f"{self.directory / NETWORKS} ({'/'.join(made)} networks there: "
                         f"{known})")
        if site.type != spec.type:
            why = "" if site.type in made else \
                f"; this agent makes {'/'.join(made)} networks only"
            raise denied(f"{where}name: network {spec.name!r} is a {site.type} network "
                         f"({site.origin}), not {spec.type}{why}")
        if spec.mtu is not None and spec.mtu != site.mtu:
            raise bad_request(f"{where}mtu: {spec.mtu} differs from the MTU {site.mtu} that "
                              f"{site.origin} gives network {spec.name!r} (the agent uses "
                              "the site's; omit mtu or fix the caller's configuration)")
        return site.mtu

    def tunnel(self, name: str, where: str) -> Tunnel:
        """How site network ``name`` spans hosts; a refusal unless it is one that does."""
        site = self.networks.get(name)
        tunneled = sorted(n for n, s in self.networks.items() if s.tunnel is not None)
        if site is None:
            raise denied(f"{where}network {name!r} is not defined in "
                         f"{self.directory / NETWORKS} (networks there that span hosts: "
                         f"{', '.join(tunneled) or 'none'})")
        if site.tunnel is None:
            raise denied(f"{where}network {name!r} is a {site.type} network ({site.origin}), "
                         "which does not span hosts: it has no VXLAN id (networks that do: "
                         f"{', '.join(tunneled) or 'none'})")
        return site.tunnel

    def nat(self, name: str) -> NatSite | None:
        """Site network ``name``'s NAT settings, if it is a nat network."""
        site = self.networks.get(name)
        return None if site is None else site.nat

    def underlay_interfaces(self) -> list[str]:
        """The interfaces networks.yaml names as tunnel underlays (``interface``)."""
        return sorted({s.tunnel.interface for s in self.networks.values()
                       if s.tunnel is not None and s.tunnel.interface is not None})

    def check_fam_size(self, name: str, size: int) -> None:
        if self.fam_max == 0:
            raise denied(f"fam.size: this site allows no FAM regions ({self.fam_max_from})")
        if size > self.fam_max:
            raise denied(f"fam.size: region {name!r} of {format_size(size)} is more than "
                         f"{format_size(self.fam_max)}, the largest fam.max-size of this "
                         f"site ({self.fam_max_from})")

    def check_region_count(self, name: str, existing: set[str]) -> None:
        if name not in existing and len(existing) >= self.max_regions:
            raise denied(f"fam.name: job already has {len(existing)} FAM regions on this host "
                         f"({', '.join(sorted(existing))}); a job may have at most "
                         f"{self.max_regions} (MAX_REGIONS of the vcluster agent)")


def load_policy(directory: Path) -> Policy:
    """The policy of the configuration directory ``directory``; ConfigError if broken."""
    net_path, res_path = directory / NETWORKS, directory / RESOURCES
    networks = parse_networks(load_yaml(net_path) if net_path.is_file() else None)
    sets = parse_resources(load_yaml(res_path) if res_path.is_file() else None, networks)
    site: dict[str, SiteNetwork] = {}
    for name, net in networks.items():
        tunnel = None
        if isinstance(net, PrivateNetwork):
            tunnel = Tunnel(name=name, mtu=net.mtu, vni_range=net.vni_range,
                            vni_origin=str(net.vni_origin or net.origin), port=net.vxlan_port,
                            interface=net.interface, interface_suffix=net.interface_suffix,
                            origin=str(net.origin))
        nat = None
        if isinstance(net, NatNetwork):
            nat = NatSite(name=name, subnet=net.subnet, ssh_ports=net.ssh_ports,
                          origin=str(net.origin))
        site[name] = SiteNetwork(name=name, type=net.type, mtu=net.mtu, origin=str(net.origin),
                                 tunnel=tunnel, nat=nat)
    fam_max, fam_from = 0, f"{res_path} defines no resource set"
    for rset in sets.values():
        if rset.fam_max_size > fam_max:
            fam_max = rset.fam_max_size
            fam_from = f"fam.max-size of resource set {rset.name!r} at {rset.origin}"
    return Policy(directory=directory, networks=site, fam_max=fam_max, fam_max_from=fam_from)
