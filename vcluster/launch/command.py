"""``vcluster internal launcher``: what ``vcluster alloc`` runs inside salloc."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--plan", "plan_path", required=True, type=click.Path(path_type=Path),
              help="The cluster plan written by vcluster alloc (read, then deleted).")
@click.option("-E", "--command", default=None, help="Run CMD instead of an interactive shell.")
@click.option("--stop-timeout", type=float, default=None,
              help="Seconds each guest gets to power down (default: the image's).")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="Seconds the whole cluster gets to become ready.")
@click.option("--verbose", is_flag=True, help="Show the VM runners' output as it comes.")
def launcher(plan_path: Path, command: str | None, stop_timeout: float | None,
             ready_timeout: float, verbose: bool) -> None:
    """Place the VMs on the allocation's hosts (each FAM group on one host), take
    the private networks' VXLAN ids from the local agent, record the cluster in
    the store, start one VM runner per VM with srun, show their progress until
    all are ready (or one fails), then run the user's shell or command with
    VCLUSTER_JOB_ID set; stop the VMs when it exits and exit with its status."""
    from vcluster.config.loader import load_config
    from vcluster.session import StoreOpening

    batch = load_config().batch
    # The store logs in (etcd hashes the password) while the rest is imported and read.
    opening = StoreOpening(batch)
    try:
        from vcluster.agent.client import AgentClient
        from vcluster.cluster import ClusterPlan
        from vcluster.errors import InputError
        from vcluster.launch.launcher import Launcher, LaunchOptions
        from vcluster.launch.steps import job_allocation, job_environment
        from vcluster.store.records import from_json

        try:
            text = plan_path.read_text()
        except OSError as e:
            raise InputError(f"--plan {plan_path}: cannot read: {e.strerror}") from e
        plan_path.unlink(missing_ok=True)
        plan = from_json(ClusterPlan, text)
        job, name = job_environment()
        allocation = job_allocation()
        agent = AgentClient(batch.directories.layout.agent_socket)
        store = opening.result()
    finally:
        opening.close()  # only if it was not taken: a failure above
    try:
        options = LaunchOptions(command=command, stop_timeout=stop_timeout,
                                ready_timeout=ready_timeout, verbose=verbose)
        code = Launcher(plan, store, prefix=batch.store.prefix, job=job, job_name=name,
                        options=options, allocation=allocation, agent=agent).run()
    finally:
        store.close()
    raise SystemExit(code)
