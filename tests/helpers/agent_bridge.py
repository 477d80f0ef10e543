"""Make a bridge the agent does not know of: ``agent_bridge.py NAME`` (root, in a namespace)."""

from __future__ import annotations

import sys

from pyroute2 import IPRoute

if __name__ == "__main__":
    with IPRoute() as ipr:
        ipr.link("add", ifname=sys.argv[1], kind="bridge")
