"""``vcluster image``: build images from recipes and list image repositories."""

from __future__ import annotations

import os
from pathlib import Path

import click

from vcluster.config.paths import system_dir, user_dir


def default_repo() -> Path:
    """The user's repository; for root, the site's (``directories.images`` of batch.yaml)."""
    if os.geteuid() == 0:
        from vcluster.config.batch import parse_batch
        from vcluster.schema.source import load_yaml

        batch = system_dir() / "batch.yaml"
        if batch.is_file():
            return parse_batch(load_yaml(batch), batch).directories.images
    return user_dir() / "images"


repo_option = click.option(
    "--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Image repository directory (default: ~/.vcluster/images; for root, "
         "directories.images of /etc/vcluster/batch.yaml).")


@click.group()
def image() -> None:
    """Build and list VM images."""


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
