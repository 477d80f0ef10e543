"""Boot time of the ``tiny`` image under QEMU (TCG unless told otherwise).

Prints each boot and the median, in seconds, from QEMU's start to the
``vcluster-tiny: ready`` line on the serial console (seed read, hostname set).

    python bench/boot_tiny.py [--runs 5] [--images DIR] [--accel tcg]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vcluster.errors import VclusterError
from vcluster.images.repo import Image, resolve_image
from vcluster.qemu import VmSpec, build_argv
from vcluster.run import spawn
from vcluster.seed import meta_data, write_seed

READY = "vcluster-tiny: ready"
DEFAULT_IMAGES = Path(os.environ.get("VCLUSTER_TEST_IMAGES", "/var/cache/vcluster-test/images"))


def bench_seed(workdir: Path, index: int) -> Path:
    """A NoCloud seed like a VM's (the tiny image's init reads it before its ready line)."""
    seed = workdir / f"seed{index}.iso"
    write_seed(seed, meta_data=meta_data(f"bench-{index}", f"bench{index}"), user_data="")
    return seed


def boot_to_ready(spec: VmSpec, timeout: float, interval: float = 0.02) -> float:
    """Seconds from QEMU's start to the ready line in ``spec.serial_log``; QEMU is killed then."""
    log = spec.serial_log
    assert log is not None
    start = time.monotonic()
    proc = spawn(build_argv(spec))
    try:
        while time.monotonic() - start < timeout:
            if log.is_file() and READY in log.read_text(errors="replace"):
                return time.monotonic() - start
            if proc.poll() is not None:
                raise SystemExit(f"QEMU exited with status {proc.returncode} before {READY!r}")
            time.sleep(interval)
        raise SystemExit(f"no {READY!r} after {timeout:g} s; see {log}")
    finally:
        proc.kill()
        proc.wait()


def boot_once(image: Image, accel: str, workdir: Path, index: int, timeout: float) -> float:
    assert image.kernel is not None and image.initrd is not None
    spec = VmSpec(name=f"bench{index}", accel=accel, memory=256 << 20, cpus=1,
                  kernel=image.kernel, initrd=image.initrd, append=image.info.append,
                  seed=bench_seed(workdir, index), serial_log=workdir / f"console{index}.log")
    return boot_to_ready(spec, timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    try:
        image = resolve_image("tiny", [args.images])
    except VclusterError as e:
        raise SystemExit(f"boot_tiny: {e}") from e
    times = []
    with tempfile.TemporaryDirectory(prefix="vcl-bench-") as tmp:
        for i in range(args.runs):
            took = boot_once(image, args.accel, Path(tmp), i, args.timeout)
            times.append(took)
            print(f"boot {i + 1}/{args.runs}: {took:.2f} s", file=sys.stderr)
    median = statistics.median(times)
    print(f"tiny ({image.ref}, {args.accel}) boot to ready: median {median:.2f} s "
          f"over {len(times)} boots (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
