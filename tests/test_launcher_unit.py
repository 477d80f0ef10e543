"""The launcher's phases on fakes: a MemoryStore, FakeVnis and a FakeStep playing the runners.

No SLURM, no QEMU, no root: the launcher places the VMs on the allocation's
hosts, takes the VNIs, records the cluster in the store, "starts" the step,
watches the records the fake runners publish, runs the user's ``-E`` command
and stops the step, as it does inside an allocation.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vcluster.launch.launcher as launcher_module
from tests.fakes import FakeSteps, FakeVnis, Move, boot_moves, wait_until
from tests.support_vm import cluster_spec, disk_boot, fake_tiny_boot, vm_plan
from vcluster.agent.protocol import AgentError
from vcluster.cancel import Cancelled
from vcluster.cluster import ClusterPlan, FamPlan
from vcluster.identity import user_name
from vcluster.launch.launcher import ClusterFailed, Launcher, LaunchOptions
from vcluster.launch.placement import Allocation, Host, PlacementError
from vcluster.launch.submit import forwarded
from vcluster.lifecycle import VmState
from vcluster.store.keys import Keys
from vcluster.store.memory import MemoryStore
from vcluster.vm.state import Publisher

JOB = "42"
KEYS = Keys("/vcluster")
USER = user_name()
QEMU_ERROR = "QEMU exited with status 1: qemu-system-x86_64: -nosuchoption: invalid option"
ONE_HOST = Allocation((Host("h1", 8),))


class Output(io.StringIO):
    """What the launcher writes for the user (a log, not a terminal)."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    made = MemoryStore()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # The -E command gets a process group of its own, as it does under salloc without a tty.
    monkeypatch.setattr(sys, "stdin", io.StringIO())


def tiny_plan(count: int, *, fam: int = 0, nics: int = 1) -> ClusterPlan:
    """``count`` tiny VMs, the first ``fam`` of them sharing FAM region 'fam'."""
    region = FamPlan("fam", 1 << 20)
    vms = [vm_plan(i, fake_tiny_boot(), nics=nics, fam=region if i < fam else None)
           for i in range(count)]
    return cluster_spec(JOB, vms).plan


def launch(store: MemoryStore, steps: FakeSteps, count: int | ClusterPlan, *,
           command: str = "exit 0", ready_timeout: float = 30.0,
           allocation: Allocation = ONE_HOST,
           vnis: FakeVnis | None = None) -> tuple[Launcher, Output]:
    out = Output()
    options = LaunchOptions(command=command, ready_timeout=ready_timeout)
    plan = tiny_plan(count) if isinstance(count, int) else count
    launcher = Launcher(plan, store, prefix=KEYS.prefix, job=JOB, job_name="vcluster",
                        options=options, allocation=allocation, agent=vnis or FakeVnis(),
                        start_step=steps, out=out)
    return launcher, out


def assert_stopped_and_forgotten(store: MemoryStore, steps: FakeSteps, out: Output) -> None:
    step = steps.step
    assert step.stopped_with == 1.0 + launcher_module.STOP_MARGIN  # tiny's power-down wait
    assert step.error is None
    assert len(store.get_prefix(KEYS.cluster_prefix(USER, JOB))) == 0  # keys and records
    assert out.lines()[-2:] == [f"vcluster: job {JOB}: stopping the VMs",
                                f"vcluster: job {JOB}: stopped"]


def test_all_ready_runs_the_command_then_stops_the_vms(store: MemoryStore) -> None:
    steps = FakeSteps(store, USER, boot_moves([0, 1]))
    launcher, out = launch(store, steps, 2, command=f'[ "$VCLUSTER_JOB_ID" = {JOB} ] && exit 3')
    assert launcher.run() == 3
    assert steps.asked == [(JOB, ("h1", "h1"), None, False)]
    step = steps.step
    assert step.spec is not None and step.spec.job == JOB and step.spec.user == USER
    assert step.spec.ssh_public_key.startswith("ssh-ed25519 ")
    assert step.marked_ready
    lines = out.lines()
    assert lines[0] == f"vcluster: job {JOB}: starting 2 VMs (tiny:2)"
    order = ["pending", "preparing on h1", "booting on h1", "ready on h1"]
    for vm in ("vm0", "vm1"):
        # Each change once, never backwards (how many the display saw depends on timing).
        shown = [line.split(" (")[0].removeprefix(f"vcluster: {vm}: ") for line in lines[1:-3]
                 if line.startswith(f"vcluster: {vm}: ")]
        assert shown[-1] == "ready on h1", lines
        assert [order.index(s) for s in shown] == sorted({order.index(s) for s in shown}), lines
    assert lines[-3].startswith(f"vcluster: job {JOB}: 2 VMs ready in ")
    assert lines[-3].endswith(f" s; VCLUSTER_JOB_ID={JOB}")
    assert_stopped_and_forgotten(store, steps, out)


@pytest.mark.parametrize(("tail", "console"), [
    (("SeaBIOS (version fake)", "Booting from ROM..."),
     "\n  console (last lines):\n    SeaBIOS (version fake)\n    Booting from ROM..."),
    ((), "\n  console (last lines): none, the VM printed nothing"),
])
def test_a_failed_vm_is_the_error_with_its_console(store: MemoryStore, tail: tuple[str, ...],
                                                   console: str) -> None:
    moves = [*boot_moves([0, 1], until=VmState.BOOTING), Move(0, VmState.READY),
             Move(1, VmState.FAILED, error=QEMU_ERROR, console_tail=tail)]
    steps = FakeSteps(store, USER, moves)
    launcher, out = launch(store, steps, 2)
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    assert str(e.value) == f"vm1 failed on h1: {QEMU_ERROR}{console}"
    assert not steps.step.marked_ready
    assert_stopped_and_forgotten(store, steps, out)


def test_runners_that_exit_before_ready_show_their_last_output(
        store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_module, "LATE_EVENTS", 0.1)
    output = ["0: vcluster: vm0: preparing", "srun: error: h1: task 0: Exited with exit code 1"]
    steps = FakeSteps(store, USER, boot_moves([0], until=VmState.PREPARING), exit_status=1,
                      output=output)
    launcher, out = launch(store, steps, 1)
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    assert str(e.value) == ("the VM runners exited (srun status 1) before the cluster was "
                            "ready; their last output:\n"
                            "    0: vcluster: vm0: preparing\n"
                            "    srun: error: h1: task 0: Exited with exit code 1")
    assert_stopped_and_forgotten(store, steps, out)


def test_a_failure_published_as_the_runners_end_is_the_error(store: MemoryStore) -> None:
    # srun may end before the store has shown the runner's last word: that word wins.
    steps = FakeSteps(store, USER, boot_moves([0], until=VmState.BOOTING), exit_status=1,
                      output=["srun: error: h1: task 0: Exited with exit code 1"],
                      late=[Move(0, VmState.FAILED, error=QEMU_ERROR)])
    launcher, out = launch(store, steps, 1)
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    assert str(e.value).startswith(f"vm0 failed on h1: {QEMU_ERROR}\n")
    assert_stopped_and_forgotten(store, steps, out)


def test_the_ready_deadline_names_the_vms_not_ready(store: MemoryStore) -> None:
    moves = [*boot_moves([0]), *boot_moves([1], until=VmState.BOOTING)]
    steps = FakeSteps(store, USER, moves)
    launcher, out = launch(store, steps, 3, ready_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    took = time.monotonic() - started
    assert str(e.value) == "not ready after 0.5 s: vm1 (booting), vm2 (pending)"
    assert 0.5 <= took < 10
    assert_stopped_and_forgotten(store, steps, out)


@pytest.mark.parametrize(("signum", "message"), [
    (signal.SIGTERM, "stopped the cluster: the job was cancelled or reached its time limit "
                     "(SIGTERM)"),
    (signal.SIGHUP, "stopped the cluster: the terminal hung up (SIGHUP)"),
    (signal.SIGINT, "stopped the cluster: interrupted (Ctrl-C)"),
])
def test_a_stop_signal_while_waiting_stops_the_vms(store: MemoryStore, signum: int,
                                                   message: str) -> None:
    steps = FakeSteps(store, USER, boot_moves([0, 1], until=VmState.BOOTING),
                      then=lambda: os.kill(os.getpid(), signum))
    launcher, out = launch(store, steps, 2)
    previous = signal.getsignal(signum)
    with pytest.raises(Cancelled) as e:
        launcher.run()
    assert str(e.value) == message
    assert e.value.exit_code == 130
    assert signal.getsignal(signum) is previous
    assert_stopped_and_forgotten(store, steps, out)


def _gone(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True  # reaped already


def test_a_stop_signal_while_the_command_runs_stops_it_too(store: MemoryStore,
                                                           tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def signal_once_running() -> None:
        wait_until("the -E command", lambda: pid_file.exists() and pid_file.read_text() != "")
        os.kill(os.getpid(), signal.SIGTERM)

    steps = FakeSteps(store, USER, boot_moves([0]))
    launcher, out = launch(store, steps, 1,
                           command=f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; "
                                   "exec sleep 60")
    killer = threading.Thread(target=signal_once_running, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(Cancelled) as e:
        launcher.run()
    assert time.monotonic() - started < 20
    assert "(SIGTERM)" in str(e.value)
    killer.join(5)
    pid = int(pid_file.read_text())
    wait_until("the command to end", lambda: _gone(pid))
    assert_stopped_and_forgotten(store, steps, out)


def test_a_vm_failing_after_ready_is_a_warning(store: MemoryStore, tmp_path: Path) -> None:
    running, carry_on = tmp_path / "running", tmp_path / "carry-on"

    def fail_vm1_then_let_the_command_end() -> None:
        wait_until("the -E command", running.exists)
        vm1 = Publisher(store, KEYS.vm(USER, JOB, 1), "vm1")
        vm1.load()
        vm1.move(VmState.FAILED, error="QEMU was killed by SIGKILL while the VM was ready")
        wait_until("the warning", lambda: "warning" in out.getvalue())
        carry_on.touch()

    steps = FakeSteps(store, USER, boot_moves([0, 1]))
    launcher, out = launch(store, steps, 2,
                           command=f"touch {running}; for i in $(seq 400); do "
                                   f"[ -e {carry_on} ] && exit 0; sleep 0.05; done; exit 9")
    helper = threading.Thread(target=fail_vm1_then_let_the_command_end, daemon=True)
    helper.start()
    assert launcher.run() == 0
    helper.join(5)
    assert ("vcluster: warning: vm1 failed on h1: QEMU was killed by SIGKILL while the VM was "
            "ready\n  console (last lines): none, the VM printed nothing") in out.getvalue()
    assert_stopped_and_forgotten(store, steps, out)


def test_the_step_gets_the_largest_power_down_wait_and_a_margin() -> None:
    plan = cluster_spec(JOB, [vm_plan(0, fake_tiny_boot()), vm_plan(1, disk_boot())]).plan
    margin = launcher_module.STOP_MARGIN
    assert LaunchOptions().step_wait(plan) == 20.0 + margin  # cloud-init's, not tiny's 1 s
    assert LaunchOptions(stop_timeout=5).step_wait(plan) == 5 + margin
    assert LaunchOptions().step_wait(tiny_plan(2)) == 1.0 + margin


def test_alloc_passes_stop_signals_on_to_salloc() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with forwarded(proc, (signal.SIGHUP,)):
            os.kill(os.getpid(), signal.SIGHUP)
            assert proc.wait(10) == -signal.SIGHUP
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


# ------------------------------------------------------------------ hosts, VNIs, fast failures


def nothing_made(store: MemoryStore, steps: FakeSteps, out: Output) -> None:
    assert len(store.get_prefix(KEYS.cluster_prefix(USER, JOB))) == 0
    assert steps.started == []
    assert out.lines() == []


def test_the_vnis_go_into_the_spec_before_any_runner_starts(store: MemoryStore) -> None:
    vnis = FakeVnis({"cluster": 5000})
    steps = FakeSteps(store, USER, boot_moves([0, 1]))
    plan = cluster_spec(JOB, [vm_plan(i, fake_tiny_boot(), nics=2) for i in range(2)]).plan
    launcher, _ = launch(store, steps, plan, vnis=vnis)
    assert launcher.run() == 0
    assert vnis.asked == [(JOB, ("cluster", "net1"))]  # each private network once
    spec = steps.step.spec
    assert spec is not None and spec.vnis == {"cluster": 5000, "net1": 4097}


def test_a_cluster_without_private_networks_asks_for_no_vni(store: MemoryStore) -> None:
    vnis = FakeVnis(refusal="must not be asked")
    steps = FakeSteps(store, USER, boot_moves([0]))
    launcher, _ = launch(store, steps, tiny_plan(1, nics=0), vnis=vnis)
    assert launcher.run() == 0
    assert vnis.asked == []
    assert steps.step.spec is not None and steps.step.spec.vnis == {}


def test_an_exhausted_vni_pool_is_one_line_and_nothing_is_made(store: MemoryStore) -> None:
    refusal = ("network 'cluster': VNI pool 4096-4097 is exhausted (2 clusters hold it: "
               "jobs 3, 8)")
    steps = FakeSteps(store, USER, boot_moves([0]))
    launcher, out = launch(store, steps, 1, vnis=FakeVnis(refusal=refusal))
    with pytest.raises(AgentError) as e:
        launcher.run()
    assert str(e.value) == refusal
    assert e.value.exit_code == 1
    nothing_made(store, steps, out)


def test_a_fam_group_that_fits_on_no_host_is_refused_before_anything(
        store: MemoryStore) -> None:
    vnis = FakeVnis()
    steps = FakeSteps(store, USER, boot_moves([0, 1]))
    launcher, out = launch(store, steps, tiny_plan(2, fam=2), vnis=vnis,
                           allocation=Allocation((Host("h1", 1), Host("h2", 1))))
    with pytest.raises(PlacementError) as e:
        launcher.run()
    assert str(e.value) == (
        "FAM region 'fam' (vm0, vm1: 2 VMs, 2 CPUs) fits on no host of the allocation: "
        "h1 has 1 CPU, h2 has 1 CPU; ask for more CPUs per node (e.g. --ntasks-per-node=2) "
        "or make the group smaller")
    assert vnis.asked == []  # placement comes first: no VNI taken for nothing
    nothing_made(store, steps, out)


def test_the_step_runs_each_vm_on_its_placed_host(store: MemoryStore) -> None:
    moves = [*boot_moves([0, 1], host="h1"), *boot_moves([2, 3], host="h2")]
    steps = FakeSteps(store, USER, moves)
    launcher, _ = launch(store, steps, tiny_plan(4, fam=2),
                         allocation=Allocation((Host("h1", 2), Host("h2", 2))))
    assert launcher.run() == 0
    assert steps.asked[0][1] == ("h1", "h1", "h2", "h2")


def test_a_fam_group_published_on_two_hosts_fails_at_once(store: MemoryStore) -> None:
    moves = [Move(0, VmState.PREPARING, "h1"), Move(1, VmState.PREPARING, "h2")]
    steps = FakeSteps(store, USER, moves)
    launcher, out = launch(store, steps, tiny_plan(3, fam=2), ready_timeout=600)
    started = time.monotonic()
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    assert time.monotonic() - started < 10
    assert str(e.value) == ("FAM region 'fam' is split across hosts (vm0 on h1, vm1 on h2): a "
                            "region is memory of one host, so these VMs would not share it")
    assert_stopped_and_forgotten(store, steps, out)


def test_a_network_a_host_cannot_build_is_one_line_naming_the_host(store: MemoryStore) -> None:
    refusal = ("h2: network 'cluster': interface eth1 has MTU 1500, too small for VXLAN "
               "around MTU 1450 (expected at least 1500)")
    moves = [Move(0, VmState.PREPARING, "h1"), Move(1, VmState.PREPARING, "h2"),
             Move(1, VmState.FAILED, error=refusal)]
    steps = FakeSteps(store, USER, moves)
    launcher, out = launch(store, steps, 2, ready_timeout=600)
    started = time.monotonic()
    with pytest.raises(ClusterFailed) as e:
        launcher.run()
    assert time.monotonic() - started < 10  # not the ready deadline
    assert str(e.value) == f"vm1 failed on h2: {refusal}"  # one line: the VM never booted
    assert_stopped_and_forgotten(store, steps, out)
