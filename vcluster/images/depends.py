"""The run-time dependencies of an initramfs's packages, as the build host's apt sees them.

``apt-cache depends --recurse`` (Depends and Pre-Depends only) prints apt's
dependency graph of the candidate versions: every alternative of every
``a | b`` dependency and every provider of a virtual package.  ``resolve``
walks that graph from the listed packages, choosing one alternative per
dependency the way apt does (one already chosen, else the first), and
leaves out the packages a busybox initramfs does without: the built-in
``BUILTIN_EXCLUDE`` and the recipe's ``exclude``.  A dependency that an
excluded package could satisfy is dropped whole, with what lies beyond it.
Listed packages are always installed, excluded or not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from vcluster.errors import CommandError, ImageError
from vcluster.run import run

APT_DEPENDS = ("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
               "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances")
DEPENDENCY_TYPES = ("Depends", "PreDepends")

# What a dependency alone never brings into an initramfs, and why.  The initramfs
# runs no maintainer scripts (they are what most of these serve), keeps no dpkg
# database, starts no services (busybox's /init is all there is), has root as its
# only user, and busybox's applets stand in for Debian's essential tools.
BUILTIN_EXCLUDE: dict[str, str] = {
    # maintainer-script machinery
    "debconf": "questions asked by maintainer scripts",
    "cdebconf": "questions asked by maintainer scripts (debconf-2.0)",
    "ucf": "configuration-file merging in maintainer scripts",
    "dpkg": "no package database in an initramfs",
    "install-info": "the info index (documentation is dropped)",
    "adduser": "system users made by maintainer scripts (root is the only user)",
    "passwd": "user management (adduser's)",
    "perl-base": "perl runs maintainer scripts and debconf, nothing an initramfs runs",
    "perl": "as perl-base",
    "init-system-helpers": "service registration for systemd/sysvinit (busybox /init)",
    "lsb-base": "init-script helpers (no init scripts run)",
    "sysvinit-utils": "init-script helpers (no init scripts run)",
    "usrmerge": "converting a Debian root to merged /usr (init-system-helpers')",
    "usr-is-merged": "as usrmerge",
    # the essential base system: busybox's applets, the recipe's /init and the
    # build host's ldconfig stand in for it
    "base-files": "Debian's /etc skeleton (the recipe's overlay provides /etc)",
    "base-passwd": "Debian's master passwd and group files",
    "libc-bin": "ldconfig, locale, getent: the build runs the host's ldconfig",
    "bash": "busybox sh",
    "dash": "busybox sh",
    "coreutils": "busybox applets",
    "util-linux": "busybox applets",
    "mount": "busybox applets",
    "bsdutils": "busybox applets",
    "login": "busybox applets",
    "debianutils": "busybox applets",
    "findutils": "busybox applets",
    "grep": "busybox applets",
    "sed": "busybox applets",
    "tar": "busybox applets",
    "gzip": "busybox applets",
    "diffutils": "busybox applets",
    "hostname": "busybox applets",
    "ncurses-bin": "busybox applets",
}


@dataclass(frozen=True)
class Target:
    """One alternative of a dependency: a package, or a virtual one and its providers."""

    name: str
    virtual: bool = False
    providers: tuple[str, ...] = ()

    def candidates(self) -> tuple[str, ...]:
        """The real packages that satisfy this alternative, apt's preference first."""
        return self.providers if self.virtual else (self.name, *self.providers)

    def __str__(self) -> str:
        return f"<{self.name}>" if self.virtual else self.name


Group = tuple[Target, ...]  # alternatives: ``a | b | c``; any one satisfies it
Graph = dict[str, tuple[Group, ...]]  # real package -> its Depends and Pre-Depends


@dataclass(frozen=True)
class Resolution:
    """What goes into the initramfs: listed packages first, then dependencies as found."""

    packages: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)  # excluded -> the package wanting it


def _base_name(word: str) -> tuple[str, bool]:
    """``<perl:any>`` -> (perl, virtual); ``libc6:amd64`` -> (libc6, real)."""
    virtual = word.startswith("<") and word.endswith(">")
    name = word.strip("<>")
    return name.partition(":")[0], virtual


@dataclass
class _Alternative:
    name: str
    virtual: bool
    providers: list[str] = field(default_factory=list)


def parse_depends(text: str) -> Graph:
    """The graph in ``apt-cache depends`` output.

    Lines at column 0 name a package (``<name>``: virtual, nothing to record);
    ``  Type: name`` is a dependency, `` |Type: name`` an alternative or'ed
    with the next line, and 4-space lines under a dependency its providers.
    """
    raw: dict[str, list[list[_Alternative]]] = {}
    groups: list[list[_Alternative]] | None = None
    open_group = False
    last: _Alternative | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            name, virtual = _base_name(line.strip())
            groups = None if virtual else raw.setdefault(name, [])
            open_group, last = False, None
        elif groups is None:
            continue
        elif line.startswith("    "):
            provider, _ = _base_name(line.strip())
            if last is not None and provider not in last.providers:
                last.providers.append(provider)
        else:
            kind, sep, word = line[2:].partition(":")
            if not sep or kind.strip() not in DEPENDENCY_TYPES:
                open_group, last = False, None
                continue
            name, virtual = _base_name(word.strip())
            last = _Alternative(name, virtual)
            if not open_group:
                groups.append([])
            groups[-1].append(last)
            open_group = line[1] == "|"
    return {package: tuple(tuple(Target(a.name, a.virtual, tuple(a.providers)) for a in group)
                           for group in groups_)
            for package, groups_ in raw.items()}


def resolve(listed: Iterable[str], graph: Graph, exclude: Collection[str]) -> Resolution:
    """The listed packages and their dependencies, without ``exclude`` and what only it needs."""
    chosen: dict[str, None] = dict.fromkeys(listed)
    left_out: dict[str, str] = {}
    queue = deque(chosen)
    while queue:
        package = queue.popleft()
        if package not in graph:
            raise ImageError(f"apt knows no package {package!r} (a virtual package, a typo, "
                             "or run apt-get update?)")
        for group in graph[package]:
            candidates = [c for target in group for c in target.candidates()]
            if any(c in chosen for c in candidates):
                continue
            excluded = [c for c in candidates if c in exclude]
            if excluded:
                left_out.setdefault(excluded[0], package)
                continue
            if not candidates:
                wanted = " | ".join(str(t) for t in group)
                raise ImageError(f"{package} depends on {wanted}, which no package provides")
            chosen[candidates[0]] = None
            queue.append(candidates[0])
    return Resolution(tuple(chosen), dict(sorted(left_out.items())))


def apt_graph(names: list[str]) -> Graph:
    """apt's dependency graph below ``names`` (one ``apt-cache depends --recurse`` call)."""
    try:
        out = run([*APT_DEPENDS, *names]).stdout
    except CommandError as e:
        raise ImageError(f"a package of {', '.join(names)} is not known to apt on this host "
                         f"(run apt-get update?): {e}") from e
    return parse_depends(out)


def closure(listed: Iterable[str], exclude: Iterable[str] = ()) -> Resolution:
    """Resolve ``listed`` against this host's apt, leaving out the built-in list and ``exclude``."""
    names = list(dict.fromkeys(listed))
    if not names:
        return Resolution(())
    return resolve(names, apt_graph(names), {*BUILTIN_EXCLUDE, *exclude})
