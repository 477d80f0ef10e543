"""Running ``vcluster alloc`` in the sandbox as a real unix user, and checking what is left.

Users run the venv's vcluster (``sys.executable``; CI installs it where every
user can read it).  Files the users need (templates, scripts, flags) live in a
world-readable directory under /var/tmp.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.helpers.waiting import wait_for
from tests.support_agent import (
    JobTool,
    epilog_ran,
    job_tool,
    nothing_left,
    store_keys,
    store_value,
    unix_users,
)
from tests.support_sandbox import Sandbox

_JOB = re.compile(r"vcluster: job (\d+): starting")


def module_users(*names: str) -> Callable[[], Iterator[None]]:
    """The module fixture ``users``: unix users made for a module's tests, removed after.

    In the module: ``users = module_users(ALICE, BOB)``.
    """
    @pytest.fixture(scope="module", name="users")
    def made() -> Iterator[None]:
        require_root("the tests make unix users")
        with unix_users(*names):
            yield

    return made


@pytest.fixture(scope="module")
def tool(sandbox: Sandbox, users: None) -> Iterator[JobTool]:
    """The job tool (the agent's view of a job's devices on each host), for the module."""
    with job_tool(sandbox) as made:
        yield made


@dataclass
class Shared:
    """A directory every test user can read: user configuration, scripts, flags."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def flags(self) -> Path:
        return self.root / "flags"


@contextlib.contextmanager
def shared_dir(templates: str, files: dict[str, str]) -> Iterator[Shared]:
    root = Path(tempfile.mkdtemp(prefix="vcluster-alloc-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        shared = Shared(root)
        shared.home.mkdir(mode=0o755)
        (shared.home / "templates.yaml").write_text(templates)
        for name, text in files.items():
            (shared.home / name).write_text(text)
            (shared.home / name).chmod(0o755)
        shared.flags.mkdir()
        shared.flags.chmod(0o1777)
        yield shared
    finally:
        shutil.rmtree(root, ignore_errors=True)


def alloc_argv(box: Sandbox, user: str, home: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "vcluster", "sandbox", "run", "--dir", str(box.directory),
            "--user", user, "--", "env", f"VCLUSTER_HOME={home}", "vcluster", "alloc", *args]


def alloc(box: Sandbox, user: str, home: Path, *args: str,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``vcluster alloc ARGS`` as ``user`` on the login node, to completion."""
    return subprocess.run(alloc_argv(box, user, home, args), capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def job_of(output: str) -> str:
    match = _JOB.search(output)
    assert match, f"no job id in:\n{output}"
    return match.group(1)


@dataclass
class BackgroundAlloc:
    """``vcluster alloc`` running in the background; its output collected as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        wait_for("the cluster to be ready", lambda: " ready in " in self.output
                 or self.proc.poll() is not None, timeout)
        assert " ready in " in self.output, self.output
        return job_of(self.output)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


@contextlib.contextmanager
def background_alloc(box: Sandbox, user: str, home: Path, *args: str) -> Iterator[BackgroundAlloc]:
    proc = subprocess.Popen(alloc_argv(box, user, home, args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    running = BackgroundAlloc(proc)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def qemu_pids(job: str) -> list[int]:
    """QEMU processes of ``job`` (their command lines name the job's work directory)."""
    marker = f"/work/{job}/vm".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"qemu-system" in cmdline and marker in cmdline:
                    found.append(int(entry.name))
    return found


def job_process(job: str, words: tuple[bytes, ...], procid: int | None = None) -> int:
    """The process of ``job`` whose argv has all ``words`` (and SLURM_PROCID, if given)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not all(w in argv for w in words):
                continue
            env = dict(item.split(b"=", 1) for item in
                       (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
            if env.get(b"SLURM_JOB_ID") == job.encode() and (
                    procid is None or env.get(b"SLURM_PROCID") == str(procid).encode()):
                return int(entry.name)
    raise AssertionError(f"no process {b' '.join(words).decode()} of job {job}")


def runner_pid(job: str, index: int) -> int:
    """The VM runner (``vcluster internal vm``) of VM ``index`` of ``job``."""
    return job_process(job, (b"internal", b"vm"), index)


def launcher_pid(job: str) -> int:
    """The launcher (``vcluster internal launcher``) of ``job``."""
    return job_process(job, (b"internal", b"launcher"))


def assert_nothing_left(box: Sandbox, tool: JobTool, job: str, user: str,
                        host: str = "h1") -> None:
    """Once the epilog ran: no QEMU, device, region, undo log, work directory or key."""
    wait_for(f"the epilog of job {job} on {host}",
             lambda: epilog_ran(box, job, host) is not None, 60)
    assert epilog_ran(box, job, host) == "ok"
    wait_for(f"the QEMU processes of job {job} to end", lambda: qemu_pids(job) == [], 30)
    nothing_left(tool, job, host)
    assert store_keys(box, f"/vcluster/jobs/{job}/") == []
    assert store_keys(box, f"/vcluster/users/{user}/clusters/{job}/") == []


def wait_flag(shared: Shared, name: str) -> str:
    """A shell loop for -E scripts: wait (bounded) until the test touches flags/NAME."""
    return f"for i in $(seq 600); do [ -e {shared.flags}/{name} ] && break; sleep 0.2; done"


def job_hosts(box: Sandbox, job: str) -> list[str]:
    """The hosts SLURM gave ``job``: those whose prolog logged it."""
    hosts = {m.group(1) for line in box.script_log()
             if (m := re.search(rf" prolog job={job} node=(\S+) ", line))}
    return sorted(hosts)


def touch(path: Path) -> None:
    path.touch()
    os.chmod(path, 0o666)


def alloc_pid(user: str) -> int:
    """The ``vcluster alloc`` process of ``user`` (there is one at a time in these tests)."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != uid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"alloc" in argv and any(a.endswith(b"vcluster") for a in argv):
                return int(entry.name)
    raise AssertionError(f"no vcluster alloc process of {user}")


def nothing_left_anywhere(sandbox: Sandbox, tool: JobTool, job: str, user: str,
                          hosts: Sequence[str] = ("h1", "h2", "h3")) -> None:
    """Once the job's epilogs ran: nothing of it on any host, nor in the store's pools."""
    ran_on = job_hosts(sandbox, job)
    assert ran_on, f"no prolog of job {job} logged"
    for host in ran_on:
        assert_nothing_left(sandbox, tool, job, user, host)
    for host in set(hosts) - set(ran_on):
        nothing_left(tool, job, host)
    held = [k for k in store_keys(sandbox, "/vcluster/pools/")
            if pool_owner(sandbox, k) == job]
    assert held == []


def pool_owner(sandbox: Sandbox, key: str) -> str | None:
    """The job a pool entry names (its value is the job id, or JSON with "job")."""
    value = store_value(sandbox, key)
    if value is None:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return value
    return str(data.get("job")) if isinstance(data, dict) else str(data)
