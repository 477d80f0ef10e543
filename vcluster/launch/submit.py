"""Submitting an interactive cluster: validate everything, then hand over to salloc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from vcluster.cancel import STOP_SIGNALS, ignored
from vcluster.errors import InputError
from vcluster.run import spawn

# Ctrl-C reaches salloc from the terminal itself; the others may come to alloc alone.
FORWARDED = tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)


@contextlib.contextmanager
def forwarded(proc: subprocess.Popen[bytes], signals: Sequence[int]) -> Iterator[None]:
    """Pass ``signals`` on to ``proc`` inside the block, each as it comes."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    saved = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def split_definition(args: list[str]) -> tuple[list[str], str]:
    """The SLURM options and the cluster definition (the last argument)."""
    if not args or args[-1].startswith("-"):
        raise InputError("missing DEFINITION: the cluster to allocate, such as tiny:2 or "
                         "debian:4,tiny (expected [SALLOC OPTIONS] DEFINITION last)")
    return args[:-1], args[-1]


def _has_option(options: list[str], short: str, long: str) -> bool:
    """Whether ``-X``, ``-Xvalue``, ``--long`` or ``--long=value`` is among the options."""
    return any(o in (short, long) or o.startswith(long + "=")
               or (o.startswith(short) and not o.startswith("--")) for o in options)


def _comment(options: list[str]) -> str | None:
    """The user's own --comment for salloc (the last one), kept after vcluster's mark."""
    found = None
    for i, o in enumerate(options):
        if o.startswith("--comment="):
            found = o.partition("=")[2]
        elif o == "--comment" and i + 1 < len(options):
            found = options[i + 1]
    return found


def write_plan(text: str) -> Path:
    """The plan, in a file only the user can read, for the launcher to pick up."""
    fd, name = tempfile.mkstemp(prefix="vcluster-plan-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


def submit_alloc(args: list[str], *, cpus: int | None, command: str | None,
                 stop_timeout: float | None, ready_timeout: float, verbose: bool) -> int:
    from vcluster.cluster import plan_cluster
    from vcluster.config.loader import load_config
    from vcluster.launch.queue import job_comment
    from vcluster.store.records import to_json

    options, definition = split_definition(args)
    config = load_config()
    plan = plan_cluster(config, definition, cpus_per_task=cpus)
    # --kill-command: when the allocation is revoked (scancel, time limit), salloc
    # signals the launcher, which stops the VMs; without it salloc just waits.
    argv = ["salloc", *options, f"--ntasks={len(plan.vms)}", "--kill-command=TERM"]
    if cpus is not None:
        argv.append(f"--cpus-per-task={cpus}")
    if not _has_option(options, "-J", "--job-name"):
        argv.append("--job-name=vcluster")
    argv.append(f"--comment={job_comment('alloc', plan.definition, _comment(options))}")
    plan_path = write_plan(to_json(plan))
    argv += [sys.executable, "-m", "vcluster", "internal", "launcher", "--plan", str(plan_path),
             f"--ready-timeout={ready_timeout:g}"]
    if stop_timeout is not None:
        argv.append(f"--stop-timeout={stop_timeout:g}")
    if command is not None:
        argv += ["--command", command]
    if verbose:
        argv.append("--verbose")
    # Ctrl-C reaches salloc and the launcher from the terminal; the other stop signals,
    # sent to alloc alone, are passed on to salloc, which revokes the allocation and so
    # has the launcher stop the VMs (--kill-command).
    proc = spawn(argv, stdin=None, stdout=None, stderr=None)
    try:
        with ignored((signal.SIGINT,)), forwarded(proc, FORWARDED):
            return proc.wait()
    finally:
        with contextlib.suppress(OSError):
            plan_path.unlink()  # salloc failed before the launcher could take it
