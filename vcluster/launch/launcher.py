"""The launcher: records the cluster, starts its VMs, waits for them, runs the user's command.

It runs as the user inside the allocation (``salloc … vcluster internal
launcher``), in phases that each return what the next needs: ``record``
(the cluster's spec, keys and pending VM records), ``start`` (the ``Step``
of VM runners), ``wait_ready`` (the revision of the last record seen, for
the watch while the user works), then ``run_user_command`` (the user's exit
status).  Stop signals are a
``Cancellation`` the waits check.  Whatever happens (a VM fails, the user
presses Ctrl-C, the job is cancelled), an ExitStack stops the VMs and
removes the cluster's keys before ``run`` returns, with the stop signals
ignored so that a second one cannot cut that short; the agent's release
(epilog) is the safety net behind it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vcluster.cancel import Cancellation, ignored
from vcluster.cluster import ClusterPlan, ClusterSpec
from vcluster.errors import VclusterError
from vcluster.identity import user_name
from vcluster.launch import sshkeys
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


class ClusterFailed(VclusterError):
    """A VM failed before the cluster was ready."""


@dataclass(frozen=True)
class LaunchOptions:
    command: str | None = None  # -E CMD; None runs an interactive shell
    stop_timeout: float | None = None  # guest power-down wait; None: the runners' defaults
    ready_timeout: float = 600.0  # the whole cluster must be ready by then
    verbose: bool = False

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
                 job_name: str, options: LaunchOptions, start_step: StepStarter = RunnerStep,
                 cancellation: Cancellation | None = None, out: TextIO | None = None) -> None:
        self.plan = plan
        self.store = store
        self.job = job
        self.job_name = job_name
        self.options = options
        self.start_step = start_step
        self.cancellation = cancellation or Cancellation()
        self.out = out or sys.stderr
        self.user = user_name()
        self.keys = Keys(prefix)
        self.view = ProgressView([vm.name for vm in plan.vms], self.out)

    def say(self, text: str) -> None:
        self.out.write(f"vcluster: job {self.job}: {text}\n")
        self.out.flush()

    def check_cancelled(self) -> None:
        """Raise Cancelled if a stop signal came, with the message the user sees."""
        self.cancellation.check(STOPPED)

    # -- recording ------------------------------------------------------------

    def record(self) -> None:
        """Write the key pair, one pending record per VM, then the spec."""
        pair = sshkeys.generate(f"vcluster-job-{self.job}")
        spec = ClusterSpec(self.job, self.job_name, self.user, os.getuid(), time.time(),
                           pair.public, self.plan)
        k = self.keys
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PRIVATE), pair.private)
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PUBLIC), pair.public)
        now = time.time()
        for vm in self.plan.vms:
            self.store.put(k.vm(self.user, self.job, vm.index),
                           to_json(VmRecord(VmState.PENDING, since=now)))
        # The spec last: runners that see it find every VM record in place.
        self.store.put(k.cluster_spec(self.user, self.job), to_json(spec))

    def forget(self) -> None:
        with contextlib.suppress(VclusterError):
            self.store.delete_prefix(self.keys.cluster_prefix(self.user, self.job))

    # -- the step ---------------------------------------------------------------

    def start(self, stack: contextlib.ExitStack) -> Step:
        """The step of VM runners, stopped by ``stack``."""
        # No stop signal between srun's start and the stack knowing it.
        with self.cancellation.blocked():
            step = self.start_step(self.job, len(self.plan.vms),
                                   stop_timeout=self.options.stop_timeout,
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
            self.view.update(*got)

    def wait_ready(self, step: Step) -> int:
        """Until every VM is ready; the revision of the last record seen.

        ClusterFailed when a VM fails, the step ends, or the ready timeout
        passes first; Cancelled on a stop signal.
        """
        vms_prefix = self.keys.vms_prefix(self.user, self.job)
        deadline = time.monotonic() + self.options.ready_timeout
        snapshot = self.store.get_prefix(vms_prefix)
        for entry in snapshot.entries:
            self.view.update(self.keys.vm_index(entry.key, self.user, self.job),
                             from_json(VmRecord, entry.value))
        seen = snapshot.revision
        # From the snapshot on, so that no VM is shown going back to a state it has left.
        with self.store.watch_prefix(vms_prefix, start_revision=seen + 1) as watch:
            while True:
                self.check_cancelled()
                states = {i: r.state for i, r in self.view.records.items()}
                failed = [i for i, s in states.items() if s is VmState.FAILED]
                if failed:
                    raise self.failure(failed[0])
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
        record = self.view.records[index]
        where = f" on {record.host}" if record.host else ""
        text = f"{self.plan.vms[index].name} failed{where}: {record.error}"
        if record.console_tail:
            text += "\n  console (last lines):\n" + "\n".join(
                f"    {line}" for line in record.console_tail)
        else:
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
        with self.cancellation.installed(), _uncut_cleanup() as stack:
            stack.callback(self.say, "stopped")
            stack.callback(self.forget)
            self.record()
            self.say(f"starting {count} {vms} ({self.plan.definition})")
            step = self.start(stack)
            seen = self.wait_ready(step)
            self.say(f"{count} {vms} ready in {time.monotonic() - start:.1f} s; "
                     f"VCLUSTER_JOB_ID={self.job}")
            step.ready()
            return self.run_user_command(seen)
