"""Template inheritance: from RawTemplates of both levels to resolved Templates.

A user template shadows a system template of the same name.  ``inherits: X``
looks X up at the template's own level first, then at the system level; a user
template that inherits its own name extends the system template it shadows.
A child's field replaces the parent's field whole (a ``fam`` or ``disks`` value
is not merged key by key), which keeps every value traceable to one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vcluster.config.resources import DEFAULT_FAM_MAX, ResourceSet, check_fam_size
from vcluster.config.templates import Fam, RawTemplate, Template
from vcluster.errors import ConfigError, Origin

Levels = Mapping[str, Mapping[str, RawTemplate]]  # level -> name -> template
LEVEL_ORDER = ("user", "system")

# YAML key -> Template attribute
ATTRIBUTES = {
    "description": "description", "image": "image", "resource-set": "resource_set",
    "user-data": "user_data", "vcpus": "vcpus", "memory": "memory", "disks": "disks",
    "fam": "fam", "kernel": "kernel", "initrd": "initrd", "append": "append",
    "machine": "machine", "cpu-model": "cpu_model", "nic-model": "nic_model",
    "qemu-args": "qemu_args",
}


def _lookup(levels: Levels, name: str, from_level: str, from_name: str) -> RawTemplate | None:
    order = LEVEL_ORDER[LEVEL_ORDER.index(from_level):]
    for level in order:
        if level == from_level and name == from_name:
            continue  # inheriting one's own name means the shadowed system template
        found = levels.get(level, {}).get(name)
        if found is not None:
            return found
    return None


def _chain(levels: Levels, start: RawTemplate) -> list[RawTemplate]:
    """``start`` and its ancestors, nearest first."""
    chain = [start]
    seen = {(start.level, start.name)}
    current = start
    while (parent_name := current.values.get("inherits")) is not None:
        origin = current.origins["inherits"]
        key = f"{current.name}.inherits"
        parent = _lookup(levels, parent_name, current.level, current.name)
        if parent is None:
            known = sorted({n for lv in levels.values() for n in lv})
            raise ConfigError(origin, key, f"unknown template {parent_name!r}",
                              "one of: " + ", ".join(known))
        if (parent.level, parent.name) in seen:
            cycle = " -> ".join([t.name for t in chain] + [parent.name])
            raise ConfigError(origin, key, f"inheritance cycle: {cycle}",
                              "a chain of templates that ends")
        seen.add((parent.level, parent.name))
        chain.append(parent)
        current = parent
    return chain


def resolve_template(levels: Levels, raw: RawTemplate,
                     resource_sets: Mapping[str, ResourceSet]) -> Template:
    chain = _chain(levels, raw)
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for ancestor in reversed(chain):  # farthest first, so nearer values win
        for key, value in ancestor.values.items():
            if key != "inherits":
                values[key] = value
                for okey in [k for k in origins if k.startswith(key + ".")]:
                    del origins[okey]  # the whole field is replaced, sub-keys too
                origins.update((k, o) for k, o in ancestor.origins.items()
                               if k == key or k.startswith(key + "."))
    if len(chain) > 1:
        origins["inherits"] = raw.origins["inherits"]
    rs_name = values.get("resource-set")
    if rs_name is not None and rs_name not in resource_sets:
        known = ", ".join(sorted(resource_sets)) or "none are defined"
        raise ConfigError(origins["resource-set"], f"{raw.name}.resource-set",
                          f"unknown resource set {rs_name!r}",
                          f"a resource set from resources.yaml ({known})")
    fam: Fam | None = values.get("fam")
    if fam is not None and fam.size is not None:
        rs = resource_sets.get(rs_name or "default")
        maximum = rs.fam_max_size if rs else DEFAULT_FAM_MAX
        limit = f"resource set {rs.name!r}" if rs else "the default resource limits"
        check_fam_size(origins["fam.size"], f"{raw.name}.fam.size", fam.size, maximum, limit)
    kwargs = {ATTRIBUTES[k]: v for k, v in values.items()}
    return Template(
        name=raw.name,
        origin=raw.origin,
        level=raw.level,
        inherits=tuple(t.name for t in chain[1:]),
        origins=origins,
        **kwargs,
    )


def resolve_templates(levels: Levels,
                      resource_sets: Mapping[str, ResourceSet]) -> dict[str, Template]:
    """Resolve every visible template (user templates shadow system ones)."""
    out: dict[str, Template] = {}
    for level in reversed(LEVEL_ORDER):  # system first, user ones replace them
        for name, raw in levels.get(level, {}).items():
            out[name] = resolve_template(levels, raw, resource_sets)
    return dict(sorted(out.items()))
