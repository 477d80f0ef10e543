"""YAML documents that remember where every value came from.

PyYAML's composer gives nodes with marks; we turn them into ``Node`` trees so
that every later check can name the file, the line and the key it rejects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vcluster.errors import ConfigError, Origin


@dataclass(frozen=True)
class Node:
    """A YAML value with its origin.

    ``value`` is a python scalar, a ``list[Node]`` or a ``dict[str, Node]``;
    for mappings ``key_origins`` gives the line of each key.
    """

    value: Any
    origin: Origin
    key_origins: dict[str, Origin] | None = None

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.value, list)

    def items(self) -> Iterator[tuple[str, Origin, Node]]:
        assert isinstance(self.value, dict) and self.key_origins is not None
        for key, node in self.value.items():
            yield key, self.key_origins[key], node

    def plain(self) -> Any:
        """The value with all origins stripped (nested dicts, lists, scalars)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _origin(path: Path, mark: Any) -> Origin:
    return Origin(path, mark.line + 1)


def _convert(path: Path, node: yaml.Node, loader: yaml.SafeLoader, where: str) -> Node:
    origin = _origin(path, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        values: dict[str, Node] = {}
        origins: dict[str, Origin] = {}
        for knode, vnode in node.value:
            korigin = _origin(path, knode.start_mark)
            key = loader.construct_object(knode, deep=True)
            if key == "<<":
                raise ConfigError(korigin, where, "YAML merge keys (<<) are not supported")
            if not isinstance(key, str):
                raise ConfigError(korigin, where, f"key {key!r} is not a string")
            keypath = f"{where}.{key}" if where else key
            if key in values:
                raise ConfigError(
                    korigin, keypath, f"duplicate key (first at line {origins[key].line})"
                )
            values[key] = _convert(path, vnode, loader, keypath)
            origins[key] = korigin
        return Node(values, origin, origins)
    if isinstance(node, yaml.SequenceNode):
        return Node(
            [_convert(path, v, loader, f"{where}[{i}]") for i, v in enumerate(node.value)], origin
        )
    return Node(loader.construct_object(node, deep=True), origin)


# libyaml's parser when PyYAML has it (about ten times the pure one's speed, which
# every command pays for the templates); a document it refuses is parsed again by the
# pure one, whose messages are the ones documented.
# (CSafeLoader is not a SafeLoader subclass, but has its methods: typed as one here.)
FAST_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, path: Path) -> Node | None:
    """Parse one YAML document; ``None`` for an empty document."""
    if FAST_LOADER is not yaml.SafeLoader:
        fast = FAST_LOADER(text)
        try:
            return _convert_root(path, fast.get_single_node(), fast)
        except (yaml.YAMLError, ConfigError):
            pass  # said below, as the pure parser says it
        finally:
            fast.dispose()
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            problem = (e.problem or "syntax error").strip()
            raise ConfigError(
                Origin(path, line), "", f"YAML syntax error: {problem}", "valid YAML"
            ) from e
        except yaml.YAMLError as e:
            raise ConfigError(Origin(path, 1), "", f"YAML error: {e}", "valid YAML") from e
        return _convert_root(path, root, loader)
    finally:
        loader.dispose()


def _convert_root(path: Path, root: yaml.Node | None, loader: yaml.SafeLoader) -> Node | None:
    if root is None:
        return None
    try:
        return _convert(path, root, loader, "")
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(Origin(path, line), "", f"YAML error: {e.problem}") from e


def load_yaml(path: Path) -> Node | None:
    """Read and parse ``path``; a missing or unreadable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(None, "", f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(None, "", f"{path}: cannot read: {e}") from e
    return parse_yaml(text, path)
