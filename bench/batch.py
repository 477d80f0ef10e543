"""Ten batch clusters submitted at once, next to ten plain sbatch jobs: submission to completion.

Needs root: it brings up a 3-host sandbox of its own in a new directory
under /var/tmp and always tears it down.  Each round, on the controller:

  (a) ten ``sbatch --wrap true`` jobs, submitted one after the other as fast
      as sbatch returns;
  (b) ten ``vcluster batch`` jobs of ``tiny:1 -c 1`` whose script is ``true``:
      each boots its VM, runs the script, stops the VM, and its epilog
      removes everything.

For every job: the time from the start of its submission to the moment it
has left SLURM's queue (squeue polled every 0.1 s; a job leaves once its
epilogs are done).  Printed per kind: the median and the maximum, the time
until the last job of the ten was gone, and (b)/(a) for each.  Every job
must end with exit code 0:0.

    python3 bench/batch.py [--rounds 1] [--images DIR]
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vcluster.sandbox.state import SandboxState

if __package__ in (None, ""):  # run as ``python3 bench/batch.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sandbox import fail, run_rounds

NAME = "bench/batch.py"
HOSTS = 3
JOBS = 10
TIMEOUT = 600.0
SCRIPT = "#!/bin/sh\n#VCLUSTER -c 1 tiny:1\ntrue\n"
SUBMITTED = re.compile(r"Submitted batch job (\d+)")


def on_controller(box: SandboxState, argv: Sequence[str], cwd: Path) -> str:
    """``argv`` on the sandbox's controller as root, in ``cwd``; its stdout."""
    from vcluster.run import run
    from vcluster.sandbox.use import command

    cmd = command(box, argv)
    done = run(cmd.argv, env=cmd.env, cwd=cwd, check=False, timeout=60)
    if done.returncode != 0:
        fail(NAME, f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return str(done.stdout)


def submit_all(box: SandboxState, argv: Sequence[str], cwd: Path) -> dict[str, float]:
    """Submit JOBS jobs with ``argv``: job id -> when its submission started."""
    started: dict[str, float] = {}
    for _ in range(JOBS):
        t = time.monotonic()
        out = on_controller(box, argv, cwd)
        match = SUBMITTED.search(out)
        if match is None:
            fail(NAME, f"no job id from {' '.join(argv)}: {out}")
        started[match.group(1)] = t
    return started


def wait_gone(box: SandboxState, started: dict[str, float], cwd: Path) -> dict[str, float]:
    """Poll squeue until every job has left the queue: job id -> seconds since submission."""
    taken: dict[str, float] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(taken) < len(started):
        if time.monotonic() > deadline:
            fail(NAME, f"jobs still queued after {TIMEOUT:g} s: "
                       f"{sorted(set(started) - set(taken))}")
        queued = set(on_controller(box, ["squeue", "--noheader", "--format=%i"], cwd).split())
        now = time.monotonic()
        for job, t in started.items():
            if job not in queued and job not in taken:
                taken[job] = now - t
        time.sleep(0.1)
    for job in started:
        shown = on_controller(box, ["scontrol", "show", "job", job], cwd)
        if "ExitCode=0:0" not in shown:
            output = (cwd / f"slurm-{job}.out")
            fail(NAME, f"job {job} did not succeed:\n{shown}\n"
                       f"{output.read_text() if output.exists() else ''}")
    return taken


def line(label: str, times: dict[str, float], first: float, last_gone: float) -> str:
    values = sorted(times.values())
    return (f"  {label:28} median {statistics.median(values):6.2f} s  max {values[-1]:6.2f} s  "
            f"all gone {last_gone - first:6.2f} s after the first submission")


def bench(box: SandboxState, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vcluster-bench-batch-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "job.sh").write_text(SCRIPT)
        print(f"{NAME}: {JOBS} jobs of each kind per round, 3 hosts, submission to completion")
        for r in range(1, rounds + 1):
            results = {}
            print(f"round {r}:")
            for label, argv in (("sbatch --wrap true", ["sbatch", "--wrap", "true"]),
                                ("vcluster batch tiny:1 true", ["vcluster", "batch", "job.sh"])):
                started = submit_all(box, argv, work)
                taken = wait_gone(box, started, work)
                first = min(started.values())
                gone = max(started[j] + taken[j] for j in taken)
                results[label] = (taken, first, gone)
                print(line(label, taken, first, gone), flush=True)
            (plain, p0, p1), (ours, v0, v1) = results.values()
            ratio = statistics.median(ours.values()) / statistics.median(plain.values())
            print(f"  vcluster batch / sbatch: median {ratio:.1f}x, all gone "
                  f"{(v1 - v0) / (p1 - p0):.1f}x")


def main() -> None:
    run_rounds(NAME, __doc__, HOSTS, 1, bench)


if __name__ == "__main__":
    main()
