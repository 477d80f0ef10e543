"""A job's NAT on this host, as nftables rules in the job's own table (pure builders).

One set of chains per nat network of the job (``n<index>``, index as in the
devices' names), in the job's table ``inet vcluster_job_<job>`` beside its
tunnel filters, so releasing the job (one ``delete table``) removes all of
it and nobody else's rules:

- ``nat_pre_n<i>`` (nat, prerouting) and ``nat_out_n<i>`` (nat, output): a
  TCP connection to one of this host's own addresses (``fib daddr type
  local``) on a VM's ssh port is sent to that VM's port 22 — from other
  hosts (prerouting) and from this host itself (output);
- ``nat_post_n<i>`` (nat, postrouting): the job's VMs' packets leaving by
  any other interface than their bridge are masqueraded behind the host;
- ``nat_fwd_n<i>`` (filter, forward): into the bridge only the forwarded ssh
  connections and replies to the VMs' own connections; out of it only the
  block's own source addresses, and nothing to the rest of the nat subnet
  (other jobs' VMs on this host);
- ``nat_in_n<i>`` (filter, input): from the VMs to the host only replies and
  ping of the gateway, so a VM reaches no service of its host.

Every chain's policy is accept: what is not the job's is left to the site's
own rules (and a drop anywhere is final).  Each change flushes the
network's chains and fills them again in one transaction, from the whole
list of the job's forwards on this host, so asking again gives the same
rules, never a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DSTNAT, SRCNAT, FILTER = -100, 100, 0
GUEST_SSH_PORT = 22


@dataclass(frozen=True)
class Forward:
    """Host port ``port`` to port 22 of VM ``vm`` at ``address``."""

    port: int
    vm: int
    address: str


@dataclass(frozen=True)
class NatRules:
    """What one nat network of a job needs on this host."""

    network: str
    index: int  # the job's index of the network (as in its devices' names)
    bridge: str
    block: str  # the job's block here, CIDR (10.250.0.16/28)
    gateway: str  # the bridge's address (the block's first)
    subnet: str  # the whole nat subnet, CIDR (other jobs' blocks are in it)
    forwards: tuple[Forward, ...]


def _match(op: str, left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _ip(field: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": field}}


def _prefix(cidr: str) -> dict[str, Any]:
    address, _, length = cidr.partition("/")
    return {"prefix": {"addr": address, "len": int(length)}}


def _ct(key: str) -> dict[str, Any]:
    return {"ct": {"key": key}}


def chains(index: int) -> dict[str, tuple[str, str, int]]:
    """The network's chains: name -> (type, hook, priority)."""
    return {
        f"nat_pre_n{index}": ("nat", "prerouting", DSTNAT),
        f"nat_out_n{index}": ("nat", "output", DSTNAT),
        f"nat_post_n{index}": ("nat", "postrouting", SRCNAT),
        f"nat_fwd_n{index}": ("filter", "forward", FILTER),
        f"nat_in_n{index}": ("filter", "input", FILTER),
    }


def forward_rule(fwd: Forward) -> list[dict[str, Any]]:
    """A connection to this host's port ``fwd.port`` goes to the VM's port 22."""
    return [
        _match("==", {"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
        _match("==", {"payload": {"protocol": "tcp", "field": "dport"}}, fwd.port),
        {"counter": None},
        {"dnat": {"family": "ip", "addr": fwd.address, "port": GUEST_SSH_PORT}},
    ]


def rules(nat: NatRules) -> dict[str, list[list[dict[str, Any]]]]:
    """Each chain's rules (lists of expressions), in order."""
    into = _match("==", _meta("oifname"), nat.bridge)
    out_of = _match("==", _meta("iifname"), nat.bridge)
    i = nat.index
    forwards = [forward_rule(f) for f in nat.forwards]
    return {
        f"nat_pre_n{i}": forwards,
        f"nat_out_n{i}": forwards,
        f"nat_post_n{i}": [[
            _match("==", _ip("saddr"), _prefix(nat.block)),
            _match("!=", _meta("oifname"), nat.bridge),
            {"masquerade": None},
        ]],
        f"nat_fwd_n{i}": [
            [into, _match("in", _ct("status"), "dnat"), {"accept": None}],
            [into, _match("in", _ct("state"), ["established", "related"]), {"accept": None}],
            [into, {"counter": None}, {"drop": None}],
            [out_of, _match("!=", _ip("saddr"), _prefix(nat.block)), {"counter": None},
             {"drop": None}],
            [out_of, _match("==", _ip("daddr"), _prefix(nat.subnet)), {"counter": None},
             {"drop": None}],
        ],
        f"nat_in_n{i}": [
            [out_of, _match("in", _ct("state"), ["established", "related"]), {"accept": None}],
            [out_of, _match("==", _ip("daddr"), nat.gateway),
             _match("==", {"payload": {"protocol": "icmp", "field": "type"}}, "echo-request"),
             {"accept": None}],
            [out_of, {"counter": None}, {"drop": None}],
        ],
    }


def nat_commands(family: str, table: str, job: str,
                 nat: NatRules) -> dict[str, list[dict[str, Any]]]:
    """One transaction making (or remaking) the NAT of one network of ``job`` in its table."""
    where = {"family": family, "table": table}
    out: list[dict[str, Any]] = [{"add": {"table": {"family": family, "name": table}}}]
    for name, (kind, hook, prio) in chains(nat.index).items():
        out.append({"add": {"chain": {**where, "name": name, "type": kind, "hook": hook,
                                      "prio": prio, "policy": "accept"}}})
        out.append({"flush": {"chain": {**where, "name": name}}})
    comment = f"vcluster job {job}: nat network {nat.network}"
    for name, chain_rules in rules(nat).items():
        for expr in chain_rules:
            out.append({"add": {"rule": {**where, "chain": name, "expr": expr,
                                         "comment": comment}}})
    return {"nftables": out}
