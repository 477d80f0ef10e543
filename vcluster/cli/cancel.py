"""``vcluster cancel``: stop local jobs, as scancel stops SLURM's."""

from __future__ import annotations

import click


def _job_ids(_ctx: click.Context, _param: click.Parameter,
             value: tuple[str, ...]) -> tuple[str, ...]:
    for job in value:
        if not job.isdigit() or int(job) < 1:
            raise click.BadParameter(f"{job!r} is not a job id (a number, as vcluster ps "
                                     "lists them)")
    return tuple(str(int(job)) for job in value)


@click.command()
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, metavar="SECONDS",
              help="How long to wait for the jobs to stop their VMs and remove what they made.")
@click.argument("jobs", nargs=-1, required=True, metavar="JOBID...", callback=_job_ids)
def cancel(jobs: tuple[str, ...], timeout: float) -> None:
    """Cancel your local jobs (an alloc's or a batch job's) as scancel does.

    Each job's launcher gets SIGTERM: it powers the VMs down, removes the
    job's devices, files and keys, and ends (an alloc's shell or command gets
    SIGHUP, a batch job's output ends with "stopped"). This waits until every
    one has, and says so. An id that is not one of your running jobs is
    refused before anything is signalled. On a SLURM site, use scancel.
    """
    from vcluster.cli.common import load_config
    from vcluster.errors import InputError

    config = load_config()
    if not config.batch.local:
        raise InputError("batch.backend is slurm: cancel the job with scancel JOBID (its "
                         "epilog removes what it made)")
    from vcluster.local.stop import cancel as cancel_jobs
    from vcluster.session import open_user_store

    with open_user_store(config.batch) as store:
        cancel_jobs(store, config.batch, jobs, timeout=timeout,
                    say=lambda line: click.echo(f"vcluster: {line}", err=True))
