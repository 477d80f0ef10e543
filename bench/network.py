"""VM-to-VM throughput and latency on the private network: across hosts next to one host.

Needs root: it brings up a 2-host sandbox of its own under /var/tmp and always
tears it down.  One ``vcluster alloc -N2 -c 1 tiny:3`` cluster: two VMs share a
host, the third runs on the other, so in the same run and in alternating rounds:

  same host:    vmA -> vmB through the host's bridge;
  across hosts: vmA -> vmC through the bridge, the VXLAN tunnel and the underlay.

Throughput is ``iperf3 -c ADDRESS -t SECONDS`` (TCP, the sender's figure),
latency the average round trip of ``ping -c 20 -i 0.2``, both run inside the
guests through their serial consoles.  The figures and the across/same ratios
are printed (target: throughput across / same >= 0.8).  Under TCG the guests'
CPUs limit both paths; the ratio is what this measures.

    python3 bench/network.py [--rounds 3] [--seconds 5] [--images DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from tests.support_console import GuestShell
    from vcluster.sandbox.state import SandboxState

if __package__ in (None, ""):  # run as ``python3 bench/network.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOSTS = ("h1", "h2")
FLAG = "bench-network-done"
READY_TIMEOUT = 180.0


def fail(message: str) -> NoReturn:
    raise SystemExit(f"bench/network.py: {message}")


@contextmanager
def sandbox(images: Path) -> Iterator[SandboxState]:
    """A 2-host sandbox in a new directory, torn down (and removed) at the end."""
    from vcluster.run import run
    from vcluster.sandbox.state import require

    parent = Path(tempfile.mkdtemp(prefix="vcluster-bench-net-", dir="/var/tmp"))
    directory = parent / "sb"
    vcluster = [sys.executable, "-m", "vcluster", "sandbox"]
    try:
        parent.chmod(0o755)
        up = run([*vcluster, "up", "--hosts", str(len(HOSTS)), "--images", str(images),
                  "--dir", str(directory)], check=False, timeout=180)
        if up.returncode != 0:
            fail(f"vcluster sandbox up failed:\n{up.stdout}{up.stderr}")
        yield require(directory)
    finally:
        down = run([*vcluster, "down", "--dir", str(directory)], check=False, timeout=180)
        shutil.rmtree(parent, ignore_errors=True)
        if down.returncode != 0:
            print(f"bench/network.py: sandbox down failed:\n{down.stdout}{down.stderr}",
                  file=sys.stderr)


@contextmanager
def cluster(box: SandboxState, flags: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``vcluster alloc`` of tiny:3 over both hosts, its command waiting for our flag."""
    from vcluster.run import spawn
    from vcluster.sandbox.use import command

    wait = f"while [ ! -e {flags}/{FLAG} ]; do sleep 0.2; done"
    cmd = command(box, ["vcluster", "alloc", "-N2", "-c", "1", "-E", wait, "tiny:3"])
    proc = spawn(cmd.argv, env=cmd.env, cwd=cmd.cwd, stderr=subprocess.PIPE,
                 new_session=True)
    assert proc.stderr is not None
    text = ""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            text += line
            if re.search(r"VMs? ready in ", line):
                break
            if time.monotonic() > deadline:
                fail(f"the cluster was not ready in {READY_TIMEOUT:g} s:\n{text}")
        else:
            fail(f"vcluster alloc ended before the cluster was ready:\n{text}")
        job = re.search(r"vcluster: job (\d+): starting", text)
        if job is None:
            fail(f"no job id in alloc's output:\n{text}")
        yield str(job.group(1)), proc
    finally:
        (flags / FLAG).touch()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def shells(box: SandboxState, job: str) -> dict[str, list[GuestShell]]:
    """The VMs' console shells by host."""
    from tests.support_console import GuestShell
    from vcluster.sandbox.vconf import machine_layout

    by_host: dict[str, list[GuestShell]] = {h: [] for h in HOSTS}
    for index in range(3):
        for host in HOSTS:
            files = machine_layout(Path(box.dir), host).vm(job, index)
            if files.console_socket.exists():
                by_host[host].append(GuestShell(f"vm{index}@{host}", files))
    return by_host


def address(shell: GuestShell) -> str:
    index = int(shell.name[2:shell.name.index("@")])
    return f"10.200.0.{index + 1}"  # the sample private network, VM i at .i+1


def throughput(client: GuestShell, server: GuestShell, seconds: int) -> float:
    """Mbit/s of a TCP stream from ``client`` to ``server`` (iperf3, the sender's figure)."""
    out = client.check(f"iperf3 -c {address(server)} -t {seconds} -f m",
                       timeout=seconds + 60)
    sender = [line for line in out.splitlines() if line.rstrip().endswith("sender")]
    found = re.search(r"([0-9.]+) Mbits/sec", sender[-1]) if sender else None
    if found is None:
        fail(f"no iperf3 sender line from {client.name}:\n{out}")
    return float(found.group(1))


def latency(client: GuestShell, server: GuestShell) -> float:
    """Average round trip in ms of 20 pings."""
    out = client.check(f"ping -c 20 -i 0.2 {address(server)}", timeout=60)
    found = re.search(r"= [0-9.]+/([0-9.]+)/", out)
    if found is None:
        fail(f"no ping summary from {client.name}:\n{out}")
    return float(found.group(1))


def bench(box: SandboxState, rounds: int, seconds: int) -> None:
    flags = Path(tempfile.mkdtemp(prefix="vcluster-bench-flags-", dir="/var/tmp"))
    flags.chmod(0o1777)
    try:
        with cluster(box, flags) as (job, _proc):
            by_host = shells(box, job)
            pair = next((vms for vms in by_host.values() if len(vms) == 2), None)
            lone = next((vms for vms in by_host.values() if len(vms) == 1), None)
            if pair is None or lone is None:
                fail(f"expected two VMs on one host and one on the other: {by_host}")
            a, b = pair
            (c,) = lone
            for server in (b, c):
                server.check("iperf3 -s -D")
                a.check(f"for _ in $(seq 30); do ping -c 1 -W 1 {address(server)} "
                        ">/dev/null && break; done; ping -c 1 -W 2 " + address(server))
            print(f"bench network: job {job}: {a.name} -> {b.name} (same host), "
                  f"{a.name} -> {c.name} (across hosts); {rounds} rounds of {seconds} s")
            same: dict[str, list[float]] = {"mbit": [], "ms": []}
            across: dict[str, list[float]] = {"mbit": [], "ms": []}
            for _ in range(rounds):
                same["mbit"].append(throughput(a, b, seconds))
                across["mbit"].append(throughput(a, c, seconds))
                across["ms"].append(latency(a, c))
                same["ms"].append(latency(a, b))
            report(same, across)
            for shell in (a, b, c):
                shell.close()
    finally:
        shutil.rmtree(flags, ignore_errors=True)


def report(same: dict[str, list[float]], across: dict[str, list[float]]) -> None:
    def line(label: str, values: list[float], unit: str) -> str:
        return (f"bench network: {label:<34} median {statistics.median(values):8.2f} {unit} "
                f"(min {min(values):.2f}, max {max(values):.2f})")

    print(line("throughput, same host", same["mbit"], "Mbit/s"))
    print(line("throughput, across hosts", across["mbit"], "Mbit/s"))
    print(line("latency (avg rtt), same host", same["ms"], "ms"))
    print(line("latency (avg rtt), across hosts", across["ms"], "ms"))
    ratio = statistics.median(across["mbit"]) / statistics.median(same["mbit"])
    slower = statistics.median(across["ms"]) / statistics.median(same["ms"])
    verdict = "meets" if ratio >= 0.8 else "MISSES"
    print(f"bench network: throughput across / same host = {ratio:.2f} ({verdict} the 0.8 "
          f"target); latency across / same = {slower:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    parser.add_argument("--images", type=Path, default=None,
                        help="the repository holding tiny (default $VCLUSTER_TEST_IMAGES "
                             "or /var/cache/vcluster-test/images)")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        fail("--rounds and --seconds must be at least 1")
    if os.geteuid() != 0:
        fail("needs root (it brings up a sandbox: namespaces, SLURM, etcd, agents)")
    from bench.boot_tiny import DEFAULT_IMAGES

    images: Path = (args.images or DEFAULT_IMAGES).absolute()
    with sandbox(images) as box:
        bench(box, args.rounds, args.seconds)


if __name__ == "__main__":
    main()
