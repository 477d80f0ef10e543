"""``vcluster image``: build, list, show, import, export, copy, resize, delete, gc."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vcluster.config.paths import system_dir, user_dir

if TYPE_CHECKING:
    from vcluster.images.repo import Image, Repository


def default_repo() -> Path:
    """The user's repository; for root, the site's (``directories.images`` of batch.yaml,
    or of the embedded default when there is no configuration)."""
    if os.geteuid() == 0:
        from vcluster.config.loader import is_embedded, load_batch

        if is_embedded(system_dir()) or (system_dir() / "batch.yaml").is_file():
            return load_batch(system_dir()).directories.images
    return user_dir() / "images"


repo_option = click.option(
    "--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Image repository directory (default: ~/.vcluster/images; for root, "
         "directories.images of /etc/vcluster/batch.yaml).")


@click.group()
def image() -> None:
    """Build, list, show, import, export, copy, resize, delete VM images; gc repositories.

    Images are named [REPO:]NAME[@REVISION]: REPO is user (~/.vcluster/images)
    or site (directories.images of batch.yaml); without it the user's is
    looked in first. Every new revision appears whole or not at all.
    """


@image.command()
@click.argument("recipe")
@repo_option
@click.option("--name", help="Image name (default: the recipe's name).")
@click.option("--force", is_flag=True, help="Build even if the newest revision is up to date.")
def build(recipe: str, repo: Path | None, name: str | None, force: bool) -> None:
    """Build an image from RECIPE (a shipped recipe such as debian or tiny, or a YAML file).

    Needs root (debootstrap, chroot).  A build whose recipe and package
    versions did not change since the newest revision is reused.
    """
    from vcluster.images.build import build_image
    from vcluster.images.recipe import load_recipe
    from vcluster.images.repo import Repository

    result = build_image(load_recipe(recipe), Repository(repo or default_repo()), name=name,
                         force=force)
    click.echo(f"{result.image.ref} {result.image.path}")


def _repositories(named: str | None, repo: Path | None) -> list[tuple[str, Path]]:
    """The repositories to look in: ``-R user|site``, ``--repo DIR``, or both named ones."""
    from vcluster.cli.common import load_config
    from vcluster.cluster import named_repositories
    from vcluster.errors import InputError

    if repo is not None:
        return [("", repo)]
    repos = named_repositories(load_config())
    if named is None:
        return list(repos.items())
    if named not in repos:
        raise InputError(f"-R {named}: no such repository (expected one of: "
                         f"{', '.join(repos)})")
    return [(named, repos[named])]


def _size(path: Path | None) -> str:
    if path is None or not path.exists():
        return "-"
    n = float(path.stat().st_blocks * 512)
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


@image.command("list")
@click.option("-R", "--repository", "named", default=None, metavar="REPO",
              help="Only this repository: user or site (default: both).")
@repo_option
@click.argument("regex", required=False)
def list_images(named: str | None, repo: Path | None, regex: str | None) -> None:
    """List images and their revisions (those whose name matches REGEX, if given).

    REPO:NAME@REVISION, kind, size on disk, the revision it is a layer over,
    when it was made, and the recipe it was built from or who saved it.
    """
    import re

    from vcluster.cli.common import print_table
    from vcluster.errors import InputError
    from vcluster.images.repo import Repository

    try:
        pattern = re.compile(regex or "")
    except re.error as e:
        raise InputError(f"REGEX {regex!r}: {e}") from e
    rows = []
    for label, root in _repositories(named, repo):
        repository = Repository(root)
        for name in repository.names():
            if not pattern.search(name):
                continue
            for rev in repository.revisions(name):
                img = repository.get(name, rev)
                assert img is not None
                info = img.info
                origin = (f"recipe {info.recipe}" if info.recipe
                          else f"saved by {info.made_by}" if info.made_by else "-")
                ref = f"{label}:{img.ref}" if label else img.ref
                rows.append((ref, info.kind, _size(img.disk or img.initrd),
                             "-" if info.parent is None else f"@{info.parent}", info.created,
                             origin))
    if not rows:
        where = ", ".join(f"{label} ({root})" if label else str(root)
                          for label, root in _repositories(named, repo))
        click.echo(f"no images in {where}", err=True)
        return
    print_table(("IMAGE", "KIND", "SIZE", "PARENT", "CREATED", "ORIGIN"), rows)


@image.command("show")
@click.argument("ref", metavar="[REPO:]NAME[@REVISION]")
def show(ref: str) -> None:
    """Show every revision of an image (or one): files, sizes, parent, origin."""
    from vcluster.cli.common import load_config
    from vcluster.cluster import image_repositories
    from vcluster.errors import ImageError, InputError
    from vcluster.images.repo import Repository, parse_ref, resolve_image, split_repository

    repos = image_repositories(load_config())
    try:
        found = resolve_image(ref, repos)
    except ImageError as e:
        raise InputError(f"IMAGE {ref}: {e}") from e
    _, rest = split_repository(ref)
    _, revision = parse_ref(rest)
    repository = Repository(found.repo)
    revisions = [found.info.revision] if revision is not None else repository.revisions(
        found.info.name)
    for n, rev in enumerate(revisions):
        img = repository.get(found.info.name, rev)
        assert img is not None
        info = img.info
        if n:
            click.echo("")
        click.echo(f"{img.ref} in {img.repo}")
        click.echo(f"  kind:     {info.kind}")
        click.echo(f"  created:  {info.created}")
        click.echo(f"  parent:   {'-' if info.parent is None else f'{info.name}@{info.parent}'}")
        if info.recipe:
            click.echo(f"  recipe:   {info.recipe} (content {info.content_hash or '-'})")
        if info.made_by:
            click.echo(f"  saved by: {info.made_by}, from {info.source or '-'}")
        click.echo(f"  user:     {info.user}")
        for role in sorted(info.files):
            path = img.file(role)
            click.echo(f"  {role + ':':<9} {path} ({_size(path)})")


def _find(ref: str, what: str = "IMAGE") -> Image:
    """``[REPO:]NAME[@REVISION]`` in the user's repository, then the site's."""
    from vcluster.cli.common import load_config
    from vcluster.cluster import image_repositories
    from vcluster.errors import ImageError, InputError
    from vcluster.images.repo import resolve_image

    try:
        return resolve_image(ref, image_repositories(load_config()))
    except ImageError as e:
        raise InputError(f"{what} {ref}: {e}") from e


def _target(text: str, what: str) -> tuple[Repository, str]:
    """``[REPO:]NAME`` to make a revision in (REPO: user by default), writable by us."""
    from vcluster.cli.common import load_config, writable
    from vcluster.cluster import named_repositories
    from vcluster.errors import InputError
    from vcluster.images.repo import Repository, split_destination

    repo, name = split_destination(text, f"{what} {text}")
    root = named_repositories(load_config())[repo or "user"]
    if not writable(root):
        raise InputError(f"{what} {text}: you cannot write the {repo or 'user'} repository "
                         f"{root} (expected a repository of yours, such as user:{name})")
    return Repository(root), name


def _me() -> str:
    from vcluster.identity import user_name

    return user_name()


@image.command("import")
@click.option("-t", "--format", "fmt", default=None, metavar="FORMAT",
              help="The file's format (default: what qemu-img finds: qcow2, raw, vmdk, ...).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The kernel to boot it with (else the template says).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Its initrd.")
@click.option("--append", default="", help="Its kernel command line.")
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("name", metavar="[REPO:]NAME")
def import_image(fmt: str | None, kernel: Path | None, initrd: Path | None, append: str,
                 file: Path, name: str) -> None:
    """Import a disk FILE as a new revision of image NAME (compressed qcow2)."""
    from vcluster.images.manage import import_disk

    repo, image_name = _target(name, "NAME")
    made = import_disk(repo, image_name, file, fmt=fmt, kernel=kernel, initrd=initrd,
                       append=append, made_by=_me(), progress=sys.stderr.isatty())
    click.echo(f"{made.ref} {made.path}")


@image.command("export")
@click.option("-t", "--format", "fmt", default="qcow2", show_default=True, metavar="FORMAT",
              help="The file's format: qcow2, raw, vmdk, vdi, vhdx or qed.")
@click.argument("ref", metavar="IMAGE")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def export_image(fmt: str, ref: str, file: Path) -> None:
    """Write IMAGE's disk to FILE, flattened (no backing file)."""
    from vcluster.images.manage import export_disk

    export_disk(_find(ref), file, fmt, progress=sys.stderr.isatty())


@image.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="[REPO:]NAME")
def copy(src: str, dst: str) -> None:
    """Copy image SRC (a revision) as a standalone new revision of DST."""
    from vcluster.images.manage import copy_image

    repo, name = _target(dst, "DST")
    made = copy_image(_find(src, "SRC"), repo, name, made_by=_me(),
                      progress=sys.stderr.isatty())
    click.echo(f"{made.ref} {made.path}")


@image.command("resize")
@click.argument("ref", metavar="IMAGE")
@click.argument("size")
def resize(ref: str, size: str) -> None:
    """A new revision of IMAGE whose disk is SIZE (such as 20G): a layer over it.

    The guest's file system is grown at boot by cloud-init (growpart), not here.
    """
    from vcluster.errors import InputError
    from vcluster.images.manage import resize_image
    from vcluster.schema.fields import parse_size

    found = _find(ref)
    _target(f"{_repo_label(found)}:{found.info.name}", "IMAGE")  # must be ours to write
    parsed = parse_size(size)
    if parsed is None:
        raise InputError(f"SIZE {size!r}: not a size (expected such as 20G or 512M)")
    made = resize_image(found, parsed, made_by=_me())
    click.echo(f"{made.ref} {made.path}")


def _repo_label(found: Image) -> str:
    from vcluster.cli.common import load_config
    from vcluster.cluster import named_repositories

    return next((n for n, p in named_repositories(load_config()).items() if p == found.repo),
                "user")


@image.command("delete")
@click.argument("ref", metavar="IMAGE")
@click.pass_context
def delete(ctx: click.Context, ref: str) -> None:
    """Delete a revision (NAME@REVISION), or every revision of NAME, newest first.

    Refused for a revision another one is a layer over, or that a running VM
    of yours (or any QEMU of this host) uses, saying which.
    """
    from vcluster.errors import InputError
    from vcluster.images.manage import delete_revision
    from vcluster.images.repo import Repository, parse_ref, split_repository

    found = _find(ref)
    _target(f"{_repo_label(found)}:{found.info.name}", "IMAGE")
    _, revision = parse_ref(split_repository(ref)[1])
    repo = Repository(found.repo)
    revisions = [found.info.revision] if revision is not None else list(
        reversed(repo.revisions(found.info.name)))
    used = _running_vms(ctx)
    for rev in revisions:
        image_rev = repo.get(found.info.name, rev)
        if image_rev is None:
            raise InputError(f"IMAGE {ref}: revision {rev} went away")
        delete_revision(image_rev, lambda i: [who for disk, who in used
                                              if i.disk is not None and disk == i.disk])
        click.echo(f"deleted {image_rev.ref}")


def _running_vms(ctx: click.Context) -> list[tuple[Path, str]]:
    """(base disk, "vmN of job J") of your running clusters; none if the store is away."""
    import logging

    from vcluster.errors import VclusterError

    try:
        from vcluster.cli.clusters import read_clusters, with_store

        store, keys, user = with_store(ctx)
        return [(vm.boot.disk, f"{vm.name} of job {c.spec.job}")
                for c in read_clusters(store, keys, user) for vm in c.spec.plan.vms
                if vm.boot.disk is not None]
    except VclusterError as e:
        logging.getLogger("vcluster").warning("cannot see your running clusters: %s", e)
        return []


@image.command("gc")
@click.option("-R", "--repository", "named", default="user", show_default=True,
              metavar="REPO", help="The repository: user or site.")
@repo_option
def gc_command(named: str, repo: Path | None) -> None:
    """Remove what nothing references: what killed builds and saves staged, files no
    revision names, empty image directories."""
    from vcluster.images.manage import gc
    from vcluster.images.repo import Repository

    for label, root in _repositories(named, repo):
        removed = gc(Repository(root))
        for path in removed:
            click.echo(f"removed {path}")
        click.echo(f"{label or root}: {len(removed)} removed", err=True)
