"""Debian packages as the build host's apt sees them: versions, mirror, downloads."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from vcluster.errors import CommandError, ImageError
from vcluster.run import run

SOURCES_DIR = Path("/etc/apt/sources.list.d")
SOURCES_LIST = Path("/etc/apt/sources.list")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def find_mirror(suite: str) -> str:
    """The Debian mirror the build host uses for ``suite`` (deb822 or one-line sources)."""
    if SOURCES_DIR.is_dir():
        for path in sorted(SOURCES_DIR.glob("*.sources")):
            for stanza in _stanzas(path.read_text(errors="replace")):
                if stanza.get("Enabled", "yes") == "no" or "deb" not in stanza.get("Types", ""):
                    continue
                if suite in stanza.get("Suites", "").split():
                    return stanza.get("URIs", "").split()[0]
    lists = [SOURCES_LIST, *(sorted(SOURCES_DIR.glob("*.list")) if SOURCES_DIR.is_dir() else [])]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    return DEFAULT_MIRROR


def show(package: str) -> dict[str, str]:
    """``apt-cache show`` of the candidate version of ``package``."""
    return show_all([package])[package]


def show_all(names: list[str]) -> dict[str, dict[str, str]]:
    """``apt-cache show`` of the candidate versions of ``names`` (one apt-cache call)."""
    if not names:
        return {}
    try:
        out = run(["apt-cache", "show", "--no-all-versions", *names]).stdout
    except CommandError as e:
        raise ImageError(f"a package of {', '.join(names)} is not known to apt on this host "
                         f"(run apt-get update?): {e}") from e
    found = {stanza.get("Package", ""): stanza for stanza in _stanzas(out)}
    missing = [name for name in names if name not in found]
    if missing:
        raise ImageError(f"no installable version of {', '.join(missing)} "
                         "(a virtual package? run apt-get update?)")
    return {name: found[name] for name in names}


def versions(packages: Iterable[str]) -> dict[str, str]:
    """Candidate version of each package."""
    return {name: fields.get("Version", "") for name, fields in show_all(list(packages)).items()}


def kernel_package(meta: str) -> tuple[str, str]:
    """The real kernel image package behind a meta package such as linux-image-cloud-amd64."""
    fields = show(meta)
    for dep in fields.get("Depends", "").split(","):
        name = dep.strip().split()[0] if dep.strip() else ""
        if name.startswith("linux-image-"):
            return name, show(name).get("Version", "")
    if meta.startswith("linux-image-") and re.search(r"\d", meta):
        return meta, fields.get("Version", "")
    raise ImageError(f"cannot find the kernel image package behind {meta!r}")


def download(packages: Iterable[str], dest: Path, cache: Path | None = None) -> list[Path]:
    """Download the candidate .debs of ``packages`` into ``dest`` (reusing ``cache``)."""
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    names = list(packages)
    candidates = show_all(names)
    for name in names:
        fields = candidates[name]
        filename = Path(fields.get("Filename", "")).name
        cached = cache / filename if cache is not None and filename else None
        if cached is not None and cached.is_file():
            target = dest / filename
            shutil.copy2(cached, target)
            out.append(target)
            continue
        before = set(dest.glob("*.deb"))
        try:
            run(["apt-get", "download", "-q", f"{name}={fields.get('Version', '')}"], cwd=dest)
        except CommandError as e:
            raise ImageError(f"cannot download {name}: {e}") from e
        new = sorted(set(dest.glob("*.deb")) - before)
        if not new:
            raise ImageError(f"apt-get download {name} produced no .deb file")
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copy2(new[0], cache / (filename or new[0].name))
        out.append(new[0])
    return out
