"""The per-job undo log: ``<directories.state>/jobs/<job>/undo.json``.

Everything the agent makes for a job (bridge, tap, VXLAN device, nftables
table, directory, file, store keys) is appended here *before* it is made, and the file is replaced
atomically (``files.write_atomically``), so a crash at any point leaves a
log that names everything that may exist.  Releasing walks the log backwards
and drops each entry once its thing is gone (a thing that was never made, or
is gone already, counts as gone), so release is idempotent and can resume
after a crash.  The log also keeps the job's owner and the index given to
each of its private networks (device names use the index).

A VXLAN device's forwarding entries (one per other host of the job) are not
entries of their own: they are part of the device, and deleting the device
deletes them.  The nftables table (``inet vcluster_job_<job>``) is one
entry, whatever chains and counters it holds for the job's networks.

The file is a ``LogFile`` written and read by ``vcluster.codec``: an unknown
field or a wrong type is refused naming the file and the field path, since
a log this agent cannot fully read cannot be fully released either.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vcluster import codec
from vcluster.errors import ResourceError
from vcluster.files import write_atomically
from vcluster.hostpaths import HostLayout

FORMAT = 1


class Kind(StrEnum):
    BRIDGE = "bridge"  # name: interface
    TAP = "tap"  # name: interface
    VXLAN = "vxlan"  # name: interface (its forwarding entries go with it)
    NFT = "nft"  # name: an nftables table of family inet, with all it holds
    DIR = "dir"  # name: absolute path (removed if empty of what we made)
    FILE = "file"  # name: absolute path
    TREE = "tree"  # name: absolute path of a directory removed with all it holds
    STORE = "store"  # name: the job's user; the job's keys in the store

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class UndoEntry:
    kind: Kind
    name: str
    vm: int | None = None
    network: str | None = None
    vni: int | None = None  # a vxlan device's VXLAN id

    def describe(self) -> str:
        if self.kind is Kind.STORE:
            return f"store keys (user {self.name})"
        if self.kind is Kind.NFT:
            return f"nft table inet {self.name}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class LogFile:
    """The file format of an undo log."""

    format: int
    job: str
    uid: int
    user: str
    created: float
    networks: dict[str, int]
    published: bool = False
    entries: tuple[UndoEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format {self.format} is not {FORMAT}, the one this agent "
                             "writes (written by another vcluster version?)")


@dataclass
class JobLog:
    """One job's undo log on this host, as loaded (``save`` after every change)."""

    path: Path
    job: str
    uid: int
    user: str
    created: float = field(default_factory=time.time)
    networks: dict[str, int] = field(default_factory=dict)
    entries: list[UndoEntry] = field(default_factory=list)
    published: bool = False  # the job's owner and setup keys went to the store

    def has(self, entry: UndoEntry) -> bool:
        return entry in self.entries

    def record(self, entry: UndoEntry) -> None:
        """Append ``entry`` (once) and save: call it before making the thing."""
        if entry not in self.entries:
            self.entries.append(entry)
            self.save()

    def forget(self, entry: UndoEntry) -> None:
        """Drop ``entry`` once its thing is gone."""
        if entry in self.entries:
            self.entries.remove(entry)
            self.save()

    def network_index(self, name: str) -> int:
        """The job's stable index for private network ``name`` (saved when new)."""
        if name not in self.networks:
            self.networks[name] = len(self.networks)
            self.save()
        return self.networks[name]

    def to_file(self) -> LogFile:
        return LogFile(format=FORMAT, job=self.job, uid=self.uid, user=self.user,
                       created=self.created, networks=dict(self.networks),
                       published=self.published, entries=tuple(self.entries))

    def save(self) -> None:
        try:
            write_atomically(self.path, codec.to_json(self.to_file(), indent=1))
        except OSError as e:
            raise ResourceError(f"cannot write the undo log {self.path}: {e.strerror}") from e


def logged_jobs(layout: HostLayout) -> list[str]:
    """The jobs that have an undo log on this host."""
    try:
        names = os.listdir(layout.undo_logs)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n.isdigit()), key=int)


def load(layout: HostLayout, job: str) -> JobLog | None:
    """The job's log, None if there is none; a ResourceError if it cannot be read."""
    path = layout.undo_log(job)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ResourceError(f"the undo log {path} cannot be read ({e}); fix or remove it") from e
    saved = codec.from_json(LogFile, text, what=f"the undo log {path}", root="",
                            error=lambda m: ResourceError(f"{m} (fix or remove it)"))
    return JobLog(path=path, job=saved.job, uid=saved.uid, user=saved.user,
                  created=saved.created, networks=dict(saved.networks),
                  entries=list(saved.entries), published=saved.published)


def create(layout: HostLayout, job: str, uid: int, user: str) -> JobLog:
    """A new, saved log for ``job``, its first entry the job's store keys (undone last)."""
    directory = layout.undo_dir(job)
    try:
        layout.undo_logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"cannot make {directory} for the undo log: {e.strerror}") from e
    log = JobLog(path=layout.undo_log(job), job=job, uid=uid, user=user)
    log.entries.append(UndoEntry(Kind.STORE, user))
    log.save()
    return log


def remove(log: JobLog) -> None:
    """Delete the (now empty) log and its directory."""
    # write_atomically's temporary file, left if the agent died in the middle of a save
    for path in (log.path, log.path.with_name(f".{log.path.name}.tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        log.path.parent.rmdir()
