"""Image repositories: directories of named images with numbered revisions.

Layout (the rest of vcluster relies on it)::

    <repo>/<name>/<revision>/          revision: 0, 1, 2, ... (0 is the first build)
        image.json                     the ImageInfo below
        disk.qcow2                     kind "disk": the root file system (ext4, no partitions);
                                       a later revision may be a qcow2 layer whose backing
                                       file is the previous revision's disk.qcow2 by ABSOLUTE path
        vmlinuz, initrd.img            kind "disk": kernel and initrd for direct boot with
                                       root=/dev/vda
        initramfs.img                  kind "initramfs": the whole system, next to vmlinuz

``image.json`` holds: ``format`` (1), ``name``, ``revision``, ``kind`` (disk or
initramfs), ``recipe`` (recipe name, or null for a saved revision),
``content_hash`` (hash of the recipe and its resolved package list, or null),
``created`` (ISO 8601, UTC), ``parent`` (the revision this one is a layer
over, or null), ``files`` (role -> file name in the revision directory, roles
``disk``, ``kernel``, ``initrd``, ``initramfs``; an absolute path is allowed
for a file shared with an older revision) and ``append`` (the kernel command
line the image expects) and ``user`` (the image's default login user, the one
whose authorized keys the seed sets: ``root`` when an older image.json lacks
it).

Writes are atomic: a revision is prepared in a hidden temporary directory in
the repository (``Repository.staging``) and renamed into place by
``Repository.commit``; a failure leaves nothing behind.  A reference
``name[@revision]`` is resolved against an ordered list of repositories (the
user's first, then the site's) by ``resolve_image``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vcluster import codec
from vcluster.errors import ImageError, InputError
from vcluster.files import write_atomically

FORMAT = 1
KINDS = ("disk", "initramfs")
ROLES = ("disk", "kernel", "initrd", "initramfs")
INFO_FILE = "image.json"
STAGING_PREFIX = ".build-"  # hidden directories of revisions being made
LOCK_FILE = ".lock"
DEFAULT_USER = "root"
# useradd's default NAME_REGEX (Debian's adduser is stricter), at most 32 characters
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ImageInfo:
    """The contents of ``image.json``."""

    name: str
    kind: str
    files: dict[str, str]
    revision: int = -1
    recipe: str | None = None
    content_hash: str | None = None
    created: str = ""
    parent: int | None = None
    append: str = ""
    user: str = DEFAULT_USER
    made_by: str | None = None  # the user who saved it (None: built)
    source: str | None = None  # what it was saved from: "vm0 of job 12 (debian@2)"
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return codec.to_json(self, indent=2)

    @classmethod
    def from_json(cls, text: str, where: Path) -> ImageInfo:
        info = codec.from_json(cls, text, what=f"{where}: not a valid image description:",
                               error=ImageError)
        if info.format != FORMAT:
            raise ImageError(f"{where}: not a valid image description: format {info.format} "
                             f"is not {FORMAT}")
        if info.kind not in KINDS:
            raise ImageError(f"{where}: not a valid image description: kind {info.kind!r} "
                             f"(expected {' or '.join(KINDS)})")
        if not USER_NAME_RE.match(info.user):
            raise ImageError(f"{where}: not a valid image description: user {info.user!r} "
                             "is not a user name")
        return info


@dataclass(frozen=True)
class Image:
    """One revision of an image in a repository, with the paths of its files."""

    repo: Path
    info: ImageInfo
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.info.name}@{self.info.revision}"

    def file(self, role: str) -> Path | None:
        name = self.info.files.get(role)
        return self.path / name if name else None

    @property
    def disk(self) -> Path | None:
        return self.file("disk")

    @property
    def kernel(self) -> Path | None:
        return self.file("kernel")

    @property
    def initrd(self) -> Path | None:
        """The initrd for a disk image, or the initramfs for an initramfs image."""
        return self.file("initrd") or self.file("initramfs")


REPOSITORIES = ("user", "site")  # repository names, in the order resolve_image is given them


def split_repository(ref: str) -> tuple[str | None, str]:
    """``user:mine@2`` -> (user, mine@2); ``debian`` -> (None, debian)."""
    repo, colon, rest = ref.rpartition(":")
    if not colon:
        return None, ref
    if repo not in REPOSITORIES:
        raise InputError(f"image reference {ref!r}: unknown repository {repo!r} (expected "
                         f"{' or '.join(REPOSITORIES)}, as in user:NAME)")
    return repo, rest


def split_destination(text: str, what: str) -> tuple[str | None, str]:
    """``[REPO:]NAME`` for a new image or revision -> (repository name or None, NAME);
    InputError starting with ``what`` (the argument) if it is not one."""
    from vcluster.config.templates import NAME_RE

    repo, colon, name = text.rpartition(":")
    expected = (f"[REPO:]NAME, REPO one of {', '.join(REPOSITORIES)} and NAME of letters, "
                "digits, '.', '-' and '_', such as user:mine")
    if colon and repo not in REPOSITORIES:
        raise InputError(f"{what}: unknown repository {repo!r} (expected {expected})")
    if not NAME_RE.match(name) or name in (".", ".."):
        raise InputError(f"{what}: {name!r} is not an image name (expected {expected})")
    return (repo or None), name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``debian`` -> (debian, None); ``debian@3`` -> (debian, 3)."""
    name, sep, rev = ref.partition("@")
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"image reference {ref!r}: bad name (expected NAME or NAME@REVISION)")
    if not sep:
        return name, None
    if not rev.isdigit():
        raise InputError(f"image reference {ref!r}: revision {rev!r} is not a whole number "
                         "(expected NAME@REVISION, for example debian@0)")
    return name, int(rev)


class Repository:
    """A directory of images."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r})"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and self.revisions(p.name))

    def revisions(self, name: str) -> list[int]:
        base = self.root / name
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir()
                      if p.name.isdigit() and (p / INFO_FILE).is_file())

    def get(self, name: str, revision: int | None = None) -> Image | None:
        """A revision (the newest when ``revision`` is None), or None."""
        revisions = self.revisions(name)
        if not revisions:
            return None
        rev = revisions[-1] if revision is None else revision
        if rev not in revisions:
            return None
        path = self.root / name / str(rev)
        info_path = path / INFO_FILE
        try:
            info = ImageInfo.from_json(info_path.read_text(), info_path)
        except OSError as e:
            raise ImageError(f"{info_path}: cannot read: {e.strerror}") from e
        # The directory name is the revision (a copied tree stays consistent).
        return Image(self.root, replace(info, revision=rev), path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The repository's own lock (``flock`` on its directory), held while staging
        directories are made or swept."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A temporary directory inside the repository, removed unless committed.

        It is locked (``flock`` on its ``.lock``) while it is in use, and made
        with its lock under the repository's lock, so that ``sweep`` can tell
        the staging directory of a build or save that was killed from one
        that is running.
        """
        parse_ref(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked():
                tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=self.root))
                lock = open(tmp / LOCK_FILE, "w")  # noqa: SIM115 - held for the whole block
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            raise ImageError(f"cannot write to the image repository {self.root}: {e}") from e
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.close()

    def sweep(self) -> list[Path]:
        """Remove the staging directories of builds and saves that died; those removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        with self._locked():
            for tmp in self.root.glob(f"{STAGING_PREFIX}*"):
                try:
                    # a staging directory without its lock file died as it was being made
                    if (tmp / LOCK_FILE).exists():
                        with open(tmp / LOCK_FILE) as lock:
                            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
                except BlockingIOError:
                    continue  # in use
                except OSError:
                    continue  # not ours to remove, or gone already
        return removed

    def commit(self, staging: Path, info: ImageInfo) -> Image:
        """Move a staged revision into place as the next revision of ``info.name``."""
        for role, file in info.files.items():
            if role not in ROLES:
                raise ImageError(f"image {info.name}: unknown file role {role!r}")
            if not Path(file).is_absolute() and not (staging / file).is_file():
                raise ImageError(f"image {info.name}: {file} is missing from the build")
        base = self.root / info.name
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(staging, 0o755)
        (staging / LOCK_FILE).unlink(missing_ok=True)  # the flock stays on the open file
        created = info.created or datetime.now(UTC).isoformat(timespec="seconds")
        revisions = self.revisions(info.name)
        rev = revisions[-1] + 1 if revisions else 0
        while True:
            final = replace(info, revision=rev, created=created)
            write_atomically(staging / INFO_FILE, final.to_json(), mode=0o644)
            try:
                os.rename(staging, base / str(rev))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    rev += 1  # someone else committed this revision first
                    continue
                raise ImageError(f"cannot store {info.name}@{rev} in {self.root}: {e}") from e
            return Image(self.root, final, base / str(rev))


def resolve_image(ref: str, repos: Sequence[Path]) -> Image:
    """Find ``[repo:]name[@revision]`` in the first repository that has it.

    ``repos`` are the user's repository and the site's, in that order
    (``REPOSITORIES``); a ``repo:`` prefix looks in that one alone.
    """
    named, ref = split_repository(ref)
    if named is not None:
        repos = [repos[REPOSITORIES.index(named)]]
    name, revision = parse_ref(ref)
    for root in repos:
        repo = Repository(root)
        if revision is None or revision in repo.revisions(name):
            image = repo.get(name, revision)
            if image is not None:
                return image
    searched = ", ".join(str(r) for r in repos) or "no repositories"
    existing = sorted({n for r in repos for n in Repository(r).names()})
    have = ", ".join(existing) if existing else "none"
    if revision is not None:
        revs = sorted({v for r in repos for v in Repository(r).revisions(name)})
        if revs:
            raise ImageError(f"image {name!r} has no revision {revision} in {searched} "
                             f"(revisions: {', '.join(map(str, revs))})")
    raise ImageError(f"image {ref!r} not found in {searched} (images there: {have}); "
                     "build one with: vcluster image build RECIPE")
