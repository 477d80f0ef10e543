"""One VM's life, as one SLURM task: prepare, boot, wait until ready, serve, stop.

``pending → preparing`` (store credentials, the cluster spec, devices from
the agent, overlay, disks, seed) ``→ booting`` (QEMU started as our child)
``→ ready`` (the ready line on the console) and, on SIGTERM/SIGINT/SIGHUP,
``→ stopping`` (ACPI power-down with a bounded wait, then QMP quit, then
SIGKILL) ``→ stopped``.  Any failure publishes ``failed`` with a one-line
reason and the console's last lines, and the runner exits non-zero.  Every
way out removes the VM's files.

QEMU is started with SIGTERM, SIGINT and SIGHUP blocked, so the signal SLURM
sends to every process of a cancelled step reaches only the runner, which
then powers the guest down; and with a parent-death signal, so a runner
killed outright takes its QEMU with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from vcluster.agent.client import AgentClient, AgentError, VmDevices, socket_path
from vcluster.cluster import ClusterSpec, Readiness, VmPlan
from vcluster.config.batch import BatchConfig
from vcluster.errors import VclusterError
from vcluster.hostpaths import VmFiles
from vcluster.identity import user_name
from vcluster.lifecycle import VmState
from vcluster.qemu import SharedMemory, build_argv, show_argv
from vcluster.run import run, spawn
from vcluster.seed import write_seed
from vcluster.session import open_user_store
from vcluster.store.base import Store
from vcluster.store.keys import Keys
from vcluster.store.records import from_json
from vcluster.vm import guest, machine
from vcluster.vm.accel import choose_accel
from vcluster.vm.console import tail_lines
from vcluster.vm.control import Qmp, QmpError
from vcluster.vm.readiness import LogWatcher
from vcluster.vm.state import Publisher
from vcluster.vm.workdir import make_vm_dir, remove_vm_files

log = logging.getLogger(__name__)

POLL = 0.2
QMP_CONNECT_TIMEOUT = 20.0
QUIT_TIMEOUT = 5.0
CONSOLE_TAIL = 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Generous under TCG (two 1-vCPU Debian VMs on two cores took 66 s to cloud-init's end).
READY_TIMEOUTS = {
    (Readiness.FINAL_MESSAGE, "tcg"): 300.0, (Readiness.FINAL_MESSAGE, "kvm"): 120.0,
    (Readiness.TINY_INIT, "tcg"): 60.0, (Readiness.TINY_INIT, "kvm"): 30.0,
}
# The tiny image ignores the ACPI power button; Debian shuts down in seconds.
STOP_TIMEOUTS = {Readiness.FINAL_MESSAGE: 20.0, Readiness.TINY_INIT: 1.0}


@dataclass(frozen=True)
class RunnerOptions:
    job: str
    index: int
    host: str
    ready_timeout: float | None = None  # default: READY_TIMEOUTS
    stop_timeout: float | None = None  # default: STOP_TIMEOUTS


class StopRequested(Exception):
    """A stop signal arrived; unwind to the stopping path."""


def one_line(text: str) -> str:
    return " ".join(text.split())


def image_format(path: Path) -> str:
    """The format of a base image (``qemu-img info``, shared lock: VMs may be using it)."""
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)], timeout=60).stdout
    try:
        return str(json.loads(out)["format"])
    except (ValueError, KeyError) as e:
        raise VclusterError(f"qemu-img info {path}: unexpected answer ({e})") from None


def start_qemu(argv: list[str], stderr: Path, pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """QEMU as our child, deaf to the step's stop signals, killed if we die.

    Blocking the stop signals lets the runner power the guest down when SLURM
    signals the whole step; ``setpriv --pdeathsig`` (util-linux) is what keeps a
    QEMU from outliving a runner killed with SIGKILL, so it is not optional.
    """
    if shutil.which("setpriv") is None:
        raise VclusterError("setpriv not found (install util-linux): without it QEMU could "
                            "outlive its runner")
    prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with open(stderr, "wb") as err:
            return spawn(prefix + argv, stderr=err, pass_fds=pass_fds)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Runner:
    """Runs VM ``options.index`` of job ``options.job`` until stopped; ``run`` is the exit code."""

    def __init__(self, options: RunnerOptions, batch: BatchConfig,
                 agent: AgentClient | None = None) -> None:
        self.options = options
        self.batch = batch
        self.agent = agent or AgentClient(socket_path(batch.directories.run))
        self.name = f"vm{options.index}"
        self._files: VmFiles | None = None  # known once the agent gave the work directory
        self.stop_signal: str | None = None
        self._stop = threading.Event()
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.spec: ClusterSpec | None = None
        self.vm: VmPlan | None = None
        self.devices: VmDevices | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.accel = "tcg"

    # ------------------------------------------------------------ the whole life

    def run(self) -> int:
        saved = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            try:
                self._prepare()
                self._boot()
                self._wait_ready()
                self._serve()
            except StopRequested:
                pass
            except (VclusterError, AgentError) as e:
                return self._fail(one_line(str(e)))
            except Exception as e:
                log.debug("%s: internal error", self.name, exc_info=True)
                return self._fail(one_line(f"internal error: {type(e).__name__}: {e}"))
            return self._stop_vm()
        finally:
            self._cleanup()
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    @property
    def files(self) -> VmFiles:
        assert self._files is not None, "the VM's files are known once the agent answered"
        return self._files

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stop.is_set():
            self.stop_signal = signal.Signals(signum).name
            log.info("%s: %s received, stopping", self.name, self.stop_signal)
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise StopRequested

    def _publish(self, state: VmState, **kw: Any) -> None:
        assert self.publisher is not None
        self.publisher.move(state, **kw)

    # ------------------------------------------------------------ preparing

    def _read_spec(self, keys: Keys, user: str) -> tuple[ClusterSpec, VmPlan]:
        assert self.store is not None
        key = keys.cluster_spec(user, self.options.job)
        entry = self.store.get(key)
        if entry is None:
            raise VclusterError(f"no cluster spec at {key} (the launcher writes it before it "
                                "starts the VMs)")
        spec = from_json(ClusterSpec, entry.value)
        vms = [vm for vm in spec.plan.vms if vm.index == self.options.index]
        if spec.job != self.options.job or not vms:
            raise VclusterError(f"the cluster spec at {key} has no VM {self.options.index} "
                                f"of job {self.options.job}")
        return spec, vms[0]

    def _prepare(self) -> None:
        opts = self.options
        self.store = open_user_store(self.batch)
        user = user_name()
        keys = Keys(self.batch.store.prefix)
        self.publisher = Publisher(self.store, keys.vm(user, opts.job, opts.index), self.name)
        self.publisher.load()
        self._check_stop()
        self.spec, self.vm = self._read_spec(keys, user)
        vm = self.vm
        addresses = tuple(nic.address.split("/")[0] for nic in vm.nics)
        self._publish(VmState.PREPARING, host=opts.host, addresses=addresses)
        networks = [{"name": n.network, "type": n.type, "mtu": n.mtu} for n in vm.nics]
        fam = {"name": vm.fam.name, "size": vm.fam.size} if vm.fam else None
        self.devices = self.agent.vm_resources(opts.job, opts.index, networks, fam)
        if len(self.devices.taps) != len(vm.nics) or (self.devices.fam is None) != \
                (vm.fam is None) or self.devices.workdir is None:
            raise VclusterError("the agent's devices do not match the VM's plan "
                                f"({len(self.devices.taps)} taps for {len(vm.nics)} NICs)")
        log.info("%s: taps %s%s", self.name,
                 ", ".join(t.ifname for t in self.devices.taps) or "none",
                 f", FAM region {self.devices.fam.path}" if self.devices.fam else "")
        self._files = VmFiles.of(Path(self.devices.workdir), opts.index)
        make_vm_dir(self.files)
        self._check_stop()
        self._make_disks(vm)
        files = guest.seed_files(self.spec, vm)
        write_seed(self.files.seed, meta_data=files.meta_data, user_data=files.user_data,
                   network_config=files.network_config)
        if guest.tiny_ignores_user_data(vm):
            log.warning("%s: the tiny image runs only #! user-data scripts; the template's "
                        "cloud-config is ignored", self.name)
        self._check_stop()

    def _make_disks(self, vm: VmPlan) -> None:
        if vm.boot.kind == "disk":
            if vm.boot.disk is None:
                raise VclusterError(f"image {vm.boot.image} has no disk to boot from")
            try:
                base_format = image_format(vm.boot.disk)
                run(machine.overlay_argv(vm.boot.disk, base_format, self.files.overlay),
                    timeout=60)
            except VclusterError as e:
                raise VclusterError(f"cannot make the overlay over {vm.boot.disk}: {e}") from e
        for disk in vm.disks:
            if disk.shared:
                raise VclusterError(f"disk {disk.name!r} is shared, which this version of "
                                    "vcluster does not support yet")
            run(machine.disk_argv(self.files.disk(disk.name), disk.size), timeout=60)

    # ------------------------------------------------------------ booting

    def _boot(self) -> None:
        assert self.spec is not None and self.vm is not None
        vm = self.vm
        accel = choose_accel(self.spec.plan.accel, binary=self.spec.plan.qemu_binary,
                             kernel=vm.boot.kernel)
        log.info("%s: accelerator %s (%s)", self.name, accel.name, accel.reason)
        self.accel = accel.name
        fam = None
        taps: list[int] = []
        if self.devices is not None:
            taps = [t.fd for t in self.devices.taps]
            if self.devices.fam is not None:
                fam = SharedMemory(Path(self.devices.fam.path), self.devices.fam.size)
        spec = machine.vm_spec(self.spec, vm, self.files, accel=accel.name, tap_fds=taps,
                               fam=fam)
        argv = build_argv(spec)
        log.info("%s: %s", self.name, show_argv(argv))
        self.proc = start_qemu(argv, self.files.qemu_stderr, spec.pass_fds())
        if self.devices is not None:
            self.devices.close()  # QEMU has its own copies now
            self.devices = None
        self._publish(VmState.BOOTING)
        self.qmp = Qmp(self.files.qmp_socket, self.name)
        try:
            self.qmp.connect(time.monotonic() + QMP_CONNECT_TIMEOUT, self._qemu_alive)
        except QmpError:
            if not self._qemu_alive():
                raise VclusterError(self._exit_reason()) from None
            raise
        log.info("%s: QEMU pid %d, %s", self.name, self.proc.pid, self.qmp.status())

    def _qemu_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _exit_reason(self, when: str = "") -> str:
        assert self.proc is not None
        code = self.proc.returncode
        try:
            lines = self.files.qemu_stderr.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        detail = f": {lines[-1].strip()}" if lines else ""
        if code is not None and code < 0:
            what = f"QEMU was killed by {signal.Signals(-code).name}"
        else:
            what = f"QEMU exited with status {code}"
        return f"{what}{when}{detail}"

    # ------------------------------------------------------------ ready

    def _wait_ready(self) -> None:
        assert self.vm is not None
        timeout = self.options.ready_timeout or \
            READY_TIMEOUTS[(self.vm.boot.readiness, self.accel)]
        marker = guest.ready_marker(self.vm)
        watcher = LogWatcher(self.files.console_log, marker)
        started = time.monotonic()
        while not watcher.poll():
            if not self._qemu_alive():
                raise VclusterError(self._exit_reason(" before the guest was ready"))
            if time.monotonic() - started > timeout:
                raise VclusterError(f"the guest was not ready after {timeout:g} s "
                                    f"(no {marker!r} on its console)")
            if self._stop.wait(POLL):
                raise StopRequested
        self._publish(VmState.READY)
        log.info("%s: ready after %.1f s", self.name, time.monotonic() - started)

    def _serve(self) -> None:
        while not self._stop.wait(POLL):
            if not self._qemu_alive():
                raise VclusterError(self._exit_reason(" while the VM was ready (did the "
                                                      "guest power off?)"))

    # ------------------------------------------------------------ stopping

    def _shutdown_qemu(self, graceful: bool) -> str:
        """End QEMU: power-down (bounded), then quit, then SIGKILL; how it ended."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return "QEMU was not running"
        if graceful and self.qmp is not None and self.qmp.connected:
            assert self.vm is not None
            timeout = self.options.stop_timeout
            if timeout is None:
                timeout = STOP_TIMEOUTS[self.vm.boot.readiness]
            try:
                self.qmp.powerdown()
                proc.wait(timeout=timeout)
                return "the guest powered off"
            except QmpError as e:
                log.warning("%s: power-down failed: %s", self.name, e)
            except subprocess.TimeoutExpired:
                log.info("%s: the guest did not power off within %g s", self.name, timeout)
        if self.qmp is not None and self.qmp.connected:
            self.qmp.quit()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=QUIT_TIMEOUT)
                return "QEMU quit"
        proc.kill()
        proc.wait()
        return "QEMU killed"

    def _stop_vm(self) -> int:
        publisher = self.publisher
        was_ready = publisher is not None and publisher.state is VmState.READY
        try:
            if publisher is not None and not publisher.state.final:
                self._publish(VmState.STOPPING)
        except VclusterError as e:
            log.error("%s: cannot publish stopping: %s", self.name, e)
        how = self._shutdown_qemu(graceful=was_ready)
        log.info("%s: %s", self.name, how)
        try:
            if publisher is not None and publisher.state is VmState.STOPPING:
                self._publish(VmState.STOPPED)
        except VclusterError as e:
            log.error("%s: cannot publish stopped: %s", self.name, e)
            return 1
        return 0

    def _fail(self, reason: str) -> int:
        log.error("%s: failed: %s", self.name, reason)
        if self.proc is not None:
            self._shutdown_qemu(graceful=False)
        tail = tail_lines(self.files.console_log, CONSOLE_TAIL) if self._files else []
        for line in tail:
            log.info("%s: console: %s", self.name, line)
        if self.publisher is not None and not self.publisher.state.final:
            try:
                self._publish(VmState.FAILED, error=reason, console_tail=tail)
            except VclusterError as e:
                log.error("%s: cannot publish the failure: %s", self.name, e)
        return 1

    def _cleanup(self) -> None:
        if self.devices is not None:
            self.devices.close()
            self.devices = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._files is not None:
            remove_vm_files(self._files)
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None
