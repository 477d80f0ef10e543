"""``vcluster image build``: decide whether a build is needed, run it, store the revision.

A build is identified by a content hash of the flattened recipe, its overlay
files, the resolved package versions and the builder's own code; when the
newest revision of the image has the same hash the build is skipped.  For an
initramfs the resolved packages include the listed packages' run-time
dependencies (``depends``), so a new dependency or version rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vcluster.errors import ImageError
from vcluster.images import depends, packages
from vcluster.images.context import BuildContext
from vcluster.images.progress import Progress
from vcluster.images.recipe import Recipe
from vcluster.images.repo import Image, ImageInfo, Repository, parse_ref
from vcluster.rootdirs import not_root_only
from vcluster.run import run

_BUILDER_SOURCES = ("build.py", "context.py", "depends.py", "disk.py", "initramfs.py",
                    "loader.py", "packages.py")


@dataclass(frozen=True)
class BuildResult:
    image: Image
    reused: bool


def _overlay_digest(h: hashlib._Hash, overlay: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(overlay):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            path = Path(dirpath) / name
            rel = path.relative_to(overlay).as_posix()
            st = path.lstat()
            h.update(f"{rel}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(path.read_bytes())
            h.update(b"\0")


@dataclass(frozen=True)
class PackageSet:
    """What a build installs: package -> version, and the dependencies it leaves out."""

    versions: dict[str, str]
    left_out: dict[str, str] = field(default_factory=dict)  # package -> who wanted it


def resolve_packages(recipe: Recipe) -> PackageSet:
    """The package versions the build will install, as this host's apt sees them.

    A disk lists the recipe's packages (debootstrap resolves the rest and
    records it in packages.txt); an initramfs gets the kernel image package
    first, then the recipe's packages with their run-time dependencies.
    """
    names = list(recipe.packages)
    if recipe.kind != "initramfs":
        return PackageSet(packages.versions(names))
    kernel, version = packages.kernel_package(recipe.kernel)
    resolution = depends.closure(names, recipe.exclude)
    return PackageSet({kernel: version, **packages.versions(resolution.packages)},
                      resolution.left_out)


def describe_packages(recipe: Recipe, resolved: PackageSet) -> str:
    """``3 packages listed, 12 with their dependencies; left out: adduser (for iperf3)``."""
    count = len(resolved.versions) - (1 if recipe.kind == "initramfs" else 0)
    text = f"{len(recipe.packages)} packages listed"
    if recipe.kind == "initramfs":
        text += f", {count} with their dependencies"
    if resolved.left_out:
        text += "; left out: " + ", ".join(f"{name} (for {by})"
                                            for name, by in resolved.left_out.items())
    return text


def content_hash(recipe: Recipe, resolved: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": recipe.settings(), "packages": resolved},
                        sort_keys=True).encode())
    for overlay in recipe.overlays:
        h.update(b"overlay\0")
        _overlay_digest(h, overlay)
    here = Path(__file__).resolve().parent
    for name in _BUILDER_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a build root, unmounting anything a failed step left mounted inside first."""
    for point in _mounts_below(path):
        run(["umount", "-l", point], check=False)
    if _mounts_below(path):
        raise ImageError(f"cannot unmount everything below {path}; remove it by hand")
    shutil.rmtree(path, ignore_errors=True)


def build_image(recipe: Recipe, repo: Repository, *, name: str | None = None,
                force: bool = False, progress: Progress | None = None) -> BuildResult:
    """Build ``recipe`` into ``repo`` as image ``name`` (default: the recipe's name)."""
    progress = progress or Progress()
    name = name or recipe.name
    parse_ref(name)
    if os.geteuid() != 0:
        raise ImageError("building images needs root (debootstrap, chroot, device nodes): "
                         f"run it as root, e.g. sudo vcluster image build {recipe.name}; "
                         "root's builds go to the site repository, where every user's "
                         "templates find them")
    why = not_root_only(repo.root)
    if why is not None:
        raise ImageError(f"--repo {repo.root}: {why}; root mounts and chroots in build roots "
                         "there, so it must be root's alone (build into a root-owned "
                         "repository, then copy the revision)")
    progress.step(f"recipe {recipe.name} ({recipe.kind}): resolving package versions")
    resolved = resolve_packages(recipe)
    progress.step(describe_packages(recipe, resolved))
    digest = content_hash(recipe, resolved.versions)
    latest = repo.get(name)
    if latest is not None and latest.info.content_hash == digest and not force:
        progress.step(f"{latest.ref} is up to date (same recipe and packages): reused")
        return BuildResult(latest, reused=True)
    from vcluster.images.disk import build_disk
    from vcluster.images.initramfs import build_initramfs

    cache = repo.root / ".cache"
    with repo.staging(name) as out:
        work = Path(out.parent / f".work-{out.name.lstrip('.')}")
        work.mkdir()
        try:
            ctx = BuildContext(recipe=recipe, out=out, work=work, cache=cache, progress=progress,
                               packages=resolved.versions)
            files = build_disk(ctx) if recipe.kind == "disk" else build_initramfs(ctx)
        finally:
            progress.step("removing the build root")
            _remove_tree(work)
        info = ImageInfo(
            name=name, kind=recipe.kind, files=files, recipe=recipe.name,
            content_hash=digest, parent=None, append=recipe.append,
            user=recipe.user,
            extra={"packages": resolved.versions, "left_out": resolved.left_out,
                   "recipe_files": [str(p) for p in recipe.files]},
        )
        image = repo.commit(out, info)
    progress.step(f"built {image.ref} in {image.path}")
    return BuildResult(image, reused=False)
