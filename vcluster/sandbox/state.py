"""What a sandbox is made of, written to ``<dir>/state.json`` as it comes up.

``up`` records every namespace and process the moment it exists, so that
``status``, ``run`` and ``down`` (also after a half-finished ``up``) know what
to look at and what to remove.  Names carry the sandbox's random id so that two
sandboxes, or a sandbox and anything else on the machine, never collide.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from vcluster import codec
from vcluster.errors import SandboxError
from vcluster.files import write_atomically

STATE_FILE = "state.json"
DEFAULT_DIR = Path("/var/tmp/vcluster-sandbox")
CONTROLLER = "ctl"
SUBNET = "10.199.0"  # the hosts' underlay: inside the sandbox only, apart from the
# sample private network (10.200.0.0/16) so a host and a VM never share an address
PREFIXLEN = 24
CONTROLLER_ADDRESS = f"{SUBNET}.1"
FIRST_HOST_OCTET = 11
MAX_HOSTS = 64
FORMAT = 1


def default_dir() -> Path:
    """``$VCLUSTER_SANDBOX`` or /var/tmp/vcluster-sandbox."""
    env = os.environ.get("VCLUSTER_SANDBOX")
    return Path(env) if env else DEFAULT_DIR


def new_id() -> str:
    """A short random id such as ``vcsb-3f9a1c``."""
    return f"vcsb-{secrets.token_hex(3)}"


def host_names(count: int) -> list[str]:
    return [f"h{i}" for i in range(1, count + 1)]


def host_address(index: int) -> str:
    """The address of the ``index``-th host (0-based)."""
    return f"{SUBNET}.{FIRST_HOST_OCTET + index}"


@dataclass
class Process:
    """A daemon the sandbox started: its PID and the kernel's start time for that PID.

    The start time tells a live daemon from an unrelated process that got the
    same PID after the daemon died, so ``down`` never signals a stranger.
    """

    name: str
    pid: int
    start_time: int
    log: str


@dataclass
class Host:
    """One "machine" of the sandbox: a network and a UTS namespace."""

    name: str
    address: str
    netns: str
    uts: str  # bind-mounted UTS namespace file (hostname = name)
    conf: str  # its vcluster configuration directory


@dataclass
class SandboxState:
    """Everything ``down`` needs to undo and ``status``/``run`` need to find."""

    id: str
    dir: str
    created_dir: bool
    phase: str = "starting"  # starting -> up -> stopping
    controller: Host | None = None
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    processes: list[Process] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    slurm_conf: str = ""
    munge_socket: str = ""
    etcd_endpoint: str = ""
    etcd_password_file: str = ""
    etcd_ca: str = ""
    format: int = FORMAT

    # -- names ----------------------------------------------------------------

    @property
    def tag(self) -> str:
        """The id without dashes, for interface names (IFNAMSIZ is 16 with the NUL)."""
        return "vc" + self.id.removeprefix("vcsb-")

    def netns_name(self, host: str) -> str:
        return f"{self.id}-{host}"

    def host(self, name: str | None) -> Host:
        """The controller (``None`` or ``ctl``) or the host named ``name``."""
        if name is None or name == CONTROLLER:
            if self.controller is None:
                raise SandboxError(f"sandbox {self.id} has no controller (it did not come up)")
            return self.controller
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join([CONTROLLER, *(h.name for h in self.hosts)])
        raise SandboxError(f"sandbox {self.id} has no host {name!r} (it has {known})")

    def process(self, name: str) -> Process | None:
        for proc in self.processes:
            if proc.name == name:
                return proc
        return None

    # -- persistence ----------------------------------------------------------

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    def save(self) -> None:
        """Write atomically: a crash never leaves half a state file behind."""
        write_atomically(self.path, codec.to_json(self, indent=2), mode=0o644)


def load(directory: Path) -> SandboxState | None:
    """The state in ``directory``, ``None`` when no sandbox was ever brought up there."""
    path = directory / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SandboxError(f"cannot read {path}: {e.strerror}") from e
    state = codec.from_json(SandboxState, text, what=f"{path}: not a sandbox state file:",
                            error=SandboxError)
    if state.format != FORMAT:
        raise SandboxError(f"{path}: state file format {state.format}, this vcluster reads "
                           f"{FORMAT} (bring the sandbox down with the vcluster that made it)")
    return state


def require(directory: Path) -> SandboxState:
    """The state in ``directory``, or a SandboxError saying how to start one."""
    state = load(directory)
    if state is None:
        raise SandboxError(
            f"no sandbox in {directory} (start one with: vcluster sandbox up --dir {directory})"
        )
    return state
