"""The agent's pure parts and local mechanics: schema, names, undo log, FAM files, socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcluster.agent import client, fam, netdev, protocol, undo
from vcluster.agent.protocol import Code, Refusal

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "etc" / "vcluster"


def refusal(line: object) -> Refusal:
    with pytest.raises(Refusal) as info:
        protocol.parse(json.dumps(line).encode())
    return info.value


NET = {"name": "cluster", "type": "private", "mtu": 1450}


@pytest.mark.parametrize(("request_", "code", "message"), [
    ({"op": "ping"}, Code.UNSUPPORTED_VERSION, "request version null is not supported"),
    ({"version": 2, "op": "ping"}, Code.UNSUPPORTED_VERSION, "this agent speaks version 1"),
    ([1], Code.BAD_REQUEST, "not a JSON object"),
    ({"version": 1, "op": "reboot"}, Code.BAD_REQUEST, 'op: "reboot" is not an operation'),
    ({"version": 1, "op": "release"}, Code.BAD_REQUEST, "job: missing"),
    ({"version": 1, "op": "release", "job": 12}, Code.BAD_REQUEST, "job: 12 is not a SLURM"),
    ({"version": 1, "op": "release", "job": "../1"}, Code.BAD_REQUEST,
     "job: '../1' is not a SLURM job id"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": -1, "networks": []},
     Code.BAD_REQUEST, "vm: -1 is out of range"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": True, "networks": []},
     Code.BAD_REQUEST, "vm: true is not a VM index"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0, "networks": [NET, NET]},
     Code.BAD_REQUEST, "a name appears twice"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "type": "nat"}]}, Code.BAD_REQUEST,
     "networks[0].type: 'nat' is not supported by this agent"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "mtu": 40}]}, Code.BAD_REQUEST, "networks[0].mtu: 40 is out of range"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "name": "a/b"}]}, Code.BAD_REQUEST,
     "networks[0].name: 'a/b' is not a name"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0, "networks": [],
      "fam": {"name": "fam", "size": 3 << 20}}, Code.BAD_REQUEST,
     "fam.size: 3145728 is not a power of two"),
    ({"version": 1, "op": "vm-resources", "job": "1", "vm": 0, "networks": [],
      "fam": {"name": "..", "size": 1 << 20}}, Code.BAD_REQUEST, "fam.name: '..' is not a name"),
])
def test_bad_requests_are_refused_with_a_reason(request_: object, code: Code,
                                                message: str) -> None:
    error = refusal(request_)
    assert error.code is code
    assert message in str(error)
    assert "\n" not in str(error)


def test_good_requests_parse() -> None:
    parsed = protocol.parse(json.dumps({
        "version": 1, "op": "vm-resources", "job": "123", "vm": 2, "networks": [NET],
        "fam": {"name": "fam", "size": 1 << 26}}).encode())
    assert parsed == protocol.VmResources(
        "123", 2, (protocol.NetworkSpec("cluster", "private", 1450),),
        protocol.FamSpec("fam", 1 << 26))
    assert protocol.parse(b'{"version": 1, "op": "release", "job": "7"}\n') == \
        protocol.Release("7")
    assert protocol.parse(b'{"version":1,"op":"ping"}') == protocol.Ping()


def test_device_names_identify_the_job_and_fit() -> None:
    assert netdev.base36(0) == "0" and netdev.base36(35) == "z" and netdev.base36(36) == "10"
    assert netdev.bridge_name("123", 0) == "vcb3fn0"
    assert netdev.tap_name("123", 4, 1) == "vct3fv4n1"
    biggest = netdev.tap_name(str(36**6 - 1), protocol.MAX_VM, protocol.MAX_NETWORKS - 1)
    assert len(biggest) == 15
    with pytest.raises(Refusal, match="longer than 15 characters"):
        netdev.tap_name(str(36**7), protocol.MAX_VM, 0)
    # The prefixes of job 1 do not cover job 36 ("10" in base 36).
    bridges, taps = netdev.job_prefixes("1")
    assert not netdev.bridge_name("36", 0).startswith(bridges)
    assert not netdev.tap_name("36", 0, 0).startswith(taps)
    assert netdev.tap_name("1", 0, 0).startswith(taps)


def test_undo_log_round_trip(tmp_path: Path) -> None:
    log = undo.create(tmp_path, "42", 1001, "alice")
    assert log.entries == [undo.UndoEntry(undo.Kind.STORE, "alice")]
    assert log.network_index("cluster") == 0 and log.network_index("data") == 1
    tap = undo.UndoEntry(undo.Kind.TAP, "vct16v0n0", vm=0, network="cluster")
    log.record(tap)
    log.record(tap)  # once only
    loaded = undo.load(tmp_path, "42")
    assert loaded is not None
    assert (loaded.uid, loaded.user, loaded.networks) == (1001, "alice", {"cluster": 0, "data": 1})
    assert loaded.entries == log.entries
    assert undo.logged_jobs(tmp_path) == ["42"]
    assert sorted(os.listdir(tmp_path / "jobs" / "42")) == ["undo.json"]  # no temp file left
    assert stat.S_IMODE((tmp_path / "jobs" / "42").stat().st_mode) == 0o700
    loaded.forget(tap)
    reloaded = undo.load(tmp_path, "42")
    assert reloaded is not None
    assert reloaded.entries == [undo.UndoEntry(undo.Kind.STORE, "alice")]
    undo.remove(loaded)
    assert undo.load(tmp_path, "42") is None and undo.logged_jobs(tmp_path) == []
    (tmp_path / "jobs" / "43").mkdir()
    (tmp_path / "jobs" / "43" / "undo.json").write_text("{")
    with pytest.raises(Refusal, match=r"undo\.json cannot be read"):
        undo.load(tmp_path, "43")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    return tmp_path / "run"


def test_fam_region_owned_sized_and_shared(run_dir: Path, tmp_path: Path) -> None:
    log = undo.create(tmp_path / "state", "9", 65534, "nobody")
    path = fam.ensure_region(run_dir, log, "fam", 1 << 20, 65534, 65534)
    assert path == run_dir / "jobs" / "9" / "fam" / "fam"
    info = path.stat()
    assert (info.st_size, info.st_uid, stat.S_IMODE(info.st_mode)) == (1 << 20, 65534, 0o600)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711 and path.parent.stat().st_uid == 0
    path.write_bytes(b"kept" + bytes((1 << 20) - 4))
    assert fam.ensure_region(run_dir, log, "fam", 1 << 20, 65534, 65534) == path
    assert path.read_bytes()[:4] == b"kept"  # the same file, not a new one
    with pytest.raises(Refusal, match="exists with 1048576 bytes, not 2097152"):
        fam.ensure_region(run_dir, log, "fam", 2 << 20, 65534, 65534)
    with pytest.raises(Refusal, match="does not fit"):
        fam.ensure_region(run_dir, log, "huge", 1 << 62, 65534, 65534)
    # A link planted where a region goes is refused, never followed.
    target = tmp_path / "target"
    target.write_text("precious")
    (path.parent / "planted").symlink_to(target)
    with pytest.raises(Refusal, match="cannot make FAM region"):
        fam.ensure_region(run_dir, log, "planted", 1 << 20, 65534, 65534)
    assert target.read_text() == "precious" and target.stat().st_uid == 0
    kinds = [(e.kind, e.name) for e in log.entries]
    assert (undo.Kind.FILE, str(path)) in kinds
    assert kinds.index((undo.Kind.DIR, str(path.parent))) < kinds.index((undo.Kind.FILE,
                                                                          str(path)))


def test_client_is_stdlib_only_and_agrees_with_the_protocol() -> None:
    code = ("import sys; import vcluster.agent.client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
            " - {'__main__'}))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert json.loads(out.replace("'", '"')) == ["vcluster"]
    assert (client.VERSION, client.SOCKET_NAME, client.MAX_MESSAGE) == (
        protocol.VERSION, protocol.SOCKET_NAME, protocol.MAX_MESSAGE)


def test_agent_is_import_light() -> None:
    code = ("import sys; import vcluster.agent.main, vcluster.agent.server, "
            "vcluster.agent.jobs, vcluster.agent.reconcile; "
            "print(sorted(m for m in ('click', 'pycdlib', 'qemu', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['yaml']"  # batch.yaml; nothing of the user CLI


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A real agent server on a temporary socket (no SLURM, no store needed for these ops)."""
    from vcluster.agent.jobs import Jobs, Settings
    from vcluster.agent.peer import Slurm
    from vcluster.agent.policy import load_policy
    from vcluster.agent.registration import StoreLink
    from vcluster.agent.server import AgentServer
    from vcluster.agent.service import Agent
    from vcluster.config.batch import StoreConfig

    link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",)))
    jobs = Jobs(Settings(node="unit", state=tmp_path / "state", run=tmp_path / "run"), link,
                load_policy(SAMPLES))
    server = AgentServer(tmp_path / "run" / "agent.sock", Agent(jobs, Slurm("unit"), link),
                         max_connections=1, max_per_uid=1, root_reserve=1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.path
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_socket_framing_and_peer_rules(served: Path) -> None:
    assert stat.S_IMODE(served.stat().st_mode) == 0o666
    agent = client.AgentClient(served, timeout=10)
    assert agent.ping() == {"ok": True, "version": 1, "host": socket.gethostname()}
    if os.geteuid() == 0:
        status = agent.status()
        assert status["jobs"] == [] and status["node"] == "unit"
        assert agent.release("5") == {"ok": True, "job": "5", "removed": []}
    # Raw framing: garbage and old versions get a one-line answer with a code.
    for line, code in ((b"nonsense\n", "bad-request"),
                       (b'{"version": 0, "op": "ping"}\n', "unsupported-version")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(served))
            sock.sendall(line)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and answer["code"] == code
    with pytest.raises(client.AgentUnavailable, match="no vcluster agent socket"):
        client.AgentClient(served.parent / "none.sock").ping()


def test_cli_help_and_bad_config(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "vcluster.agent", "--help"],
                               capture_output=True, text=True, check=True).stdout
    for command in ("serve", "prolog", "release", "status", "ping"):
        assert command in help_text
    (tmp_path / "batch.yaml").write_text("directories:\n  rnu: /x\n")
    proc = subprocess.run([sys.executable, "-m", "vcluster.agent", "--config", str(tmp_path),
                           "ping"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "batch.yaml:2" in proc.stderr
    assert "rnu" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the site's limits

def test_optional_mtu_and_release_user_parse() -> None:
    parsed = protocol.parse(json.dumps({
        "version": 1, "op": "vm-resources", "job": "5", "vm": 0,
        "networks": [{"name": "cluster", "type": "private"}]}).encode())
    assert isinstance(parsed, protocol.VmResources)
    assert parsed.networks == (protocol.NetworkSpec("cluster", "private", None),)
    assert protocol.parse(b'{"version":1,"op":"release","job":"7","user":"alice"}') == \
        protocol.Release("7", "alice")
    error = refusal({"version": 1, "op": "release", "job": "7", "user": "../x"})
    assert error.code is Code.BAD_REQUEST and "user: '../x' is not a user name" in str(error)


def write_site(directory: Path, max_size: str = "64M") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "networks.yaml").write_text(
        "cluster:\n  type: private\n  subnet: 10.200.0.0/16\n  mtu: 1450\n"
        "data:\n  type: private\n  subnet: 10.201.0.0/16\n  mtu: 9000\n"
        "nat:\n  type: nat\n  subnet: 10.250.0.0/24\n")
    (directory / "resources.yaml").write_text(
        "small:\n  networks: [cluster]\n  fam:\n    max-size: 16M\n    default-size: 16M\n"
        f"big:\n  networks: [cluster, data]\n  fam:\n    max-size: {max_size}\n"
        "    default-size: 16M\n")
    return directory


def vm_request(vm: int = 0, networks: tuple[protocol.NetworkSpec, ...] = (),
               fam_size: int | None = None) -> protocol.VmResources:
    fam_spec = None if fam_size is None else protocol.FamSpec("fam", fam_size)
    return protocol.VmResources("42", vm, networks, fam_spec)


def jobs_with(policy_dir: Path, tmp_path: Path) -> object:
    from vcluster.agent.jobs import Jobs, Settings
    from vcluster.agent.policy import load_policy
    from vcluster.agent.registration import StoreLink
    from vcluster.config.batch import StoreConfig

    link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",)))
    return Jobs(Settings(node="unit", state=tmp_path / "state", run=tmp_path / "run"), link,
                load_policy(policy_dir))


def test_site_policy_decides_networks_mtus_and_fam_sizes(tmp_path: Path) -> None:
    from vcluster.agent.jobs import Jobs
    from vcluster.agent.peer import JobInfo

    site = write_site(tmp_path / "conf")
    jobs = jobs_with(site, tmp_path)
    assert isinstance(jobs, Jobs)
    info = JobInfo(job="42", uid=1000, user="alice", state="RUNNING", nodes="h1", tasks=2)
    cluster, data = (protocol.NetworkSpec("cluster", "private", None),
                     protocol.NetworkSpec("data", "private", 9000))
    assert jobs.check(vm_request(1, (cluster, data), 64 << 20), info) == \
        {"cluster": 1450, "data": 9000}

    def refused(request: protocol.VmResources, job: JobInfo = info) -> Refusal:
        with pytest.raises(Refusal) as caught:
            jobs.check(request, job)
        assert "\n" not in str(caught.value)
        return caught.value

    over = refused(vm_request(0, (), 128 << 20))
    assert over.code is Code.DENIED
    assert "128M is more than 64M, the largest fam.max-size of this site" in str(over)
    assert f"resource set 'big' at {site / 'resources.yaml'}:7" in str(over)
    unknown = refused(vm_request(0, (protocol.NetworkSpec("evil", "private", 1500),)))
    assert unknown.code is Code.DENIED
    assert "networks[0].name: network 'evil' is not defined in " \
        f"{site / 'networks.yaml'} (private networks there: cluster, data)" in str(unknown)
    nat = refused(vm_request(0, (protocol.NetworkSpec("nat", "private", None),)))
    assert "network 'nat' is a nat network" in str(nat)
    mtu = refused(vm_request(0, (protocol.NetworkSpec("cluster", "private", 9000),)))
    assert mtu.code is Code.BAD_REQUEST
    assert f"mtu: 9000 differs from the MTU 1450 that {site / 'networks.yaml'}:2" in str(mtu)
    index = refused(vm_request(2), info)
    assert index.code is Code.DENIED and "vm: 2 is not below the task count of job 42 (2;" \
        in str(index)
    unsure = refused(vm_request(0), JobInfo("42", 1000, "alice", "RUNNING", "h1", None))
    assert unsure.code is Code.FAILED and "NumTasks" in str(unsure)
    # No resource set at all: no regions.
    (site / "resources.yaml").unlink()
    bare = jobs_with(site, tmp_path)
    assert isinstance(bare, Jobs)
    with pytest.raises(Refusal, match="this site allows no FAM regions"):
        bare.check(vm_request(0, (), 1 << 20), info)


def test_region_names_per_job_are_capped(tmp_path: Path) -> None:
    from vcluster.agent.policy import load_policy

    policy = load_policy(write_site(tmp_path / "conf"))
    names = {f"r{i}" for i in range(protocol.MAX_REGIONS)}
    policy.check_region_count("r0", names)  # an existing one again: fine
    policy.check_region_count("r0", set())
    with pytest.raises(Refusal, match=f"a job may have at most {protocol.MAX_REGIONS}") as e:
        policy.check_region_count("r8", names)
    assert e.value.code is Code.DENIED


def test_broken_site_policy_names_file_and_line(tmp_path: Path) -> None:
    from vcluster.agent.policy import load_policy
    from vcluster.errors import ConfigError

    site = write_site(tmp_path / "conf")
    (site / "resources.yaml").write_text("big:\n  networks: [cluster]\n  fam:\n"
                                         "    max-size: 3M\n")
    with pytest.raises(ConfigError, match=r"resources\.yaml:4.*not a power of two"):
        load_policy(site)


def test_job_locks_are_dropped_after_use(tmp_path: Path) -> None:
    from vcluster.agent.jobs import Jobs

    jobs = jobs_with(write_site(tmp_path / "conf"), tmp_path)
    assert isinstance(jobs, Jobs)
    entered = threading.Event()
    go = threading.Event()
    order: list[str] = []

    def hold(name: str) -> None:
        with jobs.locked("1"):
            order.append(name)
            entered.set()
            go.wait(5)

    holder = threading.Thread(target=hold, args=("holder",))
    holder.start()
    entered.wait(5)
    waiter = threading.Thread(target=hold, args=("waiter",))
    waiter.start()
    time.sleep(0.2)
    assert jobs.lock_count() == 1 and order == ["holder"]  # one lock, held and waited for
    go.set()
    holder.join()
    waiter.join()
    assert order == ["holder", "waiter"]
    assert jobs.lock_count() == 0
    for job in ("2", "3", "4"):
        if os.geteuid() == 0:
            jobs.release(job)  # nothing logged: nothing to do, no lock kept
        else:
            with jobs.locked(job):
                pass
    assert jobs.lock_count() == 0


# ------------------------------------------------------------------ the socket


def test_a_busy_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    from vcluster.agent import server

    path = tmp_path / "agent.sock"
    # A listener that never accepts, its backlog full: connecting blocks (a busy agent).
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(0)
    waiting = []
    try:
        for _ in range(8):
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.setblocking(False)
            waiting.append(extra)
            try:
                extra.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(OSError, match=f"another agent answers on {path}"):
            server._clear_stale_socket(path)
        assert path.exists()
    finally:
        for extra in waiting:
            extra.close()
        live.close()
    # A socket nobody listens on any more (ECONNREFUSED) is a dead agent's: removed.
    assert path.exists()
    server._clear_stale_socket(path)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        server._clear_stale_socket(path)


def test_silent_and_trickling_clients_are_cut_off(served: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vcluster.agent import server

    monkeypatch.setattr(server, "READ_DEADLINE", 1.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served))
        start = time.monotonic()
        sock.settimeout(5)
        for byte in b'{"version": 1, "op"':  # a byte every 0.1 s: over the deadline in all
            try:
                sock.send(bytes([byte]))
            except BrokenPipeError:
                break  # the agent gave up on us
            time.sleep(0.1)
        answer = json.loads(sock.makefile("rb").readline())
        took = time.monotonic() - start
    assert answer["code"] == "bad-request" and "no complete request within 1 s" in \
        answer["error"]
    assert 0.9 < took < 2.5


def test_connections_beyond_the_limits_are_told_busy(served: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the served agent's limits are checked here as root")
    # Root may have its reserve (1) plus the free non-root slots (1): 2 idle ones.
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in idle:
            sock.connect(str(served))
        time.sleep(0.2)  # accepted and counted
        with pytest.raises(client.AgentError, match="serves 2 requests of root") as e:
            client.AgentClient(served, timeout=5).ping()
        assert e.value.code == "busy"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert client.AgentClient(served, timeout=5).ping()["ok"] is True
