"""Private networks across hosts, without root: peers, addresses, the plan, the filter, release.

Agents of ``h1``, ``h2`` (and ``h3``) share one MemoryStore, each with its
own fake devices and firewall (tests/helpers/agent_fakes.py) and a fake
underlay ``eth0`` (``tunnel_hosts``).  The VXLAN ids are
tests/test_agent_tunnel_vnis.py's; the kernel's side (real VXLAN devices,
forwarding entries, nftables dropping packets) is
tests/test_agent_tunnel_netns.py's, as root.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers.agent_site import (
    ADDRESSES,
    AgentHost,
    job_on,
    me,
    take_vnis,
    tunnel_hosts,
    tunnel_site,
)
from vcluster.agent import firewall, netdev, tunnel, undo
from vcluster.agent.peer import JobInfo, Peer
from vcluster.agent.policy import Tunnel
from vcluster.agent.protocol import (
    AgentError,
    Code,
    NetworkSpec,
    VmResources,
)
from vcluster.agent.reconcile import Reconciler
from vcluster.agent.registration import Registration
from vcluster.agent.service import Agent
from vcluster.errors import TunnelError, VclusterError
from vcluster.store.records import HostRecord, HostSetup, SetupState, from_json, to_json


def build(host: AgentHost, info: JobInfo, vm: int, *networks: NetworkSpec) -> None:
    """vm-resources of ``vm`` on ``host``, the job's hosts from its NodeList."""
    request = VmResources(info.job, vm, tuple(networks))
    _answer, fds = host.jobs.vm_resources(request, info, os.getgid(), info.nodes.split(","))
    for fd in fds:
        os.close(fd)


def refusal(host: AgentHost, info: JobInfo, *networks: NetworkSpec) -> VclusterError:
    """What vm-resources of VM 0 raises: an AgentError (a refusal) or a TunnelError."""
    with pytest.raises(VclusterError) as caught:
        build(host, info, 0, *networks)
    assert isinstance(caught.value, AgentError | TunnelError)
    assert "\n" not in str(caught.value)
    return caught.value


def job_traces(host: AgentHost, job: str) -> list[str]:
    """The job's devices and nftables table on ``host``."""
    devices = host.devices.links_with_prefix(*netdev.job_prefixes(job))
    return devices + [t for t in host.firewall.tables() if t == firewall.table_name(job)]


# ------------------------------------------------------------------ the pure parts


def a_tunnel(interface: str | None = None, suffix: str | None = None) -> Tunnel:
    return Tunnel(name="cluster", mtu=1450, vni_range=(4096, 65535), vni_origin="n.yaml:5",
                  port=4789, interface=interface, interface_suffix=suffix, origin="n.yaml:1")


def record(host: str, address: str, **interfaces: str) -> HostRecord:
    return HostRecord(name=host, address=address, version="t", since=0.0,
                      interfaces=interfaces)


def test_flood_entries_go_to_every_other_host_once() -> None:
    addresses = {"h1": "10.0.0.1", "h2": "10.0.0.2", "h3": "10.0.0.3", "h1-alias": "10.0.0.1",
                 "h4": "10.0.0.2"}
    assert tunnel.peer_destinations("h1", addresses) == ("10.0.0.2", "10.0.0.3")
    assert tunnel.peer_destinations("h3", addresses) == ("10.0.0.1", "10.0.0.2")
    assert tunnel.peer_destinations("h1", {"h1": "10.0.0.1"}) == ()  # alone: floods nowhere


def test_tunnel_addresses_follow_the_networks_underlay() -> None:
    records = {"h1": record("h1", "192.168.0.1", ib0="10.9.0.1"),
               "h2": record("h2", "192.168.0.2", ib0="10.9.0.2"),
               "h3": record("h3", "h3.example")}
    names = {"h3.example": "192.168.0.3", "h1-data": "10.8.0.1", "h2-data": "10.8.0.2"}

    def local(name: str) -> list[str] | None:
        return {"ib0": ["10.9.0.1", "10.9.0.100"], "down0": []}.get(name)

    def addresses(t: Tunnel, on: tuple[str, ...] = ("h1", "h2")) -> dict[str, str]:
        return tunnel.tunnel_addresses(t, "h1", on, records, local, names.get)

    # Neither: every host's registered address (names resolved).
    assert addresses(a_tunnel(), ("h1", "h2", "h3")) == {
        "h1": "192.168.0.1", "h2": "192.168.0.2", "h3": "192.168.0.3"}
    # interface: this host's own address there; the others' as they registered it.
    assert addresses(a_tunnel("ib0"), ("h1", "h2", "h3")) == {
        "h1": "10.9.0.1", "h2": "10.9.0.2", "h3": "192.168.0.3"}
    # interface-suffix: what <host><suffix> resolves to, for every host.
    assert addresses(a_tunnel(suffix="-data")) == {"h1": "10.8.0.1", "h2": "10.8.0.2"}

    def refused(t: Tunnel, on: tuple[str, ...] = ("h1", "h2")) -> str:
        with pytest.raises(TunnelError) as caught:
            addresses(t, on)
        assert str(caught.value).startswith("h1: ")
        return str(caught.value)

    assert refused(a_tunnel("eth9")) == \
        "h1: interface eth9 of network 'cluster' (n.yaml:1) does not exist on h1"
    assert refused(a_tunnel("down0")).endswith("interface down0 of network 'cluster' "
                                               "(n.yaml:1) has no IPv4 address on h1")
    assert refused(a_tunnel(suffix="-data"), ("h1", "h3")) == (
        "h1: h3-data (host h3 + interface-suffix '-data' of network 'cluster' (n.yaml:1)) "
        "does not resolve to an IPv4 address; add it to the hosts' DNS or /etc/hosts")
    assert refused(a_tunnel(), ("h1", "h5")) == (
        "h1: host h5 of the job is not registered in the store, so network 'cluster' cannot "
        "reach it (is the vcluster agent running on h5?)")


def test_the_filter_is_one_nft_transaction_per_network() -> None:
    flt = firewall.SourceFilter(network="cluster", index=1, vni=4100, port=4789,
                                sources=("10.0.0.2", "10.0.0.1", "10.0.0.2"))
    table = {"family": "inet", "table": "vcluster_job_12"}
    assert firewall.filter_commands("12", flt) == {"nftables": [
        {"add": {"table": {"family": "inet", "name": "vcluster_job_12"}}},
        {"add": {"counter": {**table, "name": "dropped_n1"}}},
        {"add": {"chain": {**table, "name": "tunnel_n1", "type": "filter", "hook": "input",
                           "prio": 0, "policy": "accept"}}},
        {"flush": {"chain": {**table, "name": "tunnel_n1"}}},
        {"add": {"rule": {**table, "chain": "tunnel_n1", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": 4789}},
            # The VXLAN id: 24 bits, after 8 bytes of UDP and 4 of VXLAN flags.
            {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 96,
                                                         "len": 24}}, "right": 4100}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"set": ["10.0.0.1", "10.0.0.2"]}}},
            {"counter": "dropped_n1"},
            {"drop": None}],
            "comment": "vcluster job 12: VXLAN id 4100 of network cluster from the job's "
                       "hosts only"}}},
    ]}
    json.dumps(firewall.filter_commands("12", flt))  # what json_cmd sends
    assert firewall.removal_commands("vcluster_job_12") == {"nftables": [
        {"delete": {"table": {"family": "inet", "name": "vcluster_job_12"}}}]}
    assert firewall.job_of_table("vcluster_job_12") == "12"
    assert firewall.job_of_table("vcluster_job_") is None
    assert firewall.job_of_table("filter") is None
    with pytest.raises(ValueError):
        firewall.table_name("1; flush ruleset")


# ------------------------------------------------------------------ building


def test_each_host_joins_the_bridge_to_the_others(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path, ("h1", "h2", "h3"))
    info = job_on(all_hosts, "12", tasks=3)
    vni = take_vnis(all_hosts["h1"], "12", "cluster")["cluster"]
    for vm, host in enumerate(all_hosts.values()):
        build(host, info, vm, NetworkSpec("cluster", "private", vni=vni))
    for name, host in all_hosts.items():
        links = host.devices.links
        vx = links[netdev.vxlan_name("12", 0)]
        others = tuple(sorted(a for h, a in ADDRESSES.items() if h != name))
        assert (vx.kind, vx.master, vx.mtu) == ("vxlan", netdev.bridge_name("12", 0), 1450)
        assert vx.vxlan == netdev.Vxlan(vni=vni, local=ADDRESSES[name], port=4789, mtu=1450,
                                        peers=others)
        assert host.firewall.filters == {"vcluster_job_12": {0: firewall.SourceFilter(
            network="cluster", index=0, vni=vni, port=4789,
            sources=tuple(sorted(ADDRESSES.values())))}}
        # Recorded before made, in the order they are undone backwards.
        job_log = undo.load(host.layout, "12")
        assert job_log is not None
        assert [(str(e.kind), e.name, e.vni) for e in job_log.entries][:5] == [
            ("store", me(), None), ("bridge", netdev.bridge_name("12", 0), None),
            ("nft", "vcluster_job_12", None), ("vxlan", netdev.vxlan_name("12", 0), vni),
            ("tap", netdev.tap_name("12", list(all_hosts).index(name), 0), None)]
        (status,) = host.jobs.status()
        assert status.log is not None
        assert [(e.kind, e.network, e.vni) for e in status.log.entries if e.kind == "vxlan"] \
            == [("vxlan", "cluster", vni)]
        setup = host.store.get(host.keys.job_host_setup("12", name))
        assert setup is not None and from_json(HostSetup, setup.value).state is SetupState.READY
    # Asked again (another VM, a restarted agent): the same, nothing more.
    h1 = all_hosts["h1"]
    h1.restart()
    before = dict(h1.devices.links)
    build(h1, info, 1, NetworkSpec("cluster", "private", vni=vni))
    assert set(h1.devices.links) == set(before) | {netdev.tap_name("12", 1, 0)}
    # A second network gets its own device, chain and counter, on its own port; its
    # 9000-byte frames need jumbo frames under it.
    data = take_vnis(h1, "12", "data")["data"]
    with pytest.raises(TunnelError, match="h1: interface eth0 has MTU 1550, too small for "
                                          r"network 'data' \(MTU 9000 \+ 50 bytes"):
        build(h1, info, 0, NetworkSpec("data", "private", vni=data))
    h1.devices.links["eth0"].mtu = 9050
    build(h1, info, 0, NetworkSpec("cluster", "private", vni=vni),
          NetworkSpec("data", "private", vni=data))
    vx1 = h1.devices.links[netdev.vxlan_name("12", 1)].vxlan
    assert vx1 is not None and (vx1.vni, vx1.port, vx1.mtu) == (data, 4790, 9000)
    assert sorted(h1.firewall.filters["vcluster_job_12"]) == [0, 1]


def test_a_network_without_id_stays_on_its_host(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",)).values()
    info = h1.job("12", nodes="h1")
    build(h1, info, 0, NetworkSpec("cluster", "private"))
    assert job_traces(h1, "12") == [netdev.bridge_name("12", 0), netdev.tap_name("12", 0, 0)]


def test_an_id_that_is_not_the_jobs_is_refused(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    info = job_on(all_hosts, "12")
    h1 = all_hosts["h1"]
    theirs = take_vnis(h1, "13", "cluster")["cluster"]
    for vni in (theirs, 4242):
        error = refusal(h1, info, NetworkSpec("cluster", "private", vni=vni))
        assert isinstance(error, AgentError) and error.code is Code.DENIED
        assert f"network 'cluster': VXLAN id {vni} is not job 12's (the store gives the job " \
            "none for it); ask the agent for the job's ids (vnis)" == str(error)
    mine = take_vnis(h1, "12", "cluster")["cluster"]
    error = refusal(h1, info, NetworkSpec("cluster", "private", vni=theirs))
    assert f"(the store gives the job {mine} for it)" in str(error)
    # A forged job key without the pool entry naming the job is not enough either.
    h1.store.put(h1.keys.job_vni("12", "data"), str(5001))
    error = refusal(h1, info, NetworkSpec("data", "private", vni=5001))
    assert isinstance(error, AgentError) and error.code is Code.DENIED
    assert job_traces(h1, "12") == []


def setup_error(host: AgentHost, job: str) -> str | None:
    entry = host.store.get(host.keys.job_host_setup(job, host.node))
    assert entry is not None
    setup = from_json(HostSetup, entry.value)
    assert setup.state is SetupState.FAILED
    return setup.error


def test_an_underlay_too_small_is_refused_naming_host_interface_and_mtus(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path, underlay_mtu=1500, networks=tunnel_site(mtu=1500))
    info = job_on(all_hosts, "12")
    h2 = all_hosts["h2"]
    vni = take_vnis(h2, "12", "cluster")["cluster"]
    start = time.monotonic()
    error = refusal(h2, info, NetworkSpec("cluster", "private", vni=vni))
    message = ("h2: interface eth0 has MTU 1500, too small for network 'cluster' (MTU 1500 + "
               "50 bytes of VXLAN headers = 1550); lower the network's mtu or raise the "
               "interface's")
    assert str(error) == message and isinstance(error, TunnelError)
    assert setup_error(h2, "12") == message  # for the launcher, at once
    assert time.monotonic() - start < 1
    assert job_traces(h2, "12") == []  # nothing made for the refused request
    # 1450 (the default) fits: 1450 + 50 = 1500.
    ok = tunnel_hosts(tmp_path / "ok", underlay_mtu=1500)
    info = job_on(ok, "12")
    build(ok["h2"], info, 1, NetworkSpec("cluster", "private",
                                         vni=take_vnis(ok["h2"], "12", "cluster")["cluster"]))


def test_a_host_missing_from_the_registry_is_named(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path, ("h1", "h2", "h3"))
    h1 = all_hosts["h1"]
    h1.store.delete(h1.keys.host("h3"))
    info = job_on(all_hosts, "12")
    vni = take_vnis(h1, "12", "cluster")["cluster"]
    error = refusal(h1, info, NetworkSpec("cluster", "private", vni=vni))
    assert str(error) == ("h1: host h3 of the job is not registered in the store, so network "
                          "'cluster' cannot reach it (is the vcluster agent running on h3?)")
    assert setup_error(h1, "12") == str(error)
    # Nor may a host outside the job's node list build it.
    outsider = all_hosts["h3"]
    lone = JobInfo("12", info.uid, info.user, "RUNNING", "h1,h2", 2)
    with pytest.raises(TunnelError, match=r"^h3: is not one of the hosts SLURM gave job 12 "
                                          r"\(h1, h2\)"):
        build(outsider, lone, 0, NetworkSpec("cluster", "private", vni=vni))


def test_a_firewall_that_fails_is_the_hosts_failed_setup(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    info = job_on(all_hosts, "12")
    h1 = all_hosts["h1"]
    h1.firewall.broken = True
    vni = take_vnis(h1, "12", "cluster")["cluster"]
    error = refusal(h1, info, NetworkSpec("cluster", "private", vni=vni))
    assert str(error) == ("h1: cannot filter the tunnel of network 'cluster': nftables says: "
                          "Operation not permitted")
    assert setup_error(h1, "12") == str(error)
    # No tunnel without its filter: the VXLAN device was not made.
    assert netdev.vxlan_name("12", 0) not in h1.devices.links
    h1.firewall.broken = False
    h1.jobs.release("12", me())
    assert job_traces(h1, "12") == []


def test_release_removes_tunnel_filter_and_ids(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    info = job_on(all_hosts, "12")
    h1, h2 = all_hosts["h1"], all_hosts["h2"]
    h1.firewall.others.add("filter")  # the site's own table: never touched
    vni = take_vnis(h1, "12", "cluster")["cluster"]
    other = job_on(all_hosts, "13")
    other_vni = take_vnis(h1, "13", "cluster")["cluster"]
    for host in (h1, h2):
        build(host, info, 0, NetworkSpec("cluster", "private", vni=vni))
        build(host, other, 0, NetworkSpec("cluster", "private", vni=other_vni))
    released = h1.jobs.release("12", me())
    assert {f"vxlan {netdev.vxlan_name('12', 0)}", "nft table inet vcluster_job_12"} <= \
        set(released.removed)
    assert job_traces(h1, "12") == []
    # The ids went with the first epilog; the other job's stay, and so does its tunnel.
    assert h1.keys_under(h1.keys.job_vnis_prefix("12")) == []
    assert [e.key for e in h1.store.get_prefix(h1.keys.vni_pool_prefix())] == \
        [h1.keys.vni(other_vni)]
    assert h1.firewall.tables() == ["vcluster_job_13"] and "filter" in h1.firewall.others
    assert netdev.vxlan_name("13", 0) in h1.devices.links
    h2.jobs.release("12", me())  # the other host's epilog: idempotent on the keys
    assert job_traces(h2, "12") == []


def test_a_lost_log_still_releases_tunnel_and_table(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    info = job_on(all_hosts, "12")
    h1 = all_hosts["h1"]
    build(h1, info, 0, NetworkSpec("cluster", "private",
                                   vni=take_vnis(h1, "12", "cluster")["cluster"]))
    job_log = undo.load(h1.layout, "12")
    assert job_log is not None
    undo.remove(job_log)  # lost (or edited away)
    released = h1.jobs.release("12", me())
    assert released.removed == (f"stray device {netdev.tap_name('12', 0, 0)}",
                                f"stray device {netdev.vxlan_name('12', 0)}",
                                f"stray device {netdev.bridge_name('12', 0)}",
                                "stray nft table inet vcluster_job_12")
    assert job_traces(h1, "12") == []


def test_a_restarted_agent_keeps_a_running_jobs_tunnel(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    info = job_on(all_hosts, "12")
    h1 = all_hosts["h1"]
    build(h1, info, 0, NetworkSpec("cluster", "private",
                                   vni=take_vnis(h1, "12", "cluster")["cluster"]))
    before = job_traces(h1, "12")
    assert netdev.vxlan_name("12", 0) in before and "vcluster_job_12" in before
    reconciler = Reconciler(h1.restart(), h1.slurm)
    assert reconciler.run_once() == []
    assert job_traces(h1, "12") == before
    h1.slurm.end("12")
    assert reconciler.run_once() == ["12"]
    assert job_traces(h1, "12") == []
    assert h1.keys_under(h1.keys.job_prefix("12")) == []


def test_the_service_asks_slurm_for_the_jobs_hosts(tmp_path: Path) -> None:
    all_hosts = tunnel_hosts(tmp_path)
    h1 = all_hosts["h1"]
    info = job_on(all_hosts, "12")
    h1.slurm.pids[4242] = "12"
    agent = Agent(h1.jobs, h1.slurm, h1.jobs.link)
    peer = Peer(pid=4242, uid=os.getuid(), gid=os.getgid())
    vni = take_vnis(h1, "12", "cluster")["cluster"]
    _answer, fds = agent.handle(VmResources("12", 0, (NetworkSpec("cluster", "private",
                                                                  vni=vni),)), peer)
    for fd in fds:
        os.close(fd)
    vx = h1.devices.links[netdev.vxlan_name("12", 0)].vxlan
    assert vx is not None and vx.peers == (ADDRESSES["h2"],)
    assert info.nodes == "h1,h2"


def test_registration_names_the_underlay_interfaces_addresses(tmp_path: Path) -> None:
    networks = tunnel_site(underlay="  interface: ib0\n")
    (h1,) = tunnel_hosts(tmp_path, ("h1",), networks=networks, register=False).values()
    assert h1.policy.underlay_interfaces() == ["ib0"]
    h1.devices.add_interface("ib0", 2044, "10.9.0.1")
    registration = Registration(h1.jobs.link, "h1", interfaces=["ib0", "ib1"],
                                local_ipv4=h1.devices.interface_ipv4)
    assert registration._interface_addresses() == {"ib0": "10.9.0.1"}  # ib1: none here
    stored = record("h1", "10.199.0.11", ib0="10.9.0.1")
    assert from_json(HostRecord, to_json(stored)) == stored
    older = '{"name":"h1","address":"10.199.0.11","version":"0.1","since":1.0}'
    assert from_json(HostRecord, older).interfaces == {}  # written before the field
