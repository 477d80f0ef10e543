"""Fakes the unit tests put where the runner and the launcher meet the system.

- ``FakeAgent``: the host agent's ``vm_resources``, handing out real open file
  descriptors (pipe ends whose other end it keeps, so a test can tell that
  every copy was closed) and a private work directory.
- ``FakeVnis``: the agent's ``vnis`` as the launcher asks it (a VNI per
  private network, or the refusal of an exhausted pool).
- ``KeptStore``: a MemoryStore that code under test may close without the
  test losing what was published.
- ``FakeQemu``: starts a small program that behaves like QEMU where the runner
  looks (stderr, the console log, a QMP socket answering the commands the
  runner sends, power-down and quit).
- ``FakeStep`` and ``FakeSteps``: the job step of VM runners, played by
  publishing VM records in the store as runners do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.waiting import wait_for
from vcluster.agent.client import FamRegion, Tap, VmDevices
from vcluster.agent.protocol import AgentError, Code, FamSpec, NetworkSpec
from vcluster.cluster import ClusterSpec
from vcluster.hostpaths import VmFiles
from vcluster.lifecycle import VmState
from vcluster.qemu import VmSpec
from vcluster.run import spawn
from vcluster.store.keys import Keys
from vcluster.store.memory import MemoryStore
from vcluster.store.records import VmRecord, from_json
from vcluster.vm.state import Publisher


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """``wait_for`` polling every 10 ms (the fakes answer at once)."""
    wait_for(what, condition, timeout, interval=0.01)


# ------------------------------------------------------------------ the agent


@dataclass(frozen=True)
class ResourceRequest:
    job: str
    vm: int
    networks: tuple[NetworkSpec, ...]
    fam: FamSpec | None


class FakeAgent:
    """``vm_resources`` as the host agent answers it, without devices or root.

    Each tap is the write end of a pipe; the agent keeps the read end, so
    ``fds_released`` tells whether every process let its copy go.
    ``missing_taps`` answers with that many taps fewer than asked for.
    """

    def __init__(self, missing_taps: int = 0) -> None:
        self.missing_taps = missing_taps
        self.requests: list[ResourceRequest] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="vc-work-"))  # short: sockets go in it
        self.workdir.chmod(0o700)
        self._fam_dir = Path(tempfile.mkdtemp(prefix="vc-fam-"))
        self._kept: list[int] = []

    def vm_resources(self, job: str, vm: int, networks: Sequence[NetworkSpec],
                     fam: FamSpec | None) -> VmDevices:
        self.requests.append(ResourceRequest(job, vm, tuple(networks), fam))
        taps = []
        for n, net in enumerate(networks[:max(0, len(networks) - self.missing_taps)]):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            self._kept.append(read_end)
            taps.append(Tap(net.name, f"vct{job}v{vm}n{n}", None, write_end))
        region = None
        if fam is not None:
            path = self._fam_dir / fam.name
            with open(path, "wb") as f:
                f.truncate(fam.size)
            region = FamRegion(path, fam.size)
        return VmDevices(taps=tuple(taps), fam=region, workdir=self.workdir)

    @property
    def handed_out(self) -> int:
        return len(self._kept)

    def fds_released(self) -> bool:
        """Every tap handed out is closed everywhere (its pipe reads end of file)."""
        for fd in self._kept:
            try:
                if os.read(fd, 1) != b"":
                    return False
            except BlockingIOError:
                return False  # a writer still holds it open
        return True

    def close(self) -> None:
        for fd in self._kept:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self._fam_dir, ignore_errors=True)


class FakeVnis:
    """``AgentClient.vnis`` for the launcher: ``table`` or 4096, 4097… per network asked.

    With ``refusal`` it raises the AgentError the agent sends when a pool is
    exhausted, as the real client does.
    """

    def __init__(self, table: Mapping[str, int] | None = None,
                 refusal: str | None = None) -> None:
        self.table = dict(table or {})
        self.refusal = refusal
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def vnis(self, job: str, networks: Sequence[str]) -> dict[str, int]:
        self.asked.append((job, tuple(networks)))
        if self.refusal is not None:
            raise AgentError(Code.FAILED, self.refusal)
        return {name: self.table.get(name, 4096 + i) for i, name in enumerate(networks)}


# ------------------------------------------------------------------ the store


class KeptStore(MemoryStore):
    """A MemoryStore that stays open when the code under test closes it."""

    closed_by_user = False

    def close(self) -> None:
        self.closed_by_user = True

    def close_for_real(self) -> None:
        super().close()


def published(store: MemoryStore, key: str, since: int) -> list[VmRecord]:
    """Every record written under ``key`` after revision ``since``, in order."""
    last = store.get(key)
    if last is None or last.mod_revision <= since:
        return []
    records = []
    with store.watch(key, start_revision=since + 1) as watch:
        while (event := watch.get(timeout=5)) is not None:
            records.append(from_json(VmRecord, event.value))
            if event.revision >= last.mod_revision:
                break
    return records


# ------------------------------------------------------------------ QEMU

# Started as ``python3 -c FAKE_QEMU CONF``.  Like QEMU: its error on stderr,
# the guest's lines in the console log, and a QMP server (greeting, capability
# negotiation, query-status, system_powerdown, quit) on the socket.
FAKE_QEMU = r'''
import json, os, socket, sys, threading
conf = json.loads(sys.argv[1])
with open(conf["console_log"], "a") as log:
    for line in conf["console"]:
        log.write(line + "\r\n")
for line in conf["stderr"]:
    sys.stderr.write(line + "\n")
sys.stderr.flush()
if conf["exit"] is not None:
    sys.exit(conf["exit"])

def answer(conn, message):
    command = message.get("execute")
    reply = {"return": {}}
    if command == "query-status":
        reply = {"return": {"status": "running", "running": True, "singlestep": False}}
    if "id" in message:
        reply["id"] = message["id"]
    conn.sendall(json.dumps(reply).encode() + b"\r\n")
    if command == "quit" or (command == "system_powerdown" and conf["powers_off"]):
        os._exit(0)

def serve(conn):
    greeting = {"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 0},
                                    "package": "fake"}, "capabilities": []}}
    conn.sendall(json.dumps(greeting).encode() + b"\r\n")
    decoder, pending = json.JSONDecoder(), ""
    while data := conn.recv(65536):
        pending += data.decode()
        while pending.strip():  # a stream of JSON objects, as QEMU parses it
            try:
                message, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break
            pending = pending.lstrip()[end:]
            answer(conn, message)

server = socket.socket(socket.AF_UNIX)
server.bind(conf["qmp"])
server.listen(4)
while True:
    connection, _ = server.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
'''


@dataclass
class FakeQemu:
    """A QEMU starter (``vm.process.QemuStarter``) running FAKE_QEMU instead.

    It writes ``console`` to the console log and ``stderr`` to its stderr,
    then exits with ``exit_status`` if one is given, else serves QMP until
    told to quit (or to power down, when ``powers_off``).
    """

    console: Sequence[str] = ()
    stderr: Sequence[str] = ()
    exit_status: int | None = None
    powers_off: bool = True
    specs: list[VmSpec] = field(default_factory=list)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __call__(self, spec: VmSpec, files: VmFiles) -> subprocess.Popen[bytes]:
        conf = {"console_log": str(spec.serial_log), "qmp": str(spec.qmp_socket),
                "console": list(self.console), "stderr": list(self.stderr),
                "exit": self.exit_status, "powers_off": self.powers_off}
        with open(files.qemu_stderr, "wb") as err:
            proc = spawn([sys.executable, "-c", FAKE_QEMU, json.dumps(conf)], stderr=err,
                         pass_fds=spec.pass_fds())
        self.specs.append(spec)
        self.started.append(proc)
        return proc

    def all_ended(self) -> bool:
        return all(p.poll() is not None for p in self.started)

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------ the step of runners


@dataclass(frozen=True)
class Move:
    """One state a fake runner publishes for its VM."""

    vm: int
    state: VmState
    host: str | None = None
    error: str | None = None
    console_tail: tuple[str, ...] = ()


def boot_moves(vms: Sequence[int], host: str = "h1",
               until: VmState = VmState.READY) -> list[Move]:
    """Each VM of ``vms`` going preparing → booting → ready, stopping at ``until``."""
    order = [VmState.PREPARING, VmState.BOOTING, VmState.READY]
    states = order[:order.index(until) + 1]
    return [Move(vm, state, host if state is VmState.PREPARING else None)
            for state in states for vm in vms]


class FakeStep:
    """A step of VM runners, played in a thread by publishing ``moves`` in the store.

    Like the runners it first reads the cluster spec.  After the moves it
    calls ``then`` (if given); with ``exit_status`` it then ends as if every
    runner had exited, its output being ``output``, and publishes ``late``
    once the launcher has seen it end (states still on their way when srun
    ended).  ``stop`` publishes
    stopping and stopped for every VM not in a final state, as runners told
    to stop do.
    """

    def __init__(self, store: MemoryStore, keys: Keys, user: str, job: str, count: int,
                 moves: Sequence[Move], *, then: Callable[[], None] | None = None,
                 exit_status: int | None = None, output: Sequence[str] = (),
                 late: Sequence[Move] = ()) -> None:
        self.store = store
        self.count = count
        self.spec: ClusterSpec | None = None  # as the runners read it
        self.spec_key = keys.cluster_spec(user, job)
        self.publishers = {i: Publisher(store, keys.vm(user, job, i), f"vm{i}")
                           for i in range(count)}
        self.moves = list(moves)
        self.late = list(late)
        self.then = then
        self.exit_status = exit_status
        self.output = list(output)
        self.marked_ready = False
        self.stopped_with: float | None = None
        self.error: BaseException | None = None
        self._status: int | None = None
        self._stop = threading.Event()
        self._exit_seen = threading.Event()
        self._thread = threading.Thread(target=self._play, daemon=True)
        self._thread.start()

    def _publish(self, move: Move) -> None:
        self.publishers[move.vm].move(move.state, host=move.host, error=move.error,
                                      console_tail=move.console_tail)

    def _play(self) -> None:
        try:
            entry = self.store.get(self.spec_key)
            self.spec = None if entry is None else from_json(ClusterSpec, entry.value)
            for publisher in self.publishers.values():
                publisher.load()
            for move in self.moves:
                if self._stop.is_set():
                    return
                self._publish(move)
            if self.then is not None:
                self.then()
            if self.exit_status is not None:
                self._status = self.exit_status
                if self.late:
                    self._exit_seen.wait(10)  # by the launcher: what comes now is late
                for move in self.late:
                    self._publish(move)
        except BaseException as e:
            self.error = e
            raise

    def exited(self) -> int | None:
        if self._status is not None:
            self._exit_seen.set()
        return self._status

    def tail(self, lines: int = 20) -> list[str]:
        return self.output[-lines:]

    def ready(self) -> None:
        self.marked_ready = True

    def stop(self, timeout: float) -> int:
        self.stopped_with = timeout
        self._stop.set()
        self._thread.join(10)
        for publisher in self.publishers.values():
            if not publisher.state.final:
                publisher.move(VmState.STOPPING)
                publisher.move(VmState.STOPPED)
        if self._status is None:
            self._status = 0
        return self._status


class FakeSteps:
    """A step starter (``launch.steps.StepStarter``) of FakeSteps, all playing alike."""

    def __init__(self, store: MemoryStore, user: str, moves: Sequence[Move], *,
                 prefix: str = "/vcluster", then: Callable[[], None] | None = None,
                 exit_status: int | None = None, output: Sequence[str] = (),
                 late: Sequence[Move] = ()) -> None:
        self.store = store
        self.user = user
        self.keys = Keys(prefix)
        self.moves = moves
        self.then = then
        self.exit_status = exit_status
        self.output = output
        self.late = late
        self.started: list[FakeStep] = []
        self.asked: list[tuple[str, tuple[str, ...], float | None, bool]] = []

    def __call__(self, job: str, hosts: Sequence[str], *, stop_timeout: float | None,
                 echo: bool) -> FakeStep:
        self.asked.append((job, tuple(hosts), stop_timeout, echo))
        step = FakeStep(self.store, self.keys, self.user, job, len(hosts), self.moves,
                        then=self.then, exit_status=self.exit_status, output=self.output,
                        late=self.late)
        self.started.append(step)
        return step

    @property
    def step(self) -> FakeStep:
        assert len(self.started) == 1, f"{len(self.started)} steps were started, not one"
        return self.started[0]
