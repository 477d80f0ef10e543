"""mypy --strict and ruff over the whole tree, and the module size limit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_module_over_600_lines() -> None:
    big = [f"{p.relative_to(ROOT)}: {n}" for p in sorted(ROOT.glob("**/*.py"))
           if "build" not in p.parts and (n := len(p.read_text().splitlines())) > 600]
    assert big == []


def test_shell_scripts_pass_shellcheck() -> None:
    """Guest scripts (tests/guest/, run by busybox sh or dash) and the SLURM scripts."""
    if shutil.which("shellcheck") is None:
        raise AssertionError("shellcheck is not installed (apt-get install shellcheck; "
                             ".ci/run installs it)")
    scripts = sorted(ROOT.glob("tests/guest/*.sh"))
    assert scripts, "no guest scripts found"
    guest = subprocess.run(["shellcheck", "--shell=sh", *map(str, scripts)], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert guest.returncode == 0, guest.stdout + guest.stderr
    slurm = subprocess.run(["shellcheck", "slurm/prolog", "slurm/epilog"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
