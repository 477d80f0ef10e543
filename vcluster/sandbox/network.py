"""The sandbox's machines: network namespaces joined by a bridge, and hostnames.

The controller's network namespace holds a bridge with the controller's
address; each host is a network namespace with one veth to that bridge, and
forwards IPv4 (as a site's hosts must, for nat networks).  Each
machine also gets a UTS namespace (its hostname), kept alive by a bind mount
so that every daemon and command entering the machine sees the same name.
Nothing touches the machine's own network namespace.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from vcluster.errors import SandboxError, VclusterError
from vcluster.run import run
from vcluster.sandbox.state import PREFIXLEN, Host, SandboxState


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def enter(host: Host) -> list[str]:
    """The argv prefix that runs a command on ``host`` (its network and hostname)."""
    return ["nsenter", f"--net={netns_path(host.netns)}", f"--uts={host.uts}", "--"]


def create_machine(state: SandboxState, host: Host) -> None:
    """Create ``host``'s network and UTS namespaces, recording each in the state at once."""
    from pyroute2 import netns

    if host.netns in netns.listnetns():
        raise SandboxError(f"network namespace {host.netns} exists already (another sandbox "
                           "with the same id?); try again")
    netns.create(host.netns)
    state.netns.append(host.netns)
    state.save()

    Path(host.uts).touch()
    state.mounts.append(host.uts)
    state.save()
    run(["unshare", f"--uts={host.uts}", "hostname", host.name])


def _up(ipr: Any, ifname: str) -> int:
    """Bring ``ifname`` up; its index (pyroute2's IPRoute is untyped)."""
    index: int = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=index, state="up")
    return index


# The hosts' links carry the clusters' VXLAN tunnels: 50 bytes of headers over
# a VM's 1500-byte frame (or its network's smaller MTU) must fit.
UNDERLAY_MTU = 1550


def wire(state: SandboxState) -> None:
    """Bridge in the controller, one veth per host, addresses, links up."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ctl = state.controller
    assert ctl is not None
    state.bridge = f"{state.tag}-br"
    try:
        with IPRoute(netns=ctl.netns, flags=0) as ipr:
            _up(ipr, "lo")
            ipr.link("add", ifname=state.bridge, kind="bridge", mtu=UNDERLAY_MTU)
            bridge = _up(ipr, state.bridge)
            ipr.addr("add", index=bridge, address=ctl.address, prefixlen=PREFIXLEN)
            for host in state.hosts:
                port = f"{state.tag}-{host.name}"
                ipr.link("add", ifname=port, kind="veth", mtu=UNDERLAY_MTU,
                         peer={"ifname": host_ifname(state), "net_ns_fd": host.netns,
                               "mtu": UNDERLAY_MTU})
                index = ipr.link_lookup(ifname=port)[0]
                ipr.link("set", index=index, master=bridge, state="up")
        for host in state.hosts:
            with IPRoute(netns=host.netns, flags=0) as ipr:
                _up(ipr, "lo")
                index = _up(ipr, host_ifname(state))
                ipr.addr("add", index=index, address=host.address, prefixlen=PREFIXLEN)
            # nat networks route their VMs' packets through the host (a per-namespace setting)
            run(["nsenter", f"--net={netns_path(host.netns)}", "--", "sh", "-c",
                 "echo 1 > /proc/sys/net/ipv4/ip_forward"])
    except (OSError, NetlinkError) as e:
        raise SandboxError(f"cannot set up the sandbox network: {e}") from e


def host_ifname(state: SandboxState) -> str:
    """The host side of each host's veth (each in its own namespace, so one name)."""
    return f"{state.tag}-eth"


def _mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def remove_machines(state: SandboxState) -> list[str]:
    """Unmount the hostnames and delete the network namespaces; returns problems."""
    from pyroute2 import netns

    problems: list[str] = []
    for path in list(state.mounts):
        try:
            while _mounted(path):
                run(["umount", path])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            state.mounts.remove(path)
        except OSError as e:
            problems.append(f"{path}: {e.strerror}")
        except VclusterError as e:  # umount failed
            problems.append(str(e))
    existing = set(netns.listnetns())
    for name in list(state.netns):
        try:
            if name in existing:
                netns.remove(name)
            state.netns.remove(name)
        except OSError as e:
            problems.append(f"network namespace {name}: {e}")
    return problems
