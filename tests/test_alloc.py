"""``vcluster alloc`` for real: SLURM, agents, etcd, QEMU and cloud-init in the sandbox.

Every test runs alloc as a unix user made for it, on the sandbox's login node,
and ends by checking that the job left nothing behind once its epilog ran.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.waiting import wait_for
from tests.support_agent import JobTool, store_keys
from tests.support_alloc import (
    Shared,
    alloc,
    alloc_pid,
    assert_nothing_left,
    background_alloc,
    job_of,
    launcher_pid,
    module_users,
    qemu_pids,
    runner_pid,
    shared_dir,
    tool,
    touch,
    wait_flag,
)
from tests.support_images import guest_script, require_image
from tests.support_sandbox import Sandbox, sandbox

__all__ = ["sandbox", "tool"]

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

ALICE, BOB = "vcalloc-alice", "vcalloc-bob"
MARKER = "0x76636C31"

FAM_SCRIPT = guest_script("fam-test.sh")  # writes or waits for MARKER

TEMPLATES = """\
famtest:
  inherits: tiny-fam
  user-data: fam.sh
broken:
  inherits: tiny
  qemu-args: [-nosuchoption]
ghost:
  inherits: tiny
  image: nosuch
"""


users = module_users(ALICE, BOB)


@pytest.fixture(scope="module")
def shared(users: None) -> Iterator[Shared]:
    require_image("tiny")
    with shared_dir(TEMPLATES, {"fam.sh": FAM_SCRIPT}) as made:
        yield made


def test_tiny_fam_cluster_shares_memory_and_leaves_nothing(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    run_dir = sandbox.directory / "hosts" / "h1" / "run"
    script = f"""set -e
echo "job=$VCLUSTER_JOB_ID"
vcluster ps
for i in $(seq 100); do
    vcluster console -l vm1 | grep -q "fam-test: vm1" && break
    sleep 0.2
done
vcluster console -l vm0 | grep "fam-test:"
vcluster console -l vm1 | grep "fam-test:"
echo "host file: $(od -A n -t x4 -N 4 {run_dir}/jobs/$VCLUSTER_JOB_ID/fam/fam)"
"""
    proc = alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E", script, "famtest:2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    job = job_of(out)
    assert f"job={job}" in out  # VCLUSTER_JOB_ID was set for the script
    assert re.search(rf"^{job}\s+vcluster\s+alloc\s+ready\s+2\s+2 ready\s+h1$", out, re.M), out
    assert f"fam-test: vm0 wrote {MARKER}" in out
    assert f"fam-test: vm1 read {MARKER}" in out
    assert f"host file:  {MARKER[2:].lower()}" in out
    assert f"vcluster: job {job}: stopped" in out
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_debian_cloud_init_applies_the_seed(sandbox: Sandbox, shared: Shared,
                                            tool: JobTool) -> None:
    """The debian image end to end: cloud-init's hostname, /etc/hosts, the cluster's key for
    the image's default user and the runner's host key (vcluster ssh checks it), the nat
    network's address and default route, and exec through qemu-guest-agent."""
    require_image("debian")
    pubkey = (f"{sys.executable} -c \"from vcluster.identity import user_name; "
              "from vcluster.config.loader import "
              "load_config; from vcluster.session import open_user_store; "
              "from vcluster.store.keys import Keys; c = load_config(); "
              "s = open_user_store(c.batch); k = Keys(c.batch.store.prefix).cluster_key("
              "user_name(), '$VCLUSTER_JOB_ID', 'id_ed25519.pub'); "
              "print('cluster key:', s.get(k).value)\"")
    guest = ("echo hostname: $(hostname); echo user: $(id -un); cat /etc/hosts; "
             "cat ~/.ssh/authorized_keys; ip route")
    script = f"""set -e
{pubkey}
vcluster ssh vm0 '{guest}'
vcluster exec vm0 -- sh -c 'echo exec: $(hostname) as $(id -un)'
"""
    proc = alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E", script, "debian:1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    job = job_of(out)
    key = re.search(r"^cluster key: (ssh-ed25519 \S+)", out, re.M)
    assert key, out
    assert "hostname: vm0" in out and "user: debian" in out, out
    assert re.search(r"^10\.200\.0\.1\s+vm0\b", out, re.M), out  # /etc/hosts lists the cluster
    authorized = [line for line in out.splitlines() if line.startswith("ssh-ed25519 ")]
    assert any(line.split()[1] == key.group(1).split()[1] for line in authorized), out
    assert re.search(r"^default via 10\.250\.\d+\.\d+ dev \S+", out, re.M), out
    assert "exec: vm0 as root" in out, out
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_missing_image_is_refused_before_submitting(sandbox: Sandbox, shared: Shared) -> None:
    proc = alloc(sandbox, ALICE, shared.home, "-c", "1", "ghost:1", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vcluster: error: {shared.home}/templates.yaml:9: ghost.image: image 'nosuch' not "
        f"found in {shared.home}/images, {sandbox_images()} (images there: debian, tiny); "
        "build one with: vcluster image build RECIPE"]
    assert "salloc" not in proc.stdout + proc.stderr
    assert sandbox.run(["squeue", "-h", "-u", ALICE]).stdout.strip() == ""


def sandbox_images() -> Path:
    from tests.support_images import images_dir

    return images_dir()


def test_qemu_that_cannot_start_fails_fast_and_leaves_nothing(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    proc = alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E", "true", "broken:1",
                 timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert ("vcluster: error: vm0 failed on h1: QEMU exited with status 1: "
            "qemu-system-x86_64: -nosuchoption: invalid option") in out
    assert "console (last lines):" in out
    assert_nothing_left(sandbox, tool, job_of(out), ALICE)


def test_scancel_of_a_running_allocation_leaves_nothing(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          "sleep 600", "tiny:2") as running:
        job = running.wait_ready()
        assert len(qemu_pids(job)) == 2
        sandbox.run(["scancel", job])
        code = running.finish(90)
    assert code == 130, running.output
    assert "stopped the cluster: the job was cancelled or reached its time limit (SIGTERM)" \
        in running.output
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_sigterm_to_alloc_stops_the_cluster(sandbox: Sandbox, shared: Shared,
                                            tool: JobTool) -> None:
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          "sleep 600", "tiny:1") as running:
        job = running.wait_ready()
        os.kill(alloc_pid(ALICE), signal.SIGTERM)
        code = running.finish(90)
    assert code == 130, running.output
    assert f"vcluster: job {job}: stopped" in running.output
    assert "stopped the cluster: the job was cancelled or reached its time limit (SIGTERM)" \
        in running.output
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_killed_runner_takes_its_qemu_and_the_job_ends_clean(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          f"{wait_flag(shared, 'kill9')}; vcluster ps", "tiny:2") as running:
        job = running.wait_ready()
        pids = qemu_pids(job)
        assert len(pids) == 2
        os.kill(runner_pid(job, 1), signal.SIGKILL)
        wait_for("vm1's QEMU to die with its runner", lambda: len(qemu_pids(job)) == 1, 15)
        wait_for("alloc's warning", lambda: "vcluster: warning: h1: task 1: Killed"
                 in running.output, 15)
        touch(shared.flags / "kill9")
        code = running.finish(120)
    assert code == 0, running.output
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_agent_restarted_mid_job_keeps_its_resources(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    from vcluster.sandbox import agents, state

    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          f"{wait_flag(shared, 'restart')}; vcluster ps", "tiny-fam:1") as running:
        job = running.wait_ready()
        links = tool.job_links("h1", job)
        region = tool.run_dir("h1") / "jobs" / job / "fam" / "fam"
        assert links and region.exists()
        agents.restart(state.require(sandbox.directory), "h1")
        wait_for("the restarted agent", lambda: tool.agent("h1", "ping", check=False)
                 .returncode == 0, 20)
        assert tool.job_links("h1", job) == links
        assert region.exists() and len(qemu_pids(job)) == 1
        touch(shared.flags / "restart")
        code = running.finish(120)
    assert code == 0, running.output
    assert re.search(rf"^{job}\s+vcluster\s+alloc\s+ready\s+1\s+1 ready\s+h1$", running.output,
                     re.M)
    assert_nothing_left(sandbox, tool, job, ALICE)


def test_killed_launcher_leaves_nothing_once_the_epilog_ran(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    # The launcher cannot clean up after SIGKILL: the cluster's keys (its ssh private key
    # among them) must go with the agents' release.
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          wait_flag(shared, "launcher"), "tiny:1") as running:
        job = running.wait_ready()
        assert store_keys(sandbox, f"/vcluster/users/{ALICE}/clusters/{job}/")
        os.kill(launcher_pid(job), signal.SIGKILL)
        running.finish(90)
    touch(shared.flags / "launcher")  # the orphaned -E loop ends too
    assert_nothing_left(sandbox, tool, job, ALICE)


INTRUDER = (Path(__file__).resolve().parent / "helpers" / "intruder.py").read_text()


def test_another_user_cannot_reach_the_cluster(sandbox: Sandbox, shared: Shared,
                                               tool: JobTool) -> None:
    intruder = shared.root / "intruder.py"
    intruder.write_text(INTRUDER)
    intruder.chmod(0o644)
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-w", "h1", "-E",
                          wait_flag(shared, "isolation"), "tiny-fam:1") as running:
        job = running.wait_ready()
        work = tool.state_dir("h1") / "work" / job
        fam = tool.run_dir("h1") / "jobs" / job / "fam" / "fam"
        # Through vcluster: bob's store has no such cluster.
        console = sandbox.run(["vcluster", "console", "-j", job, "vm0"], user=BOB, check=False)
        assert console.returncode == 2
        assert f"-j {job}: you have no cluster in job {job}" in console.stderr
        # Through SLURM directly: not bob's job.
        step = sandbox.run(["srun", f"--jobid={job}", "--overlap", "-w", "h1", "true"],
                           user=BOB, check=False)
        assert step.returncode != 0
        assert "Access/permission denied" in step.stderr, step.stderr
        # On the VM's host: sockets, the FAM region, the store, the agent.
        proc = sandbox.run([sys.executable, str(intruder), job, ALICE, str(work), str(fam)],
                           host="h1", user=BOB)
        results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert results["console.sock"] == "Permission denied"
        assert results["qmp.sock"] == "Permission denied"
        assert results["fam"] == "Permission denied"
        assert results["keys"].startswith("denied: ")
        assert results["agent"].startswith("denied: ")
        assert f"is not part of job {job} on h1" in results["agent"]
        touch(shared.flags / "isolation")
        assert running.finish(120) == 0, running.output
    assert_nothing_left(sandbox, tool, job, ALICE)
