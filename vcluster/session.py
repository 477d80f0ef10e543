"""The store as the calling user sees it: above both the store and the agent client.

The site's store password stays root's.  A caller who can read the password
file of batch.yaml (root: the agent, site tools) logs in with it; everyone
else asks the local agent for an etcd user confined to ``users/<user>/``.
The issued password is kept in memory only.  When the agent sends a CA
certificate that batch.yaml does not name (or the caller cannot read), it is
written to a private temporary file just long enough to connect.

Logging in costs etcd a password hash (bcrypt, most of 0.1 s on a small
host), spent in the server while the caller waits.  ``StoreOpening`` opens
the store in a thread, so that the launcher and the VM runner, which need it
only after their remaining imports and requests, log in meanwhile.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from vcluster.agent.client import AgentClient, AgentError
from vcluster.config.batch import BatchConfig
from vcluster.errors import StoreUnavailable
from vcluster.store import load_backend, open_store
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


class StoreOpening:
    """``open_user_store(batch)`` in a thread, started at once; ``result`` waits for it.

    The store's backend (gRPC and all) is imported before the thread starts,
    so the caller's own imports never race the thread's.  ``result`` returns
    the store, which the caller then closes, or raises what opening raised;
    ``close`` closes a store that nobody took.
    """

    def __init__(self, batch: BatchConfig) -> None:
        load_backend(batch.store)
        self._done = threading.Event()
        self._store: Store | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._open, args=(batch,),
                                        name="vcluster-store-opening", daemon=True)
        self._thread.start()

    def _open(self, batch: BatchConfig) -> None:
        try:
            self._store = open_user_store(batch)
        except BaseException as e:  # re-raised by result(), in the caller's thread
            self._error = e
        finally:
            self._done.set()

    def result(self) -> Store:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._store is not None
        self._taken = True
        return self._store

    def close(self) -> None:
        """Close the store if it was opened and not taken (waiting for the opening)."""
        self._done.wait()
        if self._store is not None and not self._taken:
            self._taken = True
            self._store.close()
