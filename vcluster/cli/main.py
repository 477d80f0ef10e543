"""The ``vcluster`` command: a lazy click group.

Subcommands live in their own modules and are imported only when invoked (or
listed by ``--help``), so ``vcluster --help`` stays fast.  This is the one place
where a VclusterError becomes a message and an exit code.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

import click

from vcluster import __version__
from vcluster.errors import VclusterError

# name -> "module:attribute"; modules are imported on first use.
COMMANDS: dict[str, str] = {
    "alloc": "vcluster.cli.alloc:alloc",
    "batch": "vcluster.cli.batch:batch",
    "cancel": "vcluster.cli.cancel:cancel",
    "check": "vcluster.cli.template:check",
    "cluster": "vcluster.cli.cluster:cluster",
    "console": "vcluster.cli.console:console",
    "image": "vcluster.cli.image:image",
    "internal": "vcluster.cli.internal:internal",
    "doctor": "vcluster.cli.doctor:doctor",
    "exec": "vcluster.cli.exec:exec_command",
    "gc": "vcluster.cli.gc:gc",
    "nc": "vcluster.cli.ssh:nc",
    "ps": "vcluster.cli.ps:ps",
    "sandbox": "vcluster.cli.sandbox:sandbox",
    "save": "vcluster.cli.save:save",
    "scp": "vcluster.cli.ssh:scp",
    "ssh": "vcluster.cli.ssh:ssh",
    "ssh-config": "vcluster.cli.ssh:ssh_config",
    "template": "vcluster.cli.template:template",
}

log = logging.getLogger("vcluster")


class LazyGroup(click.Group):
    """A group whose subcommands are imported on demand from ``lazy`` specs."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VclusterError as e:
            log.debug("error details", exc_info=True)
            click.echo(f"vcluster: error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="vcluster")
@click.option("-v", "--verbose", count=True, help="Show more detail (-vv: debug, with tracebacks).")
def cli(verbose: int) -> None:
    """Private clusters of virtual machines inside SLURM jobs.

    Templates describe VMs; a cluster definition such as debian:4,tiny:2
    names templates and counts. Configuration is read from /etc/vcluster
    (or $VCLUSTER_CONF) and ~/.vcluster (or $VCLUSTER_HOME).
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vcluster: %(levelname)s: %(message)s",
                        stream=sys.stderr)


def main() -> NoReturn:
    cli.main(prog_name="vcluster")
    raise SystemExit(0)  # pragma: no cover - click.main exits itself


if __name__ == "__main__":
    main()
