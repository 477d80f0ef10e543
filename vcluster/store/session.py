"""The store as the calling user sees it.

root (the agent, site tools, tests) logs in with batch.yaml's credentials.
Every other user asks the local agent for an etcd user confined to their own
prefix (``users/<user>/``), so the etcd root password never leaves root.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from vcluster.config.batch import BatchConfig
from vcluster.errors import StoreUnavailable
from vcluster.store import open_store
from vcluster.store.base import Store


def open_user_store(batch: BatchConfig) -> Store:
    """Open the store with the credentials that fit the caller."""
    if os.geteuid() == 0 and batch.store.user is not None:
        return open_store(batch.store)
    from vcluster.agent.client import AgentClient, AgentError, socket_path

    path = socket_path(batch.directories.run)
    try:
        creds = AgentClient(path).credentials()
    except AgentError as e:
        raise StoreUnavailable(f"cannot get store credentials from the vcluster agent at "
                               f"{path}: {e}") from e
    ca = creds.get("ca_cert")
    config = replace(
        batch.store,
        user=str(creds["user"]),
        password_file=None,
        endpoints=tuple(creds.get("endpoints") or batch.store.endpoints),
        ca_cert=Path(ca) if ca else batch.store.ca_cert,
    )
    return open_store(config, password=str(creds["password"]))
