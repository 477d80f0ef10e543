"""The local backend's part of bench/alloc.py: ``vcluster alloc -E true tiny:1`` on this
machine alone (the embedded default: no SLURM, no etcd, no /etc/vcluster), next to a bare
boot of the very QEMU command line vcluster runs for it (taken from one ``alloc -v``, its
seed copied, its files moved, its tap one that QEMU opens itself), in the same run,
alternating.  (b) - (a) is what vcluster adds: the CLI, the store, the runner, the
agent's devices, the overlay and seed, readiness polling.  The target: at most 0.3 s.

Run as root (the cluster is root's: the agent's code in the launcher), with an empty
HOME (but for a link to the test images) and an empty ``VCLUSTER_CONF``.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TARGET = 0.3  # seconds of overhead over the bare boot


@dataclass(frozen=True)
class LocalRun:
    booting: float  # alloc start to its "vm0: booting" line (QEMU started)
    ready: float  # alloc start to its "ready in" line
    own: float | None  # alloc's own "ready in" figure
    stopped: float  # the -E command's exit ("stopping the VMs") to alloc's exit


@contextlib.contextmanager
def embedded(images: Path) -> Iterator[dict[str, str]]:
    """An empty HOME (its user repository: ``images``) and an empty VCLUSTER_CONF."""
    base = Path(tempfile.mkdtemp(prefix="vcluster-bench-local-", dir="/tmp"))
    try:
        (base / "home" / ".vcluster").mkdir(parents=True)
        (base / "home" / ".vcluster" / "images").symlink_to(images)
        (base / "conf").mkdir()
        yield {"HOME": str(base / "home"), "VCLUSTER_CONF": str(base / "conf"),
               "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
               "LANG": "C.UTF-8"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def alloc_once(env: dict[str, str], timeout: float) -> LocalRun:
    argv = [str(Path(sys.executable).parent / "vcluster"), "alloc", "-E", "true", "tiny:1"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    ready = stopping = booting = None
    own = None
    lines = []
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        now = time.monotonic()
        if "vm0: booting" in line and booting is None:
            booting = now - start
        if "ready in" in line and ready is None:
            ready = now - start
            own = float(line.split("ready in ")[1].split()[0])
        if "stopping the VMs" in line:
            stopping = now
        if now - start > timeout:
            proc.kill()
            break
    code = proc.wait()
    end = time.monotonic()
    if code != 0 or ready is None or stopping is None or booting is None:
        tail = "\n    ".join(lines[-15:])
        raise RuntimeError(f"vcluster alloc exited {code}:\n    {tail}")
    return LocalRun(booting, ready, own, end - stopping)


def _summary(label: str, samples: Sequence[float]) -> str:
    return (f"bench alloc: {label:<62} median {statistics.median(samples):6.2f} s "
            f"(min {min(samples):.2f}, max {max(samples):.2f}; {len(samples)} runs)")


def vcluster_qemu(env: dict[str, str], tmp: Path, timeout: float) -> tuple[list[str], str]:
    """The QEMU command line vcluster runs for tiny:1's vm0 (from one ``alloc -v``), made
    to run alone: its files in ``tmp`` (its seed copied there), a tap QEMU makes itself
    (as root) for the one the agent passed, no host forward for ssh; and the ready line's
    start."""
    import shlex

    from vcluster.vm.guest import TINY_READY

    work = "/var/lib/vcluster/work/$VCLUSTER_JOB_ID/vm0"
    argv = [str(Path(sys.executable).parent / "vcluster"), "-v", "alloc", "-E",
            f'cp {work}/seed.iso {tmp}/seed.iso && echo "WORK={work}"', "tiny:1"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    found = [line.split(" vm0: ", 1)[1] for line in done.stderr.splitlines()
             if " vm0: " in line and "process=qemu-vm0" in line]
    if done.returncode != 0 or not found or "WORK=" not in done.stdout:
        raise RuntimeError(f"vcluster -v alloc exited {done.returncode}: {done.stderr[-2000:]}")
    workdir = done.stdout.split("WORK=")[1].split()[0]
    qemu: list[str] = []
    for arg in shlex.split(found[0]):
        arg = arg.replace(workdir, str(tmp))
        if arg.startswith("tap,"):
            taps = sum(a.startswith("tap,") for a in qemu)
            arg = ",".join([p for p in arg.split(",") if not p.startswith("fd=")] +
                           [f"ifname=vcbench{taps}", "script=no", "downscript=no"])
        if arg.startswith("user,"):
            arg = ",".join(p for p in arg.split(",") if not p.startswith("hostfwd="))
        qemu.append(arg)
    return qemu, TINY_READY + "vm0"


def same_boot(argv: list[str], tmp: Path, marker: str, timeout: float) -> float:
    """(a): seconds from starting that QEMU to the ready line on its console."""
    from vcluster.run import spawn

    log = tmp / "console.log"
    log.unlink(missing_ok=True)
    start = time.monotonic()
    proc = spawn(argv)
    try:
        while time.monotonic() - start < timeout:
            if log.is_file() and marker in log.read_text(errors="replace"):
                return time.monotonic() - start
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"no {marker!r} after {timeout:g} s; see {log}")
    finally:
        proc.kill()
        proc.wait()


def bench_local(images: Path, runs: int, timeout: float) -> None:
    """Print the local backend's figures (see the module docstring)."""
    with embedded(images) as env, tempfile.TemporaryDirectory(prefix="vcluster-bare-") as tmp:
        argv, marker = vcluster_qemu(env, Path(tmp), timeout)
        bare: list[float] = []
        local: list[LocalRun] = []
        for i in range(runs):
            bare.append(same_boot(argv, Path(tmp), marker, timeout))
            local.append(alloc_once(env, timeout))
            print(f"local tiny:1: run {i + 1}/{runs}: the same QEMU alone {bare[-1]:.2f} s; "
                  f"alloc ready {local[-1].ready:.2f} s (booting at {local[-1].booting:.2f} s, "
                  f"own figure {local[-1].own} s), "
                  f"command exit -> alloc exit {local[-1].stopped:.2f} s", file=sys.stderr)
    ready = [r.ready for r in local]
    overhead = [r - b for r, b in zip(ready, bare, strict=True)]
    print("bench alloc: tiny:1 on the local backend (embedded default, root, no SLURM), next "
          "to the very QEMU command line vcluster runs, alone (its seed, its devices; a tap "
          "QEMU opens itself for the agent's)")
    print(_summary("(a) that qemu-system-x86_64 alone, to the guest's ready line", bare))
    print(_summary("(b) vcluster alloc -E true tiny:1 (local) to all-ready", ready))
    print(_summary("(b) - (a): the local backend's overhead, per run", overhead))
    print(_summary("of which: alloc start to vm0 booting (its QEMU started)",
                   [r.booting for r in local]))
    print(_summary("and: vm0 booting to all-ready, less (a)",
                   [r.ready - r.booting - b for r, b in zip(local, bare, strict=True)]))
    print(_summary("(c) -E command exit to vcluster alloc returned (local)",
                   [r.stopped for r in local]))
    verdict = "met" if statistics.median(overhead) <= TARGET else "NOT met"
    print(f"bench alloc: local overhead target <= {TARGET:g} s: {verdict} "
          f"(median {statistics.median(overhead):.2f} s)")
