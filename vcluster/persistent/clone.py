"""``vcluster cluster clone NAME VM NEWVM``: a new VM of a persistent cluster, from a copy
of one VM's disk, with an identity of its own.

The new VM is the cluster's next one (``vm3`` after vm0 to vm2): its MAC,
addresses (the private networks' ``i + 1``, the nat block's ``i + 2``, a
DHCP reservation added to the running nat network) and hostname follow from
its number as every VM's do.  Its disk is a copy of the source's, taken
while the source is shut off (a running disk is not copied: it changes under
the copy).  Its extra disks are new ones, formatted at its first boot as the
template says, and it is attached to the cluster's shared disks.  A seed of
its own gives it a new cloud-init instance id, so cloud-init runs as on a
first boot: hostname, network, the cluster's ssh key, and new ssh host keys
(the new public one recorded for ssh to check).  systemd takes the new
machine-id from the kernel's command line (``systemd.machine_id=``), where
the domain keeps it.

The record lists the VM (and ``extra["cloning"]`` says so) before anything
is made, so ``remove`` takes a clone cut short with the rest; the domain is
defined last, and the same command again finishes a clone cut short.
"""

from __future__ import annotations

import ipaddress
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vcluster import sshkeys
from vcluster.cluster import ClusterSpec, NicPlan, VmPlan, mac_address
from vcluster.config.loader import Config
from vcluster.errors import InputError
from vcluster.hostpaths import VmFiles
from vcluster.lifecycle import VmState
from vcluster.networks.nat import free_port
from vcluster.persistent import netxml, virt
from vcluster.persistent.control import Cluster, Say, usable, vm_record
from vcluster.persistent.create import (
    accel_for,
    define_domain,
    network_ips,
    session_address,
    share_record,
)
from vcluster.persistent.record import PersistentRecord, PersistentVm, domain_name
from vcluster.persistent.store import ClusterStore
from vcluster.run import run
from vcluster.seed import write_seed
from vcluster.vm import guest
from vcluster.vm.disks import make_disks
from vcluster.vm.guest import NicAddress

if TYPE_CHECKING:
    import libvirt

CLONING = "cloning"  # PersistentRecord.extra: the VM a clone is making


@dataclass(frozen=True)
class ClonePlan:
    """The new VM: its plan, its nat NICs' addresses, its record."""

    vm: VmPlan
    given: dict[int, NicAddress]
    pvm: PersistentVm


def _private_address(source: NicPlan, source_index: int, index: int) -> str | None:
    """VM ``index``'s address on the private network ``source`` (VM ``source_index``'s)
    is on: the subnet's ``index + 1``, as planning gives it."""
    if source.address is None:
        return None
    iface = ipaddress.IPv4Interface(source.address)
    address = iface.ip + (index - source_index)
    if address not in iface.network or address == iface.network.broadcast_address:
        raise InputError(f"network {source.network!r} ({iface.network}) has no room for "
                         f"vm{index} (expected a cluster made with a larger subnet)")
    return f"{address}/{iface.network.prefixlen}"


def plan_clone(spec: ClusterSpec, record: PersistentRecord, source: int, index: int,
               nat: ipaddress.IPv4Network | None, host_key: str,
               ssh_port: int | None = None) -> ClonePlan:
    """VM ``index`` of the cluster, a copy of VM ``source``'s plan with its own addresses
    (in a session: the user-mode NAT's, and ssh forwarded from ``ssh_port``)."""
    from vcluster.networks.nat import gateway, vm_address

    old = spec.plan.vms[source]
    nics = tuple(replace(nic, address=_private_address(nic, source, index)) for nic in old.nics)
    vm = replace(old, index=index, nics=nics)
    given: dict[int, NicAddress] = {}
    for n, nic in enumerate(nics):
        if nic.type != "nat":
            continue
        if record.session:
            given[n] = session_address()
            continue
        if nat is None:
            raise InputError(f"cluster {record.name}: its nat network has no address "
                             "(expected the network libvirt has for it)")
        address = vm_address(nat, index)
        if address >= nat.broadcast_address:
            raise InputError(f"NEWVM: the nat network of cluster {record.name} ({nat}) has "
                             f"no room for vm{index} (expected a new cluster for more VMs)")
        given[n] = NicAddress(f"{address}/{nat.prefixlen}", str(gateway(nat)))
    addresses = tuple(a.address.split("/")[0] for a in guest.nic_addresses(vm, given))
    ssh = [given[n].address.split("/")[0] for n in sorted(given)]
    name = domain_name(spec.user, record.name, index)
    if record.session and ssh:
        assert ssh_port is not None
        return ClonePlan(vm, given, PersistentVm(index, name, addresses, "127.0.0.1", host_key,
                                                 ssh_port))
    return ClonePlan(vm, given, PersistentVm(index, name, addresses, ssh[0] if ssh else None,
                                             host_key))


def _new_index(cluster: Cluster, new_name: str) -> tuple[int, bool]:
    """NEWVM's number, and whether a clone of it was cut short (and is carried on)."""
    record = cluster.record
    cloning = record.extra.get(CLONING)
    if cloning == new_name:
        return len(record.vms) - 1, True
    index = len(record.vms)
    if new_name != f"vm{index}":
        names = [f"vm{p.index}" for p in record.vms]
        what = "exists already" if new_name in names else "is not the cluster's next VM"
        raise InputError(f"NEWVM: {new_name} {what} (expected vm{index}: cluster "
                         f"{cluster.name} has {', '.join(names)})")
    if cloning is not None:
        raise InputError(f"NEWVM: a clone of {cloning} was cut short (expected `vcluster "
                         f"cluster clone {cluster.name} ... {cloning}` to finish it first)")
    return index, False


def _nat_block(conn: libvirt.virConnect, cluster: Cluster) -> ipaddress.IPv4Network | None:
    for vm in cluster.spec.plan.vms[:1]:
        for nic in vm.nics:
            if nic.type == "nat":
                net = virt.network(conn, cluster.record.networks[nic.network])
                found = network_ips(net) if net is not None else []
                return found[0] if found else None
    return None


def _reserve(conn: libvirt.virConnect, cluster: Cluster, plan: ClonePlan) -> None:
    """The new VM's DHCP reservations, in each nat network's live and kept definitions."""
    for n, address in plan.given.items():
        nic = plan.vm.nics[n]
        name = cluster.record.networks[nic.network]
        net = virt.network(conn, name)
        if net is None:
            raise InputError(f"cluster {cluster.name}: libvirt has no network {name} "
                             "(expected the cluster's own; `vcluster cluster remove` and "
                             "create it anew)")
        lease = netxml.Lease(mac_address(cluster.name, plan.vm.index, n), plan.vm.name,
                             ipaddress.IPv4Address(address.address.split("/")[0]))
        virt.reserve(net, netxml.lease_xml(lease),
                     f"reserve {lease.address} for {plan.vm.name} on network {name}")


def _files(cluster: Cluster, spec: ClusterSpec, source: int, plan: ClonePlan,
           host_key: sshkeys.KeyPair) -> None:
    workdir = cluster.record.workdir
    files = VmFiles.of(workdir, plan.vm.index)
    shutil.rmtree(files.dir, ignore_errors=True)  # a clone cut short: made anew
    files.dir.mkdir(mode=0o700)
    make_disks(plan.vm, files)  # the shared disks are there already: attached, not made
    if plan.vm.boot.kind == "disk":
        files.overlay.unlink()
        run(["cp", "--sparse=always", "--reflink=auto",
             str(VmFiles.of(workdir, source).overlay), str(files.overlay)], timeout=3600)
    seed = guest.seed_files(spec, plan.vm, given=plan.given, host_key=host_key)
    write_seed(files.seed, meta_data=seed.meta_data, user_data=seed.user_data,
               network_config=seed.network_config, guest_files=seed.guest_files)


def clone(config: Config, store: ClusterStore, cluster: Cluster, source: int, new_name: str,
          *, say: Say) -> PersistentVm:
    """Make ``new_name`` from VM ``source``'s disk (see the module docstring)."""
    usable(cluster)
    started = time.monotonic()
    index, resuming = _new_index(cluster, new_name)
    if resuming:
        say(f"cluster {cluster.name}: the clone of {new_name} was cut short; making it anew")
    if source >= index:
        raise InputError(f"VM: vm{source} is the clone being made (expected one of "
                         f"vm0 to vm{index - 1})")
    record, spec = cluster.record, cluster.spec
    conn = virt.connect(record.uri)
    try:
        if resuming and virt.domain(conn, record.vms[index].domain) is not None:
            raise InputError(f"NEWVM: {new_name} is made already (its domain "
                             f"{record.vms[index].domain} is defined)")
        dom = virt.domain(conn, record.vms[source].domain)
        if dom is None:
            raise InputError(f"VM: vm{source}'s domain {record.vms[source].domain} is missing "
                             "in libvirt (expected `vcluster cluster show` to list it)")
        if virt.is_running(dom):
            raise InputError(f"VM: vm{source} is running (expected it shut off, so that its "
                             f"disk holds still while copied: `vcluster cluster shutdown "
                             f"{cluster.name} vm{source}`)")
        pair = sshkeys.generate(f"vcluster-{cluster.name}-{new_name}")
        nat = None if record.session else _nat_block(conn, cluster)
        plan = plan_clone(spec, record, source, index, nat, pair.public,
                          free_port() if record.session else None)
        # systemd takes the machine-id from the kernel's command line over the copied one
        plan = replace(plan, pvm=replace(
            plan.pvm, kernel_args=f"systemd.machine_id={uuid.uuid4().hex}"))
        base = replace(record, vms=record.vms[:index]) if resuming else record
        spec = replace(spec, plan=replace(spec.plan, vms=(*spec.plan.vms[:index], plan.vm)))
        record = replace(base, vms=(*base.vms, plan.pvm),
                         extra={**record.extra, CLONING: new_name})
        store.put_record(record)  # first: a remove cut short or not takes the new VM too
        store.put_spec(spec)
        store.put_vm(cluster.name, index, vm_record(Cluster(spec, record), index,
                                                    VmState.STOPPED))
        say(f"cluster {cluster.name}: {new_name}: a copy of vm{source}'s disk, new disks "
            "and seed")
        _files(cluster, spec, source, plan, pair)
        if not record.session:  # a session's nat is QEMU's: no DHCP of libvirt's
            _reserve(conn, cluster, plan)
        define_domain(conn, spec, plan.vm, plan.pvm, record,
                      accel=accel_for(config, spec, plan.vm))
        record = replace(record, extra={k: v for k, v in record.extra.items() if k != CLONING})
        store.put_record(record)
        share_record(conn, spec, record)
    finally:
        conn.close()
    say(f"cluster {cluster.name}: {new_name} cloned from vm{source} in "
        f"{time.monotonic() - started:.1f} s (start it with `vcluster cluster start "
        f"{cluster.name} {new_name}`)")
    return plan.pvm
