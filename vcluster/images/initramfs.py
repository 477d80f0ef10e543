"""Build an ``initramfs`` image: a Debian kernel plus a busybox initramfs, no debootstrap.

The recipe's packages and their run-time dependencies (resolved by
``depends``, without what a busybox system does without) are extracted into
the root (``dpkg-deb -x``; no maintainer script runs), documentation is
dropped, busybox's applets are linked where no package put a program of the
same name, the kernel modules the recipe names are copied with their
dependencies (from ``modules.dep``), and ``/etc/vcluster/modules`` lists them
in load order for the recipe's ``/init`` (from its overlay).  After the
overlays and postbuild, ``loader`` writes the dynamic loader's cache and
checks that every dynamically linked program finds its libraries.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from pathlib import Path

from vcluster.errors import ImageError
from vcluster.images import loader, packages
from vcluster.images.context import BuildContext, copy_overlays, run_postbuild
from vcluster.run import run

MODULE_LIST = "etc/vcluster/modules"
# Documentation and translations: no use in RAM (the initramfs runs in the C locale).
DROPPED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
           "usr/share/lintian", "usr/share/bug")
PATH_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin")


def _extract(deb: Path, dest: Path) -> None:
    run(["dpkg-deb", "-x", deb, dest])


def link_busybox(root: Path) -> int:
    """Link every busybox applet to /bin/busybox.

    Programs from packages win: an applet is not linked where the root has a
    file of that name already, nor anywhere on the PATH (a busybox ``/bin/ip``
    would shadow a package's ``/usr/bin/ip``).
    """
    busybox = root / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageError("the initramfs has no /bin/busybox (add busybox or busybox-static to "
                         "packages)")
    applets = run([busybox, "--list-full"]).stdout.split()
    on_path = {entry.name for sub in PATH_DIRS if (root / sub).is_dir()
               for entry in (root / sub).iterdir()}
    count = 0
    for applet in applets:
        target = root / applet
        if target.exists() or target.is_symlink():
            continue
        if target.parent.relative_to(root).as_posix() in PATH_DIRS and target.name in on_path:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to("/bin/busybox")
        count += 1
    return count


# Prints the names the shell would run as its own applets rather than from PATH.
_SHADOW_SCRIPT = 'for name; do case $(command -v "$name") in /*) ;; *) echo "$name" ;; esac; done'


def shadowed_programs(root: Path) -> list[str]:
    """Programs from packages that the root's /bin/sh would not run (it runs its applet).

    Debian's busybox-static is built to prefer its applets to any program on
    PATH (FEATURE_SH_STANDALONE), so a package's /bin/ping would only run by
    its full path; dash, and Debian's dynamically linked busybox, look at PATH
    first.
    """
    busybox = root / "bin" / "busybox"
    if not (root / "bin" / "sh").exists() or not busybox.is_file():
        return []
    applets = {Path(a).name for a in run([busybox, "--list-full"]).stdout.split()}
    programs = sorted({entry.name for sub in PATH_DIRS if (root / sub).is_dir()
                       for entry in (root / sub).iterdir()
                       if entry.name in applets and entry.name != "busybox"
                       and not _is_busybox_link(entry)})
    if not programs:
        return []
    out: str = run(["chroot", root, "/bin/sh", "-c", _SHADOW_SCRIPT, "sh", *programs]).stdout
    return out.split()


def _is_busybox_link(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) in ("/bin/busybox", "busybox", "../bin/busybox")


def _canon(name: str) -> str:
    return name.replace("-", "_")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """Module name -> (path relative to moddir, dependency paths) from modules.dep."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = _canon(Path(path).name.split(".ko")[0])
        out[name] = (path, deps.split())
    return out


def module_load_order(wanted: list[str], moddir: Path) -> list[str]:
    """The module files to load for ``wanted``, dependencies first (builtins skipped)."""
    deps = read_modules_dep(moddir)
    by_path = {path: name for name, (path, _) in deps.items()}
    builtin = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.is_file():
        builtin = {_canon(Path(p).name.split(".ko")[0])
                   for p in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        path, requires = deps[name]
        if path in order or name in stack:
            return
        for dep in reversed(requires):
            visit(by_path[dep], (*stack, name))
        order.append(path)

    aliases: dict[str, str] = {}
    alias_file = moddir / "modules.alias"
    if alias_file.is_file():
        for line in alias_file.read_text().splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                aliases.setdefault(_canon(words[1]), _canon(words[2]))
    for module in wanted:
        name = _canon(module)
        if name not in deps and name not in builtin:
            # file systems are known by their type too: iso9660 is isofs
            name = aliases.get(name, aliases.get(f"fs_{name}", name))
        if name in builtin:
            continue
        if name not in deps:
            raise ImageError(f"kernel module {module!r} is neither built in nor in modules.dep "
                             f"of {moddir.name}")
        visit(name, ())
    return order


def _install_kernel(ctx: BuildContext, kernel_deb: Path, root: Path) -> str:
    kdir = ctx.work / "kernel"
    _extract(kernel_deb, kdir)
    kernels = sorted((kdir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"{kernel_deb.name} holds no /boot/vmlinuz-*")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[-1], ctx.out / "vmlinuz")
    os.chmod(ctx.out / "vmlinuz", 0o644)
    moddir = kdir / "lib" / "modules" / version
    # busybox's depmod: the build host need not have kmod.
    run([root / "bin" / "busybox", "depmod", "-b", kdir, version])
    order = module_load_order(list(ctx.recipe.modules), moddir)
    target = root / "lib" / "modules" / version
    target.mkdir(parents=True, exist_ok=True)
    for rel in order:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(moddir / rel, target / rel)
    for extra in ("modules.dep", "modules.builtin", "modules.order"):
        if (moddir / extra).is_file():
            shutil.copyfile(moddir / extra, target / extra)
    listing = root / MODULE_LIST
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"/lib/modules/{version}/{rel}\n" for rel in order))
    ctx.progress.step(f"kernel {version}: {len(order)} modules for "
                      f"{', '.join(ctx.recipe.modules) or 'nothing'}")
    return version


def _write_cpio(root: Path, dest: Path) -> None:
    names = run(["find", ".", "-mindepth", "1"], cwd=root).stdout.splitlines()
    listing = "\n".join(sorted(names)) + "\n"
    archive = run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                  input=listing.encode(), text=False).stdout
    with gzip.open(dest, "wb", compresslevel=9) as out:
        out.write(archive)


def build_initramfs(ctx: BuildContext) -> dict[str, str]:
    """Build vmlinuz + initramfs.img into ``ctx.out``; returns the image's files by role."""
    recipe = ctx.recipe
    root = ctx.work / "root"
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run",
                "mnt", "root", "lib/modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    # The kernel opens /dev/console before /init runs: it must exist in the archive.
    os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    if not ctx.packages:
        raise ImageError(f"recipe {recipe.name}: no resolved packages (the kernel comes first)")
    kernel_pkg, *names = ctx.packages
    debs_dir = ctx.work / "debs"
    ctx.progress.step(f"downloading {kernel_pkg} {ctx.packages[kernel_pkg]} and "
                      f"{len(names)} packages: {', '.join(names) or 'none'}")
    debs = packages.download([kernel_pkg, *names], debs_dir, ctx.cache / "debs")
    for deb in debs[1:]:
        _extract(deb, root)
    for sub in DROPPED:
        shutil.rmtree(root / sub, ignore_errors=True)
    linked = link_busybox(root)
    ctx.progress.step(f"busybox: {linked} applets linked")
    _install_kernel(ctx, debs[0], root)
    copy_overlays(ctx, root)
    run_postbuild(ctx, root)
    dynamic = loader.prepare(root)
    if dynamic:
        ctx.progress.step(f"ld.so.cache written; {dynamic} dynamically linked files load")
    shadowed = shadowed_programs(root)
    if shadowed:
        raise ImageError(f"recipe {recipe.name}: /bin/sh runs its own applets instead of "
                         f"{', '.join(shadowed)} from the packages (busybox-static's shell "
                         "prefers its applets to PATH): list dash for a /bin/sh that looks at "
                         "PATH first (as tiny does), or use the busybox package")
    init = root / "init"
    if not init.is_file() or not os.access(init, os.X_OK):
        raise ImageError(f"recipe {recipe.name}: the overlay must provide an executable /init")
    _write_cpio(root, ctx.out / "initramfs.img")
    size = (ctx.out / "initramfs.img").stat().st_size
    ctx.progress.step(f"initramfs.img written ({size / (1 << 20):.1f} MiB)")
    return {"kernel": "vmlinuz", "initramfs": "initramfs.img"}

