"""The launcher's progress display and cluster selection: pure logic."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.test_cluster_plan import plan
from vcluster.cli.clusters import Cluster, select_cluster, vm_index
from vcluster.cluster import ClusterSpec
from vcluster.errors import InputError
from vcluster.launch.progress import ProgressView
from vcluster.lifecycle import VmState
from vcluster.store.records import VmRecord


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_lines_are_redrawn_in_place() -> None:
    out = Terminal()
    view = ProgressView(["vm0", "vm1"], out)
    view.update(0, VmRecord(VmState.BOOTING, host="h1"))
    first = out.getvalue()
    assert first.count("\n") == 2 and "\x1b[2F" not in first  # nothing to back up over yet
    view.update(1, VmRecord(VmState.READY, host="h2"))
    again = out.getvalue()[len(first):]
    assert again.startswith("\x1b[2F")  # back up over the two lines drawn before
    lines = [line.replace("\x1b[2K", "") for line in again[4:].splitlines()]
    assert lines[0].split()[:3] == ["vm0", "booting", "h1"]
    assert lines[1].split()[:3] == ["vm1", "ready", "h2"]
    assert lines[1].endswith(" s")
    assert view.summary() == "1 booting, 1 ready"


def test_a_log_gets_one_line_per_change() -> None:
    out = io.StringIO()
    view = ProgressView(["vm0"], out)
    view.update(0, VmRecord(VmState.PREPARING, host="h1"))
    view.update(0, VmRecord(VmState.PREPARING, host="h1"))  # no change: no line
    view.update(0, VmRecord(VmState.BOOTING, host="h1"))
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "vcluster: vm0: preparing on h1", "vcluster: vm0: booting on h1"]


def clusters(tmp_path: Path) -> list[Cluster]:
    p = plan(tmp_path, "tiny:2")
    return [Cluster(ClusterSpec(job, name, "alice", 1000, 0.0, "k", p), {})
            for job, name in (("7", "exp"), ("12", "runs"), ("13", "runs"))]


def test_selection_by_id_name_environment(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cs = clusters(tmp_path)
    monkeypatch.delenv("VCLUSTER_JOB_ID", raising=False)
    assert select_cluster(cs, "12", None).spec.job == "12"
    assert select_cluster(cs, None, "exp").spec.job == "7"
    monkeypatch.setenv("VCLUSTER_JOB_ID", "13")
    assert select_cluster(cs, None, None).spec.job == "13"
    assert select_cluster(cs[:1], "7", None) is cs[0]
    assert os.environ["VCLUSTER_JOB_ID"] == "13"


@pytest.mark.parametrize(("jobid", "jobname", "message"), [
    ("99", None, "-j 99: you have no cluster in job 99 (expected one of: 7 (exp), 12 (runs), "
                 "13 (runs))"),
    (None, "runs", "-J runs: 2 clusters have that job name"),
    (None, "nope", "-J nope: no cluster has that job name"),
    (None, None, "you have 3 clusters: say which with -j JOBID or -J NAME"),
])
def test_ambiguous_or_unknown_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        jobid: str | None, jobname: str | None,
                                        message: str) -> None:
    monkeypatch.delenv("VCLUSTER_JOB_ID", raising=False)
    with pytest.raises(InputError) as e:
        select_cluster(clusters(tmp_path), jobid, jobname)
    assert str(e.value).startswith(message)


def test_vm_names(tmp_path: Path) -> None:
    c = clusters(tmp_path)[0]
    assert vm_index("vm1", c) == 1 and vm_index("0", c) == 0
    with pytest.raises(InputError, match="'vm2': no such VM in job 7 \\(expected vm0 to vm1\\)"):
        vm_index("vm2", c)
