"""The state store: where clusters, VMs, hosts and pools are recorded.

``open_store(config)`` returns the Store for ``store:`` in batch.yaml; the
backend (and its gRPC stack) is imported only when a store is opened, so
commands that never touch the store stay fast.  ``sqlite`` is the embedded store of one
machine (a database file of the user's).  ``MemoryStore`` is the same
interface with etcd's semantics in this process's memory, standard library
only (tests construct it directly).  The interface and its types are in
``vcluster.store.base``, the key layout in ``vcluster.store.keys`` and the
stored records in ``vcluster.store.records``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vcluster.config.batch import StoreConfig
from vcluster.errors import ConfigError
from vcluster.store.base import Store

if TYPE_CHECKING:
    from vcluster.store.memory import MemoryStore


def __getattr__(name: str) -> Any:
    """``MemoryStore`` on first use (tests and fakes: no command needs it)."""
    if name == "MemoryStore":
        from vcluster.store.memory import MemoryStore

        return MemoryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_backend(config: StoreConfig) -> None:
    """Import the configured backend now (``open_store`` would import it when it opens)."""
    if config.backend == "etcd":
        import vcluster.store.etcd  # noqa: F401


def open_store(config: StoreConfig, password: str | None = None) -> Store:
    """Connect to the configured store (logging in if credentials are set).

    ``password`` overrides ``store.password-file`` (credentials handed out by
    the agent are never written to disk).
    """
    if config.backend == "etcd":
        from vcluster.store.etcd import EtcdStore

        return EtcdStore(config, password)
    if config.backend == "sqlite":
        from vcluster.store.sqlite import SqliteStore

        return SqliteStore(config.database(), timeout=config.timeout)
    raise ConfigError(None, "store.backend", f"{config.backend!r} is not available",
                      "etcd or sqlite")


__all__ = ["MemoryStore", "Store", "load_backend", "open_store"]
