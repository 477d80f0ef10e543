"""``vcluster internal``: commands vcluster runs itself (inside SLURM jobs), not users."""

from __future__ import annotations

import click

from vcluster.cli.main import LazyGroup

INTERNAL: dict[str, str] = {
    "launcher": "vcluster.launch.command:launcher",
    "local-batch": "vcluster.cli.internal:local_batch",
    "vm": "vcluster.vm.command:vm",
    "console-attach": "vcluster.vm.command:console_attach",
    "exec": "vcluster.vm.command:guest_exec",
    "nc": "vcluster.vm.command:nc",
    "save": "vcluster.vm.command:save",
}


@click.group(cls=LazyGroup, lazy=INTERNAL, hidden=True)
def internal() -> None:
    """Commands vcluster runs inside SLURM jobs (the launcher, one VM runner per VM,
    the console relay). Not meant to be typed by hand."""


@click.command("local-batch")
def local_batch() -> None:
    """A local batch job's launcher, in the background: the job on stdin."""
    import sys

    from vcluster.local.batch import run_local_batch

    raise SystemExit(run_local_batch(sys.stdin.read()))
