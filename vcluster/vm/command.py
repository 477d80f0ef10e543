"""``vcluster internal vm``, ``console-attach``, ``exec``, ``nc`` and ``save`` (light imports)."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import click

DETACH_HELP = "Ctrl-]"


@click.command("vm")
@click.option("--job", envvar="SLURM_JOB_ID", default=None, metavar="JOBID",
              help="The SLURM job (default: $SLURM_JOB_ID; with --held, the line read).")
@click.option("--vm", "index", envvar="SLURM_PROCID", type=click.IntRange(min=0), required=True,
              metavar="N", help="The VM's index in the cluster (default: $SLURM_PROCID).")
@click.option("--host", envvar="SLURMD_NODENAME", default=None, metavar="HOST",
              help="This host's name as published (default: $SLURMD_NODENAME).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="How long the guest may take to be ready (default: 300 s for cloud-init "
                   "images, 60 s for tiny, halved under KVM).")
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long a powered-down guest may take to stop before QEMU is told to "
                   "quit (default: 20 s, 1 s for tiny, which ignores the power button).")
@click.option("--local", is_flag=True,
              help="A local cluster: the devices its launcher made, and its agent's if "
                   "--agent-socket names one (root's cluster).")
@click.option("--agent-socket", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="The agent to ask for devices (default: the host's).")
@click.option("--local-agent", is_flag=True,
              help="With --local: ask the job's own agent, in its launcher (root's cluster).")
@click.option("--held", is_flag=True,
              help="Wait for a line on stdin, the job's id, before preparing the VM, and end "
                   "at once at end of file (a local launcher starts its runners before the "
                   "job has its id).")
def vm(job: str | None, index: int, host: str | None, ready_timeout: float | None,
       stop_timeout: float | None, local: bool, agent_socket: Path | None, local_agent: bool,
       held: bool) -> None:
    """Run one VM of a cluster as this SLURM task, until the task is signalled.

    Publishes the VM's state (preparing, booting, ready, stopping, stopped or
    failed with a reason) under the cluster's keys in the store, and exits
    non-zero if the VM failed.
    """
    import signal

    from vcluster.cancel import STOP_SIGNALS
    from vcluster.config.loader import load_batch
    from vcluster.session import StoreOpening

    if job is None and not held:
        raise click.UsageError("--job (or $SLURM_JOB_ID) is needed unless --held")

    # A local launcher starts its runners with the stop signals held back (as it starts
    # srun): they are ours to handle.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    batch = load_batch()
    # The store logs in (etcd hashes the password) while the runner is imported.
    opening = StoreOpening(batch)
    try:
        from vcluster.vm.runner import Runner, RunnerOptions

        logging.getLogger("vcluster").setLevel(logging.INFO)
        from vcluster.agent.client import AgentClient
        from vcluster.vm.runner import DeviceSource
        from vcluster.vm.userdevices import LocalDeviceSource

        layout = batch.directories.layout
        if held:
            import pycdlib  # noqa: F401  (the seed's writer: imported while waiting)

            job = sys.stdin.readline().strip()
            if not job:
                return  # the launcher ended before it started the cluster
        assert job is not None  # given, or read when held
        if local and local_agent:
            agent_socket = layout.local_agent_socket(job)
        client = AgentClient(agent_socket or layout.agent_socket)
        agent: DeviceSource = client
        if local:
            agent = LocalDeviceSource(layout, client if agent_socket else None)
        options = RunnerOptions(job=job, index=index, host=host or socket.gethostname(),
                                ready_timeout=ready_timeout, stop_timeout=stop_timeout)
        code = Runner(options, batch, agent=agent, open_store=opening.result).run()
    finally:
        opening.close()  # only if the runner did not take it
    sys.exit(code)


@click.command("console-attach")
@click.option("--job", envvar="SLURM_JOB_ID", required=True, metavar="JOBID",
              help="The SLURM job (default: $SLURM_JOB_ID).")
@click.option("--vm", "index", type=click.IntRange(min=0), required=True, metavar="N",
              help="The VM's index in the cluster.")
@click.option("-l", "--log", "show_log", is_flag=True,
              help="Print the console log instead of attaching.")
@click.option("-n", "--lines", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --log: only the last N lines.")
def console_attach(job: str, index: int, show_log: bool, lines: int | None) -> None:
    """Attach the terminal to a VM's serial console on this host.

    Keys go to the guest as typed (the terminal is in raw mode). Detach with
    Ctrl-] (Control and the right square bracket). Runs on the VM's host
    inside the job (vcluster console uses srun --overlap --pty for that);
    only the VM's owner can attach.
    """
    from vcluster.config.loader import load_batch
    from vcluster.vm.console import attach, print_log

    files = load_batch().directories.layout.vm(job, index)
    what = f"vm{index} of job {job}"
    if show_log:
        print_log(files.console_log, what, lines)
        return
    attach(files.console_socket, what)


@click.command("exec")
@click.option("--job", envvar="SLURM_JOB_ID", required=True, metavar="JOBID",
              help="The SLURM job (default: $SLURM_JOB_ID).")
@click.option("--vm", "indexes", type=click.IntRange(min=0), multiple=True, required=True,
              metavar="N", help="A VM of the job on this host (repeatable).")
@click.option("-u", "--user", default=None, metavar="USER", help="Run as USER in the guest.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Give up on a command after SECONDS (status 124).")
@click.option("--names/--no-names", default=False, help="Put each VM's name before its lines.")
@click.option("--stdin", "with_stdin", is_flag=True,
              help="Read all of stdin first and give it to the command as its stdin.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def guest_exec(job: str, indexes: tuple[int, ...], user: str | None, timeout: float | None,
               names: bool, with_stdin: bool, argv: tuple[str, ...]) -> None:
    """Run ARGV in VMs of this host through their guest agents, in parallel.

    Each VM's output goes to this command's stdout and stderr once its command
    has ended (with ``vmN: `` before each line with --names); the last stdout
    line is a status line that vcluster exec reads. Runs on the VMs' host
    inside the job (vcluster exec uses srun --overlap for that).
    """
    import threading

    from vcluster.config.loader import load_batch
    from vcluster.errors import VclusterError
    from vcluster.execwire import NO_GUEST_AGENT, status_line
    from vcluster.vm.guestexec import GuestAgent, as_user

    layout = load_batch().directories.layout
    data = sys.stdin.buffer.read() if with_stdin else None
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def emit(stream: int, name: str, data: bytes) -> None:
        if not data:
            return
        if names:
            lines = data.decode(errors="replace").splitlines()
            data = "".join(f"{name}: {line}\n" for line in lines).encode()
        out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
        out.write(data)
        out.flush()

    def one(index: int) -> None:
        name = f"vm{index}"
        try:
            with GuestAgent(layout.vm(job, index).guest_agent_socket, name) as agent:
                done = agent.run(as_user(user, argv), timeout, stdin=data)
            status, out, err = done.status, done.stdout, done.stderr
        except VclusterError as e:  # no guest agent: -1 in the status line, not an exit status
            status, out, err = NO_GUEST_AGENT, b"", f"vcluster: error: {e}\n".encode()
        with lock:
            emit(1, name, out)
            emit(2, name, err)
            statuses[name] = status

    threads = [threading.Thread(target=one, args=(i,)) for i in indexes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stdout.buffer.write(status_line(statuses))
    sys.stdout.flush()


@click.command("nc")
@click.argument("address")
@click.argument("port", type=click.IntRange(1, 65535))
def nc(address: str, port: int) -> None:
    """Relay stdin and stdout to ADDRESS:PORT from this host (vcluster nc, through the job)."""
    from vcluster.relay import relay_tcp

    sys.exit(relay_tcp(address, port))


@click.command("save")
@click.option("--job", envvar="SLURM_JOB_ID", required=True, metavar="JOBID",
              help="The SLURM job (default: $SLURM_JOB_ID).")
@click.option("--vm", "index", type=click.IntRange(min=0), required=True, metavar="N",
              help="The VM of the job on this host.")
@click.option("--source", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="The image revision the disk started as (its directory); none: it was "
                   "empty.")
@click.option("--device", default="disk0", show_default=True,
              help="QEMU's drive to save (disk0: the root disk of a disk image).")
@click.option("--what", default="the root disk", help="The disk, for messages.")
@click.option("--dest", type=click.Path(path_type=Path), required=True, metavar="REPO",
              help="The repository to save into.")
@click.option("--name", required=True, help="The image to add a revision to.")
@click.option("--full", is_flag=True, help="A standalone, compressed revision.")
@click.option("--no-freeze", is_flag=True, help="Do not freeze the guest's file systems.")
@click.option("--max-depth", type=click.IntRange(min=1), default=16, show_default=True,
              help="Flatten the revision when its chain of layers would be deeper.")
def save(job: str, index: int, source: Path | None, device: str, what: str, dest: Path,
         name: str, full: bool, no_freeze: bool, max_depth: int) -> None:
    """Save a disk of a VM of this host as a new image revision, the VM running.

    Runs on the VM's host inside the job (vcluster save uses srun --overlap
    for that), as the VM's user; prints progress on stderr and the saved
    revision (IMAGE@REVISION and its directory) on stdout.
    """
    from vcluster.config.loader import load_batch
    from vcluster.identity import user_name
    from vcluster.images.repo import INFO_FILE, Image, ImageInfo, Repository
    from vcluster.vm.save import SaveRequest, save_vm

    image = None
    if source is not None:
        info_path = source / INFO_FILE
        info = ImageInfo.from_json(info_path.read_text(), info_path)
        image = Image(source.parent.parent, info, source)
    files = load_batch().directories.layout.vm(job, index)
    request = SaveRequest(job, index, image, Repository(dest), name, full or image is None,
                          not no_freeze, user_name(), max_depth, device, what)

    def say(text: str) -> None:
        print(f"vcluster: save vm{index}: {text}", file=sys.stderr, flush=True)

    saved = save_vm(request, files, say)
    print(f"{saved.ref} {saved.path}", flush=True)
