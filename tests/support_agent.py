"""Helpers for testing the host agent in the sandbox, as real unix users.

Unprivileged users cannot run the project's Python here (it lives under
/root, mode 700), and need not: the agent's client is stdlib-only.  ``JobTool``
copies ``vcluster/agent/client.py`` and a small job script into a directory
everyone can read, and runs the script with the system's ``/usr/bin/python3``
as a SLURM step of a job (``srun --jobid``), as the job's user.  Checks of
what the agent made run as root with this interpreter, in the host's network
namespace (``sandbox.run``).
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vcluster.agent.client
from tests.support_sandbox import Sandbox

SYSTEM_PYTHON = "/usr/bin/python3"

JOB_SCRIPT = r'''
"""Ask the local agent for VM resources as a SLURM task would, and describe what came."""
import fcntl, json, mmap, os, struct, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import AgentClient, AgentError

def tap_of(fd):
    raw = fcntl.ioctl(fd, 0x800454D2, bytes(40))  # TUNGETIFF
    name, flags = struct.unpack_from("16sH", raw)
    return name.rstrip(b"\0").decode(), flags

def fam_check(path, size):
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), size) as m:
            m[0:6] = b"marker"
            return bytes(m[0:6]) == b"marker"

socket_path, job, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = AgentClient(socket_path)
results, held = [], []
for step in plan:
    try:
        if step.get("op") == "credentials":
            results.append(client.credentials())
            continue
        if step.get("op"):
            results.append(client.call(step["op"], **step.get("fields", {})))
            continue
        dev = client.vm_resources(job, step["vm"], step["networks"], step.get("fam"))
    except AgentError as e:
        results.append({"error": str(e), "code": e.code})
        continue
    taps = []
    for t in dev.taps:
        name, flags = tap_of(t.fd)
        taps.append({"network": t.network, "ifname": t.ifname, "fd_ifname": name,
                     "flags": flags})
    fam = None
    if dev.fam is not None:
        fam = {"path": dev.fam.path, "size": dev.fam.size,
               "mapped": fam_check(dev.fam.path, dev.fam.size)}
    results.append({"taps": taps, "fam": fam, "workdir": dev.workdir, "pid": os.getpid()})
    if step.get("keep"):
        held.append(dev)
    else:
        dev.close()
print(json.dumps(results))
'''

LINKS_SCRIPT = r'''
import json
from pyroute2 import IPRoute
out = {}
with IPRoute() as ipr:
    links = ipr.get_links()
    names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in links}
    for l in links:
        info = l.get_attr("IFLA_LINKINFO")
        out[l.get_attr("IFLA_IFNAME")] = {
            "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
            "master": names.get(l.get_attr("IFLA_MASTER")),
            "mtu": l.get_attr("IFLA_MTU"),
            "up": bool(l["flags"] & 1),
        }
print(json.dumps(out))
'''

BRIDGE_SCRIPT = r'''
import sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.link("add", ifname=sys.argv[1], kind="bridge")
'''


def private(name: str, mtu: int = 1450) -> dict[str, Any]:
    return {"name": name, "type": "private", "mtu": mtu}


@dataclass
class JobTool:
    """The job script and the client, where every user can run them."""

    directory: Path
    box: Sandbox

    def socket(self, host: str) -> Path:
        return self.box.directory / "hosts" / host / "run" / "agent.sock"

    def state_dir(self, host: str) -> Path:
        return self.box.directory / "hosts" / host / "state"

    def run_dir(self, host: str) -> Path:
        return self.box.directory / "hosts" / host / "run"

    def argv(self, host: str, job: str, plan: list[dict[str, Any]]) -> list[str]:
        return [SYSTEM_PYTHON, str(self.directory / "job.py"), str(self.socket(host)), job,
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
            self.box.run([sys.executable, "-c", LINKS_SCRIPT], host=host).stdout)
        return data

    def add_bridge(self, host: str, name: str) -> None:
        self.box.run([sys.executable, "-c", BRIDGE_SCRIPT, name], host=host)

    def job_links(self, host: str, job: str) -> list[str]:
        from vcluster.agent.netdev import job_prefixes

        return sorted(n for n in self.links(host) if n.startswith(job_prefixes(job)))


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
        shutil.copy(vcluster.agent.client.__file__, directory / "client.py")
        (directory / "job.py").write_text(JOB_SCRIPT)
        for path in directory.iterdir():
            path.chmod(0o644)
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
    """A job of ``user`` holding ``host`` with ``ntasks`` tasks (salloc --no-shell); its id.

    More than one task is allocated with ``--overcommit`` (one CPU for all of them), so
    other tests' jobs still fit on the sandbox's small hosts; NumTasks is ``ntasks``.
    """
    overcommit = ["--overcommit"] if ntasks > 1 else []
    proc = box.run(["salloc", "--no-shell", "-N1", f"--ntasks={ntasks}", *overcommit, "-w",
                    host, "-J", "agent-test"], user=user)
    match = _GRANTED.search(proc.stderr + proc.stdout)
    assert match, proc.stderr
    return match.group(1)


def cancel(box: Sandbox, job: str) -> None:
    box.run(["scancel", job], check=False)


def wait_for(what: str, condition: Any, timeout: float = 20.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def epilog_ran(box: Sandbox, job: str, host: str = "h1") -> str | None:
    """The agent= result the epilog of ``job`` on ``host`` logged, None if it has not run."""
    for line in box.script_log():
        if f" epilog job={job} node={host} " in line:
            return line.split(" agent=", 1)[1]
    return None


def nothing_left(tool: JobTool, job: str, host: str = "h1") -> None:
    assert tool.job_links(host, job) == []
    assert not (tool.state_dir(host) / "jobs" / job).exists()
    assert not (tool.run_dir(host) / "jobs" / job).exists()
    assert not (tool.state_dir(host) / "work" / job).exists()
    assert Path("/etc/hostname").exists()  # a planted link was not followed


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


def put_keys(box: Sandbox, values: dict[str, str]) -> None:
    """Write ``values`` (key: value) into the sandbox's store, as root."""
    code = _OPEN_STORE + f"[s.put(k, v) for k, v in {values!r}.items()]"
    box.run([sys.executable, "-c", code])


HOLD_SCRIPT = r'''
"""Open N connections to the agent and send nothing: what got "busy" at once, and later."""
import json, select, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
time.sleep(1.0)
ready, _, _ = select.select(socks, [], [], 0)
busy = [json.loads(s.recv(4096)) for s in ready]
print(json.dumps({"busy": len(busy), "first": busy[0] if busy else None}), flush=True)
rest = [s for s in socks if s not in ready]
answers, deadline = [], time.monotonic() + 40
while rest and time.monotonic() < deadline:
    got, _, _ = select.select(rest, [], [], 1)
    for s in got:
        answers.append(json.loads(s.recv(4096)))
        rest.remove(s)
print(json.dumps({"answered": len(answers), "sample": answers[0] if answers else None,
                  "left": len(rest)}), flush=True)
'''


@contextlib.contextmanager
def idle_clients(socket_path: Path, user: str, count: int) -> Iterator[subprocess.Popen[str]]:
    """``count`` connections of ``user`` that send nothing (a process of the test, by PID)."""
    proc = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                             SYSTEM_PYTHON, "-c", HOLD_SCRIPT, str(socket_path), str(count)],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
