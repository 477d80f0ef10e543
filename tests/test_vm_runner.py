"""The VM runner for real: SLURM steps in the sandbox, the host agent, QEMU, etcd.

Each test holds an allocation on h1 with a batch job, writes the cluster spec
to the store the way the launcher does, and starts ``vcluster internal vm``
with srun, one task per VM.  Runs as root for now (the project's Python is
root's only).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support_alloc import qemu_pids
from tests.support_images import FAM_A, FAM_B, require_image
from tests.support_sandbox import Sandbox, sandbox  # noqa: F401 (fixture)
from tests.support_vm import cluster_spec, store_tool, tiny_boot, vm_plan, wait_state
from vcluster.cluster import FamPlan
from vcluster.sandbox.state import require
from vcluster.sandbox.use import command
from vcluster.store.keys import Keys
from vcluster.store.records import to_json

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

KEYS = Keys("/vcluster")
USER = "root"



def on_host(box: Sandbox, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv as run from the login node (the controller); the sandbox's TaskProlog gives
    each task its own host's configuration."""
    cmd = command(require(box.directory), argv)
    return cmd.argv, cmd.env


def task(box: Sandbox, job: str, *argv: str, tasks: int = 1, pty_: bool = False) -> list[str]:
    return ["srun", "--jobid", job, "--overlap", "-w", "h1", "-n", str(tasks),
            *(["--pty"] if pty_ else []),
            sys.executable, "-m", "vcluster",
            "internal", *argv]


@contextlib.contextmanager
def allocation(box: Sandbox, tasks: int) -> Iterator[str]:
    """A job holding ``tasks`` CPUs on h1, cancelled on the way out."""
    proc = box.run(["sbatch", "--parsable", "-N1", "-w", "h1", "-n", str(tasks), "-c", "1",
                    "-o", "/dev/null", "--wrap", "sleep 900"])
    job = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 30
        while box.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, f"job {job} did not start"
            time.sleep(0.3)
        yield job
    finally:
        box.run(["scancel", job], check=False)
        store_tool(box.directory, "delete-prefix", KEYS.cluster_prefix(USER, job))


@contextlib.contextmanager
def runners(box: Sandbox, job: str, count: int) -> Iterator[subprocess.Popen[str]]:
    argv, env = on_host(box, task(box, job, "vm", tasks=count))
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def put_spec(box: Sandbox, job: str, vms: list[object]) -> None:
    spec = cluster_spec(job, vms, user=USER)  # type: ignore[arg-type]
    proc = store_tool(box.directory, "put", KEYS.cluster_spec(USER, job), stdin=to_json(spec))
    assert proc.returncode == 0, proc.stderr


def console_session(box: Sandbox, job: str, vm: int, line: str, expect: str) -> str:
    """Attach to a console through srun --pty, type ``line``, wait for ``expect``, detach."""
    argv, env = on_host(box, task(box, job, "console-attach", "--vm", str(vm), pty_=True))
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    out = b""

    def read_until(text: bytes, timeout: float) -> bool:
        nonlocal out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and text not in out:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    return False
        return text in out

    try:
        assert read_until(b"detach with Ctrl-]", 20), out.decode(errors="replace")
        # The guest's shell may still be starting (it drops what was typed before).
        deadline = time.monotonic() + 30
        while True:
            os.write(master, b"echo sync-$((6*7))\r")
            if read_until(b"sync-42", 2) or time.monotonic() > deadline:
                break
        os.write(master, line.encode() + b"\r")
        assert read_until(expect.encode(), 20), out.decode(errors="replace")
        os.write(master, b"\x1d")
        assert proc.wait(timeout=20) == 0
        return out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_two_tiny_vms_boot_share_fam_and_network_then_stop(sandbox: Sandbox) -> None:  # noqa: F811
    boot = tiny_boot(require_image("tiny"))
    fam = FamPlan("fam", 1 << 20)
    vms = [vm_plan(0, boot, fam=fam, user_data=FAM_A), vm_plan(1, boot, fam=fam,
                                                                 user_data=FAM_B)]
    with allocation(sandbox, 2) as job:
        put_spec(sandbox, job, vms)  # type: ignore[arg-type]
        with runners(sandbox, job, 2) as srun:
            for i in (0, 1):
                result = wait_state(sandbox.directory, KEYS.vm(USER, job, i), "ready,failed", 90)
                record = result["record"]
                assert record and record["state"] == "ready", (result, srun.poll())
                order = ["pending", "preparing", "booting", "ready"]
                positions = [order.index(state) for state in result["seen"]]
                assert positions == sorted(positions), result["seen"]  # never backwards
                assert record["host"] == "h1" and record["addresses"] == [f"10.77.0.{i + 1}"]
            # the console log, as `vcluster console -l` shows it
            argv, env = on_host(sandbox, task(sandbox, job, "console-attach", "--vm", "1",
                                              "--log"))
            log = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            assert "vcluster-tiny: ready hostname=vm1" in log.stdout, log.stderr
            assert "fam-b: read 0x76636C31" in log.stdout  # vm0's marker, seen through BAR2
            # an interactive console: vm0 reaches vm1 by name on the private network
            out = console_session(sandbox, job, 0, "ping -c 1 -W 5 vm1 && echo ping-$((40+2))ok",
                                  "ping-42ok")
            assert "10.77.0.2" in out
            assert len(qemu_pids(job)) == 2
            # stop the step as the launcher does: SIGTERM to its tasks
            started = time.monotonic()
            sandbox.run(["scancel", "--signal=TERM", f"{job}.0"])
            for i in (0, 1):
                result = wait_state(sandbox.directory, KEYS.vm(USER, job, i), "stopped,failed",
                                    30)
                assert result["record"]["state"] == "stopped", result
                assert "stopping" in result["seen"] or result["seen"] == ["stopped"]
            output, _ = srun.communicate(timeout=30)
            assert srun.returncode == 0, output
            print(f"stopped in {time.monotonic() - started:.1f} s")
            assert "vm0: stopped" in output and "vm1: stopped" in output
            assert qemu_pids(job) == []
            work = sandbox.directory / "hosts" / "h1" / "state" / "work" / job
            assert work.is_dir() and list(work.iterdir()) == []  # the runners removed theirs


def test_bad_qemu_argument_fails_within_seconds(sandbox: Sandbox) -> None:  # noqa: F811
    boot = tiny_boot(require_image("tiny"))
    with allocation(sandbox, 1) as job:
        put_spec(sandbox, job, [vm_plan(0, boot, nics=0, qemu_args=("-foo",))])
        started = time.monotonic()
        with runners(sandbox, job, 1) as srun:
            result = wait_state(sandbox.directory, KEYS.vm(USER, job, 0), "failed,ready", 30)
            took = time.monotonic() - started
            record = result["record"]
            assert record["state"] == "failed", result
            assert "QEMU exited with status 1" in record["error"]
            assert "-foo: invalid option" in record["error"]
            assert isinstance(record["console_tail"], list)
            output, _ = srun.communicate(timeout=30)
            assert srun.returncode != 0
            assert "Traceback" not in output
            assert took < 20, f"failing took {took:.1f} s"
            assert qemu_pids(job) == []


def test_console_of_a_vm_that_is_not_there_is_a_clear_error(sandbox: Sandbox  # noqa: F811
                                                            ) -> None:
    with allocation(sandbox, 1) as job:
        argv, env = on_host(sandbox, task(sandbox, job, "console-attach", "--vm", "5"))
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode != 0
        assert "no console at" in proc.stderr and "Traceback" not in proc.stderr
        assert json.dumps(proc.stderr).count("\\n") <= 3
