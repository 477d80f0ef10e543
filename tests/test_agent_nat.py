"""nat networks in the agent, without root: blocks, addresses, ssh ports, rules, release.

Agents of ``h1`` and ``h2`` share one MemoryStore, with fake devices and
firewall (tests/helpers/agent_fakes.py).  The kernel's side (the rules in a
real nftables, a guest reached through its forwarded port) is
tests/test_reach.py's, in the 3-host sandbox.
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from tests.helpers.agent_site import AgentHost, job_on, me, tunnel_hosts
from vcluster.agent import firewall, netdev
from vcluster.agent.natrules import Forward, NatRules, rules
from vcluster.agent.peer import JobInfo
from vcluster.agent.protocol import AgentError, NatLease, NetworkSpec, VmResources
from vcluster.errors import TunnelError, VclusterError
from vcluster.networks.nat import block_prefix
from vcluster.store.records import HostSetup, SetupState, from_json

NAT = NetworkSpec("nat", "nat")


def site(ports: str = "20000-20009", subnet: str = "10.250.0.0/24") -> str:
    return (f"nat:\n  type: nat\n  subnet: {subnet}\n  mtu: 1500\n  ssh-ports: {ports}\n"
            "cluster:\n  type: private\n  subnet: 10.200.0.0/16\n"
            "data:\n  type: private\n  subnet: 10.201.0.0/16\n")


def lease(host: AgentHost, info: JobInfo, vm: int) -> NatLease:
    answer, fds = host.jobs.vm_resources(VmResources(info.job, vm, (NAT,)), info, os.getgid(),
                                         info.nodes.split(","))
    for fd in fds:
        os.close(fd)
    got = answer.taps[0].nat
    assert got is not None
    return got


def refusal(host: AgentHost, info: JobInfo, vm: int = 0) -> VclusterError:
    with pytest.raises(VclusterError) as caught:
        lease(host, info, vm)
    assert isinstance(caught.value, AgentError | TunnelError)
    assert "\n" not in str(caught.value)
    return caught.value


def nat_rules(host: AgentHost, job: str) -> NatRules:
    return host.firewall.nats[firewall.table_name(job)][0]


def test_block_sizes_leave_room_for_the_gateway() -> None:
    assert [block_prefix(n) for n in (1, 2, 5, 6, 13, 14, 100)] == [30, 29, 29, 28, 28, 27, 25]


def test_a_jobs_vms_share_a_block_each_with_its_own_forwarded_port(tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1",), networks=site())  # type: ignore[arg-type]
    h1 = hosts["h1"]
    info = job_on(hosts, "40", tasks=3)
    first = [lease(h1, info, vm) for vm in range(3)]
    assert [x.address for x in first] == ["10.250.0.2/29", "10.250.0.3/29", "10.250.0.4/29"]
    assert {x.gateway for x in first} == {"10.250.0.1"}
    assert [(x.ssh_address, x.ssh_port) for x in first] == \
        [("10.199.0.11", 20000), ("10.199.0.11", 20001), ("10.199.0.11", 20002)]
    assert [lease(h1, info, vm) for vm in range(3)] == first  # asked again: the same
    bridge = netdev.bridge_name("40", 0)
    assert h1.devices.links[bridge].addresses == ("10.250.0.1",)
    rules_now = nat_rules(h1, "40")
    assert (rules_now.block, rules_now.gateway, rules_now.subnet) == \
        ("10.250.0.0/29", "10.250.0.1", "10.250.0.0/24")
    assert rules_now.forwards == (Forward(20000, 0, "10.250.0.2"), Forward(20001, 1, "10.250.0.3"),
                                  Forward(20002, 2, "10.250.0.4"))
    pools = h1.keys_under("/vcluster/pools/")
    assert sorted(pools) == ["/vcluster/pools/nat/nat/h1/10.250.0.0",
                             "/vcluster/pools/ssh-ports/h1/20000",
                             "/vcluster/pools/ssh-ports/h1/20001",
                             "/vcluster/pools/ssh-ports/h1/20002"]


def test_jobs_on_one_host_get_disjoint_blocks_and_ports_and_release_theirs(
        tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1",), networks=site())  # type: ignore[arg-type]
    h1 = hosts["h1"]
    small, big = job_on(hosts, "41", tasks=1), job_on(hosts, "42", tasks=10)
    a, b = lease(h1, small, 0), lease(h1, big, 9)
    block_a = ipaddress.IPv4Interface(a.address).network
    block_b = ipaddress.IPv4Interface(b.address).network
    assert (str(block_a), str(block_b)) == ("10.250.0.0/30", "10.250.0.16/28")
    assert not block_a.overlaps(block_b)
    assert b.address == "10.250.0.27/28" and b.ssh_port == 20001
    h1.jobs.release("41", me())
    assert firewall.table_name("41") not in h1.firewall.tables()
    assert not h1.devices.links_with_prefix(*netdev.job_prefixes("41"))
    left = h1.keys_under("/vcluster/pools/")
    assert sorted(left) == ["/vcluster/pools/nat/nat/h1/10.250.0.16",
                            "/vcluster/pools/ssh-ports/h1/20001"]
    again = job_on(hosts, "43", tasks=1)
    assert lease(h1, again, 0).address == "10.250.0.2/30"  # the freed block is given again


def test_an_exhausted_port_pool_is_one_line_naming_it(tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1",), networks=site(ports="20000-20001"))  # type: ignore[arg-type]
    h1 = hosts["h1"]
    info = job_on(hosts, "44", tasks=3)
    lease(h1, info, 0)
    lease(h1, info, 1)
    error = refusal(h1, info, 2)
    assert str(error) == (
        f"h1: network 'nat': no free port in ssh-ports 20000-20001 "
        f"({h1.policy.directory / 'networks.yaml'}:2) on h1 (held by job 44); try again when "
        "one ends, or widen the range")
    setup = h1.store.get(h1.keys.job_host_setup("44", "h1"))
    assert setup is not None
    assert from_json(HostSetup, setup.value) == HostSetup(SetupState.FAILED, error=str(error))


def test_an_exhausted_subnet_names_the_jobs_holding_it(tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1",),  # type: ignore[arg-type]
                         networks=site(subnet="10.250.0.0/29"))
    h1 = hosts["h1"]
    lease(h1, job_on(hosts, "45", tasks=5), 0)
    error = refusal(h1, job_on(hosts, "46", tasks=1))
    assert "h1: network 'nat': no free block of 10.250.0.0/29" in str(error)
    assert "on h1 for 1 VMs (held by job 45)" in str(error)


def test_a_host_that_does_not_forward_refuses_nat_networks(tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1",), networks=site())  # type: ignore[arg-type]
    h1 = hosts["h1"]
    h1.devices.forwarding = False
    error = refusal(h1, job_on(hosts, "47", tasks=1))
    assert str(error).startswith("h1: nat network 'nat' needs IPv4 forwarding, which is off")
    assert "sysctl -w net.ipv4.ip_forward=1" in str(error)
    assert not h1.keys_under("/vcluster/pools/")  # nothing taken


def test_hosts_give_blocks_of_their_own(tmp_path: object) -> None:
    hosts = tunnel_hosts(tmp_path, ("h1", "h2"), networks=site())  # type: ignore[arg-type]
    info = job_on(hosts, "48", tasks=2)
    one, two = lease(hosts["h1"], info, 0), lease(hosts["h2"], info, 1)
    assert (one.address, one.ssh_address) == ("10.250.0.2/29", "10.199.0.11")
    assert (two.address, two.ssh_address) == ("10.250.0.3/29", "10.199.0.12")
    assert two.ssh_port == 20000  # a port of h2's own


def test_the_rules_let_in_only_forwarded_ssh_and_replies() -> None:
    nat = NatRules(network="nat", index=2, bridge="vcbxn2", block="10.250.0.16/28",
                   gateway="10.250.0.17", subnet="10.250.0.0/16",
                   forwards=(Forward(20000, 0, "10.250.0.18"),))
    chains = rules(nat)
    assert set(chains) == {"nat_pre_n2", "nat_out_n2", "nat_post_n2", "nat_fwd_n2",
                           "nat_in_n2"}
    assert chains["nat_pre_n2"] == chains["nat_out_n2"]
    assert chains["nat_pre_n2"][0][-1] == {"dnat": {"family": "ip", "addr": "10.250.0.18",
                                                    "port": 22}}
    verdicts = [rule[-1] for rule in chains["nat_fwd_n2"]]
    assert verdicts == [{"accept": None}, {"accept": None}, {"drop": None}, {"drop": None},
                        {"drop": None}]
    assert chains["nat_in_n2"][-1][-1] == {"drop": None}
