"""A job's packet filter rules: an nftables table of its own, ``inet vcluster_job_<job>``.

It holds the source filter of the job's tunnels (below) and the NAT of its
nat networks (``natrules``).

VXLAN trusts any sender: a packet that reaches a host's VXLAN port with a
job's id lands on the job's private network.  So the hosts of a job accept
tunnel packets of the job's id only from the job's hosts: per job and host,
one table of vcluster's own, with one input chain per tunneled network
(``tunnel_n<index>``, index as in the devices' names) holding one rule,
which drops UDP to the network's port whose VXLAN id is the job's and whose
IPv4 source is none of the job's hosts' tunnel addresses, counting the drops
in a named counter (``dropped_n<index>``).  The VXLAN id is matched in the
raw payload: 24 bits at bit 96 of the transport header (8 bytes of UDP
header, then 4 bytes of VXLAN flags and reserved bits).  Packets reach the
input hook whole (IP reassembles before it), and the chain's policy is
accept, so everything else is left to the site's own rules; a drop in any
table is final, so a site's accept cannot undo this one.

Everything goes through nftables' JSON API (``Nftables.json_cmd``), one
transaction per change, built by the pure functions below; never command
strings.  The table is the job's alone: removing it (one ``delete table``)
cannot touch anyone else's rules.  Python's ``nftables`` module (Debian's
python3-nftables) is imported only when a filter is made, removed or read,
so an agent on a host without it starts and serves everything else; making
a filter there fails and says what to install.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vcluster.agent.natrules import NatRules, nat_commands
from vcluster.errors import ResourceError

FAMILY = "inet"
TABLE_PREFIX = "vcluster_job_"
PRIORITY = 0  # the filter hook's usual priority; a drop anywhere is final
VNI_OFFSET, VNI_BITS = 96, 24  # in the transport header: after UDP (64) and VXLAN flags (32)

Commands = dict[str, list[dict[str, Any]]]


def table_name(job: str) -> str:
    if not job.isdigit():
        raise ValueError(f"job {job!r} is not a SLURM job id")
    return f"{TABLE_PREFIX}{job}"


def job_of_table(name: str) -> str | None:
    """The job whose table ``name`` is, or None if it is not a job's table."""
    job = name.removeprefix(TABLE_PREFIX)
    return job if name.startswith(TABLE_PREFIX) and job.isdigit() else None


def chain_name(index: int) -> str:
    return f"tunnel_n{index}"


def counter_name(index: int) -> str:
    return f"dropped_n{index}"


@dataclass(frozen=True)
class SourceFilter:
    """Accept network ``index``'s VXLAN packets (``vni`` to ``port``) from ``sources`` only."""

    network: str
    index: int  # the job's index of the network (as in its devices' names)
    vni: int
    port: int
    sources: tuple[str, ...]  # IPv4 tunnel addresses of every host of the job


def _match(op: str, left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def filter_rule(flt: SourceFilter) -> list[dict[str, Any]]:
    """The rule's expressions: UDP to the port, the job's VXLAN id, a stranger's source."""
    return [
        _match("==", {"meta": {"key": "nfproto"}}, "ipv4"),
        _match("==", {"meta": {"key": "l4proto"}}, "udp"),
        _match("==", {"payload": {"protocol": "udp", "field": "dport"}}, flt.port),
        _match("==", {"payload": {"base": "th", "offset": VNI_OFFSET, "len": VNI_BITS}},
               flt.vni),
        _match("!=", {"payload": {"protocol": "ip", "field": "saddr"}},
               {"set": sorted(set(flt.sources))}),
        {"counter": counter_name(flt.index)},
        {"drop": None},
    ]


def filter_commands(job: str, flt: SourceFilter) -> Commands:
    """One transaction making (or remaking) the filter of one network of ``job``.

    ``add`` leaves an existing table, counter or chain as it is (the counter
    keeps its numbers); the chain is flushed and its one rule added again,
    so asking twice gives the same table, never a second rule.
    """
    table = table_name(job)
    where = {"family": FAMILY, "table": table}
    chain = chain_name(flt.index)
    return {"nftables": [
        {"add": {"table": {"family": FAMILY, "name": table}}},
        {"add": {"counter": {**where, "name": counter_name(flt.index)}}},
        {"add": {"chain": {**where, "name": chain, "type": "filter", "hook": "input",
                           "prio": PRIORITY, "policy": "accept"}}},
        {"flush": {"chain": {**where, "name": chain}}},
        {"add": {"rule": {**where, "chain": chain, "expr": filter_rule(flt),
                          "comment": f"vcluster job {job}: VXLAN id {flt.vni} of network "
                                     f"{flt.network} from the job's hosts only"}}},
    ]}


def removal_commands(table: str) -> Commands:
    return {"nftables": [{"delete": {"table": {"family": FAMILY, "name": table}}}]}


LIST_TABLES: Commands = {"nftables": [{"list": {"tables": {"family": FAMILY}}}]}


def counter_query(job: str, index: int) -> Commands:
    return {"nftables": [{"list": {"counter": {"family": FAMILY, "table": table_name(job),
                                                "name": counter_name(index)}}}]}


class Firewall(Protocol):
    """The host's packet filter, as the agent's job code uses it."""

    def ensure_filter(self, job: str, flt: SourceFilter) -> None:
        """Network ``flt.index`` of ``job`` accepts its tunnel packets from ``flt.sources``
        only (the job's table and the network's chain made if missing)."""

    def ensure_nat(self, job: str, nat: NatRules) -> None:
        """Nat network ``nat.index`` of ``job`` has exactly the rules of ``nat`` (the job's
        table and the network's chains made if missing; ``natrules``)."""

    def remove_table(self, name: str) -> bool:
        """Delete table ``inet name`` and all it holds; False if there was none."""

    def tables(self) -> list[str]:
        """The names of the inet tables here that are jobs' (``vcluster_job_*``), sorted."""


class Nftables:
    """The host's nftables, through libnftables' JSON API (``Firewall``)."""

    def __init__(self) -> None:
        self._nft: Any = None
        self._missing: ImportError | None = None
        self._lock = threading.Lock()  # one libnftables context, used by one thread at a time

    def _context(self) -> Any:
        """libnftables, or None when Python's nftables module is not installed."""
        if self._nft is None and self._missing is None:
            try:
                module: Any = importlib.import_module("nftables")
            except ImportError as e:
                self._missing = e
                return None
            nft = module.Nftables()
            nft.set_json_output(True)
            self._nft = nft
        return self._nft

    def _run(self, commands: Commands, what: str) -> Any:
        with self._lock:
            nft = self._context()
            if nft is None:
                raise ResourceError(
                    f"cannot {what}: Python's nftables module is missing (install Debian's "
                    "nftables and python3-nftables where the agent's Python sees them)")
            try:
                rc, output, error = nft.json_cmd(commands)
            except Exception as e:  # libnftables raises plain exceptions on bad input
                raise ResourceError(f"cannot {what}: nftables refused the request: {e}") from e
        if rc != 0:
            said = " ".join(str(error).split()) or f"status {rc}"
            raise ResourceError(f"cannot {what}: nftables says: {said}")
        return output

    def available(self) -> bool:
        """Whether Python's nftables module can be loaded here."""
        with self._lock:
            return self._context() is not None

    def ensure_filter(self, job: str, flt: SourceFilter) -> None:
        self._run(filter_commands(job, flt),
                  f"filter the tunnel of network {flt.network!r} (nftables table inet "
                  f"{table_name(job)})")

    def ensure_nat(self, job: str, nat: NatRules) -> None:
        self._run(nat_commands(FAMILY, table_name(job), job, nat),
                  f"set up the NAT of network {nat.network!r} (nftables table inet "
                  f"{table_name(job)})")

    def tables(self) -> list[str]:
        if not self.available():
            return []  # nothing can have been made through it here
        output = self._run(LIST_TABLES, "list the nftables tables")
        return sorted(_job_tables(output))

    def remove_table(self, name: str) -> bool:
        if job_of_table(name) is None:
            raise ResourceError(f"nftables table {name} is not a job's; not removing it")
        output = self._run(LIST_TABLES, "list the nftables tables")
        if name not in _job_tables(output):
            return False
        self._run(removal_commands(name), f"remove nftables table inet {name}")
        return True

    def dropped(self, job: str, index: int) -> int:
        """Packets the filter of network ``index`` of ``job`` dropped (its counter)."""
        output = self._run(counter_query(job, index), "read the tunnel filter's counter")
        for item in _items(output):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise ResourceError(f"no counter {counter_name(index)} in table inet {table_name(job)}")


def _items(output: Any) -> Sequence[dict[str, Any]]:
    items = output.get("nftables", []) if isinstance(output, dict) else []
    return [i for i in items if isinstance(i, dict)]


def _job_tables(output: Any) -> list[str]:
    names = [str(i["table"].get("name")) for i in _items(output)
             if "table" in i and i["table"].get("family") == FAMILY]
    return [n for n in names if job_of_table(n) is not None]
