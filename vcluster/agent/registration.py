"""The agent's store connection and its host registration (``hosts/<host>`` under a lease).

The store may be down when the agent starts or go away later: the connection
is opened on first use and again after a failure, and the registration
thread retries (logging each failure) until it holds a lease, then keeps the
lease alive and registers again if it is lost.  None of this stops the agent
from serving local requests.

The record says where other hosts reach this one: ``address``, its address
towards the store, and, for each underlay interface networks.yaml names
(``interface``), that interface's IPv4 address, so peers send a tunnel's
packets to the same address this host sends them from.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from vcluster import __version__
from vcluster.config.batch import StoreConfig
from vcluster.errors import StoreError, VclusterError
from vcluster.store import open_store
from vcluster.store.base import Lease, Store
from vcluster.store.keys import Keys
from vcluster.store.records import HostRecord, to_json

log = logging.getLogger(__name__)

LEASE_TTL = 30
RETRY = 5.0


class StoreLink:
    """One shared store connection, opened when first needed (``opener``: tests' stores)."""

    def __init__(self, config: StoreConfig,
                 opener: Callable[[StoreConfig], Store] = open_store) -> None:
        self.config = config
        self.keys = Keys(config.prefix)
        self._opener = opener
        self._store: Store | None = None
        self._lock = threading.Lock()

    def get(self) -> Store:
        """The open store, or a StoreError (StoreUnavailable...) if it cannot be reached."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = self._opener(self.config)
                except StoreError:
                    raise
                except VclusterError as e:  # a configuration problem
                    raise StoreError(str(e)) from e
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def underlay_address(config: StoreConfig) -> str:
    """This host's address towards the store: the one other hosts reach it by."""
    from pyroute2 import IPRoute

    for url in config.endpoints:
        host = urlsplit(url).hostname or ""
        try:
            target = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                target = str(socket.getaddrinfo(host, None)[0][4][0])
            except OSError:
                continue
        try:
            with IPRoute() as ipr:
                routes = ipr.route("get", dst=target)
            source = routes[0].get_attr("RTA_PREFSRC") if routes else None
        except Exception:
            source = None
        if source:
            return str(source)
    return socket.gethostname()


class Registration:
    """Keeps ``hosts/<host>`` in the store while the agent runs."""

    def __init__(self, link: StoreLink, host: str, retry: float = RETRY,
                 ttl: int = LEASE_TTL, interfaces: Sequence[str] = (),
                 local_ipv4: Callable[[str], list[str] | None] | None = None) -> None:
        self.link = link
        self.host = host
        self.interfaces = tuple(interfaces)
        self.local_ipv4 = local_ipv4
        self.retry = retry
        self.ttl = ttl
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lease: Lease | None = None
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _register(self) -> None:
        store = self.link.get()
        address = underlay_address(self.link.config)
        lease = store.grant(self.ttl)
        record = HostRecord(name=self.host, address=address, version=__version__,
                            since=time.time(), interfaces=self._interface_addresses())
        store.put(self.link.keys.host(self.host), to_json(record), lease=lease)
        self._lease = lease
        self._lost.clear()
        keeper = store.keep_alive_in_background(lease, on_lost=lambda _e: self._lost.set())
        self.registered.set()
        log.info("registered %s (%s) in the store, lease %x", self.host, address, lease.id)
        try:
            while not self._stop.is_set() and not self._lost.is_set():
                self._stop.wait(1.0)
        finally:
            keeper.stop()
        if self._lost.is_set():
            self.registered.clear()
            log.warning("the store lease of %s was lost; registering again", self.host)

    def _interface_addresses(self) -> dict[str, str]:
        """The first IPv4 address of each underlay interface here (those that have one)."""
        out: dict[str, str] = {}
        for name in self.interfaces:
            try:
                found = self.local_ipv4(name) if self.local_ipv4 is not None else None
            except VclusterError as e:
                log.warning("cannot read the address of interface %s: %s", name, e)
                continue
            if found:
                out[name] = found[0]
            else:
                log.warning("underlay interface %s (networks.yaml) has no IPv4 address on %s; "
                            "peers will use %s's registered address", name, self.host,
                            self.host)
        return out

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._register()
                failures = 0
            except StoreError as e:
                self.registered.clear()
                failures += 1
                if failures == 1 or failures % 12 == 0:
                    log.warning("cannot register %s in the store (attempt %d; retrying every "
                                "%g s): %s", self.host, failures, self.retry, e)
                self._stop.wait(self.retry)

    def stop(self) -> None:
        """Stop, and revoke the lease so the host leaves the registry at once."""
        self._stop.set()
        self._thread.join(timeout=10)
        if self._lease is not None:
            try:
                self.link.get().revoke(self._lease)
            except StoreError as e:
                log.warning("could not revoke the registration lease: %s", e)
