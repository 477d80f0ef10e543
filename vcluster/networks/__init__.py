"""Network types as plug-ins.

Each type lives in ``vcluster.networks.<type>`` and is imported only when a
configuration uses it.  A plug-in module provides ``parse(name, section) ->
Network``: the validated, frozen settings of one named network.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from vcluster.errors import Origin
from vcluster.schema.fields import Section

# type name -> module; new types register here and load on demand.
NETWORK_TYPES: dict[str, str] = {
    "nat": "vcluster.networks.nat",
    "private": "vcluster.networks.private",
}


@dataclass(frozen=True)
class Network:
    """Settings shared by every network type."""

    name: str
    type: str
    origin: Origin


class NetworkPlugin(Protocol):
    def parse(self, name: str, section: Section) -> Network: ...


def plugin(type_name: str) -> NetworkPlugin:
    module: NetworkPlugin = importlib.import_module(NETWORK_TYPES[type_name])
    return module


def parse_network(name: str, section: Section) -> Network:
    """Validate one entry of networks.yaml, dispatching on its ``type``."""
    type_name = section.string("type", required=True,
                               expected="a network type: " + ", ".join(sorted(NETWORK_TYPES)))
    assert type_name is not None
    if type_name not in NETWORK_TYPES:
        raise section.error("type", f"{type_name!r} is not a network type",
                            "one of: " + ", ".join(sorted(NETWORK_TYPES)))
    return plugin(type_name).parse(name, section)
