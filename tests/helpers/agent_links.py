"""Print the network devices of this namespace as JSON: name -> kind, master, mtu, up, fdb.

``fdb``: the destinations of the device's forwarding entries that have one
(a VXLAN device's, towards other hosts); ``vni``: a VXLAN device's id.

Run as root in a sandbox host's namespace (``JobTool.links``).
"""

from __future__ import annotations

import json
from typing import Any

from pyroute2 import IPRoute


def links() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with IPRoute() as ipr:
        found = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in found}
        fdb: dict[int, list[str]] = {}
        for entry in ipr.fdb("dump"):
            if entry.get_attr("NDA_DST"):
                fdb.setdefault(entry["ifindex"], []).append(str(entry.get_attr("NDA_DST")))
        for link in found:
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            out[link.get_attr("IFLA_IFNAME")] = {
                "kind": kind,
                "master": names.get(link.get_attr("IFLA_MASTER")),
                "mtu": link.get_attr("IFLA_MTU"),
                "up": bool(link["flags"] & 1),
                "fdb": sorted(fdb.get(link["index"], [])),
                "vni": data.get_attr("IFLA_VXLAN_ID") if kind == "vxlan" and data else None,
            }
    return out


if __name__ == "__main__":
    print(json.dumps(links()))
