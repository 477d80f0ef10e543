"""``vcluster exec``: a command on VMs through their guest agents, in parallel.

For each host of the chosen VMs, one ``srun --overlap`` into the job runs
``vcluster internal exec`` there, which talks to each VM's qemu-guest-agent
socket (``vm/guestexec.py``).  Output comes back per VM once its command
has ended, with ``vmN: `` before each line when there are several VMs.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Sequence
from typing import IO

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


def summary(statuses: dict[int, int]) -> str | None:
    """The one line saying which VMs failed (None when none did)."""
    failed = [(i, s) for i, s in sorted(statuses.items()) if s != 0]
    if not failed:
        return None
    which = ", ".join(f"vm{i} (exit {s})" for i, s in failed)
    if len(failed) == len(statuses):
        return f"every VM failed: {which}"
    return f"{len(failed)} of {len(statuses)} VMs failed: {which}"


def _relay(stream: IO[bytes], got: dict[str, int]) -> None:
    from vcluster.vm.command import EXEC_STATUS

    mark = EXEC_STATUS.encode()
    for line in stream:
        if line.startswith(mark):
            got.update(json.loads(line[len(mark):]))
            continue
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


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
    from vcluster.cli.clusters import read_clusters, select_cluster, with_store
    from vcluster.errors import InputError, VclusterError

    store, keys, me = with_store(ctx)
    cluster = select_cluster(read_clusters(store, keys, me), jobid, jobname)
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
    statuses = _run(cluster.spec.job, hosts, command, user, timeout, names=len(indexes) > 1)
    templates = {vm.index: vm.template for vm in cluster.spec.plan.vms}
    for i in indexes:
        if i not in statuses:
            click.echo(f"vcluster: error: vm{i}: no answer from its host {record_host(cluster, i)}"
                       " (see the lines above)", err=True)
            statuses[i] = 1
        elif statuses[i] < 0:
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


def _run(job: str, hosts: dict[str, list[int]], command: Sequence[str], user: str | None,
         timeout: float | None, *, names: bool) -> dict[int, int]:
    """One srun per host, in parallel; each VM's exit status."""
    import subprocess

    from vcluster.run import spawn

    procs: list[subprocess.Popen[bytes]] = []
    threads: list[threading.Thread] = []
    got: dict[str, int] = {}
    for host, vms in hosts.items():
        argv = ["srun", f"--jobid={job}", "--overlap", f"--nodelist={host}", "--nodes=1",
                "--ntasks=1", "--quiet", sys.executable, "-m", "vcluster", "internal", "exec",
                "--job", job, *(f"--vm={i}" for i in vms),
                *(["--user", user] if user else []),
                *([f"--timeout={timeout}"] if timeout else []),
                "--names" if names else "--no-names", "--", *command]
        proc = spawn(argv, stdin=None, stdout=subprocess.PIPE, stderr=None)
        assert proc.stdout is not None
        thread = threading.Thread(target=_relay, args=(proc.stdout, got))
        thread.start()
        procs.append(proc)
        threads.append(thread)
    for proc, thread in zip(procs, threads, strict=True):
        proc.wait()
        thread.join()
    return {int(name[2:]): status for name, status in got.items()}
