"""Use the sandbox's etcd through this machine's own batch.yaml (``$VCLUSTER_CONF``).

``put``: write this host's name under a test key and print what is read back;
``get``: print that key and delete it.  Run on a sandbox machine, as root.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from vcluster.config.batch import parse_batch
from vcluster.schema.source import load_yaml
from vcluster.store.etcd import EtcdStore

KEY = "/vcluster/sandbox-test/writer"


def main(action: str) -> int:
    path = Path(os.environ["VCLUSTER_CONF"]) / "batch.yaml"
    store = EtcdStore(parse_batch(load_yaml(path), path).store)
    try:
        if action == "put":
            store.put(KEY, socket.gethostname())
        entry = store.get(KEY)
        print(entry.value if entry is not None else "(missing)")
        if action == "get":
            store.delete(KEY)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
