"""The store as the calling user sees it: above both the store and the agent client.

The site's store password stays root's.  A caller who can read the password
file of batch.yaml (root: the agent, site tools) logs in with it; everyone
else asks the local agent for an etcd user confined to ``users/<user>/``.
The issued password is kept in memory only.  When the agent sends a CA
certificate that batch.yaml does not name (or the caller cannot read), it is
written to a private temporary file just long enough to connect.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from vcluster.agent.client import AgentClient, AgentError
from vcluster.config.batch import BatchConfig
from vcluster.errors import StoreUnavailable
from vcluster.store import open_store
from vcluster.store.base import Store


def _readable(path: Path | None) -> bool:
    return path is not None and os.access(path, os.R_OK)


def open_user_store(batch: BatchConfig) -> Store:
    """Open the store with the credentials that fit the caller."""
    config = batch.store
    if config.user is None or _readable(config.password_file):
        return open_store(config)
    path = batch.directories.layout.agent_socket
    try:
        answer = AgentClient(path).credentials()
    except AgentError as e:
        raise StoreUnavailable(f"cannot get store credentials from the vcluster agent at "
                               f"{path}: {e}") from e
    issued = replace(config, user=answer.user, password_file=None,
                     endpoints=answer.endpoints or config.endpoints)
    if not answer.ca_cert or _readable(config.ca_cert):
        return open_store(issued, password=answer.password)
    with tempfile.TemporaryDirectory(prefix="vcluster-ca-") as tmp:
        ca = Path(tmp) / "etcd-ca.pem"
        ca.write_text(answer.ca_cert)
        return open_store(replace(issued, ca_cert=ca), password=answer.password)
