"""What a build step needs (recipe, directories, progress) and the steps every kind shares."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vcluster.errors import CommandError, ImageError
from vcluster.images.progress import Progress
from vcluster.images.recipe import Recipe
from vcluster.run import run

CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


@dataclass(frozen=True)
class BuildContext:
    """One build: ``out`` receives the image files, ``work`` is scratch space.

    ``packages`` are the resolved package versions the content hash was made of
    (initramfs: the kernel image package first, then the recipe's packages and
    their dependencies).
    """

    recipe: Recipe
    out: Path
    work: Path
    cache: Path
    progress: Progress
    packages: dict[str, str] = field(default_factory=dict)


def copy_overlays(ctx: BuildContext, root: Path) -> None:
    """Copy each overlay directory over the new root, ancestors first."""
    for overlay in ctx.recipe.overlays:
        shutil.copytree(overlay, root, symlinks=True, dirs_exist_ok=True)
        count = sum(len(files) for _, _, files in os.walk(overlay))
        ctx.progress.step(f"overlay {overlay}: {count} files")


def run_postbuild(ctx: BuildContext, root: Path) -> None:
    """Run the recipe's postbuild commands inside the new root (chroot, /bin/sh -c)."""
    for i, command in enumerate(ctx.recipe.postbuild, 1):
        ctx.progress.step(f"postbuild {i}/{len(ctx.recipe.postbuild)}: {command}")
        try:
            run(["chroot", root, "/bin/sh", "-c", command], env=CHROOT_ENV)
        except CommandError as e:
            raise ImageError(f"recipe {ctx.recipe.name}: postbuild command {command!r} failed: "
                             f"{e}") from e
