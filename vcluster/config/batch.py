"""``batch.yaml``: batch backend, state store, directories and QEMU settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vcluster.errors import ConfigError
from vcluster.hostpaths import HostLayout
from vcluster.schema.fields import Section
from vcluster.schema.source import Node

BACKENDS = ("slurm", "local")
STORE_BACKENDS = ("etcd", "sqlite")
ACCELERATORS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class StoreConfig:
    """How to reach the state store."""

    backend: str = "etcd"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/vcluster"
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password_file: Path | None = None
    timeout: float = 5.0
    path: Path | None = None  # sqlite: the database file (None: the user's default)

    def database(self) -> Path:
        """The sqlite database: ``path``, else ``$XDG_STATE_HOME/vcluster/store.db``."""
        return self.path if self.path is not None else user_state_dir() / "store.db"

    def password(self) -> str | None:
        """Read the password file (kept out of this config, which users can read)."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as e:
            raise ConfigError(None, "store.password-file",
                              f"cannot read {self.password_file}: {e.strerror}") from e


@dataclass(frozen=True)
class Directories:
    """Where vcluster keeps things on every host."""

    state: Path = Path("/var/lib/vcluster")
    run: Path = Path("/run/vcluster")
    images: Path = Path("/var/lib/vcluster/images")

    @property
    def layout(self) -> HostLayout:
        """The paths under ``state`` and ``run`` (``vcluster.hostpaths``)."""
        return HostLayout(state=self.state, run=self.run)


def user_state_dir() -> Path:
    """A normal user's own state directory: ``$XDG_STATE_HOME/vcluster``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vcluster"


def user_run_dir() -> Path:
    """A normal user's own run directory: ``$XDG_RUNTIME_DIR/vcluster``, else
    ``/tmp/vcluster-UID`` (made 0700 by whoever uses it first, and checked then)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "vcluster"
    return Path(f"/tmp/vcluster-{os.getuid()}")


def own_directories(dirs: Directories) -> Directories:
    """The local backend's directories for the caller: a normal user's are their own
    (rootless: no agent, nothing of root's), root's are the configured ones."""
    if os.getuid() == 0:
        return dirs
    return Directories(state=user_state_dir(), run=user_run_dir(), images=dirs.images)


@dataclass(frozen=True)
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    accel: str = "auto"


@dataclass(frozen=True)
class ImagesConfig:
    max_depth: int = 16  # a saved revision deeper than this many layers is flattened


@dataclass(frozen=True)
class BatchConfig:
    backend: str = "slurm"
    store: StoreConfig = field(default_factory=StoreConfig)
    directories: Directories = field(default_factory=Directories)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    embedded: bool = False  # no configuration files: the embedded default of one machine
    libvirt_uri: str | None = None  # persistent clusters' libvirt (None: by who runs)

    @property
    def local(self) -> bool:
        """Whether clusters run on this machine alone (no SLURM)."""
        return self.backend == "local"

    @property
    def rootless(self) -> bool:
        """Local clusters of a normal user: no agent, nothing of root's."""
        return self.local and os.getuid() != 0


def embedded_batch() -> BatchConfig:
    """The embedded default: the local backend, the sqlite store, the caller's directories."""
    return BatchConfig(backend="local", store=StoreConfig(backend="sqlite"),
                       directories=own_directories(Directories()), embedded=True)


def _store(sec: Section, base: Path) -> StoreConfig:
    default = StoreConfig()
    endpoints = sec.strings("endpoints", expected="a list of URLs such as https://10.0.0.1:2379")
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            raise sec.error("endpoints", f"{url!r} is not an http:// or https:// URL",
                            "a list of URLs such as https://10.0.0.1:2379")
    prefix = sec.string("prefix", default.prefix)
    assert prefix is not None
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise sec.error("prefix", f"{prefix!r} is not a key prefix",
                        "a prefix starting with / and not ending with /, such as /vcluster")
    out = StoreConfig(
        backend=sec.choice("backend", STORE_BACKENDS, default.backend),
        endpoints=endpoints or default.endpoints,
        prefix=prefix,
        ca_cert=sec.file_path("ca-cert", base),
        cert=sec.file_path("cert", base),
        key=sec.file_path("key", base),
        user=sec.string("user"),
        password_file=sec.file_path("password-file", base),
        timeout=sec.number("timeout", default.timeout, minimum=0.1),
        path=sec.file_path("path", base),
    )
    sec.done()
    if (out.cert is None) != (out.key is None):
        raise sec.error("cert" if out.key is None else "key",
                        "cert and key go together", "both cert and key, or neither")
    return out


def parse_batch(node: Node | None, path: Path) -> BatchConfig:
    """Validate a parsed ``batch.yaml`` (``None``: the file is empty or absent)."""
    if node is None:
        return BatchConfig()
    top = Section(node, "")
    base = path.parent
    default = BatchConfig()
    backend = default.backend
    if (sec := top.section("batch")) is not None:
        backend = sec.choice("backend", BACKENDS, default.backend)
        sec.done()
    store = default.store
    if (sec := top.section("store")) is not None:
        store = _store(sec, base)
    dirs = default.directories
    if (sec := top.section("directories")) is not None:
        dirs = Directories(
            state=sec.file_path("state", base) or dirs.state,
            run=sec.file_path("run", base) or dirs.run,
            images=sec.file_path("images", base) or dirs.images,
        )
        sec.done()
    qemu = default.qemu
    if (sec := top.section("qemu")) is not None:
        qemu = QemuConfig(
            binary=sec.string("binary", qemu.binary) or qemu.binary,
            accel=sec.choice("accel", ACCELERATORS, qemu.accel),
        )
        sec.done()
    images = default.images
    if (sec := top.section("images")) is not None:
        depth = sec.integer("max-depth", images.max_depth, minimum=1)
        assert depth is not None
        images = ImagesConfig(max_depth=depth)
        sec.done()
    libvirt_uri = None
    if (sec := top.section("libvirt")) is not None:
        libvirt_uri = sec.string("uri")
        if libvirt_uri is not None and "://" not in libvirt_uri:
            raise sec.error("uri", f"{libvirt_uri!r} is not a libvirt URI",
                            "a URI such as qemu:///system or qemu:///session")
        sec.done()
    top.done()
    if backend == "local":
        dirs = own_directories(dirs)
    return BatchConfig(backend=backend, store=store, directories=dirs, qemu=qemu, images=images,
                       libvirt_uri=libvirt_uri)
