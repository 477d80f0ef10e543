"""Reaching a cluster's VMs with OpenSSH: the cluster's key, its known hosts, an ssh_config.

Every VM on a nat network with ``ssh-ports`` has a port of its host's
forwarded to its port 22 (``VmRecord.ssh``), and a host key its runner made
and published (``VmRecord.host_key``).  ssh, scp and ProxyCommand users all
go through one private directory (``Access``, mode 0700, in
``$XDG_RUNTIME_DIR`` or the temporary directory, removed afterwards; or a
directory the user names, for ``vcluster ssh-config``):

- ``id_ed25519``: the cluster's private key, from the user's store prefix;
- ``known_hosts``: ``vcluster-<job>-vm<i> <host key>`` for every VM that has
  one; ssh checks the key under that alias (``HostKeyAlias``), whatever
  address and port reach the VM, so a changed key is refused, never learnt
  (``StrictHostKeyChecking yes``);
- ``config``: one ``Host vm<i>`` entry per reachable VM (address, port, the
  image's default user) and the settings above for all, so that plain
  ``ssh -F config vm1`` and ``scp -F config f vm1:`` work.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vcluster.errors import InputError, VclusterError

if TYPE_CHECKING:
    from vcluster.cli.clusters import Cluster

_TARGET_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?P<vm>vm[0-9]+)$")
# ssh options that take a value (ssh(1) SYNOPSIS): their value is not the destination
SSH_VALUE_OPTIONS = frozenset("BbcDEeFIiJLlmOopQRSWw")


@dataclass(frozen=True)
class Target:
    user: str | None
    vm: str  # vm<i>


def parse_target(text: str) -> Target | None:
    """``[USER@]vmN``, or None if ``text`` is not one."""
    m = _TARGET_RE.match(text)
    return Target(m["user"], m["vm"]) if m else None


def split_ssh_args(args: Sequence[str]) -> tuple[list[str], Target, list[str]]:
    """``[SSH OPTIONS] [USER@]vmN [CMD...]`` → (options, target, command)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg[1] in SSH_VALUE_OPTIONS and len(arg) == 2:
            i += 2
        else:
            i += 1
    if i >= len(args):
        raise InputError("VM: missing (expected [SSH OPTIONS] [USER@]vmN [COMMAND...])")
    target = parse_target(args[i])
    if target is None:
        raise InputError(f"VM: {args[i]!r} is not a VM (expected [USER@]vmN, such as vm1 or "
                         "root@vm0)")
    return [a for a in args[:i] if a != "--"], target, list(args[i + 1:])


def alias(job: str, index: int) -> str:
    """The name a VM's host key is known by in the cluster's known_hosts."""
    return f"vcluster-{job}-vm{index}"


def known_hosts(cluster: Cluster) -> str:
    job = cluster.spec.job
    return "".join(f"{alias(job, i)} {r.host_key}\n"
                   for i, r in sorted(cluster.vms.items()) if r.host_key)


def ssh_config(cluster: Cluster, key: Path, hosts_file: Path) -> str:
    """An ssh_config: a ``Host vm<i>`` per reachable VM, then the cluster-wide settings."""
    lines: list[str] = []
    plans = {vm.index: vm for vm in cluster.spec.plan.vms}
    for i, record in sorted(cluster.vms.items()):
        if record.ssh is None or i not in plans:
            continue
        lines += [f"Host vm{i}", f"  HostName {record.ssh.address}", f"  Port {record.ssh.port}",
                  f"  User {plans[i].boot.user}", f"  HostKeyAlias {alias(cluster.spec.job, i)}"]
    lines += ["Host *", f"  IdentityFile {key}", "  IdentitiesOnly yes",
              f"  UserKnownHostsFile {hosts_file}", "  GlobalKnownHostsFile /dev/null",
              "  StrictHostKeyChecking yes", "  HostKeyAlgorithms ssh-ed25519",
              "  CheckHostIP no", "  UpdateHostKeys no", "  LogLevel ERROR"]
    return "\n".join(lines) + "\n"


def check_reachable(cluster: Cluster, index: int) -> None:
    """A one-line error unless VM ``index`` can be reached by ssh now."""
    record = cluster.vms.get(index)
    name, job = f"vm{index}", cluster.spec.job
    if record is not None and record.ssh is not None and record.host_key:
        return
    vm = next(v for v in cluster.spec.plan.vms if v.index == index)
    nat = [n.network for n in vm.nics if n.type == "nat"]
    if not nat:
        raise VclusterError(f"{name} of job {job} has no nat network, so no ssh port (its "
                            f"template {vm.template!r} must use a resource set whose networks "
                            "include a nat network with ssh-ports; vcluster console "
                            f"{name} works)")
    state = record.state.value if record else "unknown"
    raise VclusterError(f"{name} of job {job} has no ssh port yet (state: {state}; wait until "
                        "it is booting or ready, or see vcluster ps -l)")


@dataclass(frozen=True)
class Access:
    """The files ssh needs, in a private directory."""

    directory: Path
    key: Path
    known_hosts: Path
    config: Path


def write_access(directory: Path, cluster: Cluster, private_key: str) -> Access:
    """Write the key, known_hosts and config into ``directory`` (made 0700; the user's)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise InputError(f"{directory}: not a private directory of yours (expected one only "
                         "you can read, mode 0700)")
    access = Access(directory, directory / "id_ed25519", directory / "known_hosts",
                    directory / "config")
    for path, text in ((access.key, private_key), (access.known_hosts, known_hosts(cluster)),
                       (access.config, ssh_config(cluster, access.key, access.known_hosts))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text if text.endswith("\n") or not text else text + "\n")
    return access


@contextmanager
def private_access(cluster: Cluster, private_key: str) -> Iterator[Access]:
    """``write_access`` into a new private temporary directory, removed at the end."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    parent = base if base and os.path.isdir(base) and os.access(base, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="vcluster-ssh-", dir=parent) as tmp:
        yield write_access(Path(tmp), cluster, private_key)
