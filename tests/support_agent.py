"""Helpers for testing the host agent in the sandbox, as real unix users.

Unprivileged users cannot run the project's Python here (it lives under
/root, mode 700), and need not: the agent's client needs only the standard
library and a few modules of vcluster (``CLIENT_FILES``).  ``JobTool`` copies
those and the programs of ``tests/helpers/agent_*.py`` into a directory
everyone can read, and runs ``agent_job.py`` with the system's
``/usr/bin/python3`` as a SLURM step of a job (``srun --jobid``), as the
job's user.  Checks of what the agent made run as root with this
interpreter, in the host's network namespace (``sandbox.run``).
"""

from __future__ import annotations

import contextlib
import json
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support_sandbox import Sandbox
from vcluster.hostpaths import HostLayout
from vcluster.sandbox import vconf

SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
# What the agent's client imports (test_agent_unit checks it), copied beside the job program.
CLIENT_FILES = ("vcluster/__init__.py", "vcluster/errors.py", "vcluster/codec.py",
                "vcluster/agent/__init__.py", "vcluster/agent/protocol.py",
                "vcluster/agent/client.py", "vcluster/qemu.py")
PROGRAMS = ("agent_job.py", "agent_links.py", "agent_bridge.py", "agent_hold.py",
            "agent_nft.py")


def private(name: str, mtu: int = 1450, vni: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "type": "private", "mtu": mtu}
    if vni is not None:
        spec["vni"] = vni
    return spec


@dataclass
class JobTool:
    """The job script and the client, where every user can run them."""

    directory: Path
    box: Sandbox

    def layout(self, host: str) -> HostLayout:
        """The paths of ``host`` (or ``ctl``), as its batch.yaml says them."""
        return vconf.machine_layout(self.box.directory, host)

    def socket(self, host: str) -> Path:
        return self.layout(host).agent_socket

    def state_dir(self, host: str) -> Path:
        return self.layout(host).state

    def run_dir(self, host: str) -> Path:
        return self.layout(host).run

    def program(self, name: str) -> str:
        """A program of tests/helpers, as copied where every user can read it."""
        return str(self.directory / name)

    def argv(self, host: str, job: str, plan: list[dict[str, Any]]) -> list[str]:
        return [SYSTEM_PYTHON, self.program("agent_job.py"), str(self.socket(host)), job,
                json.dumps(plan)]

    def step(self, user: str, job: str, plan: list[dict[str, Any]], host: str = "h1",
             as_job: str | None = None) -> list[dict[str, Any]]:
        """Run the plan as a step of job ``as_job`` (default ``job``) on ``host``."""
        srun = ["srun", f"--jobid={as_job or job}", "-N1", "-w", host]
        proc = self.box.run([*srun, *self.argv(host, job, plan)], user=user)
        return _results(proc)

    def outside(self, user: str, job: str, plan: list[dict[str, Any]],
                host: str = "h1") -> list[dict[str, Any]]:
        """Run the plan on ``host`` as ``user``, outside of any job."""
        return _results(self.box.run(self.argv(host, job, plan), host=host, user=user))

    def agent(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vcluster-agent ARGS`` as root on ``host``."""
        return self.box.run(["vcluster-agent", *args], host=host, check=check)

    def links(self, host: str) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = json.loads(
            self.box.run([sys.executable, self.program("agent_links.py")], host=host).stdout)
        return data

    def add_bridge(self, host: str, name: str) -> None:
        self.box.run([sys.executable, self.program("agent_bridge.py"), name], host=host)

    def job_links(self, host: str, job: str) -> list[str]:
        """The job's bridges, taps and VXLAN devices on ``host``."""
        from vcluster.agent.netdev import job_prefixes

        return sorted(n for n in self.links(host) if n.startswith(job_prefixes(job)))

    def job_fdb(self, host: str, job: str) -> list[str]:
        """Forwarding entries towards other hosts on the job's devices on ``host``."""
        from vcluster.agent.netdev import job_prefixes

        return sorted(f"{name} dst {dst}" for name, link in self.links(host).items()
                      if name.startswith(job_prefixes(job)) for dst in link["fdb"])

    def job_tables(self, host: str, job: str) -> list[str]:
        """The job's nftables table on ``host`` (``vcluster_job_<job>``), if it has one."""
        tables: list[str] = json.loads(
            self.box.run([sys.executable, self.program("agent_nft.py")], host=host).stdout)
        return [t for t in tables if t == f"vcluster_job_{job}"]


def _results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output from the job script:\n{proc.stderr}"
    data: list[dict[str, Any]] = json.loads(lines[-1])
    return data


@contextlib.contextmanager
def job_tool(box: Sandbox) -> Iterator[JobTool]:
    directory = Path(tempfile.mkdtemp(prefix="vcluster-agent-test-", dir="/var/tmp"))
    try:
        directory.chmod(0o755)
        for name in CLIENT_FILES:
            (directory / name).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.copy(ROOT / name, directory / name)
        for name in PROGRAMS:
            shutil.copy(HELPERS / name, directory / name)
        for path in directory.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield JobTool(directory, box)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def unix_users(*names: str) -> Iterator[list[pwd.struct_passwd]]:
    """Unix users made for the test (no home), removed afterwards."""
    made: list[str] = []
    try:
        for name in names:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                subprocess.run(["userdel", name], check=False, capture_output=True)
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name],
                           check=True, capture_output=True)
            made.append(name)
        yield [pwd.getpwnam(n) for n in names]
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)


_GRANTED = re.compile(r"Granted job allocation (\d+)")


def allocate(box: Sandbox, user: str, host: str = "h1", ntasks: int = 1) -> str:
    """A job of ``user`` holding ``host`` (or ``h1,h2``: those nodes) with ``ntasks`` tasks
    (salloc --no-shell); its id.

    More than one task is allocated with ``--overcommit`` (one CPU for all of them), so
    other tests' jobs still fit on the sandbox's small hosts; NumTasks is ``ntasks``.
    """
    overcommit = ["--overcommit"] if ntasks > 1 else []
    nodes = len(host.split(","))
    proc = box.run(["salloc", "--no-shell", f"-N{nodes}", f"--ntasks={ntasks}", *overcommit,
                    "-w", host, "-J", "agent-test"], user=user)
    match = _GRANTED.search(proc.stderr + proc.stdout)
    assert match, proc.stderr
    return match.group(1)


def cancel(box: Sandbox, job: str) -> None:
    box.run(["scancel", job], check=False)


def epilog_ran(box: Sandbox, job: str, host: str = "h1") -> str | None:
    """The agent= result the epilog of ``job`` on ``host`` logged, None if it has not run."""
    for line in box.script_log():
        if f" epilog job={job} node={host} " in line:
            return line.split(" agent=", 1)[1]
    return None


def nothing_left(tool: JobTool, job: str, host: str = "h1") -> None:
    """Nothing of ``job`` on ``host``: no device (bridge, tap, VXLAN), forwarding entry,
    nftables table, file, and no VXLAN id of the job in the store."""
    assert tool.job_links(host, job) == []
    assert tool.job_fdb(host, job) == []
    assert tool.job_tables(host, job) == []
    assert [p for p in tool.layout(host).job_paths(job) if p.exists()] == []
    assert Path("/etc/hostname").exists()  # a planted link was not followed
    assert store_keys(tool.box, f"/vcluster/jobs/{job}/vni/") == []
    assert vnis_held(tool.box, job) == []


_OPEN_STORE = ("import json, os; from pathlib import Path; "
               "from vcluster.config.batch import parse_batch; "
               "from vcluster.schema.source import load_yaml; "
               "from vcluster.store import open_store; "
               "p = Path(os.environ['VCLUSTER_CONF']) / 'batch.yaml'; "
               "s = open_store(parse_batch(load_yaml(p), p).store); ")


def store_keys(box: Sandbox, prefix: str) -> list[str]:
    code = _OPEN_STORE + f"print(json.dumps([e.key for e in s.get_prefix({prefix!r})]))"
    keys: list[str] = json.loads(box.run([sys.executable, "-c", code]).stdout)
    return keys


def store_value(box: Sandbox, key: str) -> str | None:
    """One key's value in the sandbox's store (read as root), None if absent."""
    code = (_OPEN_STORE + f"e = s.get({key!r}); "
            "print(json.dumps(None if e is None else e.value))")
    value: str | None = json.loads(box.run([sys.executable, "-c", code]).stdout)
    return value


def store_put(box: Sandbox, key: str, value: str) -> None:
    """Write one key in the sandbox's store, as root."""
    box.run([sys.executable, "-c", _OPEN_STORE + f"s.put({key!r}, {value!r})"])


def store_entries(box: Sandbox, prefix: str) -> dict[str, str]:
    """The keys under ``prefix`` and their values."""
    code = _OPEN_STORE + f"print(json.dumps({{e.key: e.value for e in s.get_prefix({prefix!r})}}))"
    entries: dict[str, str] = json.loads(box.run([sys.executable, "-c", code]).stdout)
    return entries


def vnis_held(box: Sandbox, job: str) -> list[str]:
    """The VXLAN pool entries (``pools/vni/<id>``) naming ``job``."""
    from vcluster.agent.vnis import owned_by

    return sorted(k for k, v in store_entries(box, "/vcluster/pools/vni/").items()
                  if owned_by(v, job))


def put_keys(box: Sandbox, values: dict[str, str]) -> None:
    """Write ``values`` (key: value) into the sandbox's store, as root."""
    code = _OPEN_STORE + f"[s.put(k, v) for k, v in {values!r}.items()]"
    box.run([sys.executable, "-c", code])


@contextlib.contextmanager
def idle_clients(tool: JobTool, socket_path: Path, user: str,
                 count: int) -> Iterator[subprocess.Popen[str]]:
    """``count`` connections of ``user`` that send nothing (a process of the test, by PID)."""
    proc = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                             SYSTEM_PYTHON, tool.program("agent_hold.py"), str(socket_path),
                             str(count)], stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
