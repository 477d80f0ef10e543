"""The image's default login user: the recipe key ``user`` and ``ImageInfo.user``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_tree
from vcluster.errors import ConfigError, ImageError
from vcluster.images.recipe import load_recipe
from vcluster.images.repo import ImageInfo


def test_shipped_recipes_name_their_users() -> None:
    # tiny has only root; debian's is cloud-init's default user in Debian's cloud.cfg
    assert load_recipe("tiny").user == "root"
    assert load_recipe("debian").user == "debian"


def test_user_is_inherited_and_defaults_to_root(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "base.yaml": "kind: disk\n",
        "mid.yaml": "parents: base\nuser: alice\n",
        "top.yaml": "parents: mid\n",
        "own.yaml": "parents: mid\nuser: bob_2\n",
    })
    assert load_recipe(str(tmp_path / "base.yaml")).user == "root"
    assert load_recipe(str(tmp_path / "top.yaml")).user == "alice"
    own = load_recipe(str(tmp_path / "own.yaml"))
    assert own.user == "bob_2" and own.settings()["user"] == "bob_2"


@pytest.mark.parametrize("value, expected", [
    ("Root", "user: 'Root' is not a user name (expected lower-case letters"),
    ("0day", "user: '0day' is not a user name"),
    ("a" * 33, "is not a user name"),
    ("[a]", "user: a list is not a string (expected a user name)"),
])
def test_bad_users_name_file_line_key(tmp_path: Path, value: str, expected: str) -> None:
    (tmp_path / "r.yaml").write_text(f"kind: disk\nuser: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(tmp_path / "r.yaml"))
    assert str(info.value).startswith(f"{tmp_path / 'r.yaml'}:2: ")
    assert expected in str(info.value)


def test_image_json_user_round_trips_and_defaults_for_older_files(tmp_path: Path) -> None:
    info = ImageInfo(name="d", kind="disk", files={"disk": "disk.qcow2"}, user="debian")
    assert ImageInfo.from_json(info.to_json(), tmp_path) == info
    older = json.loads(info.to_json())
    del older["user"]  # written before images had a default user
    assert ImageInfo.from_json(json.dumps(older), tmp_path).user == "root"
    older["user"] = "../etc"
    with pytest.raises(ImageError, match=r"user '../etc' is not a user name"):
        ImageInfo.from_json(json.dumps(older), tmp_path)
