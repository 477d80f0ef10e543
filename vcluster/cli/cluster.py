"""``vcluster cluster``: persistent clusters, libvirt domains kept for days."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from vcluster.persistent.store import ClusterStore

URI_HELP = ("The libvirt connection (default: libvirt.uri in batch.yaml, else qemu:///system "
            "for root, qemu:///session for a user).")


@click.group("cluster")
def cluster() -> None:
    """Persistent clusters: VMs defined in libvirt, kept until you remove them.

    The same templates, images, FAM regions and networks as alloc clusters, but
    the VMs outlive any job: create a cluster once, start and shut it down as
    often as you like, reboot its VMs, clone one; console, ssh, scp, exec and
    save reach it with -C NAME. Each cluster has its own libvirt networks (its
    nat network with a DHCP reservation per VM, its private network) and
    directory; remove takes away all of it and nothing else. As root the
    VMs are qemu:///system's; as a normal user they are on your own
    qemu:///session, with QEMU's user-mode NAT and a user-space switch
    (vde_switch) as networks (nothing needs root).

    \b
        vcluster cluster create fs debian:3
        vcluster cluster start fs
        vcluster exec -C fs --all -- uname -r
        vcluster cluster shutdown fs
        vcluster cluster remove fs
    """


def say(text: str) -> None:
    click.echo(f"vcluster: {text}", err=True)


@contextmanager
def clusters() -> Iterator[ClusterStore]:
    """The user's persistent clusters in their store, closed at the end."""
    from vcluster.cli.common import load_config
    from vcluster.identity import user_name
    from vcluster.persistent.store import ClusterStore
    from vcluster.session import open_user_store
    from vcluster.store.keys import Keys

    batch = load_config().batch
    with open_user_store(batch) as store:
        yield ClusterStore(store, Keys(batch.store.prefix), user_name())


def indexes(text: tuple[str, ...], count: int) -> list[int]:
    """VMS (``vm0 vm2``, ``vm[0-1]``), checked against the cluster, as ``exec`` takes them."""
    from vcluster.cli.exec import parse_vms

    return parse_vms(",".join(text), count) if text else []


def uri_of(given: str | None) -> str:
    from vcluster.cli.common import load_config
    from vcluster.persistent.virt import default_uri

    return given or load_config().batch.libvirt_uri or default_uri()


@cluster.command("create")
@click.argument("name")
@click.argument("definition")
@click.option("--copy", is_flag=True,
              help="Give each VM a full copy of its image instead of an overlay over it "
                   "(the cluster then no longer needs the image revision).")
@click.option("--connect", "uri", default=None, metavar="URI", help=URI_HELP)
def create(name: str, definition: str, copy: bool, uri: str | None) -> None:
    """Define cluster NAME of DEFINITION (such as debian:3 or tiny-fam:2) in libvirt.

    Nothing starts: `vcluster cluster start NAME` boots the VMs. An existing
    NAME is refused; a create cut short is finished by running it again.
    """
    from vcluster.cli.common import load_config
    from vcluster.persistent.create import create as make

    with clusters() as store:
        make(load_config(), name, definition, copy=copy, uri=uri_of(uri), store=store,
             say=say)


@cluster.command("list")
def list_() -> None:
    """List your persistent clusters: name, VMs, definition, where they are."""
    from vcluster.persistent.control import load

    with clusters() as store:
        names = store.names()
        if not names:
            click.echo("no persistent clusters")
            return
        for name in names:
            c = load(store, name)
            click.echo(f"{name}\t{len(c.record.vms)} VMs\t{c.spec.plan.definition}\t"
                       f"{c.record.phase}\t{c.record.uri}")


@cluster.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Show cluster NAME's VMs: state, addresses, disks and FAM region."""
    from vcluster.persistent import control

    with clusters() as store:
        c = control.load(store, name)
        click.echo(f"cluster {name}: {c.spec.plan.definition}, {c.record.phase}, "
                   f"{c.record.uri}, {c.record.workdir}")
        for vm in control.show(c):
            click.echo(f"{vm.name}\t{vm.state}\t{','.join(vm.addresses) or '-'}\t"
                       f"{vm.domain}\tdisks {','.join(vm.disks) or '-'}\tfam {vm.fam or '-'}")


@cluster.command("start")
@click.argument("name")
@click.argument("vms", nargs=-1)
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="How long the VMs may take to be ready (default: as alloc's).")
def start(name: str, vms: tuple[str, ...], timeout: float | None) -> None:
    """Start cluster NAME's VMs (all, or VMS such as vm0 vm2) and wait until ready."""
    from vcluster.persistent import control

    with clusters() as store:
        c = control.load(store, name)
        control.start(store, c, indexes(vms, len(c.record.vms)), timeout=timeout, say=say)


@cluster.command("shutdown")
@click.argument("name")
@click.argument("vms", nargs=-1)
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="How long the guests may take to power off.")
def shutdown(name: str, vms: tuple[str, ...], timeout: float) -> None:
    """Power cluster NAME's VMs off (guest agent, else ACPI), waiting at most --timeout."""
    from vcluster.persistent import control

    with clusters() as store:
        c = control.load(store, name)
        control.shutdown(store, c, indexes(vms, len(c.record.vms)), timeout=timeout, say=say)


@cluster.command("destroy")
@click.argument("name")
@click.argument("vms", nargs=-1)
def destroy(name: str, vms: tuple[str, ...]) -> None:
    """Stop cluster NAME's VMs at once, as pulling the plug would (disks are kept)."""
    from vcluster.persistent import control

    with clusters() as store:
        c = control.load(store, name)
        control.destroy(store, c, indexes(vms, len(c.record.vms)), say=say)


@cluster.command("clone")
@click.argument("name")
@click.argument("vm")
@click.argument("newvm")
def clone(name: str, vm: str, newvm: str) -> None:
    """Add NEWVM to cluster NAME: a copy of VM's disk, with an identity of its own.

    NEWVM is the cluster's next VM (vm3 after vm0 to vm2). It gets its own
    hostname, MAC, addresses, machine-id and ssh host keys, new extra disks,
    the cluster's shared disks, and joins the cluster's networks. VM must be
    shut off, so that its disk holds still while copied. Start NEWVM with
    `vcluster cluster start NAME NEWVM`. A clone cut short is finished by
    running it again. The other VMs' /etc/hosts do not list NEWVM.
    """
    from vcluster.cli.common import load_config
    from vcluster.persistent import control
    from vcluster.persistent.clone import clone as make

    with clusters() as store:
        c = control.load(store, name)
        [source] = indexes((vm,), len(c.record.vms))
        make(load_config(), store, c, source, newvm, say=say)


@cluster.command("repair")
@click.argument("name")
@click.option("--connect", "uri", default=None, metavar="URI", help=URI_HELP)
def repair(name: str, uri: str | None) -> None:
    """Put back what your store or libvirt lost of cluster NAME, from the other.

    A store without NAME gets it back from its domains' libvirt metadata (and
    the key pair kept in the cluster's directory); a domain or network that
    libvirt lost (virsh undefine, a reinstalled libvirtd) is defined again
    from the store, on the same disks. --connect says where to look for a
    cluster the store lost (default: as create).
    """
    from vcluster.cli.common import load_config
    from vcluster.persistent.repair import repair as mend

    with clusters() as store:
        mend(load_config(), store, name, uri_of(uri), say=say)


@cluster.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop running VMs at once instead of refusing.")
def remove(name: str, force: bool) -> None:
    """Remove cluster NAME: its domains, networks, disks, seeds and FAM files.

    Refused while a VM runs, unless --force. Image revisions are left as they
    are. A remove cut short is finished by running it again.
    """
    from vcluster.persistent import control

    with clusters() as store:
        control.remove(store, control.load(store, name), force=force, say=say)
