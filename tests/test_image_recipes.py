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
    assert tiny.kind == "initramfs" and tiny.packages[:2] == ("busybox-static", "dash")
    assert {"iputils-ping", "iperf3"} <= set(tiny.packages) and "libcap2-bin" in tiny.exclude
    assert {"virtio_net", "virtio_blk", "iso9660", "vxlan"} <= set(tiny.modules)
    assert os.access(tiny.overlays[0] / "init", os.X_OK)
    assert os.access(tiny.overlays[0] / "bin" / "fam", os.X_OK)
    assert {"dropbear-bin", "openssh-sftp-server", "qemu-guest-agent"} <= set(tiny.packages)
    assert "openssh-client" in tiny.exclude


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


# -- run-time dependencies of an initramfs (a fake apt answer) -------------------------

# apt-cache depends --recurse ... iputils-ping iperf3, trimmed: alternatives ("|"),
# a virtual package with its providers, and a chain that only excluded packages need.
APT_DEPENDS = """\
iputils-ping
  Depends: libcap2-bin
  Depends: libc6
  Depends: libidn2-0
iperf3
  PreDepends: init-system-helpers
  Depends: adduser
  Depends: libc6
  Depends: libiperf0
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
libcap2-bin
  Depends: libc6
  Depends: libcap2
libc6
  Depends: libgcc-s1
libidn2-0
  Depends: libc6
  Depends: libunistring2
init-system-helpers
 |Depends: usrmerge
  Depends: usr-is-merged
    usrmerge
adduser
  Depends: passwd
libiperf0
  Depends: libc6
  Depends: libssl3
debconf
cdebconf
  Depends: libc6
  Depends: libnewt0.52
libcap2
  Depends: libc6
libgcc-s1
  Depends: gcc-12-base
  Depends: libc6
libunistring2
  Depends: libc6
usrmerge
  Depends: <perl:any>
    perl
usr-is-merged
passwd
  Depends: libpam0g
libssl3
  Depends: libc6
libnewt0.52
  Depends: libc6
gcc-12-base
perl
  PreDepends: dpkg
dpkg
libpam0g
  Depends: libc6
<perl:any>
<debconf-2.0>
"""


def test_parse_depends_reads_alternatives_and_providers() -> None:
    from vcluster.images.depends import Target, parse_depends

    graph = parse_depends(APT_DEPENDS)
    assert "<debconf-2.0>" not in graph and "perl:any" not in graph and "debconf-2.0" not in graph
    assert graph["iputils-ping"] == ((Target("libcap2-bin"),), (Target("libc6"),),
                                     (Target("libidn2-0"),))
    # "|Depends: debconf" or'ed with the next line, a virtual package and its providers
    assert graph["iperf3"][-1] == (Target("debconf"),
                                   Target("debconf-2.0", True, ("cdebconf", "debconf")))
    assert graph["init-system-helpers"] == ((Target("usrmerge"),
                                             Target("usr-is-merged", False, ("usrmerge",))),)
    assert graph["usrmerge"] == ((Target("perl", True, ("perl",)),),)  # <perl:any>
    assert graph["debconf"] == () and graph["gcc-12-base"] == ()


def test_resolve_follows_dependencies_and_leaves_out_excluded() -> None:
    from vcluster.images.depends import BUILTIN_EXCLUDE, parse_depends, resolve

    graph = parse_depends(APT_DEPENDS)
    result = resolve(["iputils-ping", "iperf3"], graph, {*BUILTIN_EXCLUDE, "libcap2-bin"})
    assert result.packages[:2] == ("iputils-ping", "iperf3")  # listed first
    assert set(result.packages) == {"iputils-ping", "iperf3", "libc6", "libidn2-0", "libiperf0",
                                    "libgcc-s1", "libunistring2", "libssl3", "gcc-12-base"}
    # what excluded packages alone needed does not come in: passwd, perl, dpkg, cdebconf, libcap2
    assert result.left_out == {"adduser": "iperf3", "debconf": "iperf3",
                               "init-system-helpers": "iperf3", "libcap2-bin": "iputils-ping"}
    # without exclusions: the first alternative, the dependencies of everything
    everything = resolve(["iputils-ping", "iperf3"], graph, ())
    assert {"debconf", "usrmerge", "perl", "dpkg", "passwd", "libpam0g", "libcap2"} <= set(
        everything.packages)
    assert "cdebconf" not in everything.packages and "usr-is-merged" not in everything.packages
    assert everything.left_out == {}


def test_resolve_prefers_what_is_chosen_and_listed_packages_always_go_in() -> None:
    from vcluster.images.depends import BUILTIN_EXCLUDE, parse_depends, resolve

    graph = parse_depends(APT_DEPENDS)
    # usr-is-merged listed: init-system-helpers' "usrmerge | usr-is-merged" takes it, no perl
    result = resolve(["usr-is-merged", "init-system-helpers"], graph, ())
    assert result.packages == ("usr-is-merged", "init-system-helpers")
    # a listed package is installed even when the built-in list names it; its own
    # dependencies follow the usual rules
    assert "dpkg" in BUILTIN_EXCLUDE
    assert resolve(["dpkg", "perl"], graph, BUILTIN_EXCLUDE).packages == ("dpkg", "perl")
    # "debconf | debconf-2.0" with debconf excluded: the whole dependency is dropped, no
    # other provider of debconf-2.0 comes in its place
    without = resolve(["iperf3"], graph, {"init-system-helpers", "adduser", "debconf"})
    assert "cdebconf" not in without.packages and without.left_out["debconf"] == "iperf3"
    # a virtual package alone: its first provider, as apt-cache lists them
    graph["x"] = parse_depends("x\n  Depends: <debconf-2.0>\n    cdebconf\n    debconf\n")["x"]
    assert resolve(["x"], graph, ()).packages == ("x", "cdebconf", "libc6", "libnewt0.52",
                                                  "libgcc-s1", "gcc-12-base")


def test_resolve_errors_name_the_package() -> None:
    from vcluster.images.depends import parse_depends, resolve

    graph = parse_depends("a\n  Depends: <nothing-provides-me>\n")
    with pytest.raises(ImageError, match=r"a depends on <nothing-provides-me>, which no package"):
        resolve(["a"], graph, ())
    with pytest.raises(ImageError, match=r"apt knows no package 'nosuch'"):
        resolve(["nosuch"], graph, ())


def test_closure_asks_apt_once_without_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from vcluster.images import depends

    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append([str(a) for a in argv])
        return subprocess.CompletedProcess(argv, 0, APT_DEPENDS, "")

    monkeypatch.setattr(depends, "run", fake_run)
    result = depends.closure(["iputils-ping", "iperf3", "iputils-ping"], ["libcap2-bin"])
    assert calls == [["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                      "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                      "iputils-ping", "iperf3"]]
    assert "libcap2-bin" in result.left_out and "libc6" in result.packages
    assert depends.closure([]).packages == () and len(calls) == 1


def test_initramfs_packages_and_hash_include_the_dependencies(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vcluster.images import build, depends, packages

    apt = {"text": APT_DEPENDS}
    monkeypatch.setattr(depends, "apt_graph", lambda names: depends.parse_depends(apt["text"]))
    monkeypatch.setattr(packages, "kernel_package", lambda meta: ("linux-image-6.1-cloud", "6"))
    monkeypatch.setattr(packages, "versions", lambda names: {name: "1" for name in names})
    write_tree(tmp_path, {"r.yaml": "kind: initramfs\npackages: [iputils-ping, iperf3]\n"
                                    "exclude: [libcap2-bin]\n"})
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    assert recipe.exclude == ("libcap2-bin",)
    resolved = build.resolve_packages(recipe)
    assert list(resolved.versions)[:3] == ["linux-image-6.1-cloud", "iputils-ping", "iperf3"]
    assert "libssl3" in resolved.versions and "debconf" not in resolved.versions
    assert resolved.left_out["libcap2-bin"] == "iputils-ping"
    assert build.describe_packages(recipe, resolved) == (
        "2 packages listed, 9 with their dependencies; left out: adduser (for iperf3), "
        "debconf (for iperf3), init-system-helpers (for iperf3), libcap2-bin (for iputils-ping)")
    first = content_hash(recipe, resolved.versions)
    # a new dependency of a listed package rebuilds the image
    apt["text"] = APT_DEPENDS.replace("libssl3\n  Depends: libc6\n",
                                      "libssl3\n  Depends: libc6\n  Depends: libzstd1\n"
                                      ) + "libzstd1\n"
    again = build.resolve_packages(recipe)
    assert "libzstd1" in again.versions and content_hash(recipe, again.versions) != first
    # and so does a change of the exclude list (it is part of the recipe's settings)
    (tmp_path / "r.yaml").write_text("kind: initramfs\npackages: [iputils-ping, iperf3]\n")
    assert content_hash(load_recipe(str(tmp_path / "r.yaml")), resolved.versions) != first


def test_disk_packages_are_not_resolved_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from vcluster.images import build, depends, packages

    def no_apt(names: list[str]) -> object:
        raise AssertionError("debootstrap resolves a disk's dependencies")

    monkeypatch.setattr(depends, "apt_graph", no_apt)
    monkeypatch.setattr(packages, "versions", lambda names: {name: "1" for name in names})
    resolved = build.resolve_packages(load_recipe("debian"))
    assert list(resolved.versions) == list(load_recipe("debian").packages)
    assert resolved.left_out == {}


@pytest.mark.parametrize("text, expected", [
    ("kind: initramfs\nexclude: [Perl]\n", "exclude: 'Perl' is not a Debian package name"),
    ("kind: initramfs\npackages: ['--option']\n", "packages: '--option' is not a Debian package"),
    ("kind: initramfs\nexclude: [perl, '']\n", "exclude: an empty item"),
])
def test_bad_package_names(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_exclude_lists_merge_from_parents(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a.yaml": "kind: initramfs\nexclude: [libcap2-bin]\n",
                          "b.yaml": "parents: [a.yaml, tiny]\nexclude: [libidn2-0, libcap2-bin]\n",
                          "disk.yaml": "parents: [a.yaml]\nkind: disk\n"})
    recipe = load_recipe(str(tmp_path / "b.yaml"))
    expected = tuple(dict.fromkeys(["libcap2-bin", *load_recipe("tiny").exclude, "libidn2-0"]))
    assert recipe.exclude == expected
    assert recipe.settings()["exclude"] == list(expected)
    with pytest.raises(ImageError, match=r"a\.yaml: exclude is for kind initramfs"):
        load_recipe(str(tmp_path / "disk.yaml"))


# -- the dynamic loader ----------------------------------------------------------------


def elf_header(*, interp: bytes | None, wide: bool = True) -> bytes:
    """A minimal little-endian ELF file: a header, one program header, the interpreter."""
    import struct

    if wide:
        head = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
            "<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1 if interp else 0, 64, 0, 0)
        ph = struct.pack("<IIQQQQQQ", 3, 4, 120, 0, 0, len(interp or b""),
                         len(interp or b""), 1) if interp else b""
    else:
        head = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(
            "<HHIIIIIHHHHHH", 2, 3, 1, 0, 52, 0, 0, 52, 32, 1 if interp else 0, 40, 0, 0)
        ph = struct.pack("<IIIIIIII", 3, 84, 0, 0, len(interp or b""), len(interp or b""), 4,
                         1) if interp else b""
    return head + ph + (interp or b"")


def test_interpreter_of_elf_files(tmp_path: Path) -> None:
    import sys

    from vcluster.images.loader import dynamic_programs, interpreter

    files = {
        "bin/dyn": elf_header(interp=b"/lib64/ld-linux-x86-64.so.2\0"),
        "bin/dyn32": elf_header(interp=b"/lib/ld-linux.so.2\0", wide=False),
        "bin/static": elf_header(interp=None),
        "bin/script": b"#!/bin/sh\necho hi\n",
        "bin/short": b"\x7fELF",
        "lib/modules/6.1/x.ko": elf_header(interp=b"/never\0"),
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "bin" / "link").symlink_to("dyn")
    assert interpreter(tmp_path / "bin/dyn") == "/lib64/ld-linux-x86-64.so.2"
    assert interpreter(tmp_path / "bin/dyn32") == "/lib/ld-linux.so.2"
    for rel in ("bin/static", "bin/script", "bin/short", "nosuch"):
        assert interpreter(tmp_path / rel) is None
    # links and kernel modules are not looked at
    assert dynamic_programs(tmp_path) == {"/bin/dyn": "/lib64/ld-linux-x86-64.so.2",
                                          "/bin/dyn32": "/lib/ld-linux.so.2"}
    # this Python is a real, dynamically linked program
    assert (interpreter(Path(sys.executable).resolve()) or "").startswith("/lib")


def test_loader_cache_and_check_run_without_a_shell(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    import subprocess

    from vcluster.images import loader

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ping").write_bytes(elf_header(interp=b"/lib64/ld.so\0"))
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append([str(a) for a in argv])
        broken = argv[-1] == "/bin/ping" and "--list" in argv
        return subprocess.CompletedProcess(
            argv, 127 if broken else 0, "",
            "/bin/ping: error while loading shared libraries: libidn2.so.0: cannot open shared "
            "object file" if broken else "")

    monkeypatch.setattr(loader, "run", fake_run)
    with pytest.raises(ImageError, match=r"/bin/ping: .*libidn2\.so\.0: cannot open"):
        loader.prepare(tmp_path)
    assert (tmp_path / "etc" / "ld.so.conf").read_text() == "include /etc/ld.so.conf.d/*.conf\n"
    assert calls[0][1:] == ["-r", str(tmp_path)] and calls[0][0].endswith("ldconfig")
    assert calls[1] == ["chroot", str(tmp_path), "/lib64/ld.so", "--list", "/bin/ping"]
    # nothing dynamically linked: no cache, nothing run
    calls.clear()
    (tmp_path / "bin" / "ping").write_bytes(elf_header(interp=None))
    assert loader.prepare(tmp_path) == 0 and calls == []
