"""A job's resources on this host: made on request, recorded in its undo log, released.

Each operation on a job holds that job's lock, so a VM runner's request, the
epilog's release and the reconcile pass never interleave on one job.  A lock
lives only while someone holds or waits for it (the agent keeps no state per
finished job).  What a runner may have is the site's decision
(``policy.Policy``) and SLURM's (the job's task count bounds the VM index).

Release is idempotent.  Given the job's user (the epilog passes
SLURM_JOB_USER), it deletes the job's store keys and the user's cluster keys
of the job even when this host has no undo log of it (the agent was down at
prolog time and no runner reached it, and the launcher was killed); when the
store cannot be reached then, it leaves an undo log holding just those keys,
so the reconcile pass deletes them later.

A network naming a VXLAN id is joined to the job's other hosts: the id must
be the job's in the store (``vnis.check``), the plan (peers, addresses,
underlay MTU: ``tunnel.plan``) must stand before anything is made, and then,
in this order, the job's nftables filter (``firewall``), so the tunnel never
accepts strangers, and the VXLAN device with its forwarding entries, each
recorded in the undo log first.  A network this host cannot build is
published as the host's failed setup (``jobs/<job>/hosts/<host>/setup``),
for the launcher to show, and refused with the same message; it stays
failed for the job (a later request that works does not hide it).

The host's network devices come through a ``netdev.Devices`` (the real
``netdev.Netlink`` in the agent), its packet filter through a
``firewall.Firewall`` (``firewall.Nftables``), and every path through the
settings' ``HostLayout``, so all of this runs in tests without root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vcluster.agent import fam, firewall, nat, netdev, tunnel, undo, vnis, workdir
from vcluster.agent.natrules import NatRules
from vcluster.agent.peer import JobInfo
from vcluster.agent.policy import Policy
from vcluster.agent.protocol import (
    AgentError,
    FamRegion,
    JobStatus,
    LoggedEntry,
    LoggedJob,
    NatLease,
    PrologAnswer,
    ReleaseAnswer,
    TapInfo,
    VmResources,
    VmResourcesAnswer,
    denied,
    failed,
)
from vcluster.agent.registration import StoreLink
from vcluster.agent.tunnel import TunnelPlan
from vcluster.agent.undo import JobLog, Kind, UndoEntry
from vcluster.errors import ResourceError, StoreError, TunnelError
from vcluster.hostpaths import HostLayout
from vcluster.store.base import Delete, value_is
from vcluster.store.records import HostRecord, HostSetup, JobOwner, SetupState, from_json, to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Where this agent keeps things and what it is called."""

    node: str  # the SLURM node name of this host (also its name in the store)
    layout: HostLayout  # directories.state and directories.run


class Jobs:
    """The jobs on this host and their resources."""

    def __init__(self, settings: Settings, link: StoreLink, policy: Policy,
                 devices: netdev.Devices, packet_filter: firewall.Firewall,
                 resolve: tunnel.Resolver = tunnel.resolve_ipv4) -> None:
        self.settings = settings
        self.link = link
        self.policy = policy
        self.devices = devices
        self.firewall = packet_filter
        self.resolve = resolve
        self.nat = nat.Allocator(link.keys, settings.node)
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # job: (lock, users)
        self._locks_lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self, job: str) -> Iterator[None]:
        with self._locks_lock:
            lock, users = self._locks.get(job, (threading.Lock(), 0))
            self._locks[job] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_lock:
                lock, users = self._locks[job]
                if users == 1:
                    del self._locks[job]
                else:
                    self._locks[job] = (lock, users - 1)

    def lock_count(self) -> int:
        """How many job locks exist now (held or waited for)."""
        with self._locks_lock:
            return len(self._locks)

    def lock_users(self, job: str) -> int:
        """How many hold or wait for the lock of ``job`` now."""
        with self._locks_lock:
            return self._locks.get(job, (None, 0))[1]

    # -------------------------------------------------------------- making

    def _open_log(self, info: JobInfo) -> JobLog:
        existing = undo.load(self.settings.layout, info.job)
        if existing is not None and existing.uid != info.uid:
            # A log of an earlier job with the same id (SLURM's ids were reset): its
            # resources are not this job's; release them first.
            log.warning("job %s: stale undo log of uid %d (now uid %d); releasing it",
                        info.job, existing.uid, info.uid)
            self._release_log(existing)
            existing = None
        if existing is None:
            existing = undo.create(self.settings.layout, info.job, info.uid, info.user)
        return existing

    def _publish(self, job_log: JobLog) -> None:
        """The job's owner and this host's setup state, in the store (best effort)."""
        if job_log.published:
            return
        keys = self.link.keys
        try:
            store = self.link.get()
            store.put(keys.job_owner(job_log.job),
                      to_json(JobOwner(uid=job_log.uid, user=job_log.user)))
            store.put(keys.job_host_setup(job_log.job, self.settings.node),
                      to_json(HostSetup(SetupState.READY)))
        except StoreError as e:
            log.warning("job %s: cannot record it in the store (retried later): %s",
                        job_log.job, e)
            return
        job_log.published = True
        job_log.save()

    def _publish_failure(self, job: str, message: str) -> None:
        """This host cannot set the job up: say why where the launcher looks (best effort)."""
        keys = self.link.keys
        try:
            self.link.get().put(keys.job_host_setup(job, self.settings.node),
                                to_json(HostSetup(SetupState.FAILED, error=message)))
        except StoreError as e:
            log.warning("job %s: cannot record its failed setup in the store: %s", job, e)

    def prolog(self, info: JobInfo) -> PrologAnswer:
        with self.locked(info.job):
            job_log = self._open_log(info)
            self._publish(job_log)
            return PrologAnswer(job=info.job, published=job_log.published)

    def check(self, request: VmResources, info: JobInfo) -> dict[str, int]:
        """Refuse what the site or SLURM does not allow; the MTU of each network."""
        if info.tasks is None:
            raise failed(f"SLURM did not say how many tasks job {info.job} has (NumTasks), "
                         "so the VM index cannot be checked")
        if request.vm >= info.tasks:
            raise denied(f"vm: {request.vm} is not below the task count of job {info.job} "
                         f"({info.tasks}; one SLURM task per VM, the VM index is "
                         "SLURM_PROCID)")
        mtus: dict[str, int] = {}
        for i, net in enumerate(request.networks):
            mtus[net.name] = self.policy.network_mtu(net, f"networks[{i}].")
        if request.fam is not None:
            self.policy.check_fam_size(request.fam.name, request.fam.size)
        return mtus

    def plan_tunnels(self, request: VmResources, hosts: Sequence[str]) -> dict[str, TunnelPlan]:
        """The tunnels of the request's networks that name a VXLAN id, planned, nothing made.

        ``hosts``: the job's hosts, from SLURM.  Denied unless each id is the
        job's in the store; a TunnelError (published as this host's failed
        setup) if this host cannot build one.
        """
        wanted = [(i, n) for i, n in enumerate(request.networks) if n.vni is not None]
        if not wanted:
            return {}
        keys = self.link.keys
        try:
            store = self.link.get()
        except StoreError as e:
            raise StoreError(f"cannot check the VXLAN ids of job {request.job}: the store "
                             f"cannot be reached ({e})") from e
        plans: dict[str, TunnelPlan] = {}
        records = None
        for i, net in wanted:
            assert net.vni is not None
            site = self.policy.tunnel(net.name, f"networks[{i}].name: ")
            vnis.check(store, keys, request.job, net.name, net.vni)
            try:
                if records is None:
                    records = tunnel.read_hosts(store, keys, hosts)
                plans[net.name] = tunnel.plan(site, net.vni, request.job, self.settings.node,
                                              hosts, records, self.devices, self.resolve)
            except (StoreError, ResourceError) as e:  # TunnelError too
                raise self._cannot_build(request.job, e) from e
        return plans

    def _cannot_build(self, job: str, error: Exception) -> TunnelError:
        """``error`` as this host's failed setup of ``job``: published, and to be raised."""
        message = str(error)
        node = self.settings.node
        if not message.startswith(f"{node}: "):
            message = f"{node}: {message}"
        self._publish_failure(job, message)
        return TunnelError(message)

    def _join(self, job_log: JobLog, index: int, bridge: str, plan: TunnelPlan) -> None:
        """Join ``bridge`` to the job's other hosts: the source filter, then the VXLAN device."""
        job = job_log.job
        try:
            job_log.record(UndoEntry(Kind.NFT, firewall.table_name(job)))
            self.firewall.ensure_filter(job, firewall.SourceFilter(
                network=plan.network, index=index, vni=plan.vni, port=plan.port,
                sources=plan.sources))
            name = netdev.vxlan_name(job, index)
            job_log.record(UndoEntry(Kind.VXLAN, name, network=plan.network, vni=plan.vni))
            self.devices.ensure_vxlan(name, netdev.Vxlan(vni=plan.vni, local=plan.local,
                                                         port=plan.port, mtu=plan.mtu,
                                                         peers=plan.peers), bridge)
        except ResourceError as e:
            raise self._cannot_build(job, e) from e

    def _nat(self, job_log: JobLog, index: int, bridge: str, vm: int, tasks: int,
             site: nat.NatSite) -> NatLease:
        """Give VM ``vm`` its share of nat network ``site`` here: block, address, ssh port,
        the bridge's gateway address and the job's NAT rules."""
        job = job_log.job
        if not self.devices.ipv4_forwarding():
            raise self._cannot_build(job, ResourceError(
                f"nat network {site.name!r} needs IPv4 forwarding, which is off here "
                "(net.ipv4.ip_forward = 0); the site must turn it on (sysctl -w "
                "net.ipv4.ip_forward=1, and in /etc/sysctl.d/)"))
        try:
            store = self.link.get()
            share = self.nat.share(store, site, job, job_log.user, vm, tasks)
            entry = store.get(self.link.keys.host(self.settings.node))
            host = from_json(HostRecord, entry.value).address if entry is not None else None
        except (StoreError, AgentError) as e:
            raise self._cannot_build(job, e) from e
        try:
            job_log.record(UndoEntry(Kind.NFT, firewall.table_name(job)))
            self.devices.ensure_gateway(bridge, f"{share.gateway}/{share.block.prefixlen}")
            self.firewall.ensure_nat(job, NatRules(
                network=site.name, index=index, bridge=bridge, block=str(share.block),
                gateway=str(share.gateway), subnet=str(site.subnet), forwards=share.forwards))
        except ResourceError as e:
            raise self._cannot_build(job, e) from e
        reachable = share.port is not None and host is not None
        return NatLease(address=f"{share.address}/{share.block.prefixlen}",
                        gateway=str(share.gateway),
                        ssh_address=host if reachable else None,
                        ssh_port=share.port if reachable else None)

    def vm_resources(self, request: VmResources, info: JobInfo, gid: int,
                     hosts: Sequence[str] = ()) -> tuple[VmResourcesAnswer, list[int]]:
        """The VM's taps (their open fds beside the answer), FAM region and work directory.

        ``hosts`` (the job's, from SLURM) matter for networks naming a VXLAN id.
        """
        mtus = self.check(request, info)
        plans = self.plan_tunnels(request, hosts)
        layout = self.settings.layout
        fds: list[int] = []
        try:
            with self.locked(request.job):
                job_log = self._open_log(info)
                self._publish(job_log)
                if request.fam is not None:
                    self.policy.check_region_count(request.fam.name, _regions(job_log))
                taps: list[TapInfo] = []
                for net in request.networks:
                    mtu = mtus[net.name]
                    index = job_log.network_index(net.name)
                    bridge = netdev.bridge_name(request.job, index)
                    job_log.record(UndoEntry(Kind.BRIDGE, bridge, network=net.name))
                    self.devices.ensure_bridge(bridge, mtu)
                    if net.name in plans:
                        self._join(job_log, index, bridge, plans[net.name])
                    lease = None
                    site = self.policy.nat(net.name)
                    if site is not None:
                        lease = self._nat(job_log, index, bridge, request.vm, info.tasks or 1,
                                          site)
                    tap = netdev.tap_name(request.job, request.vm, index)
                    job_log.record(UndoEntry(Kind.TAP, tap, vm=request.vm, network=net.name))
                    self.devices.ensure_tap(tap, bridge, mtu)
                    fds.append(self.devices.open_tap(tap))
                    taps.append(TapInfo(network=net.name, ifname=tap, nat=lease))
                work = workdir.ensure_workdir(layout, job_log, info.uid, gid)
                region: FamRegion | None = None
                if request.fam is not None:
                    path = fam.ensure_region(layout, job_log, request.fam.name,
                                             request.fam.size, info.uid, gid)
                    region = FamRegion(path=path, size=request.fam.size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return VmResourcesAnswer(taps=tuple(taps), fam=region, workdir=work), fds

    # -------------------------------------------------------------- releasing

    def _undo(self, job_log: JobLog, entry: UndoEntry) -> None:
        if entry.kind in (Kind.TAP, Kind.BRIDGE, Kind.VXLAN):
            self.devices.remove_link(entry.name)  # a VXLAN's forwarding entries go with it
        elif entry.kind is Kind.NFT:
            self.firewall.remove_table(entry.name)
        elif entry.kind in (Kind.FILE, Kind.DIR):
            fam.remove_path(entry.kind, Path(entry.name))
        elif entry.kind is Kind.TREE:
            workdir.remove_tree(Path(entry.name))
        elif entry.kind is Kind.STORE:
            self._delete_keys(job_log.job, entry.name)

    def _delete_keys(self, job: str, user: str) -> None:
        """The job's keys: ``jobs/<job>/``, the cluster's, and pool entries it holds.

        Every agent of the job deletes them when it releases (deleting is
        idempotent), so the keys are gone once the last epilog of the job ran.
        """
        keys = self.link.keys
        try:
            store = self.link.get()
            store.delete_prefix(keys.job_prefix(job))
            store.delete_prefix(keys.cluster_prefix(user, job))
            for entry in store.get_prefix(f"{keys.prefix}/pools/"):
                if vnis.owned_by(entry.value, job):
                    store.txn([value_is(entry.key, entry.value)], [Delete(entry.key)])
        except StoreError as e:
            raise StoreError(f"cannot delete the store keys of job {job}: {e}") from e

    def _release_log(self, job_log: JobLog) -> list[str]:
        """Undo everything in the log (backwards); what was removed. ResourceError if not all."""
        removed: list[str] = []
        problems: list[str] = []
        for entry in reversed(list(job_log.entries)):
            try:
                self._undo(job_log, entry)
            except (ResourceError, StoreError) as e:
                problems.append(str(e))
                continue
            job_log.forget(entry)
            removed.append(entry.describe())
        # Devices and a table named for the job that the log does not know (edited or lost).
        for name in self._stray_devices(job_log.job):
            try:
                if self.devices.remove_link(name):
                    removed.append(f"stray device {name}")
            except ResourceError as e:
                problems.append(str(e))
        try:
            removed.extend(self._remove_stray_table(job_log.job))
        except ResourceError as e:
            problems.append(str(e))
        if problems:
            raise ResourceError(f"job {job_log.job}: released only in part "
                                f"({'; '.join(problems)}); the agent's reconcile pass tries "
                                "again")
        undo.remove(job_log)
        return removed

    def _release_unlogged(self, job: str, user: str | None) -> list[str]:
        """Release a job this host has no undo log of: stray devices, and its keys."""
        stray = self._stray_devices(job)
        for name in stray:
            self.devices.remove_link(name)
        removed = [f"stray device {n}" for n in stray] + self._remove_stray_table(job)
        if user is None:
            return removed
        try:
            self._delete_keys(job, user)
        except StoreError:
            # Leave a log of just the keys, so the reconcile pass deletes them later.
            try:
                uid = pwd.getpwnam(user).pw_uid
            except KeyError:
                uid = -1
            undo.create(self.settings.layout, job, uid, user)
            raise
        return removed  # deleting keys that may not exist is not worth reporting

    def _stray_devices(self, job: str) -> list[str]:
        """The job's devices here, ports first (a bridge goes once its ports are gone)."""
        prefixes = netdev.job_prefixes(job)
        return (self.devices.links_with_prefix(prefixes.taps)
                + self.devices.links_with_prefix(prefixes.vxlans)
                + self.devices.links_with_prefix(prefixes.bridges))

    def _remove_stray_table(self, job: str) -> list[str]:
        """The job's nftables table, if one is here that its log did not name."""
        table = firewall.table_name(job)
        if table in self.firewall.tables() and self.firewall.remove_table(table):
            return [f"stray nft table inet {table}"]
        return []

    def release(self, job: str, user: str | None = None) -> ReleaseAnswer:
        """Remove everything of ``job`` here (``user``: the job's, said by root)."""
        with self.locked(job):
            job_log = undo.load(self.settings.layout, job)
            if job_log is None:
                removed = self._release_unlogged(job, user)
            else:
                removed = self._release_log(job_log)
                if user is not None and user != job_log.user:
                    self._delete_keys(job, user)
        log.info("job %s released: %s", job, ", ".join(removed) or "nothing to remove")
        return ReleaseAnswer(job=job, removed=tuple(removed))

    # -------------------------------------------------------------- looking

    def logged(self) -> list[str]:
        return undo.logged_jobs(self.settings.layout)

    def status(self) -> tuple[JobStatus, ...]:
        out: list[JobStatus] = []
        for job in self.logged():
            try:
                job_log = undo.load(self.settings.layout, job)
            except ResourceError as e:
                out.append(JobStatus(job=job, error=str(e)))
                continue
            if job_log is not None:
                out.append(JobStatus(job=job, log=_logged(job_log)))
        return tuple(out)


def _logged(job_log: JobLog) -> LoggedJob:
    """An undo log as ``status`` reports it."""
    entries = tuple(LoggedEntry(kind=str(e.kind), name=e.name, vm=e.vm, network=e.network,
                                vni=e.vni)
                    for e in job_log.entries)
    return LoggedJob(uid=job_log.uid, user=job_log.user, created=job_log.created,
                     published=job_log.published, networks=dict(job_log.networks),
                     entries=entries)


def _regions(job_log: JobLog) -> set[str]:
    """The names of the job's FAM regions on this host (from its undo log)."""
    return {Path(e.name).name for e in job_log.entries
            if e.kind is Kind.FILE and Path(e.name).parent.name == "fam"}

