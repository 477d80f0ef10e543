"""The reconcile pass: release what belongs to jobs SLURM no longer runs on this host.

It runs when the agent starts and then on a timer.  A job is released only
when SLURM answered and does not list it among the jobs holding this node
(running, suspended, configuring or completing); when SLURM cannot be asked
nothing is touched, so a running job's resources are never removed by
mistake.  This is what cleans up after an epilog that could not reach the
agent, a crashed agent, or a host that rebooted.
"""

from __future__ import annotations

import logging
import threading

from vcluster.agent.jobs import Jobs
from vcluster.agent.peer import SlurmQueries
from vcluster.errors import VclusterError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0


class Reconciler:
    def __init__(self, jobs: Jobs, slurm: SlurmQueries,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.jobs = jobs
        self.slurm = slurm
        self.interval = interval
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)

    def run_once(self) -> list[str]:
        """One pass; the jobs it released."""
        logged = self.jobs.logged()
        if not logged:
            return []
        try:
            holding = self.slurm.jobs_holding_node()
        except VclusterError as e:
            holding = None
            log.warning("reconcile: %s", e)
        if holding is None:
            log.warning("reconcile: SLURM did not say which jobs run on %s; touching nothing",
                        self.slurm.node)
            return []
        released: list[str] = []
        for job in logged:
            if job in holding:
                continue
            try:
                self.jobs.release(job)
                released.append(job)
                log.info("reconcile: released job %s (SLURM no longer runs it here)", job)
            except VclusterError as e:
                log.warning("reconcile: %s", e)
        return released

    def _run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                log.exception("reconcile pass failed")
            self.passes += 1
            if self._stop.wait(self.interval):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
