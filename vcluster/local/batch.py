"""``vcluster batch`` on the local backend: the launcher in the background, as sbatch does.

The job id is taken at once (``Registry.new_job_id``) and said as sbatch
says it (``Submitted batch job N``); the launcher then runs in a session of
its own (``vcluster internal local-batch``: it survives the terminal), its
output in ``vcluster-%j.out`` (``-o``/``-e`` name other files, with %j, %x
and %% as sbatch has them).  ``--wait`` waits for it and returns its
status; a stop signal meanwhile is passed on, as scancel would.  Of
sbatch's options only those that mean something on one machine are taken
(``-o``, ``-e``, ``-J``, ``-D``, ``-c``, ``--wait``, ``--comment``, kept in the
job's record as SLURM keeps it with the job); any other is refused, naming
the line or the command line that gave it, before anything starts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vcluster import codec
from vcluster.cancel import STOP_SIGNALS
from vcluster.errors import InputError
from vcluster.launch.batch import BatchJob
from vcluster.launch.batchargs import BatchRequest, sbatch_of_sources
from vcluster.launch.submit import forwarded
from vcluster.run import spawn

TAKEN = ("output", "error", "job-name", "chdir", "cpus-per-task", "wait", "comment")
DEFAULT_OUTPUT = "vcluster-%j.out"


@dataclass(frozen=True)
class LocalBatchJob:
    """What the background launcher is handed on its stdin."""

    job: str
    name: str
    batch: BatchJob
    cpus: int | None
    comment: str | None = None


def local_sbatch(request: BatchRequest) -> dict[str, str | None]:
    """The sbatch options that apply locally (the last of each wins); InputError for any
    other, naming where it was given."""
    taken: dict[str, str | None] = {}
    for where, g in sbatch_of_sources(request):
        if g.option.long not in TAKEN:
            raise InputError(f"{where}: {g.written}: the local backend runs the job on this "
                             f"machine, without SLURM (of sbatch's options it takes -o, -e, "
                             f"-J, -D, -c, --wait and --comment)")
        taken[g.option.long] = g.value
    return taken


def output_path(pattern: str, job: str, name: str, chdir: Path) -> Path:
    """sbatch's filename pattern: %j the job id, %x the job name, %% a percent sign."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            code = pattern[i + 1]
            out.append({"j": job, "J": job, "x": name, "%": "%"}.get(code, "%" + code))
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    path = Path("".join(out))
    return path if path.is_absolute() else chdir / path


def submit_local_batch(request: BatchRequest, job: BatchJob) -> int:
    """Start the job's launcher in the background; with --wait, its exit status."""
    from vcluster.config.loader import load_config
    from vcluster.local import registry
    from vcluster.store import open_store
    from vcluster.store.keys import Keys

    options = local_sbatch(request)
    batch = load_config().batch
    chdir = Path(options.get("chdir") or os.getcwd())
    if not chdir.is_dir():
        raise InputError(f"-D {chdir}: no such directory")
    name = options.get("job-name") or request.job_name or request.script.name
    with open_store(batch.store) as store:
        jobid = registry.Registry(store, Keys(batch.store.prefix),
                                  batch.directories.layout).new_job_id()
    out_path = output_path(options.get("output") or DEFAULT_OUTPUT, jobid, name, chdir)
    error = options.get("error")
    err_path = output_path(error, jobid, name, chdir) if error else out_path
    handed = LocalBatchJob(jobid, name, job, request.cpus, options.get("comment"))
    with contextlib.ExitStack() as files:
        try:
            out = files.enter_context(open(out_path, "ab"))
            err = out if err_path == out_path else files.enter_context(open(err_path, "ab"))
        except OSError as e:
            raise InputError(f"-o/-e: cannot write {e.filename}: {e.strerror}") from e
        proc = spawn([sys.executable, "-m", "vcluster", "internal", "local-batch"],
                     stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=chdir,
                     new_session=True)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(codec.to_json(handed).encode())
        proc.stdin.close()
    print(f"Submitted batch job {jobid}", flush=True)
    if "wait" not in options:
        return 0
    with forwarded(proc, STOP_SIGNALS):
        code = proc.wait()
    return 128 - code if code < 0 else code


def run_local_batch(text: str) -> int:
    """The background launcher: the cluster, the script, the cluster stopped; the status."""
    from vcluster.config.loader import load_config
    from vcluster.launch.launcher import LaunchOptions
    from vcluster.local.launch import run_local

    handed = codec.from_json(LocalBatchJob, text, what="the local batch job")
    options = LaunchOptions(script=handed.batch.script, stop_timeout=handed.batch.stop_timeout,
                            ready_timeout=handed.batch.ready_timeout, local=True)
    return run_local(load_config(), handed.batch.plan, options, name=handed.name,
                     cpus=handed.cpus, job=handed.job, comment=handed.comment)
