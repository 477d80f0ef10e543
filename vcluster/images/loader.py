"""Dynamically linked programs in an initramfs: the loader's cache and a check that they run.

Debian's packages put libraries in ``/lib/<triplet>`` and ``/usr/lib/<triplet>``
and the loader at ``/lib64/ld-linux-x86-64.so.2``.  Debian's loader searches
the multiarch directories by itself, but libraries elsewhere (named by a
package's ``/etc/ld.so.conf.d/*.conf``) are only found through
``/etc/ld.so.cache``: the build host's ``ldconfig -r ROOT`` writes it (the
initramfs has no libc-bin).  Then every program with an ELF interpreter is
run through its own loader in the root (``chroot ROOT LOADER --list PROGRAM``,
as ldd does), so a missing library fails the build instead of the guest.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from vcluster.errors import ImageError
from vcluster.run import run

PT_INTERP = 3
LD_SO_CONF = "include /etc/ld.so.conf.d/*.conf\n"
_SKIP = ("lib/modules",)  # kernel modules: relocatable objects, never run


def interpreter(path: Path) -> str | None:
    """The ELF interpreter (PT_INTERP) ``path`` asks for; None for static programs and non-ELF."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) \
                    or head[5] not in (1, 2):
                return None
            order = "<" if head[5] == 1 else ">"
            wide = head[4] == 2
            if wide and len(head) < 64:
                return None
            (phoff,) = struct.unpack_from(order + ("Q" if wide else "I"), head, 32 if wide else 28)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 54 if wide else 42)
            if phentsize < (56 if wide else 32):
                return None
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if len(ph) < phentsize:
                    return None
                if struct.unpack_from(order + "I", ph, 0)[0] != PT_INTERP:
                    continue
                if wide:
                    offset, size = struct.unpack_from(order + "Q", ph, 8)[0], \
                        struct.unpack_from(order + "Q", ph, 32)[0]
                else:
                    offset, size = struct.unpack_from(order + "II", ph, 4)[0], \
                        struct.unpack_from(order + "I", ph, 16)[0]
                if not 0 < size <= 4096:
                    return None
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode(errors="replace") or None
    except OSError:
        return None
    return None


def dynamic_programs(root: Path) -> dict[str, str]:
    """Files in ``root`` (as absolute paths inside it) -> the loader each asks for."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if (rel_dir / d).as_posix() not in _SKIP)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            loader = interpreter(path)
            if loader is not None:
                out["/" + (rel_dir / name).as_posix()] = loader
    return out


def _ldconfig() -> str:
    return shutil.which("ldconfig") or "/sbin/ldconfig"


def write_cache(root: Path) -> None:
    """``/etc/ld.so.cache`` of ``root`` from its libraries and ``/etc/ld.so.conf.d``."""
    conf = root / "etc" / "ld.so.conf"
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(LD_SO_CONF)
    run([_ldconfig(), "-r", root])


def check_programs(root: Path, programs: dict[str, str]) -> None:
    """Load every program with its own loader inside ``root``; fail naming what is missing."""
    failed = []
    for program, loader in programs.items():
        proc = run(["chroot", root, loader, "--list", program], check=False)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            failed.append(f"{program}: {why}")
    if failed:
        raise ImageError("programs in the initramfs cannot be loaded (add the package with the "
                         "library, or take it off the recipe's exclude list): "
                         + "; ".join(failed))


def prepare(root: Path) -> int:
    """Write the loader cache and check the dynamic programs; returns how many there are."""
    programs = dynamic_programs(root)
    if not programs:
        return 0
    write_cache(root)
    check_programs(root, programs)
    return len(programs)
