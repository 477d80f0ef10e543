"""The agent's tunnel code inside a network namespace: ``agent_tunnel.py JSON`` (root).

tests/test_agent_tunnel_netns.py runs it with ``nsenter --net=...``, so the
agent's real device and firewall code (``netdev.Netlink``,
``firewall.Nftables``) works on the namespace as on a host.  Each run is a
new agent: the job's undo log lives in ``state`` across runs, the store is a
MemoryStore made for the run (the hosts' registrations and the job's VXLAN
id, taken from a range of one).  JSON is one step:

- ``{"op": "build", "state", "node", "hosts": {name: address}, "job", "vni",
  "mtu", "vm"}``: vm-resources of VM ``vm`` with network ``cluster`` of that
  MTU and VXLAN id; prints ``{"taps": [...]}`` or ``{"error", "setup"}``;
- ``{"op": "release", "state", "node", "job"}``: prints what was removed;
- ``{"op": "send", "to", "port", "vni", "mac"}``: one VXLAN packet carrying a
  broadcast frame from ``mac``;
- ``{"op": "echo-server", "address", "port"}``, ``{"op": "echo-client",
  "address", "port"}``: one UDP datagram there and back (prints the reply);
- ``{"op": "dropped", "job", "index"}``: the job's filter's drop counter;
  ``{"op": "tables"}``: the jobs' nftables tables here.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from vcluster.agent import firewall, vnis
from vcluster.agent.jobs import Jobs, Settings
from vcluster.agent.netdev import Netlink
from vcluster.agent.peer import JobInfo
from vcluster.agent.policy import load_policy
from vcluster.agent.protocol import AgentError, NetworkSpec, VmResources
from vcluster.agent.registration import StoreLink
from vcluster.config.batch import StoreConfig
from vcluster.errors import VclusterError
from vcluster.hostpaths import HostLayout
from vcluster.store.base import Store
from vcluster.store.memory import MemoryStore
from vcluster.store.records import HostRecord, to_json


def agent(step: dict[str, Any], store: Store) -> Jobs:
    state = Path(step["state"])
    conf = state / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    vni = step.get("vni", 4096)
    (conf / "networks.yaml").write_text(
        f"cluster:\n  type: private\n  subnet: 10.200.0.0/16\n  mtu: {step.get('mtu', 1450)}\n"
        f"  vni-range: {vni}-{vni}\n")
    link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",)), opener=lambda _c: store)
    layout = HostLayout(state=state / "state", run=state / "run")
    return Jobs(Settings(node=step["node"], layout=layout), link, load_policy(conf),
                Netlink(), firewall.Nftables())


def build(step: dict[str, Any]) -> dict[str, Any]:
    store = MemoryStore()
    jobs = agent(step, store)
    keys = jobs.link.keys
    hosts: dict[str, str] = step["hosts"]
    for name, address in hosts.items():
        store.put(keys.host(name), to_json(HostRecord(name=name, address=address,
                                                      version="test", since=0.0)))
    job = step["job"]
    vni = vnis.take_all(store, keys, jobs.policy, job, "root", ["cluster"])["cluster"]
    info = JobInfo(job=job, uid=0, user="root", state="RUNNING", nodes=",".join(hosts),
                   tasks=8)
    request = VmResources(job, step["vm"], (NetworkSpec("cluster", "private", vni=vni),))
    try:
        answer, fds = jobs.vm_resources(request, info, 0, list(hosts))
    except (AgentError, VclusterError) as e:
        setup = store.get(keys.job_host_setup(job, step["node"]))
        return {"error": str(e), "setup": None if setup is None else json.loads(setup.value)}
    for fd in fds:
        os.close(fd)
    return {"taps": [t.ifname for t in answer.taps], "vni": vni}


def send(step: dict[str, Any]) -> None:
    header = struct.pack("!B3xI", 0x08, step["vni"] << 8)  # flags: a valid VNI; then VNI << 8
    frame = b"\xff" * 6 + bytes.fromhex(step["mac"].replace(":", "")) + b"\x08\x06" + bytes(46)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(header + frame, (step["to"], step["port"]))


def echo(step: dict[str, Any], serve: bool) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10 if serve else 0.5)
        if serve:
            sock.bind((step["address"], step["port"]))
            print(json.dumps("listening"), flush=True)
            data, peer = sock.recvfrom(100)
            sock.sendto(data.upper(), peer)
            return data.decode()
        for _ in range(20):  # the first datagrams may wait for ARP over the tunnel
            sock.sendto(b"over the tunnel", (step["address"], step["port"]))
            try:
                return sock.recvfrom(100)[0].decode()
            except TimeoutError:
                continue
        return "no answer"


def main(step: dict[str, Any]) -> Any:
    op = step["op"]
    if op == "build":
        return build(step)
    if op == "release":
        return list(agent(step, MemoryStore()).release(step["job"]).removed)
    if op == "send":
        send(step)
        return "sent"
    if op in ("echo-server", "echo-client"):
        return echo(step, op == "echo-server")
    if op == "dropped":
        return firewall.Nftables().dropped(step["job"], step["index"])
    if op == "tables":
        return firewall.Nftables().tables()
    raise SystemExit(f"agent_tunnel.py: unknown op {op!r}")


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
