"""One VM's life, as one SLURM task: prepare, boot, wait until ready, serve, stop.

Each phase returns what the next one needs: ``prepare`` a ``Prepared`` (the
cluster spec, the VM's plan, its publisher, files and host devices), ``boot``
a ``Booted`` (QEMU, its monitor, the accelerator), ``wait_ready`` a
``Ready``; ``serve`` returns when a stop signal came.  An ExitStack owns
every clean-up as soon as there is something to clean (the devices' file
descriptors, QEMU, the QMP connection, the VM's files, the store), so every
way out releases exactly what was made.

``pending → preparing → booting → ready`` and, on SIGTERM/SIGINT/SIGHUP
(a ``Cancellation``), ``→ stopping → stopped``: a ready guest gets the ACPI
power button and a bounded wait, then QEMU is told to quit, then killed
(``vm.process``).  Any failure publishes ``failed`` with a one-line reason
(a ``VmError``'s message) and the console's last lines, and the runner
exits non-zero.

The agent client, the store opener and the QEMU starter are passed in, so
unit tests run a runner on fakes (tests/fakes.py).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from vcluster import sshkeys
from vcluster.agent.client import AgentClient, VmDevices
from vcluster.agent.protocol import FamSpec, NetworkSpec
from vcluster.cancel import Cancellation, Cancelled
from vcluster.cluster import ClusterSpec, VmPlan
from vcluster.config.batch import BatchConfig
from vcluster.errors import VclusterError, VmError
from vcluster.hostpaths import VmFiles
from vcluster.identity import user_name
from vcluster.lifecycle import VmState
from vcluster.qemu import SharedMemory, UserNet
from vcluster.seed import write_seed
from vcluster.session import open_user_store
from vcluster.store.base import Store
from vcluster.store.keys import Keys
from vcluster.store.records import SshEndpoint, from_json
from vcluster.vm import guest
from vcluster.vm.accel import Accel, choose_accel
from vcluster.vm.console import tail_lines
from vcluster.vm.control import Qmp, QmpError
from vcluster.vm.disks import make_disks
from vcluster.vm.machine import vm_spec
from vcluster.vm.process import QemuStarter, exit_reason, shutdown, start_qemu
from vcluster.vm.readiness import LogWatcher
from vcluster.vm.state import Publisher
from vcluster.vm.workdir import make_vm_dir, remove_vm_files

log = logging.getLogger(__name__)

POLL = 0.2
READY_POLL = 0.005  # the console log is read from where it was: a poll is cheap
QMP_CONNECT_TIMEOUT = 20.0
CONSOLE_TAIL = 20


@dataclass(frozen=True)
class RunnerOptions:
    job: str
    index: int
    host: str
    ready_timeout: float | None = None  # None: the image's (Readiness.ready_timeout)
    stop_timeout: float | None = None  # None: the image's (Readiness.stop_timeout)


class DeviceSource(Protocol):
    """Where a VM's host devices come from: the host agent (``AgentClient``)."""

    def vm_resources(self, job: str, vm: int, networks: Sequence[NetworkSpec],
                     fam: FamSpec | None) -> VmDevices: ...


@dataclass(frozen=True)
class Prepared:
    """A VM ready to boot: its plan, its files on this host and its devices."""

    spec: ClusterSpec
    vm: VmPlan
    publisher: Publisher
    files: VmFiles
    devices: VmDevices
    release_devices: Callable[[], None]  # closes our copies of the devices' fds, once
    addresses: tuple[str, ...]  # every NIC's, as the guest has them (no prefix length)
    ssh: SshEndpoint | None  # the host port forwarded to the guest's port 22
    host_key: str  # the public half of the guest's ssh host key


@dataclass(frozen=True)
class Booted:
    """A running QEMU with its monitor connected."""

    prepared: Prepared
    qemu: subprocess.Popen[bytes]
    qmp: Qmp
    accel: Accel


@dataclass(frozen=True)
class Ready:
    """A guest that printed its ready line."""

    booted: Booted
    took: float  # seconds from QEMU's monitor answering to the ready line


def one_line(text: str) -> str:
    return " ".join(text.split())


def reason(error: Exception) -> str:
    """The one line published for a failure."""
    if isinstance(error, VclusterError):
        return one_line(str(error))
    log.debug("internal error", exc_info=error)
    return one_line(f"internal error: {type(error).__name__}: {error}")


def nat_of(devices: VmDevices) -> tuple[dict[int, guest.NicAddress], SshEndpoint | None]:
    """The addresses the host gave the VM's NAT NICs (by NIC index), and its ssh endpoint."""
    given = {n: guest.NicAddress(t.nat.address, t.nat.gateway)
             for n, t in enumerate(devices.taps) if t.nat is not None}
    ssh = next((SshEndpoint(t.nat.ssh_address, t.nat.ssh_port) for t in devices.taps
                if t.nat is not None and t.nat.ssh_address and t.nat.ssh_port), None)
    for n, port in enumerate(devices.ports):
        if isinstance(port, UserNet):
            prefix = port.net.partition("/")[2]
            given[n] = guest.NicAddress(f"{port.guest}/{prefix}", port.gateway)
            if ssh is None and port.ssh_port is not None:
                ssh = SshEndpoint(port.ssh_host, port.ssh_port)
    return given, ssh


class Runner:
    """Runs VM ``options.index`` of job ``options.job`` until stopped; ``run`` is the exit code."""

    def __init__(self, options: RunnerOptions, batch: BatchConfig, *,
                 agent: DeviceSource | None = None,
                 open_store: Callable[[], Store] | None = None,
                 start_qemu: QemuStarter = start_qemu,
                 cancellation: Cancellation | None = None) -> None:
        self.options = options
        self.keys = Keys(batch.store.prefix)
        self.agent: DeviceSource = agent or AgentClient(batch.directories.layout.agent_socket)
        self.run_dir = batch.directories.layout.run  # the KVM probe's verdict is kept there
        self.open_store = open_store or partial(open_user_store, batch)
        self.start_qemu = start_qemu
        self.cancellation = cancellation or Cancellation()
        self.name = f"vm{options.index}"
        self.user = user_name()
        # The guest's host key: being made while the store opens and the VM's devices come.
        self.host_key = sshkeys.Background(f"vcluster-{options.job}-{self.name}")

    # ------------------------------------------------------------ the whole life

    def run(self) -> int:
        with self.cancellation.installed(), contextlib.ExitStack() as stack:
            try:
                publisher = self.open(stack)
            except Exception as e:
                log.error("%s: failed: %s (nothing could be published)", self.name, reason(e))
                return 1
            try:
                prepared = self.prepare(publisher, stack)
            except Exception as e:
                return self.end(publisher, e, console=None)
            try:
                with contextlib.ExitStack() as machine:
                    return self.attend(self.boot(prepared, machine))
            except Exception as e:
                # QEMU has ended (the machine stack) and its console log is still there.
                return self.end(publisher, e, console=prepared.files)

    def attend(self, booted: Booted) -> int:
        """Wait for the guest, serve it, and stop it when told to."""
        publisher = booted.prepared.publisher
        try:
            ready = self.wait_ready(booted)
        except Cancelled:
            return self.stop(publisher, lambda: shutdown(booted.qemu, booted.qmp, self.name))
        self.serve(ready)
        vm = booted.prepared.vm
        timeout = self.options.stop_timeout
        if timeout is None:
            timeout = vm.boot.readiness.stop_timeout
        return self.stop(publisher, lambda: shutdown(booted.qemu, booted.qmp, self.name,
                                                     power_down=timeout))

    def end(self, publisher: Publisher, error: Exception, console: VmFiles | None) -> int:
        """A phase raised: a stop signal before QEMU ran, or a failure."""
        if isinstance(error, Cancelled):
            return self.stop(publisher, lambda: "stopped before the guest ran")
        return self.fail(publisher, reason(error), console)

    # ------------------------------------------------------------ preparing

    def open(self, stack: contextlib.ExitStack) -> Publisher:
        store = self.open_store()
        stack.callback(self._close_store, store)
        opts = self.options
        publisher = Publisher(store, self.keys.vm(self.user, opts.job, opts.index), self.name)
        publisher.load()
        return publisher

    @staticmethod
    def _close_store(store: Store) -> None:
        with contextlib.suppress(Exception):  # the VM is gone either way
            store.close()

    def read_spec(self, store: Store) -> tuple[ClusterSpec, VmPlan]:
        key = self.keys.cluster_spec(self.user, self.options.job)
        entry = store.get(key)
        if entry is None:
            raise VmError(f"no cluster spec at {key} (the launcher writes it before it "
                          "starts the VMs)")
        spec = from_json(ClusterSpec, entry.value)
        vms = [vm for vm in spec.plan.vms if vm.index == self.options.index]
        if spec.job != self.options.job or not vms:
            raise VmError(f"the cluster spec at {key} has no VM {self.options.index} "
                          f"of job {self.options.job}")
        return spec, vms[0]

    def prepare(self, publisher: Publisher, stack: contextlib.ExitStack) -> Prepared:
        opts = self.options
        self.cancellation.check(self.name)
        spec, vm = self.read_spec(publisher.store)
        addresses = tuple(nic.address.split("/")[0] for nic in vm.nics if nic.address)
        publisher.move(VmState.PREPARING, host=opts.host, addresses=addresses)
        networks = [NetworkSpec(n.network, n.type, n.mtu, vni=spec.vnis.get(n.network))
                    for n in vm.nics]
        fam = FamSpec(vm.fam.name, vm.fam.size) if vm.fam else None
        devices = self.agent.vm_resources(opts.job, opts.index, networks, fam)
        fds = stack.enter_context(contextlib.ExitStack())
        fds.callback(devices.close)
        backends = devices.backends()
        if len(backends) != len(vm.nics) or (devices.fam is None) != (vm.fam is None):
            raise VmError("the agent's devices do not match the VM's plan "
                          f"({len(backends)} NIC backends for {len(vm.nics)} NICs)")
        log.info("%s: NICs %s%s", self.name, ", ".join(
            t.ifname for t in devices.taps) or ", ".join(map(str, devices.ports)) or "none",
            f", FAM region {devices.fam.path}" if devices.fam else "")
        files = VmFiles.of(devices.workdir, opts.index)
        make_vm_dir(files)
        stack.callback(remove_vm_files, files)
        self.cancellation.check(self.name)
        make_disks(vm, files)
        given, ssh = nat_of(devices)
        host_key = self.host_key.result()
        seed = guest.seed_files(spec, vm, given=given, host_key=host_key)
        write_seed(files.seed, meta_data=seed.meta_data, user_data=seed.user_data,
                   network_config=seed.network_config, guest_files=seed.guest_files)
        if guest.tiny_ignores_user_data(vm):
            log.warning("%s: the tiny image runs only #! user-data scripts; the template's "
                        "cloud-config is ignored", self.name)
        self.cancellation.check(self.name)
        addresses = tuple(a.address.split("/")[0] for a in guest.nic_addresses(vm, given))
        return Prepared(spec, vm, publisher, files, devices, fds.close, addresses, ssh,
                        host_key.public)

    # ------------------------------------------------------------ booting

    def boot(self, prepared: Prepared, machine: contextlib.ExitStack) -> Booted:
        """Start QEMU (``machine`` ends it) and connect to its monitor."""
        spec, vm, files, devices = prepared.spec, prepared.vm, prepared.files, prepared.devices
        accel = choose_accel(spec.plan.accel, binary=spec.plan.qemu_binary,
                             kernel=vm.boot.kernel, cache_dir=self.run_dir)
        log.info("%s: accelerator %s (%s)", self.name, accel.name, accel.reason)
        self.cancellation.check(self.name)  # the last point before there is a QEMU to end
        fam = SharedMemory(devices.fam.path, devices.fam.size) if devices.fam else None
        qemu_spec = vm_spec(spec, vm, files, accel=accel.name,
                            nics=devices.backends(), fam=fam)
        qmp = Qmp(files.qmp_socket, self.name)
        machine.callback(qmp.close)
        proc = self.start_qemu(qemu_spec, files)
        machine.callback(self._end_qemu, proc, qmp)
        prepared.release_devices()  # QEMU has its own copies now
        prepared.publisher.move(VmState.BOOTING, addresses=prepared.addresses,
                                ssh=prepared.ssh, host_key=prepared.host_key)
        try:
            qmp.connect(time.monotonic() + QMP_CONNECT_TIMEOUT, lambda: proc.poll() is None)
        except QmpError:
            if proc.poll() is not None:
                raise VmError(exit_reason(proc, files.qemu_stderr)) from None
            raise
        log.info("%s: QEMU pid %d, %s", self.name, proc.pid, qmp.status())
        return Booted(prepared, proc, qmp, accel)

    def _end_qemu(self, proc: subprocess.Popen[bytes], qmp: Qmp) -> None:
        if proc.poll() is None:
            log.info("%s: %s", self.name, shutdown(proc, qmp, self.name))

    # ------------------------------------------------------------ ready

    def wait_ready(self, booted: Booted) -> Ready:
        prepared = booted.prepared
        vm, files = prepared.vm, prepared.files
        timeout = self.options.ready_timeout or \
            vm.boot.readiness.ready_timeout(booted.accel.name)
        marker = guest.ready_marker(vm)
        watcher = LogWatcher(files.console_log, marker)
        started = time.monotonic()
        while not watcher.poll():
            if booted.qemu.poll() is not None:
                raise VmError(exit_reason(booted.qemu, files.qemu_stderr,
                                          " before the guest was ready"))
            if time.monotonic() - started > timeout:
                raise VmError(f"the guest was not ready after {timeout:g} s "
                              f"(no {marker!r} on its console)")
            if self.cancellation.wait(READY_POLL):
                self.cancellation.check(self.name)
        prepared.publisher.move(VmState.READY)
        took = time.monotonic() - started
        log.info("%s: ready after %.1f s", self.name, took)
        return Ready(booted, took)

    def serve(self, ready: Ready) -> None:
        """Keep the VM until a stop signal; QEMU ending meanwhile is a failure."""
        from vcluster.vm.save import thaw_if_abandoned

        booted = ready.booted
        while not self.cancellation.wait(POLL):
            if booted.qemu.poll() is not None:
                raise VmError(exit_reason(booted.qemu, booted.prepared.files.qemu_stderr,
                                          " while the VM was ready (did the guest power off?)"))
            if thaw_if_abandoned(booted.prepared.files):  # a save died with the guest frozen
                log.warning("%s: thawed the guest a killed save had frozen", self.name)

    # ------------------------------------------------------------ the end

    def stop(self, publisher: Publisher, end: Callable[[], str]) -> int:
        """Publish ``stopping``, end the VM with ``end`` (which says how), publish ``stopped``."""
        log.info("%s: %s, stopping", self.name, self.cancellation.reason or "told to stop")
        try:
            if not publisher.state.final:
                publisher.move(VmState.STOPPING)
        except VclusterError as e:
            log.error("%s: cannot publish stopping: %s", self.name, e)
        log.info("%s: %s", self.name, end())
        if publisher.state is not VmState.STOPPING:
            return 0
        try:
            publisher.move(VmState.STOPPED)
        except VclusterError as e:
            log.error("%s: cannot publish stopped: %s", self.name, e)
            return 1
        return 0

    def fail(self, publisher: Publisher, why: str, console: VmFiles | None) -> int:
        """Publish ``failed`` with ``why`` and the console's last lines; the exit code."""
        log.error("%s: failed: %s", self.name, why)
        tail = tail_lines(console.console_log, CONSOLE_TAIL) if console else ()
        for line in tail:
            log.info("%s: console: %s", self.name, line)
        if not publisher.state.final:
            try:
                publisher.move(VmState.FAILED, error=why, console_tail=tail)
            except VclusterError as e:
                log.error("%s: cannot publish the failure: %s", self.name, e)
        return 1
