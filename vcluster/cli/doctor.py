"""``vcluster doctor``: can this machine run a cluster, and if not, what to do about it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from vcluster.config.loader import Config

KVM_PROBE = 5.0  # seconds the KVM test boot may take: a hung KVM is said, never waited on
COMMAND_TIMEOUT = 10.0

HELP = """Check what running a cluster here needs, one line per check, each
with what to do when it fails:

\b
  qemu        QEMU present, and its version
  qemu-img    qemu-img present (overlays, disks, save)
  kvm         KVM usable, or why not (TCG is used then: slower, works)
  backend     the batch backend: SLURM reachable (scontrol ping), or local
  store       the state store reachable (etcd, or the sqlite file)
  agent       the host agent reachable (SLURM), or why none is needed
  images      the image repositories readable, and what they hold
  cloud-init  cloud-init's schema validator, for vcluster check's user-data

\b
ok: fine. warn: works, but read the line. FAIL: a cluster cannot run until
it is fixed. Exit status: 0 when the configured backend can run a cluster
(no FAIL), 1 otherwise; 2 for a configuration that cannot be read.
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, FAIL
    text: str


def _first_line(argv: list[str]) -> tuple[str | None, str]:
    """The first line ``argv`` prints, or None and why it could not run."""
    from vcluster.errors import CommandError
    from vcluster.run import run

    try:
        out = run(argv, timeout=COMMAND_TIMEOUT, check=True)
    except CommandError as e:
        return None, str(e)
    lines = (str(out.stdout) or str(out.stderr)).strip().splitlines()
    return (lines[0] if lines else ""), ""


def check_qemu(config: Config) -> Check:
    binary = config.batch.qemu.binary
    if shutil.which(binary) is None:
        return Check("qemu", "FAIL", f"{binary} not found on PATH: install QEMU "
                     "(apt-get install qemu-system-x86 qemu-utils), or set qemu.binary in "
                     "batch.yaml")
    line, why = _first_line([binary, "--version"])
    if line is None:
        return Check("qemu", "FAIL", f"{binary} --version failed: {why}")
    return Check("qemu", "ok", f"{line} ({shutil.which(binary)})")


def check_qemu_img() -> Check:
    if shutil.which("qemu-img") is None:
        return Check("qemu-img", "FAIL", "qemu-img not found on PATH: install it "
                     "(apt-get install qemu-utils)")
    line, why = _first_line(["qemu-img", "--version"])
    return Check("qemu-img", "ok" if line is not None else "FAIL", line or why)


def _probe_kernel(config: Config) -> Path | None:
    """A kernel to test-boot under KVM: the tiny image's, else the host's."""
    from vcluster.cluster import image_repositories
    from vcluster.errors import VclusterError
    from vcluster.images.repo import resolve_image

    try:
        kernel = resolve_image("tiny", image_repositories(config)).kernel
        if kernel is not None:
            return kernel
    except VclusterError:
        pass
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    readable = [k for k in found if os.access(k, os.R_OK)]
    return readable[-1] if readable else None


def check_kvm(config: Config) -> Check:
    from vcluster.vm.accel import kvm_api_problem, kvm_boot_problem

    accel = config.batch.qemu.accel
    if accel == "tcg":
        return Check("kvm", "ok", "not used: qemu.accel is tcg")
    if shutil.which(config.batch.qemu.binary) is None:
        return Check("kvm", "warn", "not checked: no QEMU to test-boot with (see qemu)")
    problem = kvm_api_problem()
    if problem is None:
        kernel = _probe_kernel(config)
        if kernel is None:
            return Check("kvm", "warn", "/dev/kvm answers, but no kernel to test-boot was "
                         "found (build the tiny image: vcluster image build tiny)")
        started = time.monotonic()
        problem = kvm_boot_problem(config.batch.qemu.binary, kernel, KVM_PROBE)
        if problem is None:
            return Check("kvm", "ok", f"usable: a test boot printed its banner in "
                         f"{time.monotonic() - started:.1f} s")
    if accel == "kvm":
        return Check("kvm", "FAIL", f"unusable ({problem}), and qemu.accel is kvm: set "
                     "qemu.accel to auto or tcg in batch.yaml")
    return Check("kvm", "warn", f"unusable: {problem}; VMs run under TCG (slower; set "
                 "qemu.accel: tcg to skip this probe)")


def check_backend(config: Config) -> Check:
    batch = config.batch
    if batch.local:
        missing = [t for t in ("setpriv",) if shutil.which(t) is None]
        if missing:
            return Check("backend", "FAIL", "local: setpriv not found (apt-get install "
                         "util-linux): without it QEMU could outlive its runner")
        if batch.rootless and shutil.which("vde_switch") is None:
            return Check("backend", "FAIL", "local, rootless: vde_switch not found: a normal "
                         "user's private network is a user-space switch (apt-get install vde2)")
        mode = "rootless, as a normal user" if batch.rootless else "as root, with the " \
            "agent's code in the launcher"
        where = " (the embedded default: no /etc/vcluster)" if batch.embedded else ""
        return Check("backend", "ok", f"local: clusters on this machine, {mode}{where}")
    if shutil.which("scontrol") is None:
        return Check("backend", "FAIL", "slurm: scontrol not found: install the SLURM "
                     "client (apt-get install slurm-client), or use batch.backend: local")
    line, why = _first_line(["scontrol", "ping"])
    if line is None or "DOWN" in line:
        return Check("backend", "FAIL", f"slurm: scontrol ping: {line or why} (is slurmctld "
                     "running and reachable?)")
    return Check("backend", "ok", f"slurm: {line}")


def check_store(config: Config) -> Check:
    from vcluster.errors import VclusterError
    from vcluster.session import open_user_store

    store_config = config.batch.store
    where = (str(store_config.database()) if store_config.backend == "sqlite"
             else ", ".join(store_config.endpoints))
    try:
        with open_user_store(config.batch) as store:
            count = len(store.get_prefix(store_config.prefix + "/"))
    except VclusterError as e:
        fix = ("make its directory yours, or set store.path" if store_config.backend ==
               "sqlite" else "is etcd running, and does the agent hand out credentials?")
        return Check("store", "FAIL", f"{store_config.backend} at {where}: {e} ({fix})")
    return Check("store", "ok", f"{store_config.backend} at {where}: {count} keys")


def check_agent(config: Config) -> Check:
    batch = config.batch
    if batch.rootless:
        return Check("agent", "ok", "none needed: a normal user's local clusters are rootless "
                     "(user-space switch, user-mode NAT)")
    if batch.local:
        return Check("agent", "ok", "none needed: root's local clusters run the agent's code "
                     "in the launcher")
    from vcluster.agent.client import AgentClient, AgentError

    path = batch.directories.layout.agent_socket
    try:
        answer = AgentClient(path, timeout=COMMAND_TIMEOUT).ping()
    except AgentError as e:
        return Check("agent", "FAIL", f"{e} (start it: systemctl start vcluster-agent)")
    return Check("agent", "ok", f"vcluster-agent of {answer.host} at {path}, protocol "
                 f"{answer.version}")


def check_images(config: Config) -> Check:
    from vcluster.cluster import named_repositories
    from vcluster.images.repo import Repository

    found, problems = [], []
    for label, root in named_repositories(config).items():
        if not root.exists():
            found.append(f"{label} {root}: none yet")
            continue
        if not os.access(root, os.R_OK | os.X_OK):
            problems.append(f"{label} {root}: not readable by you")
            continue
        names = Repository(root).names()
        found.append(f"{label} {root}: {', '.join(names) or 'empty'}")
    if problems:
        return Check("images", "FAIL", "; ".join(problems + found))
    text = "; ".join(found)
    if "tiny" not in text and "debian" not in text:
        return Check("images", "warn", f"{text} (build one: vcluster image build tiny)")
    return Check("images", "ok", text)


def check_cloud_init() -> Check:
    if shutil.which("cloud-init") is None:
        return Check("cloud-init", "warn", "not installed: vcluster check reads templates' "
                     "user-data as YAML only (apt-get install cloud-init for its schema check; "
                     "the guests have their own)")
    line, _why = _first_line(["cloud-init", "--version"])
    return Check("cloud-init", "ok", f"{line or 'present'}: vcluster check validates "
                 "templates' user-data with cloud-init schema")


def checks(config: Config) -> Iterator[Callable[[], Check]]:
    yield lambda: check_qemu(config)
    yield check_qemu_img
    yield lambda: check_kvm(config)
    yield lambda: check_backend(config)
    yield lambda: check_store(config)
    yield lambda: check_agent(config)
    yield lambda: check_images(config)
    yield check_cloud_init


@click.command(help=HELP)
def doctor() -> None:
    from vcluster.cli.common import load_config

    config = load_config()
    failed = False
    for run_check in checks(config):
        result = run_check()
        failed = failed or result.status == "FAIL"
        click.echo(f"{result.status:<5} {result.name:<11} {result.text}")
    raise SystemExit(1 if failed else 0)
