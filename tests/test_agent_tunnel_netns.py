"""Private networks across hosts for real, as root: VXLAN, forwarding entries, nftables.

Each test makes its own network namespaces: two "hosts" (``h1``, ``h2``)
and an intruder (``x``), each with an ``eth0`` on a bridge in a fourth
namespace (MTU 1550 unless a test says otherwise), addresses in
10.66.0.0/24.  The agent's own code builds the job's network in each host
(tests/helpers/agent_tunnel.py, run inside the namespace with nsenter: real
``netdev.Netlink`` and ``firewall.Nftables``; every run is a new agent),
and the test checks with pyroute2 what the kernel holds, and sends packets
only between these namespaces.  Needs root and Python's nftables module
(Debian's python3-nftables): skipped without them by hand, a failure in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, require_root
from vcluster.agent import netdev

HELPER = ROOT / "tests" / "helpers" / "agent_tunnel.py"
ADDRESSES = {"h1": "10.66.0.1", "h2": "10.66.0.2", "x": "10.66.0.3"}
JOB, VNI, PORT = "4242", 7001, 4789
NETWORK = {"h1": ADDRESSES["h1"], "h2": ADDRESSES["h2"]}  # the job's hosts


def require_nftables() -> None:
    if importlib.util.find_spec("nftables") is None:
        why = ("Python's nftables module (python3-nftables) is not visible to "
               f"{sys.executable}")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@dataclass
class Machines:
    """The namespaces of one test, and the agents' state directories."""

    tag: str
    state: Path

    def netns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def run(self, name: str, step: dict[str, Any]) -> Any:
        """The helper, as a new agent inside machine ``name``; its JSON output."""
        proc = subprocess.run(self.argv(name, step), capture_output=True, text=True,
                              timeout=60, env=self.env(), check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def argv(self, name: str, step: dict[str, Any]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns(name)}", "--", sys.executable,
                str(HELPER), json.dumps(step)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT)}

    def build(self, name: str, vm: int, mtu: int = 1450) -> Any:
        return self.run(name, {"op": "build", "state": str(self.state / name), "node": name,
                               "hosts": NETWORK, "job": JOB, "vni": VNI, "mtu": mtu,
                               "vm": vm})

    def release(self, name: str) -> list[str]:
        removed: list[str] = self.run(name, {"op": "release", "state": str(self.state / name),
                                             "node": name, "job": JOB})
        return removed

    def send(self, name: str, to: str, vni: int, mac: str) -> None:
        self.run(name, {"op": "send", "to": to, "port": PORT, "vni": vni, "mac": mac})

    def dropped(self, name: str) -> int:
        count: int = self.run(name, {"op": "dropped", "job": JOB, "index": 0})
        return count

    def ipr(self, name: str) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.netns(name), flags=0)


def make_machines(tag: str, mtus: dict[str, int]) -> None:
    from pyroute2 import IPRoute, netns

    hub = f"{tag}-sw"
    netns.create(hub)
    with IPRoute(netns=hub, flags=0) as sw:
        sw.link("add", ifname="br", kind="bridge", mtu=1550)
        bridge = sw.link_lookup(ifname="br")[0]
        sw.link("set", index=bridge, state="up")
        for name, address in ADDRESSES.items():
            netns.create(f"{tag}-{name}")
            mtu = mtus.get(name, 1550)
            sw.link("add", ifname=f"p-{name}", kind="veth", mtu=mtu,
                    peer={"ifname": "eth0", "net_ns_fd": f"{tag}-{name}", "mtu": mtu})
            port = sw.link_lookup(ifname=f"p-{name}")[0]
            sw.link("set", index=port, master=bridge, state="up")
            with IPRoute(netns=f"{tag}-{name}", flags=0) as host:
                for ifname in ("lo", "eth0"):
                    host.link("set", index=host.link_lookup(ifname=ifname)[0], state="up")
                host.addr("add", index=host.link_lookup(ifname="eth0")[0], address=address,
                          prefixlen=24)


def remove_machines(tag: str) -> None:
    from pyroute2 import netns

    for name in ("sw", *ADDRESSES):
        if f"{tag}-{name}" in netns.listnetns():
            netns.remove(f"{tag}-{name}")  # and every device in it


@pytest.fixture
def machines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Machines]:
    require_root("makes network namespaces, VXLAN devices and nftables tables")
    require_nftables()
    tag = f"vctun{secrets.token_hex(3)}"
    mtus: dict[str, int] = getattr(request, "param", {})
    try:
        make_machines(tag, mtus)
        yield Machines(tag, tmp_path)
    finally:
        remove_machines(tag)


def vxlan_of(machines: Machines, name: str) -> dict[str, Any]:
    """The job's VXLAN device on ``name`` as the kernel has it."""
    device = netdev.vxlan_name(JOB, 0)
    with machines.ipr(name) as ipr:
        (index,) = ipr.link_lookup(ifname=device)
        link = ipr.get_links(index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA")
        master = ipr.get_links(link.get_attr("IFLA_MASTER"))[0].get_attr("IFLA_IFNAME")
        fdb = sorted((str(e.get_attr("NDA_LLADDR")), str(e.get_attr("NDA_DST")))
                     for e in ipr.fdb("dump", ifindex=index)
                     if e["ifindex"] == index and e.get_attr("NDA_DST"))
        return {"kind": info.get_attr("IFLA_INFO_KIND"), "id": data.get_attr("IFLA_VXLAN_ID"),
                "local": data.get_attr("IFLA_VXLAN_LOCAL"),
                "port": data.get_attr("IFLA_VXLAN_PORT"),
                "learning": data.get_attr("IFLA_VXLAN_LEARNING"),
                "mtu": link.get_attr("IFLA_MTU"), "up": bool(link["flags"] & 1),
                "master": master, "fdb": fdb, "index": index}


def job_links(machines: Machines, name: str) -> list[str]:
    with machines.ipr(name) as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(netdev.job_prefixes(JOB)))


def zero_entries(machines: Machines, name: str) -> list[str]:
    """Flood entries of any device on ``name`` (the job's are gone with its device)."""
    with machines.ipr(name) as ipr:
        return sorted(str(e.get_attr("NDA_DST")) for e in ipr.fdb("dump")
                      if e.get_attr("NDA_LLADDR") == netdev.FLOOD and e.get_attr("NDA_DST"))


def test_two_hosts_joined_by_a_filtered_tunnel(machines: Machines) -> None:
    assert machines.build("h1", 0)["taps"] == [netdev.tap_name(JOB, 0, 0)]
    assert machines.build("h2", 1)["taps"] == [netdev.tap_name(JOB, 1, 0)]
    bridge = netdev.bridge_name(JOB, 0)
    for name, other in (("h1", "h2"), ("h2", "h1")):
        vx = vxlan_of(machines, name)
        assert {k: vx[k] for k in ("kind", "id", "local", "port", "learning", "mtu", "up",
                                   "master")} == {
            "kind": "vxlan", "id": VNI, "local": ADDRESSES[name], "port": PORT,
            "learning": 1, "mtu": 1450, "up": True, "master": bridge}
        # Head-end replication: one all-zeros entry, towards the other host.
        assert [e for e in vx["fdb"] if e[0] == netdev.FLOOD] == \
            [(netdev.FLOOD, ADDRESSES[other])]
        assert job_links(machines, name) == sorted(
            [bridge, netdev.vxlan_name(JOB, 0), netdev.tap_name(JOB, int(name[1]) - 1, 0)])
        assert machines.run(name, {"op": "tables"}) == [f"vcluster_job_{JOB}"]

    # Frames cross: a datagram between addresses on the two hosts' bridges (ARP floods
    # over the tunnel first).
    for name, address in (("h1", "10.200.0.101"), ("h2", "10.200.0.102")):
        with machines.ipr(name) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=bridge)[0], address=address,
                     prefixlen=16)
    server = subprocess.Popen(machines.argv("h2", {"op": "echo-server",
                                                   "address": "10.200.0.102", "port": 9999}),
                              stdout=subprocess.PIPE, text=True, env=machines.env())
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        reply = machines.run("h1", {"op": "echo-client", "address": "10.200.0.102",
                                    "port": 9999})
        assert reply == "OVER THE TUNNEL"
    finally:
        server.wait(15)
        if server.stdout is not None:
            server.stdout.close()
    learned = [dst for mac, dst in vxlan_of(machines, "h1")["fdb"] if mac != netdev.FLOOD]
    assert ADDRESSES["h2"] in learned

    # The source filter: the job's id from a stranger is dropped (and counted), from the
    # peer accepted (the device learns the frame's source), another id left alone.
    assert machines.dropped("h1") == 0
    machines.send("x", ADDRESSES["h1"], VNI, "02:00:00:00:00:0c")
    machines.send("h2", ADDRESSES["h1"], VNI, "02:00:00:00:00:0b")
    machines.send("x", ADDRESSES["h1"], VNI + 1, "02:00:00:00:00:0d")
    assert machines.dropped("h1") == 1
    fdb = dict(vxlan_of(machines, "h1")["fdb"])
    assert fdb.get("02:00:00:00:00:0b") == ADDRESSES["h2"]
    assert "02:00:00:00:00:0c" not in fdb and "02:00:00:00:00:0d" not in fdb

    # A restarted agent asked again: the same device, entries, table and count.
    before = vxlan_of(machines, "h1")
    machines.build("h1", 0)
    after = vxlan_of(machines, "h1")
    assert after["index"] == before["index"]
    assert [e for e in after["fdb"] if e[0] == netdev.FLOOD] == \
        [(netdev.FLOOD, ADDRESSES["h2"])]
    assert machines.dropped("h1") == 1

    # Release: device, its entries and the table go; the other host keeps its own.
    removed = machines.release("h1")
    assert f"vxlan {netdev.vxlan_name(JOB, 0)}" in removed
    assert f"nft table inet vcluster_job_{JOB}" in removed
    assert job_links(machines, "h1") == [] and zero_entries(machines, "h1") == []
    assert machines.run("h1", {"op": "tables"}) == []
    assert vxlan_of(machines, "h2")["id"] == VNI
    assert machines.release("h2") != [] and machines.release("h2") == []
    assert job_links(machines, "h2") == [] and machines.run("h2", {"op": "tables"}) == []


@pytest.mark.parametrize("machines", [{"h2": 1500}], indirect=True)
def test_an_underlay_that_cannot_carry_the_mtu_is_refused(machines: Machines) -> None:
    refused = machines.build("h2", 1, mtu=1500)
    message = ("h2: interface eth0 has MTU 1500, too small for network 'cluster' (MTU 1500 + "
               "50 bytes of VXLAN headers = 1550); lower the network's mtu or raise the "
               "interface's")
    assert refused["error"] == message
    assert refused["setup"] == {"state": "failed", "error": message}
    assert job_links(machines, "h2") == [] and machines.run("h2", {"op": "tables"}) == []
    # The default MTU fits the same underlay, and h1's 1550 carries 1500.
    assert "taps" in machines.build("h2", 1)
    assert "taps" in machines.build("h1", 0, mtu=1500)
