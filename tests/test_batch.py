"""``vcluster batch`` in the 3-host sandbox, as real users, with real sbatch, QEMU and guests.

Each job is submitted from the login node as sbatch would be; what is
checked is what its user sees: the job's output file, its exit code as
``--wait`` returns it and as ``scontrol show job`` shows it, ``vcluster ps``
while it waits or runs, and that nothing of it is left anywhere after.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_for
from tests.support_agent import JobTool, nothing_left, store_keys
from tests.support_alloc import (
    Shared,
    module_users,
    nothing_left_anywhere,
    shared_dir,
    tool,
    wait_flag,
)
from tests.support_images import require_image
from tests.support_sandbox import Sandbox, sandbox
from vcluster.launch.sbatchopts import SBATCH_OPTIONS, Takes

__all__ = ["sandbox", "tool"]

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

ALICE = "vcbt-alice"
HOSTS = ("h1", "h2", "h3")
SUBMITTED = re.compile(r"^Submitted batch job (\d+)$", re.MULTILINE)
TEMPLATES = """\
broken:
  inherits: tiny
  qemu-args: [-nosuchoption]
"""


@dataclass
class Batch:
    """Submitting as ALICE from a directory of hers, where the job's output lands."""

    box: Sandbox
    shared: Shared

    @property
    def work(self) -> Path:
        return self.shared.root / "work"

    def script(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def vcluster(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        """``vcluster ARGS`` as ALICE in the work directory."""
        proc = self.box.run(["sh", "-c", f"cd {self.work} && exec env "
                             f"VCLUSTER_HOME={self.shared.home} vcluster {shlex.join(args)}"],
                            user=ALICE, check=False, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def submit(self, *args: str) -> str:
        status, out, err = self.vcluster("batch", *args)
        assert status == 0, err
        match = SUBMITTED.search(out)
        assert match, out
        return match.group(1)

    def output(self, job: str, name: str | None = None) -> str:
        return (self.work / (name or f"slurm-{job}.out")).read_text()

    def scontrol(self, job: str) -> str:
        return self.box.run(["scontrol", "show", "job", job]).stdout

    def queue(self) -> list[str]:
        out = self.box.run(["squeue", "--noheader", f"--user={ALICE}", "--format=%i"]).stdout
        return out.split()

    def ps(self) -> str:
        status, out, err = self.vcluster("ps")
        assert status == 0, err
        return out


users = module_users(ALICE)


@pytest.fixture(scope="module")
def batch(sandbox: Sandbox, users: None) -> Iterator[Batch]:
    require_image("tiny")
    with shared_dir(TEMPLATES, {}) as shared:
        (shared.root / "work").mkdir(mode=0o777)
        (shared.root / "work").chmod(0o777)
        yield Batch(sandbox, shared)


def never_ran(batch: Batch, tool: JobTool, job: str) -> None:
    """A job cancelled before it started: gone from the queue, nothing of it anywhere."""
    wait_for(f"job {job} to leave the queue", lambda: job not in batch.queue(), 60)
    assert not any(f" prolog job={job} " in line for line in batch.box.script_log())
    for host in HOSTS:
        nothing_left(tool, job, host)
    assert store_keys(batch.box, f"/vcluster/jobs/{job}/") == []
    assert store_keys(batch.box, f"/vcluster/users/{ALICE}/clusters/{job}/") == []


FAM_JOB = """\
#!/bin/sh
#SBATCH --time=10
#VCLUSTER -c 1 tiny-fam:2
# vm0 writes the shared region, vm1 reads it back; the script's own status is the job's.
echo "host: $(hostname) job: $VCLUSTER_JOB_ID args: $*"
vcluster exec vm0 -- fam write 8 0x0ba7c4ed || exit 10
echo "vm1 read: $(vcluster exec vm1 -- fam read 8)"
exit 3
"""


@pytest.fixture(scope="module")
def fam_job(batch: Batch, tool: JobTool) -> tuple[str, int, str]:
    """The FAM batch job, run to its end with --wait: (job, --wait's status, its stdout)."""
    batch.script("fam.sh", FAM_JOB)
    status, out, err = batch.vcluster("batch", "--wait", "fam.sh", "one", "two", timeout=240)
    match = SUBMITTED.search(out)
    assert match, (out, err)
    job = match.group(1)
    nothing_left_anywhere(batch.box, tool, job, ALICE)
    return job, status, out


def test_a_fam_batch_job_shares_the_region_and_leaves_nothing(
        batch: Batch, fam_job: tuple[str, int, str]) -> None:
    job, _, _ = fam_job
    output = batch.output(job)
    assert re.search(rf"^host: h\d job: {job} args: one two$", output, re.MULTILINE), output
    read = re.search(r"^vm1 read: (\S+)$", output, re.MULTILINE)
    assert read and read.group(1).lower().endswith("0ba7c4ed"), output
    # the launcher's progress is in the job's output too
    assert f"vcluster: job {job}: 2 VMs ready in" in output, output
    assert f"vcluster: job {job}: fam.sh (on the host) exited with status 3" in output


def test_the_scripts_exit_status_is_the_jobs(batch: Batch,
                                             fam_job: tuple[str, int, str]) -> None:
    job, status, _ = fam_job
    assert status == 3
    assert "ExitCode=3:0" in batch.scontrol(job)
    assert "JobState=FAILED" in batch.scontrol(job)


def test_a_vm_script_runs_inside_vm0_of_a_debian_cluster(batch: Batch, tool: JobTool) -> None:
    require_image("debian")
    batch.script("inside.sh", "#!/bin/sh\n#VCLUSTER -c 1 debian:1\n"
                              'echo "inside: $(hostname) debian $(cat /etc/debian_version) '
                              'as $(id -un) args: $*"\nexit 5\n')
    status, out, err = batch.vcluster("batch", "--wait", "-o", "inside-%j.log", "-b",
                                      "inside.sh", "debian:1", "x y", timeout=420)
    match = SUBMITTED.search(out)
    assert match, (out, err)
    job = match.group(1)
    assert status == 5
    output = batch.output(job, f"inside-{job}.log")
    assert re.search(r"^inside: vm0 debian 12\.\S+ as root args: x y$", output,
                     re.MULTILINE), output
    assert "ExitCode=5:0" in batch.scontrol(job)
    nothing_left_anywhere(batch.box, tool, job, ALICE)


def test_a_vm_that_fails_to_boot_ends_the_job_with_its_reason(
        batch: Batch, tool: JobTool) -> None:
    batch.script("broken.sh", "#!/bin/sh\n#VCLUSTER -c 1 broken:1\necho never\n")
    status, out, err = batch.vcluster("batch", "--wait", "broken.sh", timeout=120)
    match = SUBMITTED.search(out)
    assert match, (out, err)
    job = match.group(1)
    assert status == 1
    output = batch.output(job)
    assert re.search(r"vcluster: error: vm0 failed on h\d: QEMU exited with status 1: "
                     "qemu-system-x86_64: -nosuchoption: invalid option", output), output
    assert "console (last lines):" in output and "never" not in output, output
    assert "ExitCode=1:0" in batch.scontrol(job)
    nothing_left_anywhere(batch.box, tool, job, ALICE)


def test_a_pending_batch_cluster_is_listed_and_cancelled(batch: Batch, tool: JobTool) -> None:
    batch.script("held.sh", "#!/bin/sh\n#VCLUSTER -c 1 tiny:2\ntrue\n")
    job = batch.submit("-H", "held.sh")
    rows = [line.split() for line in batch.ps().splitlines()]
    assert [job, "held.sh", "batch", "pending", "2", "-", "(JobHeldUser)"] in rows, rows
    status, _, err = batch.vcluster("exec", "-j", job, "--all", "--", "true")
    assert status == 1 and f"job {job} (held.sh) is pending (JobHeldUser)" in err, err
    status, out, _ = batch.vcluster("ps", job)
    assert status == 0 and out.startswith(f"job {job} (held.sh): batch, pending"), out
    batch.box.run(["scancel", job], user=ALICE)
    never_ran(batch, tool, job)
    assert job not in batch.ps()


def test_a_running_batch_cluster_is_listed_and_scancel_leaves_nothing(
        batch: Batch, tool: JobTool) -> None:
    batch.script("long.sh", "#!/bin/sh\n#VCLUSTER -N 2 -c 1 tiny:2\n"
                            f"{wait_flag(batch.shared, 'never')}\n")
    job = batch.submit("long.sh")

    def state() -> str | None:
        for line in batch.ps().splitlines():
            if line.split()[:1] == [job]:
                return line.split()[3]
        return None

    seen = set()

    def ready() -> bool:
        seen.add(state())
        return "ready" in seen

    wait_for(f"batch cluster {job} to be ready", ready, 120)
    assert seen <= {"pending", "starting", "ready"}, seen
    status, out, err = batch.vcluster("exec", "-J", "long.sh", "--all", "--", "hostname")
    assert (status, sorted(out.split())) == (0, ["vm0", "vm0:", "vm1", "vm1:"]), err
    batch.box.run(["scancel", job], user=ALICE)
    nothing_left_anywhere(batch.box, tool, job, ALICE)
    assert "stopped the cluster" in batch.output(job)
    wait_for(f"job {job} to leave ps", lambda: state() is None, 60)


@pytest.mark.parametrize(("body", "where", "expected"), [
    ("#VCLUSTER tiny:0\n", "bad.sh:2: #VCLUSTER tiny:0: ", "count of 'tiny' must be at least 1"),
    ("#VCLUSTER --frobnicate tiny:1\n", "bad.sh:2: #VCLUSTER --frobnicate tiny:1: ",
     "--frobnicate is not an option"),
    ("# no definition here\n", "bad.sh: ", "no DEFINITION: give one on the command line"),
    ("#SBATCH -t 5\n#SBATCH --time=abc\n#VCLUSTER tiny:1\n", "bad.sh:3: #SBATCH --time=abc: ",
     "sbatch refuses it: Invalid --time specification"),
    ("#VCLUSTER -p nosuchpartition tiny:1\n", "bad.sh:2: #VCLUSTER -p nosuchpartition tiny:1: ",
     "sbatch refuses it: invalid partition"),
], ids=["count-0", "unknown-option", "no-definition", "sbatch-refuses-time",
        "sbatch-refuses-partition"])
def test_bad_directives_are_one_line_and_submit_nothing(
        batch: Batch, body: str, where: str, expected: str) -> None:
    batch.script("bad.sh", "#!/bin/sh\n" + body + "true\n")
    status, out, err = batch.vcluster("batch", "bad.sh")
    assert status == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vcluster: error: {where}"), err
    assert expected in err, err
    assert out == "" and batch.queue() == []


def test_ten_batch_clusters_at_once_all_complete(batch: Batch, tool: JobTool) -> None:
    batch.script("ten.sh", "#!/bin/sh\n#VCLUSTER -c 1 tiny:1\n"
                           'echo "ok $(vcluster exec vm0 -- hostname)"\n')
    jobs = [batch.submit("ten.sh") for _ in range(10)]
    started = time.monotonic()
    wait_for("the ten batch clusters to complete", lambda: batch.queue() == [], 420)
    finished = time.monotonic() - started
    for job in jobs:
        assert "ExitCode=0:0" in batch.scontrol(job), batch.output(job)
        assert batch.output(job).count("\nok vm0\n") == 1, batch.output(job)
    for job in jobs:
        nothing_left_anywhere(batch.box, tool, job, ALICE)
    print(f"ten tiny:1 batch clusters completed {finished:.1f} s after the last submission")


def test_the_sbatch_table_knows_every_option_of_the_installed_sbatch(sandbox: Sandbox) -> None:
    text = sandbox.run(["sbatch", "--help"]).stdout
    found = re.findall(r"^\s+(?:-\w,?\s+)?--([a-z][a-z-]*)(\[=|=)?", text, re.MULTILINE)
    assert len(found) > 80, text
    table = {o.long: o.takes for o in SBATCH_OPTIONS}
    for name, eq in found:
        assert name in table, f"--{name} is not in vcluster's sbatch table"
        # --help shows "=" for most options that take a value, "[=" for optional ones (and
        # for a few that take one, as sbatch(1) says); it leaves "=" out of some (--container)
        allowed = {"=": {Takes.VALUE}, "[=": {Takes.VALUE, Takes.OPTIONAL},
                   "": set(Takes)}[eq]
        assert table[name] in allowed, (name, eq, table[name])
    flags = [name for name, eq in found if not eq and table[name] is Takes.NOTHING]
    assert {"hold", "wait", "parsable", "quiet", "overcommit"} <= set(flags)
