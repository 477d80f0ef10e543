"""``vcluster ssh``, ``scp``, ``nc`` and ``ssh-config``: the VMs through OpenSSH.

All of them reach a VM through the port its host forwards to the VM's port
22 (its nat network's ``ssh-ports``), with the cluster's key and the host
keys its runners published (``cli/reach.py``), from the login node or from
inside the job alike.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from vcluster.cli.clusters import cluster_options

if TYPE_CHECKING:
    from vcluster.cli.clusters import Cluster

PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False,
                "help_option_names": ["-h", "--help"]}


def _cluster(ctx: click.Context, jobid: str | None, jobname: str | None) -> tuple[Cluster, str]:
    """The selected cluster and its private key (from the user's store prefix)."""
    from vcluster import sshkeys
    from vcluster.cli.clusters import pick_cluster, with_store
    from vcluster.errors import VclusterError

    store, keys, user = with_store(ctx)
    cluster = pick_cluster(store, keys, user, jobid, jobname)
    entry = store.get(keys.cluster_key(user, cluster.spec.job, sshkeys.PRIVATE))
    if entry is None:
        raise VclusterError(f"job {cluster.spec.job} has no ssh key in the store (is the "
                            "cluster still starting, or ending?)")
    return cluster, entry.value


def _run(argv: list[str]) -> int:
    from vcluster.run import spawn

    return spawn(argv, stdin=None, stdout=None, stderr=None).wait()


@click.command(context_settings=PASS_THROUGH, help="""Run ssh to a VM.

Arguments: [SSH OPTIONS] [USER@]vmN [COMMAND...].

The VM is reached through the port its host forwards to it (a nat network
with ssh-ports), with the cluster's own key; the VMs' host keys are known in
advance, and a VM presenting another key is refused. The user is the image's
default one unless USER@ is given. Options before the VM go to ssh.""")
@cluster_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh(ctx: click.Context, jobid: str | None, jobname: str | None,
        args: tuple[str, ...]) -> None:
    from vcluster.cli.clusters import vm_index
    from vcluster.cli.reach import check_reachable, private_access, split_ssh_args

    options, target, command = split_ssh_args(args)
    cluster, key = _cluster(ctx, jobid, jobname)
    index = vm_index(target.vm, cluster)
    check_reachable(cluster, index)
    login = [f"{target.user}@{target.vm}"] if target.user else [target.vm]
    with private_access(cluster, key) as access:
        status = _run(["ssh", "-F", str(access.config), *options, *login, *command])
    raise SystemExit(status)


@click.command(help="""Copy files to, from or between VMs.

Arguments: SRC... DST, a VM's files as [USER@]vmN:PATH.

Through the VMs' forwarded ssh ports with the cluster's key, as vcluster ssh.""")
@cluster_options
@click.option("-r", "recursive", is_flag=True, help="Copy directories recursively.")
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def scp(ctx: click.Context, jobid: str | None, jobname: str | None, recursive: bool,
        paths: tuple[str, ...]) -> None:
    from vcluster.cli.clusters import vm_index
    from vcluster.cli.reach import check_reachable, parse_target, private_access
    from vcluster.errors import InputError

    if len(paths) < 2:
        raise InputError("PATHS: expected SRC... DST (at least two paths)")
    cluster, key = _cluster(ctx, jobid, jobname)
    for path in paths:
        host, sep, _rest = path.partition(":")
        if sep and "/" not in host:
            target = parse_target(host)
            if target is None:
                raise InputError(f"{path!r}: {host!r} is not a VM (expected [USER@]vmN:PATH)")
            check_reachable(cluster, vm_index(target.vm, cluster))
    with private_access(cluster, key) as access:
        status = _run(["scp", "-F", str(access.config), *(["-r"] if recursive else []), "-q",
                       *paths])
    raise SystemExit(status)


@click.command("ssh-config", help="""Write the ssh key, known hosts and ssh_config to DIRECTORY.

DIRECTORY is made private (mode 0700) if it does not exist; then
ssh -F DIRECTORY/config vm1 (or scp, rsync -e, an IDE) works without vcluster.
The files are yours to remove when the job ends.""")
@cluster_options
@click.argument("directory", type=click.Path(file_okay=False))
@click.pass_context
def ssh_config(ctx: click.Context, jobid: str | None, jobname: str | None,
               directory: str) -> None:
    from pathlib import Path

    from vcluster.cli.reach import write_access

    cluster, key = _cluster(ctx, jobid, jobname)
    access = write_access(Path(directory).absolute(), cluster, key)
    click.echo(f"ssh -F {access.config} vm0")


@click.command(help="""Connect standard input and output to PORT of a VM (for ssh's ProxyCommand).

For example: ssh -o ProxyCommand='vcluster nc %h %p' root@vm1. Port 22 goes
through the port the VM's host forwards to it; other ports go through the job,
from the VM's host.""")
@cluster_options
@click.argument("vm")
@click.argument("port", type=click.IntRange(1, 65535))
@click.pass_context
def nc(ctx: click.Context, jobid: str | None, jobname: str | None, vm: str, port: int) -> None:
    from vcluster.cli.clusters import pick_cluster, vm_index, with_store
    from vcluster.cli.reach import check_reachable
    from vcluster.errors import VclusterError
    from vcluster.relay import relay_tcp

    store, keys, user = with_store(ctx)
    cluster = pick_cluster(store, keys, user, jobid, jobname)
    index = vm_index(vm.partition("@")[2] or vm, cluster)
    record = cluster.vms.get(index)
    if port == 22:
        check_reachable(cluster, index)
        assert record is not None and record.ssh is not None
        raise SystemExit(relay_tcp(record.ssh.address, record.ssh.port))
    plan = next(v for v in cluster.spec.plan.vms if v.index == index)
    nat = [n for n, nic in enumerate(plan.nics) if nic.type == "nat"]
    if not nat:
        check_reachable(cluster, index)  # says there is no nat network
    if record is None or record.host is None or len(record.addresses) <= nat[0]:
        raise VclusterError(f"vm{index} of job {cluster.spec.job} has not started on a host "
                            "yet")
    job = cluster.spec.job
    from vcluster.launch.overlap import overlap_argv, overlap_env
    from vcluster.run import spawn

    argv = [*overlap_argv(job, record.host, local=cluster.spec.local), sys.executable,
            "-m", "vcluster", "internal", "nc", record.addresses[nat[0]], str(port)]
    raise SystemExit(spawn(argv, stdin=None, stdout=None, stderr=None, env=overlap_env()).wait())
