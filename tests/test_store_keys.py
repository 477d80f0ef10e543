"""The store's key layout (DESIGN.md) and the checks on names that go into keys."""

from __future__ import annotations

import pytest

from vcluster.errors import InputError
from vcluster.store.keys import VNI_MAX, Keys


def test_layout_matches_the_design() -> None:
    k = Keys("/vcluster")
    assert k.host("h1") == "/vcluster/hosts/h1"
    assert k.vni(42) == "/vcluster/pools/vni/42"
    assert k.job_owner("1234") == "/vcluster/jobs/1234/owner"
    assert k.job_host_setup("1234", "h2") == "/vcluster/jobs/1234/hosts/h2/setup"
    assert k.cluster_spec("alice", "1234") == "/vcluster/users/alice/clusters/1234/spec"
    assert k.vm("alice", "1234", 7) == "/vcluster/users/alice/clusters/1234/vms/7"
    assert k.cluster_key("alice", "1234", "id_ed25519") == (
        "/vcluster/users/alice/clusters/1234/keys/id_ed25519")


def test_prefixes_end_with_a_slash_and_contain_their_keys() -> None:
    k = Keys("/vcluster")
    assert k.hosts_prefix() == "/vcluster/hosts/"
    assert k.vni_pool_prefix() == "/vcluster/pools/vni/"
    assert k.job_prefix("9") == "/vcluster/jobs/9/"
    assert k.job_hosts_prefix("9") == "/vcluster/jobs/9/hosts/"
    assert k.user_prefix("alice") == "/vcluster/users/alice/"
    assert k.clusters_prefix("alice") == "/vcluster/users/alice/clusters/"
    assert k.cluster_prefix("alice", "9") == "/vcluster/users/alice/clusters/9/"
    assert k.vms_prefix("alice", "9") == "/vcluster/users/alice/clusters/9/vms/"
    assert k.cluster_keys_prefix("alice", "9") == "/vcluster/users/alice/clusters/9/keys/"
    assert k.host("h1").startswith(k.hosts_prefix())
    assert k.vni(1).startswith(k.vni_pool_prefix())
    assert k.job_owner("9").startswith(k.job_prefix("9"))
    assert k.job_host_setup("9", "h1").startswith(k.job_hosts_prefix("9"))
    for key in (k.cluster_spec("alice", "9"), k.vm("alice", "9", 0),
                k.cluster_key("alice", "9", "x")):
        assert key.startswith(k.cluster_prefix("alice", "9"))
        assert key.startswith(k.user_prefix("alice"))


def test_a_user_prefix_does_not_cover_a_longer_user_name() -> None:
    k = Keys()
    assert not k.cluster_spec("alice", "1").startswith(k.user_prefix("al"))
    assert not k.job_owner("12").startswith(k.job_prefix("1"))


def test_custom_prefix() -> None:
    k = Keys("/site/vc")
    assert k.host("n1") == "/site/vc/hosts/n1"
    assert k.user_prefix("bob") == "/site/vc/users/bob/"


@pytest.mark.parametrize("prefix", ["vcluster", "/vcluster/", ""])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(InputError, match="store prefix"):
        Keys(prefix)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../bob", "a b", "tab\tname",
                                  "-flag", "x" * 256, "new\nline"])
def test_names_that_could_escape_their_prefix_are_refused(name: str) -> None:
    k = Keys()
    with pytest.raises(InputError, match="cannot be part of a store key"):
        k.user_prefix(name)
    with pytest.raises(InputError, match="job id"):
        k.cluster_spec("alice", name)
    with pytest.raises(InputError, match="host name"):
        k.host(name)


def test_usual_names_are_accepted() -> None:
    k = Keys()
    assert k.host("node-01.cluster.example") == "/vcluster/hosts/node-01.cluster.example"
    assert k.job_prefix("1234_5") == "/vcluster/jobs/1234_5/"
    assert k.user_prefix("j.doe") == "/vcluster/users/j.doe/"


@pytest.mark.parametrize("vni", [0, -1, VNI_MAX + 1, True])
def test_vni_out_of_range_is_refused(vni: int) -> None:
    with pytest.raises(InputError, match="VXLAN id"):
        Keys().vni(vni)


def test_negative_vm_index_is_refused() -> None:
    with pytest.raises(InputError, match="VM index"):
        Keys().vm("alice", "1", -1)


def test_keys_read_back() -> None:
    k = Keys()
    assert k.vm_index(k.vm("alice", "3", 12), "alice", "3") == 12
    assert k.vni_of(k.vni(4096)) == 4096
    assert k.last_component(k.host("h7"), k.hosts_prefix()) == "h7"
    with pytest.raises(InputError, match="not directly under"):
        k.last_component(k.job_owner("1"), k.hosts_prefix())
    with pytest.raises(InputError, match="not directly under"):
        k.vm_index(k.cluster_spec("alice", "3"), "alice", "3")
    with pytest.raises(InputError, match="VM index"):
        k.vm_index(k.vms_prefix("alice", "3") + "x", "alice", "3")
