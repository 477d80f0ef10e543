"""``vcluster exec``: a command on VMs through their guest agents, in parallel.

The VMs are reached through the job (``launch/vmexec.py``).  Output comes
back per VM once its command has ended, with ``vmN: `` before each line
when there are several VMs.
"""

from __future__ import annotations

import re

import click

from vcluster.cli.clusters import Cluster, cluster_options

_RANGE_RE = re.compile(r"^(?:vm)?\[([0-9,\-]+)\]$")


def parse_vms(text: str, count: int) -> list[int]:
    """``vm1``, ``1``, ``vm0,vm2``, ``vm[0-3]``, ``vm[0-1,5]`` → VM indexes (checked)."""
    from vcluster.errors import InputError

    def bad(problem: str) -> InputError:
        last = f"vm{count - 1}"
        return InputError(f"VMS: {text!r}: {problem} (expected VMs of this cluster, vm0 to "
                          f"{last}, such as vm0, vm0,vm2 or vm[0-{count - 1}])")

    out: list[int] = []
    for part in _split(text):
        m = _RANGE_RE.match(part)
        pieces = m[1].split(",") if m else [part.removeprefix("vm")]
        for piece in pieces:
            first, sep, last = piece.partition("-")
            if not first.isdigit() or (sep and not last.isdigit()):
                raise bad(f"{part!r} is not a VM or a range")
            lo, hi = int(first), int(last) if sep else int(first)
            if lo > hi:
                raise bad(f"{part!r} is an empty range")
            if hi >= count:
                raise bad(f"there is no vm{hi}")
            out += [i for i in range(lo, hi + 1) if i not in out]
    if not out:
        raise bad("no VM named")
    return out


def _split(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


@click.command("exec", context_settings={"allow_interspersed_args": False},
               help="""Run COMMAND on VMs through their guest agents: (--all | VMS) -- COMMAND...

VMS: vm1, vm0,vm2 or vm[0-3]. The VMs run it in parallel; each one's output
is printed when its command ends, with the VM's name before each line when
there are several. The exit status is the command's (with several VMs, the
first non-zero one, and a line naming the VMs that failed).""")
@cluster_options
@click.option("-u", "--user", default=None, metavar="USER",
              help="Run as USER in the guest (default: root, the guest agent's user).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Give up on the command after SECONDS (exit status 124).")
@click.option("--all", "all_vms", is_flag=True, help="Every VM of the cluster.")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_command(ctx: click.Context, jobid: str | None, jobname: str | None, user: str | None,
                 timeout: float | None, all_vms: bool, args: tuple[str, ...]) -> None:
    from vcluster.cli.clusters import pick_cluster, with_store
    from vcluster.errors import InputError, VclusterError

    store, keys, me = with_store(ctx)
    cluster = pick_cluster(store, keys, me, jobid, jobname)
    count = len(cluster.spec.plan.vms)
    if all_vms:
        indexes, command = list(range(count)), list(args)
    else:
        indexes, command = parse_vms(args[0], count), list(args[1:])
    if command[:1] == ["--"]:  # after VMS; click takes only a "--" before every argument
        command = command[1:]
    if not command:
        raise InputError("COMMAND: missing (expected (--all | VMS) -- COMMAND...)")
    hosts: dict[str, list[int]] = {}
    for i in indexes:
        record = cluster.vms.get(i)
        if record is None or record.host is None:
            state = record.state.value if record else "unknown"
            raise VclusterError(f"vm{i} of job {cluster.spec.job} has not started on a host "
                                f"yet (state: {state})")
        hosts.setdefault(record.host, []).append(i)
    from vcluster.execwire import NO_GUEST_AGENT
    from vcluster.launch.vmexec import VmCommand, run_in_vms, summary

    statuses = run_in_vms(VmCommand(cluster.spec.job, hosts, tuple(command), user=user,
                                    timeout=timeout, names=len(indexes) > 1,
                                    local=cluster.spec.local))
    templates = {vm.index: vm.template for vm in cluster.spec.plan.vms}
    for i in indexes:
        if i not in statuses:
            click.echo(f"vcluster: error: vm{i}: no answer from its host {record_host(cluster, i)}"
                       " (see the lines above)", err=True)
            statuses[i] = 1
        elif statuses[i] == NO_GUEST_AGENT:
            click.echo(f"vcluster: error: vm{i}: its guest agent did not answer: does the image "
                       f"of template {templates[i]!r} run qemu-guest-agent?", err=True)
            statuses[i] = 1
    if len(indexes) == 1:
        raise SystemExit(statuses[indexes[0]])
    line = summary(statuses)
    if line is not None:
        click.echo(f"vcluster: exec: {line}", err=True)
    raise SystemExit(next((statuses[i] for i in indexes if statuses[i] != 0), 0))


def record_host(cluster: Cluster, index: int) -> str:
    record = cluster.vms.get(index)
    return (record.host if record else None) or "?"
