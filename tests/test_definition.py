"""Cluster definitions expand to ordered VMs."""

from __future__ import annotations

import pytest

from vcluster.config.templates import Template
from vcluster.definition import VmSpec, expand_definition, parse_definition
from vcluster.errors import DefinitionError, Origin

TEMPLATES = {n: Template(name=n, origin=Origin(__file__, 1), level="system")  # type: ignore[arg-type]
             for n in ("debian", "tiny", "debian-fam")}


def test_expansion_is_ordered_across_groups() -> None:
    vms = expand_definition("debian-fam:2,tiny,debian:1", TEMPLATES)
    assert vms == [VmSpec(0, "debian-fam"), VmSpec(1, "debian-fam"), VmSpec(2, "tiny"),
                   VmSpec(3, "debian")]
    assert [v.name for v in vms] == ["vm0", "vm1", "vm2", "vm3"]


def test_spaces_around_groups_are_allowed() -> None:
    assert parse_definition(" tiny:2 , debian ") == [("tiny", 2), ("debian", 1)]


@pytest.mark.parametrize(("text", "problem"), [
    ("tiny:0", "count of 'tiny' must be at least 1, not 0"),
    ("tiny:-1", "count '-1' of 'tiny' is not a number"),
    ("tiny:x", "count 'x' of 'tiny' is not a number"),
    (":3", "':3' has no template name"),
    ("tiny,,debian", "'' has no template name"),
    ("", "the definition is empty"),
    ("ti ny:2", "'ti ny' is not a valid template name"),
    ("tiny:5000", "5000 VMs is more than the limit of 4096"),
    ("nosuch:1", "unknown template 'nosuch'"),
])
def test_bad_definitions(text: str, problem: str) -> None:
    with pytest.raises(DefinitionError) as e:
        expand_definition(text, TEMPLATES)
    assert e.value.problem == problem
    assert e.value.exit_code == 2
