"""Pieces shared by the CLI commands: configuration loading and table output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from vcluster.config.loader import Config


def load_config() -> Config:
    from vcluster.config.loader import load_config as load

    return load()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        click.echo("  ".join([*cells, str(row[-1])]).rstrip())
