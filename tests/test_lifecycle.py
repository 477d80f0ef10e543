"""The VM lifecycle state machine."""

from __future__ import annotations

import itertools

import pytest

from vcluster.errors import VclusterError
from vcluster.lifecycle import (
    FINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    VmState,
    can_transition,
    check_transition,
    is_live,
)

S = VmState
HAPPY_PATH = [S.PENDING, S.PREPARING, S.BOOTING, S.READY, S.STOPPING, S.STOPPED]


def test_the_happy_path_is_legal() -> None:
    for old, new in itertools.pairwise(HAPPY_PATH):
        assert check_transition(old, new) is new


def test_failed_is_reachable_from_every_state_that_is_not_final() -> None:
    for state in VmState:
        assert can_transition(state, S.FAILED) == (not state.final)


def test_stop_is_possible_from_every_live_state() -> None:
    for state in (S.PENDING, S.PREPARING, S.BOOTING, S.READY):
        assert is_live(state)
        check_transition(state, S.STOPPING)


def test_final_states_have_no_way_out() -> None:
    assert {S.STOPPED, S.FAILED} == FINAL_STATES
    for state, new in itertools.product(FINAL_STATES, VmState):
        with pytest.raises(IllegalTransition, match=f"{state} is final"):
            check_transition(state, new)


def test_the_table_is_exactly_the_design() -> None:
    legal = {(old, new) for old, news in TRANSITIONS.items() for new in news}
    expected = set(itertools.pairwise(HAPPY_PATH))
    expected |= {(s, S.STOPPING) for s in (S.PENDING, S.PREPARING, S.BOOTING)}
    expected |= {(s, S.FAILED) for s in VmState if s not in FINAL_STATES}
    assert legal == expected
    assert set(TRANSITIONS) == set(VmState)


@pytest.mark.parametrize(("old", "new"), [
    (S.PENDING, S.READY),  # skipping steps
    (S.PREPARING, S.READY),
    (S.BOOTING, S.PREPARING),  # going back
    (S.READY, S.BOOTING),
    (S.STOPPING, S.READY),
    (S.READY, S.READY),  # a state never moves to itself
    (S.PENDING, S.STOPPED),  # stopping is always published first
])
def test_illegal_transitions_are_refused(old: VmState, new: VmState) -> None:
    assert not can_transition(old, new)
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert isinstance(info.value, VclusterError)
    assert str(info.value).startswith(f"VM state cannot go from {old} to {new} (allowed from")
    assert info.value.old is old and info.value.new is new


def test_states_are_stored_by_their_names() -> None:
    assert [s.value for s in VmState] == [
        "pending", "preparing", "booting", "ready", "stopping", "stopped", "failed"]
    assert str(S.BOOTING) == "booting"
