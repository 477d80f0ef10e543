"""VXLAN ids for a job's private networks, taken from the site's ``vni-range`` in the store.

Users' etcd roles reach only ``users/<user>/``, so the agent takes the ids
for the launcher (the ``vnis`` request).  One id per (job, network), taken by
one etcd transaction::

    compare  absent(pools/vni/<v>)  and  absent(jobs/<job>/vni/<network>)
    success  put pools/vni/<v> = VniHolder {"job", "user", "network"}
             put jobs/<job>/vni/<network> = <v>
    failure  get jobs/<job>/vni/<network>

When it fails and the job's key exists, another request of the job won and
its id is the answer (so asking twice, or two launchers racing, gives one
id); otherwise ``v`` was taken meanwhile and the next free one is tried.
The search starts at a random place in the range, so concurrent clusters
rarely try the same id.  No id is ever given twice: the pool key is the
lock.  Both keys go when the job is released (``jobs.Jobs._delete_keys``
deletes ``jobs/<job>/`` and every pool entry naming the job), on every host
of the job, even if the launcher died.

``check`` is the other half: a VM runner naming a VNI for a network gets it
only if the store says it is the job's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from vcluster.agent.policy import Policy
from vcluster.agent.protocol import denied, failed
from vcluster.errors import InputError, StoreError
from vcluster.store.base import Delete, Get, Put, Store, absent, value_is
from vcluster.store.keys import Keys
from vcluster.store.records import VniHolder, to_json

SHOWN_JOBS = 8  # jobs named in an exhaustion message


def owned_by(value: str, job: str) -> bool:
    """A pool entry's value names ``job``: the job id, or JSON with "job": id."""
    return holder_job(value) == job


def holder_job(value: str) -> str | None:
    """The job a pool entry's value names (the job id, or JSON with "job": id)."""
    if value.isdigit():
        return value
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("job") is not None:
        return str(data["job"])
    return None


def _holders(store: Store, keys: Keys, first: int, last: int) -> tuple[set[int], set[str]]:
    """The ids of ``first``..``last`` taken now, and the jobs holding them."""
    taken: set[int] = set()
    jobs: set[str] = set()
    for entry in store.get_prefix(keys.vni_pool_prefix()):
        try:
            vni = keys.vni_of(entry.key)
        except InputError:
            continue
        if first <= vni <= last:
            taken.add(vni)
            holder = holder_job(entry.value)
            if holder is not None:
                jobs.add(holder)
    return taken, jobs


def _exhausted(network: str, first: int, last: int, origin: str, jobs: set[str]) -> Exception:
    ordered = sorted(jobs, key=lambda j: (len(j), j))
    shown = ", ".join(ordered[:SHOWN_JOBS])
    if len(ordered) > SHOWN_JOBS:
        shown += f" and {len(ordered) - SHOWN_JOBS} more"
    count = f"{len(ordered)} cluster{'' if len(ordered) == 1 else 's'}"
    held = f"{count} hold{'s' if len(ordered) == 1 else ''} them" + \
        (f" (job{'' if len(ordered) == 1 else 's'} {shown})" if ordered else "")
    return failed(f"network {network!r}: no free VXLAN id in vni-range {first}-{last} "
                  f"({origin}): {held}; try again when one ends, or widen the range")


def take(store: Store, keys: Keys, job: str, user: str, network: str,
         vni_range: tuple[int, int], origin: str,
         rng: random.Random | None = None) -> int:
    """The job's VXLAN id of ``network``: the one it holds, or a free one taken now."""
    job_key = keys.job_vni(job, network)
    held = store.get(job_key)
    if held is not None:
        return _stored_vni(held.value, job_key)
    first, last = vni_range
    size = last - first + 1
    start = (rng or random.SystemRandom()).randrange(size)
    holder = to_json(VniHolder(job=job, user=user, network=network))
    taken, _jobs = _holders(store, keys, first, last)
    for step in range(size):
        vni = first + (start + step) % size
        if vni in taken:
            continue
        pool_key = keys.vni(vni)
        result = store.txn([absent(pool_key), absent(job_key)],
                           [Put(pool_key, holder), Put(job_key, str(vni))],
                           [Get(job_key)])
        if result.succeeded:
            return vni
        got = result.results[0] if result.results else None
        if got:
            return _stored_vni(got[0].value, job_key)  # another request of the job won
    _taken, jobs = _holders(store, keys, first, last)
    raise _exhausted(network, first, last, origin, jobs)


def _stored_vni(value: str, key: str) -> int:
    if not value.isdigit():
        raise StoreError(f"store key {key} holds {value!r}, not a VXLAN id")
    return int(value)


def take_all(store: Store, keys: Keys, policy: Policy, job: str, user: str,
             networks: Sequence[str]) -> dict[str, int]:
    """The job's VXLAN id of each of ``networks`` (site networks that are tunneled)."""
    tunnels = [policy.tunnel(name, f"networks[{i}]: ") for i, name in enumerate(networks)]
    try:
        return {t.name: take(store, keys, job, user, t.name, t.vni_range, t.vni_origin)
                for t in tunnels}
    except StoreError as e:
        raise StoreError(f"cannot take VXLAN ids for job {job}: {e}") from e


def check(store: Store, keys: Keys, job: str, network: str, vni: int) -> None:
    """Refuse (denied) unless the store says ``vni`` is the job's id of ``network``."""
    job_key = keys.job_vni(job, network)
    try:
        held = store.get(job_key)
        holder = store.get(keys.vni(vni))
    except StoreError as e:
        raise StoreError(f"cannot check the VXLAN id of network {network!r} of job {job}: "
                         f"{e}") from e
    mine = held is not None and held.value == str(vni)
    if not mine or holder is None or not owned_by(holder.value, job):
        said = "none" if held is None else held.value
        raise denied(f"network {network!r}: VXLAN id {vni} is not job {job}'s (the store "
                     f"gives the job {said} for it); ask the agent for the job's ids (vnis)")


def release(store: Store, keys: Keys, job: str) -> None:
    """Give back every VXLAN id ``job`` holds (its ``vni/`` keys and its pool entries)."""
    store.delete_prefix(keys.job_vnis_prefix(job))
    for entry in store.get_prefix(keys.vni_pool_prefix()):
        if owned_by(entry.value, job):
            store.txn([value_is(entry.key, entry.value)], [Delete(entry.key)])
