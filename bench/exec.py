"""Latency of ``vcluster exec`` on 1 and 3 VMs, next to ``vcluster ssh`` and a plain ``ssh``.

Needs root: it brings up a 3-host sandbox of its own under /var/tmp and always
tears it down.  One ``vcluster alloc -N3 -c 1 tiny:3`` cluster (one VM per
host); then, in alternating order within each round, from the login node:

  exec, 1 VM:   ``vcluster exec vm0 -- true``      (srun to vm0's host, guest agent)
  exec, 3 VMs:  ``vcluster exec --all -- true``    (one srun per host, in parallel)
  vcluster ssh: ``vcluster ssh vm0 true``          (the store, then OpenSSH)
  plain ssh:    ``ssh -F DIR/config vm0 true``     (OpenSSH alone, the files of
                                                    ``vcluster ssh-config DIR``)

Each figure is the wall time of the whole command (process start to exit),
median, min and max over the rounds; every command must print nothing and
exit 0.  The ratios to plain ssh are printed too.

    python3 bench/exec.py [--rounds 10] [--images DIR]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vcluster.sandbox.state import SandboxState

if __package__ in (None, ""):  # run as ``python3 bench/exec.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sandbox import cluster, fail, flag_directory, run_rounds

NAME = "bench/exec.py"
HOSTS = 3


def commands(job: str, config: Path) -> dict[str, list[str]]:
    return {
        "exec, 1 VM": ["vcluster", "exec", "-j", job, "vm0", "--", "true"],
        "exec, 3 VMs": ["vcluster", "exec", "-j", job, "--all", "--", "true"],
        "vcluster ssh vm0": ["vcluster", "ssh", "-j", job, "vm0", "true"],
        "plain ssh vm0": ["ssh", "-F", str(config), "vm0", "true"],
    }


def timed(box: SandboxState, argv: list[str]) -> float:
    """Seconds ``argv`` took on the controller; it must succeed and print nothing."""
    from vcluster.sandbox.use import command

    cmd = command(box, argv)
    start = time.perf_counter()
    proc = subprocess.run(cmd.argv, env=cmd.env, cwd=cmd.cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0 or proc.stdout.strip():
        fail(NAME, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return took


def bench(box: SandboxState, rounds: int) -> None:
    from vcluster.sandbox.use import command

    with flag_directory() as flags, \
         cluster(box, flags, ["-N3", "-c", "1", "tiny:3"], NAME) as job, \
         tempfile.TemporaryDirectory(prefix="vcluster-bench-ssh-") as tmp:
        config_dir = Path(tmp) / "ssh"
        made = command(box, ["vcluster", "ssh-config", "-j", job, str(config_dir)])
        subprocess.run(made.argv, env=made.env, cwd=made.cwd, check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)
        runs = commands(job, config_dir / "config")
        for argv in runs.values():  # a first run of each: caches, ARP, guest agent
            timed(box, argv)
        figures: dict[str, list[float]] = {label: [] for label in runs}
        labels = list(runs)
        for i in range(rounds):
            for label in labels if i % 2 == 0 else labels[::-1]:
                figures[label].append(timed(box, runs[label]))
        print(f"{NAME}: job {job}, tiny:3 over {HOSTS} hosts; {rounds} rounds, alternating "
              "order; wall time of the whole command")
        base = statistics.median(figures["plain ssh vm0"])
        for label, values in figures.items():
            median = statistics.median(values)
            print(f"{NAME}: {label:<17} median {median * 1000:7.0f} ms (min "
                  f"{min(values) * 1000:.0f}, max {max(values) * 1000:.0f}); "
                  f"{median / base:.2f} x plain ssh")


def main() -> None:
    run_rounds(NAME, __doc__, HOSTS, 10, bench)


if __name__ == "__main__":
    main()
