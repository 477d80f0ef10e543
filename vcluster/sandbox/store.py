"""The sandbox's etcd: TLS and auth enabled, inside the controller's namespace."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from vcluster.errors import SandboxError
from vcluster.sandbox import network, process
from vcluster.sandbox.etcd import start_etcd
from vcluster.sandbox.state import SandboxState
from vcluster.sandbox.vconf import StoreAccess

CLIENT_PORT = 2379  # inside the controller's network namespace: no clash with anything
PEER_PORT = 2380
PUBLIC_CA = "etcd-ca.crt"


def start(state: SandboxState, workdir: Path, progress: Callable[[str], None]) -> StoreAccess:
    """Start etcd on the controller's address and record it; how machines reach it."""
    assert state.controller is not None
    server = start_etcd(
        workdir, host=state.controller.address, client_port=CLIENT_PORT, peer_port=PEER_PORT,
        wrap=network.enter(state.controller), name=state.tag,
    )
    proc = process.adopt("etcd", server.pid)
    if proc is None:
        raise SandboxError(f"etcd (pid {server.pid}) exited right after starting; "
                           f"see {server.log_file}")
    proc.log = str(server.log_file)
    state.processes.append(proc)
    # etcd's own directory is root's alone; the CA certificate is for everybody.
    ca_cert: Path | None = None
    if server.ca_cert is not None:
        ca_cert = Path(state.dir) / PUBLIC_CA
        shutil.copyfile(server.ca_cert, ca_cert)
        ca_cert.chmod(0o644)
        state.etcd_ca = str(ca_cert)
    state.etcd_endpoint = server.endpoint
    state.etcd_password_file = str(server.root_password_file)
    state.save()
    progress(f"etcd runs on {server.endpoint} (TLS, auth enabled; root's password in "
             f"{server.root_password_file}), pid {server.pid}")
    return StoreAccess(endpoint=server.endpoint, user="root",
                       password_file=server.root_password_file, ca_cert=ca_cert)
