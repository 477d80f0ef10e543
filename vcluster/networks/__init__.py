"""Network types as plug-ins: the one place that knows what each type is and can do.

Each type lives in ``vcluster.networks.<type>`` and is imported only when
asked for.  A plug-in module provides:

- ``KIND``, a ``NetworkKind``: what this version of vcluster does with the
  type (whether the planner gives VMs NICs on it, whether the host agent
  makes its devices) and its default MTU;
- ``parse(name, section) -> Network``: the validated, frozen settings of one
  named network, a ``Network`` that also plans the address of each VM's NIC.

The planner (``cluster.py``) and the agent's site policy
(``agent/policy.py``) ask here instead of naming types, so a new type
touches only its plug-in and the agent's device code that makes it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
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
class NetworkKind:
    """What this version of vcluster does with one network type."""

    name: str
    default_mtu: int
    planned: bool  # the planner gives VMs NICs on it (else it is refused before submission)
    built_by_agent: bool  # the host agent makes its bridges and taps


@dataclass(frozen=True)
class Network(ABC):
    """Settings shared by every network type."""

    name: str
    type: str
    origin: Origin
    mtu: int

    @abstractmethod
    def nic_address(self, index: int, total: int) -> str | None:
        """The CIDR address of VM ``index`` of ``total`` (None: its host's agent gives it);
        InputError if there is no room."""


class NetworkPlugin(Protocol):
    KIND: NetworkKind

    def parse(self, name: str, section: Section) -> Network: ...


def plugin(type_name: str) -> NetworkPlugin:
    module: NetworkPlugin = importlib.import_module(NETWORK_TYPES[type_name])
    return module


def kind(type_name: str) -> NetworkKind | None:
    """What vcluster does with network type ``type_name``; None if there is no such type."""
    return plugin(type_name).KIND if type_name in NETWORK_TYPES else None


def planned_types() -> list[str]:
    """The types this version of vcluster plans NICs on."""
    return [name for name in sorted(NETWORK_TYPES) if plugin(name).KIND.planned]


def agent_types() -> list[str]:
    """The types whose devices the host agent makes."""
    return [name for name in sorted(NETWORK_TYPES) if plugin(name).KIND.built_by_agent]


def parse_network(name: str, section: Section) -> Network:
    """Validate one entry of networks.yaml, dispatching on its ``type``."""
    type_name = section.string("type", required=True,
                               expected="a network type: " + ", ".join(sorted(NETWORK_TYPES)))
    assert type_name is not None
    if type_name not in NETWORK_TYPES:
        raise section.error("type", f"{type_name!r} is not a network type",
                            "one of: " + ", ".join(sorted(NETWORK_TYPES)))
    return plugin(type_name).parse(name, section)
