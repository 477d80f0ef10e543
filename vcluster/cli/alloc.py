"""``vcluster alloc``: a virtual cluster in an interactive SLURM allocation."""

from __future__ import annotations

import click

HELP = """Allocate a virtual cluster and run a shell (or -E CMD) next to it.

DEFINITION names templates and counts, e.g. debian-fam:8 or tiny:2,debian.
Every other option is passed to salloc as it is (-p PARTITION, -t TIME,
--mem=SIZE, -w NODES, -N NODES, -J NAME, ...); each VM is one SLURM task with
-c CPUs (its vCPUs, unless the template sets vcpus).

VMs naming the same FAM region run on one host (a region is memory of one
host); the other VMs go where SLURM would put them. A FAM group that fits on
no host of the allocation is refused before anything boots, with what each
host has: ask for more CPUs per node (e.g. --ntasks-per-node=N).

Everything is checked before anything is submitted. Progress is shown per VM
until all are ready; if one fails, its reason and the last lines of its
console are printed, the cluster is stopped and alloc exits non-zero. In the
shell, VCLUSTER_JOB_ID names the cluster for vcluster ps/console; when the
shell exits the VMs are stopped and alloc exits with the shell's status.

On the local backend (batch.backend: local, the embedded default when there
is no /etc/vcluster) the cluster runs on this machine, without SLURM: root's
with taps and bridges, a normal user's rootless; SLURM options are refused.

\b
Examples:
  vcluster alloc -c 2 tiny-fam:2
  vcluster alloc -c 4 -p debug -t 30 -E ./run-tests.sh debian:4
"""


@click.command(help=HELP, context_settings={"ignore_unknown_options": True})
@click.option("-c", "--cpus-per-task", "cpus", type=click.IntRange(1), default=None,
              help="CPUs per VM (passed to salloc; the VMs' vCPUs by default).")
@click.option("-E", "--command", default=None, metavar="CMD",
              help="Run CMD (with $SHELL -c) instead of an interactive shell.")
@click.option("--stop-timeout", type=click.FloatRange(0), default=None,
              help="Seconds each guest gets to power down at the end before it is stopped "
                   "(default: 20 for cloud-init images, 1 for tiny).")
@click.option("--ready-timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds the whole cluster gets to become ready.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[SALLOC OPTIONS] DEFINITION")
@click.pass_context
def alloc(ctx: click.Context, cpus: int | None, command: str | None,
          stop_timeout: float | None, ready_timeout: float, args: tuple[str, ...]) -> None:
    from vcluster.cli.common import load_config
    from vcluster.launch.submit import split_definition, submit_alloc

    verbose = (ctx.find_root().params.get("verbose") or 0) > 0
    config = load_config()
    if config.batch.local:
        from vcluster.errors import InputError
        from vcluster.local.alloc import local_alloc

        options, definition = split_definition(list(args))
        if options:
            raise InputError(f"{' '.join(options)}: the local backend runs the cluster on "
                             "this machine and takes no SLURM options (expected -c, -E, "
                             "--stop-timeout, --ready-timeout and the DEFINITION)")
        raise SystemExit(local_alloc(config, definition, cpus=cpus, command=command,
                                     stop_timeout=stop_timeout, ready_timeout=ready_timeout,
                                     verbose=verbose))
    raise SystemExit(submit_alloc(list(args), cpus=cpus, command=command,
                                  stop_timeout=stop_timeout, ready_timeout=ready_timeout,
                                  verbose=verbose))
