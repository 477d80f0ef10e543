"""Print the jobs' nftables tables of this namespace as JSON: ``["vcluster_job_12", ...]``.

Run as root in a sandbox host's namespace (``JobTool.job_tables``), with an
interpreter that sees Python's nftables module.  Imports nothing of vcluster
(it runs beside a partial copy of it), and needs no table to exist.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

PREFIX = "vcluster_job_"


def tables() -> list[str]:
    nft: Any = importlib.import_module("nftables").Nftables()
    nft.set_json_output(True)
    rc, output, error = nft.json_cmd({"nftables": [{"list": {"tables": {"family": "inet"}}}]})
    if rc != 0:
        raise SystemExit(f"nftables: {error}")
    items = output.get("nftables", []) if isinstance(output, dict) else []
    return sorted(str(i["table"]["name"]) for i in items
                  if "table" in i and str(i["table"].get("name", "")).startswith(PREFIX))


if __name__ == "__main__":
    print(json.dumps(tables()))
