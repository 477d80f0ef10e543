"""Publishing a VM's state: every legal transition is written to the store at once.

The launcher may have written the VM's record as ``pending``; a runner starts
from the stored record (or from ``pending`` when there is none) and moves it
through ``VmRecord.moved_to``, which refuses illegal transitions, so the
store never shows a VM going backwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vcluster.lifecycle import VmState
from vcluster.store.base import Store
from vcluster.store.records import SshEndpoint, VmRecord, from_json, to_json

log = logging.getLogger(__name__)


class Publisher:
    """Holds one VM's record and writes each new state under ``key``."""

    def __init__(self, store: Store, key: str, name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.key = key
        self.name = name
        self.clock = clock
        self.record = VmRecord(VmState.PENDING)

    def load(self) -> VmRecord:
        """Start from the stored record, if the launcher wrote one."""
        entry = self.store.get(self.key)
        if entry is not None:
            self.record = from_json(VmRecord, entry.value)
        return self.record

    @property
    def state(self) -> VmState:
        return self.record.state

    def move(self, state: VmState, *, error: str | None = None, host: str | None = None,
             addresses: tuple[str, ...] | None = None,
             console_tail: tuple[str, ...] = (), ssh: SshEndpoint | None = None,
             host_key: str | None = None) -> VmRecord:
        """Publish ``state`` (IllegalTransition if it cannot follow the current one)."""
        record = self.record.moved_to(state, self.clock(), error=error, host=host,
                                      addresses=addresses, console_tail=console_tail,
                                      ssh=ssh, host_key=host_key)
        self.store.put(self.key, to_json(record))
        self.record = record
        log.info("%s: %s%s", self.name, state, f" ({error})" if error else "")
        return record
