"""What a persistent cluster is made of, as recorded before any of it is made.

A persistent cluster is a cluster like a job's (its ``ClusterSpec`` under
``users/<user>/clusters/<name>/spec``, with ``mode: persistent`` and
``local``: its VMs are this machine's; its VM records beside it), so
``ps``, console, ssh, scp, exec and save find it as they find a job's.  Its
``PersistentRecord`` (``.../persistent``) lists every libvirt object and
file it owns, by name, written before the first of them is made and kept
in each domain's metadata too: ``remove`` removes what it lists and nothing
else, and a ``create`` or ``remove`` cut short is carried on (or rolled
back) by running it again.  The VMs' files are in ``<state>/work/<name>/``
(``hostpaths.VmFiles``), where the job commands look; a cluster's name
starts with a letter, so it is never a job id.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from vcluster import codec
from vcluster.cluster import ClusterSpec
from vcluster.errors import InputError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
MODE = "persistent"


class Phase(Enum):
    """Where a persistent cluster is in its making and unmaking."""

    CREATING = "creating"  # recorded; its objects may be partly made
    DEFINED = "defined"  # every object made: the cluster can start
    REMOVING = "removing"  # being taken apart

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PersistentVm:
    index: int
    domain: str  # its libvirt domain's name
    addresses: tuple[str, ...]  # each NIC's, as its seed sets it (nat: also DHCP's)
    ssh_address: str | None  # where the host reaches its ssh server (its nat address)
    host_key: str  # its ssh host key's public half ("ssh-ed25519 AAAA...")
    ssh_port: int = 22  # a session's VM: the 127.0.0.1 port forwarded to its 22
    kernel_args: str = ""  # after the image's (a clone's: systemd.machine_id=...)


@dataclass(frozen=True)
class PersistentRecord:
    name: str
    uri: str  # the libvirt connection
    phase: Phase
    workdir: Path  # the VMs' directories: <state>/work/<name>
    vms: tuple[PersistentVm, ...]
    networks: dict[str, str]  # the plan's network name -> its libvirt network's name
    shm: tuple[Path, ...] = ()  # the FAM regions' files libvirt maps (/dev/shm/...)
    shared_disks: tuple[Path, ...] = ()  # the disks every VM attaches
    copy: bool = False  # full copies of the images, not overlays
    # qemu:///session (a normal user's): no libvirt networks; QEMU's user-mode NAT for nat
    # networks, a user-space switch for each private one (``persistent.switch``)
    session: bool = False
    switches: dict[str, Path] = field(default_factory=dict)  # private network -> its socket
    nat_block: str | None = None  # the nat network's block of the subnet (not a session's)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainMetadata:
    """What each of a cluster's domains carries in its libvirt metadata: enough to put the
    cluster back in a store that lost it (``persistent.repair``)."""

    spec: ClusterSpec
    record: PersistentRecord


def metadata_text(spec: ClusterSpec, record: PersistentRecord) -> str:
    return codec.to_json(DomainMetadata(spec, record))


def read_metadata(text: str) -> DomainMetadata | None:
    """A domain's metadata as ``metadata_text`` wrote it; None if it is not (an older
    vcluster's, or another's)."""
    try:
        return codec.from_json(DomainMetadata, text, what="domain metadata", error=ValueError)
    except ValueError:
        return None


def check_name(name: str) -> str:
    """A cluster's name, checked: it names libvirt objects, files and store keys."""
    if not NAME_RE.match(name):
        raise InputError(f"NAME: {name!r} is not a cluster name (expected a lower-case "
                         "letter, then up to 23 lower-case letters, digits or dashes)")
    return name


def domain_name(user: str, cluster: str, index: int) -> str:
    """``vc-root-fs-vm0``: a domain's name says whose, which cluster and which VM."""
    return f"vc-{user}-{cluster}-vm{index}"


def network_name(user: str, cluster: str, network: str) -> str:
    return f"vc-{user}-{cluster}-{network}"


def bridge_name(user: str, cluster: str, position: int) -> str:
    """A bridge's name within Linux's 15 characters: ``vcp``, a hash of whose cluster, and
    the network's position (libvirt refuses a name in use, should two hashes meet)."""
    tag = zlib.crc32(f"{user}/{cluster}".encode()) & 0xFFFFFF
    return f"vcp{tag:06x}n{position}"


def shm_path(user: str, cluster: str, region: str) -> Path:
    return Path("/dev/shm") / f"vcluster-{user}-{cluster}-{region}"


def key_file(workdir: Path, name: str) -> Path:
    """A copy of the cluster's ssh key pair (``sshkeys.PRIVATE``, ``sshkeys.PUBLIC``) in its
    directory, the user's alone: what repair puts back in a store that lost it (the
    domains' metadata, which others may read, never holds a key)."""
    return workdir / name
