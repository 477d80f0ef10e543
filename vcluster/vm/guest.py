"""What a VM's seed tells its guest: the cloud-init NoCloud files of one VM of a cluster.

Every guest gets hostname ``vm<i>``, an instance id unique to the job and the
VM, /etc/hosts listing the whole cluster, the cluster's ssh key authorized
for the default user, a network-config matching each NIC by its MAC, and a
``final_message`` that the runner waits for on the serial console.

A nat network's address and gateway come from the VM's host agent (``NicAddress``);
the guest's ssh host key is made by its runner and given in the seed, so the
cluster's known_hosts holds it before the guest boots (cloud-init's
``ssh_keys``; for images without cloud-init, the seed's ``vcluster/`` files).

The tiny image is not cloud-init: its /init sets the hostname and addresses
from meta-data and network-config, starts its ssh server with the seed's
host key and authorized keys, and runs a ``#!`` user-data script.  For it
the user-data is a script that writes /etc/hosts, then runs the template's
own script unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vcluster.cluster import ClusterSpec, Readiness, VmPlan, mac_address
from vcluster.seed import (
    GuestSettings,
    HostEntry,
    Interface,
    merge_user_data,
    meta_data,
    network_config,
    required_config,
)
from vcluster.sshkeys import KeyPair

TINY_READY = "vcluster-tiny: ready hostname="


def ready_message(vm: VmPlan) -> str:
    """The line the guest prints once it is up (cloud-init expands $UPTIME)."""
    return f"vcluster: {vm.name} ready after $UPTIME s"


def ready_marker(vm: VmPlan) -> str:
    """What the runner looks for on the serial console: the start of the ready line."""
    if vm.boot.readiness is Readiness.TINY_INIT:
        return f"{TINY_READY}{vm.name}"
    return f"vcluster: {vm.name} ready after"


def instance_id(job: str, vm: VmPlan) -> str:
    return f"vcluster-{job}-{vm.name}"


@dataclass(frozen=True)
class NicAddress:
    """A NIC's address (CIDR) and gateway, where its host's agent gave them (nat)."""

    address: str
    gateway: str | None = None


def nic_addresses(vm: VmPlan, given: dict[int, NicAddress] | None = None) -> list[NicAddress]:
    """Each NIC's address, in order: the plan's, or the one ``given`` by NIC number."""
    given = given or {}
    out = []
    for n, nic in enumerate(vm.nics):
        if n in given:
            out.append(given[n])
        elif nic.address is not None:
            out.append(NicAddress(nic.address))
        else:
            raise ValueError(f"{vm.name}: NIC {n} on network {nic.network} has no address")
    return out


def interfaces(job: str, vm: VmPlan, given: dict[int, NicAddress] | None = None
               ) -> list[Interface]:
    return [Interface(mac=mac_address(job, vm.index, n), name=f"eth{n}",
                      addresses=(a.address,), gateway=a.gateway, mtu=nic.mtu)
            for n, (nic, a) in enumerate(zip(vm.nics, nic_addresses(vm, given), strict=True))]


def guest_settings(spec: ClusterSpec, vm: VmPlan) -> GuestSettings:
    return GuestSettings(
        hostname=vm.name,
        hosts=tuple(HostEntry(address, (name,)) for address, name in spec.plan.hosts()),
        ssh_authorized_keys=(spec.ssh_public_key,) if spec.ssh_public_key else (),
        final_message=ready_message(vm),
    )


def host_key_config(key: KeyPair) -> dict[str, Any]:
    """cloud-init's ssh settings for a host key of ours: it, and no other (none generated)."""
    return {"ssh_keys": {"ed25519_private": key.private, "ed25519_public": key.public},
            "ssh_deletekeys": True, "ssh_genkeytypes": []}


def disk_device(name: str) -> str:
    """Where the guest finds extra disk ``name``: udev's link for its virtio serial number
    (which virtio-blk cuts at 20 characters)."""
    return f"/dev/disk/by-id/virtio-{name[:20]}"


# A disk's udev link can take minutes to appear on a loaded TCG host, past systemd's 90 s
# device timeout: with plain ``nofail`` the boot goes on without the mount and writes to
# /data land on the root file system, lost at the next boot that mounts the disk.  So
# no device timeout, and the mount ordered before cloud-final (whose message is the VM's
# ready line) and wanted by it: ready means the mount was done.  Wanted, not required: a
# clone's first boot finds its source's fstab line over a disk not yet formatted (the
# mount fails, cloud-init formats and mounts it before cloud-final), and a disk that
# never appears is a VM never ready, not a boot into emergency mode.
MOUNT_OPTIONS = ("defaults,nofail,x-systemd.device-timeout=0,"
                 "x-systemd.before=cloud-final.service,x-systemd.wanted-by=cloud-final.service")


def disk_config(vm: VmPlan) -> dict[str, Any]:
    """cloud-init's settings for the VM's formatted and mounted disks: a file system made
    at first boot (never over one that is there: a restart keeps the data), an fstab line."""
    config: dict[str, Any] = {}
    made = [{"device": disk_device(d.name), "filesystem": d.format, "label": d.name[:12],
             "partition": "none", "overwrite": False} for d in vm.disks if d.format]
    if made:
        config["fs_setup"] = made
    mounts = [[disk_device(d.name), d.mount, d.format or "auto", MOUNT_OPTIONS, "0", "2"]
              for d in vm.disks if d.mount]
    if mounts:
        config["mounts"] = mounts
    return config


def _heredoc(path: str, text: str, tag: str) -> list[str]:
    """Shell lines writing ``text`` to ``path`` verbatim (quoted here-document)."""
    while any(line == tag for line in text.splitlines()):
        tag += "_"
    body = text if text.endswith("\n") else text + "\n"
    return [f"cat > {path} <<'{tag}'", body.rstrip("\n"), tag]


def tiny_user_data(settings: GuestSettings, template: str | None) -> str:
    """A ``#!`` script for the tiny image: /etc/hosts, then the template's script."""
    hosts = ["127.0.0.1 localhost", *(f"{h.address} {' '.join(h.names)}" for h in settings.hosts)]
    lines = ["#!/bin/sh", "# written by vcluster: the cluster's /etc/hosts, then the "
             "template's user-data", *_heredoc("/etc/hosts", "\n".join(hosts), "VCLUSTER_HOSTS")]
    if template is not None and template.lstrip("\ufeff").startswith("#!"):
        lines += _heredoc("/run/vcluster-template-user-data", template, "VCLUSTER_TEMPLATE")
        lines += ["chmod 755 /run/vcluster-template-user-data",
                  "exec /run/vcluster-template-user-data"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SeedFiles:
    """The NoCloud files of one VM, and the files for images without cloud-init."""

    meta_data: dict[str, str]
    user_data: str
    network_config: dict[str, Any] | None
    guest_files: dict[str, str]  # the seed's vcluster/ directory


def seed_files(spec: ClusterSpec, vm: VmPlan, *, given: dict[int, NicAddress] | None = None,
               host_key: KeyPair | None = None) -> SeedFiles:
    settings = guest_settings(spec, vm)
    guest_files: dict[str, str] = {}
    if vm.boot.readiness is Readiness.TINY_INIT:
        user_data = tiny_user_data(settings, vm.user_data)
        if settings.ssh_authorized_keys:
            guest_files["authorized_keys"] = "".join(
                f"{k}\n" for k in settings.ssh_authorized_keys)
        if host_key is not None:
            guest_files["ssh_host_ed25519_key"] = host_key.private
    else:
        required = required_config(settings)
        if host_key is not None:
            required.update(host_key_config(host_key))
        required.update(disk_config(vm))
        user_data = merge_user_data(vm.user_data, required)
    nics = interfaces(spec.job, vm, given)
    return SeedFiles(meta_data=meta_data(instance_id(spec.job, vm), vm.name),
                     user_data=user_data,
                     network_config=network_config(nics) if nics else None,
                     guest_files=guest_files)


def tiny_ignores_user_data(vm: VmPlan) -> bool:
    """The template's user-data is cloud-config, which the tiny image cannot apply."""
    return (vm.boot.readiness is Readiness.TINY_INIT and vm.user_data is not None
            and not vm.user_data.lstrip("\ufeff").startswith("#!"))
