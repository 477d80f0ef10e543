"""Cluster definitions: ``tpl:N[,tpl2:M]`` → the ordered VMs vm0 … vmK-1."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vcluster.config.templates import NAME_RE, Template
from vcluster.errors import DefinitionError

MAX_VMS = 4096


@dataclass(frozen=True)
class VmSpec:
    index: int
    template: str

    @property
    def name(self) -> str:
        return f"vm{self.index}"


def parse_definition(text: str) -> list[tuple[str, int]]:
    """Split a definition into (template, count) groups, checking only its syntax."""
    if not text.strip():
        raise DefinitionError(text, "the definition is empty")
    groups: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, count_text = part.strip().partition(":")
        if not name:
            raise DefinitionError(text, f"{part.strip()!r} has no template name")
        if not NAME_RE.match(name):
            raise DefinitionError(text, f"{name!r} is not a valid template name")
        count = 1
        if sep:
            if not count_text.isdigit():
                raise DefinitionError(text, f"count {count_text!r} of {name!r} is not a number")
            count = int(count_text)
            if count < 1:
                raise DefinitionError(text, f"count of {name!r} must be at least 1, not {count}")
        groups.append((name, count))
    total = sum(c for _, c in groups)
    if total > MAX_VMS:
        raise DefinitionError(text, f"{total} VMs is more than the limit of {MAX_VMS}")
    return groups


def expand_definition(text: str, templates: Mapping[str, Template]) -> list[VmSpec]:
    """The VMs of a definition, in order, each with a known template."""
    vms: list[VmSpec] = []
    for name, count in parse_definition(text):
        if name not in templates:
            known = ", ".join(sorted(templates)) or "none are defined"
            raise DefinitionError(text, f"unknown template {name!r}", f"a template: {known}")
        start = len(vms)
        vms.extend(VmSpec(start + i, name) for i in range(count))
    return vms
