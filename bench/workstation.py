"""Persistent clusters: ``vcluster cluster create`` + ``start`` of tiny:4 to all-ready, next
to a dali-style sequence of ``virsh define`` + ``virsh start`` calls, in the same run.

(a) is the whole of vcluster's work: planning, the record, four seeds, the
cluster's two libvirt networks, four domains defined, then started and waited
for (each VM's ready line on its console).  (b) is what dali's scripts do once
the disks and domain XML exist: for each VM ``virsh define`` and ``virsh
start`` (here the very XML vcluster wrote, renamed, on the same files and
networks), then the same wait.  Rounds alternate (a) and (b).  Run as root
(``qemu:///system``); libvirtd is started as the tests start it if none
answers.

    python3 bench/workstation.py [--rounds 3] [--images DIR]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as ``python3 bench/workstation.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VMS = 4
NAME = "wsbench"
TIMEOUT = 180.0


def vcluster(env: dict[str, str], *args: str) -> float:
    """Run ``vcluster ARGS``; its wall time (an error if it fails)."""
    start = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "vcluster"), *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vcluster {' '.join(args)}: {done.stderr.strip()}")
    return time.monotonic() - start


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_ready(logs: Sequence[tuple[Path, int, str]], start: float) -> float:
    """Seconds from ``start`` until every log shows its marker past its offset."""
    pending = list(logs)
    while pending:
        pending = [(log, offset, marker) for log, offset, marker in pending
                   if marker not in _tail(log, offset)]
        if time.monotonic() - start > TIMEOUT:
            raise RuntimeError(f"not ready after {TIMEOUT:g} s: {[str(p[0]) for p in pending]}")
        time.sleep(0.02)
    return time.monotonic() - start


def _tail(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def one_round(env: dict[str, str], workdir: Path, xml_dir: Path) -> tuple[float, float, float]:
    """(a) create + start, (b) virsh define + start; and (a)'s create alone."""
    from vcluster.vm.guest import TINY_READY

    created = vcluster(env, "cluster", "create", NAME, f"tiny:{VMS}")
    start = time.monotonic() - created
    vcluster(env, "cluster", "start", NAME)
    a = time.monotonic() - start
    logs = [workdir / f"vm{i}" / "console.log" for i in range(VMS)]
    xmls = []
    for i in range(VMS):
        xml = virsh("dumpxml", f"vc-root-{NAME}-vm{i}")
        xml = re.sub(r"<uuid>.*?</uuid>", "", xml).replace(f"vc-root-{NAME}-vm{i}",
                                                          f"dali-vm{i}")
        path = xml_dir / f"dali-vm{i}.xml"
        path.write_text(xml)
        xmls.append(path)
    vcluster(env, "cluster", "destroy", NAME)
    try:
        offsets = [(log, size(log), f"{TINY_READY}vm{i}") for i, log in enumerate(logs)]
        start = time.monotonic()
        for i, path in enumerate(xmls):
            virsh("define", str(path))
            virsh("start", f"dali-vm{i}")
        b = wait_ready(offsets, start)
    finally:
        for i in range(VMS):
            subprocess.run(["virsh", "-q", "destroy", f"dali-vm{i}"], capture_output=True,
                           check=False)
            subprocess.run(["virsh", "-q", "undefine", f"dali-vm{i}"], capture_output=True,
                           check=False)
        vcluster(env, "cluster", "remove", "--force", NAME)
    return a, b, created


def summary(label: str, samples: Sequence[float]) -> str:
    return (f"bench workstation: {label:<58} median {statistics.median(samples):6.2f} s "
            f"(min {min(samples):.2f}, max {max(samples):.2f}; {len(samples)} rounds)")


def main() -> None:
    from tests.support_images import images_dir
    from tests.support_libvirt import running_libvirtd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=Path, default=images_dir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vcluster-ws-") as tmp, running_libvirtd():
        base = Path(tmp)
        (base / "home" / ".vcluster").mkdir(parents=True)
        (base / "home" / ".vcluster" / "images").symlink_to(args.images.resolve())
        (base / "conf").mkdir()
        env = {"HOME": str(base / "home"), "VCLUSTER_CONF": str(base / "conf"),
               "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
               "LANG": "C.UTF-8"}
        workdir = Path("/var/lib/vcluster/work") / NAME
        a: list[float] = []
        b: list[float] = []
        made: list[float] = []
        for i in range(args.rounds):
            ra, rb, rc = one_round(env, workdir, base)
            a.append(ra)
            b.append(rb)
            made.append(rc)
            print(f"round {i + 1}/{args.rounds}: vcluster create + start {ra:.2f} s (create "
                  f"{rc:.2f} s); virsh define + start x{VMS} {rb:.2f} s", file=sys.stderr)
    print(f"bench workstation: tiny:{VMS} persistent cluster to all-ready, qemu:///system "
          "(TCG)")
    print(summary(f"(a) vcluster cluster create + start tiny:{VMS}", a))
    print(summary("    of which cluster create (seeds, networks, domains)", made))
    print(summary(f"(b) virsh define + virsh start x{VMS} (dali-style, same XML)", b))
    print(summary("(a) - (b): what vcluster adds", [x - y for x, y in zip(a, b, strict=True)]))


if __name__ == "__main__":
    main()
