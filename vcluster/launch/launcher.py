"""The launcher: records the cluster, starts its VMs, waits for them, runs the user's command.

It runs as the user inside the allocation (``salloc … vcluster internal
launcher``), in phases that each return what the next needs: ``place`` (a
host per VM, every FAM group on one host: ``launch.placement``),
``take_vnis`` (the VXLAN id of each private network, from the local agent,
which takes them from the networks' pools in the store), ``record`` (the
cluster's spec, keys and pending VM records), ``start`` (the ``Step`` of VM
runners), ``wait_ready`` (the revision of the last record seen, for the
watch while the user works), then ``run_user_command`` (the user's exit
status).  ``place`` and ``take_vnis`` write nothing: when they refuse, the
user gets one line and nothing was made (VNIs already taken go back to their
pools with the job's release).  Stop signals are a ``Cancellation`` the
waits check.  Whatever happens (a VM fails, the user presses Ctrl-C, the
job is cancelled), an ExitStack stops the VMs and removes the cluster's keys
before ``run`` returns, with the stop signals ignored so that a second one
cannot cut that short; the agent's release (epilog) is the safety net
behind it.

While the VMs come up, every published host is checked against the FAM
groups (defense in depth behind the placement): VMs of one region on two
hosts fail the cluster at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from vcluster import sshkeys
from vcluster.cancel import Cancellation, ignored
from vcluster.cluster import ClusterPlan, ClusterSpec
from vcluster.errors import VclusterError
from vcluster.identity import user_name
from vcluster.launch.placement import Allocation, VmNeed, place, split_regions
from vcluster.launch.progress import ProgressView
from vcluster.launch.steps import RunnerStep, Step, StepStarter
from vcluster.lifecycle import VmState
from vcluster.run import spawn
from vcluster.store.base import Store, Watch, WatchEvent
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json

STOP_MARGIN = 30.0  # seconds the runners get beyond the guests' power-down wait
POLL = 0.2
LATE_EVENTS = 1.0  # how long the last states of a step that ended may take to arrive
STOPPED = "stopped the cluster"
# Set, beside VCLUSTER_JOB_ID, for what a local cluster's launcher runs for the user: how
# the processes a killed launcher left are found (vcluster.local.reconcile).
LOCAL_JOB_VARIABLE = "VCLUSTER_LOCAL_JOB"


class ClusterFailed(VclusterError):
    """A VM failed before the cluster was ready."""


class VniSource(Protocol):
    """Where the VXLAN ids of a job's private networks come from: the local agent."""

    def vnis(self, job: str, networks: Sequence[str]) -> dict[str, int]:
        """Network name -> VNI, taken for ``job``; AgentError (one line) if not."""


@dataclass(frozen=True)
class BatchScript:
    """A batch job's script, as it was when the job was submitted."""

    name: str  # its file name, for messages
    text: str
    args: tuple[str, ...] = ()
    in_vm: bool = False  # -b: run in vm0 through its guest agent, not on the first host


@dataclass(frozen=True)
class LaunchOptions:
    command: str | None = None  # -E CMD; None runs an interactive shell (or the script)
    script: BatchScript | None = None  # a batch job's script instead of the shell
    stop_timeout: float | None = None  # guest power-down wait; None: the runners' defaults
    ready_timeout: float = 600.0  # the whole cluster must be ready by then
    verbose: bool = False
    local: bool = False  # the local backend's: the VMs run on this machine, no SLURM

    def step_wait(self, plan: ClusterPlan) -> float:
        """How long the runners get to stop before the step is aborted."""
        if self.stop_timeout is not None:
            power_down = self.stop_timeout
        else:
            power_down = max((vm.boot.readiness.stop_timeout for vm in plan.vms), default=0.0)
        return power_down + STOP_MARGIN


@contextlib.contextmanager
def _uncut_cleanup() -> Iterator[contextlib.ExitStack]:
    """An ExitStack whose clean-ups run with the stop signals ignored."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        with ignored():
            stack.close()


class Launcher:
    def __init__(self, plan: ClusterPlan, store: Store, *, prefix: str, job: str,
                 job_name: str, options: LaunchOptions, allocation: Allocation,
                 agent: VniSource, start_step: StepStarter = RunnerStep,
                 cancellation: Cancellation | None = None, out: TextIO | None = None,
                 cluster_key: sshkeys.Background | None = None) -> None:
        # The cluster's key pair: being made from now on (or from the caller's start).
        self.cluster_key = cluster_key or sshkeys.Background(f"vcluster-job-{job}")
        self.plan = plan
        self.store = store
        self.job = job
        self.job_name = job_name
        self.options = options
        self.allocation = allocation
        self.agent = agent
        self.start_step = start_step
        self.cancellation = cancellation or Cancellation()
        self.out = out or sys.stderr
        self.user = user_name()
        self.keys = Keys(prefix)
        self.view = ProgressView([vm.name for vm in plan.vms], self.out)
        self.needs = [VmNeed.of(vm) for vm in plan.vms]
        self.booted: set[int] = set()  # VMs seen booting: their console has something to say

    def say(self, text: str) -> None:
        self.out.write(f"vcluster: job {self.job}: {text}\n")
        self.out.flush()

    def check_cancelled(self) -> None:
        """Raise Cancelled if a stop signal came, with the message the user sees."""
        self.cancellation.check(STOPPED)

    # -- before anything is made -------------------------------------------------

    def place(self) -> tuple[str, ...]:
        """The host of each VM; PlacementError if a FAM group fits on no host."""
        return place(self.needs, self.allocation)

    def take_vnis(self) -> dict[str, int]:
        """The VNI of each private network of the cluster; AgentError (one line) if not."""
        networks = self.plan.private_networks()
        return self.agent.vnis(self.job, networks) if networks else {}

    # -- recording ------------------------------------------------------------

    def record(self, vnis: dict[str, int]) -> int:
        """Write the key pair, one pending record per VM, then the spec; its revision."""
        pair = self.cluster_key.result()
        spec = ClusterSpec(self.job, self.job_name, self.user, os.getuid(), time.time(),
                           pair.public, self.plan, vnis=dict(vnis),
                           mode="alloc" if self.options.script is None else "batch",
                           local=self.options.local)
        k = self.keys
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PRIVATE), pair.private)
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PUBLIC), pair.public)
        now = time.time()
        for vm in self.plan.vms:
            self.store.put(k.vm(self.user, self.job, vm.index),
                           to_json(VmRecord(VmState.PENDING, since=now)))
        # The spec last: runners that see it find every VM record in place.
        return self.store.put(k.cluster_spec(self.user, self.job), to_json(spec))

    def forget(self) -> None:
        with contextlib.suppress(VclusterError):
            self.store.delete_prefix(self.keys.cluster_prefix(self.user, self.job))

    # -- the step ---------------------------------------------------------------

    def start(self, stack: contextlib.ExitStack, hosts: Sequence[str]) -> Step:
        """The step of VM runners, VM ``i`` on ``hosts[i]``, stopped by ``stack``."""
        # No stop signal between srun's start and the stack knowing it.
        with self.cancellation.blocked():
            step = self.start_step(self.job, hosts, stop_timeout=self.options.stop_timeout,
                                   echo=self.options.verbose)
            stack.callback(self._stop_step, step)
        return step

    def _stop_step(self, step: Step) -> None:
        self.say("stopping the VMs")
        step.stop(self.options.step_wait(self.plan))

    # -- waiting --------------------------------------------------------------

    def _record(self, event: WatchEvent) -> tuple[int, VmRecord] | None:
        if event.type.name != "PUT":
            return None
        return self.keys.vm_index(event.key, self.user, self.job), from_json(VmRecord,
                                                                           event.value)

    def _show(self, event: WatchEvent) -> None:
        if (got := self._record(event)) is not None:
            self._seen(*got)

    def _seen(self, index: int, record: VmRecord) -> None:
        if record.state in (VmState.BOOTING, VmState.READY):
            self.booted.add(index)
        self.view.update(index, record)

    def split_fam_group(self) -> ClusterFailed | None:
        """VMs of one FAM region published on different hosts: the cluster is no good."""
        hosts = {i: r.host for i, r in self.view.records.items() if r.host}
        problem = split_regions(self.needs, hosts)
        return ClusterFailed(problem) if problem else None

    def wait_ready(self, step: Step, recorded: int) -> int:
        """Until every VM is ready; the revision of the last record seen.

        ``recorded`` is the revision of the spec: every record the runners
        publish comes after it.  ClusterFailed when a VM fails, two VMs of a
        FAM region are on different hosts, the step ends, or the ready
        timeout passes first; Cancelled on a stop signal.
        """
        vms_prefix = self.keys.vms_prefix(self.user, self.job)
        deadline = time.monotonic() + self.options.ready_timeout
        for vm in self.plan.vms:
            self._seen(vm.index, VmRecord(VmState.PENDING))  # as record() wrote them
        seen = recorded
        # Every change from the spec on, in order: no VM is shown going back to a state it
        # has left, and none is missed (a VM's console matters only if it was seen booting).
        with self.store.watch_prefix(vms_prefix, start_revision=recorded + 1) as watch:
            while True:
                self.check_cancelled()
                states = {i: r.state for i, r in self.view.records.items()}
                failed = [i for i, s in states.items() if s is VmState.FAILED]
                if failed:
                    raise self.failure(failed[0])
                if (split := self.split_fam_group()) is not None:
                    raise split
                if len(states) == len(self.plan.vms) and all(
                        s is VmState.READY for s in states.values()):
                    return seen
                status = step.exited()
                if status is not None:
                    seen = self._drain(watch, seen)
                    if any(r.state is VmState.FAILED for r in self.view.records.values()):
                        continue
                    lines = "\n".join(f"    {line}" for line in step.tail())
                    raise ClusterFailed(f"the VM runners exited (srun status {status}) "
                                        f"before the cluster was ready; their last output:\n"
                                        f"{lines}")
                if time.monotonic() > deadline:
                    raise self.not_ready()
                event = watch.get(timeout=POLL)
                if event is not None:
                    seen = max(seen, event.revision)
                    self._show(event)
                else:
                    self.view.draw()

    def _drain(self, watch: Watch, seen: int) -> int:
        """Show the states still on their way from runners that have ended."""
        while (late := watch.get(timeout=LATE_EVENTS)) is not None:
            seen = max(seen, late.revision)
            self._show(late)
        return seen

    def not_ready(self) -> ClusterFailed:
        waiting = [f"{vm.name} ({r.state.value if r else 'pending'})" for vm in self.plan.vms
                   if (r := self.view.records.get(vm.index)) is None
                   or r.state is not VmState.READY]
        return ClusterFailed(f"not ready after {self.options.ready_timeout:g} s: "
                             + ", ".join(waiting))

    def failure(self, index: int) -> ClusterFailed:
        """A VM's failure, naming its host; its console only if the guest ever ran."""
        record = self.view.records[index]
        where = f" on {record.host}" if record.host else ""
        text = f"{self.plan.vms[index].name} failed{where}: {record.error}"
        if record.console_tail:
            text += "\n  console (last lines):\n" + "\n".join(
                f"    {line}" for line in record.console_tail)
        elif index in self.booted:
            text += "\n  console (last lines): none, the VM printed nothing"
        return ClusterFailed(text)

    # -- the user's part ------------------------------------------------------

    def _warn_if_lost(self, event: WatchEvent) -> None:
        """While the user works: say so when a VM fails (its runner publishes why)."""
        got = self._record(event)
        if got is None:
            return
        index, record = got
        self.view.records[index] = record  # no redrawing over the user's terminal
        if record.state is VmState.FAILED:
            self.out.write(f"vcluster: warning: {self.failure(index)}\n")
            self.out.flush()

    def run_user_command(self, revision: int) -> int:
        """The user's shell or ``-E`` command, with VMs that fail meanwhile reported."""
        vms_prefix = self.keys.vms_prefix(self.user, self.job)
        with (self.store.watch_prefix(vms_prefix, start_revision=revision + 1,
                                      callback=self._warn_if_lost),
              tempfile.TemporaryDirectory(prefix="vcluster-shell-") as tmp):
            env = dict(os.environ, VCLUSTER_JOB_ID=self.job)
            if self.options.local:
                env[LOCAL_JOB_VARIABLE] = self.job
            if self.options.script is not None:
                return self._run_script(self.options.script, env, Path(tmp))
            shell = os.environ.get("SHELL") or "/bin/sh"
            if self.options.command is not None:
                argv = [shell, "-c", self.options.command]
            elif Path(shell).name == "bash":
                rc = Path(tmp) / "bashrc"
                rc.write_text('[ -f ~/.bashrc ] && . ~/.bashrc\n'
                              'PS1="(vcluster $VCLUSTER_JOB_ID) ${PS1:-\\u@\\h:\\w\\$ }"\n')
                argv = [shell, "--rcfile", str(rc), "-i"]
            else:
                env["PS1"] = f"(vcluster {self.job}) $ "
                argv = [shell, "-i"]
            # The shell owns Ctrl-C now; the launcher still stops on TERM/HUP.  A command
            # that is not on a terminal gets a process group of its own, so that stopping
            # reaches everything it started.
            own_group = not sys.stdin.isatty()
            with ignored((signal.SIGINT,)):
                proc = spawn(argv, env=env, stdin=None, stdout=None, stderr=None,
                             process_group=0 if own_group else None)
                return self._wait_user(proc, own_group)

    def _run_script(self, script: BatchScript, env: dict[str, str], tmp: Path) -> int:
        """A batch job's script, on this host or in vm0; its exit status."""
        from vcluster.launch.userscript import run_host_script, run_vm_script

        if script.in_vm:
            vm0 = self.view.records[0]
            assert vm0.host is not None  # it is ready
            code = run_vm_script(self.job, vm0.host, script, self.plan.vms[0].template,
                                 cancelled=lambda: self.cancellation.cancelled, out=self.out,
                                 local=self.options.local)
            self.check_cancelled()
        else:
            proc = run_host_script(script, env, tmp)
            code = self._wait_user(proc, own_group=True)
            code = 128 - code if code < 0 else code  # killed by signal N: 128 + N
            # scancel signals the script as well as the launcher: say what stopped it
            self.check_cancelled()
        where = "in vm0" if script.in_vm else "on the host"
        self.say(f"{script.name} ({where}) exited with status {code}")
        return code

    def _wait_user(self, proc: subprocess.Popen[bytes], own_group: bool) -> int:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=POLL)
            if self.cancellation.cancelled:
                if own_group:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGHUP)  # what a hung-up terminal does
                self.check_cancelled()

    # -- the whole run ----------------------------------------------------------

    def run(self) -> int:
        count = len(self.plan.vms)
        vms = f"VM{'s' if count > 1 else ''}"
        start = time.monotonic()
        with self.cancellation.installed():
            hosts = self.place()
            vnis = self.take_vnis()
            self.check_cancelled()
            with _uncut_cleanup() as stack:
                stack.callback(self.say, "stopped")
                stack.callback(self.forget)
                recorded = self.record(vnis)
                self.say(f"starting {count} {vms} ({self.plan.definition})")
                step = self.start(stack, hosts)
                seen = self.wait_ready(step, recorded)
                self.say(f"{count} {vms} ready in {time.monotonic() - start:.1f} s; "
                         f"VCLUSTER_JOB_ID={self.job}")
                step.ready()
                return self.run_user_command(seen)
