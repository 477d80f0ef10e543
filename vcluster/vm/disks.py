"""A VM's own disks: the qcow2 overlay over its image, its empty extra disks, and the
cluster's shared disks (one raw image on the host for all its VMs there).

The overlay names its backing file by absolute path (the VM's directory is
elsewhere than the image repository); the base image is inspected with a
shared lock, as other VMs of the cluster may be running on it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from vcluster.cluster import VmPlan
from vcluster.errors import VclusterError, VmError
from vcluster.hostpaths import VmFiles
from vcluster.run import run
from vcluster.vm import machine

QEMU_IMG_TIMEOUT = 60.0


def image_format(path: Path) -> str:
    """The format of a base image (``qemu-img info``, shared lock: VMs may be using it)."""
    return str(_info(path, "format"))


def _info(path: Path, key: str) -> object:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)],
              timeout=QEMU_IMG_TIMEOUT).stdout
    try:
        return json.loads(out)[key]
    except (ValueError, KeyError) as e:
        raise VmError(f"qemu-img info {path}: unexpected answer ({e})") from None


def shared_disk(path: Path, size: int) -> None:
    """The cluster's shared disk ``path`` of ``size`` bytes (raw, sparse), made by whichever
    VM's runner on this host comes first: whole or not at all (made aside, then linked
    into place, so no VM ever attaches a disk still being sized)."""
    if path.exists():
        return
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(os.open(aside, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as f:
            f.truncate(size)
        with contextlib.suppress(FileExistsError):  # another VM's runner was first: its
            os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def make_disks(vm: VmPlan, files: VmFiles) -> None:
    """The overlay (for a disk image), the extra disks in the VM's directory, and the
    shared disks beside it (the first VM to start on the host makes them)."""
    if vm.boot.kind == "disk":
        if vm.boot.disk is None:
            raise VmError(f"image {vm.boot.image} has no disk to boot from")
        try:
            base_format = image_format(vm.boot.disk)
            run(machine.overlay_argv(vm.boot.disk, base_format, files.overlay),
                timeout=QEMU_IMG_TIMEOUT)
        except VclusterError as e:
            raise VmError(f"cannot make the overlay over {vm.boot.disk}: {e}") from e
    for disk in vm.disks:
        if disk.shared:
            assert disk.size is not None  # the plan refuses a shared disk without one
            shared_disk(files.shared_disk(disk.name), disk.size)
            continue
        if disk.base is None:
            assert disk.size is not None  # the configuration requires it without an image
            run(machine.disk_argv(files.disk(disk.name), disk.size), timeout=QEMU_IMG_TIMEOUT)
            continue
        try:  # a layer over its image; ``size`` makes it bigger, never smaller
            size = int(str(_info(disk.base, "virtual-size")))
            run(machine.overlay_argv(disk.base, image_format(disk.base), files.disk(disk.name),
                                     max(size, disk.size or 0)), timeout=QEMU_IMG_TIMEOUT)
        except VclusterError as e:
            raise VmError(f"cannot make disk {disk.name!r} over {disk.base}: {e}") from e
