"""``vcluster save``: a running VM's disk kept as a new image revision."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vcluster.cli.clusters import cluster_options

if TYPE_CHECKING:
    from vcluster.cluster import VmPlan

HELP = """Save VM's root disk (or -i DISK) as a new image revision, while the VM runs.

By default the revision is a new one of the image the VM was started from,
holding only what the VM changed (a qcow2 layer over that revision);
-d [REPO:]NAME saves into image NAME instead (REPO: user, the default, or
site), as a standalone revision, as is --full (flattened and compressed).
A chain of more than --max-depth layers is flattened too. -i NAME saves one
of the template's disks instead (see disks: in templates; an empty one
needs -d): a data image, which a template's disk can start from (image:).

The guest's file systems are frozen through its guest agent for the moment
the copy starts (without a guest agent, or with --no-freeze, the save is
crash-consistent, and a warning says so); the VM keeps running. A revision
appears whole or not at all; two saves into one image get two revisions.

\b
Examples:
  vcluster save vm0
  vcluster save -j 12 -d user:mine vm1
  vcluster save --full -d site:debian-ci vm0     # with write access to the site's
"""


@dataclass(frozen=True)
class _Disk:
    """The disk to save: QEMU's drive, and the image revision it started as."""

    vm: str
    what: str  # "the root disk", "disk 'data'"
    device: str
    image: str | None  # NAME@REV, or a file, or None: it was empty
    base: Path | None  # that revision's disk file
    repository: Path | None  # its repository (None: not from one)


def _disk(vm: VmPlan, name: str, job: str) -> _Disk:
    from vcluster.errors import InputError

    root_disk = vm.boot.kind == "disk" and vm.boot.disk is not None
    if name == "root":
        if not root_disk:
            raise InputError(f"{vm.name} of job {job} boots {vm.boot.image}, a kernel and "
                             "initramfs image: it has no disk to save (save works for disk "
                             "images, such as debian, and for a template's disks: -i NAME)")
        return _Disk(vm.name, "the root disk", "disk0", vm.boot.image, vm.boot.disk,
                     vm.boot.repository)
    names = [d.name for d in vm.disks]
    if name not in names:
        have = ", ".join(["root", *names] if root_disk else names) or "none"
        raise InputError(f"-i {name}: {vm.name} of job {job} has no disk {name!r} (its disks: "
                         f"{have})")
    d = vm.disks[names.index(name)]
    return _Disk(vm.name, f"disk {name!r}", f"disk{names.index(name) + int(root_disk)}",
                 d.image, d.base, d.repository)


def _destination(text: str | None, disk: _Disk, repos: dict[str, Path],
                 job: str) -> tuple[Path, str, bool]:
    """(repository, image name, whether -d named it) for a save of ``disk``."""
    from vcluster.errors import InputError
    from vcluster.images.repo import split_destination

    if text is None:
        if disk.repository is None or disk.base is None:
            started = (f"was started from the file {disk.image}" if disk.image
                       else "started empty")
            raise InputError(f"{disk.what} of {disk.vm} of job {job} {started}, not from an "
                             "image repository: save it as an image with -d user:NAME")
        return disk.repository, disk.base.parent.parent.name, False
    repo, name = split_destination(text, f"-d {text}")
    return repos[repo or "user"], name, True


@click.command(help=HELP)
@cluster_options
@click.option("-d", "--dest", default=None, metavar="[REPO:]NAME",
              help="Save into image NAME of repository REPO (user or site; default user) "
                   "instead of a new revision of the VM's own image.")
@click.option("--full", is_flag=True,
              help="A standalone revision: the whole disk, flattened and compressed.")
@click.option("-i", "--disk", "disk_name", default="root", show_default=True, metavar="DISK",
              help="The disk to save: root, or the name of one of the template's disks.")
@click.option("--no-freeze", is_flag=True,
              help="Do not freeze the guest's file systems (a crash-consistent save).")
@click.option("--max-depth", type=click.IntRange(min=1), default=None,
              help="Flatten the revision rather than make a chain deeper than this (default: "
                   "images.max-depth of batch.yaml, 16).")
@click.argument("vm")
@click.pass_context
def save(ctx: click.Context, jobid: str | None, jobname: str | None, dest: str | None,
         full: bool, disk_name: str, no_freeze: bool, max_depth: int | None, vm: str) -> None:
    from vcluster.cli.clusters import pick_cluster, vm_index, with_store
    from vcluster.cli.common import load_config, writable
    from vcluster.cluster import named_repositories
    from vcluster.errors import InputError, VclusterError
    from vcluster.launch.overlap import overlap_argv, overlap_env
    from vcluster.lifecycle import VmState
    from vcluster.run import spawn

    store, keys, user = with_store(ctx)
    cluster = pick_cluster(store, keys, user, jobid, jobname)
    job = cluster.spec.job
    index = vm_index(vm, cluster)
    plan = cluster.spec.plan.vms[index]
    disk = _disk(plan, disk_name, job)
    config = load_config()
    repos = named_repositories(config)
    max_depth = max_depth or config.batch.images.max_depth
    root, name, named = _destination(dest, disk, repos, job)
    if not writable(root):
        which = next((f"the {r} repository" for r, p in repos.items() if p == root),
                     "the repository")
        if named:
            raise InputError(f"-d {dest}: you cannot write {which} {root} (expected a "
                             "repository of yours, such as -d user:NAME)")
        raise InputError(f"{plan.name}'s image {disk.image} is in {which} {root}, which "
                         "you cannot write: save it as an image of your own with -d user:NAME")
    record = cluster.vms.get(index)
    if record is None or record.host is None or record.state not in (VmState.BOOTING,
                                                                      VmState.READY):
        state = record.state.value if record else "unknown"
        raise VclusterError(f"{plan.name} of job {job} is not running (state: {state})")
    root.mkdir(parents=True, exist_ok=True)
    argv = [*overlap_argv(job, record.host, local=cluster.spec.local), sys.executable,
            "-m", "vcluster", "internal", "save", "--job", job, f"--vm={index}",
            f"--device={disk.device}", f"--what={disk.what}", f"--dest={root}", f"--name={name}",
            f"--max-depth={max_depth}", *(["--full"] if full or named else []),
            *(["--no-freeze"] if no_freeze else [])]
    if disk.base is not None and disk.repository is not None:
        argv.append(f"--source={disk.base.parent}")
    raise SystemExit(spawn(argv, stdin=None, stdout=None, stderr=None,
                           env=overlap_env()).wait())
