"""``vcluster ps``: your clusters, or (``-l``, ``ps JOB``) each of their VMs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vcluster.cli.clusters import cluster_options
from vcluster.cli.common import print_table, table_lines

if TYPE_CHECKING:
    from vcluster.cli.clusters import Cluster
    from vcluster.launch.queue import QueuedJob

HEADERS = ("JOBID", "NAME", "MODE", "STATE", "VMS", "VM STATES", "HOSTS")
VM_HEADERS = ("VM", "HOST", "STATE", "ADDRESSES", "FAM", "SSH")


def cluster_state(c: Cluster | None, queued: QueuedJob | None) -> str:
    """pending, starting, ready, stopping or failed: the cluster as a whole."""
    from vcluster.lifecycle import VmState

    if queued is not None and queued.state == "PENDING":
        return "pending"
    if queued is not None and queued.state == "COMPLETING":
        return "stopping"
    if c is None:
        return "starting"  # the job runs, its launcher has not recorded the cluster yet
    states = {c.vms[i].state if i in c.vms else VmState.PENDING
              for i in range(len(c.spec.plan.vms))}
    if VmState.FAILED in states:
        return "failed"
    if states & {VmState.STOPPING, VmState.STOPPED}:
        return "stopping"
    return "ready" if states == {VmState.READY} else "starting"


def cluster_row(c: Cluster, queued: QueuedJob | None = None) -> tuple[str, ...]:
    """One line of ``vcluster ps``: job id, name, mode, state, VMs, their states, hosts."""
    counts: dict[str, int] = {}
    for index in range(len(c.spec.plan.vms)):
        record = c.vms.get(index)
        state = record.state.value if record else "unknown"
        counts[state] = counts.get(state, 0) + 1
    hosts = sorted({r.host for r in c.vms.values() if r.host})
    return (c.spec.job, c.spec.name, c.spec.mode, cluster_state(c, queued),
            str(len(c.spec.plan.vms)), ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            ",".join(hosts) or "-")


def queued_row(q: QueuedJob) -> tuple[str, ...]:
    """The line of a job whose cluster is not recorded yet; its reason as squeue shows it."""
    vms = q.vms
    reason = f"({q.reason})" if q.state == "PENDING" else "-"
    return (q.job, q.name, q.mode, cluster_state(None, q), "?" if vms is None else str(vms),
            "-", reason)


def queued_header(q: QueuedJob) -> str:
    """``job 14 (job.sh): batch, pending (JobHeldUser): 2 VMs (tiny:2)``."""
    vms = q.vms
    count = "VMs" if vms is None else f"{vms} VM{'s' if vms != 1 else ''}"
    why = f" ({q.reason})" if q.state == "PENDING" and q.reason not in ("", "None") else ""
    return (f"job {q.job} ({q.name}): {q.mode}, {cluster_state(None, q)}{why}: {count} "
            f"({q.definition}); its VMs start when SLURM runs the job")


def cluster_header(c: Cluster) -> str:
    """``job 12 (vcluster): 4 VMs (tiny-fam:2,tiny:2); VNIs: cluster=4096``."""
    count = len(c.spec.plan.vms)
    text = (f"job {c.spec.job} ({c.spec.name}): {count} VM{'s' if count != 1 else ''} "
            f"({c.spec.plan.definition})")
    if c.spec.vnis:
        text += "; VNIs: " + ", ".join(f"{net}={vni}" for net, vni in c.spec.vnis.items())
    return text


def vm_rows(c: Cluster) -> list[tuple[str, ...]]:
    """One row per VM: name, host, state, addresses, FAM region, ssh port (``-`` where none
    yet)."""
    rows: list[tuple[str, ...]] = []
    for vm in c.spec.plan.vms:
        record = c.vms.get(vm.index)
        addresses = record.addresses if record and record.addresses else tuple(
            nic.address.split("/")[0] if nic.address else "?" for nic in vm.nics)
        rows.append((vm.name, (record.host if record else None) or "-",
                     record.state.value if record else "unknown",
                     ",".join(addresses) or "-", vm.fam.name if vm.fam else "-",
                     f"{record.ssh.address}:{record.ssh.port}" if record and record.ssh
                     else "-"))
    return rows


def _one(clusters: list[Cluster], waiting: list[QueuedJob], job: str) -> list[Cluster]:
    """The cluster of ``job`` (none if SLURM has it queued, not started)."""
    from vcluster.errors import InputError

    for c in clusters:
        if c.spec.job == job:
            return [c]
    if any(q.job == job for q in waiting):
        return []
    known = [f"{c.spec.job} ({c.spec.name})" for c in clusters]
    known += [f"{q.job} ({q.name})" for q in waiting]
    raise InputError(f"JOB {job}: you have no cluster in job {job} (expected one of: "
                     f"{', '.join(known) or 'none'})")


def _job_order(job: str) -> tuple[int, str]:
    return (len(job), job)


@click.command()
@click.option("-l", "--long", "long_", is_flag=True,
              help="List every VM of each cluster: host, state, addresses, FAM region, "
                   "ssh port.")
@cluster_options
@click.argument("job", required=False, metavar="[JOB]")
@click.pass_context
def ps(ctx: click.Context, long_: bool, jobid: str | None, jobname: str | None,
       job: str | None) -> None:
    """List your clusters: job id, job name, mode, state, VMs, their states and hosts.

    MODE is alloc or batch; STATE is pending (queued by SLURM: HOSTS shows
    why it waits, as squeue does), starting, ready, stopping or failed.
    With -l, list each VM of every cluster instead: its name, the host it
    runs on, its state, its addresses and its FAM region, under a line
    giving the job, its definition and the VXLAN ids (VNIs) of its private
    networks. With a JOB id (or -j JOBID, -J NAME), the same for that
    cluster alone.
    """
    from vcluster.cli.clusters import queued, read_clusters, select_cluster, with_store
    from vcluster.errors import InputError

    store, keys, user = with_store(ctx)
    clusters = read_clusters(store, keys, user)
    recorded = {c.spec.job for c in clusters}
    in_queue = {q.job: q for q in queued()}
    waiting = [q for q in in_queue.values() if q.job not in recorded]
    one = job is not None or jobid is not None or jobname is not None
    if job is not None:
        clusters = _one(clusters, waiting, job)
        waiting = [q for q in waiting if q.job == job and not clusters]
    elif one:
        try:
            clusters = [select_cluster(clusters, jobid, jobname)]
            waiting = []
        except InputError:
            waiting = [q for q in waiting if q.job == jobid or (jobid is None
                                                                 and q.name == jobname)]
            if len(waiting) != 1:
                raise
            clusters = []
    if not clusters and not waiting:
        click.echo("no clusters (start one with vcluster alloc or vcluster batch)", err=True)
        return
    if not long_ and not one:
        rows = [cluster_row(c, in_queue.get(c.spec.job)) for c in clusters]
        rows += [queued_row(q) for q in waiting]
        rows.sort(key=lambda row: _job_order(row[0]))
        print_table(HEADERS, rows)
        return
    blocks: list[tuple[str, list[str]]] = []
    for c in clusters:
        blocks.append((c.spec.job, [cluster_header(c), *table_lines(VM_HEADERS, vm_rows(c))]))
    for q in waiting:
        blocks.append((q.job, [queued_header(q)]))
    blocks.sort(key=lambda block: _job_order(block[0]))
    click.echo("\n\n".join("\n".join(lines) for _, lines in blocks))
