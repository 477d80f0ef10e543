"""``networks.yaml`` and ``resources.yaml``: named networks and resource sets.

A resource set is what a template asks for by name: the networks each VM is
attached to (in order: the first is eth0) and the limits of its FAM region.
"""

from __future__ import annotations

from dataclasses import dataclass

from vcluster.errors import ConfigError, Origin
from vcluster.networks import Network, parse_network
from vcluster.schema.fields import Section, format_size
from vcluster.schema.source import Node

DEFAULT_FAM_MAX = 1 << 30
DEFAULT_FAM_SIZE = 64 << 20


@dataclass(frozen=True)
class ResourceSet:
    name: str
    description: str
    networks: tuple[str, ...]
    fam_max_size: int
    fam_default_size: int
    origin: Origin


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_networks(node: Node | None) -> dict[str, Network]:
    if node is None:
        return {}
    top = Section(node, "", "a mapping of network names to network definitions")
    out: dict[str, Network] = {}
    for name in top.names():
        sub = top.raw(name)
        if sub is None:
            raise top.error(name, "empty network definition", "a mapping with at least 'type'")
        out[name] = parse_network(name, Section(sub, name))
    return out


def parse_resources(node: Node | None, networks: dict[str, Network]) -> dict[str, ResourceSet]:
    if node is None:
        return {}
    top = Section(node, "", "a mapping of resource set names to resource sets")
    out: dict[str, ResourceSet] = {}
    for name in top.names():
        sub = top.raw(name)
        if sub is None:
            raise top.error(name, "empty resource set", "a mapping with 'networks'")
        sec = Section(sub, name)
        nets = sec.strings("networks", expected="a list of network names from networks.yaml")
        for net in nets:
            if net not in networks:
                known = ", ".join(sorted(networks)) or "none are defined"
                raise sec.error("networks", f"unknown network {net!r}",
                                f"a network defined in networks.yaml ({known})")
        if len(set(nets)) != len(nets):
            raise sec.error("networks", "a network is listed twice", "distinct network names")
        fam_max = DEFAULT_FAM_MAX
        fam_default = DEFAULT_FAM_SIZE
        if (fam := sec.section("fam")) is not None:
            fam_max = fam.size("max-size", DEFAULT_FAM_MAX) or DEFAULT_FAM_MAX
            fam_default = fam.size("default-size", min(DEFAULT_FAM_SIZE, fam_max)) or fam_max
            for key, value in (("max-size", fam_max), ("default-size", fam_default)):
                if not _is_power_of_two(value):
                    raise fam.error(key, f"{format_size(value)} is not a power of two",
                                    "a power of two such as 64M or 1G")
            if fam_default > fam_max:
                raise fam.error("default-size", f"{format_size(fam_default)} is more than "
                                f"max-size {format_size(fam_max)}", "at most max-size")
            fam.done()
        out[name] = ResourceSet(
            name=name,
            description=sec.string("description", "") or "",
            networks=nets,
            fam_max_size=fam_max,
            fam_default_size=fam_default,
            origin=sub.origin,
        )
        sec.done()
    return out


def check_fam_size(origin: Origin, key: str, size: int, maximum: int, limit_from: str) -> None:
    """Refuse a FAM size that is not a power of two or exceeds the set's maximum."""
    expected = f"a power of two such as 64M or 1G, at most {format_size(maximum)}"
    if not _is_power_of_two(size):
        raise ConfigError(origin, key, f"{format_size(size)} is not a power of two", expected)
    if size > maximum:
        raise ConfigError(origin, key, f"{format_size(size)} is more than the maximum "
                          f"{format_size(maximum)} of {limit_from}", expected)
