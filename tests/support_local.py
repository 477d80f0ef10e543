"""Helpers for the local backend's tests: a user with an empty configuration, and leftovers.

Every test user (root, or a unix user made for the module) gets a HOME of
its own under a fresh directory of /tmp (reachable by that user), an empty
``VCLUSTER_CONF`` directory (the embedded default applies) and a user image
repository of its own holding links to the test images.  ``leftovers`` lists what of a
local job could remain on this machine: processes, network devices, files
and sockets under the user's directories, store rows.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support_images import images_dir

VENV_BIN = Path(sys.executable).parent
KEPT_KEYS = {"/vcluster/local/next-job"}  # the id counter outlives the jobs


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    home: Path
    conf: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"HOME": str(self.home), "VCLUSTER_CONF": str(self.conf), "LANG": "C.UTF-8",
               "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "USER": self.name}
        env.update(extra or {})
        return env

    def argv(self, *args: str, env: Mapping[str, str] | None = None) -> list[str]:
        """``vcluster ARGS`` as this user, in a clean environment."""
        pairs = [f"{k}={v}" for k, v in self.env(env).items()]
        prefix = ["runuser", "-u", self.name, "--"] if self.uid else []
        return [*prefix, "env", "-i", *pairs, str(VENV_BIN / "vcluster"), *args]

    def run(self, *args: str, timeout: float = 240, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, env=env), capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                              cwd=cwd or self.home)

    @property
    def state(self) -> Path:
        return Path("/var/lib/vcluster") if self.uid == 0 else \
            self.home / ".local" / "state" / "vcluster"

    @property
    def run_dir(self) -> Path:
        return Path("/run/vcluster") if self.uid == 0 else Path(f"/tmp/vcluster-{self.uid}")

    @property
    def store(self) -> Path:
        return self.home / ".local" / "state" / "vcluster" / "store.db"


@contextlib.contextmanager
def local_user(name: str = "root") -> Iterator[LocalUser]:
    """``name``'s empty HOME and configuration directory, removed afterwards."""
    entry = pwd.getpwnam(name)
    base = Path(tempfile.mkdtemp(prefix="vcl-local-", dir="/tmp"))
    base.chmod(0o755)
    home, conf = base / "home", base / "conf"
    repo = home / ".vcluster" / "images"
    repo.mkdir(parents=True)
    conf.mkdir()
    for image in images_dir().iterdir():  # the test images, in a repository of the user's
        (repo / image.name).symlink_to(image)
    for path in (home, home / ".vcluster", repo, conf):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        yield LocalUser(name, entry.pw_uid, home, conf)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if entry.pw_uid:
            shutil.rmtree(f"/tmp/vcluster-{entry.pw_uid}", ignore_errors=True)


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def job_processes(uid: int) -> list[str]:
    """Processes of ``uid`` that belong to a local cluster (zombies aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2:].split()[0]
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        local = any(v.startswith(b"VCLUSTER_LOCAL_JOB=") for v in _environ(int(entry.name)))
        runner = b"internal" in argv and b"vm" in argv and any(
            a.startswith(b"--job=") for a in argv)
        if state != "Z" and (comm.startswith("qemu-") or comm == "vde_switch" or runner
                             or local):
            found.append(f"pid {entry.name} ({comm})")
    return found


def qemus(uid: int) -> list[int]:
    return [int(p.split()[1]) for p in job_processes(uid) if "(qemu-" in p]


def store_keys(user: LocalUser) -> set[str]:
    if not user.store.exists():
        return set()
    with contextlib.closing(sqlite3.connect(user.store)) as db:
        return {k for (k,) in db.execute("SELECT key FROM kv")}


def leftovers(user: LocalUser) -> list[str]:
    """What of the user's local jobs is still on this machine (nothing, once all ended)."""
    out = job_processes(user.uid)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    out += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
            if line.split(":")[1].strip().startswith(("vcb", "vct", "vcx"))]
    for root in (user.state / "work", user.state / "jobs", user.run_dir / "jobs"):
        if root.is_dir():
            out += [f"file {p}" for p in root.iterdir()]
    if user.run_dir.is_dir():
        out += [f"file {p}" for p in user.run_dir.glob("local-*")]
    out += [f"store key {k}" for k in sorted(store_keys(user) - KEPT_KEYS)]
    return out


def wait_gone(uid: int, timeout: float) -> float:
    """Seconds until no QEMU of ``uid`` is left; AssertionError after ``timeout``."""
    started = time.monotonic()
    while qemus(uid):
        assert time.monotonic() - started < timeout, f"QEMUs still running: {qemus(uid)}"
        time.sleep(0.1)
    return time.monotonic() - started
