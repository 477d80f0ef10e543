"""vcluster batch's pure parts: options as getopt reads them, directives, the merged request,
the job script, the queue's marks, ps of pending clusters, and srun's environment."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support_vm import cluster_spec, fake_tiny_boot, vm_plan
from vcluster.cli.clusters import Cluster
from vcluster.cli.ps import cluster_row, cluster_state, queued_header, queued_row
from vcluster.codec import from_json
from vcluster.errors import InputError
from vcluster.launch.batch import END, BatchJob, job_script, own_options
from vcluster.launch.batchargs import READER, read_directives, read_request
from vcluster.launch.launcher import BatchScript
from vcluster.launch.overlap import overlap_env
from vcluster.launch.queue import FORMAT, SEP, QueuedJob, job_comment, parse_queue
from vcluster.launch.sbatchopts import SBATCH_OPTIONS, OptionError, Takes
from vcluster.launch.userscript import SAVE_AND_RUN
from vcluster.lifecycle import VmState
from vcluster.store.records import VmRecord


def forms(words: list[str]) -> tuple[list[str], list[str]]:
    given, rest = READER.read(words)
    return [g.sbatch_form for g in given], rest


# -- options ------------------------------------------------------------------

@pytest.mark.parametrize("words", [["-pdebug"], ["-p", "debug"], ["--partition=debug"],
                                   ["--partition", "debug"], ["--part=debug"]])
def test_an_option_and_its_value_however_written(words: list[str]) -> None:
    assert forms([*words, "tiny:2", "job.sh", "-p", "x"]) == (
        ["--partition=debug"], ["tiny:2", "job.sh", "-p", "x"])


def test_flags_group_and_the_first_word_ends_the_options() -> None:
    assert forms(["-Hv", "-t30", "--wait", "job.sh", "--wait"]) == (
        ["--hold", "--verbose", "--time=30", "--wait"], ["job.sh", "--wait"])
    assert forms(["-N", "2", "--", "-x"]) == (["--nodes=2"], ["-x"])


def test_an_optional_value_only_with_equals() -> None:
    assert forms(["--nice", "job.sh"]) == (["--nice"], ["job.sh"])
    assert forms(["--nice=5", "--exclusive", "job.sh"]) == (["--nice=5", "--exclusive"],
                                                            ["job.sh"])


def test_an_exact_long_name_wins_over_longer_ones() -> None:
    assert forms(["--mem", "2G", "job.sh"]) == (["--mem=2G"], ["job.sh"])


@pytest.mark.parametrize(("words", "message"), [
    (["-Z"], "-Z is not an option of vcluster batch or sbatch"),
    (["--frobnicate", "x"], "--frobnicate is not an option"),
    (["--mem-per"], "--mem-per is ambiguous (it could be --mem-per-cpu, --mem-per-gpu)"),
    (["-t"], "-t needs a value"),
    (["--time"], "--time: --time needs a value"),
    (["--hold=yes"], "--hold=yes: --hold takes no value"),
])
def test_bad_options_say_what_is_wrong(words: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        READER.read(words)


def test_our_own_options_shadow_sbatch_short_letters_only() -> None:
    given, _ = READER.read(["-b", "in.sh", "--begin=now", "-c", "2"])
    assert [(g.option.long, g.value) for g in given] == [
        ("vm-script", "in.sh"), ("begin", "now"), ("cpus-per-task", "2")]


def test_the_sbatch_table_has_each_name_once() -> None:
    longs = [o.long for o in SBATCH_OPTIONS]
    shorts = [o.short for o in SBATCH_OPTIONS if o.short]
    assert len(longs) == len(set(longs)) and len(shorts) == len(set(shorts))
    assert {o.long: o.takes for o in SBATCH_OPTIONS}["hold"] is Takes.NOTHING


# -- directives and the request -----------------------------------------------

def script(tmp_path: Path, text: str, name: str = "job.sh") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_directives_are_read_until_the_first_command(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/bin/sh\n#SBATCH -t 30 -p debug  # a comment\n\n# note\n"
                            "#SBATCHX ignored\n#VCLUSTER -c 2 'tiny-fam:4'\necho hi\n"
                            "#SBATCH -t 99\n")
    found = read_directives(path, path.read_text())
    assert [(d.line, d.tag, d.words) for d in found] == [
        (2, "#SBATCH", ("-t", "30", "-p", "debug")), (6, "#VCLUSTER", ("-c", "2", "tiny-fam:4"))]


def test_a_script_without_a_shebang_is_refused_at_line_1(tmp_path: Path) -> None:
    path = script(tmp_path, "echo hi\n")
    with pytest.raises(InputError, match=rf"^{path}:1: a batch script starts with #!"):
        read_directives(path, path.read_text())


def test_the_command_line_wins_over_vcluster_lines_over_sbatch_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "#!/bin/sh\n#SBATCH -c 3 -J mine --comment='my note'\n"
                     "#VCLUSTER -c 2 -t 30 tiny-fam:4\n#VCLUSTER --stop-timeout=5\nrun\n")
    request = read_request(["job.sh", "one", "two"])
    assert (request.definition, request.cpus, request.stop_timeout, request.args) == (
        "tiny-fam:4", 2, 5.0, ("one", "two"))
    assert request.definition_from is not None and request.definition_from.line == 3
    assert request.sbatch == ("--time=30",)
    assert (request.job_name, request.comment) == ("mine", "my note")
    request = read_request(["-c", "1", "-t", "5", "tiny:1", "job.sh"])
    assert (request.definition, request.cpus, request.definition_from) == ("tiny:1", 1, None)
    assert request.sbatch == ("--time=30", "--time=5")  # sbatch takes the last
    assert [d.line for d in request.sbatch_lines] == [2]


def test_script_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "#!/bin/sh\n#VCLUSTER tiny:2\n", "in.sh")
    request = read_request(["-b", "in.sh"])
    assert (request.in_vm, request.definition, request.args) == (True, "tiny:2", ())
    request = read_request(["-E", "in.sh", "debian:1", "x"])
    assert (request.in_vm, request.definition, request.args) == (False, "debian:1", ("x",))
    with pytest.raises(InputError, match=r"^-E and -b: give one script"):
        read_request(["-E", "in.sh", "-b", "in.sh"])
    with pytest.raises(InputError, match=r"^missing SCRIPT after DEFINITION 'nope.sh'"):
        read_request(["nope.sh"])
    with pytest.raises(InputError, match=r"^SCRIPT gone.sh: cannot read: No such file"):
        read_request(["tiny:1", "gone.sh"])
    with pytest.raises(InputError, match=r"^missing SCRIPT"):
        read_request(["-t", "5"])


@pytest.mark.parametrize(("body", "message"), [
    ("#VCLUSTER --frobnicate tiny:1\n",
     "job.sh:2: #VCLUSTER --frobnicate tiny:1: --frobnicate is not an option"),
    ("#VCLUSTER tiny:1 tiny:2\n", "job.sh:2: #VCLUSTER tiny:1 tiny:2: one DEFINITION per line"),
    ("#VCLUSTER tiny:1\n#VCLUSTER tiny:2\n",
     "job.sh:3: #VCLUSTER tiny:2: a second DEFINITION \\(the first is on line 2\\)"),
    ("#VCLUSTER -c 0 tiny:1\n", "job.sh:2: #VCLUSTER -c 0 tiny:1: -c 0: '0' is not a number"),
    ("#VCLUSTER -b x tiny:1\n", "job.sh:2: #VCLUSTER -b x tiny:1: -b x: give the script"),
    ("#VCLUSTER 'tiny:1\n", "job.sh:2: #VCLUSTER 'tiny:1: No closing quotation"),
    ("#SBATCH --frob\n", "job.sh:2: #SBATCH --frob: --frob is not an option"),
    ("#SBATCH -n 4\n#VCLUSTER tiny:1\n", "job.sh:2: #SBATCH -n 4: -n 4: not for a batch "
                                         "cluster: the job has one task per VM"),
    ("#SBATCH -t 5 stray\n", "job.sh:2: #SBATCH -t 5 stray: 'stray' is not an option"),
    ("echo\n", "job.sh: no DEFINITION: give one on the command line or in a '#VCLUSTER"),
    ("#VCLUSTER --ready-timeout=0 tiny:1\n", "--ready-timeout=0: '0' is not a number of "
                                             "seconds, at least 1"),
])
def test_bad_directives_name_the_script_line_and_directive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "#!/bin/sh\n" + body + "true\n")
    with pytest.raises(InputError, match=message):
        read_request(["job.sh"])


def test_refused_sbatch_options_on_the_command_line(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script(tmp_path, "#!/bin/sh\n")
    for words, what in ((["--wrap=true"], "give a SCRIPT"), (["-a", "1-3"], "one job")):
        with pytest.raises(InputError, match=what):
            read_request([*words, "tiny:1", "job.sh"])


# -- the job script -------------------------------------------------------------

def batch_job(tmp_path: Path) -> tuple[BatchJob, Path]:
    path = script(tmp_path, "#!/bin/sh\n#SBATCH -t 30\n#VCLUSTER tiny:1\nexit 3\n")
    plan = cluster_spec("5", [vm_plan(0, fake_tiny_boot())]).plan
    text = path.read_text()
    return BatchJob(plan, BatchScript("job.sh", text, ("a b",)), ready_timeout=60), path


def test_the_job_script_keeps_the_sbatch_lines_and_carries_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job, _ = batch_job(tmp_path)
    request = read_request(["job.sh"])
    text = job_script(request, job)
    lines = text.splitlines()
    assert lines[:2] == ["#!/bin/sh", "#SBATCH -t 30"]
    # The here-document gives the launcher the job exactly: run it with cat for the launcher.
    launcher = shlex.join([sys.executable, "-m", "vcluster", "internal", "launcher", "--batch"])
    assert f"exec {launcher} <<'{END}'" in lines
    ran = subprocess.run(["sh", "-c", text.replace(launcher, "cat")], capture_output=True,
                         text=True, check=True)
    assert from_json(BatchJob, ran.stdout) == job
    assert lines[-1] == END


def test_vcluster_asks_for_a_task_per_vm_and_marks_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job, _ = batch_job(tmp_path)
    request = read_request(["-c", "2", "job.sh"])
    assert own_options(request, job.plan) == [
        "--ntasks=1", "--cpus-per-task=2", "--job-name=job.sh", "--comment=vcluster batch tiny:1"]
    request = read_request(["-J", "n", "--comment", "mine", "job.sh"])
    assert own_options(request, job.plan)[1:] == ["--comment=vcluster batch tiny:1; mine"]


def test_the_vm_script_wrapper_saves_runs_and_removes(tmp_path: Path) -> None:
    target = tmp_path / "s"
    ran = subprocess.run(["/bin/sh", "-c", SAVE_AND_RUN, "sh", str(target), "x y"],
                         input="#!/bin/sh\necho \"got $1\"; exit 7\n", capture_output=True,
                         text=True, check=False)
    assert (ran.returncode, ran.stdout, target.exists()) == (7, "got x y\n", False)


# -- the queue and ps --------------------------------------------------------------

def test_queue_lines_with_the_mark_are_vcluster_jobs() -> None:
    assert FORMAT.count(SEP) == 4
    text = SEP.join(["14", "job.sh", "PENDING", "JobHeldUser",
                     job_comment("batch", "tiny:2,debian", "my note")]) + "\n"
    text += SEP.join(["15", "other", "RUNNING", "None", "not ours"]) + "\n"
    text += SEP.join(["16", "x", "RUNNING", "None", "vcluster alloc tiny"]) + "\n"
    jobs = parse_queue(text)
    assert [(j.job, j.mode, j.definition, j.vms) for j in jobs] == [
        ("14", "batch", "tiny:2,debian", 3), ("16", "alloc", "tiny", 1)]


HELD = QueuedJob("14", "job.sh", "PENDING", "JobHeldUser", "batch", "tiny:2")


def test_ps_rows_of_a_pending_and_a_running_batch_cluster() -> None:
    assert queued_row(HELD) == ("14", "job.sh", "batch", "pending", "2", "-", "(JobHeldUser)")
    assert queued_header(HELD).startswith(
        "job 14 (job.sh): batch, pending (JobHeldUser): 2 VMs (tiny:2)")
    spec = cluster_spec("15", [vm_plan(i, fake_tiny_boot()) for i in range(2)])
    spec = dataclasses.replace(spec, mode="batch", name="job.sh")
    ready = {i: VmRecord(VmState.READY, host="h1") for i in range(2)}
    running = QueuedJob("15", "job.sh", "RUNNING", "None", "batch", "tiny:2")
    assert cluster_row(Cluster(spec, ready), running) == (
        "15", "job.sh", "batch", "ready", "2", "2 ready", "h1")
    assert cluster_state(Cluster(spec, {0: ready[0]}), running) == "starting"
    assert cluster_state(Cluster(spec, {**ready, 1: VmRecord(VmState.STOPPING)}),
                         running) == "stopping"
    failed = {0: VmRecord(VmState.FAILED, error="no")}
    assert cluster_state(Cluster(spec, failed), running) == "failed"
    assert cluster_state(None, dataclasses.replace(running, state="COMPLETING")) == "stopping"
    assert cluster_state(None, running) == "starting"


def test_srun_inside_a_job_does_not_ask_for_the_jobs_memory_again() -> None:
    env = overlap_env({"SLURM_MEM_PER_CPU": "1024", "SLURM_JOB_ID": "4", "PATH": "/bin"})
    assert env == {"SLURM_JOB_ID": "4", "PATH": "/bin"}
