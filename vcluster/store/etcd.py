"""The etcd v3 store, on etcd-sdk-python (``pyetcd``, python-etcd3's maintained fork).

What this adds to the client library, and why:

- Authentication sends the token as plain gRPC metadata, never as call
  credentials: grpcio refuses call credentials on a plain-text channel, and
  metadata works the same over TLS.  etcd's simple tokens expire after
  ``--auth-token-ttl`` seconds idle and the library never logs in again, so a
  call refused with "invalid auth token" logs in again once and is retried.
- Every request has a deadline (``store.timeout``); an unreachable endpoint is
  a StoreUnavailable naming it, never a hang.  With several endpoints a call
  that cannot reach one tries the next, unless the timeout has already passed
  (a refused connection fails at once, a silent endpoint costs the timeout).
- gRPC errors become StoreUnavailable / StorePermissionDenied / LeaseExpired /
  StoreError messages that name the endpoint, the key and what to check.
- Watches use one gRPC stream each (pyetcd's shared watcher cannot end a
  stream, and takes a watch the server refused for a created one): the
  stream is cancelled with the watch, and a refusal is reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

# gRPC's C core prints its own view of every failure to stderr; ours is the
# StoreError.  Set GRPC_VERBOSITY yourself to see its logs.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exceptions
from pyetcd import transactions as etcd_txn
from pyetcd.utils import prefix_range_end

from vcluster.config.batch import StoreConfig
from vcluster.errors import ConfigError, StoreError, StorePermissionDenied, StoreUnavailable
from vcluster.store.base import (
    Compare,
    Delete,
    Entry,
    EventType,
    Get,
    Lease,
    LeaseExpired,
    Op,
    Put,
    Snapshot,
    Store,
    StoreClosed,
    TxnResult,
    Watch,
    WatchEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Prefer healthy endpoints for this long after one failed (they are still
# tried when every endpoint has failed recently).
_ENDPOINT_RETRY = 30.0
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # notice a dead server under a quiet watch
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 300),
    ("grpc.max_reconnect_backoff_ms", 2_000),  # back quickly after an etcd restart
]
_COMPARE_OPS = {
    "==": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}
_COMPARE_TARGETS = {
    "value": etcd_txn.Value,
    "version": etcd_txn.Version,
    "create": etcd_txn.Create,
    "mod": etcd_txn.Mod,
}
_GRPC_NOISE = re.compile(r"^failed to connect to all addresses; last error: \w+: (ipv[46]:\S+: )?")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_STREAM_LOST = (*_UNREACHABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.CANCELLED)


def _read_file(path: Any, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(None, key, f"cannot read {path}: {e.strerror}") from e


def _rpc_error(exc: BaseException) -> Any:
    """The grpc error behind ``exc`` (pyetcd wraps some codes in its own classes)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.RpcError) and hasattr(seen, "code"):
            return seen
        seen = seen.__context__
    return None


def _entry(kv: Any) -> Entry:
    return Entry(
        key=bytes(kv.key).decode(),
        value=bytes(kv.value).decode(),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


class EtcdStore(Store):
    """A Store on an etcd v3 cluster, configured by ``store:`` in batch.yaml."""

    def __init__(self, config: StoreConfig, password: str | None = None) -> None:
        self.config = config
        self._password: str | None = password
        if config.user is not None and password is None:
            self._password = config.password()
            if self._password is None:
                raise ConfigError(None, "store.password-file",
                                  f"store.user is {config.user!r} but no password file is set",
                                  "the path of a file holding that user's password")
        self._urls: dict[str, str] = {}
        endpoints = [self._endpoint(url) for url in config.endpoints]
        self._client: Any = pyetcd.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=config.timeout, failover=True)
        self._auth_lock = threading.Lock()
        self._token_generation = 0
        self._watches: set[_EtcdWatch] = set()
        self._watches_lock = threading.Lock()
        self._closed = False
        if config.user is not None:
            try:
                self._authenticate()
            except BaseException:
                self._client.close()
                raise

    # ------------------------------------------------------------ connection

    def _credentials(self) -> Any:
        cfg = self.config
        root = _read_file(cfg.ca_cert, "store.ca-cert") if cfg.ca_cert else None
        key = _read_file(cfg.key, "store.key") if cfg.key else None
        cert = _read_file(cfg.cert, "store.cert") if cfg.cert else None
        return grpc.ssl_channel_credentials(root, key, cert)

    def _endpoint(self, url: str) -> Any:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(None, "store.endpoints", f"{url!r} is not an etcd URL",
                              "http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port or 2379
        except ValueError as e:
            raise ConfigError(None, "store.endpoints", f"{url!r}: {e}",
                              "http://HOST:PORT or https://HOST:PORT") from e
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        secure = parts.scheme == "https"
        if not secure and (self.config.ca_cert or self.config.cert):
            raise ConfigError(None, "store.endpoints",
                              f"{url!r} is plain http but TLS files are configured",
                              "https:// endpoints when ca-cert/cert/key are set")
        endpoint = pyetcd.Endpoint(host, port, secure=secure,
                                   creds=self._credentials() if secure else None,
                                   time_retry=_ENDPOINT_RETRY, opts=_GRPC_OPTIONS)
        self._urls[endpoint.netloc] = f"{parts.scheme}://{host}:{port}"
        return endpoint

    def _current_url(self) -> str:
        netloc: str = self._client.endpoint_in_use.netloc
        return self._urls.get(netloc, netloc)

    def _reset_endpoints(self) -> None:
        for endpoint in self._client.endpoints.values():
            endpoint.last_failed = 0

    def _who(self) -> str:
        return f"user {self.config.user!r}" if self.config.user else "an anonymous client"

    def _authenticate(self) -> None:
        request = etcdrpc.AuthenticateRequest(name=self.config.user, password=self._password)
        try:
            reply = self._call("log in as", self.config.user or "", lambda: self._client.authstub
                               .Authenticate(request, self.config.timeout), logging_in=True)
        except _AuthNotEnabled:
            log.warning("etcd at %s has authentication disabled; store.user is ignored",
                        self._current_url())
            self._client.metadata = None
        else:
            self._client.metadata = (("token", reply.token),)
        self._token_generation += 1

    def _log_in_again(self, generation: int) -> None:
        with self._auth_lock:
            if generation != self._token_generation:
                return  # another thread already did
            log.info("etcd at %s: auth token expired, logging in again as %s",
                     self._current_url(), self.config.user)
            self._authenticate()

    # ------------------------------------------------------------ error handling

    def _call(self, what: str, key: str, fn: Callable[[], T], *, logging_in: bool = False) -> T:
        """Run one request with re-login, endpoint failover and error mapping."""
        if self._closed:
            raise StoreClosed(f"the store connection is closed (cannot {what} {key!r})")
        start = time.monotonic()
        tried: list[str] = []
        reason = ""
        logged_in_again = False
        while True:
            generation = self._token_generation
            try:
                _ = self._client.channel  # picks an endpoint that has not failed
            except etcd_exceptions.NoServerAvailableError:
                if tried:
                    raise self._unreachable(tried, reason) from None
                self._reset_endpoints()  # all failed a while ago: try them again
                continue
            url = self._current_url()
            if url in tried:
                raise self._unreachable(tried, reason)
            try:
                return fn()
            except (grpc.RpcError, etcd_exceptions.Etcd3Exception) as e:
                rpc = _rpc_error(e)
                if rpc is None:
                    raise StoreError(f"etcd at {url}: cannot {what} {key!r}: {e}") from e
                code, details = rpc.code(), str(rpc.details() or "")
                if (not logging_in and not logged_in_again and self.config.user is not None
                        and _token_refused(code, details)):
                    logged_in_again = True
                    self._log_in_again(generation)
                    continue
                if code not in _UNREACHABLE:
                    raise self._refusal(what, key, url, code, details, logging_in) from e
                self._client.endpoint_in_use.fail()  # the next attempt fails over
                tried.append(url)
                reason = self._reason(code, details)
                if time.monotonic() - start >= self.config.timeout:
                    raise self._unreachable(tried, reason) from e

    def _reason(self, code: Any, details: str) -> str:
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {self.config.timeout:g} s"
        return _GRPC_NOISE.sub("", details)

    def _unreachable(self, tried: list[str], reason: str) -> StoreUnavailable:
        urls = ", ".join(dict.fromkeys(tried)) or ", ".join(self._urls.values())
        return StoreUnavailable(
            f"cannot reach etcd at {urls}: {reason} (is etcd running there? "
            "check store.endpoints and the TLS settings in batch.yaml)")

    def _refusal(self, what: str, key: str, url: str, code: Any, details: str,
                 logging_in: bool = False) -> StoreError:
        text = details.removeprefix("etcdserver: ")
        if logging_in and code == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in text:
            return _AuthNotEnabled(text)
        if logging_in and code == grpc.StatusCode.INVALID_ARGUMENT:
            return StorePermissionDenied(
                f"etcd at {url} refused to log in {self._who()}: {text} "
                f"(check store.user and store.password-file {self.config.password_file})")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return StorePermissionDenied(
                f"etcd at {url} refused to {what} {key!r} for {self._who()}: permission denied "
                "(the user's etcd role does not cover this key)")
        if "user name is empty" in text:
            return StorePermissionDenied(
                f"etcd at {url} requires authentication: set store.user and "
                "store.password-file in batch.yaml")
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in text:
            return LeaseExpired(f"cannot {what} {key!r}: the lease has expired or was revoked")
        return StoreError(f"etcd at {url}: cannot {what} {key!r}: {text}")

    # ------------------------------------------------------------ keys

    def get(self, key: str) -> Entry | None:
        reply = self._call("read", key, lambda: self._client.get_response(key))
        return _entry(reply.kvs[0]) if reply.count else None

    def get_prefix(self, prefix: str) -> Snapshot:
        reply = self._call("read", prefix, lambda: self._client.get_prefix_response(
            prefix, sort_order="ascend", sort_target="key"))
        return Snapshot(tuple(_entry(kv) for kv in reply.kvs), int(reply.header.revision))

    def put(self, key: str, value: str, lease: Lease | None = None) -> int:
        lease_id = lease.id if lease is not None else 0
        reply = self._call("write", key, lambda: self._client.put(key, value, lease=lease_id))
        return int(reply.header.revision)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key, lambda: self._client.delete(key)))

    def delete_prefix(self, prefix: str) -> int:
        reply = self._call("delete", prefix, lambda: self._client.delete_prefix(prefix))
        return int(reply.deleted)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        compares = [_compare(c) for c in compare]
        ops_ok = [_op(op) for op in success]
        ops_ko = [_op(op) for op in failure]
        first = next((c.key for c in compare), None) or next(
            (op.key for op in (*success, *failure)), "")
        succeeded, replies = self._call("run a transaction on", first, lambda: self._client
                                        .transaction(compares, ops_ok, ops_ko))
        results: list[tuple[Entry, ...] | None] = []
        for op, reply in zip(success if succeeded else failure, replies, strict=True):
            if isinstance(op, Get):
                results.append(tuple(_entry_with(value, meta) for value, meta in reply))
            else:
                results.append(None)
        return TxnResult(bool(succeeded), tuple(results))

    # ------------------------------------------------------------ watches

    def watch_prefix(self, prefix: str, *, start_revision: int | None = None,
                     callback: Callable[[WatchEvent], None] | None = None,
                     on_error: Callable[[StoreError], None] | None = None) -> Watch:
        end = prefix_range_end(prefix.encode())
        return self._watch(prefix, end, start_revision, callback, on_error)

    def watch(self, key: str, *, start_revision: int | None = None,
              callback: Callable[[WatchEvent], None] | None = None,
              on_error: Callable[[StoreError], None] | None = None) -> Watch:
        return self._watch(key, None, start_revision, callback, on_error)

    def _watch(self, key: str, range_end: bytes | None, start_revision: int | None,
               callback: Callable[[WatchEvent], None] | None,
               on_error: Callable[[StoreError], None] | None) -> Watch:
        if self._closed:
            raise StoreClosed(f"the store connection is closed (cannot watch {key!r})")
        refused = False
        for attempt in range(len(self._urls) + 1):
            channel = self._call("watch", key, lambda: self._client.channel)
            try:
                watch = _EtcdWatch(self, channel, key, range_end, start_revision,
                                   callback, on_error)
            except _WatchRefused:
                if refused:
                    break
                refused = True
                # The role does not cover the key, or the token expired (etcd says
                # either): a read of the same range logs in again if needed, and
                # raises StorePermissionDenied if the role is the reason.
                self._call("watch", key, lambda: self._client.get_response(
                    key, range_end=range_end, count_only=True))
                continue
            except StoreUnavailable:
                self._client.endpoint_in_use.fail()  # the next attempt fails over
                if attempt + 1 >= len(self._urls):
                    raise
                continue
            with self._watches_lock:
                self._watches.add(watch)
            return watch
        raise StorePermissionDenied(
            f"etcd at {self._current_url()} refused to watch {key!r} for {self._who()}: "
            "permission denied (the user's etcd role does not cover this key)")

    def _forget(self, watch: _EtcdWatch) -> None:
        with self._watches_lock:
            self._watches.discard(watch)

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease lasts at least 1 s, not {ttl}")
        lease = self._call("grant a lease for", f"{ttl} s", lambda: self._client.lease(ttl))
        return Lease(int(lease.id), int(lease.ttl))

    def keep_alive(self, lease: Lease) -> int:
        replies = self._call("refresh lease", f"{lease.id:x}",
                             lambda: list(self._client.refresh_lease(lease.id)))
        if not replies or replies[-1].TTL <= 0:
            raise LeaseExpired(f"lease {lease.id:x} has expired or was revoked")
        return int(replies[-1].TTL)

    def revoke(self, lease: Lease) -> None:
        with contextlib.suppress(LeaseExpired):  # already gone
            self._call("revoke lease", f"{lease.id:x}",
                       lambda: self._client.revoke_lease(lease.id))

    def time_to_live(self, lease: Lease) -> int:
        reply = self._call("read lease", f"{lease.id:x}",
                           lambda: self._client.get_lease_info(lease.id))
        return int(reply.TTL)

    # ------------------------------------------------------------ administration

    def add_prefix_user(self, user: str, password: str, prefix: str) -> str:
        """Create (or reset) ``user`` with a role granting read-write on ``prefix`` only.

        Needs root credentials.  The role is named ``vcluster-<user>``; it is
        returned.  Used by the agent to hand each unix user credentials
        confined to their own ``users/<user>/`` prefix.
        """
        role = f"vcluster-{user}"
        permission = etcdrpc.Permission(permType=etcdrpc.Permission.READWRITE,
                                        key=prefix.encode(),
                                        range_end=prefix_range_end(prefix.encode()))
        if not self._admin("add etcd user", user, "UserAdd",
                           etcdrpc.AuthUserAddRequest(name=user, password=password)):
            self._admin("set the password of etcd user", user, "UserChangePassword",
                        etcdrpc.AuthUserChangePasswordRequest(name=user, password=password))
        self._admin("add etcd role", role, "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
        self._admin("grant a prefix to etcd role", role, "RoleGrantPermission",
                    etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=permission))
        self._admin("grant a role to etcd user", user, "UserGrantRole",
                    etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))
        return role

    def _admin(self, what: str, name: str, method: str, request: Any) -> bool:
        """One request to etcd's auth service; False if what it adds already exists."""
        def send() -> Any:
            return getattr(self._client.authstub, method)(
                request, self.config.timeout, metadata=self._client.metadata)
        try:
            self._call(what, name, send)
        except StoreError as e:
            if "already exists" not in str(e):
                raise
            return False
        return True

    # ------------------------------------------------------------ end

    def close(self) -> None:
        if self._closed:
            return
        with self._watches_lock:
            watches = list(self._watches)
        for watch in watches:
            watch.cancel()
        self._closed = True
        self._client.close()


class _AuthNotEnabled(StoreError):
    """The server has no authentication; credentials are not needed."""


class _WatchRefused(StoreError):
    """The server answered a watch creation with a cancellation."""


def _token_refused(code: Any, details: str) -> bool:
    return (code == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details) or (
        "revision of auth store is old" in details)


def _compare(c: Compare) -> Any:
    wants_int = c.target != "value"
    if wants_int != (isinstance(c.operand, int) and not isinstance(c.operand, bool)):
        raise ValueError(f"compare on {c.target} of {c.key!r}: wrong operand {c.operand!r}")
    cmp = _COMPARE_TARGETS[c.target](c.key)
    cmp.op = _COMPARE_OPS[c.op]
    cmp.value = c.operand
    return cmp


def _op(op: Op) -> Any:
    end = prefix_range_end(op.key.encode()) if getattr(op, "prefix", False) else None
    if isinstance(op, Put):
        return etcd_txn.Put(op.key, op.value, lease=op.lease.id if op.lease else 0)
    if isinstance(op, Delete):
        return etcd_txn.Delete(op.key, range_end=end)
    return etcd_txn.Get(op.key, range_end=end)


def _entry_with(value: bytes, meta: Any) -> Entry:
    return Entry(key=bytes(meta.key).decode(), value=bytes(value).decode(),
                 create_revision=int(meta.create_revision), mod_revision=int(meta.mod_revision),
                 version=int(meta.version), lease=int(meta.lease_id))


class _EtcdWatch(Watch):
    """One watch on its own gRPC stream, read by its own thread."""

    def __init__(self, store: EtcdStore, channel: Any, key: str, range_end: bytes | None,
                 start_revision: int | None, callback: Callable[[WatchEvent], None] | None,
                 on_error: Callable[[StoreError], None] | None) -> None:
        super().__init__(callback, on_error)
        self._store = store
        self._key = key
        self._start_revision = start_revision
        self._url = store._current_url()
        self._cancelled = False
        self._created = threading.Event()
        self._refusal: StoreError | None = None
        self._requests: queue.Queue[Any] = queue.Queue()
        create = etcdrpc.WatchCreateRequest(key=key.encode(), range_end=range_end or b"",
                                            start_revision=start_revision or 0)
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        stub = etcdrpc.WatchStub(channel)
        self._stream = stub.Watch(iter(self._requests.get, None),
                                  metadata=store._client.metadata)
        self._thread = threading.Thread(target=self._read, name=f"watch {key}", daemon=True)
        self._thread.start()
        timeout = store.config.timeout
        if not self._created.wait(timeout):
            self._close_stream()
            raise store._unreachable([self._url], f"no answer to a watch within {timeout:g} s")
        if self._refusal is not None:
            self._close_stream()
            raise self._refusal

    def _read(self) -> None:
        try:
            for reply in self._stream:
                if not self._created.is_set():
                    if reply.canceled:
                        self._refusal = self._refused(reply)
                        return
                    self._created.set()
                for event in reply.events:
                    self._deliver(WatchEvent(
                        EventType.PUT if event.type == event.PUT else EventType.DELETE,
                        bytes(event.kv.key).decode(), bytes(event.kv.value).decode(),
                        int(event.kv.mod_revision)))
                if reply.canceled:
                    self._fail(self._refused(reply))
                    return
        except grpc.RpcError as e:
            if self._cancelled:
                return
            code, details = e.code(), str(e.details() or "")
            if code in _STREAM_LOST:  # a stopping etcd resets its streams (UNKNOWN)
                self._lost(self._store._unreachable(
                    [self._url], f"the watch stream broke: {self._store._reason(code, details)}"))
            else:
                self._lost(self._store._refusal("watch", self._key, self._url, code, details))
        else:
            if not self._cancelled:
                self._lost(self._store._unreachable([self._url], "the server ended the watch"))
        finally:
            self._created.set()
            self._store._forget(self)
            self._finish()

    def _lost(self, error: StoreError) -> None:
        if self._created.is_set():
            self._fail(error)
        else:
            self._refusal = error

    def _refused(self, reply: Any) -> StoreError:
        if reply.compact_revision:
            return StoreError(
                f"cannot watch {self._key!r} from revision {self._start_revision}: etcd has "
                f"compacted its history up to revision {reply.compact_revision} "
                "(read the keys again and watch from the revision of that read)")
        reason = str(reply.cancel_reason or "")
        if not self._created.is_set() and ("permission denied" in reason
                                           or "invalid auth token" in reason):
            return _WatchRefused(reason)
        return StoreError(f"etcd at {self._url} ended the watch on {self._key!r}: "
                          f"{reason or 'cancelled by the server'}")

    def _close_stream(self) -> None:
        self._requests.put(None)
        self._stream.cancel()

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._close_stream()
        if threading.current_thread() is not self._thread:
            self._thread.join(self._store.config.timeout)
