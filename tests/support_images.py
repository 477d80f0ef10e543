"""Where tests find the built images, and a small QEMU harness for boot tests.

Images come from ``$VCLUSTER_TEST_IMAGES`` (default /var/cache/vcluster-test/images),
built with ``vcluster image build tiny --repo DIR`` and
``vcluster image build debian --repo DIR``.  A missing image fails the test in
CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from vcluster.errors import ImageError
from vcluster.images.repo import Image, resolve_image
from vcluster.qemu import VmSpec, build_argv
from vcluster.run import run, spawn

IMAGES_ENV = "VCLUSTER_TEST_IMAGES"
DEFAULT_IMAGES = Path("/var/cache/vcluster-test/images")


def images_dir() -> Path:
    env = os.environ.get(IMAGES_ENV)
    return Path(env) if env else DEFAULT_IMAGES


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require_image(name: str) -> Image:
    """The newest revision of a test image; fail (CI) or skip (locally) when it is missing."""
    try:
        return resolve_image(name, [images_dir()])
    except ImageError as e:
        message = (f"test image missing: {e} (for the tests: "
                   f"vcluster image build {name} --repo {images_dir()}; or set {IMAGES_ENV})")
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no serial log)"
    return "\n".join(text.splitlines()[-lines:])


class TestVm:
    """One QEMU process started from a VmSpec; the serial log is the source of truth."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, spec: VmSpec) -> None:
        if spec.serial_log is None:
            raise ValueError("a test VM needs a serial log")
        self.spec = spec
        self.log: Path = spec.serial_log
        self.stderr_path = self.log.with_suffix(".stderr")
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.stderr_path, "wb") as err:
            self.proc = spawn(build_argv(self.spec), stderr=err, pass_fds=self.spec.pass_fds())
        self.started = time.monotonic()

    def wait_for(self, text: str, timeout: float) -> float:
        """Wait until ``text`` appears on the serial log; returns seconds since start."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if self.log.is_file() and text in self.log.read_text(errors="replace"):
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU ({self.spec.name}) exited with status {self.proc.returncode} "
                            f"before {text!r}:\n{self.stderr_path.read_text(errors='replace')}\n"
                            f"{tail(self.log)}")
            time.sleep(0.2)
        pytest.fail(f"{self.spec.name}: {text!r} not on the serial console after {timeout:g} s; "
                    f"last lines:\n{tail(self.log)}")

    def send(self, line: str) -> None:
        """Type a line on the serial console (through its unix socket)."""
        if self.conn is None:
            assert self.spec.serial_socket is not None, "no serial socket"
            self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.conn.connect(str(self.spec.serial_socket))
            self.conn.setblocking(False)
        self.drain()
        self.conn.setblocking(True)
        self.conn.sendall(line.encode() + b"\n")
        self.conn.setblocking(False)

    def drain(self) -> None:
        """Read away what the guest wrote to the socket (the log has it too).

        QEMU writes the console a byte at a time: unread, a few hundred bytes
        fill the socket's buffer and the guest's serial port stalls.
        """
        if self.conn is None:
            return
        try:
            while self.conn.recv(65536):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


@contextmanager
def vm_factory(workdir: Path) -> Iterator[list[TestVm]]:
    """Collects started VMs and kills every one of them (by PID) on the way out."""
    vms: list[TestVm] = []
    try:
        yield vms
    finally:
        for vm in vms:
            vm.stop()


def boot(vms: list[TestVm], spec: VmSpec, workdir: Path) -> TestVm:
    """Start a VM with a serial socket and log in ``workdir`` and register it for cleanup."""
    spec = replace(spec, serial_log=workdir / f"{spec.name}.log",
                   serial_socket=workdir / f"{spec.name}.sock")
    vm = TestVm(spec)
    vms.append(vm)
    vm.start()
    return vm


GUEST_SCRIPTS = Path(__file__).resolve().parent / "guest"


def guest_script(name: str) -> str:
    """A script the tests run inside guests (``tests/guest/``, shellchecked by test_linters)."""
    return (GUEST_SCRIPTS / name).read_text()


# Two tiny guests playing ping-pong through their FAM region (BAR2): A writes a marker,
# B reads it and answers at offset 8, A reads the answer.
FAM_A = guest_script("fam-a.sh")
FAM_B = guest_script("fam-b.sh")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a user-mode NIC's hostfwd)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ssh_keygen(path: Path) -> str:
    """An ed25519 key pair without a passphrase (as vcluster makes them); the public line."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path])
    return path.with_suffix(".pub").read_text().strip()


class SshTarget:
    """ssh and scp to a guest on 127.0.0.1:port, checking its host key against ``known_hosts``."""

    def __init__(self, port: int, key: Path, known_hosts: Path, alias: str,
                 user: str = "root") -> None:
        self.port, self.user = port, user
        self.options = ["-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
                        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                        "-o", f"UserKnownHostsFile={known_hosts}",
                        "-o", "GlobalKnownHostsFile=/dev/null",
                        "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias={alias}"]

    def ssh(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ssh", *self.options, "-p", str(self.port), f"{self.user}@127.0.0.1",
                    *command], check=check, timeout=60)

    def scp(self, source: str, dest: str) -> None:
        """``scp`` (SFTP, OpenSSH 9's default); a ``:`` prefix names a path on the guest."""
        def where(path: str) -> str:
            return f"{self.user}@127.0.0.1{path}" if path.startswith(":") else path
        run(["scp", *self.options, "-P", str(self.port), where(source), where(dest)],
            timeout=60)

    def wait(self, timeout: float) -> float:
        """Retry a login until the server answers; returns the seconds it took."""
        start = time.monotonic()
        while True:
            proc = self.ssh("true", check=False)
            if proc.returncode == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                pytest.fail(f"no ssh login after {timeout:g} s: {proc.stderr}")
            time.sleep(0.5)


def image_owners() -> dict[str, tuple[int, int, int]]:
    """Every file of the test images' revisions, with its owner, group and mode (not the
    build cache beside them): what a persistent cluster must leave as it found."""
    out = {}
    for image in sorted(images_dir().resolve().iterdir()):
        if image.name.startswith("."):
            continue
        for path in sorted(image.rglob("*")):
            info = path.stat()
            out[str(path)] = (info.st_uid, info.st_gid, info.st_mode)
    return out
