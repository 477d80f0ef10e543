"""What a VM's seed tells its guest: the cloud-init NoCloud files of one VM of a cluster.

Every guest gets hostname ``vm<i>``, an instance id unique to the job and the
VM, /etc/hosts listing the whole cluster, the cluster's ssh key authorized
for the default user, a network-config matching each NIC by its MAC, and a
``final_message`` that the runner waits for on the serial console.

The tiny image is not cloud-init: its /init sets the hostname and addresses
from meta-data and network-config and runs a ``#!`` user-data script.  For it
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


def interfaces(job: str, vm: VmPlan) -> list[Interface]:
    return [Interface(mac=mac_address(job, vm.index, n), name=f"eth{n}",
                      addresses=(nic.address,), mtu=nic.mtu)
            for n, nic in enumerate(vm.nics)]


def guest_settings(spec: ClusterSpec, vm: VmPlan) -> GuestSettings:
    return GuestSettings(
        hostname=vm.name,
        hosts=tuple(HostEntry(address, (name,)) for address, name in spec.plan.hosts()),
        ssh_authorized_keys=(spec.ssh_public_key,) if spec.ssh_public_key else (),
        final_message=ready_message(vm),
    )


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
    """The three NoCloud files of one VM."""

    meta_data: dict[str, str]
    user_data: str
    network_config: dict[str, Any] | None


def seed_files(spec: ClusterSpec, vm: VmPlan) -> SeedFiles:
    settings = guest_settings(spec, vm)
    if vm.boot.readiness is Readiness.TINY_INIT:
        user_data = tiny_user_data(settings, vm.user_data)
    else:
        user_data = merge_user_data(vm.user_data, required_config(settings))
    nics = interfaces(spec.job, vm)
    return SeedFiles(meta_data=meta_data(instance_id(spec.job, vm), vm.name),
                     user_data=user_data,
                     network_config=network_config(nics) if nics else None)


def tiny_ignores_user_data(vm: VmPlan) -> bool:
    """The template's user-data is cloud-config, which the tiny image cannot apply."""
    return (vm.boot.readiness is Readiness.TINY_INIT and vm.user_data is not None
            and not vm.user_data.lstrip("\ufeff").startswith("#!"))
