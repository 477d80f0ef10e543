"""Finding the user's clusters: the shared -j/-J options and the store reads behind them.

A command acting on a running cluster takes ``-j JOBID`` or ``-J JOBNAME``
(or ``-C NAME``, a persistent cluster: its spec is stored as a job's, under
its name); without either it uses ``$VCLUSTER_JOB_ID`` (set inside an alloc
shell), and failing that the user's only cluster.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from vcluster.cluster import ClusterSpec
    from vcluster.launch.queue import QueuedJob
    from vcluster.store.base import Store
    from vcluster.store.keys import Keys
    from vcluster.store.records import VmRecord

F = TypeVar("F", bound=Callable[..., Any])


def cluster_options(f: F) -> F:
    """``-j/--jobid``, ``-J/--jobname`` and ``-C/--cluster``, defined once for every
    command; the command gets ``-C``'s name as its ``jobid``."""

    @functools.wraps(f)
    def command(*args: Any, cluster: str | None = None, **kwargs: Any) -> Any:
        if cluster is not None:
            if kwargs.get("jobid") is not None or kwargs.get("jobname") is not None:
                raise click.UsageError("-C names a persistent cluster: give it without -j "
                                       "or -J")
            kwargs["jobid"] = cluster
        return f(*args, **kwargs)

    wrapped = click.option("-C", "--cluster", default=None, metavar="NAME",
                           help="A persistent cluster (vcluster cluster list).")(command)
    wrapped = click.option("-J", "--jobname", default=None, metavar="NAME",
                           help="The cluster's SLURM job name.")(wrapped)
    wrapped = click.option("-j", "--jobid", default=None, metavar="JOBID",
                           help="The cluster's SLURM job id (default: $VCLUSTER_JOB_ID, or "
                                "your only cluster).")(wrapped)
    return cast(F, wrapped)


@dataclass(frozen=True)
class Cluster:
    spec: ClusterSpec
    vms: dict[int, VmRecord]


def read_clusters(store: Store, keys: Keys, user: str) -> list[Cluster]:
    """Every cluster of ``user`` that has a spec, by job id."""
    from vcluster.cluster import ClusterSpec
    from vcluster.store.records import VmRecord, from_json

    specs: dict[str, ClusterSpec] = {}
    vms: dict[str, dict[int, VmRecord]] = {}
    prefix = keys.clusters_prefix(user)
    for entry in store.get_prefix(prefix).entries:
        job, _, rest = entry.key[len(prefix):].partition("/")
        if rest == "spec":
            specs[job] = from_json(ClusterSpec, entry.value)
        elif rest.startswith("vms/") and rest[4:].isdigit():
            vms.setdefault(job, {})[int(rest[4:])] = from_json(VmRecord, entry.value)
    order = sorted(specs, key=lambda j: (len(j), j))
    return [Cluster(specs[j], vms.get(j, {})) for j in order]


def select_cluster(clusters: list[Cluster], jobid: str | None, jobname: str | None) -> Cluster:
    from vcluster.errors import InputError

    def listing() -> str:
        return ", ".join(f"{c.spec.job} ({c.spec.name})" for c in clusters) or "none"

    if jobid is None and jobname is None:
        jobid = os.environ.get("VCLUSTER_JOB_ID") or None
    if jobid is not None:
        for c in clusters:
            if c.spec.job == jobid:
                return c
        if not jobid.isdigit():  # a persistent cluster's name (-C)
            raise InputError(f"-C {jobid}: you have no cluster {jobid} (expected one of: "
                             f"{listing()})")
        raise InputError(f"-j {jobid}: you have no cluster in job {jobid} "
                         f"(expected one of: {listing()})")
    if jobname is not None:
        named = [c for c in clusters if c.spec.name == jobname]
        if len(named) == 1:
            return named[0]
        problem = "no cluster has" if not named else f"{len(named)} clusters have"
        raise InputError(f"-J {jobname}: {problem} that job name (expected one of: "
                         f"{listing()}; use -j JOBID)")
    if len(clusters) == 1:
        return clusters[0]
    if not clusters:
        raise InputError("you have no running cluster (start one with vcluster alloc)")
    raise InputError(f"you have {len(clusters)} clusters: say which with -j JOBID or "
                     f"-J NAME (expected one of: {listing()})")


def queued() -> list[QueuedJob]:
    """The user's vcluster jobs in SLURM's queue; none if SLURM cannot be asked (said at -v)."""
    import logging

    from vcluster.cli.common import load_config
    from vcluster.errors import VclusterError
    from vcluster.launch.queue import queued_jobs

    if load_config().batch.local:
        return []  # no queue: a local cluster starts when it is asked for
    try:
        return queued_jobs()
    except VclusterError as e:
        logging.getLogger("vcluster").info("squeue: %s", e)
        return []


def pick_cluster(store: Store, keys: Keys, user: str, jobid: str | None,
                 jobname: str | None) -> Cluster:
    """The cluster -j/-J (or $VCLUSTER_JOB_ID, or being the only one) names.

    A job that SLURM has queued but whose VMs have not started yet is one
    error saying so, not "no such cluster".
    """
    from vcluster.errors import InputError, VclusterError

    try:
        return select_cluster(read_clusters(store, keys, user), jobid, jobname)
    except InputError:
        jobid = jobid or (None if jobname else os.environ.get("VCLUSTER_JOB_ID"))
        for q in queued():
            if (jobid is not None and q.job == jobid) or (jobid is None and q.name == jobname):
                raise VclusterError(
                    f"job {q.job} ({q.name}) is {q.state.lower()}"
                    + (f" ({q.reason})" if q.reason not in ("None", "") else "")
                    + ": its VMs are not running yet (vcluster ps shows when they are)"
                ) from None
        raise


def with_store(ctx: click.Context) -> tuple[Store, Keys, str]:
    """The user's store session, closed when the command ends (on the local backend,
    after removing what dead local launchers left)."""
    from vcluster.cli.common import load_config
    from vcluster.session import open_user_store
    from vcluster.store.keys import Keys

    config = load_config()
    store = ctx.with_resource(_closing(open_user_store(config.batch)))
    from vcluster.identity import user_name

    if config.batch.local:  # what killed local launchers left goes first
        from vcluster.local.reconcile import reconcile

        reconcile(store, config.batch)

    return store, Keys(config.batch.store.prefix), user_name()


class _closing:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def vm_index(text: str, cluster: Cluster) -> int:
    """``vm3`` or ``3`` → 3, checked against the cluster."""
    from vcluster.errors import InputError

    digits = text[2:] if text.startswith("vm") else text
    count = len(cluster.spec.plan.vms)
    if not digits.isdigit() or int(digits) >= count:
        raise InputError(f"{text!r}: no such VM in job {cluster.spec.job} "
                         f"(expected vm0 to vm{count - 1})")
    return int(digits)

