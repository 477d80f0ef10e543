"""``vcluster internal launcher``: what ``vcluster alloc`` runs inside salloc."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--plan", "plan_path", default=None, type=click.Path(path_type=Path),
              help="The cluster plan written by vcluster alloc (read, then deleted).")
@click.option("--batch", is_flag=True,
              help="Read the batch job (plan, script, timeouts) from stdin: what the job "
                   "script of vcluster batch does.")
@click.option("-E", "--command", default=None, help="Run CMD instead of an interactive shell.")
@click.option("--stop-timeout", type=float, default=None,
              help="Seconds each guest gets to power down (default: the image's).")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds the whole cluster gets to become ready.")
@click.option("--verbose", is_flag=True, help="Show the VM runners' output as it comes.")
def launcher(plan_path: Path | None, batch: bool, command: str | None,
             stop_timeout: float | None, ready_timeout: float, verbose: bool) -> None:
    """Place the VMs on the allocation's hosts (each FAM group on one host), take
    the private networks' VXLAN ids from the local agent, record the cluster in
    the store, start one VM runner per VM with srun, show their progress until
    all are ready (or one fails), then run the user's shell or command with
    VCLUSTER_JOB_ID set (or, with --batch, the job's script, on this host or in
    vm0); stop the VMs when it exits and exit with its status."""
    from vcluster.config.loader import load_config
    from vcluster.session import StoreOpening

    settings = load_config().batch
    # The store logs in (etcd hashes the password) while the rest is imported and read.
    opening = StoreOpening(settings)
    try:
        from vcluster.agent.client import AgentClient
        from vcluster.cluster import ClusterPlan
        from vcluster.errors import InputError
        from vcluster.launch.launcher import Launcher, LaunchOptions
        from vcluster.launch.steps import job_allocation, job_environment
        from vcluster.store.records import from_json

        if batch:
            from vcluster import codec
            from vcluster.launch.batch import BatchJob

            batch_job = codec.from_json(BatchJob, sys.stdin.read(), what="the batch job")
            plan = batch_job.plan
            options = LaunchOptions(script=batch_job.script, stop_timeout=batch_job.stop_timeout,
                                    ready_timeout=batch_job.ready_timeout, verbose=verbose)
        elif plan_path is not None:
            try:
                text = plan_path.read_text()
            except OSError as e:
                raise InputError(f"--plan {plan_path}: cannot read: {e.strerror}") from e
            plan_path.unlink(missing_ok=True)
            plan = from_json(ClusterPlan, text)
            options = LaunchOptions(command=command, stop_timeout=stop_timeout,
                                    ready_timeout=ready_timeout, verbose=verbose)
        else:
            raise InputError("--plan FILE or --batch: the cluster to launch")
        job, name = job_environment()
        allocation = job_allocation()
        agent = AgentClient(settings.directories.layout.agent_socket)
        store = opening.result()
    finally:
        opening.close()  # only if it was not taken: a failure above
    try:
        code = Launcher(plan, store, prefix=settings.store.prefix, job=job, job_name=name,
                        options=options, allocation=allocation, agent=agent).run()
    finally:
        store.close()
    raise SystemExit(code)
