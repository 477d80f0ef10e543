"""Placement: a host per VM, every FAM group on one host, refusals in one line. Pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support_vm import fake_tiny_boot, vm_plan
from vcluster.cluster import FamPlan
from vcluster.launch.placement import (
    Allocation,
    AllocationError,
    Host,
    PlacementError,
    VmNeed,
    allocation_of,
    fam_groups,
    parse_cpus_per_node,
    place,
    split_regions,
)
from vcluster.launch.steps import job_allocation, step_argv


def vms(*fams: str | None) -> list[VmNeed]:
    """One VM per argument, ``vm0`` …, naming that FAM region (or none)."""
    return [VmNeed(f"vm{i}", fam) for i, fam in enumerate(fams)]


def hosts(*cpus: int, cpus_per_task: int = 1) -> Allocation:
    return Allocation(tuple(Host(f"h{i + 1}", c) for i, c in enumerate(cpus)), cpus_per_task)


def test_a_fam_pair_that_fits_shares_a_host() -> None:
    assert place(vms("fam", "fam"), hosts(2)) == ("h1", "h1")
    assert place(vms("fam", "fam"), hosts(1, 2)) == ("h2", "h2")


def test_a_fam_pair_over_two_one_cpu_hosts_is_refused_in_one_line() -> None:
    with pytest.raises(PlacementError) as e:
        place(vms("fam", "fam"), hosts(1, 1))
    assert str(e.value) == (
        "FAM region 'fam' (vm0, vm1: 2 VMs, 2 CPUs) fits on no host of the allocation: "
        "h1 has 1 CPU, h2 has 1 CPU; ask for more CPUs per node (e.g. --ntasks-per-node=2) "
        "or make the group smaller")
    assert e.value.exit_code == 2  # what the user asked SLURM for must change


def test_tiny_fam_2_tiny_2_over_two_hosts_of_two_cpus() -> None:
    assert place(vms("fam", "fam", None, None), hosts(2, 2)) == ("h1", "h1", "h2", "h2")
    # The group goes first wherever it is in the definition; the others take what is left.
    assert place(vms(None, None, "fam", "fam"), hosts(2, 2)) == ("h2", "h2", "h1", "h1")


def test_without_fam_vms_go_as_slurms_block_distribution() -> None:
    # SLURM's own example: three hosts of two CPUs, four tasks.
    assert place(vms(None, None, None, None), hosts(2, 2, 2)) == ("h1", "h1", "h2", "h3")
    assert place(vms(None, None), hosts(1, 1)) == ("h1", "h2")  # -N2 … T:2: one each
    assert place(vms(None, None), hosts(2, 2)) == ("h1", "h2")  # --exclusive: spread too
    assert place(vms(None, None, None), hosts(4)) == ("h1", "h1", "h1")


def test_several_groups_each_on_one_host() -> None:
    got = place(vms("a", "a", "b", "b", "c", None), hosts(3, 3))
    assert len({got[0], got[1]}) == 1 and len({got[2], got[3]}) == 1
    assert {got.count("h1"), got.count("h2")} == {3}
    # Largest first, best fit: 'a' (3) fills h2 exactly, 'b' (2) takes h1, 'c' the rest.
    assert place(vms("b", "b", "a", "a", "a", "c"), hosts(4, 3)) == (
        "h1", "h1", "h2", "h2", "h2", "h1")


def test_groups_that_only_fit_one_way_are_found() -> None:
    # Best fit alone puts both triples on h1 and then has no room for a pair.
    need = vms("t1", "t1", "t1", "t2", "t2", "t2", "p1", "p1", "p2", "p2", "p3", "p3",
               "p4", "p4")
    got = place(need, hosts(7, 7))
    groups = fam_groups(need)
    for members in groups.values():
        assert len({got[i] for i in members}) == 1
    assert got.count("h1") == got.count("h2") == 7
    assert got[0] != got[3]  # the triples are apart


def test_a_group_without_room_left_says_what_took_it() -> None:
    with pytest.raises(PlacementError) as e:
        place(vms("a", "a", "b", "b"), hosts(2, 1, 1))
    assert str(e.value) == (
        "FAM region 'b' (vm2, vm3: 2 VMs, 2 CPUs) fits on no host of the allocation: "
        "h1 has 2 CPUs (2 taken by FAM region 'a'), h2 has 1 CPU, h3 has 1 CPU; ask for more "
        "CPUs per node (e.g. --ntasks-per-node=2) or make the group smaller")


def test_uneven_cpus_and_cpus_per_task() -> None:
    assert place(vms("fam", "fam", None), allocation_of(["h1", "h2"], "1,2")) == (
        "h2", "h2", "h1")
    # -c 2: h1 has room for two VMs, h2 for one.
    two = hosts(4, 3, cpus_per_task=2)
    assert place(vms("fam", "fam", None), two) == ("h1", "h1", "h2")
    with pytest.raises(PlacementError) as e:
        place(vms("fam", "fam", "fam"), two)
    assert str(e.value).startswith(
        "FAM region 'fam' (vm0, vm1, vm2: 3 VMs, 6 CPUs) fits on no host of the allocation: "
        "h1 has 4 CPUs, h2 has 3 CPUs;")


def test_never_more_vms_than_cpus() -> None:
    with pytest.raises(PlacementError) as e:
        place(vms(None, None, None), hosts(1, 1))
    assert str(e.value) == ("the allocation has room for 2 VMs of 1 CPU, not 3: h1 has 1 CPU, "
                            "h2 has 1 CPU")


def test_vm_needs_from_plans() -> None:
    boot = fake_tiny_boot()
    assert VmNeed.of(vm_plan(3, boot, fam=FamPlan("shared", 1 << 20))) == VmNeed("vm3",
                                                                                 "shared")
    assert VmNeed.of(vm_plan(0, boot)) == VmNeed("vm0", None)


@pytest.mark.parametrize(("text", "counts"), [
    ("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("1,2", [1, 2]), ("4(x2)", [4, 4]),
])
def test_slurm_cpus_per_node(text: str, counts: list[int]) -> None:
    assert parse_cpus_per_node(text) == counts


def test_slurm_words_that_do_not_add_up_are_errors() -> None:
    with pytest.raises(AllocationError, match=r"'2\(3\)' is not a CPU count"):
        parse_cpus_per_node("2(3)")
    with pytest.raises(AllocationError, match="names 3 hosts but the job has 2 "):
        allocation_of(["h1", "h2"], "1(x3)")
    with pytest.raises(AllocationError, match="SLURM_CPUS_PER_TASK='x'"):
        allocation_of(["h1"], "1", "x")
    assert allocation_of(["h1"], "4", "2") == Allocation((Host("h1", 4),), 2)


def test_the_allocation_from_slurms_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$*" = "show hostnames h[1-3]" ] && printf "h1\\nh2\\nh3\\n"'
                        '\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    env = {"SLURM_JOB_NODELIST": "h[1-3]", "SLURM_JOB_CPUS_PER_NODE": "2(x2),1"}
    assert job_allocation(env) == Allocation((Host("h1", 2), Host("h2", 2), Host("h3", 1)), 1)


def test_srun_gets_one_host_per_task_in_order() -> None:
    argv = step_argv(["h2", "h1", "h2"], stop_timeout=None)
    assert argv[:5] == ["srun", "--job-name=vcluster-vms", "--ntasks=3",
                        "--distribution=arbitrary", "--nodelist=h2,h1,h2"]
    assert argv[-3:] == ["vcluster", "internal", "vm"]
    assert step_argv(["h1"], stop_timeout=2.5)[-1] == "--stop-timeout=2.5"


def test_a_split_region_is_named_with_its_hosts() -> None:
    need = vms("fam", "fam", None, "other")
    assert split_regions(need, {0: "h1", 2: "h2", 3: "h2"}) is None
    assert split_regions(need, {0: "h1", 1: "h1", 3: "h3"}) is None
    assert split_regions(need, {0: "h1", 1: "h2"}) == (
        "FAM region 'fam' is split across hosts (vm0 on h1, vm1 on h2): a region is memory of "
        "one host, so these VMs would not share it")


def test_vms_sharing_a_disk_share_a_host_and_a_disk_joins_two_regions() -> None:
    disk = [VmNeed("vm0", shared=("d",)), VmNeed("vm1", shared=("d",)), VmNeed("vm2")]
    assert fam_groups(disk) == {"disk:d": [0, 1]}
    assert place(disk, hosts(1, 2)) == ("h2", "h2", "h1")
    joined = [VmNeed("vm0", "a"), VmNeed("vm1", "b", ("d",)), VmNeed("vm2", "a", ("d",)),
              VmNeed("vm3")]
    assert fam_groups(joined) == {"a": [0, 1, 2]}  # one group: the first region names it
    assert place(joined, hosts(1, 3)) == ("h2", "h2", "h2", "h1")


def test_a_shared_disk_that_fits_no_host_is_refused_naming_the_disk() -> None:
    with pytest.raises(PlacementError) as e:
        place([VmNeed("vm0", shared=("data",)), VmNeed("vm1", shared=("data",))], hosts(1, 1))
    assert str(e.value).startswith(
        "shared disk 'data' (vm0, vm1: 2 VMs, 2 CPUs) fits on no host of the allocation: ")
    split = split_regions([VmNeed("vm0", shared=("data",)), VmNeed("vm1", shared=("data",))],
                          {0: "h1", 1: "h2"})
    assert split == ("shared disk 'data' is split across hosts (vm0 on h1, vm1 on h2): a "
                     "shared disk is a file of one host, so these VMs would not share it")
