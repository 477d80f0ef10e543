"""``vcluster gc``: remove what local clusters whose launcher was killed left behind."""

from __future__ import annotations

import click


@click.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Remove what killed local launchers left: their VMs' processes, devices, files
    and store keys. Any vcluster command that reads your clusters (ps, exec,
    console, ssh, save) does the same first; this does only that, and says
    what it removed. On the SLURM backend the host agents do it (the epilog,
    and their reconcile pass), so there is nothing to do here.
    """
    from vcluster.cli.common import load_config

    config = load_config()
    if not config.batch.local:
        click.echo("batch.backend is slurm: the host agents remove what ended jobs left "
                   "(nothing to do here)", err=True)
        return
    from vcluster.local.reconcile import reconcile
    from vcluster.session import open_user_store

    with open_user_store(config.batch) as store:
        released = reconcile(store, config.batch)
    if released:
        click.echo(f"removed what {len(released)} local job(s) left: {', '.join(released)}")
    else:
        click.echo("nothing to remove: every local job still has its launcher", err=True)
