"""The per-job undo log: ``<directories.state>/jobs/<job>/undo.json``.

Everything the agent makes for a job (bridge, tap, directory, file, store
keys) is appended here *before* it is made, and the file is replaced
atomically (write, fsync, rename, fsync the directory), so a crash at any
point leaves a log that names everything that may exist.  Releasing walks the
log backwards and drops each entry once its thing is gone (a thing that was
never made, or is gone already, counts as gone), so release is idempotent and
can resume after a crash.  The log also keeps the job's owner and the index
given to each of its private networks (device names use the index).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vcluster.agent.protocol import failed

FORMAT = 1
LOG_NAME = "undo.json"


class Kind(StrEnum):
    BRIDGE = "bridge"  # name: interface
    TAP = "tap"  # name: interface
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

    def describe(self) -> str:
        if self.kind is Kind.STORE:
            return f"store keys (user {self.name})"
        return f"{self.kind} {self.name}"


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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "job": self.job, "uid": self.uid, "user": self.user,
            "created": self.created, "networks": self.networks, "published": self.published,
            "entries": [{k: (str(v) if isinstance(v, Kind) else v)
                         for k, v in asdict(e).items() if v is not None} for e in self.entries],
        }

    def save(self) -> None:
        write_atomically(self.path, json.dumps(self.to_json(), indent=1) + "\n")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def jobs_dir(state: Path) -> Path:
    return state / "jobs"


def job_dir(state: Path, job: str) -> Path:
    return jobs_dir(state) / job


def logged_jobs(state: Path) -> list[str]:
    """The jobs that have an undo log on this host."""
    try:
        names = os.listdir(jobs_dir(state))
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n.isdigit()), key=int)


def load(state: Path, job: str) -> JobLog | None:
    """The job's log, None if there is none; a Refusal if it cannot be read."""
    path = job_dir(state, job) / LOG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise failed(f"the undo log {path} cannot be read ({e}); fix or remove it") from e
    try:
        if data["format"] != FORMAT:
            raise ValueError(f"format {data['format']!r}, expected {FORMAT}")
        return JobLog(
            path=path, job=str(data["job"]), uid=int(data["uid"]), user=str(data["user"]),
            created=float(data["created"]),
            networks={str(k): int(v) for k, v in data["networks"].items()},
            published=bool(data.get("published", False)),
            entries=[UndoEntry(kind=Kind(e["kind"]), name=str(e["name"]), vm=e.get("vm"),
                               network=e.get("network")) for e in data["entries"]],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise failed(f"the undo log {path} is not one this agent wrote ({e})") from e


def create(state: Path, job: str, uid: int, user: str) -> JobLog:
    """A new, saved log for ``job``, its first entry the job's store keys (undone last)."""
    directory = job_dir(state, job)
    jobs_dir(state).mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    log = JobLog(path=directory / LOG_NAME, job=job, uid=uid, user=user)
    log.entries.append(UndoEntry(Kind.STORE, user))
    log.save()
    return log


def remove(log: JobLog) -> None:
    """Delete the (now empty) log and its directory."""
    for name in (LOG_NAME, f".{LOG_NAME}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (log.path.parent / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        log.path.parent.rmdir()
