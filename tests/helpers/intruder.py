"""Another user's attempts on a running cluster; prints what each attempt got, as JSON.

``intruder.py JOB OWNER WORKDIR FAMFILE``: connects to the owner's console and
QMP sockets, opens the FAM region, reads the owner's cluster key in the store,
and asks the agent for the job's devices.  Run as a user who is not OWNER.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from vcluster.agent.client import AgentClient, AgentError
from vcluster.config.loader import load_config
from vcluster.errors import StorePermissionDenied
from vcluster.session import open_user_store
from vcluster.store.keys import Keys


def main(job: str, owner: str, work: str, fam: str) -> None:
    results: dict[str, str] = {}
    for name in ("console.sock", "qmp.sock"):
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(os.path.join(work, "vm0", name))
                results[name] = "connected"
            except OSError as e:
                results[name] = str(e.strerror)
    try:
        open(fam, "rb").close()
        results["fam"] = "opened"
    except OSError as e:
        results["fam"] = str(e.strerror)
    config = load_config()
    store = open_user_store(config.batch)
    try:
        store.get(Keys(config.batch.store.prefix).cluster_key(owner, job, "id_ed25519"))
        results["keys"] = "read"
    except StorePermissionDenied as e:
        results["keys"] = f"denied: {e}"
    finally:
        store.close()
    try:
        AgentClient(config.batch.directories.layout.agent_socket).vm_resources(job, 0, [], None)
        results["agent"] = "granted"
    except AgentError as e:
        results["agent"] = f"{e.code}: {e}"
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:5])
