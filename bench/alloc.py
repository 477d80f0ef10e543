"""Time from ``vcluster alloc`` to all-ready, next to bare QEMU boots of tiny: tiny:1 on one
host, and tiny:3 spread over three hosts (one VM each, joined by the private network).

Needs root: it brings up a sandbox of its own (1 host, then 3) in a new directory
under /var/tmp and always tears it down.  Each run measures, side by side:

  (a) a bare ``qemu-system-x86_64`` boot of the tiny image to its ready line, with
      the accelerator, machine, CPU model, memory and vCPUs of vcluster's plan for
      tiny:1 (the same seed kind too, no NIC, no QMP);
  (b) ``vcluster alloc -c 1 -E true tiny:1`` on the sandbox's controller, from its
      start to its "N VM ready" line on stderr; (b) - (a) is vcluster's overhead
      (salloc, prolog, agent, overlay, seed, srun, store, readiness); for tiny:3,
      (a) is three bare boots at once, to the last one's ready line, and (b) is
      ``vcluster alloc -N3 -c 1 -E true tiny:3`` (VXLAN tunnels included);
  (c) from the exit of the -E command (alloc's "stopping the VMs" line) to the
      moment nothing of the job is left on any of its hosts: no QEMU of the job, no bridge or tap
      of the job, no run/jobs/JOB, state/jobs/JOB (undo log) or state/work/JOB,
      and the epilog's line logged (the agent's release, store keys included, is
      done when the epilog logs it).  Polled every 50 ms.

Then (first, in fact) the local backend: tiny:1 on this machine alone, no SLURM, next to
the same bare boot (bench/localalloc.py).

    python3 bench/alloc.py [--runs 5] [--spread-runs 3] [--local-runs 5] [--images DIR]
                           [--timeout 60]
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # vcluster is imported once main() has checked that it can run
    from vcluster.qemu import VmSpec
    from vcluster.sandbox.state import SandboxState

if __package__ in (None, ""):  # run as ``python3 bench/alloc.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



@dataclass(frozen=True)
class Scenario:
    """One cluster shape to time: its sandbox's hosts and alloc's arguments."""

    hosts: int
    definition: str
    options: tuple[str, ...]

    @property
    def vms(self) -> int:
        return int(self.definition.rpartition(":")[2] or 1)

    @property
    def alloc(self) -> list[str]:
        return ["vcluster", "alloc", *self.options, "-c", "1", "-E", "true", self.definition]

    @property
    def host_names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]


ONE_HOST = Scenario(hosts=1, definition="tiny:1", options=())
SPREAD = Scenario(hosts=3, definition="tiny:3", options=("-N3",))
POLL = 0.05
STOP_WAIT = 30.0  # seconds alloc gets to stop its VMs when the bench gives up on it

_JOB = re.compile(r"^vcluster: job (\d+): starting")
_BOOTING = re.compile(r"^vcluster: vm\d+: booting")
_READY = re.compile(r"^vcluster: job \d+: \d+ VMs? ready in ([0-9.]+) s")
_STOPPING = re.compile(r"^vcluster: job \d+: stopping the VMs")
_GRANTED = re.compile(r"^salloc: Granted job allocation")


class BenchError(Exception):
    """A run went wrong; the message says what and shows alloc's last lines if any."""


def fail(message: str) -> NoReturn:
    raise SystemExit(f"bench/alloc.py: {message}")


# -- the sandbox --------------------------------------------------------------------


def vcluster(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    from vcluster.run import run

    argv = [sys.executable, "-m", "vcluster", *args]
    return run(argv, check=False, timeout=timeout)


@contextmanager
def sandbox(images: Path, hosts: int) -> Iterator[SandboxState]:
    """A sandbox of ``hosts`` hosts in a new directory, torn down (and removed) at the end."""
    from vcluster.sandbox.state import require

    parent = Path(tempfile.mkdtemp(prefix="vcluster-bench-", dir="/var/tmp"))
    directory = parent / "sb"
    try:
        parent.chmod(0o755)  # munged and the job's users need to reach into it
        up = vcluster("sandbox", "up", "--hosts", str(hosts), "--images", str(images),
                      "--dir", str(directory))
        if up.returncode != 0:
            raise BenchError(f"vcluster sandbox up failed:\n{up.stdout}{up.stderr}")
        yield require(directory)
    finally:
        down = vcluster("sandbox", "down", "--dir", str(directory))
        shutil.rmtree(parent, ignore_errors=True)
        if down.returncode != 0:
            print(f"bench/alloc.py: vcluster sandbox down --dir {directory} failed:\n"
                  f"{down.stdout}{down.stderr}", file=sys.stderr)


# -- (a) the bare boot ------------------------------------------------------------------


def bare_spec(box: SandboxState, definition: str) -> VmSpec:
    """tiny booted the way vcluster's plan for tiny:1 boots it, minus vcluster (no seed yet)."""
    from vcluster.cluster import plan_cluster
    from vcluster.config.loader import load_config
    from vcluster.qemu import VmSpec, default_cpu
    from vcluster.vm.accel import choose_accel

    # The controller's configuration, as alloc (run there as root) reads it.
    plan = plan_cluster(load_config(Path(box.host(None).conf)), definition, cpus_per_task=1)
    vm = plan.vms[0]
    accel = choose_accel(plan.accel, binary=plan.qemu_binary, kernel=vm.boot.kernel).name
    return VmSpec(name="bare", accel=accel, binary=plan.qemu_binary, machine=vm.machine,
                  cpu=vm.cpu_model or default_cpu(accel), memory=vm.memory, cpus=vm.vcpus,
                  kernel=vm.boot.kernel, initrd=vm.boot.initrd, append=vm.boot.append)


def bare_boot(spec: VmSpec, workdir: Path, index: int, timeout: float, count: int = 1) -> float:
    """(a): seconds from starting ``count`` QEMUs at once to the last one's ready line."""
    from bench.boot_tiny import bench_seed, boot_to_ready

    times: list[float] = []
    errors: list[BaseException] = []

    def one(n: int) -> None:
        name = f"bare{index}-{n}"
        try:
            times.append(boot_to_ready(replace(spec, name=name, seed=bench_seed(workdir, n),
                                               serial_log=workdir / f"{name}.log"), timeout))
        except BaseException as e:  # re-raised below, in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(times)


# -- (c) what a job leaves on a host ------------------------------------------------------


class JobTraces:
    """Lists what is left of one job on one sandbox host (kept open while polling)."""

    def __init__(self, box: SandboxState, host: str, job: str) -> None:
        from pyroute2 import IPRoute

        from vcluster.agent.netdev import job_prefixes
        from vcluster.config.loader import load_config

        dirs = load_config(Path(box.host(host).conf)).batch.directories
        self.job = job
        self.host = host
        self.prefixes = job_prefixes(job)
        self.workdir = dirs.layout.work_dir(job)
        self.paths = list(dirs.layout.job_paths(job))
        self.root = Path(box.dir)
        self.script_log = self.root / "log" / "prolog-epilog.log"
        self.ipr: Any = IPRoute(netns=box.host(host).netns, flags=0)

    def close(self) -> None:
        self.ipr.close()

    def epilog(self) -> str | None:
        """The agent= result the epilog logged for the job on the host, None before it ran."""
        try:
            lines = self.script_log.read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            if f" epilog job={self.job} node={self.host} " in line:
                return line.split(" agent=", 1)[-1]
        return None

    def qemu_pids(self) -> list[int]:
        """QEMU processes whose command line names a file in the job's work directory."""
        marker = f"{self.workdir}/".encode()
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if (os.path.basename(argv[0]).startswith(b"qemu-system")
                    and any(marker in arg for arg in argv)):
                pids.append(int(entry.name))
        return pids

    def left(self, *, epilog: bool = True) -> list[str]:
        """What remains, one short description per thing; empty when all is gone."""
        out = [f"qemu pid {pid}" for pid in self.qemu_pids()]
        out += [f"link {name}" for link in self.ipr.get_links()
                if (name := link.get_attr("IFLA_IFNAME")).startswith(self.prefixes)]
        out += [os.path.relpath(path, self.root) for path in self.paths if os.path.lexists(path)]
        if epilog and self.epilog() is None:
            out.append("epilog not logged yet")
        return out


class ClusterTraces:
    """What is left of one job on each of its hosts."""

    def __init__(self, box: SandboxState, hosts: Sequence[str], job: str) -> None:
        self.each = [JobTraces(box, host, job) for host in hosts]

    def close(self) -> None:
        for traces in self.each:
            traces.close()

    def epilog(self) -> str | None:
        """"ok" once every host's epilog released the job; None while one has not run."""
        said = [t.epilog() for t in self.each]
        if any(s is None for s in said):
            return None
        bad = [f"{t.host}: {s}" for t, s in zip(self.each, said, strict=True) if s != "ok"]
        return "; ".join(bad) or "ok"

    def left(self, *, epilog: bool = True) -> list[str]:
        out = [f"{t.host}: {thing}" for t in self.each for thing in t.left(epilog=False)]
        if epilog and self.epilog() is None:
            out.append("epilog not logged yet on every host")
        return out


# -- (b) and (c): one vcluster alloc ---------------------------------------------------


@dataclass
class AllocRun:
    """When each milestone of one ``vcluster alloc`` was seen (monotonic seconds)."""

    start: float
    lines: list[str] = field(default_factory=list)
    job: str | None = None
    granted: float | None = None
    booting: float | None = None
    ready: float | None = None
    own_ready: float | None = None  # alloc's own "ready in X s"
    stopping: float | None = None  # the -E command exited
    exited: float | None = None
    gone: float | None = None
    seen_at_ready: list[str] = field(default_factory=list)
    epilog: str | None = None

    def note(self, when: float, line: str) -> None:
        self.lines.append(line)
        if (m := _JOB.match(line)) and self.job is None:
            self.job = m.group(1)
        elif _GRANTED.match(line):
            self.granted = when
        elif _BOOTING.match(line) and self.booting is None:
            self.booting = when
        elif m := _READY.match(line):
            self.ready, self.own_ready = when, float(m.group(1))
        elif _STOPPING.match(line):
            self.stopping = when

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    {line}" for line in self.lines[-n:]) or "    (nothing)"


def _read_lines(stream: IO[bytes], out: queue.Queue[tuple[float, str] | None]) -> None:
    for raw in stream:
        out.put((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
    out.put(None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop an alloc we gave up on, VMs first, then make sure it is gone.

    alloc runs in a session of its own (``proc.pid`` is its process group): on
    SIGHUP, salloc passes the signal on to the launcher, which stops the VMs.
    """
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGHUP)
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def alloc_once(box: SandboxState, scenario: Scenario, timeout: float) -> AllocRun:
    """Run ``vcluster alloc`` and follow it until nothing of its job is left on its hosts."""
    from vcluster.run import spawn
    from vcluster.sandbox.use import command

    cmd = command(box, scenario.alloc)
    lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
    result = AllocRun(start=time.monotonic())
    proc = spawn(cmd.argv, env=cmd.env, cwd=cmd.cwd, stderr=subprocess.PIPE, new_session=True)
    assert proc.stderr is not None
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    traces: ClusterTraces | None = None
    try:
        deadline = result.start + timeout
        # Up to the -E command's exit: follow the lines as they come.
        while result.stopping is None:
            if time.monotonic() > deadline:
                raise BenchError(f"alloc not done after {timeout:g} s; its stderr:\n"
                                 f"{result.tail()}")
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                proc.wait()
                raise BenchError(f"alloc exited with status {proc.returncode} before its "
                                 f"command ran; its stderr:\n{result.tail()}")
            result.note(*item)
            if result.ready is not None and traces is None and result.job is not None:
                traces = ClusterTraces(box, scenario.host_names, result.job)
                result.seen_at_ready = traces.left(epilog=False)
        assert result.job is not None
        traces = traces or ClusterTraces(box, scenario.host_names, result.job)
        # From there: alloc's exit and the last resource gone, every POLL seconds.
        deadline = result.stopping + timeout
        while result.exited is None or result.gone is None:
            now = time.monotonic()
            if now > deadline:
                left = ", ".join(traces.left()) or "nothing"
                raise BenchError(f"job {result.job}: {timeout:g} s after its command exited, "
                                 f"alloc {'exited' if result.exited else 'runs'} and left: "
                                 f"{left}; alloc's stderr:\n{result.tail()}")
            if result.exited is None and proc.poll() is not None:
                result.exited = now
                if proc.returncode != 0:
                    raise BenchError(f"alloc exited with status {proc.returncode}; its "
                                     f"stderr:\n{result.tail()}")
            if result.gone is None and not traces.left():
                result.gone = now
            with suppress(queue.Empty):
                while (item := lines.get_nowait()) is not None:
                    result.note(*item)
            time.sleep(POLL)
        result.epilog = traces.epilog()
        return result
    finally:
        _stop(proc)
        if traces is not None:
            traces.close()


# -- report -------------------------------------------------------------------------


def summary(label: str, samples: Sequence[float]) -> str:
    runs = f"{len(samples)} run{'s' if len(samples) != 1 else ''}"
    return (f"bench alloc: {label:<62} median {statistics.median(samples):6.2f} s "
            f"(min {min(samples):.2f}, max {max(samples):.2f}; {runs})")


def since(later: float | None, earlier: float | None) -> float:
    assert later is not None and earlier is not None
    return later - earlier


def bench(box: SandboxState, scenario: Scenario, runs: int, timeout: float) -> None:
    spec = bare_spec(box, scenario.definition)
    bare: list[float] = []
    allocs: list[AllocRun] = []
    what = f"{scenario.definition} on {scenario.hosts} host{'s' if scenario.hosts > 1 else ''}"
    with tempfile.TemporaryDirectory(prefix="vcluster-bench-bare-") as tmp:
        for i in range(runs):
            bare.append(bare_boot(spec, Path(tmp), i, timeout, count=scenario.vms))
            one = alloc_once(box, scenario, timeout)
            allocs.append(one)
            print(f"{what}: run {i + 1}/{runs}: bare boot {bare[-1]:.2f} s; alloc job "
                  f"{one.job}: ready {since(one.ready, one.start):.2f} s (own figure "
                  f"{one.own_ready} s), command exit -> alloc exit "
                  f"{since(one.exited, one.stopping):.2f} s, -> all gone "
                  f"{since(one.gone, one.stopping):.2f} s (epilog: {one.epilog}; at ready: "
                  f"{', '.join(one.seen_at_ready) or 'NOTHING'})", file=sys.stderr)
    ready = [since(a.ready, a.start) for a in allocs]
    booted = [a for a in allocs if a.booting is not None]
    bare_what = "boot of tiny" if scenario.vms == 1 else f"boots of {scenario.vms} tiny at once"
    print(f"bench alloc: {what}, as root in a {scenario.hosts}-host sandbox; all with accel "
          f"{spec.accel}, machine {spec.machine}, cpu {spec.cpu}, {spec.memory >> 20} MiB, "
          f"{spec.cpus} vCPU")
    print(summary(f"(a) bare qemu-system-x86_64 {bare_what} to ready", bare))
    print(summary(f"(b) {' '.join(scenario.alloc[1:])} to all-ready", ready))
    print(summary("    within (b): alloc start to salloc's grant",
                  [since(a.granted, a.start) for a in allocs if a.granted is not None]))
    print(summary("    within (b): alloc start to the first VM booting",
                  [since(a.booting, a.start) for a in booted]))
    print(summary("    within (b): first VM booting to all-ready (compare with (a))",
                  [since(a.ready, a.booting) for a in booted]))
    print(summary("    alloc's own 'ready in' figure (starts after the grant)",
                  [a.own_ready for a in allocs if a.own_ready is not None]))
    print(summary("(b) - (a): vcluster's overhead, per run",
                  [r - b for r, b in zip(ready, bare, strict=True)]))
    print(summary("(c) -E command exit to vcluster alloc returned",
                  [since(a.exited, a.stopping) for a in allocs]))
    print(summary("(c) -E command exit to the job's last resource gone on its hosts",
                  [since(a.gone, a.stopping) for a in allocs]))
    bad = [f"job {a.job}: epilog agent={a.epilog}" for a in allocs if a.epilog != "ok"]
    empty = [f"job {a.job}" for a in allocs if not a.seen_at_ready]
    if bad:
        fail(f"the epilog's release failed: {'; '.join(bad)}")
    if empty:
        fail(f"nothing of {', '.join(empty)} was seen on its hosts at ready: (c) measured "
             "nothing")


MAIN_PID = os.getpid()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # pyroute2 forks a helper to open a socket in another namespace and may send
    # it SIGTERM: a forked copy must not unwind our stack (stop alloc, tear down).
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    for other in STOP_SIGNALS:  # a second Ctrl-C must not cut the teardown short
        signal.signal(other, signal.SIG_IGN)
    raise SystemExit(f"bench/alloc.py: stopped by {signal.Signals(signum).name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of tiny:1 on one host (default 5)")
    parser.add_argument("--spread-runs", type=int, default=3,
                        help="runs of tiny:3 over three hosts (default 3; 0: none)")
    parser.add_argument("--local-runs", type=int, default=5,
                        help="runs of tiny:1 on the local backend, no SLURM (default 5; 0: "
                             "none)")
    parser.add_argument("--images", type=Path, default=None,
                        help="the image repository holding tiny (default "
                             "$VCLUSTER_TEST_IMAGES or /var/cache/vcluster-test/images)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds each boot, alloc or cleanup may take (default 60)")
    args = parser.parse_args()
    if args.runs < 1:
        fail(f"--runs {args.runs}: expected at least 1")
    if os.geteuid() != 0:
        fail("needs root (it brings up a sandbox: namespaces, SLURM, etcd, agents)")
    try:
        from bench.boot_tiny import DEFAULT_IMAGES
        from vcluster.errors import VclusterError
        from vcluster.images.repo import resolve_image
    except ImportError as e:
        fail(f"cannot import vcluster with {sys.executable} ({e}); install it (pip install -e .)")
    images: Path = (args.images or DEFAULT_IMAGES).absolute()
    try:
        resolve_image("tiny", [images])
    except VclusterError as e:
        fail(f"the tiny image is missing: {e}")
    for signum in STOP_SIGNALS:
        signal.signal(signum, _terminate)
    try:
        if args.local_runs > 0:
            from bench.localalloc import bench_local

            bench_local(images, args.local_runs, args.timeout)
        with sandbox(images, ONE_HOST.hosts) as box:
            bench(box, ONE_HOST, args.runs, args.timeout)
        if args.spread_runs > 0:
            with sandbox(images, SPREAD.hosts) as box:
                bench(box, SPREAD, args.spread_runs, args.timeout)
    except (BenchError, VclusterError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
