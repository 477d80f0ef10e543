"""``vcluster alloc`` on the local backend: the VMs' runners first, then the rest.

A runner takes a tenth of a second to start Python and import its code, as
long as the launcher takes to import its own and the agent's.  So the
runners are started (held) as soon as the plan says how many VMs there are,
before this process imports the launcher: both start up side by side, and a
cluster boots that much sooner.
"""

from __future__ import annotations

from vcluster.config.loader import Config


def local_alloc(config: Config, definition: str, *, cpus: int | None, command: str | None,
                stop_timeout: float | None, ready_timeout: float, verbose: bool) -> int:
    """``vcluster alloc`` on the local backend; the status to exit with."""
    from vcluster.cluster import plan_cluster
    from vcluster.local.step import held_runners

    plan = plan_cluster(config, definition, cpus_per_task=cpus)
    runners = held_runners(len(plan.vms), rootless=config.batch.rootless,
                           stop_timeout=stop_timeout, echo=verbose)
    try:
        from vcluster.launch.launcher import LaunchOptions
        from vcluster.local.launch import run_local

        options = LaunchOptions(command=command, stop_timeout=stop_timeout,
                                ready_timeout=ready_timeout, verbose=verbose, local=True)
        return run_local(config, plan, options, name="vcluster", cpus=cpus, runners=runners)
    finally:
        runners.stop(0.0)  # gone already unless something failed before the launcher ran
