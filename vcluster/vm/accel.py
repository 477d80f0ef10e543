"""Choosing the accelerator: ``tcg``, ``kvm``, or ``auto`` (probe KVM, never hang).

``auto`` asks /dev/kvm for its API version (an ioctl, instant), then boots the
VM's own kernel under KVM for a bounded time and waits for its first line
on the serial port: a host whose KVM answers ioctls but hangs its guests
(nested virtualization gone wrong) is caught there and gets TCG.  The reason
for the choice is returned so the runner can say which one ran and why.
"""

from __future__ import annotations

import fcntl
import os
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


def choose_accel(setting: str, *, binary: str, kernel: Path,
                 probe_timeout: float = PROBE_TIMEOUT, device: Path = KVM_DEVICE) -> Accel:
    """The accelerator for ``setting`` (batch.yaml ``qemu.accel``)."""
    if setting in ("tcg", "kvm"):
        return Accel(setting, "qemu.accel is " + setting)
    if setting != "auto":
        raise ValueError(f"accelerator {setting!r} is not auto, kvm or tcg")
    problem = kvm_api_problem(device)
    if problem is None:
        started = time.monotonic()
        problem = kvm_boot_problem(binary, kernel, probe_timeout)
        if problem is None:
            took = time.monotonic() - started
            return Accel("kvm", f"qemu.accel is auto: KVM answers and a test boot printed "
                                f"its banner in {took:.1f} s")
    return Accel("tcg", f"qemu.accel is auto: {problem}; using TCG")
