"""Launching a local cluster: the launcher of ``vcluster.launch``, run here, on this machine.

``run_local`` does what salloc and the SLURM prolog and epilog do around
the launcher: start the VM runners held (``local.step``: they start up
while the rest is done; ``vcluster alloc`` starts them first of all, in
``local.alloc``), reconcile what dead local launchers left, take a job id,
record the job (``local.registry``), make its devices (root: serve the
agent in-process; a normal user: ``local.rootless``), run the same
``Launcher`` with this machine as its one host and the held runners for its
step, and at the end, however it ends, release everything and forget the
job.  A launcher killed outright loses its runners and QEMUs at once
(``local.step``); the rest is for ``local.reconcile``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import replace

from vcluster import sshkeys
from vcluster.cluster import ClusterPlan
from vcluster.config.batch import BatchConfig
from vcluster.config.loader import Config
from vcluster.errors import InputError
from vcluster.identity import host_name, user_name
from vcluster.launch.launcher import Launcher, LaunchOptions
from vcluster.launch.placement import Allocation, Host, PlacementError, VmNeed, place
from vcluster.local import registry, rootless
from vcluster.local.reconcile import policy_dir, reconcile
from vcluster.local.step import LocalStep, held_runners
from vcluster.store import open_store
from vcluster.store.keys import Keys


class NoTunnels:
    """The VXLAN ids of a local cluster's private networks: none, one host has no peers."""

    def vnis(self, job: str, networks: Sequence[str]) -> dict[str, int]:
        return {}


def allocation(cpus: int | None) -> Allocation:
    """This machine as a one-host allocation: its CPUs, ``cpus`` per VM."""
    return Allocation((Host(host_name(), os.cpu_count() or 1),), cpus or 1)


def run_local(config: Config, plan: ClusterPlan, options: LaunchOptions, *, name: str,
              cpus: int | None, job: str | None = None, comment: str | None = None,
              runners: LocalStep | None = None) -> int:
    """Run the cluster of ``plan`` on this machine until the user's part ends; its status.

    ``job``: an id taken already (a batch job's, said when it was submitted); ``comment``:
    the user's, kept in the job's record; ``runners``: its VMs' (``step.held_runners``) if the
    caller started them already, which this stops at the end as its own.
    """
    batch = config.batch
    with contextlib.ExitStack() as stack:
        if runners is None:
            runners = held_runners(len(plan.vms), rootless=batch.rootless,
                                   stop_timeout=options.stop_timeout, echo=options.verbose)
        stack.callback(runners.stop, 0.0)  # if the launcher never takes them
        return _run(batch, plan, options, runners, name=name, cpus=cpus, job=job,
                    comment=comment)


def _run(batch: BatchConfig, plan: ClusterPlan, options: LaunchOptions, runners: LocalStep,
         *, name: str, cpus: int | None, job: str | None, comment: str | None) -> int:
    if (missing := rootless.missing_tools(plan)) is not None and batch.rootless:
        raise InputError(missing)
    here = allocation(cpus)
    try:
        place([VmNeed.of(vm) for vm in plan.vms], here)
    except PlacementError as e:
        raise PlacementError(f"{e} (this machine has {here.hosts[0].cpus} CPUs; ask for fewer "
                             "VMs or fewer CPUs each with -c)") from None
    keys = Keys(batch.store.prefix)
    user = user_name()
    store = open_store(batch.store)
    try:
        reconcile(store, batch)
        layout = batch.directories.layout
        jobs = registry.Registry(store, keys, layout)
        job = job or jobs.new_job_id()
        cluster_key = sshkeys.Background(f"vcluster-job-{job}")  # made meanwhile
        record = registry.own_record(job, user, name, batch.rootless, layout.run, layout.state,
                                     comment)
        jobs.record(record)
        try:
            with contextlib.ExitStack() as stack:
                made = rootless.Made(layout, job, batch.rootless)
                stack.callback(made.remove)
                rootless.prepare(job, plan, layout, made, rootless=batch.rootless)
                if batch.rootless:
                    record = replace(record, switches=made.switch_pids())
                    jobs.record(record)
                else:
                    from vcluster.agent import local as agent

                    stack.enter_context(agent.serving(
                        batch, policy_dir(batch), store, job, user, len(plan.vms)))
                launcher = Launcher(plan, store, prefix=batch.store.prefix, job=job,
                                    job_name=name, options=options, allocation=here,
                                    agent=NoTunnels(), start_step=runners.go,
                                    cluster_key=cluster_key)
                return launcher.run()
        finally:
            jobs.forget(record)
    finally:
        store.close()
