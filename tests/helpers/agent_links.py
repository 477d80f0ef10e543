"""Print the network devices of this namespace as JSON: name -> kind, master, mtu, up.

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
        for link in found:
            info = link.get_attr("IFLA_LINKINFO")
            out[link.get_attr("IFLA_IFNAME")] = {
                "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
                "master": names.get(link.get_attr("IFLA_MASTER")),
                "mtu": link.get_attr("IFLA_MTU"),
                "up": bool(link["flags"] & 1),
            }
    return out


if __name__ == "__main__":
    print(json.dumps(links()))
