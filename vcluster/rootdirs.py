"""Directories root may work in: root's alone, so no user can swap what is inside.

Root writes scripts that slurmd runs (the sandbox), mounts /proc and chroots
into build roots (image builds).  If a user owned, or could write to, any
directory on the way, they could replace those files or plant a symbolic link
where root mounts.  Sticky directories such as /tmp and /var/tmp are fine
above the directory: others cannot rename or remove what root made there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def not_root_only(directory: Path) -> str | None:
    """Why ``directory`` (or an existing parent) is unsafe for root; None when it is safe."""
    for path in reversed([directory, *directory.parents]):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            return f"{path} is not a plain directory (a symbolic link or a file)"
        sticky = info.st_mode & stat.S_ISVTX
        if info.st_uid != 0 or (info.st_mode & 0o022 and not (sticky and path != directory)):
            return f"{path} belongs to uid {info.st_uid} or others may write to it"
    return None
