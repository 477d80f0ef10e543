"""Where configuration lives: the system directory, then the user's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SYSTEM_DIR = Path("/etc/vcluster")


def system_dir() -> Path:
    """``$VCLUSTER_CONF`` or /etc/vcluster."""
    env = os.environ.get("VCLUSTER_CONF")
    return Path(env) if env else SYSTEM_DIR


def user_dir() -> Path:
    """``$VCLUSTER_HOME`` or ~/.vcluster."""
    env = os.environ.get("VCLUSTER_HOME")
    return Path(env) if env else Path.home() / ".vcluster"


def sample_dir() -> Path:
    """The sample configuration shipped with vcluster (etc/vcluster in the source tree)."""
    source = Path(__file__).resolve().parents[2] / "etc" / "vcluster"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "vcluster" / "etc" / "vcluster"


def source_root() -> Path | None:
    """The source checkout vcluster runs from, if any (for slurm/ scripts and samples)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() else None
