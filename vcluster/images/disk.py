"""Build a ``disk`` image: debootstrap a Debian root, clean it up, make an ext4 qcow2.

The result boots directly (no partitions, no bootloader) with the root's own
kernel and initrd and ``root=/dev/vda``.  The clean-ups make every clone a
new machine: no host name, machine id, ssh host keys or resolver of the
build host survive.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vcluster.errors import ImageError
from vcluster.images import packages
from vcluster.images.context import BuildContext, copy_overlays, run_postbuild
from vcluster.images.progress import run_streaming
from vcluster.run import run

# debootstrap prints "I: Retrieving foo 1.2-3", "I: Unpacking foo...", "I: Configuring foo..."
_STEP_RE = re.compile(
    r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) "
    r"(?!(?:required|the|base) )(\S+?)\.*(\s|$)")


class _DebootstrapSummary:
    """Turns debootstrap's output into ``retrieving: 143 packages (libc6)``."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, line: str) -> str | None:
        m = _STEP_RE.match(line)
        if not m:
            return line.removeprefix("I: ") if line.startswith("I: ") else None
        verb, package = m.group(1).lower(), m.group(2)
        self.counts[verb] = self.counts.get(verb, 0) + 1
        return f"{verb} {self.counts[verb]} packages ({package})"


def debootstrap(ctx: BuildContext, root: Path) -> None:
    recipe = ctx.recipe
    mirror = recipe.mirror or packages.find_mirror(recipe.suite)
    cache = ctx.cache / "debootstrap"
    cache.mkdir(parents=True, exist_ok=True)
    ctx.progress.step(f"debootstrap {recipe.suite} from {mirror} "
                      f"({len(recipe.packages)} packages listed)")
    argv: list[str | os.PathLike[str]] = [
        "debootstrap", "--variant=minbase", f"--cache-dir={cache}"]
    if recipe.packages:
        argv.append("--include=" + ",".join(recipe.packages))
    argv += [recipe.suite, root, mirror]
    run_streaming(argv, ctx.progress, "debootstrap", summarize=_DebootstrapSummary())
    installed = run(["chroot", root, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]).stdout
    # What really went in (the mirror may lag behind the host's apt sources).
    (ctx.out / "packages.txt").write_text(installed)
    ctx.progress.step(f"debootstrap done: {len(installed.splitlines())} packages installed")


def clean_up(root: Path) -> None:
    """Remove what ties the root to the build host or to one machine."""
    (root / "etc" / "hostname").write_text("localhost\n")
    (root / "etc" / "hosts").write_text(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        "ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n")
    resolv = root / "etc" / "resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    (root / "etc" / "machine-id").write_text("")
    dbus_id = root / "var" / "lib" / "dbus" / "machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    lists = root / "var" / "lib" / "apt" / "lists"
    for item in lists.glob("*"):
        if item.is_file():
            item.unlink()
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    for pkgcache in (root / "var" / "cache" / "apt").glob("*.bin"):
        pkgcache.unlink()
    (root / "etc" / "default").mkdir(exist_ok=True)
    (root / "etc" / "default" / "locale").write_text("LANG=C.UTF-8\n")


def _newest(root: Path, pattern: str) -> Path:
    found = sorted((root / "boot").glob(pattern))
    if not found:
        raise ImageError(f"the new root has no /boot/{pattern} (is a linux-image package listed?)")
    return found[-1]


def make_disk(ctx: BuildContext, root: Path) -> None:
    raw = ctx.work / "root.raw"
    ctx.progress.step(f"mkfs.ext4 ({ctx.recipe.size >> 20} MiB) and qemu-img convert")
    run(["truncate", "-s", str(ctx.recipe.size), raw])
    run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", root, raw])
    run(["qemu-img", "convert", "-O", "qcow2", raw, ctx.out / "disk.qcow2"])
    raw.unlink()
    size = (ctx.out / "disk.qcow2").stat().st_size
    ctx.progress.step(f"disk.qcow2 written ({size / (1 << 20):.0f} MiB)")


def build_disk(ctx: BuildContext) -> dict[str, str]:
    """Build disk.qcow2 + vmlinuz + initrd.img into ``ctx.out``; returns the files by role."""
    root = ctx.work / "root"
    root.mkdir()
    debootstrap(ctx, root)
    copy_overlays(ctx, root)
    proc = root / "proc"
    run(["mount", "-t", "proc", "proc", proc])
    try:
        run_postbuild(ctx, root)
    finally:
        run(["umount", "-l", proc], check=False)
    clean_up(root)
    for src, name in ((_newest(root, "vmlinuz-*"), "vmlinuz"),
                      (_newest(root, "initrd.img-*"), "initrd.img")):
        shutil.copyfile(src, ctx.out / name)
        os.chmod(ctx.out / name, 0o644)
    make_disk(ctx, root)
    return {"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}
