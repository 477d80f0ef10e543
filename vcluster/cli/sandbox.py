"""``vcluster sandbox``: a SLURM cluster of network namespaces on one machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vcluster.sandbox.state import DEFAULT_DIR, MAX_HOSTS

F = TypeVar("F", bound=Callable[..., Any])


def dir_option(func: F) -> F:
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
        envvar="VCLUSTER_SANDBOX", default=DEFAULT_DIR, show_default=True,
        help="The sandbox's directory (state file, configuration, logs); "
             "also $VCLUSTER_SANDBOX. One sandbox per directory.",
    )(func)


def _echo(message: str) -> None:
    click.echo(f"sandbox: {message}")


@click.group()
def sandbox() -> None:
    """A test bed on one machine: munge, etcd, slurmctld and N SLURM hosts.

    Each host is a network namespace with its own hostname and address
    running a slurmd and a vcluster-agent; the controller (hostname ctl) is
    the login node too (it runs an agent for store credentials).
    Every machine has a vcluster configuration of its own. Needs root.

    \b
      vcluster sandbox up --hosts 3
      vcluster sandbox run -- srun -N3 hostname
      vcluster sandbox status
      vcluster sandbox down
    """


@sandbox.command()
@dir_option
@click.option("-n", "--hosts", type=click.IntRange(1, MAX_HOSTS), default=3, show_default=True,
              help="How many SLURM hosts (h1, h2, ...).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/vcluster/images"), show_default=True,
              help="The image repository the sandbox's configuration points at.")
@click.option("--cpus", type=click.IntRange(0), default=0,
              help="CPUs per host in slurm.conf [default: this machine's].")
@click.option("--memory", "memory_mb", type=click.IntRange(0), default=0,
              help="RealMemory per host in MiB [default: half this machine's, at most 8192].")
def up(directory: Path, hosts: int, images: Path, cpus: int, memory_mb: int) -> None:
    """Bring a sandbox up (root).

    Starts munged, etcd (auth enabled) and slurmctld on the controller, and a
    slurmd on each host, waits until every node is idle, then starts a
    vcluster-agent on the controller and on each host. If a step
    fails, whatever was started is removed again. Refuses to start over a
    sandbox that runs (or left files) in the same directory.
    """
    from vcluster.sandbox import lifecycle

    options = lifecycle.UpOptions(hosts=hosts, images=images.absolute(), cpus=cpus,
                                  memory_mb=memory_mb)
    state = lifecycle.up(directory, options, _echo)
    where = "" if Path(state.dir) == DEFAULT_DIR else f" --dir {state.dir}"
    _echo(f"sandbox {state.id} is up with {len(state.hosts)} hosts. Try:")
    click.echo(f"  vcluster sandbox run{where} -- sinfo")
    click.echo(f"  vcluster sandbox run{where} -- srun -N{len(state.hosts)} hostname")
    click.echo(f"  vcluster sandbox run{where} --host h1 -- hostname")
    click.echo(f"  vcluster sandbox down{where}")


@sandbox.command(context_settings={"ignore_unknown_options": True,
                                   "allow_interspersed_args": False})
@dir_option
@click.option("-H", "--host", metavar="HOST",
              help="Run on this host (h1, h2, ...) instead of the controller (ctl).")
@click.option("-u", "--user", metavar="USER",
              help="Run as this unix user (HOME, USER set) instead of root.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@click.pass_context
def run(ctx: click.Context, directory: Path, host: str | None, user: str | None,
        argv: tuple[str, ...]) -> None:
    """Run CMD on the controller (or a host) of the sandbox.

    CMD runs in that machine's network namespace and hostname, with
    VCLUSTER_CONF set to the machine's vcluster configuration, SLURM_CONF
    to the sandbox's slurm.conf and a PATH on which vcluster and SLURM's
    commands resolve. Exits with CMD's exit status.

    \b
      vcluster sandbox run -- srun -N3 hostname
      vcluster sandbox run --host h2 --user alice -- id
    """
    from vcluster.run import spawn
    from vcluster.sandbox import use

    state = use.ensure_dir(directory)
    cmd = use.command(state, list(argv), host=host, user=user)
    child = spawn(cmd.argv, stdin=None, stdout=None, stderr=None, env=cmd.env, cwd=cmd.cwd)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # the child got the SIGINT too; wait for it to finish
            continue
    ctx.exit(128 - code if code < 0 else code)  # killed by signal N: 128+N, as shells do


@sandbox.command()
@dir_option
def status(directory: Path) -> None:
    """Show the daemons (PID, alive or dead) and the hosts (address, SLURM state).

    Exit status: 0 when the sandbox is up and every daemon alive, 1 when
    something is wrong, 3 when there is no sandbox in the directory.
    """
    from vcluster.sandbox import state as state_mod
    from vcluster.sandbox import use

    state = state_mod.load(directory.absolute())
    if state is None:
        click.echo(f"no sandbox in {directory.absolute()}")
        raise click.exceptions.Exit(3)
    for line in use.status_lines(state):
        click.echo(line)
    if not use.healthy(state):
        raise click.exceptions.Exit(1)


@sandbox.command()
@dir_option
def down(directory: Path) -> None:
    """Stop the sandbox and remove everything it made (root).

    Stops slurmd, the agents, slurmctld, etcd and munged by PID (and anything else still
    running in the sandbox's namespaces), removes its namespaces and its
    directory. Works after a failed 'up' and does nothing when no sandbox is
    there; if something resists, says what and can be run again.
    """
    from vcluster.sandbox import lifecycle

    state = lifecycle.down(directory, _echo)
    if state is None:
        _echo(f"no sandbox in {directory.absolute()}; nothing to do")
    else:
        _echo(f"sandbox {state.id} is gone")
