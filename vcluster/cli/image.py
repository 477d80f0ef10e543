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


@image.command("list")
@repo_option
def list_images(repo: Path | None) -> None:
    """List the images of a repository with their revisions."""
    from vcluster.images.repo import Repository

    repository = Repository(repo or default_repo())
    names = repository.names()
    if not names:
        click.echo(f"no images in {repository.root}", err=True)
        return
    click.echo(f"{'IMAGE':<24} {'KIND':<10} {'CREATED':<26} RECIPE")
    for name in names:
        for rev in repository.revisions(name):
            img = repository.get(name, rev)
            assert img is not None
            info = img.info
            click.echo(f"{img.ref:<24} {info.kind:<10} {info.created:<26} {info.recipe or '-'}")
