"""``vcluster cluster create NAME DEFINITION``: a persistent cluster defined in libvirt.

The definition is planned as alloc plans it (templates, images, FAM regions,
networks; bad input refused before anything is made).  Then, in order: the
record (``persistent.record``: every object's name, phase ``creating``), the
cluster's ssh key pair and spec in the store (and the key pair in the
cluster's directory, for ``repair``), each VM's directory with its
disk (a qcow2 overlay over the image revision, or with ``--copy`` a full
copy), its extra disks and its seed, the shared disks, the libvirt networks
(``persistent.netxml``), the domains (``persistent.domain``), and last the
phase ``defined``, written to each domain's metadata with the spec.
Nothing runs yet: ``cluster start`` boots the VMs.  A create cut short leaves the phase
``creating``: the same command again makes it all anew (no VM has run, so
nothing of value is lost), another definition under that name is refused.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vcluster import sshkeys
from vcluster.cluster import ClusterPlan, ClusterSpec, NicPlan, VmPlan, mac_address, plan_cluster
from vcluster.config.loader import Config
from vcluster.errors import InputError
from vcluster.files import write_atomically
from vcluster.hostpaths import VmFiles, shared_disk
from vcluster.identity import user_name
from vcluster.lifecycle import VmState
from vcluster.networks.nat import NatNetwork, free_port
from vcluster.persistent import netxml, virt
from vcluster.persistent.control import Cluster, vm_record
from vcluster.persistent.domain import domain_xml
from vcluster.persistent.record import (
    MODE,
    PersistentRecord,
    PersistentVm,
    Phase,
    bridge_name,
    check_name,
    domain_name,
    key_file,
    metadata_text,
    network_name,
    shm_path,
)
from vcluster.persistent.store import ClusterStore
from vcluster.qemu import LibvirtNetwork, NicBackend, SharedMemory, UserNet, VdeSwitch
from vcluster.run import run
from vcluster.seed import write_seed
from vcluster.vm import guest, machine
from vcluster.vm.disks import image_format, make_disks
from vcluster.vm.guest import NicAddress

if TYPE_CHECKING:
    import libvirt

Say = Callable[[str], None]
CLONE_ROOM = 8  # addresses a cluster's nat block keeps for VMs cloned later


def nat_block(subnet: ipaddress.IPv4Network, vms: int,
              taken: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A block of ``subnet`` with room for ``vms`` VMs that no network in ``taken`` overlaps."""
    from vcluster.networks.nat import block_prefix

    prefix = max(block_prefix(vms), subnet.prefixlen)
    for block in subnet.subnets(new_prefix=prefix):
        if not any(block.overlaps(other) for other in taken):
            return block
    raise InputError(f"network subnet {subnet}: every block of /{prefix} is in use by "
                     "another libvirt network (expected a larger subnet in networks.yaml)")


def network_ips(net: libvirt.virNetwork) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks a libvirt network is on."""
    from xml.etree import ElementTree as ET

    out = []
    for ip in ET.fromstring(net.XMLDesc()).findall("ip"):
        address, mask = ip.get("address"), ip.get("netmask") or ip.get("prefix")
        if address and mask and ":" not in address:
            out.append(ipaddress.IPv4Network(f"{address}/{mask}", strict=False))
    return out


def check_plan(config: Config, plan: ClusterPlan) -> None:
    """What a persistent cluster cannot be, refused before anything is made."""
    for vm in plan.vms:
        for nic in vm.nics:
            if nic.type not in ("nat", "private"):
                raise InputError(f"network {nic.network!r} is of type {nic.type}, which a "
                                 "persistent cluster cannot have (expected nat or private)")
        for disk in vm.disks:
            if disk.shared and disk.size is None:
                raise InputError(f"template {vm.template!r}: shared disk {disk.name!r} "
                                 "needs a size")


def session_address() -> NicAddress:
    """A session VM's nat NIC: on QEMU's user-mode NAT, each VM's its own (slirp's
    defaults, as a rootless local cluster's)."""
    net = UserNet()
    return NicAddress(f"{net.guest}/{ipaddress.IPv4Network(net.net).prefixlen}", net.gateway)


def _addresses(plan: ClusterPlan, block: ipaddress.IPv4Network | None, session: bool
               ) -> dict[int, dict[int, NicAddress]]:
    """Each VM's nat NICs' addresses in ``block`` (VM ``i`` at ``i + 2``, the gateway first),
    or in a session the user-mode NAT's."""
    from vcluster.networks.nat import gateway, vm_address

    given: dict[int, dict[int, NicAddress]] = {}
    for vm in plan.vms:
        for n, nic in enumerate(vm.nics):
            if nic.type != "nat":
                continue
            if session:
                given.setdefault(vm.index, {})[n] = session_address()
                continue
            assert block is not None
            given.setdefault(vm.index, {})[n] = NicAddress(
                f"{vm_address(block, vm.index)}/{block.prefixlen}", str(gateway(block)))
    return given


def nic_backend(record: PersistentRecord, user: str, pvm: PersistentVm,
                nic: NicPlan) -> NicBackend:
    """Where a VM's NIC is: its libvirt network, or in a session QEMU's own (user-mode NAT
    with ssh forwarded; a private network's user-space switch)."""
    if not record.session:
        return LibvirtNetwork(record.networks[nic.network])
    if nic.type == "nat":
        return UserNet(ssh_port=pvm.ssh_port)
    return VdeSwitch(record.switches[nic.network])


class Creator:
    """Makes one persistent cluster; ``create`` is the whole of it."""

    def __init__(self, config: Config, name: str, definition: str, *, copy: bool, uri: str,
                 say: Say) -> None:
        self.config = config
        self.name = check_name(name)
        self.definition = definition
        self.copy = copy
        self.uri = uri
        self.say = say
        self.user = user_name()
        self.layout = config.batch.directories.layout
        self.session = virt.is_session(uri)

    def create(self, store: ClusterStore) -> PersistentRecord:
        plan = plan_cluster(self.config, self.definition)
        check_plan(self.config, plan)
        resuming = self._refuse_existing(store, plan)
        conn = virt.connect(self.uri)
        try:
            return self._make(store, conn, plan, resuming)
        finally:
            conn.close()

    def _refuse_existing(self, store: ClusterStore, plan: ClusterPlan) -> bool:
        """Whether a create of this cluster was cut short (and is carried on)."""
        found = store.read(self.name)
        if found is None:
            return False
        spec, record = found
        if record.phase is Phase.CREATING and spec.plan.definition == plan.definition:
            self.say(f"cluster {self.name}: its creation was cut short; making it anew")
            return True
        if record.phase is Phase.CREATING:
            raise InputError(f"NAME: cluster {self.name} was cut short while being created "
                             f"from {spec.plan.definition} (expected the same definition "
                             f"to finish it, or `vcluster cluster remove {self.name}` first)")
        raise InputError(f"NAME: cluster {self.name} exists already ({len(spec.plan.vms)} "
                         f"VMs of {spec.plan.definition}; expected a new name, or `vcluster "
                         f"cluster remove {self.name}` first)")

    def _make(self, store: ClusterStore, conn: libvirt.virConnect,
              plan: ClusterPlan, resuming: bool) -> PersistentRecord:
        started = time.monotonic()
        networks = self._network_names(plan)
        self._refuse_foreign(conn, plan, networks, resuming)
        block = self._block(conn, plan, networks)
        given = _addresses(plan, block, self.session)
        pair = sshkeys.generate(f"vcluster-cluster-{self.name}")
        spec = ClusterSpec(self.name, self.name, self.user, os.getuid(), time.time(),
                           pair.public, plan, mode=MODE, local=True)
        host_keys = {vm.index: sshkeys.generate(f"vcluster-{self.name}-{vm.name}")
                     for vm in plan.vms}
        workdir = self.layout.work_dir(self.name)
        record = PersistentRecord(
            name=self.name, uri=self.uri, phase=Phase.CREATING, workdir=workdir,
            vms=tuple(self._vm(vm, given.get(vm.index, {}), host_keys[vm.index].public)
                      for vm in plan.vms),
            networks=networks,
            shm=tuple(sorted({shm_path(self.user, self.name, vm.fam.name)
                              for vm in plan.vms if vm.fam})),
            shared_disks=tuple(sorted({shared_disk(workdir, d.name)
                                       for vm in plan.vms for d in vm.disks if d.shared})),
            copy=self.copy, session=self.session, switches=self._switches(plan),
            nat_block=str(block) if block is not None else None)
        store.begin(spec, record, pair)
        self._files(plan, spec, record, given, host_keys, pair)
        self._define_networks(conn, spec, record)
        for vm, pvm in zip(plan.vms, record.vms, strict=True):
            self._define_domain(conn, spec, vm, pvm, record)
        done = replace(record, phase=Phase.DEFINED)
        share_record(conn, spec, done)
        store.finish(spec, done, [vm_record(Cluster(spec, done), pvm.index, VmState.STOPPED)
                                  for pvm in record.vms])
        count = len(plan.vms)
        self.say(f"cluster {self.name}: {count} VM{'s' if count > 1 else ''} defined in "
                 f"{time.monotonic() - started:.1f} s (start them with `vcluster cluster "
                 f"start {self.name}`)")
        return done

    # -- names and addresses ---------------------------------------------------

    def _switches(self, plan: ClusterPlan) -> dict[str, Path]:
        """A session's private networks' switch sockets, in the user's run directory."""
        if not self.session:
            return {}
        from vcluster.persistent import switch

        names = [n for n in plan.private_networks()]
        if names:
            switch.require()
        return {n: self.layout.run / f"cluster-{self.name}-{n}" for n in names}

    def _network_names(self, plan: ClusterPlan) -> dict[str, str]:
        if self.session:  # a user's libvirtd makes no networks: QEMU's own NICs
            return {}
        names = [nic.network for vm in plan.vms for nic in vm.nics]
        return {n: network_name(self.user, self.name, n) for n in dict.fromkeys(names)}

    def _refuse_foreign(self, conn: libvirt.virConnect, plan: ClusterPlan,
                        networks: dict[str, str], resuming: bool) -> None:
        """Names in libvirt already that this cluster did not make: refused, left alone
        (a create cut short made its own, which it makes anew)."""
        from vcluster.persistent.domain import metadata_of

        for vm in plan.vms:
            dom = virt.domain(conn, domain_name(self.user, self.name, vm.index))
            if dom is not None and (not resuming or metadata_of(dom.XMLDesc()) is None):
                raise InputError(f"NAME: libvirt has a domain {dom.name()} that is not of a "
                                 "cluster being made (expected another cluster name)")
        for name in networks.values():
            if not resuming and virt.network(conn, name) is not None:
                raise InputError(f"NAME: libvirt has a network {name} that is not of a "
                                 "cluster being made (expected another cluster name)")

    def _block(self, conn: libvirt.virConnect, plan: ClusterPlan,
               networks: dict[str, str]) -> ipaddress.IPv4Network | None:
        nat = [n for n in networks if self.config.networks[n].type == "nat"]
        if not nat:
            return None
        if len(nat) > 1:
            raise InputError(f"networks {', '.join(nat)}: a persistent cluster has one nat "
                             "network (expected one in the resource set)")
        settings = self.config.networks[nat[0]]
        assert isinstance(settings, NatNetwork)  # its type is nat
        subnet = settings.subnet
        taken = [ip for net in conn.listAllNetworks() if net.name() != networks[nat[0]]
                 for ip in network_ips(net)]  # a create cut short: its own does not count
        return nat_block(subnet, len(plan.vms) + CLONE_ROOM, taken)

    def _vm(self, vm: VmPlan, given: dict[int, NicAddress], host_key: str) -> PersistentVm:
        addresses = tuple(a.address.split("/")[0] for a in guest.nic_addresses(vm, given))
        nat = [given[n].address.split("/")[0] for n in sorted(given)]
        name = domain_name(self.user, self.name, vm.index)
        if self.session and nat:  # ssh through the user-mode NAT's forward
            return PersistentVm(vm.index, name, addresses, "127.0.0.1", host_key, free_port())
        return PersistentVm(vm.index, name, addresses, nat[0] if nat else None, host_key)

    # -- files ------------------------------------------------------------------

    def _files(self, plan: ClusterPlan, spec: ClusterSpec, record: PersistentRecord,
               given: dict[int, dict[int, NicAddress]],
               host_keys: dict[int, sshkeys.KeyPair], pair: sshkeys.KeyPair) -> None:
        workdir = record.workdir
        self.layout.work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)  # a create cut short: made anew
        workdir.mkdir(mode=0o700)
        write_atomically(key_file(workdir, sshkeys.PRIVATE), pair.private)
        write_atomically(key_file(workdir, sshkeys.PUBLIC), pair.public + "\n")
        for vm in plan.vms:
            self.say(f"cluster {self.name}: {vm.name}: disks and seed")
            files = VmFiles.of(workdir, vm.index)
            files.dir.mkdir(mode=0o700)
            make_disks(vm, files)  # the shared disks too, by the first VM that has them
            if self.copy and vm.boot.kind == "disk" and vm.boot.disk is not None:
                files.overlay.unlink()
                run(["qemu-img", "convert", "-q", "-f", image_format(vm.boot.disk), "-O",
                     "qcow2", str(vm.boot.disk), str(files.overlay)], timeout=3600)
            seed = guest.seed_files(spec, vm, given=given.get(vm.index),
                                    host_key=host_keys[vm.index])
            write_seed(files.seed, meta_data=seed.meta_data, user_data=seed.user_data,
                       network_config=seed.network_config, guest_files=seed.guest_files)

    # -- libvirt ----------------------------------------------------------------

    def _define_networks(self, conn: libvirt.virConnect, spec: ClusterSpec,
                         record: PersistentRecord) -> None:
        for position, libvirt_name in enumerate(record.networks.values()):
            old = virt.network(conn, libvirt_name)
            if old is not None:  # a create cut short made it: made anew
                if old.isActive():
                    virt.call(f"stop network {libvirt_name}", old.destroy)
                virt.call(f"undefine network {libvirt_name}", old.undefine)
            define_network(conn, spec, record, position)

    def _define_domain(self, conn: libvirt.virConnect, spec: ClusterSpec, vm: VmPlan,
                       pvm: PersistentVm, record: PersistentRecord) -> None:
        old = virt.domain(conn, pvm.domain)
        if old is not None:  # a create cut short defined it (and it never ran)
            if virt.is_running(old):
                virt.call(f"stop {pvm.domain}", old.destroy)
            virt.undefine(old)
        define_domain(conn, spec, vm, pvm, record,
                      accel=accel_for(self.config, spec, vm))


def define_network(conn: libvirt.virConnect, spec: ClusterSpec, record: PersistentRecord,
                   position: int) -> None:
    """Define and start the cluster's libvirt network number ``position`` as the record has
    it: on a bridge of the cluster's, a nat one with each VM's DHCP reservation."""
    network, libvirt_name = list(record.networks.items())[position]
    nics = [(vm, n, nic) for vm in spec.plan.vms for n, nic in enumerate(vm.nics)
            if nic.network == network]
    first = nics[0][2]
    bridge = bridge_name(spec.user, record.name, position)
    if first.type == "nat":
        if record.nat_block is None:
            raise InputError(f"cluster {record.name}: its record has no nat block (made by an "
                             "older vcluster: expected `vcluster cluster remove` and create)")
        block = ipaddress.IPv4Network(record.nat_block)
        leases = [netxml.Lease(mac_address(record.name, vm.index, n), vm.name,
                               ipaddress.IPv4Address(record.vms[vm.index].addresses[n]))
                  for vm, n, _nic in nics]
        xml = netxml.nat_network_xml(libvirt_name, bridge, first.mtu, block, leases)
    else:
        xml = netxml.private_network_xml(libvirt_name, bridge, first.mtu)
    net = virt.call(f"define network {libvirt_name}", conn.networkDefineXML, xml)
    virt.call(f"autostart network {libvirt_name}", net.setAutostart, 1)
    virt.call(f"start network {libvirt_name}", net.create)


def share_record(conn: libvirt.virConnect, spec: ClusterSpec,
                 record: PersistentRecord) -> None:
    """Every domain's metadata: the spec and record as they are now."""
    from xml.sax.saxutils import escape

    from vcluster.persistent.domain import METADATA_NS, METADATA_PREFIX

    element = f"<cluster>{escape(metadata_text(spec, record))}</cluster>"
    for pvm in record.vms:
        dom = virt.domain(conn, pvm.domain)
        if dom is not None:
            virt.set_metadata(dom, element, METADATA_PREFIX, METADATA_NS)


def accel_for(config: Config, spec: ClusterSpec, vm: VmPlan) -> str:
    """The accelerator VM ``vm`` runs with (a plan's ``auto`` chosen, as alloc chooses it)."""
    from vcluster.vm.accel import choose_accel

    accel = choose_accel(spec.plan.accel, binary=spec.plan.qemu_binary, kernel=vm.boot.kernel,
                         cache_dir=config.batch.directories.layout.run)
    return accel.name


def define_domain(conn: libvirt.virConnect, spec: ClusterSpec, vm: VmPlan, pvm: PersistentVm,
                  record: PersistentRecord, *, accel: str) -> None:
    """Define ``vm``'s domain: its files in the record's directory, its NICs on the
    cluster's networks, the shared disks, the spec and record in its metadata, the VM's
    ``kernel_args`` after the image's on the kernel's command line."""
    files = VmFiles.of(record.workdir, vm.index)
    fam = (SharedMemory(shm_path(spec.user, record.name, vm.fam.name), vm.fam.size)
           if vm.fam else None)
    nics = [nic_backend(record, spec.user, pvm, nic) for nic in vm.nics]
    qemu = machine.vm_spec(spec, vm, files, accel=accel, nics=nics, fam=fam,
                           binary=shutil.which(spec.plan.qemu_binary) or spec.plan.qemu_binary)
    qemu = replace(qemu, qmp_socket=None,
                   append=" ".join(a for a in (qemu.append, pvm.kernel_args) if a))
    owner = None if record.session else (spec.uid, os.getgid())
    xml = domain_xml(qemu, name=pvm.domain, owner=owner,
                     metadata=metadata_text(spec, record),
                     title=f"vcluster {record.name} {vm.name} ({vm.template})")
    virt.call(f"define domain {pvm.domain}", conn.defineXML, xml)


def create(config: Config, name: str, definition: str, *, copy: bool, uri: str,
           store: ClusterStore, say: Say) -> PersistentRecord:
    """Define cluster ``name`` of ``definition`` in libvirt (see the module docstring)."""
    return Creator(config, name, definition, copy=copy, uri=uri, say=say).create(store)
