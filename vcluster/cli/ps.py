"""``vcluster ps``: your clusters, or (``-l``, ``ps JOB``) each of their VMs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vcluster.cli.clusters import cluster_options
from vcluster.cli.common import print_table

if TYPE_CHECKING:
    from vcluster.cli.clusters import Cluster

VM_HEADERS = ("VM", "HOST", "STATE", "ADDRESSES", "FAM", "SSH")


def cluster_row(c: Cluster) -> tuple[str, ...]:
    """One line of ``vcluster ps``: job id, job name, VMs, their states, hosts."""
    counts: dict[str, int] = {}
    for index in range(len(c.spec.plan.vms)):
        record = c.vms.get(index)
        state = record.state.value if record else "unknown"
        counts[state] = counts.get(state, 0) + 1
    hosts = sorted({r.host for r in c.vms.values() if r.host})
    return (c.spec.job, c.spec.name, str(len(c.spec.plan.vms)),
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ",".join(hosts) or "-")


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


def _one(clusters: list[Cluster], job: str) -> Cluster:
    from vcluster.errors import InputError

    for c in clusters:
        if c.spec.job == job:
            return c
    listing = ", ".join(f"{c.spec.job} ({c.spec.name})" for c in clusters) or "none"
    raise InputError(f"JOB {job}: you have no cluster in job {job} (expected one of: "
                     f"{listing})")


@click.command()
@click.option("-l", "--long", "long_", is_flag=True,
              help="List every VM of each cluster: host, state, addresses, FAM region, "
                   "ssh port.")
@cluster_options
@click.argument("job", required=False, metavar="[JOB]")
@click.pass_context
def ps(ctx: click.Context, long_: bool, jobid: str | None, jobname: str | None,
       job: str | None) -> None:
    """List your clusters: job id, job name, VMs, their states and hosts.

    With -l, list each VM of every cluster instead: its name, the host it
    runs on, its state, its addresses and its FAM region, under a line
    giving the job, its definition and the VXLAN ids (VNIs) of its private
    networks. With a JOB id (or -j JOBID, -J NAME), the same for that
    cluster alone.
    """
    from vcluster.cli.clusters import read_clusters, select_cluster, with_store

    store, keys, user = with_store(ctx)
    clusters = read_clusters(store, keys, user)
    one = job is not None or jobid is not None or jobname is not None
    if job is not None:
        clusters = [_one(clusters, job)]
    elif one:
        clusters = [select_cluster(clusters, jobid, jobname)]
    if not clusters:
        click.echo("no clusters (start one with vcluster alloc)", err=True)
        return
    if not long_ and not one:
        print_table(("JOBID", "NAME", "VMS", "STATES", "HOSTS"), [cluster_row(c) for c in clusters])
        return
    for n, c in enumerate(clusters):
        if n:
            click.echo("")
        click.echo(cluster_header(c))
        print_table(VM_HEADERS, vm_rows(c))
