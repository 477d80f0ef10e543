"""``vcluster cluster repair NAME``: put back what one side lost, from the other.

A persistent cluster lives in two places: the user's store (spec, record,
key pair, VM records) and libvirt (domains, networks; each domain's metadata
holds the spec and record, ``record.DomainMetadata``).  Either can rebuild
the other:

- a store that lost the cluster (a new machine's store, a deleted file) gets
  it back from the domain whose metadata lists the most VMs (a clone updates
  them all, a clone cut short only some), the key pair from the copy in the
  cluster's directory, and each VM's state from libvirt;
- libvirt that lost a domain or a network (``virsh undefine``, a libvirtd
  reinstalled) gets it defined again from the store, on the same files.

What neither side has (the cluster's directory, a VM's disk) cannot be made
up: that is one line saying what is missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from vcluster import sshkeys
from vcluster.config.loader import Config
from vcluster.errors import InputError
from vcluster.hostpaths import VmFiles
from vcluster.lifecycle import VmState
from vcluster.persistent import virt
from vcluster.persistent.control import Cluster, vm_record
from vcluster.persistent.create import accel_for, define_domain, define_network, share_record
from vcluster.persistent.domain import metadata_of
from vcluster.persistent.record import (
    DomainMetadata,
    Phase,
    domain_name,
    key_file,
    read_metadata,
)
from vcluster.persistent.store import ClusterStore

Say = Callable[[str], None]
MAX_VMS = 1000  # how far a lost store's cluster is looked for in libvirt: vm0 to vm999


def _from_libvirt(uri: str, user: str, name: str) -> DomainMetadata | None:
    """The fullest metadata of the domains ``vc-USER-NAME-vm*`` in libvirt (ours only)."""
    conn = virt.connect(uri)
    try:
        prefix = domain_name(user, name, 0).removesuffix("0")
        best: DomainMetadata | None = None
        for dom in virt.call("list domains", conn.listAllDomains, 0):
            if not dom.name().startswith(prefix):
                continue
            text = metadata_of(dom.XMLDesc())
            found = read_metadata(text) if text else None
            if found is None or found.record.name != name or found.spec.user != user:
                continue
            if best is None or len(found.record.vms) > len(best.record.vms):
                best = found
        return best
    finally:
        conn.close()


def _adopt(store: ClusterStore, found: DomainMetadata, say: Say) -> Cluster:
    """The cluster of ``found`` written back into the store (each VM as libvirt has it:
    ready if it runs, else stopped)."""
    spec, record = found.spec, found.record
    if spec.uid != os.getuid():
        raise InputError(f"NAME: cluster {record.name} in libvirt is uid {spec.uid}'s, not "
                         "yours (expected one of your own clusters)")
    keys = [key_file(record.workdir, n) for n in (sshkeys.PRIVATE, sshkeys.PUBLIC)]
    missing = [str(k) for k in keys if not k.is_file()]
    if missing:
        raise InputError(f"NAME: cluster {record.name}'s key pair is not in its directory "
                         f"({', '.join(missing)} missing): it cannot be put back")
    pair = sshkeys.KeyPair(private=keys[0].read_text(), public=keys[1].read_text().strip())
    cluster = Cluster(spec, record)
    conn = virt.connect(record.uri)
    try:
        doms = [virt.domain(conn, pvm.domain) for pvm in record.vms]
        states = [VmState.READY if dom is not None and virt.is_running(dom)
                  else VmState.STOPPED for dom in doms]
    finally:
        conn.close()
    store.begin(spec, record, pair)
    store.finish(spec, record, [vm_record(cluster, pvm.index, state)
                                for pvm, state in zip(record.vms, states, strict=True)])
    say(f"cluster {record.name}: back in your store from libvirt ({len(record.vms)} VMs of "
        f"{spec.plan.definition})")
    return cluster


def repair(config: Config, store: ClusterStore, name: str, uri: str, *, say: Say) -> list[str]:
    """Put back what the store or libvirt lost of cluster ``name``; what was put back."""
    started = time.monotonic()
    done: list[str] = []
    found = store.read(name)
    if found is None:
        meta = _from_libvirt(uri, store.user, name)
        if meta is None:
            raise InputError(f"NAME: no persistent cluster {name!r} in your store, nor a "
                             f"domain of it in libvirt at {uri} (expected a cluster of yours; "
                             "`vcluster cluster list` shows those in the store)")
        cluster = _adopt(store, meta, say)
        done.append("store")
    else:
        cluster = Cluster(*found)
    spec, record = cluster.spec, cluster.record
    if record.phase is not Phase.DEFINED:
        again = "create" if record.phase is Phase.CREATING else "remove"
        raise InputError(f"NAME: cluster {name} is {record.phase} (expected `vcluster cluster "
                         f"{again} {name}` to finish it; repair mends defined clusters)")
    if not record.workdir.is_dir():
        raise InputError(f"NAME: cluster {name}'s directory {record.workdir} is gone: its "
                         "disks with it (expected `vcluster cluster remove --force "
                         f"{name}`, then create)")
    conn = virt.connect(record.uri)
    try:
        for position, libvirt_name in enumerate(record.networks.values()):
            net = virt.network(conn, libvirt_name)
            if net is None:
                define_network(conn, spec, record, position)
                done.append(f"network {libvirt_name}")
            elif not net.isActive():
                virt.call(f"start network {libvirt_name}", net.create)
                done.append(f"network {libvirt_name} started")
        for vm, pvm in zip(spec.plan.vms, record.vms, strict=True):
            if virt.domain(conn, pvm.domain) is not None:
                continue
            files = VmFiles.of(record.workdir, vm.index)
            needed = [files.seed] + ([files.overlay] if vm.boot.kind == "disk" else [])
            gone = [str(p) for p in needed if not p.exists()]
            if gone:
                raise InputError(f"NAME: {vm.name}'s files are gone ({', '.join(gone)}): "
                                 f"it cannot be defined again (expected `vcluster cluster "
                                 f"remove --force {name}`, then create)")
            define_domain(conn, spec, vm, pvm, record, accel=accel_for(config, spec, vm))
            store.put_vm(name, vm.index, vm_record(cluster, vm.index, VmState.STOPPED))
            done.append(f"domain {pvm.domain}")
        share_record(conn, spec, record)
    finally:
        conn.close()
    if done:
        say(f"cluster {name}: put back {', '.join(done)} in "
            f"{time.monotonic() - started:.1f} s")
    else:
        say(f"cluster {name}: nothing to put back (the store and libvirt agree)")
    return done
