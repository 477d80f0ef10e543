"""Release and the reconcile pass, without root: what ``vm_resources`` made is all removed.

The agent's ``Jobs`` runs here as it does in ``vcluster-agent serve``, over a
temporary layout, with fake devices (links kept in memory), a fake SLURM
and a MemoryStore (tests/helpers/agent_site.py); the job is the test's own
uid's, so FAM regions and work directories are really made and chowned.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers.agent_site import PREFIX, AgentHost, me
from vcluster.agent import netdev, undo
from vcluster.agent.peer import JobInfo
from vcluster.agent.protocol import (
    FamSpec,
    JobStatus,
    NetworkSpec,
    ReleaseAnswer,
    VmResources,
    VmResourcesAnswer,
)
from vcluster.agent.reconcile import Reconciler
from vcluster.errors import ResourceError, StoreError

MIB = 1 << 20
REGION = FamSpec("fam", MIB)
CLUSTER = NetworkSpec("cluster", "private")
DATA = NetworkSpec("data", "private", 9000)


@pytest.fixture
def host(tmp_path: Path) -> AgentHost:
    return AgentHost(tmp_path)


def make(host: AgentHost, info: JobInfo, vm: int, networks: tuple[NetworkSpec, ...],
         fam: FamSpec | None = REGION) -> VmResourcesAnswer:
    """What a VM runner of ``info`` gets (its tap fds closed, as QEMU would have them)."""
    answer, fds = host.jobs.vm_resources(VmResources(info.job, vm, networks, fam), info,
                                         os.getgid())
    assert len(fds) == len(answer.taps)
    for fd in fds:
        os.close(fd)
    return answer


def leftovers(host: AgentHost, job: str) -> list[str]:
    """Everything of ``job`` still on the host: devices, then paths."""
    devices = host.devices.links_with_prefix(*netdev.job_prefixes(job))
    return devices + [str(p) for p in host.layout.job_paths(job) if p.exists()]


def seed_store(host: AgentHost, user: str, job: str, other: str) -> None:
    """Keys of ``job`` and of another job, ``other``, as launchers and agents write them."""
    k = host.keys
    for j in (job, other):
        host.store.put(k.job_owner(j), "{}")
        host.store.put(k.cluster_spec(user, j), "{}")
        host.store.put(k.cluster_key(user, j, "id_ed25519"), "PRIVATE")
    host.store.put(k.vni(4096), job)
    host.store.put(k.vni(4097), other)
    host.store.put(f"{PREFIX}/pools/ports/1", f'{{"job": "{job}"}}')
    host.store.put(f"{PREFIX}/pools/ports/2", f'{{"job": "{other}"}}')


def keys_of(host: AgentHost, user: str, job: str) -> list[str]:
    """The job's keys: its own, its cluster's, and pool entries naming it."""
    k = host.keys
    owned = [e.key for e in host.store.get_prefix(f"{PREFIX}/pools/")
             if e.value in (job, f'{{"job": "{job}"}}')]
    return host.keys_under(k.job_prefix(job)) + host.keys_under(k.cluster_prefix(user, job)) \
        + owned


def test_release_removes_everything_vm_resources_made(host: AgentHost, tmp_path: Path) -> None:
    user = me()
    info = host.job("7", tasks=2)
    seed_store(host, user, "7", "70")
    host.devices.ensure_bridge(netdev.bridge_name("70", 0), 1450)  # another job's: kept
    vm0 = make(host, info, 0, (CLUSTER, DATA))
    vm1 = make(host, info, 1, (CLUSTER,))

    # What was made: bridges and taps with the site's MTUs, one region, one work directory.
    assert [(t.network, t.ifname) for t in vm0.taps] == [("cluster", "vct7v0n0"),
                                                         ("data", "vct7v0n1")]
    links = host.devices.links
    assert (links["vcb7n0"].kind, links["vcb7n0"].mtu) == ("bridge", 1450)
    assert (links["vcb7n1"].mtu, links["vct7v0n1"].master, links["vct7v0n1"].mtu) == \
        (9000, "vcb7n1", 9000)
    assert links["vct7v1n0"].master == "vcb7n0"
    assert vm0.fam == vm1.fam and vm0.fam is not None
    assert vm0.fam.path == host.layout.fam_region("7", "fam") and vm0.fam.size == MIB
    region = vm0.fam.path.stat()
    assert (region.st_size, region.st_uid, stat.S_IMODE(region.st_mode)) == \
        (MIB, os.getuid(), 0o600)
    assert vm0.workdir == vm1.workdir == host.layout.work_dir("7")
    assert stat.S_IMODE(vm0.workdir.stat().st_mode) == 0o700
    assert host.store.get(host.keys.job_owner("7")) is not None  # published, not "{}"
    assert host.store.get(host.keys.job_host_setup("7", "unit")) is not None
    # The runner's files, and a link it planted to something that is not the job's.
    outside = tmp_path / "outside"
    outside.write_text("precious")
    (vm0.workdir / "vm0" / "deep").mkdir(parents=True)
    (vm0.workdir / "vm0" / "deep" / "root.qcow2").write_bytes(b"overlay")
    (vm0.workdir / "vm0" / "escape").symlink_to(outside)

    released = host.jobs.release("7", user)

    assert released.job == "7"
    assert {"tap vct7v0n0", "tap vct7v0n1", "tap vct7v1n0", "bridge vcb7n0", "bridge vcb7n1",
            f"file {vm0.fam.path}", f"tree {vm0.workdir}", f"store keys (user {user})"} \
        <= set(released.removed)
    assert released.removed[-1] == f"store keys (user {user})"  # undone last, made first
    assert leftovers(host, "7") == []
    assert keys_of(host, user, "7") == []
    # Another job's device, files and keys stay.
    assert host.devices.links_with_prefix("vcb1") == [netdev.bridge_name("70", 0)]
    assert outside.read_text() == "precious"
    assert len(keys_of(host, user, "70")) == 5  # owner, spec, ssh key, two pool entries
    assert host.jobs.lock_count() == 0


def test_release_is_idempotent(host: AgentHost) -> None:
    info = host.job("7")
    make(host, info, 0, (CLUSTER,))
    first = host.jobs.release("7", me())
    assert first.removed
    assert host.jobs.release("7") == ReleaseAnswer(job="7", removed=())
    assert host.jobs.release("7", me()) == ReleaseAnswer(job="7", removed=())
    assert leftovers(host, "7") == [] and host.jobs.logged() == []


def test_release_of_a_job_without_undo_log_deletes_its_keys(host: AgentHost) -> None:
    # The agent was down at prolog time and no runner reached it; a launcher left keys,
    # and devices named for the job exist (the log was lost).
    user = me()
    seed_store(host, user, "8", "80")
    host.devices.ensure_bridge("vcb8n0", 1450)
    host.devices.ensure_tap("vct8v0n0", "vcb8n0", 1450)
    released = host.jobs.release("8", user)
    assert released.removed == ("stray device vct8v0n0", "stray device vcb8n0")
    assert keys_of(host, user, "8") == []
    assert len(keys_of(host, user, "80")) == 5
    assert leftovers(host, "8") == []  # and no undo log was left behind


def test_a_release_the_store_missed_leaves_a_keys_only_log(host: AgentHost) -> None:
    user = me()
    seed_store(host, user, "9", "90")
    host.opener.down = True
    host.restart()
    with pytest.raises(StoreError, match="cannot delete the store keys of job 9"):
        host.jobs.release("9", user)
    left = undo.load(host.layout, "9")
    assert left is not None and left.entries == [undo.UndoEntry(undo.Kind.STORE, user)]
    assert left.uid == os.getuid() and left.user == user
    assert len(keys_of(host, user, "9")) == 5
    # The store is back: a later release (the reconcile pass: no user given) finishes.
    host.opener.down = False
    assert host.jobs.release("9").removed == (f"store keys (user {user})",)
    assert keys_of(host, user, "9") == [] and leftovers(host, "9") == []
    assert len(keys_of(host, user, "90")) == 5


def test_a_partial_release_keeps_what_is_left_for_later(host: AgentHost) -> None:
    user = me()
    info = host.job("10")
    seed_store(host, user, "10", "100")
    make(host, info, 0, (CLUSTER,))
    host.opener.down = True
    host.restart()  # the agent restarted while the store is unreachable
    with pytest.raises(ResourceError, match=r"job 10: released only in part .*cannot delete "
                                            "the store keys of job 10"):
        host.jobs.release("10", user)
    # The devices and files went; the log holds just the keys now.
    assert host.devices.links_with_prefix(*netdev.job_prefixes("10")) == []
    assert not host.layout.run_job("10").exists() and not host.layout.work_dir("10").exists()
    left = undo.load(host.layout, "10")
    assert left is not None and left.entries == [undo.UndoEntry(undo.Kind.STORE, user)]
    (status,) = host.jobs.status()
    assert status.job == "10" and status.log is not None
    assert [(e.kind, e.name) for e in status.log.entries] == [("store", user)]
    host.opener.down = False
    host.jobs.release("10")
    assert leftovers(host, "10") == [] and keys_of(host, user, "10") == []


def test_a_stale_log_of_another_uid_is_released_first(host: AgentHost) -> None:
    # SLURM's job ids were reset: job 11 of another uid left a log and a bridge here.
    old_bridge = netdev.bridge_name("11", 3)
    stale = undo.create(host.layout, "11", os.getuid() + 1, "someone")
    for name in "abc":
        stale.network_index(name)
    stale.record(undo.UndoEntry(undo.Kind.BRIDGE, old_bridge, network="d"))
    host.devices.ensure_bridge(old_bridge, 1500)
    info = host.job("11")
    make(host, info, 0, (DATA,), fam=None)
    log = undo.load(host.layout, "11")
    assert log is not None and (log.uid, log.user) == (info.uid, info.user)
    assert log.networks == {"data": 0}
    assert host.devices.links_with_prefix(*netdev.job_prefixes("11")) == \
        [netdev.bridge_name("11", 0), netdev.tap_name("11", 0, 0)]


def test_reconcile_releases_only_jobs_slurm_no_longer_lists(host: AgentHost) -> None:
    running, ended = host.job("12"), host.job("13")
    for info in (running, ended):
        make(host, info, 0, (CLUSTER,))
    # A leftover of a job SLURM never heard of: an undo log and a bridge.
    ghost = undo.create(host.layout, "987654", os.getuid(), me())
    ghost.record(undo.UndoEntry(undo.Kind.BRIDGE, netdev.bridge_name("987654", 0),
                                network="cluster"))
    host.devices.ensure_bridge(netdev.bridge_name("987654", 0), 1450)
    host.slurm.end("13")
    reconciler = Reconciler(host.jobs, host.slurm)
    assert reconciler.run_once() == ["13", "987654"]
    assert leftovers(host, "13") == [] and leftovers(host, "987654") == []
    kept = leftovers(host, "12")
    assert kept == [netdev.bridge_name("12", 0), netdev.tap_name("12", 0, 0),
                    str(host.layout.run_job("12")),
                    str(host.layout.undo_dir("12")), str(host.layout.work_dir("12"))]
    assert reconciler.run_once() == []  # again: the running job keeps everything
    assert leftovers(host, "12") == kept
    assert [s.job for s in host.jobs.status()] == ["12"]


@pytest.mark.parametrize("slurm_says", ["nothing", "a failure"])
def test_reconcile_touches_nothing_when_slurm_cannot_answer(host: AgentHost,
                                                           slurm_says: str) -> None:
    reconciler = Reconciler(host.jobs, host.slurm)
    assert reconciler.run_once() == [] and host.slurm.asked == 0  # no logs: no question
    make(host, host.job("14"), 0, (CLUSTER,))
    host.slurm.end("14")
    before = leftovers(host, "14")
    if slurm_says == "nothing":
        host.slurm.holding = None  # squeue failed: SLURM did not say
    else:
        host.slurm.broken = True  # scontrol/squeue could not even run
    assert reconciler.run_once() == []
    assert host.slurm.asked == 1
    assert leftovers(host, "14") == before and len(before) == 5
    # Once SLURM answers again, the ended job goes.
    host.slurm.holding, host.slurm.broken = set(), False
    assert reconciler.run_once() == ["14"]
    assert leftovers(host, "14") == []


def test_status_reports_every_log_and_the_ones_it_cannot_read(host: AgentHost) -> None:
    make(host, host.job("15"), 0, (CLUSTER,), fam=None)
    host.layout.undo_dir("16").mkdir()
    host.layout.undo_log("16").write_text('{"format": 1}')
    ok, broken = host.jobs.status()
    assert ok.job == "15" and ok.log is not None and ok.error is None
    assert (ok.log.uid, ok.log.user, ok.log.networks) == (os.getuid(), me(), {"cluster": 0})
    assert [e.kind for e in ok.log.entries] == ["store", "bridge", "tap", "tree"]
    assert broken == JobStatus(job="16", error=broken.error)
    assert broken.error is not None and "missing field 'job'" in broken.error
    assert str(host.layout.undo_log("16")) in broken.error
