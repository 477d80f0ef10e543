"""The agent's unix socket: one request per connection, one thread per connection.

The socket is mode 0666 (anyone may ask; the handlers decide who may have
what, from SO_PEERCRED).  A request is at most ``MAX_MESSAGE`` bytes and
must arrive within ``REQUEST_TIMEOUT``; the answer goes back with its file
descriptors attached (SCM_RIGHTS), which the agent then closes on its side.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
from pathlib import Path

from vcluster.agent import protocol as p
from vcluster.agent.peer import Peer, peer_of
from vcluster.agent.service import Agent

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
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


class _Handler(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(REQUEST_TIMEOUT)
        fds: list[int] = []
        peer: Peer | None = None
        op = "?"
        try:
            peer = peer_of(sock)
            request = p.parse(_read_line(sock))
            op = type(request).__name__
            answer, fds = self.server.agent.handle(request, peer)
        except p.Refusal as e:
            answer = p.error_response(e.code, str(e))
        except TimeoutError:
            answer = p.error_response(p.Code.BAD_REQUEST,
                                      f"no complete request within {REQUEST_TIMEOUT:g} s")
        except Exception as e:
            log.exception("request %s from %s failed", op, peer)
            answer = p.error_response(p.Code.FAILED, f"the agent failed: {e}")
        try:
            _send(sock, p.encode(answer), fds)
        except OSError as e:
            log.warning("could not answer %s (%s): %s", peer, op, e)
        finally:
            for fd in fds:
                os.close(fd)
        level = logging.INFO if answer.get("ok") and op not in ("Ping", "Status") else (
            logging.DEBUG if answer.get("ok") else logging.WARNING)
        log.log(level, "%s from pid %s uid %s: %s", op, peer.pid if peer else "?",
                peer.uid if peer else "?", "ok" if answer.get("ok") else answer.get("error"))


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, agent: Agent) -> None:
        self.agent = agent
        self.path = path
        _clear_stale_socket(path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o666)

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
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
        except OSError:
            os.unlink(path)
            return
    raise OSError(f"another agent answers on {path}; stop it first")
