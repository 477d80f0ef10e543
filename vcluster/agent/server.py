"""The agent's unix socket: one request per connection, a bounded number of threads.

The socket is mode 0666 (anyone may ask; the handlers decide who may have
what, from SO_PEERCRED).  A request is at most ``MAX_MESSAGE`` bytes and
must arrive whole within ``READ_DEADLINE`` seconds of the connection (one
deadline for the whole request, not per read, so a client trickling bytes
is cut off); the answer goes back with its file descriptors attached
(SCM_RIGHTS), which the agent then closes on its side.

Connections are counted when accepted, before any thread starts: at most
``MAX_CONNECTIONS`` of non-root callers at once, and at most
``MAX_PER_UID`` of one uid; beyond that a caller gets ``busy`` at once and
no thread.  Root (the prolog, the epilog's ``release``, ``status``) has
``ROOT_RESERVE`` more, so clients that connect and send nothing never starve
the epilog.  At most ``MAX_CONNECTIONS + ROOT_RESERVE`` threads serve.

This is where failures become the wire's codes, for every request
(``_refusal``): an AgentError keeps its own (denied, bad-request, ...), any
other VclusterError (a resource, the store, credentials) is ``failed`` with
its message, and anything else is ``failed`` and logged with its traceback.

At start-up an existing socket is removed only when nothing listens on it
(connect says ECONNREFUSED, or it vanished); if another agent answers, or
does not answer in time (busy), this one refuses to start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from pathlib import Path
from typing import Any

from vcluster.agent import protocol as p
from vcluster.agent.peer import Peer, peer_of
from vcluster.agent.service import Agent
from vcluster.errors import VclusterError

log = logging.getLogger(__name__)

READ_DEADLINE = 10.0  # seconds for a whole request to arrive
SEND_TIMEOUT = 10.0  # seconds for the answer to leave
MAX_CONNECTIONS = 64  # non-root connections served at once
MAX_PER_UID = 32  # of which one uid may hold
ROOT_RESERVE = 8  # more, for root only
PROBE_TIMEOUT = 2.0  # seconds to connect to an existing socket at start-up


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """One request line, all of it before ``deadline`` (time.monotonic)."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(p.MAX_MESSAGE)
        if not chunk:
            break
        data += chunk
        if len(data) > p.MAX_MESSAGE:
            raise p.bad_request(f"the request is longer than {p.MAX_MESSAGE} bytes")
    return data.split(b"\n", 1)[0]


def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    sent = socket.send_fds(sock, [message], fds) if fds else sock.send(message)
    if sent < len(message):
        sock.sendall(message[sent:])


def _refusal(error: Exception, op: str, peer: Peer) -> p.Refused:
    """The wire's refusal for ``error``: the one place errors get their codes."""
    if isinstance(error, p.AgentError):
        return p.Refused(False, error.code.value, str(error))
    if isinstance(error, TimeoutError):
        return p.Refused(False, p.Code.BAD_REQUEST.value,
                         f"no complete request within {READ_DEADLINE:g} s")
    if isinstance(error, VclusterError):
        return p.Refused(False, p.Code.FAILED.value, str(error))
    log.error("request %s from %s failed", op, peer, exc_info=error)
    return p.Refused(False, p.Code.FAILED.value, f"the agent failed: {error}")


class _Handler(socketserver.BaseRequestHandler):
    server: AgentServer
    client_address: Peer

    def handle(self) -> None:
        sock: socket.socket = self.request
        deadline = time.monotonic() + READ_DEADLINE
        fds: list[int] = []
        peer: Peer = self.client_address  # counted in by process_request
        op = "?"
        reply: p.Reply
        try:
            request = p.parse(_read_line(sock, deadline))
            op = request.op
            answer, fds = self.server.agent.handle(request, peer)
            reply = p.Answered(True, answer)
        except Exception as e:
            reply = _refusal(e, op, peer)
        try:
            sock.settimeout(SEND_TIMEOUT)
            _send(sock, p.encode_reply(reply), fds)
        except OSError as e:
            log.warning("could not answer %s (%s): %s", peer, op, e)
        finally:
            for fd in fds:
                os.close(fd)
        if isinstance(reply, p.Refused):
            log.warning("%s from pid %s uid %s: %s", op, peer.pid, peer.uid, reply.error)
        else:
            log.log(logging.DEBUG if op in ("ping", "status") else logging.INFO,
                    "%s from pid %s uid %s: ok", op, peer.pid, peer.uid)


class AgentServer(socketserver.UnixStreamServer):
    allow_reuse_address = False

    request_queue_size = 64

    def __init__(self, path: Path, agent: Agent, max_connections: int = MAX_CONNECTIONS,
                 max_per_uid: int = MAX_PER_UID, root_reserve: int = ROOT_RESERVE) -> None:
        self.agent = agent
        self.path = path
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.root_reserve = root_reserve
        self._active: dict[int, int] = {}  # uid: connections being served
        self._count_lock = threading.Lock()
        _clear_stale_socket(path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o666)

    def active(self) -> dict[int, int]:
        """Connections being served now, per uid."""
        with self._count_lock:
            return dict(self._active)

    def _admit(self, peer: Peer) -> str | None:
        """Count ``peer`` in, or say why not (the busy answer)."""
        with self._count_lock:
            total = sum(n for uid, n in self._active.items() if uid != 0)
            mine = self._active.get(peer.uid, 0)
            if peer.uid == 0:
                if mine >= self.root_reserve + max(0, self.max_connections - total):
                    return f"the agent serves {mine} requests of root already; try again"
            elif total >= self.max_connections:
                return (f"the agent serves {total} requests already (at most "
                        f"{self.max_connections}); try again")
            elif mine >= self.max_per_uid:
                return (f"the agent serves {mine} requests of uid {peer.uid} already (at most "
                        f"{self.max_per_uid} per user); try again")
            self._active[peer.uid] = mine + 1
        return None

    def _leave(self, peer: Peer) -> None:
        with self._count_lock:
            left = self._active.get(peer.uid, 1) - 1
            if left > 0:
                self._active[peer.uid] = left
            else:
                self._active.pop(peer.uid, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit the connection (counted by uid) and serve it in a thread, or say busy."""
        sock: socket.socket = request
        try:
            peer = peer_of(sock)
        except OSError:
            self.shutdown_request(sock)
            return
        why = self._admit(peer)
        if why is not None:
            log.warning("busy: refused a connection of pid %d uid %d", peer.pid, peer.uid)
            try:
                sock.settimeout(0.2)
                sock.send(p.encode_reply(p.Refused(False, p.Code.BUSY.value, why)))
            except OSError:
                pass
            self.shutdown_request(sock)
            return

        def serve() -> None:
            try:
                self.finish_request(sock, peer)  # the handler's client_address is the peer
            except Exception:
                self.handle_error(sock, peer)
            finally:
                self.shutdown_request(sock)
                self._leave(peer)

        thread = threading.Thread(target=serve, name=f"request-{peer.pid}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # cannot start a thread (resources): drop the connection
            self._leave(peer)
            self.shutdown_request(sock)

    def server_close(self) -> None:
        super().server_close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead agent; refuse to start next to a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # nothing listens: a dead agent's
                return
            if isinstance(e, TimeoutError):
                why = f"it did not accept a connection within {PROBE_TIMEOUT:g} s: busy?"
            else:
                why = f"connecting says {e.strerror or e}"
            raise OSError(f"another agent answers on {path} ({why}); stop it first, or "
                          "remove the socket if you are sure none runs") from e
    raise OSError(f"another agent answers on {path}; stop it first")
