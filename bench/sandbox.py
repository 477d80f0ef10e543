"""What the sandbox benchmarks share: a sandbox of their own, and a cluster kept up in it.

``sandbox(images, hosts, name)`` brings up a sandbox in a new directory under
/var/tmp and always tears it down (and removes the directory);
``cluster(box, flags, alloc_args, name)`` runs ``vcluster alloc ... -E WAIT``
on its controller until every VM is ready, yields the job id, and ends the
cluster when the block ends (the -E command waits for a flag file).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from vcluster.sandbox.state import SandboxState

READY_TIMEOUT = 180.0
FLAG = "bench-cluster-done"


def fail(name: str, message: str) -> NoReturn:
    raise SystemExit(f"{name}: {message}")


def run_rounds(name: str, doc: str | None, hosts: int, default_rounds: int,
               bench: Callable[[SandboxState, int], None]) -> None:
    """The command line of a sandbox benchmark: ``--rounds``, ``--images``; root checked;
    ``bench(sandbox, rounds)`` run in a sandbox of ``hosts`` hosts."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=default_rounds,
                        help=f"rounds (default {default_rounds})")
    parser.add_argument("--images", type=Path, default=None,
                        help="the repository holding tiny (default $VCLUSTER_TEST_IMAGES "
                             "or /var/cache/vcluster-test/images)")
    args = parser.parse_args()
    if args.rounds < 1:
        fail(name, "--rounds must be at least 1")
    if os.geteuid() != 0:
        fail(name, "needs root (it brings up a sandbox: namespaces, SLURM, etcd, agents)")
    from bench.boot_tiny import DEFAULT_IMAGES

    images: Path = (args.images or DEFAULT_IMAGES).absolute()
    with sandbox(images, hosts, name) as box:
        bench(box, args.rounds)


@contextmanager
def sandbox(images: Path, hosts: int, name: str) -> Iterator[SandboxState]:
    """A sandbox of ``hosts`` hosts in a new directory, torn down (and removed) at the end."""
    from vcluster.run import run
    from vcluster.sandbox.state import require

    parent = Path(tempfile.mkdtemp(prefix="vcluster-bench-", dir="/var/tmp"))
    directory = parent / "sb"
    vcluster = [sys.executable, "-m", "vcluster", "sandbox"]
    try:
        parent.chmod(0o755)
        up = run([*vcluster, "up", "--hosts", str(hosts), "--images", str(images),
                  "--dir", str(directory)], check=False, timeout=180)
        if up.returncode != 0:
            fail(name, f"vcluster sandbox up failed:\n{up.stdout}{up.stderr}")
        yield require(directory)
    finally:
        down = run([*vcluster, "down", "--dir", str(directory)], check=False, timeout=180)
        shutil.rmtree(parent, ignore_errors=True)
        if down.returncode != 0:
            print(f"{name}: sandbox down failed:\n{down.stdout}{down.stderr}", file=sys.stderr)


@contextmanager
def flag_directory() -> Iterator[Path]:
    """A directory every user can write flags into, removed at the end."""
    flags = Path(tempfile.mkdtemp(prefix="vcluster-bench-flags-", dir="/var/tmp"))
    flags.chmod(0o1777)
    try:
        yield flags
    finally:
        shutil.rmtree(flags, ignore_errors=True)


@contextmanager
def cluster(box: SandboxState, flags: Path, alloc_args: Sequence[str],
            name: str) -> Iterator[str]:
    """``vcluster alloc ALLOC_ARGS`` with -E waiting for our flag: the job id, once ready."""
    from vcluster.run import spawn
    from vcluster.sandbox.use import command

    wait = f"while [ ! -e {flags}/{FLAG} ]; do sleep 0.2; done"
    *options, definition = alloc_args
    cmd = command(box, ["vcluster", "alloc", *options, "-E", wait, definition])
    proc = spawn(cmd.argv, env=cmd.env, cwd=cmd.cwd, stderr=subprocess.PIPE,
                 new_session=True)
    assert proc.stderr is not None
    text = ""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            text += line
            if re.search(r"VMs? ready in ", line):
                break
            if time.monotonic() > deadline:
                fail(name, f"the cluster was not ready in {READY_TIMEOUT:g} s:\n{text}")
        else:
            fail(name, f"vcluster alloc ended before the cluster was ready:\n{text}")
        job = re.search(r"vcluster: job (\d+): starting", text)
        if job is None:
            fail(name, f"no job id in alloc's output:\n{text}")
        yield str(job.group(1))
    finally:
        (flags / FLAG).touch()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
