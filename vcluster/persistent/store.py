"""A user's persistent clusters in the store, under the same keys as job clusters.

``users/<user>/clusters/<name>/``: ``spec`` (a ``ClusterSpec`` with mode
``persistent``), ``vms/<i>`` (``VmRecord``: written by the cluster commands,
libvirt being the one that knows a VM's state), ``keys/`` (the cluster's ssh
key pair) and ``persistent`` (the ``PersistentRecord``).  ``begin`` writes
the record first and the spec last, so a cluster visible to ``ps`` has its
record; ``forget`` deletes the whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from vcluster import sshkeys
from vcluster.cluster import ClusterSpec
from vcluster.persistent.record import MODE, PersistentRecord
from vcluster.store.base import Store
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json

RECORD = "persistent"


class ClusterStore:
    """The persistent clusters of ``user`` in ``store``."""

    def __init__(self, store: Store, keys: Keys, user: str) -> None:
        self.store = store
        self.keys = keys
        self.user = user

    def _record_key(self, name: str) -> str:
        return self.keys.cluster_prefix(self.user, name) + RECORD

    def read(self, name: str) -> tuple[ClusterSpec, PersistentRecord] | None:
        """Cluster ``name``'s spec and record, if it has both (a job's cluster has none)."""
        entry = self.store.get(self._record_key(name))
        spec = self.store.get(self.keys.cluster_spec(self.user, name))
        if entry is None or spec is None:
            return None
        found = from_json(ClusterSpec, spec.value)
        if found.mode != MODE:
            return None
        return found, from_json(PersistentRecord, entry.value)

    def names(self) -> list[str]:
        """The user's persistent clusters, by name."""
        prefix = self.keys.clusters_prefix(self.user)
        out = []
        for entry in self.store.get_prefix(prefix).entries:
            name, _, rest = entry.key[len(prefix):].partition("/")
            if rest == RECORD:
                out.append(name)
        return sorted(out)

    def vms(self, name: str) -> dict[int, VmRecord]:
        prefix = self.keys.vms_prefix(self.user, name)
        return {int(e.key[len(prefix):]): from_json(VmRecord, e.value)
                for e in self.store.get_prefix(prefix).entries if e.key[len(prefix):].isdigit()}

    def begin(self, spec: ClusterSpec, record: PersistentRecord, pair: sshkeys.KeyPair) -> None:
        """The record, the key pair, then the spec (the cluster is then visible)."""
        name = record.name
        self.put_record(record)
        self.store.put(self.keys.cluster_key(self.user, name, sshkeys.PRIVATE), pair.private)
        self.store.put(self.keys.cluster_key(self.user, name, sshkeys.PUBLIC), pair.public)
        self.put_spec(spec)

    def finish(self, spec: ClusterSpec, record: PersistentRecord,
               vms: Sequence[VmRecord]) -> None:
        for index, vm in enumerate(vms):
            self.put_vm(record.name, index, vm)
        self.put_spec(spec)
        self.put_record(record)

    def put_record(self, record: PersistentRecord) -> None:
        self.store.put(self._record_key(record.name), to_json(record))

    def put_spec(self, spec: ClusterSpec) -> None:
        self.store.put(self.keys.cluster_spec(self.user, spec.job), to_json(spec))

    def put_vm(self, name: str, index: int, vm: VmRecord) -> None:
        self.store.put(self.keys.vm(self.user, name, index), to_json(vm))

    def forget(self, name: str) -> None:
        self.store.delete_prefix(self.keys.cluster_prefix(self.user, name))
