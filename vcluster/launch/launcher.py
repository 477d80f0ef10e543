"""The launcher: records the cluster, starts its VMs, waits for them, runs the user's command.

It runs as the user inside the allocation (``salloc … vcluster internal
launcher``).  Whatever happens (a VM fails, the user presses Ctrl-C, the job
is cancelled), the VMs are stopped and the cluster's keys removed before it
returns; the agent's release (epilog) is the safety net behind it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from vcluster.cluster import ClusterPlan, ClusterSpec
from vcluster.config.loader import Config
from vcluster.errors import VclusterError
from vcluster.identity import user_name
from vcluster.launch import sshkeys
from vcluster.launch.progress import ProgressView
from vcluster.launch.steps import RunnerStep
from vcluster.lifecycle import VmState
from vcluster.run import spawn
from vcluster.store.base import Store, WatchEvent
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json


class Interrupted(VclusterError):
    """The launcher was told to stop (Ctrl-C, scancel, hang-up)."""

    exit_code = 130


class ClusterFailed(VclusterError):
    """A VM failed before the cluster was ready."""


@dataclass(frozen=True)
class LaunchOptions:
    command: str | None = None  # -E CMD; None runs an interactive shell
    stop_timeout: float | None = None  # guest power-down wait; None: the runners' defaults
    ready_timeout: float = 600.0  # the whole cluster must be ready by then
    verbose: bool = False

    @property
    def step_wait(self) -> float:
        """How long the runners get to stop before the step is aborted."""
        return (self.stop_timeout if self.stop_timeout is not None else 20.0) + 30.0


WHY = {
    signal.SIGTERM: "the job was cancelled or reached its time limit",
    signal.SIGHUP: "the terminal hung up",
}


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum)
    raise Interrupted(f"stopped the cluster: {WHY.get(name, 'interrupted')} ({name.name})")


class Launcher:
    def __init__(self, config: Config, plan: ClusterPlan, store: Store, *, job: str,
                 job_name: str, options: LaunchOptions) -> None:
        self.config = config
        self.plan = plan
        self.store = store
        self.job = job
        self.job_name = job_name
        self.options = options
        self.user = user_name()
        self.keys = Keys(config.batch.store.prefix)
        self.view = ProgressView([vm.name for vm in plan.vms])
        self.revision_seen = 0  # of the VM records shown so far

    # -- recording ------------------------------------------------------------

    def record(self) -> int:
        """Write the spec, the key pair and one pending record per VM; the revision after."""
        pair = sshkeys.generate(f"vcluster-job-{self.job}")
        spec = ClusterSpec(self.job, self.job_name, self.user, os.getuid(), time.time(),
                           pair.public, self.plan)
        k = self.keys
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PRIVATE), pair.private)
        self.store.put(k.cluster_key(self.user, self.job, sshkeys.PUBLIC), pair.public)
        revision = 0
        now = time.time()
        for vm in self.plan.vms:
            revision = self.store.put(k.vm(self.user, self.job, vm.index),
                                      to_json(VmRecord(VmState.PENDING, since=now)))
        # The spec last: runners that see it find every VM record in place.
        return self.store.put(k.cluster_spec(self.user, self.job), to_json(spec)) or revision

    def forget(self) -> None:
        with contextlib.suppress(VclusterError):
            self.store.delete_prefix(self.keys.cluster_prefix(self.user, self.job))

    # -- waiting --------------------------------------------------------------

    def _apply(self, event: WatchEvent) -> VmRecord | None:
        self.revision_seen = max(self.revision_seen, event.revision)
        if event.type.name != "PUT":
            return None
        index = self.keys.vm_index(event.key, self.user, self.job)
        record = from_json(VmRecord, event.value)
        self.view.update(index, record)
        return record

    def wait_ready(self, step: RunnerStep, revision: int) -> None:
        vms_prefix = self.keys.vms_prefix(self.user, self.job)
        deadline = time.monotonic() + self.options.ready_timeout
        self.revision_seen = revision
        with self.store.watch_prefix(vms_prefix, start_revision=revision + 1) as watch:
            for entry in self.store.get_prefix(vms_prefix).entries:
                self.view.update(self.keys.vm_index(entry.key, self.user, self.job),
                                 from_json(VmRecord, entry.value))
            while True:
                states = {i: r.state for i, r in self.view.records.items()}
                failed = [i for i, s in states.items() if s is VmState.FAILED]
                if failed:
                    raise self._failure(failed[0])
                if len(states) == len(self.plan.vms) and all(
                        s is VmState.READY for s in states.values()):
                    return
                if step.exited() is not None:
                    # Give the last published states a moment to arrive.
                    while (late := watch.get(timeout=1.0)) is not None:
                        self._apply(late)
                    if any(r.state is VmState.FAILED for r in self.view.records.values()):
                        continue
                    lines = "\n".join(f"    {line}" for line in step.tail())
                    raise ClusterFailed(f"the VM runners exited (srun status {step.exited()}) "
                                        f"before the cluster was ready; their last output:\n"
                                        f"{lines}")
                if time.monotonic() > deadline:
                    not_ready = [f"{vm.name} ({r.state.value if r else 'pending'})"
                            for vm in self.plan.vms
                            if (r := self.view.records.get(vm.index)) is None
                            or r.state is not VmState.READY]
                    raise ClusterFailed(f"not ready after {self.options.ready_timeout:g} s: "
                                        + ", ".join(not_ready))
                event = watch.get(timeout=0.5)
                if event is not None:
                    self._apply(event)
                else:
                    self.view.draw()

    def _failure(self, index: int) -> ClusterFailed:
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
        record = self._apply_quietly(event)
        if record is not None and record.state is VmState.FAILED:
            index = self.keys.vm_index(event.key, self.user, self.job)
            sys.stderr.write(f"vcluster: warning: {self._failure(index)}\n")
            sys.stderr.flush()

    def _apply_quietly(self, event: WatchEvent) -> VmRecord | None:
        if event.type.name != "PUT":
            return None
        index = self.keys.vm_index(event.key, self.user, self.job)
        record = from_json(VmRecord, event.value)
        self.view.records[index] = record
        return record

    def watch_while_running(self, revision: int) -> contextlib.AbstractContextManager[object]:
        return self.store.watch_prefix(self.keys.vms_prefix(self.user, self.job),
                                       start_revision=revision + 1, callback=self._warn_if_lost)

    def run_user_command(self) -> int:
        env = dict(os.environ, VCLUSTER_JOB_ID=self.job)
        shell = os.environ.get("SHELL") or "/bin/sh"
        with tempfile.TemporaryDirectory(prefix="vcluster-shell-") as tmp:
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
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                proc = spawn(argv, env=env, stdin=None, stdout=None, stderr=None,
                             process_group=0 if own_group else None)
                try:
                    return proc.wait()
                except Interrupted:
                    if own_group:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        proc.send_signal(signal.SIGHUP)  # what a hung-up terminal does
                    raise
            finally:
                signal.signal(signal.SIGINT, previous)

    # -- the whole run ----------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _raise_interrupted)
        out = sys.stderr
        count = len(self.plan.vms)
        start = time.monotonic()
        step: RunnerStep | None = None
        try:
            revision = self.record()
            out.write(f"vcluster: job {self.job}: starting {count} VM"
                      f"{'s' if count > 1 else ''} ({self.plan.definition})\n")
            # No stop signal between srun's start and ``step`` knowing it: the finally
            # below must see every srun it has to stop.
            blocked = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            try:
                step = RunnerStep(self.job, count, stop_timeout=self.options.stop_timeout,
                                  echo=self.options.verbose)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            self.wait_ready(step, revision)
            out.write(f"vcluster: job {self.job}: {count} VM{'s' if count > 1 else ''} ready "
                      f"in {time.monotonic() - start:.1f} s; VCLUSTER_JOB_ID={self.job}\n")
            out.flush()
            step.after_ready = True  # from now on srun's own errors are shown as warnings
            with self.watch_while_running(self.revision_seen):
                return self.run_user_command()
        except KeyboardInterrupt as e:
            raise Interrupted("stopped the cluster: interrupted (Ctrl-C)") from e
        finally:
            # A second Ctrl-C or TERM must not cut the clean-up short.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            with contextlib.suppress(Interrupted, KeyboardInterrupt):
                if step is not None:
                    out.write(f"vcluster: job {self.job}: stopping the VMs\n")
                    out.flush()
                    step.stop(self.options.step_wait)
                self.forget()
                out.write(f"vcluster: job {self.job}: stopped\n")

