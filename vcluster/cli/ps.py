"""``vcluster ps``: your clusters."""

from __future__ import annotations

import click

from vcluster.cli.common import print_table


@click.command()
@click.pass_context
def ps(ctx: click.Context) -> None:
    """List your clusters: job id, job name, VMs, their states and hosts."""
    from vcluster.cli.clusters import read_clusters, with_store

    store, keys, user = with_store(ctx)
    clusters = read_clusters(store, keys, user)
    if not clusters:
        click.echo("no clusters (start one with vcluster alloc)", err=True)
        return
    rows = []
    for c in clusters:
        counts: dict[str, int] = {}
        for index in range(len(c.spec.plan.vms)):
            record = c.vms.get(index)
            state = record.state.value if record else "unknown"
            counts[state] = counts.get(state, 0) + 1
        hosts = sorted({r.host for r in c.vms.values() if r.host})
        rows.append((c.spec.job, c.spec.name, str(len(c.spec.plan.vms)),
                     ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                     ",".join(hosts) or "-"))
    print_table(("JOBID", "NAME", "VMS", "STATES", "HOSTS"), rows)
