"""Image recipes (parsing, inheritance, bad input), the image repository, build reuse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_tree
from tests.support_images import images_dir, require_image
from vcluster.errors import ConfigError, ImageError, InputError
from vcluster.images.build import build_image, content_hash
from vcluster.images.progress import Progress
from vcluster.images.recipe import load_recipe, shipped_names
from vcluster.images.repo import ImageInfo, Repository, parse_ref, resolve_image

# -- recipes ------------------------------------------------------------------


def test_shipped_recipes_parse() -> None:
    assert {"debian", "tiny"} <= set(shipped_names())
    debian = load_recipe("debian")
    assert debian.kind == "disk" and debian.suite == "bookworm" and debian.size == 2 << 30
    for package in ("cloud-init", "python3-cffi-backend", "qemu-guest-agent", "openssh-server",
                    "linux-image-cloud-amd64"):
        assert package in debian.packages
    assert "root=/dev/vda" in debian.append
    assert any("apt-daily.timer" in command for command in debian.postbuild)
    cfg = debian.overlays[0] / "etc/cloud/cloud.cfg.d/90-vcluster.cfg"
    assert "NoCloud" in cfg.read_text()
    tiny = load_recipe("tiny")
    assert tiny.kind == "initramfs" and tiny.packages == ("busybox-static",)
    assert {"virtio_net", "virtio_blk", "iso9660", "vxlan"} <= set(tiny.modules)
    assert os.access(tiny.overlays[0] / "init", os.X_OK)
    assert os.access(tiny.overlays[0] / "bin" / "fam", os.X_OK)


def test_inheritance_merges_lists_and_overrides_scalars(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "base.yaml": "kind: disk\nsize: 1G\npackages: [a, b]\noverlay: base-files\n"
                     "postbuild: [echo base]\nappend: root=/dev/vda\n",
        "base-files/etc/motd": "base\n",
        "mid.yaml": "parents: base\npackages: [b, c]\npostbuild: [echo mid]\n",
        "top.yaml": "parents: [mid.yaml, debian]\nsize: 3G\noverlay: top-files\n"
                    "packages: [d]\npostbuild: [echo top]\ndescription: mine\n",
        "top-files/etc/motd": "top\n",
    })
    recipe = load_recipe(str(tmp_path / "top.yaml"))
    assert recipe.name == "top" and recipe.kind == "disk" and recipe.size == 3 << 30
    assert recipe.description == "mine"
    debian = load_recipe("debian")
    assert recipe.packages[:3] == ("a", "b", "c")
    assert recipe.packages[-1] == "d" and set(debian.packages) < set(recipe.packages)
    assert recipe.postbuild[:2] == ("echo base", "echo mid")
    assert recipe.postbuild[-1] == "echo top"
    assert recipe.overlays[0] == tmp_path / "base-files"
    assert recipe.overlays[-1] == tmp_path / "top-files"
    # the nearest recipe setting append wins: debian (listed after mid) sets it
    assert recipe.append == debian.append
    assert [p.name for p in recipe.files] == ["base.yaml", "mid.yaml", "debian.yaml", "top.yaml"]


def error_of(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    (tmp_path / name).write_text(text)
    with pytest.raises((ConfigError, ImageError)) as info:
        load_recipe(str(tmp_path / name))
    return str(info.value)


@pytest.mark.parametrize("text, line, expected", [
    ("kind: disk\npackagez: [a]\n", 2, "packagez: unknown key; did you mean 'packages'?"),
    ("kind: floppy\n", 1, "kind: 'floppy' is not allowed (expected one of: disk, initramfs)"),
    ("kind: disk\nsize: lots\n", 2, "size: 'lots' is not a size"),
    ("kind: disk\npackages: {a: 1}\n", 2, "packages: a mapping is not a list"),
    ("kind: disk\npackages: ['']\n", 2, "packages: an empty item"),
    ("kind: disk\noverlay: nowhere\n", 2, "overlay:"),
    ("kind: disk\nmirror: ftp.example\n", 2, "mirror: 'ftp.example' is not a URL"),
    ("kind: disk\npostbuild: [[a, b]]\n", 2, "postbuild: a list is not a string"),
    ("- a list\n", 1, "is not a mapping"),
    ("packages: [a]\n", 1, "kind: missing (and no parent sets it)"),
    ("kind: disk\nkind: disk\n", 2, "duplicate key"),
])
def test_bad_recipes_name_file_line_key(tmp_path: Path, text: str, line: int,
                                        expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'r.yaml'}:{line}: ")
    assert expected in message


def test_empty_recipe(tmp_path: Path) -> None:
    assert "the recipe is empty" in error_of(tmp_path, "")


def test_missing_parent_names_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "kind: disk\nparents: [nosuch]\n")
    assert message.startswith(f"{tmp_path / 'r.yaml'}:2: parents: recipe 'nosuch' not found")
    assert "debian" in message and "tiny" in message


def test_parent_cycle(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a.yaml": "parents: [b]\nkind: disk\n", "b.yaml": "parents: [a]\n"})
    with pytest.raises(ImageError, match="cycle"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_unknown_recipe_lists_shipped_ones() -> None:
    with pytest.raises(ImageError, match=r"recipe 'nosuch' not found .*shipped recipes: debian"):
        load_recipe("nosuch")
    with pytest.raises(ImageError, match="no such file"):
        load_recipe("/nonexistent/r.yaml")


def test_content_hash_follows_recipe_overlay_and_packages(tmp_path: Path) -> None:
    write_tree(tmp_path, {"r.yaml": "kind: initramfs\noverlay: files\n", "files/init": "a\n"})
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    first = content_hash(recipe, {"busybox-static": "1"})
    assert first == content_hash(recipe, {"busybox-static": "1"})
    assert first != content_hash(recipe, {"busybox-static": "2"})
    (tmp_path / "files" / "init").write_text("b\n")
    assert first != content_hash(recipe, {"busybox-static": "1"})
    (tmp_path / "r.yaml").write_text("kind: initramfs\noverlay: files\npostbuild: ['true']\n")
    assert content_hash(load_recipe(str(tmp_path / "r.yaml")), {"busybox-static": "1"}) != first


# -- repository -----------------------------------------------------------------


def stage(repo: Repository, name: str, content: bytes = b"k") -> Path:
    with repo.staging(name) as out:
        (out / "vmlinuz").write_bytes(content)
        (out / "initramfs.img").write_bytes(content)
        repo.commit(out, ImageInfo(name=name, kind="initramfs", recipe="tiny",
                                   files={"kernel": "vmlinuz", "initramfs": "initramfs.img"},
                                   content_hash="h", append="console=ttyS0"))
    return repo.root / name


def test_commit_numbers_revisions_and_round_trips(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    stage(repo, "t", b"0")
    stage(repo, "t", b"1")
    assert repo.names() == ["t"] and repo.revisions("t") == [0, 1]
    image = repo.get("t")
    assert image is not None and image.ref == "t@1"
    assert image.kernel == tmp_path / "repo/t/1/vmlinuz" and image.disk is None
    assert image.initrd is not None and image.initrd.read_bytes() == b"1"
    info = json.loads((image.path / "image.json").read_text())
    assert info["revision"] == 1 and info["kind"] == "initramfs" and info["created"]
    assert ImageInfo.from_json(image.info.to_json(), image.path) == image.info
    # nothing but revisions: the staging directory is gone
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["t"]


def test_failed_staging_leaves_nothing(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    with pytest.raises(RuntimeError), repo.staging("t") as out:
        (out / "vmlinuz").write_bytes(b"x")
        raise RuntimeError("build failed")
    assert list((tmp_path / "repo").iterdir()) == []
    with pytest.raises(ImageError, match=r"initramfs\.img is missing"), repo.staging("t") as out:
        repo.commit(out, ImageInfo(name="t", kind="initramfs",
                                   files={"initramfs": "initramfs.img"}))
    assert repo.names() == []


def test_resolve_searches_repositories_in_order(tmp_path: Path) -> None:
    user, site = Repository(tmp_path / "user"), Repository(tmp_path / "site")
    stage(site, "tiny")
    stage(site, "tiny")
    stage(user, "tiny")
    stage(site, "debianish")
    repos = [user.root, site.root]
    assert resolve_image("tiny", repos).path == user.root / "tiny" / "0"
    assert resolve_image("tiny@1", repos).path == site.root / "tiny" / "1"
    assert resolve_image("debianish", repos).repo == site.root
    with pytest.raises(ImageError) as info:
        resolve_image("nosuch", repos)
    message = str(info.value)
    assert str(user.root) in message and str(site.root) in message
    assert "images there: debianish, tiny" in message
    with pytest.raises(ImageError, match=r"no revision 7 .*revisions: 0, 1"):
        resolve_image("tiny@7", repos)


@pytest.mark.parametrize("ref", ["", "a@x", "../x", ".hidden", "a@"])
def test_bad_references(ref: str) -> None:
    with pytest.raises(InputError, match="image reference"):
        parse_ref(ref)


def test_bad_image_json(tmp_path: Path) -> None:
    (tmp_path / "t" / "0").mkdir(parents=True)
    (tmp_path / "t" / "0" / "image.json").write_text('{"format": 99}')
    with pytest.raises(ImageError, match="not a valid image description"):
        Repository(tmp_path).get("t")


# -- command line ------------------------------------------------------------------


@pytest.mark.parametrize("args", [["image", "--help"], ["image", "build", "--help"],
                                  ["image", "list", "--help"]])
def test_image_help(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_image_build_bad_recipe_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("kind: disk\nsize: huge\n")
    proc = run_cli("image", "build", str(tmp_path / "r.yaml"), "--repo", str(tmp_path / "repo"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vcluster: error: {tmp_path / 'r.yaml'}:2: size: 'huge' is not a size "
        "(expected a size such as 512M or 2G)"]


def test_image_list(tmp_path: Path) -> None:
    stage(Repository(tmp_path), "tiny")
    proc = run_cli("image", "list", "--repo", str(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[1].split()[:2] == ["tiny@0", "initramfs"]
    empty = run_cli("image", "list", "--repo", str(tmp_path / "none"))
    assert empty.returncode == 0 and "no images" in empty.stderr


def test_build_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="building images needs root"):
        build_image(load_recipe("tiny"), Repository(tmp_path), progress=Progress(quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_a_repository_a_user_controls(tmp_path: Path) -> None:
    # Root mounts /proc and chroots inside the repository: a user's directory is a way in.
    from tests.conftest import require_root

    require_root("the check is root's")
    repo = tmp_path / "repo"
    repo.mkdir()
    os.chown(repo, 65534, 65534)
    with pytest.raises(ImageError) as e:
        build_image(load_recipe("tiny"), Repository(repo), progress=Progress(quiet=True))
    assert str(e.value).startswith(f"--repo {repo}: {repo} belongs to uid 65534 or others may "
                                   "write to it; root mounts and chroots")
    assert list(repo.iterdir()) == []


# -- real builds (root, the package cache of the test images: no network) -------------


def repo_with_cache(tmp_path: Path) -> Repository:
    from tests.conftest import require_root

    require_root("image builds use debootstrap and chroot")
    require_image("tiny")
    cache = images_dir() / ".cache"
    if not (cache / "debs").is_dir():
        pytest.fail(f"{cache}/debs is missing: build the tiny image with --repo {images_dir()}")
    repo = Repository(tmp_path / "repo")
    repo.root.mkdir()
    (repo.root / ".cache").symlink_to(cache)
    return repo


@pytest.mark.images
def test_unchanged_build_is_reused(tmp_path: Path) -> None:
    repo = repo_with_cache(tmp_path)
    built = require_image("tiny")
    shutil.copytree(built.path, repo.root / "tiny" / "3")
    result = build_image(load_recipe("tiny"), repo, progress=Progress(quiet=True))
    assert result.reused and result.image.ref == "tiny@3"
    assert repo.revisions("tiny") == [3]


@pytest.mark.images
def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    repo = repo_with_cache(tmp_path)
    (tmp_path / "r.yaml").write_text("parents: [tiny]\npostbuild: ['echo $((6*7)); false']\n")
    with pytest.raises(ImageError, match=r"postbuild command .* failed"):
        build_image(load_recipe(str(tmp_path / "r.yaml")), repo, progress=Progress(quiet=True))
    assert sorted(p.name for p in repo.root.iterdir()) == [".cache"]
