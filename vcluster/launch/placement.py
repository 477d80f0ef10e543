"""Where each VM runs: every FAM group on one host, the other VMs as SLURM would put them.

A FAM region is memory of one host, so the VMs naming the same region must
run on the same host; so must the VMs attached to one shared disk (an image
file of one host), and a disk shared across two regions' VMs joins them in
one group.  ``place`` decides a host for every VM from the
allocation (hosts and their CPUs, from SLURM's environment) before anything
starts; the launcher then runs the step with SLURM's arbitrary distribution
(``launch/steps.py``), so task ``i`` (VM ``i``) runs where ``place`` said.
Pure functions only: no SLURM, no store.

FAM groups go first, the largest first, each on one host: the host with the
fewest free task slots that still holds the group (so that large hosts stay
free for large groups), with a search that backs up when a choice leaves a
later group without room, so a group is refused only when no arrangement
exists.  The other VMs then go as SLURM's block distribution puts tasks
(``srun -m block``, its default): first one VM on every host that has none
yet, then filling the hosts in order, consecutive VMs on one host.  That is
what the same cluster without FAM would get from SLURM, and it keeps the
TESTBED fact that ``-N2 … T:2`` puts one VM on each host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vcluster.cluster import VmPlan
from vcluster.errors import InputError, VclusterError

SEARCH_BUDGET = 100_000  # arrangements tried before a group is declared not to fit


class PlacementError(InputError):
    """The cluster does not fit the allocation: what the user asked SLURM for must change."""


class AllocationError(VclusterError):
    """SLURM's description of the allocation cannot be read."""


@dataclass(frozen=True)
class Host:
    """A host of the allocation and the CPUs the job has on it."""

    name: str
    cpus: int


@dataclass(frozen=True)
class Allocation:
    """The job's hosts in SLURM's order, and the CPUs each task (VM) takes."""

    hosts: tuple[Host, ...]
    cpus_per_task: int = 1

    def slots(self, host: Host) -> int:
        """How many VMs fit on ``host``."""
        return host.cpus // self.cpus_per_task


@dataclass(frozen=True)
class VmNeed:
    """What placement needs to know of one VM: its name, FAM region and shared disks."""

    name: str
    fam: str | None = None
    shared: tuple[str, ...] = ()  # its shared disks: one image of one host, as a FAM region

    @classmethod
    def of(cls, vm: VmPlan) -> VmNeed:
        return cls(vm.name, vm.fam.name if vm.fam else None,
                   tuple(d.name for d in vm.disks if d.shared))


DISK_GROUP = "disk:"  # a group key: the shared disk of a group without a FAM region


def label(group: str) -> str:
    """A group as the messages name it: ``FAM region 'f'``, ``shared disk 'd'``."""
    if group.startswith(DISK_GROUP):
        return f"shared disk '{group.removeprefix(DISK_GROUP)}'"
    return f"FAM region '{group}'"


# ------------------------------------------------------------------ SLURM's words


_CPUS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def parse_cpus_per_node(text: str) -> list[int]:
    """``SLURM_JOB_CPUS_PER_NODE`` (``2(x3),1``) as one count per host, in order."""
    counts: list[int] = []
    for item in text.split(","):
        match = _CPUS_ITEM.match(item.strip())
        if not match:
            raise AllocationError(f"SLURM_JOB_CPUS_PER_NODE={text!r}: {item!r} is not a CPU "
                                  "count (expected N or N(xM), comma-separated)")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def allocation_of(hostnames: Sequence[str], cpus_per_node: str,
                  cpus_per_task: str | None = None) -> Allocation:
    """The allocation from SLURM's words: the expanded node list, its CPUs, ``-c``."""
    counts = parse_cpus_per_node(cpus_per_node)
    if len(counts) != len(hostnames):
        raise AllocationError(f"SLURM_JOB_CPUS_PER_NODE={cpus_per_node!r} names {len(counts)} "
                              f"hosts but the job has {len(hostnames)} "
                              f"({', '.join(hostnames)})")
    per_task = 1
    if cpus_per_task:
        if not cpus_per_task.isdigit() or int(cpus_per_task) < 1:
            raise AllocationError(f"SLURM_CPUS_PER_TASK={cpus_per_task!r} is not a CPU count")
        per_task = int(cpus_per_task)
    return Allocation(tuple(Host(n, c) for n, c in zip(hostnames, counts, strict=True)),
                      per_task)


# ------------------------------------------------------------------ placing


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def fam_groups(vms: Sequence[VmNeed]) -> dict[str, list[int]]:
    """The VMs that must share a host, in order of first appearance: those naming one FAM
    region, and with them every VM attached to a shared disk of theirs.  Keyed by the
    region's name (the first region's, if a disk joins two), or ``disk:NAME`` for VMs
    that share a disk and no region."""
    parent: dict[str, str] = {}

    def find(token: str) -> str:
        while parent.setdefault(token, token) != token:
            token = parent[token]
        return token

    tokens = [([f"fam {vm.fam}"] if vm.fam else []) + [f"disk {d}" for d in vm.shared]
              for vm in vms]
    for mine in tokens:
        for other in mine[1:]:
            parent[find(other)] = find(mine[0])
    keys: dict[str, str] = {}  # component -> its key: its first region, else its first disk
    ordered = [t for mine in tokens for t in mine]
    for token in sorted(ordered, key=lambda t: not t.startswith("fam ")):  # stable: regions
        kind, name = token.split(" ", 1)
        keys.setdefault(find(token), name if kind == "fam" else f"{DISK_GROUP}{name}")
    groups: dict[str, list[int]] = {}
    for i, mine in enumerate(tokens):
        if mine:
            groups.setdefault(keys[find(mine[0])], []).append(i)
    return groups


def place(vms: Sequence[VmNeed], allocation: Allocation) -> tuple[str, ...]:
    """The host of each VM (in VM order); PlacementError, one line, if the cluster cannot fit.

    Never more VMs on a host than its slots: SLURM's arbitrary distribution
    does not check that itself.
    """
    hosts = allocation.hosts
    slots = [allocation.slots(h) for h in hosts]
    if len(vms) > sum(slots):
        raise PlacementError(
            f"the allocation has room for {_plural(sum(slots), 'VM')} of "
            f"{_plural(allocation.cpus_per_task, 'CPU')}, not {len(vms)}: "
            f"{_what_hosts_have(allocation, {})}")
    groups = fam_groups(vms)
    order = sorted(groups, key=lambda name: (-len(groups[name]), groups[name][0]))
    chosen = _pack([len(groups[name]) for name in order], slots)
    if chosen is None:
        raise _no_room(vms, allocation, groups, order)
    where: dict[int, int] = {}
    free = list(slots)
    for name, h in zip(order, chosen, strict=True):
        for i in groups[name]:
            where[i] = h
        free[h] -= len(groups[name])
    rest = [i for i in range(len(vms)) if i not in where]
    for i, h in zip(rest, _block(len(rest), free, set(where.values())), strict=True):
        where[i] = h
    return tuple(hosts[where[i]].name for i in range(len(vms)))


def _block(count: int, free: list[int], occupied: set[int]) -> list[int]:
    """Hosts for ``count`` VMs as SLURM's block distribution: one on every empty host
    first, then filling hosts in order; consecutive VMs share a host."""
    take = [0] * len(free)
    left = count
    for h in range(len(free)):
        if left and free[h] > 0 and h not in occupied:
            take[h], left = 1, left - 1
    for h in range(len(free)):
        more = min(left, free[h] - take[h])
        take[h], left = take[h] + more, left - more
    assert left == 0, "place() checked that every VM has a slot"
    return [h for h in range(len(free)) for _ in range(take[h])]


def _pack(sizes: Sequence[int], slots: Sequence[int]) -> list[int] | None:
    """A host index per group (groups in the order given, largest first), or None.

    Best fit first (the fullest host that still holds the group), backing
    up when a later group finds no room.  Hosts with as many free slots are
    alike for what follows, so only one of them is tried, and a state known
    to fail is not tried again.
    """
    free = list(slots)
    chosen: list[int] = []
    failed: set[tuple[int, tuple[int, ...]]] = set()
    budget = [SEARCH_BUDGET]

    def search(k: int) -> bool:
        if k == len(sizes):
            return True
        state = (k, tuple(sorted(free)))
        if state in failed or budget[0] <= 0:
            return False
        budget[0] -= 1
        tried: set[int] = set()
        for h in sorted(range(len(free)), key=lambda h: (free[h], h)):
            if free[h] < sizes[k] or free[h] in tried:
                continue
            tried.add(free[h])
            free[h] -= sizes[k]
            chosen.append(h)
            if search(k + 1):
                return True
            chosen.pop()
            free[h] += sizes[k]
        failed.add(state)
        return False

    return chosen if search(0) else None


def _what_hosts_have(allocation: Allocation, taken: Mapping[int, list[str]]) -> str:
    """``h1 has 2 CPUs (2 taken by FAM region 'a'), h2 has 1 CPU``."""
    parts = []
    for h, host in enumerate(allocation.hosts):
        text = f"{host.name} has {_plural(host.cpus, 'CPU')}"
        if taken.get(h):
            cpus = len(taken[h]) * allocation.cpus_per_task
            regions = list(dict.fromkeys(taken[h]))
            if all(not r.startswith(DISK_GROUP) for r in regions):
                named = ", ".join(f"'{r}'" for r in regions)
                text += f" ({cpus} taken by FAM region{'s' if len(regions) > 1 else ''} {named})"
            else:
                text += f" ({cpus} taken by {', '.join(label(r) for r in regions)})"
        parts.append(text)
    return ", ".join(parts)


def _no_room(vms: Sequence[VmNeed], allocation: Allocation, groups: Mapping[str, list[int]],
             order: Sequence[str]) -> PlacementError:
    """The one-line refusal: the first group that best fit, largest first, cannot place."""
    free = [allocation.slots(h) for h in allocation.hosts]
    taken: dict[int, list[str]] = {}
    for name in order:
        size = len(groups[name])
        fits = [h for h in range(len(free)) if free[h] >= size]
        if not fits:
            members = ", ".join(vms[i].name for i in groups[name])
            return PlacementError(
                f"{label(name)} ({members}: {_plural(size, 'VM')}, "
                f"{_plural(size * allocation.cpus_per_task, 'CPU')}) fits on no host of the "
                f"allocation: {_what_hosts_have(allocation, taken)}; ask for more CPUs per "
                f"node (e.g. --ntasks-per-node={size}) or make the group smaller")
        h = min(fits, key=lambda h: (free[h], h))
        free[h] -= size
        taken.setdefault(h, []).extend([name] * size)
    # Best fit placed every group but the search found no arrangement: only its budget
    # can have run out (best fit is the search's first path).
    return PlacementError(f"the groups ({', '.join(label(n) for n in order)}) could not "
                          f"be arranged on the allocation within {SEARCH_BUDGET} tries: "
                          f"{_what_hosts_have(allocation, {})}; ask for more CPUs per node")


def split_regions(vms: Sequence[VmNeed], hosts: Mapping[int, str]) -> str | None:
    """A one-line complaint if VMs of one FAM region run on different hosts, else None.

    ``hosts`` maps VM index to the host it published (VMs not yet placed are absent).
    """
    for name, members in fam_groups(vms).items():
        placed = [(vms[i].name, hosts[i]) for i in members if i in hosts]
        if len({host for _, host in placed}) > 1:
            where = ", ".join(f"{vm} on {host}" for vm, host in placed)
            what = ("a shared disk is a file of one host" if name.startswith(DISK_GROUP)
                    else "a region is memory of one host")
            return (f"{label(name)} is split across hosts ({where}): {what}, so these VMs "
                    "would not share it")
    return None
