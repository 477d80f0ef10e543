"""No import runs up the layers: docs/architecture.md's table, enforced on every module."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vcluster"
AGENT_PUBLIC = {"vcluster.agent.client", "vcluster.agent.protocol", "vcluster.agent.local"}


def read_levels(doc: Path) -> dict[str, int]:
    """part -> level, from the table between the layers markers of ``doc``."""
    text = doc.read_text()
    table = text.split("<!-- layers: start -->", 1)[1].split("<!-- layers: end -->", 1)[0]
    levels: dict[str, int] = {}
    for row in table.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|(.*)\|\s*$", row)
        if match:
            for part in re.findall(r"`([^`]+)`", match.group(2)):
                assert part not in levels, f"{part} appears twice in the layers table"
                levels[part] = int(match.group(1))
    return levels


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported}: {self.why}"


def part_of(module: str) -> str:
    """``vcluster.store.etcd`` -> ``store``; ``vcluster`` -> ``vcluster``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every vcluster import; ``from vcluster import x`` names x."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            for alias in node.names:
                sub = Path(root, *node.module.split("."), alias.name)
                if sub.with_suffix(".py").is_file() or sub.is_dir():
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
    return [(line, m) for line, m in found if m == PACKAGE or m.startswith(PACKAGE + ".")]


def exists(root: Path, module: str) -> bool:
    """``module`` is a file or package of the tree (an installed copy does not count)."""
    path = Path(root, *module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def check_tree(root: Path, levels: dict[str, int]) -> list[Violation]:
    """Every import in ``root``/vcluster that the layers table forbids."""
    violations: list[Violation] = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(path, root)
        own = part_of(name)
        where = str(path.relative_to(root))
        if own not in levels:
            violations.append(Violation(where, 1, name, f"part {own!r} is not in the table"))
            continue
        for line, target in imported_modules(ast.parse(path.read_text()), root):
            if not exists(root, target):
                violations.append(Violation(where, line, target, "no such module"))
                continue
            other = part_of(target)
            if other == own:
                continue
            if other not in levels:
                violations.append(Violation(where, line, target,
                                            f"part {other!r} is not in the table"))
            elif levels[other] >= levels[own]:
                violations.append(Violation(
                    where, line, target, f"{other} (level {levels[other]}) is not below "
                                         f"{own} (level {levels[own]})"))
            elif other == "agent" and target != "vcluster.agent" and not any(
                    target == m or target.startswith(m + ".") for m in AGENT_PUBLIC):
                violations.append(Violation(where, line, target,
                                            "the agent's internals are the agent's own "
                                            "(use vcluster.agent.client or .protocol)"))
    return violations


LEVELS = read_levels(ROOT / "docs" / "architecture.md")


def test_the_table_names_every_part() -> None:
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / PACKAGE).iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    parts = {PACKAGE if p == "__init__" else p for p in parts}
    assert sorted(parts - set(LEVELS)) == []
    assert sorted(set(LEVELS) - parts) == []


def test_no_import_runs_up_the_layers() -> None:
    violations = check_tree(ROOT, LEVELS)
    assert [str(v) for v in violations] == []


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    """A small package with one import of each forbidden kind, and allowed ones."""
    files = {
        "vcluster/__init__.py": "",
        "vcluster/errors.py": "",
        "vcluster/store/__init__.py": "from vcluster import errors\n",
        "vcluster/store/base.py": "def f() -> None:\n    from vcluster.agent.jobs import Jobs\n",
        "vcluster/agent/__init__.py": "",
        "vcluster/agent/jobs.py": "from vcluster.store import base\n",
        "vcluster/agent/client.py": "",
        "vcluster/launch/__init__.py": "import vcluster.cli.main\n",
        "vcluster/vm/__init__.py": "from vcluster.agent.client import X\n"
                                   "from vcluster.agent import jobs\n",
        "vcluster/cli/__init__.py": "",
        "vcluster/cli/main.py": "from vcluster.vm import runner\n"
                                "from vcluster.store.session import open_user_store\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_forbidden_imports_are_found(bad_tree: Path) -> None:
    levels = {"vcluster": 0, "errors": 0, "store": 4, "agent": 5, "vm": 7, "launch": 7,
              "cli": 8}
    found = sorted(str(v) for v in check_tree(bad_tree, levels))
    assert found == [
        "vcluster/cli/main.py:2: imports vcluster.store.session: no such module",
        "vcluster/launch/__init__.py:1: imports vcluster.cli.main: cli (level 8) is not "
        "below launch (level 7)",
        "vcluster/store/base.py:2: imports vcluster.agent.jobs: agent (level 5) is not "
        "below store (level 4)",
        "vcluster/vm/__init__.py:2: imports vcluster.agent.jobs: the agent's internals are "
        "the agent's own (use vcluster.agent.client or .protocol)",
    ]


def test_the_module_map_lists_every_module() -> None:
    """docs/architecture.md's module table names each module of the package, and only those."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Modules\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(vcluster/[^`]+\.py)` \|", section, re.MULTILINE))
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE).rglob("*.py")}
    assert sorted(actual - listed) == [], "modules missing from the map"
    assert sorted(listed - actual) == [], "the map lists modules that do not exist"
    blank = re.findall(r"^\| `(vcluster/[^`]+\.py)` \|\s*\|", section, re.MULTILINE)
    assert blank == [], "modules without a one-line description (their docstring's first line)"
