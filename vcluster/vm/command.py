"""``vcluster internal vm`` and ``vcluster internal console-attach`` (light imports only)."""

from __future__ import annotations

import logging
import socket
import sys

import click

DETACH_HELP = "Ctrl-]"


@click.command("vm")
@click.option("--job", envvar="SLURM_JOB_ID", required=True, metavar="JOBID",
              help="The SLURM job (default: $SLURM_JOB_ID).")
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
def vm(job: str, index: int, host: str | None, ready_timeout: float | None,
       stop_timeout: float | None) -> None:
    """Run one VM of a cluster as this SLURM task, until the task is signalled.

    Publishes the VM's state (preparing, booting, ready, stopping, stopped or
    failed with a reason) under the cluster's keys in the store, and exits
    non-zero if the VM failed.
    """
    from vcluster.config.loader import load_batch
    from vcluster.session import StoreOpening

    batch = load_batch()
    # The store logs in (etcd hashes the password) while the runner is imported.
    opening = StoreOpening(batch)
    try:
        from vcluster.vm.runner import Runner, RunnerOptions

        logging.getLogger("vcluster").setLevel(logging.INFO)
        options = RunnerOptions(job=job, index=index, host=host or socket.gethostname(),
                                ready_timeout=ready_timeout, stop_timeout=stop_timeout)
        code = Runner(options, batch, open_store=opening.result).run()
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
