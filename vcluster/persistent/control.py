"""Starting, stopping and removing a persistent cluster's VMs (``vcluster cluster ...``).

libvirt knows whether a domain runs; the store's VM records say what the
commands last made of it (``ready`` once its console showed the ready line
after a start, ``stopped`` after a shutdown or destroy), for ``ps``, ssh and
exec.  ``start`` waits for every VM it started to print its ready line on
its console (the log grows across boots: only what follows the start
counts), printing each VM as it comes up.  ``shutdown`` asks the guest
agent to power off and presses ACPI's power button too (the agent's
silence is its answer either way), then waits at most ``--timeout``
seconds; ``destroy`` pulls the plug.
``remove`` takes apart what the record lists (phase ``removing`` first, so
a remove cut short is finished by running it again) and nothing else.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vcluster.cluster import ClusterSpec
from vcluster.errors import InputError, VclusterError
from vcluster.hostpaths import VmFiles, shared_disk
from vcluster.lifecycle import VmState
from vcluster.persistent import switch, virt
from vcluster.persistent.record import PersistentRecord, Phase
from vcluster.persistent.store import ClusterStore
from vcluster.store.records import VmRecord
from vcluster.vm import guest
from vcluster.vm.readiness import LogWatcher

if TYPE_CHECKING:
    import libvirt

Say = Callable[[str], None]
POLL = 0.05


@dataclass(frozen=True)
class Cluster:
    """One persistent cluster as the store has it."""

    spec: ClusterSpec
    record: PersistentRecord

    @property
    def name(self) -> str:
        return self.record.name

    def pick(self, vms: Sequence[int]) -> list[int]:
        """The VMs ``vms`` (indexes the CLI checked), all of them if none."""
        return list(vms) or list(range(len(self.record.vms)))


def load(store: ClusterStore, name: str) -> Cluster:
    found = store.read(name)
    if found is None:
        names = ", ".join(store.names()) or "none"
        raise InputError(f"NAME: you have no persistent cluster {name!r} (expected one of: "
                         f"{names}; `vcluster cluster list` shows them)")
    spec, record = found
    if len(spec.plan.vms) != len(record.vms):  # a clone cut short between two writes
        cloning = record.extra.get("cloning", f"vm{len(record.vms) - 1}")
        raise InputError(f"NAME: cluster {name}: the clone of {cloning} was cut short "
                         f"(expected `vcluster cluster clone {name} VM {cloning}` to finish "
                         "it)")
    return Cluster(spec, record)


def usable(cluster: Cluster) -> None:
    phase = cluster.record.phase
    if phase is not Phase.DEFINED:
        again = "create" if phase is Phase.CREATING else "remove"
        raise InputError(f"NAME: cluster {cluster.name} was cut short while {phase} "
                         f"(expected `vcluster cluster {again} {cluster.name} ...` again to "
                         "finish it)")


def start(store: ClusterStore, cluster: Cluster, vms: Sequence[int], *,
          timeout: float | None, say: Say) -> None:
    """Start the VMs not running, and wait for each to be ready."""
    usable(cluster)
    picked = cluster.pick(vms)
    conn = virt.connect(cluster.record.uri)
    try:
        for sock in cluster.record.switches.values():  # a session's private networks
            switch.ensure(sock)
        started = time.monotonic()
        waiting: dict[int, LogWatcher] = {}
        for index in picked:
            pvm = cluster.record.vms[index]
            dom = _domain(conn, pvm.domain)
            if virt.is_running(dom):
                say(f"{cluster.name}: vm{index}: running already")
                continue
            plan = cluster.spec.plan.vms[index]
            files = VmFiles.of(cluster.record.workdir, index)
            watcher = LogWatcher(files.console_log, guest.ready_marker(plan))
            watcher.skip_to_end()
            virt.call(f"start {pvm.domain}", dom.create)
            store.put_vm(cluster.name, index, vm_record(cluster, index, VmState.BOOTING))
            waiting[index] = watcher
        if waiting:
            them = "them" if len(waiting) > 1 else "it"
            say(f"{cluster.name}: started {', '.join(f'vm{i}' for i in waiting)}; waiting "
                f"for {them} to be ready")
        _wait_ready(store, conn, cluster, waiting, started, timeout, say)
    finally:
        conn.close()


def _wait_ready(store: ClusterStore, conn: libvirt.virConnect, cluster: Cluster,
                waiting: dict[int, LogWatcher], started: float, timeout: float | None,
                say: Say) -> None:
    limit = timeout or max(
        cluster.spec.plan.vms[i].boot.readiness.ready_timeout(cluster.spec.plan.accel)
        for i in waiting) if waiting else 0.0
    while waiting:
        for index, watcher in list(waiting.items()):
            if watcher.poll():
                del waiting[index]
                store.put_vm(cluster.name, index, vm_record(cluster, index, VmState.READY))
                say(f"{cluster.name}: vm{index}: ready ({time.monotonic() - started:.1f} s)")
            elif not virt.is_running(_domain(conn, cluster.record.vms[index].domain)):
                raise VclusterError(f"{cluster.name}: vm{index} stopped before it was ready "
                                    f"(its console: {watcher.path})")
        if waiting and time.monotonic() - started > limit:
            names = ", ".join(f"vm{i}" for i in waiting)
            raise VclusterError(f"{cluster.name}: {names} not ready after {limit:g} s (their "
                                "consoles: `vcluster console -C " + cluster.name + " VM`)")
        time.sleep(POLL)


def _domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    dom = virt.domain(conn, name)
    if dom is None:
        raise VclusterError(f"libvirt has no domain {name} any more (`vcluster cluster "
                            "remove` then create the cluster again)")
    return dom


def vm_record(cluster: Cluster, index: int, state: VmState) -> VmRecord:
    from vcluster.store.records import SshEndpoint

    pvm = cluster.record.vms[index]
    ssh = SshEndpoint(pvm.ssh_address, pvm.ssh_port) if pvm.ssh_address else None
    return VmRecord(state, host="localhost", addresses=pvm.addresses, since=time.time(),
                    ssh=ssh, host_key=pvm.host_key)


def shutdown(store: ClusterStore, cluster: Cluster, vms: Sequence[int], *, timeout: float,
             say: Say) -> None:
    """Power the running VMs down (guest agent, else ACPI) and wait at most ``timeout``."""
    usable(cluster)
    conn = virt.connect(cluster.record.uri)
    try:
        running = {}
        for index in cluster.pick(vms):
            dom = _domain(conn, cluster.record.vms[index].domain)
            if virt.is_running(dom):
                _power_down(cluster, index, dom)
                running[index] = dom
        deadline = time.monotonic() + timeout
        late = []
        for index, dom in running.items():
            if virt.wait_stopped(dom, max(0.0, deadline - time.monotonic())):
                store.put_vm(cluster.name, index, vm_record(cluster, index, VmState.STOPPED))
                say(f"{cluster.name}: vm{index}: shut off")
            else:
                late.append(f"vm{index}")
        if late:
            raise VclusterError(f"{cluster.name}: {', '.join(late)} still running after "
                                f"{timeout:g} s (`vcluster cluster destroy {cluster.name} "
                                f"{' '.join(late)}` stops them at once)")
        _idle_switches(conn, cluster)
    finally:
        conn.close()


def _idle_switches(conn: libvirt.virConnect, cluster: Cluster) -> None:
    """A session's switches stopped once no VM of the cluster runs."""
    if not cluster.record.switches:
        return
    doms = [virt.domain(conn, pvm.domain) for pvm in cluster.record.vms]
    if not any(dom is not None and virt.is_running(dom) for dom in doms):
        for sock in cluster.record.switches.values():
            switch.stop(sock)


def _power_down(cluster: Cluster, index: int, dom: libvirt.virDomain) -> None:
    from vcluster.vm.guestexec import GuestAgent, GuestAgentError

    files = VmFiles.of(cluster.record.workdir, index)
    # no agent, or a busy one: the button below
    with contextlib.suppress(GuestAgentError), \
            GuestAgent(files.guest_agent_socket, f"vm{index}") as agent:
        agent.shutdown()
    # The power button as well: qemu-ga answers nothing when it complies, so its silence
    # proves nothing; a guest powering off already takes no notice of it.
    if virt.is_running(dom):
        try:
            virt.power_button(dom)
        except virt.LibvirtError:
            if virt.is_running(dom):  # not the guest going meanwhile
                raise


def destroy(store: ClusterStore, cluster: Cluster, vms: Sequence[int], *, say: Say) -> None:
    """Stop the VMs at once (their disks stay)."""
    conn = virt.connect(cluster.record.uri)
    try:
        for index in cluster.pick(vms):
            dom = _domain(conn, cluster.record.vms[index].domain)
            if virt.is_running(dom):
                virt.call(f"destroy {dom.name()}", dom.destroy)
                say(f"{cluster.name}: vm{index}: destroyed")
            store.put_vm(cluster.name, index, vm_record(cluster, index, VmState.STOPPED))
        _idle_switches(conn, cluster)
    finally:
        conn.close()


def remove(store: ClusterStore, cluster: Cluster, *, force: bool, say: Say) -> list[str]:
    """Take the whole cluster apart; what was removed."""
    record = cluster.record
    conn = virt.connect(record.uri)
    removed: list[str] = []
    try:
        domains = [(pvm, virt.domain(conn, pvm.domain)) for pvm in record.vms]
        running = [f"vm{pvm.index}" for pvm, dom in domains if dom and virt.is_running(dom)]
        if running and not force:
            raise InputError(f"NAME: cluster {cluster.name} has VMs running ({', '.join(running)}"
                             f"; expected `vcluster cluster shutdown {cluster.name}` first, or "
                             "remove --force, which stops them at once)")
        store.put_record(replace(record, phase=Phase.REMOVING))
        for pvm, dom in domains:
            if dom is None:
                continue
            if virt.is_running(dom):
                virt.call(f"destroy {pvm.domain}", dom.destroy)
            virt.undefine(dom)
            removed.append(f"domain {pvm.domain}")
        for name in record.networks.values():
            net = virt.network(conn, name)
            if net is None:
                continue
            if net.isActive():
                virt.call(f"stop network {name}", net.destroy)
            virt.call(f"undefine network {name}", net.undefine)
            removed.append(f"network {name}")
    finally:
        conn.close()
    for sock in record.switches.values():
        switch.stop(sock)
        removed.append(f"switch {sock}")
    for path in record.shm:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    if record.workdir.exists():
        shutil.rmtree(record.workdir)
        removed.append(str(record.workdir))
    store.forget(cluster.name)
    removed.append("store keys")
    say(f"cluster {cluster.name} removed: {', '.join(removed)}")
    return removed


@dataclass(frozen=True)
class VmView:
    name: str
    domain: str
    state: str
    addresses: tuple[str, ...]
    disks: tuple[str, ...]
    fam: str | None


def show(cluster: Cluster) -> list[VmView]:
    """Each VM as libvirt and the record have it."""
    conn = virt.connect(cluster.record.uri)
    try:
        out = []
        for pvm, plan in zip(cluster.record.vms, cluster.spec.plan.vms, strict=True):
            dom = virt.domain(conn, pvm.domain)
            files = VmFiles.of(cluster.record.workdir, pvm.index)
            disks = [str(files.overlay)] if plan.boot.kind == "disk" else []
            disks += [str(files.disk(d.name)) if not d.shared else
                      str(shared_disk(cluster.record.workdir, d.name)) for d in plan.disks]
            fam = next((str(p) for p in cluster.record.shm
                        if plan.fam and p.name.endswith(f"-{plan.fam.name}")), None)
            out.append(VmView(plan.name, pvm.domain,
                              virt.state_name(dom) if dom else "missing in libvirt",
                              pvm.addresses, tuple(disks), fam))
        return out
    finally:
        conn.close()
