"""``vcluster console``: a VM's serial console, through the job, on the VM's host."""

from __future__ import annotations

import sys

import click

from vcluster.cli.clusters import cluster_options

DETACH = "Ctrl-]"


@click.command(help=f"""Attach to VM's serial console (VM: vm3 or 3).

The console is reached through SLURM (srun into the job, on the VM's host),
so only the job's user can attach. Detach with {DETACH}; the VM keeps running.
With -l, print the console log instead.""")
@cluster_options
@click.option("-l", "--log", "show_log", is_flag=True, help="Print the console log and exit.")
@click.argument("vm")
@click.pass_context
def console(ctx: click.Context, jobid: str | None, jobname: str | None, show_log: bool,
            vm: str) -> None:
    from vcluster.cli.clusters import pick_cluster, vm_index, with_store
    from vcluster.errors import VclusterError
    from vcluster.launch.overlap import overlap_argv, overlap_env
    from vcluster.run import spawn

    store, keys, user = with_store(ctx)
    cluster = pick_cluster(store, keys, user, jobid, jobname)
    index = vm_index(vm, cluster)
    record = cluster.vms.get(index)
    if record is None or record.host is None:
        raise VclusterError(f"vm{index} of job {cluster.spec.job} has not started on a host "
                            f"yet (state: {record.state.value if record else 'unknown'})")
    job = cluster.spec.job
    argv = overlap_argv(job, record.host, local=cluster.spec.local)
    if not show_log and sys.stdin.isatty() and not cluster.spec.local:
        argv.append("--pty")
    argv += [sys.executable, "-m", "vcluster", "internal", "console-attach", "--job", job,
             "--vm", str(index)]
    if show_log:
        argv.append("--log")
    raise SystemExit(spawn(argv, stdin=None, stdout=None, stderr=None,
                           env=overlap_env()).wait())
