"""The VM runner's phases and failure paths, on fakes: no root, no SLURM, no QEMU.

A FakeAgent hands out pipe ends as taps and a private work directory, a
KeptStore holds the cluster spec and what the runner publishes, and
FakeQemu stands in for QEMU (its stderr, console log and QMP socket).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.fakes import FakeAgent, FakeQemu, KeptStore, published
from tests.support_vm import cluster_spec, fake_tiny_boot, vm_plan
from vcluster.agent.protocol import FamSpec
from vcluster.cancel import Cancellation
from vcluster.cluster import FamPlan
from vcluster.config.batch import BatchConfig
from vcluster.errors import StoreUnavailable
from vcluster.identity import user_name
from vcluster.lifecycle import VmState
from vcluster.store.base import EventType, WatchEvent
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json
from vcluster.vm.runner import Runner, RunnerOptions

JOB = "7"
KEYS = Keys("/vcluster")
USER = user_name()
KEY = KEYS.vm(USER, JOB, 0)
READY_LINE = "vcluster-tiny: ready hostname=vm0"
BOOT_LINES = ("Linux version 6.1.0-fake (vcluster tests)", "Run /init as init process")


@dataclass
class Bench:
    """What one runner runs on, and what it did."""

    store: KeptStore
    agent: FakeAgent
    since: int  # the store's revision before the runner started

    def records(self) -> list[VmRecord]:
        return published(self.store, KEY, self.since)

    def states(self) -> list[VmState]:
        return [r.state for r in self.records()]

    def left_nothing(self, qemu: FakeQemu) -> None:
        assert list(self.agent.workdir.iterdir()) == []  # the VM's directory is gone
        assert self.agent.fds_released(), "a tap's fd is still open"
        assert qemu.all_ended()
        assert self.store.closed_by_user


@pytest.fixture
def bench() -> Iterator[Bench]:
    store = KeptStore()
    agent = FakeAgent()
    spec = cluster_spec(JOB, [vm_plan(0, fake_tiny_boot())], user=USER, uid=os.getuid())
    store.put(KEYS.cluster_spec(USER, JOB), to_json(spec))
    since = store.put(KEY, to_json(VmRecord(VmState.PENDING)))  # as the launcher does
    try:
        yield Bench(store, agent, since)
    finally:
        agent.close()
        store.close_for_real()


def runner(bench: Bench, qemu: FakeQemu, *, ready_timeout: float = 30.0,
           stop_timeout: float | None = None,
           cancellation: Cancellation | None = None) -> Runner:
    options = RunnerOptions(job=JOB, index=0, host="h1", ready_timeout=ready_timeout,
                            stop_timeout=stop_timeout)
    return Runner(options, BatchConfig(), agent=bench.agent, open_store=lambda: bench.store,
                  start_qemu=qemu, cancellation=cancellation or Cancellation())


def on_state(bench: Bench, state: VmState, action: Callable[[], None]) -> None:
    """Do ``action`` (once) when the VM's record reaches ``state``."""
    done = False

    def seen(event: WatchEvent) -> None:
        nonlocal done
        if not done and event.type is EventType.PUT and \
                from_json(VmRecord, event.value).state is state:
            done = True
            action()

    # A KeptStore outlives the runner: the watch ends when the fixture really closes it.
    bench.store.watch(KEY, start_revision=bench.since + 1, callback=seen)


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_qemu_that_cannot_start_is_a_failure_with_its_reason(bench: Bench) -> None:
    qemu = FakeQemu(console=("SeaBIOS (version fake)",), exit_status=1,
                    stderr=("qemu-system-x86_64: -nosuchoption: invalid option",))
    assert runner(bench, qemu).run() == 1
    records = bench.records()
    assert [r.state for r in records] == [VmState.PREPARING, VmState.BOOTING, VmState.FAILED]
    assert records[0].host == "h1" and records[0].addresses == ("10.77.0.1",)
    failed = records[-1]
    assert failed.error == ("QEMU exited with status 1: qemu-system-x86_64: -nosuchoption: "
                            "invalid option")
    assert failed.console_tail == ("SeaBIOS (version fake)",)
    assert failed.host == "h1"
    [request] = bench.agent.requests
    assert (request.job, request.vm, request.fam) == (JOB, 0, None)
    assert [(n.name, n.type, n.mtu) for n in request.networks] == [("cluster", "private", 1450)]
    bench.left_nothing(qemu)


def test_a_guest_that_never_gets_ready_fails_with_its_console(bench: Bench) -> None:
    qemu = FakeQemu(console=BOOT_LINES)
    started = time.monotonic()
    assert runner(bench, qemu, ready_timeout=0.5).run() == 1
    assert time.monotonic() - started < 10
    failed = bench.records()[-1]
    assert failed.state is VmState.FAILED
    assert failed.error == ("the guest was not ready after 0.5 s (no "
                            f"'{READY_LINE}' on its console)")
    assert failed.console_tail == BOOT_LINES
    bench.left_nothing(qemu)
    assert qemu.started[0].returncode == 0  # told to quit over QMP, not killed


def test_ready_then_a_stop_signal_powers_the_guest_off(bench: Bench,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "vcluster")
    qemu = FakeQemu(console=(*BOOT_LINES, READY_LINE), powers_off=True)
    on_state(bench, VmState.READY, sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    assert runner(bench, qemu).run() == 0
    assert signal.getsignal(signal.SIGTERM) is previous
    assert bench.states() == [VmState.PREPARING, VmState.BOOTING, VmState.READY,
                              VmState.STOPPING, VmState.STOPPED]
    assert "vm0: the guest powered off" in caplog.messages
    assert ("vm0: the job was cancelled or reached its time limit (SIGTERM), stopping"
            in caplog.messages)
    bench.left_nothing(qemu)
    # the taps went to QEMU by fd, in the order of the VM's NICs
    assert len(qemu.specs[0].nics) == 1 and bench.agent.handed_out == 1


def test_a_guest_that_ignores_the_power_button_is_quit(bench: Bench,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "vcluster")
    qemu = FakeQemu(console=(READY_LINE,), powers_off=False)
    on_state(bench, VmState.READY, sigterm)
    started = time.monotonic()
    assert runner(bench, qemu, stop_timeout=0.3).run() == 0
    assert time.monotonic() - started < 10
    assert bench.states()[-2:] == [VmState.STOPPING, VmState.STOPPED]
    assert "vm0: the guest did not power off within 0.3 s" in caplog.messages
    assert "vm0: QEMU quit" in caplog.messages
    assert qemu.started[0].returncode == 0
    bench.left_nothing(qemu)


def test_a_stop_signal_while_booting_stops_without_waiting(bench: Bench) -> None:
    qemu = FakeQemu(console=BOOT_LINES)  # never ready
    on_state(bench, VmState.BOOTING, sigterm)
    started = time.monotonic()
    assert runner(bench, qemu).run() == 0
    assert time.monotonic() - started < 10  # not the ready timeout (30 s)
    assert bench.states() == [VmState.PREPARING, VmState.BOOTING, VmState.STOPPING,
                              VmState.STOPPED]
    assert qemu.started[0].returncode == 0
    bench.left_nothing(qemu)


def test_a_stop_before_anything_asks_the_agent_for_nothing(bench: Bench) -> None:
    cancellation = Cancellation()
    cancellation.cancel("the test said so")
    qemu = FakeQemu()
    assert runner(bench, qemu, cancellation=cancellation).run() == 0
    assert bench.states() == [VmState.STOPPING, VmState.STOPPED]
    assert bench.agent.requests == [] and qemu.started == []


def test_qemu_dying_while_ready_is_a_failure(bench: Bench) -> None:
    qemu = FakeQemu(console=(READY_LINE,))
    on_state(bench, VmState.READY, qemu.kill_all)
    assert runner(bench, qemu).run() == 1
    failed = bench.records()[-1]
    assert failed.state is VmState.FAILED
    assert failed.error == ("QEMU was killed by SIGKILL while the VM was ready (did the guest "
                            "power off?)")
    assert failed.console_tail == (READY_LINE,)
    bench.left_nothing(qemu)


def test_devices_that_do_not_fit_the_plan_are_a_failure(bench: Bench) -> None:
    bench.agent.missing_taps = 1
    qemu = FakeQemu()
    assert runner(bench, qemu).run() == 1
    failed = bench.records()[-1]
    assert failed.error == ("the agent's devices do not match the VM's plan "
                            "(0 NIC backends for 1 NICs)")
    assert failed.console_tail == ()
    assert qemu.started == []
    assert bench.agent.fds_released()


def test_no_spec_is_a_failure_before_the_agent_is_asked(bench: Bench) -> None:
    bench.store.delete(KEYS.cluster_spec(USER, JOB))
    qemu = FakeQemu()
    assert runner(bench, qemu).run() == 1
    assert bench.states() == [VmState.FAILED]
    assert bench.records()[-1].error == (f"no cluster spec at {KEYS.cluster_spec(USER, JOB)} "
                                         "(the launcher writes it before it starts the VMs)")
    assert bench.agent.requests == []


def test_a_store_out_of_reach_publishes_nothing(bench: Bench,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def unreachable() -> KeptStore:
        raise StoreUnavailable("etcd at http://127.0.0.1:2379 did not answer within 5 s")

    options = RunnerOptions(job=JOB, index=0, host="h1")
    code = Runner(options, BatchConfig(), agent=bench.agent, open_store=unreachable,
                  start_qemu=FakeQemu()).run()
    assert code == 1
    assert bench.states() == []
    assert any("did not answer within 5 s" in m for m in caplog.messages)


def test_the_fam_region_and_taps_go_to_qemu(bench: Bench) -> None:
    vm = vm_plan(0, fake_tiny_boot(), nics=2, fam=FamPlan("shared", 1 << 20))
    spec = cluster_spec(JOB, [vm], user=USER, uid=os.getuid())
    bench.store.put(KEYS.cluster_spec(USER, JOB), to_json(spec))
    qemu = FakeQemu(console=(READY_LINE,))
    on_state(bench, VmState.READY, sigterm)
    assert runner(bench, qemu).run() == 0
    [request] = bench.agent.requests
    assert request.fam == FamSpec("shared", 1 << 20)
    assert [n.name for n in request.networks] == ["cluster", "net1"]
    [started] = qemu.specs
    assert started.fam is not None and started.fam.size == 1 << 20
    assert started.fam.path.name == "shared" and started.fam.path.is_file()
    assert len(started.nics) == 2 and bench.agent.handed_out == 2
    bench.left_nothing(qemu)


def test_the_clusters_vnis_go_to_the_agent_with_its_networks(bench: Bench) -> None:
    vm = vm_plan(0, fake_tiny_boot(), nics=2)
    spec = dataclasses.replace(cluster_spec(JOB, [vm], user=USER, uid=os.getuid()),
                               vnis={"cluster": 4242})
    bench.store.put(KEYS.cluster_spec(USER, JOB), to_json(spec))
    qemu = FakeQemu(exit_status=1, stderr=("qemu-system-x86_64: stop here",))
    assert runner(bench, qemu).run() == 1
    [request] = bench.agent.requests
    assert [(n.name, n.type, n.mtu, n.vni) for n in request.networks] == [
        ("cluster", "private", 1450, 4242), ("net1", "private", 1450, None)]
    bench.left_nothing(qemu)
