"""One task on one host of a running job, sharing the job's resources: ``srun --overlap``.

``vcluster console``, ``exec`` and ``nc`` reach a VM's host this way, from
the login node or from inside the job (an alloc shell, a batch script); a
local cluster's host is this machine, where the same commands run directly.
Inside the job srun would also read the job's own requests from the
environment (``SLURM_MEM_PER_CPU`` and its kin) and ask for that memory
again, which SLURM refuses ("Memory required by task is not available"):
the step is given an environment without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# What a job's environment requests, which srun would take as the step's own.
JOB_REQUESTS = ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_GPU")


def overlap_argv(job: str, host: str, *, local: bool = False) -> list[str]:
    """``srun`` options for one task of ``job`` on ``host`` (the program comes after);
    nothing for a local cluster's (``ClusterSpec.local``): its host is this machine."""
    if local:
        return []
    return ["srun", f"--jobid={job}", "--overlap", f"--nodelist={host}", "--nodes=1",
            "--ntasks=1", "--quiet"]


def overlap_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for that srun: ours, without the job's own requests."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in JOB_REQUESTS}
