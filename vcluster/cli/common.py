"""Pieces shared by the CLI commands: configuration loading and table output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from vcluster.config.loader import Config


def load_config() -> Config:
    from vcluster.config.loader import load_config as load

    return load()


def writable(root: Path) -> bool:
    """Whether we may add to the directory ``root`` (made if it is missing and ours)."""
    import os

    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return lines


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for line in table_lines(headers, rows):
        click.echo(line)
