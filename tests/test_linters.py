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
    """Guest scripts (tests/guest/, run by busybox sh or dash), tiny's /init and the SLURM
    scripts."""
    if shutil.which("shellcheck") is None:
        raise AssertionError("shellcheck is not installed (apt-get install shellcheck; "
                             ".ci/run installs it)")
    scripts = sorted(ROOT.glob("tests/guest/*.sh"))
    assert scripts, "no guest scripts found"
    scripts.append(ROOT / "vcluster" / "images" / "recipes" / "tiny" / "init")
    guest = subprocess.run(["shellcheck", "--shell=sh", *map(str, scripts)], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert guest.returncode == 0, guest.stdout + guest.stderr
    slurm = subprocess.run(["shellcheck", "slurm/prolog", "slurm/epilog"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr


def test_no_untyped_dict_crosses_the_agent_boundary() -> None:
    """Requests and answers are dataclasses on both ends (agent/protocol.py): the modules
    that send, receive or answer requests hold no untyped dicts (netlink and nftables
    messages inside the agent's device and firewall code never reach the wire)."""
    agent = ROOT / "vcluster" / "agent"
    sides = [*(agent / f"{name}.py" for name in ("protocol", "client", "server", "service",
                                                  "jobs", "main")),
             ROOT / "vcluster" / "session.py"]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sides
             for n, line in enumerate(p.read_text().splitlines(), 1) if "dict[str, Any]" in line]
    assert found == []


def test_type_ignores_in_agent_and_store_say_why() -> None:
    """A ``# type: ignore[...]`` there carries a comment after it saying why."""
    unexplained = []
    for part in ("agent", "store"):
        for path in sorted((ROOT / "vcluster" / part).glob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "type: ignore" in line and "#" not in line.split("type: ignore", 1)[1]:
                    unexplained.append(f"{path.relative_to(ROOT)}:{n}")
    assert unexplained == []
