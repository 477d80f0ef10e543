"""``vcluster ps``: the cluster lines, and per VM (``-l``, ``ps JOB``) on a MemoryStore."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from tests.support_vm import cluster_spec, fake_tiny_boot, vm_plan
from vcluster.cli.clusters import Cluster
from vcluster.cli.main import cli
from vcluster.cli.ps import cluster_header, cluster_row, vm_rows
from vcluster.cluster import ClusterSpec, FamPlan
from vcluster.identity import user_name
from vcluster.launch.queue import QueuedJob
from vcluster.lifecycle import VmState
from vcluster.store.keys import Keys
from vcluster.store.memory import MemoryStore
from vcluster.store.records import SshEndpoint, VmRecord, to_json

KEYS = Keys("/vcluster")
QUEUE: list[QueuedJob] = []  # what the fake squeue answers
USER = user_name()


def spec(job: str, *, vnis: dict[str, int] | None = None) -> ClusterSpec:
    """tiny-fam:2,tiny:2 as the launcher records it."""
    fam = FamPlan("fam", 1 << 20)
    made = cluster_spec(job, [vm_plan(i, fake_tiny_boot(), fam=fam if i < 2 else None)
                              for i in range(4)], user=USER)
    plan = dataclasses.replace(made.plan, definition="tiny-fam:2,tiny:2")
    return dataclasses.replace(made, name="vcluster", plan=plan, vnis=vnis or {})


RECORDS = {
    0: VmRecord(VmState.READY, host="h1", addresses=("10.77.0.1",),
                ssh=SshEndpoint("10.199.0.11", 20001)),
    1: VmRecord(VmState.READY, host="h1", addresses=("10.77.0.2",)),
    2: VmRecord(VmState.BOOTING, host="h2", addresses=("10.77.0.3",)),
    3: VmRecord(VmState.PENDING),
}


def test_each_vm_with_host_state_addresses_and_region() -> None:
    c = Cluster(spec("12", vnis={"cluster": 4096}), RECORDS)
    assert cluster_header(c) == "job 12 (vcluster): 4 VMs (tiny-fam:2,tiny:2); VNIs: cluster=4096"
    assert vm_rows(c) == [
        ("vm0", "h1", "ready", "10.77.0.1", "fam", "10.199.0.11:20001"),
        ("vm1", "h1", "ready", "10.77.0.2", "fam", "-"),
        ("vm2", "h2", "booting", "10.77.0.3", "-", "-"),
        ("vm3", "-", "pending", "10.77.0.4", "-", "-"),  # planned address until its runner says
    ]
    assert cluster_row(c) == ("12", "vcluster", "alloc", "starting", "4",
                              "1 booting, 1 pending, 2 ready", "h1,h2")


def test_a_cluster_without_vnis_or_records() -> None:
    c = Cluster(spec("7"), {})
    assert cluster_header(c) == "job 7 (vcluster): 4 VMs (tiny-fam:2,tiny:2)"
    assert vm_rows(c)[0] == ("vm0", "-", "unknown", "10.77.0.1", "fam", "-")


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryStore]:
    made = MemoryStore()
    for job, vnis in (("12", {"cluster": 4096}), ("13", {"cluster": 4097})):
        made.put(KEYS.cluster_spec(USER, job), to_json(spec(job, vnis=vnis)))
        for i, record in RECORDS.items():
            made.put(KEYS.vm(USER, job, i), to_json(record))

    def with_store(ctx: click.Context) -> tuple[MemoryStore, Keys, str]:
        return made, KEYS, USER

    monkeypatch.setattr("vcluster.cli.clusters.with_store", with_store)
    monkeypatch.setattr("vcluster.cli.clusters.queued", lambda: list(QUEUE))
    try:
        yield made
    finally:
        made.close()


VMS_OF_12 = """\
job 12 (vcluster): 4 VMs (tiny-fam:2,tiny:2); VNIs: cluster=4096
VM   HOST  STATE    ADDRESSES  FAM  SSH
vm0  h1    ready    10.77.0.1  fam  10.199.0.11:20001
vm1  h1    ready    10.77.0.2  fam  -
vm2  h2    booting  10.77.0.3  -    -
vm3  -     pending  10.77.0.4  -    -
"""


@pytest.mark.parametrize("args", [["12"], ["-l", "12"], ["-j", "12"], ["-l", "-j", "12"]])
def test_ps_job_lists_its_vms(store: MemoryStore, args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["ps", *args])
    assert result.exit_code == 0, result.output
    assert result.output == VMS_OF_12


def test_ps_by_job_name_needs_one_cluster_of_that_name(store: MemoryStore) -> None:
    result = CliRunner().invoke(cli, ["ps", "-J", "vcluster"])
    assert result.exit_code == 2
    assert "-J vcluster: 2 clusters have that job name" in result.output


def test_ps_long_lists_every_cluster(store: MemoryStore) -> None:
    result = CliRunner().invoke(cli, ["ps", "-l"])
    assert result.exit_code == 0, result.output
    assert result.output == (VMS_OF_12 + "\n"
                             + VMS_OF_12.replace("job 12", "job 13").replace("4096", "4097"))


def test_ps_stays_one_line_per_cluster(store: MemoryStore) -> None:
    result = CliRunner().invoke(cli, ["ps"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "JOBID  NAME      MODE   STATE     VMS  VM STATES                      HOSTS",
        "12     vcluster  alloc  starting  4    1 booting, 1 pending, 2 ready  h1,h2",
        "13     vcluster  alloc  starting  4    1 booting, 1 pending, 2 ready  h1,h2",
    ]


def test_ps_lists_jobs_slurm_holds_before_their_clusters_are_recorded(
        store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    held = QueuedJob("9", "job.sh", "PENDING", "JobHeldUser", "batch", "tiny:3")
    starting = QueuedJob("100", "x", "RUNNING", "None", "alloc", "tiny")
    QUEUE[:] = [held, starting]
    try:
        result = CliRunner().invoke(cli, ["ps"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[1:] == [
            "9      job.sh    batch  pending   3    -                              "
            "(JobHeldUser)",
            "12     vcluster  alloc  starting  4    1 booting, 1 pending, 2 ready  h1,h2",
            "13     vcluster  alloc  starting  4    1 booting, 1 pending, 2 ready  h1,h2",
            "100    x         alloc  starting  1    -                              -",
        ]
        result = CliRunner().invoke(cli, ["ps", "9"])
        assert (result.exit_code, result.output) == (0, (
            "job 9 (job.sh): batch, pending (JobHeldUser): 3 VMs (tiny:3); its VMs start "
            "when SLURM runs the job\n"))
        result = CliRunner().invoke(cli, ["exec", "-j", "9", "vm0", "true"])
        assert result.exit_code == 1
        assert "job 9 (job.sh) is pending (JobHeldUser): its VMs are not running yet" in \
            result.output
    finally:
        QUEUE.clear()


def test_ps_of_an_unknown_job_is_bad_input(store: MemoryStore) -> None:
    result = CliRunner().invoke(cli, ["ps", "99"])
    assert result.exit_code == 2
    assert "JOB 99: you have no cluster in job 99 (expected one of: 12 (vcluster), 13 " \
           "(vcluster))" in result.output
