"""The one codec and the one atomic write, and the files that use them."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vcluster import codec
from vcluster.codec import CodecError
from vcluster.errors import ImageError, SandboxError
from vcluster.files import write_atomically
from vcluster.images.repo import ImageInfo
from vcluster.sandbox import state as sandbox_state
from vcluster.sandbox.state import Host, Process, SandboxState


@dataclass(frozen=True)
class Leaf:
    name: str
    size: int = 0

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size {self.size} is negative")


@dataclass
class Tree:
    leaves: list[Leaf] = field(default_factory=list)
    tags: dict[str, Leaf] = field(default_factory=dict)


def test_errors_name_the_field_path_and_use_the_callers_words() -> None:
    bad = {"leaves": [{"name": "a"}, {"name": "b", "size": "big"}]}
    with pytest.raises(CodecError, match=r"^data Tree\.leaves\[1\]\.size: 'big' is not an "
                                         r"integer$"):
        codec.from_data(Tree, bad)
    with pytest.raises(SandboxError, match=r"^state leaves\[0\]: unknown field 'colour'"):
        codec.from_data(Tree, {"leaves": [{"name": "a", "colour": 1}]}, what="state", root="",
                        error=SandboxError)
    with pytest.raises(CodecError, match=r"Tree\.tags\['x'\]: size -1 is negative"):
        codec.from_data(Tree, {"tags": {"x": {"name": "x", "size": -1}}})
    with pytest.raises(CodecError, match=r"^data Tree is not valid JSON"):
        codec.from_json(Tree, "{")


def test_lists_and_mutable_dataclasses_round_trip() -> None:
    tree = Tree([Leaf("a", 1), Leaf("b")], {"k": Leaf("c", 3)})
    text = codec.to_json(tree)
    assert json.loads(text) == {"leaves": [{"name": "a", "size": 1}, {"name": "b", "size": 0}],
                                "tags": {"k": {"name": "c", "size": 3}}}
    back = codec.from_json(Tree, text)
    assert back == tree and isinstance(back.leaves, list)
    assert codec.to_json(tree, indent=2).endswith("}\n")


def test_write_atomically_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomically(target, "old\n")
    write_atomically(target, b"new\n", mode=0o644)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    write_atomically(target, "old\n")

    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f.json"]


def test_sandbox_state_round_trips_and_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    state = SandboxState(id="vcsb-abcdef", dir=str(tmp_path), created_dir=True, phase="up",
                         controller=Host("ctl", "10.200.0.1", "vcsb-abcdef-ctl", "/u", "/c"),
                         hosts=[Host("h1", "10.200.0.11", "vcsb-abcdef-h1", "/u1", "/c1")],
                         processes=[Process("etcd", 42, 1234, "/log")], mounts=["/m"])
    state.save()
    assert sandbox_state.load(tmp_path) == state
    data = json.loads(state.path.read_text())
    data["hosts"][0]["color"] = "red"
    state.path.write_text(json.dumps(data))
    with pytest.raises(SandboxError, match=r"state\.json: not a sandbox state file: "
                                           r"SandboxState\.hosts\[0\]: unknown field 'color'"):
        sandbox_state.load(tmp_path)
    data["hosts"][0].pop("color")
    data["format"] = 99
    state.path.write_text(json.dumps(data))
    with pytest.raises(SandboxError, match="state file format 99"):
        sandbox_state.load(tmp_path)


def test_image_info_is_read_strictly(tmp_path: Path) -> None:
    info = ImageInfo(name="tiny", kind="initramfs", files={"kernel": "vmlinuz"}, revision=3)
    assert ImageInfo.from_json(info.to_json(), tmp_path) == info
    with pytest.raises(ImageError, match=r"not a valid image description: ImageInfo\.files"
                                         r"\['kernel'\]: 5 is not a string"):
        ImageInfo.from_json('{"name": "t", "kind": "disk", "files": {"kernel": 5}}', tmp_path)
    with pytest.raises(ImageError, match="kind 'floppy'"):
        ImageInfo.from_json('{"name": "t", "kind": "floppy", "files": {}}', tmp_path)
