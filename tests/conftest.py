"""Shared test helpers: running the real CLI, writing configuration trees."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "etc" / "vcluster"


def run_cli(*args: str, env: Mapping[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``vcluster`` entry point as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vcluster", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )


def write_tree(base: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return base


def require_root(why: str) -> None:
    """Skip a test that needs root when run by hand; in CI (CI=true) that is a failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run as root: {why}")
        pytest.skip(f"needs root: {why}")


@pytest.fixture
def conf(tmp_path: Path) -> dict[str, str]:
    """Environment pointing vcluster at empty system and user directories under tmp_path."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "home").mkdir()
    return {"VCLUSTER_CONF": str(tmp_path / "etc"), "VCLUSTER_HOME": str(tmp_path / "home")}
