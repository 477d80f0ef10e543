"""Load the whole configuration: system directory, then the user's.

``batch.yaml``, ``networks.yaml`` and ``resources.yaml`` are site policy and
are read from the system directory only; templates come from
``templates.yaml`` and ``templates.d/*.yaml`` of both directories.

A system directory with none of these files (a machine nobody set up) gets
the embedded default: the shipped samples' networks, resource sets and
templates, with ``batch.backend: local`` and ``store.backend: sqlite``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vcluster.config.batch import BatchConfig, embedded_batch, parse_batch
from vcluster.config.paths import sample_dir, system_dir, user_dir
from vcluster.config.resolve import resolve_templates
from vcluster.config.resources import ResourceSet, parse_networks, parse_resources
from vcluster.config.templates import RawTemplate, Template, parse_templates
from vcluster.errors import ConfigError
from vcluster.networks import Network
from vcluster.schema.source import load_yaml


@dataclass(frozen=True)
class Config:
    """Everything read from the configuration files, validated."""

    batch: BatchConfig
    networks: Mapping[str, Network]
    resource_sets: Mapping[str, ResourceSet]
    templates: Mapping[str, Template]
    files: tuple[Path, ...]  # the files that were read, in order


def template_files(directory: Path) -> list[Path]:
    files = [directory / "templates.yaml"]
    files += sorted((directory / "templates.d").glob("*.yaml"))
    return [f for f in files if f.is_file()]


def _read_templates(directory: Path, level: str,
                    files: list[Path]) -> dict[str, RawTemplate]:
    out: dict[str, RawTemplate] = {}
    for path in template_files(directory):
        files.append(path)
        for name, raw in parse_templates(load_yaml(path), path, level).items():
            if name in out:
                raise ConfigError(raw.origin, name,
                                  f"template defined twice (first at {out[name].origin})",
                                  "one definition per template and level")
            out[name] = raw
    return out


SITE_FILES = ("batch.yaml", "networks.yaml", "resources.yaml", "templates.yaml")


def is_embedded(system: Path) -> bool:
    """No configuration at all in the system directory: the embedded default applies."""
    return not any((system / name).is_file() for name in SITE_FILES) and not any(
        (system / "templates.d").glob("*.yaml"))


def load_batch(system: Path | None = None) -> BatchConfig:
    """This host's batch.yaml alone, for the parts that run on compute hosts.

    Unlike ``load_config`` (where a missing file means the defaults, handy on a
    machine that only browses templates), a host without batch.yaml is not
    set up for vcluster: say so rather than guess endpoints and directories.
    A system directory with no configuration at all is the embedded default.
    """
    system = system or system_dir()
    if is_embedded(system):
        return embedded_batch()
    path = system / "batch.yaml"
    if not path.is_file():
        raise ConfigError(None, "", f"{path}: no such file (this host is not configured for "
                          "vcluster)", "/etc/vcluster/batch.yaml, or $VCLUSTER_CONF naming its "
                          "directory")
    return parse_batch(load_yaml(path), path)


def load_config(system: Path | None = None, user: Path | None = None) -> Config:
    """Read and validate the configuration; any error is a one-line ConfigError."""
    system = system or system_dir()
    user = user or user_dir()
    files: list[Path] = []
    embedded = is_embedded(system)
    site = sample_dir() if embedded else system

    def read(name: str) -> tuple[Path, object]:
        path = site / name
        if path.is_file():
            files.append(path)
            return path, load_yaml(path)
        return path, None

    if embedded:
        batch = embedded_batch()
    else:
        batch_path, batch_node = read("batch.yaml")
        batch = parse_batch(batch_node, batch_path)  # type: ignore[arg-type]
    _, net_node = read("networks.yaml")
    networks = parse_networks(net_node)  # type: ignore[arg-type]
    _, res_node = read("resources.yaml")
    resource_sets = parse_resources(res_node, networks)  # type: ignore[arg-type]
    levels = {"system": _read_templates(site, "system", files)}
    if user.resolve() != site.resolve():
        levels["user"] = _read_templates(user, "user", files)
    templates = resolve_templates(levels, resource_sets)
    return Config(batch, networks, resource_sets, templates, tuple(files))
