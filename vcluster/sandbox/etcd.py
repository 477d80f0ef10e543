"""A real etcd daemon for the sandbox and the tests: start, add users, stop.

Interface (stable; the sandbox and the tests import it)::

    server = start_etcd(workdir, client_port=P, peer_port=Q, host="127.0.0.1",
                        wrap=(), auth_token_ttl=300, tls=True, client_cert_auth=False,
                        name="vcluster")
    server.endpoint                 # "https://127.0.0.1:P" ("http://" without TLS)
    server.pid, server.data_dir, server.log_file
    server.root_password_file       # 0600, the password of etcd user "root"
    server.ca_cert                  # CA that signed the server certificate (TLS only)
    server.client_cert, .client_key # with client_cert_auth: a certificate clients present
    server.store_config(user="root", password_file=None, prefix="/vcluster") -> StoreConfig
    add_prefix_user(server, user, prefix, owner_uid=None) -> Path   # that user's password file
    stop_etcd(server)               # by PID: SIGTERM, SIGKILL after a bounded wait

``start_etcd`` returns once etcd answers (within ``start_timeout``), with
authentication enabled: user ``root`` (role ``root``) has a generated
password.  With ``tls`` (the default, what a site runs) it first makes a CA
and a server certificate for ``host`` (and 127.0.0.1/localhost) with the
``openssl`` command; clients then need ``ca_cert`` and ``https://``.  With
``client_cert_auth`` etcd also demands a client certificate signed by that CA
(mutual TLS); one is made, and ``store_config`` and ``etcdctl`` present it.

``wrap`` is an argv prefix such as ``["nsenter", "--net=/run/netns/X", "--"]``
to run etcd in a network namespace.  It must exec its command (nsenter and
unshare without ``--fork`` do) so that the PID is etcd's.  The health check
and the user administration run ``etcdctl`` under the same ``wrap``, so they
work whether or not the calling process can reach the namespace; a process
that can reach the endpoint uses ``vcluster.store`` as usual.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vcluster.config.batch import StoreConfig
from vcluster.errors import CommandError, SandboxError
from vcluster.run import run, spawn, stop, stop_all

ROOT_USER = "root"


@dataclass(frozen=True)
class EtcdServer:
    """A running etcd started by ``start_etcd``."""

    name: str
    endpoint: str
    pid: int
    workdir: Path
    data_dir: Path
    log_file: Path
    root_password_file: Path
    ca_cert: Path | None
    wrap: tuple[str, ...] = ()
    client_cert: Path | None = None
    client_key: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def password_file(self) -> Path:
        """Same as ``root_password_file``."""
        return self.root_password_file

    def store_config(self, user: str | None = ROOT_USER, password_file: Path | None = None,
                     prefix: str = "/vcluster", timeout: float = 5.0) -> StoreConfig:
        """A StoreConfig reaching this server as ``user`` (root by default)."""
        if user == ROOT_USER and password_file is None:
            password_file = self.root_password_file
        return StoreConfig(endpoints=(self.endpoint,), prefix=prefix, ca_cert=self.ca_cert,
                           cert=self.client_cert, key=self.client_key,
                           user=user, password_file=password_file if user else None,
                           timeout=timeout)


def _write_secret(path: Path, text: str, owner_uid: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    if owner_uid is not None:
        os.chown(path, owner_uid, -1)
    return path


def make_certificates(tls_dir: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``host``: returns (ca.crt, server.crt, server.key)."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_crt, ca_key = tls_dir / "ca.crt", tls_dir / "ca.key"
    crt, key, csr = tls_dir / "server.crt", tls_dir / "server.key", tls_dir / "server.csr"
    ext = tls_dir / "server.ext"
    names = dict.fromkeys([f"IP:{host}", "IP:127.0.0.1", "DNS:localhost"])
    ext.write_text(
        f"subjectAltName={','.join(names)}\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "3650",
         "-subj", "/CN=vcluster sandbox CA"])
    run(["openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=etcd"])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "3650", "-extfile", ext,
         "-out", crt])
    for path in (ca_key, key):
        path.chmod(0o600)
    return ca_crt, crt, key


def make_client_certificate(tls_dir: Path, name: str) -> tuple[Path, Path]:
    """A client certificate (CN ``name``) signed by the CA ``make_certificates`` made
    in ``tls_dir``: returns (name.crt, name.key)."""
    crt, key, csr = tls_dir / f"{name}.crt", tls_dir / f"{name}.key", tls_dir / f"{name}.csr"
    ext = tls_dir / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n")
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", tls_dir / "ca.crt",
         "-CAkey", tls_dir / "ca.key", "-set_serial", f"0x{secrets.token_hex(8)}",
         "-days", "3650", "-extfile", ext, "-out", crt])
    key.chmod(0o600)
    return crt, key


def _clean_env() -> dict[str, str]:
    # ETCD_* variables would silently override the flags we pass.
    return {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(tail) or "(empty log)"


def etcdctl(server: EtcdServer, *args: str, input: str | None = None,
            as_root: bool = True) -> str:
    """Run ``etcdctl`` against ``server`` (under its ``wrap``), as root; returns stdout."""
    env = _clean_env() | {"ETCDCTL_API": "3"}
    if as_root:
        password = server.root_password_file.read_text().strip()
        env["ETCDCTL_USER"] = f"{ROOT_USER}:{password}"
    tls = ["--cacert", str(server.ca_cert)] if server.ca_cert else []
    if server.client_cert and server.client_key:
        tls += ["--cert", str(server.client_cert), "--key", str(server.client_key)]
    argv = [*server.wrap, "etcdctl", "--endpoints", server.endpoint, *tls,
            "--dial-timeout=2s", "--command-timeout=5s", *args]
    return str(run(argv, env=env, input=input, timeout=15).stdout)


def start_etcd(workdir: Path, *, client_port: int, peer_port: int, host: str = "127.0.0.1",
               wrap: Sequence[str] = (), auth_token_ttl: int = 300, tls: bool = True,
               client_cert_auth: bool = False, name: str = "vcluster",
               start_timeout: float = 15.0) -> EtcdServer:
    """Start etcd with its data and TLS files in ``workdir``; see the module docstring."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir = workdir / "data"
    log_file = workdir / "etcd.log"
    scheme = "https" if tls else "http"
    client_url = f"{scheme}://{host}:{client_port}"
    peer_url = f"http://{host}:{peer_port}"
    if client_cert_auth and not tls:
        raise SandboxError("etcd: client certificates need TLS (tls=True)")
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_args: list[str] = []
    if tls:
        ca_cert, crt, key = make_certificates(workdir / "tls", host)
        tls_args = ["--cert-file", str(crt), "--key-file", str(key)]
    if client_cert_auth:
        client_cert, client_key = make_client_certificate(workdir / "tls", "client")
        tls_args += ["--client-cert-auth", "--trusted-ca-file", str(ca_cert)]
    argv = [
        *wrap, "etcd", "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}", "--initial-cluster-state", "new",
        "--initial-cluster-token", f"{name}-{secrets.token_hex(4)}",
        "--auth-token", "simple", "--auth-token-ttl", str(auth_token_ttl),
        "--logger", "zap", "--log-outputs", "stderr", *tls_args,
    ]
    password_file = _write_secret(workdir / "root.password", secrets.token_urlsafe(24))
    with open(log_file, "ab") as log:
        process = spawn(argv, stdout=log, stderr=log, env=_clean_env(), new_session=True)
    server = EtcdServer(name=name, endpoint=client_url, pid=process.pid, workdir=workdir,
                        data_dir=data_dir, log_file=log_file, root_password_file=password_file,
                        ca_cert=ca_cert, wrap=tuple(wrap), client_cert=client_cert,
                        client_key=client_key, process=process)
    try:
        _wait_healthy(server, process, start_timeout)
        password = password_file.read_text().strip()
        etcdctl(server, "user", "add", ROOT_USER, "--interactive=false",
                input=password + "\n", as_root=False)
        etcdctl(server, "role", "add", ROOT_USER, as_root=False)
        etcdctl(server, "user", "grant-role", ROOT_USER, ROOT_USER, as_root=False)
        etcdctl(server, "auth", "enable", as_root=False)
    except BaseException as e:
        stop_etcd(server)
        if isinstance(e, CommandError):
            raise SandboxError(f"etcd at {client_url} could not be set up: {e}") from e
        raise
    return server


def _wait_healthy(server: EtcdServer, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if process.poll() is not None:
            raise SandboxError(f"etcd exited with status {process.returncode} while starting: "
                               f"{_log_tail(server.log_file)} (log: {server.log_file})")
        try:
            etcdctl(server, "endpoint", "health", as_root=False)
            return
        except CommandError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise SandboxError(f"etcd at {server.endpoint} was not healthy after {timeout:g} s: "
                               f"{last} (log: {server.log_file})")
        time.sleep(0.1)


def add_prefix_user(server: EtcdServer, user: str, prefix: str,
                    owner_uid: int | None = None) -> Path:
    """Create (or reset) ``user`` with a role (``vcluster-<user>``) that grants
    read-write on ``prefix`` only.  Returns the user's new password file (0600,
    owned by ``owner_uid`` if given), in ``<workdir>/users/``."""
    password = secrets.token_urlsafe(24)
    role = f"vcluster-{user}"
    try:
        etcdctl(server, "user", "add", user, "--interactive=false", input=password + "\n")
    except CommandError as e:
        if "already exists" not in e.stderr:
            raise SandboxError(f"cannot add etcd user {user!r}: {e}") from e
        etcdctl(server, "user", "passwd", user, "--interactive=false", input=password + "\n")
    try:
        etcdctl(server, "role", "add", role)
    except CommandError as e:
        if "already exists" not in e.stderr:
            raise SandboxError(f"cannot add etcd role {role!r}: {e}") from e
    try:
        etcdctl(server, "role", "grant-permission", "--prefix=true", role, "readwrite", prefix)
        etcdctl(server, "user", "grant-role", user, role)
    except CommandError as e:
        raise SandboxError(f"cannot grant {prefix!r} to etcd user {user!r}: {e}") from e
    return _write_secret(server.workdir / "users" / f"{user}.password", password, owner_uid)


def _is_our_etcd(server: EtcdServer) -> bool:
    """The PID still runs the etcd we started (and is not a zombie)."""
    try:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{server.pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and str(server.data_dir).encode() in cmdline


@dataclass
class _EtcdProcess:
    """The server as ``run.stop_all`` sees it: by PID, checked to still be that etcd."""

    server: EtcdServer

    def alive(self) -> bool:
        return _is_our_etcd(self.server)

    def signal(self, signum: int) -> None:
        if _is_our_etcd(self.server):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server.pid, signum)


def stop_etcd(server: EtcdServer, timeout: float = 10.0) -> None:
    """Stop the server by its PID: SIGTERM, then SIGKILL after ``timeout``.

    Safe to call twice, and from another process than the one that started it
    (the PID is checked to still be that etcd first).
    """
    try:
        if server.process is not None:
            stop(server.process, timeout)
        else:
            stop_all([_EtcdProcess(server)], timeout)
    except CommandError as e:
        raise SandboxError(f"etcd (pid {server.pid}): {e}") from e
