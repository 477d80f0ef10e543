"""The lifecycle of a VM as an explicit state machine.

``pending → preparing → booting → ready → stopping → stopped``; a VM may be
asked to stop in any live state (the job ends while it boots), and may fail
from any state that is not final.  Every state change goes through
``check_transition`` before it is published, so a runner cannot, say, report
``ready`` for a VM that never booted, or revive a stopped one.
"""

from __future__ import annotations

from enum import Enum

from vcluster.errors import VclusterError


class VmState(Enum):
    """Where a VM is in its life; the value is what the store holds."""

    PENDING = "pending"  # known to the cluster record, nothing done yet
    PREPARING = "preparing"  # agent resources, overlay, seed
    BOOTING = "booting"  # QEMU running, guest not answering yet
    READY = "ready"  # guest agent answers / cloud-init done
    STOPPING = "stopping"  # powering down (bounded wait, then quit)
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """No transition leaves a final state."""
        return self in FINAL_STATES

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({VmState.STOPPED, VmState.FAILED})

_LIVE = (VmState.PENDING, VmState.PREPARING, VmState.BOOTING, VmState.READY)

TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    VmState.PENDING: frozenset({VmState.PREPARING, VmState.STOPPING, VmState.FAILED}),
    VmState.PREPARING: frozenset({VmState.BOOTING, VmState.STOPPING, VmState.FAILED}),
    VmState.BOOTING: frozenset({VmState.READY, VmState.STOPPING, VmState.FAILED}),
    VmState.READY: frozenset({VmState.STOPPING, VmState.FAILED}),
    VmState.STOPPING: frozenset({VmState.STOPPED, VmState.FAILED}),
    VmState.STOPPED: frozenset(),
    VmState.FAILED: frozenset(),
}
"""The legal next states of each state (a state never moves to itself)."""


class IllegalTransition(VclusterError):
    """A VM was asked to move to a state that cannot follow its current one."""

    def __init__(self, old: VmState, new: VmState) -> None:
        self.old = old
        self.new = new
        allowed = ", ".join(s.value for s in VmState if s in TRANSITIONS[old])
        hint = f"allowed from {old}: {allowed}" if allowed else f"{old} is final"
        super().__init__(f"VM state cannot go from {old} to {new} ({hint})")


def can_transition(old: VmState, new: VmState) -> bool:
    """Whether ``new`` may follow ``old``."""
    return new in TRANSITIONS[old]


def check_transition(old: VmState, new: VmState) -> VmState:
    """Return ``new`` if it may follow ``old``, else raise IllegalTransition."""
    if not can_transition(old, new):
        raise IllegalTransition(old, new)
    return new


def is_live(state: VmState) -> bool:
    """A VM in this state may still become (or is) ready."""
    return state in _LIVE
