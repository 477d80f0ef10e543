"""Image recipes: YAML files in the vmbetter tradition (parents, packages, overlay, postbuild).

A recipe names its parents (shipped recipe names or paths); the resolved
``Recipe`` is the flattened result: packages, exclusions, overlays and
postbuild commands of every ancestor first, scalar settings from the nearest
recipe that sets them.  Every error names the file, line and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vcluster.errors import ConfigError, ImageError, Origin
from vcluster.images.repo import DEFAULT_USER, USER_NAME_RE
from vcluster.schema.fields import Section
from vcluster.schema.source import Node, load_yaml

KINDS = ("disk", "initramfs")
RECIPE_KEYS = ("description", "parents", "kind", "suite", "mirror", "packages", "exclude",
               "overlay", "postbuild", "size", "kernel", "modules", "append", "user")
# Debian policy 5.6.7 (single letters allowed here for brevity in tests and examples)
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
DEFAULT_SIZE = 2 << 30
DEFAULT_SUITE = "bookworm"
DEFAULT_KERNEL = "linux-image-cloud-amd64"


def shipped_dir() -> Path:
    """The recipes that come with vcluster (package data)."""
    return Path(__file__).resolve().parent / "recipes"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


@dataclass(frozen=True)
class RecipeFile:
    """One recipe file as written, before its parents are merged in."""

    path: Path
    parents: tuple[tuple[str, Origin], ...] = ()
    description: str | None = None
    kind: str | None = None
    suite: str | None = None
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overlay: Path | None = None
    postbuild: tuple[str, ...] = ()
    size: int | None = None
    kernel: str | None = None
    modules: tuple[str, ...] = ()
    append: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A recipe with its parents merged in: everything a build needs to know."""

    name: str
    path: Path
    kind: str
    description: str = ""
    suite: str = DEFAULT_SUITE
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overlays: tuple[Path, ...] = ()
    postbuild: tuple[str, ...] = ()
    size: int = DEFAULT_SIZE
    kernel: str = DEFAULT_KERNEL
    modules: tuple[str, ...] = ()
    append: str = ""
    user: str = DEFAULT_USER
    files: tuple[Path, ...] = field(default=())

    def settings(self) -> dict[str, object]:
        """The settings that define the build's result (hashed to decide reuse)."""
        return {
            "kind": self.kind, "suite": self.suite, "mirror": self.mirror,
            "packages": list(self.packages), "exclude": list(self.exclude),
            "postbuild": list(self.postbuild),
            "size": self.size, "kernel": self.kernel, "modules": list(self.modules),
            "append": self.append, "user": self.user,
        }


def _names(sec: Section, key: str, what: str) -> tuple[str, ...]:
    values = sec.strings(key, expected=what)
    for value in values:
        if not value.strip():
            raise sec.error(key, "an empty item", what)
    return values


def _package_names(sec: Section, key: str, what: str) -> tuple[str, ...]:
    values = _names(sec, key, what)
    for value in values:
        if not _PACKAGE_RE.match(value):
            raise sec.error(key, f"{value!r} is not a Debian package name",
                            "lower-case letters, digits and + - . (starting with a letter "
                            "or digit)")
    return values


def _user_name(sec: Section) -> str | None:
    user = sec.string("user", expected="a user name")
    if user is not None and not USER_NAME_RE.match(user):
        raise sec.error("user", f"{user!r} is not a user name",
                        "lower-case letters, digits, _ and - (starting with a letter or _), "
                        "at most 32 characters")
    return user


def parse_recipe(node: Node | None, path: Path) -> RecipeFile:
    """Validate one recipe file."""
    if node is None:
        raise ConfigError(Origin(path, 1), "", "the recipe is empty",
                          "a mapping with at least kind or parents")
    sec = Section(node, "", "a recipe: a mapping with keys such as kind, packages, postbuild")
    parents: list[tuple[str, Origin]] = []
    pnode = sec.raw("parents")
    for name in _names(sec, "parents", "a list of recipe names or paths"):
        parents.append((name, pnode.origin if pnode is not None else node.origin))
    kind = sec.string("kind")
    if kind is not None and kind not in KINDS:
        raise sec.error("kind", f"{kind!r} is not allowed", "one of: " + ", ".join(KINDS))
    overlay = sec.file_path("overlay", path.parent)
    if overlay is not None and not overlay.is_dir():
        raise sec.error("overlay", f"{overlay}: no such directory", "a directory to copy over /")
    mirror = sec.string("mirror")
    if mirror is not None and not mirror.startswith(("http://", "https://", "file:/")):
        raise sec.error("mirror", f"{mirror!r} is not a URL", "an http://, https:// or file: URL")
    postbuild = sec.strings("postbuild", expected="a list of shell commands")
    append = sec.string("append")
    out = RecipeFile(
        path=path,
        parents=tuple(parents),
        description=sec.string("description"),
        kind=kind,
        suite=sec.string("suite"),
        mirror=mirror,
        packages=_package_names(sec, "packages", "a list of Debian package names"),
        exclude=_package_names(sec, "exclude", "a list of Debian package names"),
        overlay=overlay,
        postbuild=postbuild,
        size=sec.size("size"),
        kernel=sec.string("kernel", expected="a Debian kernel package name"),
        modules=_names(sec, "modules", "a list of kernel module names"),
        append=append,
        user=_user_name(sec),
    )
    sec.done(RECIPE_KEYS)
    return out


def find_recipe(ref: str, *, near: Path | None = None) -> Path:
    """A recipe reference: a path to a YAML file, or a name (next to ``near``, then shipped)."""
    candidate = Path(ref).expanduser()
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        if near is not None and not candidate.is_absolute():
            candidate = near / candidate
        if not candidate.is_file():
            raise ImageError(f"recipe {ref!r}: {candidate}: no such file")
        return candidate
    places = ([near] if near is not None else []) + [shipped_dir()]
    for place in places:
        path = place / f"{ref}.yaml"
        if path.is_file():
            return path
    raise ImageError(
        f"recipe {ref!r} not found in {', '.join(str(p) for p in places)} "
        f"(shipped recipes: {', '.join(shipped_names()) or 'none'}; or give a path to a YAML file)")


def _load_chain(path: Path, seen: tuple[Path, ...]) -> list[RecipeFile]:
    """The recipe files from the farthest ancestor to ``path`` itself."""
    real = path.resolve()
    if real in seen:
        chain = " -> ".join(str(p) for p in (*seen, real))
        raise ImageError(f"recipe parents form a cycle: {chain}")
    recipe = parse_recipe(load_yaml(path), path)
    out: list[RecipeFile] = []
    for name, origin in recipe.parents:
        try:
            parent = find_recipe(name, near=path.parent)
        except ImageError as e:
            raise ConfigError(origin, "parents", str(e)) from e
        for item in _load_chain(parent, (*seen, real)):
            if item.path.resolve() not in {o.path.resolve() for o in out}:
                out.append(item)
    out.append(recipe)
    return out


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def load_recipe(ref: str) -> Recipe:
    """Find, parse and flatten a recipe (a shipped name or a YAML path)."""
    path = find_recipe(ref)
    chain = _load_chain(path, ())

    def last(attr: str) -> object:
        for item in reversed(chain):
            value = getattr(item, attr)
            if value is not None:
                return value
        return None

    kind = last("kind")
    if kind is None:
        raise ConfigError(Origin(path, 1), "kind", "missing (and no parent sets it)",
                          "one of: " + ", ".join(KINDS))
    name = path.stem
    size = last("size")
    if kind == "disk":
        for item in chain:
            if item.exclude:
                raise ImageError(f"recipe {name}: {item.path}: exclude is for kind initramfs "
                                 "(debootstrap resolves a disk's packages)")
    return Recipe(
        name=name,
        path=path,
        kind=str(kind),
        description=str(last("description") or ""),
        suite=str(last("suite") or DEFAULT_SUITE),
        mirror=str(mirror) if (mirror := last("mirror")) is not None else None,
        packages=_unique([p for item in chain for p in item.packages]),
        exclude=_unique([p for item in chain for p in item.exclude]),
        overlays=tuple(item.overlay for item in chain if item.overlay is not None),
        postbuild=tuple(c for item in chain for c in item.postbuild),
        size=size if isinstance(size, int) else DEFAULT_SIZE,
        kernel=str(last("kernel") or DEFAULT_KERNEL),
        modules=_unique([m for item in chain for m in item.modules]),
        append=str(last("append") or ""),
        user=str(last("user") or DEFAULT_USER),
        files=tuple(item.path for item in chain),
    )
