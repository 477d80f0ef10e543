"""Choosing the accelerator: ``tcg``, ``kvm``, or ``auto`` (probe KVM, never hang).

``auto`` asks /dev/kvm for its API version (an ioctl, instant), then boots the
VM's own kernel under KVM for a bounded time and waits for its first line
on the serial port: a host whose KVM answers ioctls but hangs its guests
(nested virtualization gone wrong) is caught there and gets TCG.  The reason
for the choice is returned so the runner can say which one ran and why.

The test boot's verdict is kept in a small file (``kvm-probe.json`` in the
host's run directory) for as long as it can hold: the same boot of the host
(its boot id), the same QEMU binary and the same /dev/kvm (its inode and
change time: reloading the module makes a new one).  The runners of one
cluster, and the clusters after it, then skip the 0.1 s to 10 s probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vcluster.errors import CommandError
from vcluster.qemu import VmSpec, build_argv
from vcluster.run import spawn, stop

KVM_DEVICE = Path("/dev/kvm")
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
PROBE_TIMEOUT = 10.0
PROBE_LINE = b"Linux version"
PROBE_STOP_GRACE = 1.0  # QEMU ends at once on SIGTERM; a hung KVM may need SIGKILL
PROBE_CACHE = "kvm-probe.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def kvm_api_problem(device: Path = KVM_DEVICE) -> str | None:
    """Why KVM cannot be used from its device, or None if it answers as expected."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {device}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"{device} refuses KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{device} speaks KVM API {version}, not {KVM_API_VERSION}"
    return None


def kvm_boot_problem(binary: str, kernel: Path, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Boot ``kernel`` under KVM until it prints its banner; why not, or None if it did."""
    with tempfile.TemporaryDirectory(prefix="vcluster-kvm-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        spec = VmSpec(name="kvm-probe", accel="kvm", binary=binary, memory=128 << 20,
                      kernel=kernel, append="console=ttyS0 earlyprintk=ttyS0 panic=-1",
                      serial_log=log, extra=("-no-reboot",))
        err = Path(tmp) / "stderr"
        try:
            with open(err, "wb") as stderr:
                proc = spawn(build_argv(spec), stderr=stderr)
        except CommandError as e:
            return str(e)
        started = time.monotonic()
        try:
            while time.monotonic() - started < timeout:
                if log.is_file() and PROBE_LINE in log.read_bytes():
                    return None
                if proc.poll() is not None:
                    lines = err.read_text(errors="replace").strip().splitlines()
                    last = lines[-1] if lines else f"exit status {proc.returncode}"
                    return f"a KVM test boot failed: {last}"
                time.sleep(0.05)
            return f"a KVM test boot printed nothing in {timeout:g} s (KVM hangs here)"
        finally:
            stop(proc, PROBE_STOP_GRACE)


def probe_key(binary: str, device: Path = KVM_DEVICE) -> dict[str, object] | None:
    """What a test boot's verdict holds for: this boot, this QEMU, this /dev/kvm."""
    path = shutil.which(binary)
    try:
        qemu = os.stat(path) if path else None
        kvm = os.stat(device)
        boot = BOOT_ID.read_text().strip()
    except OSError:
        return None
    if qemu is None:
        return None
    return {"boot": boot, "qemu": [os.path.realpath(path or binary), qemu.st_size,
                                   qemu.st_mtime_ns],
            "kvm": [kvm.st_ino, kvm.st_rdev, kvm.st_ctime_ns]}


def cached_problem(cache: Path, key: dict[str, object]) -> tuple[bool, str | None]:
    """(found, the cached test boot's problem) for ``key``."""
    try:
        kept = json.loads(cache.read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(kept, dict) or kept.get("key") != key:
        return False, None
    problem = kept.get("problem")
    return True, problem if isinstance(problem, str) else None


def keep_problem(cache: Path, key: dict[str, object], problem: str | None) -> None:
    """Keep a test boot's verdict; a cache that cannot be written is no cache."""
    with contextlib.suppress(OSError):
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "problem": problem}))
        tmp.replace(cache)


def choose_accel(setting: str, *, binary: str, kernel: Path,
                 probe_timeout: float = PROBE_TIMEOUT, device: Path = KVM_DEVICE,
                 cache_dir: Path | None = None) -> Accel:
    """The accelerator for ``setting`` (batch.yaml ``qemu.accel``).

    ``cache_dir``: where the test boot's verdict is kept (``PROBE_CACHE``), if anywhere.
    """
    if setting in ("tcg", "kvm"):
        return Accel(setting, "qemu.accel is " + setting)
    if setting != "auto":
        raise ValueError(f"accelerator {setting!r} is not auto, kvm or tcg")
    problem = kvm_api_problem(device)
    if problem is None:
        key = probe_key(binary, device) if cache_dir is not None else None
        cache = cache_dir / PROBE_CACHE if cache_dir is not None else None
        found, took = False, 0.0
        if cache is not None and key is not None:
            found, problem = cached_problem(cache, key)
        if not found:
            started = time.monotonic()
            problem = kvm_boot_problem(binary, kernel, probe_timeout)
            took = time.monotonic() - started
            if cache is not None and key is not None:
                keep_problem(cache, key, problem)
        if problem is None:
            how = (f"a test boot printed its banner in {took:.1f} s" if not found
                   else f"a test boot this host boot printed its banner ({cache})")
            return Accel("kvm", f"qemu.accel is auto: KVM answers and {how}")
        if found:
            problem += f" (the test boot's verdict kept in {cache})"
    return Accel("tcg", f"qemu.accel is auto: {problem}; using TCG")
