"""The local backend's part of bench/alloc.py: ``vcluster alloc -E true tiny:1`` on this
machine alone (the embedded default: no SLURM, no etcd, no /etc/vcluster), next to a bare
boot of the very QEMU command line vcluster runs for it (taken from one ``alloc -v``, its
seed copied, its files moved, its network a tap QEMU opens itself or a switch of the
bench's own), in the same run, alternating.  (b) - (a) is what vcluster adds: the CLI, the
store, the runner, the devices, the overlay and seed, readiness polling.  The target: at
most 0.3 s.

Both ways a local cluster runs are measured, each with its verdict: as root (the agent's
code makes taps on a bridge, in the launcher) and as a normal user (rootless: a
user-space switch; the user ``vcluster-bench``, made for the run and removed after it).  Each
runs with an empty HOME (but for a link to the test images) and an empty
``VCLUSTER_CONF``.  Run as root.
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


BENCH_USER = "vcluster-bench"


@dataclass(frozen=True)
class Mode:
    """Who runs the cluster: root, or a normal user (rootless)."""

    label: str
    user: str | None = None  # None: root

    def argv(self, env: dict[str, str], *args: str) -> list[str]:
        """``vcluster ARGS`` as this mode's user, in exactly ``env`` (runuser would set
        HOME and the like of its own)."""
        vcluster = str(Path(sys.executable).parent / "vcluster")
        if not self.user:
            return [vcluster, *args]
        return ["runuser", "-u", self.user, "--", "env", "-i",
                *(f"{k}={v}" for k, v in env.items()), vcluster, *args]

    def work(self, env: dict[str, str]) -> str:
        """vm0's work directory, as the -E command sees it."""
        state = f"{env['HOME']}/.local/state/vcluster" if self.user else "/var/lib/vcluster"
        return f"{state}/work/$VCLUSTER_JOB_ID/vm0"


@contextlib.contextmanager
def embedded(images: Path, mode: Mode) -> Iterator[dict[str, str]]:
    """An empty HOME (its user repository: ``images``) and an empty VCLUSTER_CONF, the
    mode's user's."""
    base = Path(tempfile.mkdtemp(prefix="vcluster-bench-local-", dir="/tmp"))
    base.chmod(0o755)
    try:
        (base / "home" / ".vcluster").mkdir(parents=True)
        (base / "home" / ".vcluster" / "images").symlink_to(images)
        (base / "conf").mkdir()
        if mode.user:
            for path in (base / "home", base / "home" / ".vcluster", base / "conf"):
                shutil.chown(path, mode.user, mode.user)
        yield {"HOME": str(base / "home"), "VCLUSTER_CONF": str(base / "conf"),
               "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
               "LANG": "C.UTF-8"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def alloc_once(env: dict[str, str], mode: Mode, timeout: float) -> LocalRun:
    argv = mode.argv(env, "alloc", "-E", "true", "tiny:1")
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=env["HOME"])
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
        raise RuntimeError(f"vcluster alloc ({mode.label}) exited {code}:\n    {tail}")
    return LocalRun(booting, ready, own, end - stopping)


def _summary(label: str, samples: Sequence[float]) -> str:
    return (f"bench alloc: {label:<62} median {statistics.median(samples):6.2f} s "
            f"(min {min(samples):.2f}, max {max(samples):.2f}; {len(samples)} runs)")


def vcluster_qemu(env: dict[str, str], mode: Mode, tmp: Path,
                  timeout: float) -> tuple[list[str], str]:
    """The QEMU command line vcluster runs for tiny:1's vm0 (from one ``alloc -v``), made
    to run alone: its files in ``tmp`` (its seed copied there), a tap QEMU makes itself
    (as root) for the one the agent passed, the bench's switch (``tmp/switch``) for the
    launcher's, no host forward for ssh; and the ready line's start."""
    import shlex

    from vcluster.vm.guest import TINY_READY

    work = mode.work(env)
    argv = mode.argv(env, "-v", "alloc", "-E",
                     f'cp {work}/seed.iso {tmp}/seed.iso && echo "WORK={work}"', "tiny:1")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, cwd=env["HOME"])
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
        if arg.startswith("vde,"):
            arg = ",".join(p if not p.startswith("sock=") else f"sock={tmp}/switch"
                           for p in arg.split(","))
        if arg.startswith("user,"):
            arg = ",".join(p for p in arg.split(",") if not p.startswith("hostfwd="))
        qemu.append(arg)
    return qemu, TINY_READY + "vm0"


@contextlib.contextmanager
def bench_switch(tmp: Path) -> Iterator[None]:
    """A user-space switch at ``tmp/switch`` for the bare boots of the rootless mode."""
    proc = subprocess.Popen(["vde_switch", "-s", str(tmp / "switch")], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (tmp / "switch" / "ctl").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vde_switch made no socket")
            time.sleep(0.01)
        yield
    finally:
        proc.kill()
        proc.wait()


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


def measure(images: Path, mode: Mode, runs: int, timeout: float) -> list[tuple[float,
                                                                              LocalRun]]:
    """``runs`` pairs of (a) the bare boot and (b) the alloc, alternating."""
    with embedded(images, mode) as env, tempfile.TemporaryDirectory(prefix="vcluster-bare-",
                                                                      dir="/tmp") as name:
        tmp = Path(name)
        if mode.user:
            shutil.chown(tmp, mode.user, mode.user)
        argv, marker = vcluster_qemu(env, mode, tmp, timeout)
        pairs: list[tuple[float, LocalRun]] = []
        with bench_switch(tmp) if mode.user else contextlib.nullcontext():
            for i in range(runs):
                bare = same_boot(argv, tmp, marker, timeout)
                local = alloc_once(env, mode, timeout)
                pairs.append((bare, local))
                print(f"local tiny:1 ({mode.label}): run {i + 1}/{runs}: the same QEMU alone "
                      f"{bare:.2f} s; alloc ready {local.ready:.2f} s (booting at "
                      f"{local.booting:.2f} s, own figure {local.own} s), "
                      f"command exit -> alloc exit {local.stopped:.2f} s", file=sys.stderr)
    return pairs


def report(mode: Mode, pairs: Sequence[tuple[float, LocalRun]]) -> float:
    """Print the mode's figures; its median overhead."""
    bare = [b for b, _ in pairs]
    local = [r for _, r in pairs]
    ready = [r.ready for r in local]
    overhead = [r - b for r, b in zip(ready, bare, strict=True)]
    print(f"bench alloc: tiny:1 on the local backend ({mode.label}; embedded default, no "
          "SLURM), next to the very QEMU command line vcluster runs, alone (its seed, its "
          "devices; a tap QEMU opens itself, or a switch of the bench's)")
    print(_summary("(a) that qemu-system-x86_64 alone, to the guest's ready line", bare))
    print(_summary("(b) vcluster alloc -E true tiny:1 (local) to all-ready", ready))
    print(_summary("(b) - (a): the local backend's overhead, per run", overhead))
    print(_summary("of which: alloc start to vm0 booting (its QEMU started)",
                   [r.booting for r in local]))
    print(_summary("and: vm0 booting to all-ready, less (a)",
                   [r.ready - r.booting - b for r, b in zip(local, bare, strict=True)]))
    print(_summary("(c) -E command exit to vcluster alloc returned (local)",
                   [r.stopped for r in local]))
    return statistics.median(overhead)


def bench_local(images: Path, runs: int, timeout: float) -> None:
    """Print the local backend's figures, as root and rootless (see the module docstring)."""
    from tests.support_agent import unix_users

    modes = (Mode("root"), Mode(f"rootless, user {BENCH_USER}", BENCH_USER))
    with unix_users(BENCH_USER):
        medians = {mode.label: report(mode, measure(images, mode, runs, timeout))
                   for mode in modes}
    verdicts = [f"{label}: {'met' if median <= TARGET else 'NOT met'} (median {median:.2f} s)"
                for label, median in medians.items()]
    print(f"bench alloc: local overhead target <= {TARGET:g} s: {'; '.join(verdicts)}")
