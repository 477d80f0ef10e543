"""Stored records round-trip through JSON, and the codec refuses what it cannot trust."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pytest

from vcluster.errors import StoreError
from vcluster.lifecycle import IllegalTransition, VmState
from vcluster.store.records import (
    HostRecord,
    HostSetup,
    JobOwner,
    SetupState,
    VmRecord,
    from_json,
    to_json,
)


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int
    shared: bool = False


@dataclass(frozen=True)
class Spec:
    name: str
    disks: tuple[Disk, ...]
    colors: tuple[Color, Color]
    labels: dict[str, str]
    memory: float
    kernel: Path | None = None
    note: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


RECORDS = [
    HostRecord(name="h1", address="10.0.0.11", version="0.1.0", since=1700000000.5),
    JobOwner(uid=1001, user="alice"),
    HostSetup(SetupState.PENDING),
    HostSetup(SetupState.READY),
    HostSetup(SetupState.FAILED, error="bridge vc-1234: File exists"),
    VmRecord(VmState.PENDING),
    VmRecord(VmState.READY, host="h2", addresses=("10.0.0.2", "fd00::2"), since=1.25),
    VmRecord(VmState.FAILED, host="h2", since=2.0, error="QEMU exited: status 1 — “quoted”"),
    Spec(name="c", disks=(Disk(Path("/var/a.qcow2"), 1 << 30), Disk(Path("b"), 5, True)),
         colors=(Color.RED, Color.BLUE), labels={"k": "v", "é": "ü"}, memory=2,
         kernel=Path("/boot/vmlinuz"), note=None, extra=("x",)),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip(record: object) -> None:
    text = to_json(record)
    assert from_json(type(record), text) == record
    assert from_json(type(record), text.encode()) == record
    json.loads(text)  # plain JSON, readable by other tools


def test_encoding_is_plain_json() -> None:
    text = to_json(VmRecord(VmState.BOOTING, host="h1", addresses=("10.0.0.3",), since=3.5))
    assert json.loads(text) == {"state": "booting", "host": "h1", "addresses": ["10.0.0.3"],
                                "since": 3.5, "error": None, "console_tail": [], "ssh": None,
                                "host_key": None}
    spec = json.loads(to_json(RECORDS[-1]))
    assert spec["disks"][0] == {"path": "/var/a.qcow2", "size": 1 << 30, "shared": False}
    assert spec["colors"] == ["red", "blue"]


def test_unknown_field_is_refused() -> None:
    with pytest.raises(StoreError, match=r"stored JobOwner: unknown field 'gid'.*newer vcluster"):
        from_json(JobOwner, '{"uid": 1, "user": "a", "gid": 2}')


def test_missing_field_is_refused_unless_it_has_a_default() -> None:
    with pytest.raises(StoreError, match="stored JobOwner: missing field 'user'"):
        from_json(JobOwner, '{"uid": 1}')
    assert from_json(VmRecord, '{"state": "pending"}') == VmRecord(VmState.PENDING)


@pytest.mark.parametrize(("cls", "text", "message"), [
    (JobOwner, '{"uid": "1001", "user": "a"}', r"JobOwner.uid: '1001' is not an integer"),
    (JobOwner, '{"uid": true, "user": "a"}', r"JobOwner.uid: a boolean is not an integer"),
    (JobOwner, '{"uid": 1.5, "user": "a"}', r"JobOwner.uid: 1.5 is not an integer"),
    (JobOwner, '{"uid": 1, "user": null}', r"JobOwner.user: null is not a string"),
    (VmRecord, '{"state": "running"}', r"VmRecord.state: 'running' is not one of 'pending'"),
    (VmRecord, '{"state": "ready", "addresses": "10.0.0.1"}',
     r"VmRecord.addresses: '10.0.0.1' is not a list"),
    (VmRecord, '{"state": "ready", "addresses": ["a", 3]}',
     r"VmRecord.addresses\[1\]: 3 is not a string"),
    (Spec, '{"name": "c", "disks": [{"path": 1, "size": 1}], "colors": ["red", "red"],'
           ' "labels": {}, "memory": 1}', r"Spec.disks\[0\].path: 1 is not a path string"),
    (Spec, '{"name": "c", "disks": [], "colors": ["red"], "labels": {}, "memory": 1}',
     r"Spec.colors: a list is not a list of 2 items"),
    (Spec, '{"name": "c", "disks": [], "colors": ["red", "blue"], "labels": {"a": 1},'
           ' "memory": 1}', r"Spec.labels\['a'\]: 1 is not a string"),
    (Spec, '{"name": "c", "disks": [], "colors": ["red", "blue"], "labels": [],'
           ' "memory": 1}', r"Spec.labels: a list is not an object"),
    (HostRecord, '[]', r"stored HostRecord: a list is not an object \(HostRecord\)"),
    (HostSetup, '{"state": "failed"}', r"stored HostSetup: an error message goes with"),
    (VmRecord, '{"state": "ready", "error": "boom"}', r"stored VmRecord: an error message"),
])
def test_wrong_types_are_refused_with_the_field_path(cls: type, text: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        from_json(cls, text)


def test_invalid_json_is_refused() -> None:
    with pytest.raises(StoreError, match="stored VmRecord is not valid JSON"):
        from_json(VmRecord, '{"state": ')
    with pytest.raises(StoreError, match="stored VmRecord is not valid JSON"):
        from_json(VmRecord, b"\xff\xfe")


def test_integers_are_accepted_for_floats() -> None:
    record = from_json(HostRecord, '{"name": "h", "address": "a", "version": "v", "since": 7}')
    assert record.since == 7.0 and isinstance(record.since, float)


def test_only_dataclasses_are_encoded() -> None:
    with pytest.raises(TypeError):
        to_json({"a": 1})
    with pytest.raises(TypeError):
        to_json(JobOwner)


def test_vm_record_moves_only_along_the_lifecycle() -> None:
    record = VmRecord(VmState.PENDING)
    record = record.moved_to(VmState.PREPARING, 1.0, host="h1")
    record = record.moved_to(VmState.BOOTING, 2.0)
    record = record.moved_to(VmState.READY, 3.0, addresses=("10.0.0.2",))
    assert record == VmRecord(VmState.READY, host="h1", addresses=("10.0.0.2",), since=3.0)
    failed = record.moved_to(VmState.FAILED, 4.0, error="guest agent gone")
    assert failed.error == "guest agent gone" and failed.host == "h1"
    with pytest.raises(IllegalTransition, match="from failed to ready"):
        failed.moved_to(VmState.READY, 5.0)
    with pytest.raises(IllegalTransition, match="from ready to booting"):
        record.moved_to(VmState.BOOTING, 5.0)
    with pytest.raises(ValueError, match="error message"):
        record.moved_to(VmState.FAILED, 5.0)
