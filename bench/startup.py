"""Median start-up time of ``vcluster --help`` next to a bare Python start.

Both are measured side by side in one run, so the difference is what
vcluster's own imports cost.  Target: under 150 ms on the machines we test on.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

RUNS = 21
TARGET_MS = 150.0


def median_ms(argv: list[str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    entry = shutil.which("vcluster")
    command = [entry, "--help"] if entry else [sys.executable, "-m", "vcluster", "--help"]
    baseline = median_ms([sys.executable, "-c", "pass"])
    help_ms = median_ms(command)
    verdict = "meets" if help_ms < TARGET_MS else "MISSES"
    print(f"bench startup: python -c pass        median {baseline:6.1f} ms ({RUNS} runs)")
    print(f"bench startup: vcluster --help        median {help_ms:6.1f} ms ({RUNS} runs)")
    print(f"bench startup: vcluster's own imports        {help_ms - baseline:6.1f} ms; "
          f"{verdict} the {TARGET_MS:.0f} ms target")


if __name__ == "__main__":
    main()
