"""The agent's pure parts and local mechanics: schema, names, undo log, FAM files, socket.

All of it runs as a normal user: the jobs are the test's own uid's, devices
are ``FakeDevices`` (tests/helpers/agent_fakes.py).
"""

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

from tests.helpers.agent_fakes import FakeDevices, FakeFirewall
from tests.helpers.agent_site import AgentHost, served, write_site
from tests.helpers.waiting import wait_for
from tests.support_agent import CLIENT_FILES
from vcluster.agent import client, fam, netdev, protocol, undo
from vcluster.agent.jobs import Jobs
from vcluster.agent.protocol import AgentError, Code
from vcluster.agent.server import AgentServer
from vcluster.errors import ResourceError
from vcluster.hostpaths import HostLayout

ROOT = Path(__file__).resolve().parents[1]


def refusal(line: object) -> AgentError:
    with pytest.raises(AgentError) as info:
        protocol.parse(json.dumps(line).encode())
    return info.value


NET = {"name": "cluster", "type": "private", "mtu": 1450}


@pytest.mark.parametrize(("request_", "code", "message"), [
    ({"op": "ping"}, Code.UNSUPPORTED_VERSION, "request version null is not supported"),
    ({"version": 1, "op": "ping"}, Code.UNSUPPORTED_VERSION, "this agent speaks version 2"),
    ([1], Code.BAD_REQUEST, "not a JSON object"),
    ({"version": 2, "op": "reboot"}, Code.BAD_REQUEST, 'op: "reboot" is not an operation'),
    ({"version": 2, "op": "release"}, Code.BAD_REQUEST, "request: missing field 'job'"),
    ({"version": 2, "op": "release", "job": 12}, Code.BAD_REQUEST,
     "request job: 12 is not a string"),
    ({"version": 2, "op": "ping", "job": "1"}, Code.BAD_REQUEST,
     "request: unknown field 'job' (a Ping has no fields"),
    ({"version": 2, "op": "release", "job": "../1"}, Code.BAD_REQUEST,
     "job: '../1' is not a SLURM job id"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": -1, "networks": []},
     Code.BAD_REQUEST, "vm: -1 is out of range"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": True, "networks": []},
     Code.BAD_REQUEST, "request vm: a boolean is not an integer"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0, "networks": [1]},
     Code.BAD_REQUEST, "request networks[0]: 1 is not an object (NetworkSpec)"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "speed": 10}]}, Code.BAD_REQUEST,
     "request networks[0]: unknown field 'speed'"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0, "networks": [NET, NET]},
     Code.BAD_REQUEST, "a name appears twice"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "type": "Private!"}]}, Code.BAD_REQUEST,
     "request networks[0].type: 'Private!' is not a network type"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "mtu": 40}]}, Code.BAD_REQUEST, "networks[0].mtu: 40 is out of range"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0,
      "networks": [{**NET, "name": "a/b"}]}, Code.BAD_REQUEST,
     "networks[0].name: 'a/b' is not a name"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0, "networks": [],
      "fam": {"name": "fam", "size": 3 << 20}}, Code.BAD_REQUEST,
     "fam.size: 3145728 is not a power of two"),
    ({"version": 2, "op": "vm-resources", "job": "1", "vm": 0, "networks": [],
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
        "version": 2, "op": "vm-resources", "job": "123", "vm": 2, "networks": [NET],
        "fam": {"name": "fam", "size": 1 << 26}}).encode())
    assert parsed == protocol.VmResources(
        "123", 2, (protocol.NetworkSpec("cluster", "private", 1450),),
        protocol.FamSpec("fam", 1 << 26))
    assert protocol.parse(b'{"version": 2, "op": "release", "job": "7"}\n') == \
        protocol.Release("7")
    assert protocol.parse(b'{"version":2,"op":"ping"}') == protocol.Ping()


def test_device_names_identify_the_job_and_fit() -> None:
    assert netdev.base36(0) == "0" and netdev.base36(35) == "z" and netdev.base36(36) == "10"
    assert netdev.bridge_name("123", 0) == "vcb3fn0"
    assert netdev.tap_name("123", 4, 1) == "vct3fv4n1"
    biggest = netdev.tap_name(str(36**6 - 1), protocol.MAX_VM, protocol.MAX_NETWORKS - 1)
    assert len(biggest) == 15
    with pytest.raises(ResourceError, match="longer than 15 characters"):
        netdev.tap_name(str(36**7), protocol.MAX_VM, 0)
    # The prefixes of job 1 do not cover job 36 ("10" in base 36).
    bridges, taps, vxlans = netdev.job_prefixes("1")
    assert not netdev.bridge_name("36", 0).startswith(bridges)
    assert not netdev.tap_name("36", 0, 0).startswith(taps)
    assert not netdev.vxlan_name("36", 0).startswith(vxlans)
    assert netdev.tap_name("1", 0, 0).startswith(taps)
    assert netdev.vxlan_name("123", 1) == "vcx3fn1"
    assert netdev.vxlan_name("1", 0).startswith(vxlans)
    assert len(netdev.vxlan_name(str(36**6 - 1), protocol.MAX_NETWORKS - 1)) < 15


def test_undo_log_round_trip(tmp_path: Path) -> None:
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    log = undo.create(layout, "42", 1001, "alice")
    assert log.path == layout.undo_log("42")
    assert log.entries == [undo.UndoEntry(undo.Kind.STORE, "alice")]
    assert log.network_index("cluster") == 0 and log.network_index("data") == 1
    tap = undo.UndoEntry(undo.Kind.TAP, "vct16v0n0", vm=0, network="cluster")
    log.record(tap)
    log.record(tap)  # once only
    loaded = undo.load(layout, "42")
    assert loaded is not None
    assert (loaded.uid, loaded.user, loaded.networks) == (1001, "alice", {"cluster": 0, "data": 1})
    assert loaded.entries == log.entries and loaded.created == log.created
    assert undo.logged_jobs(layout) == ["42"]
    assert sorted(os.listdir(layout.undo_dir("42"))) == ["undo.json"]  # no temp file left
    assert stat.S_IMODE(layout.undo_dir("42").stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.undo_log("42").stat().st_mode) == 0o600
    loaded.forget(tap)
    reloaded = undo.load(layout, "42")
    assert reloaded is not None
    assert reloaded.entries == [undo.UndoEntry(undo.Kind.STORE, "alice")]
    undo.remove(loaded)
    assert undo.load(layout, "42") is None and undo.logged_jobs(layout) == []
    layout.undo_dir("43").mkdir()
    layout.undo_log("43").write_text("{")
    with pytest.raises(ResourceError, match=r"undo\.json is not valid JSON"):
        undo.load(layout, "43")


def test_undo_logs_of_this_format_still_read(tmp_path: Path) -> None:
    # As the agent wrote them before the codec: entries without vm/network.
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    layout.undo_dir("5").mkdir(parents=True)
    layout.undo_log("5").write_text(json.dumps({
        "format": 1, "job": "5", "uid": 7, "user": "bob", "created": 1.5,
        "networks": {"cluster": 0}, "published": True,
        "entries": [{"kind": "store", "name": "bob"},
                    {"kind": "tap", "name": "vct5v0n0", "vm": 0, "network": "cluster"}]}))
    log = undo.load(layout, "5")
    assert log is not None and log.published and log.created == 1.5
    assert log.entries == [undo.UndoEntry(undo.Kind.STORE, "bob"),
                           undo.UndoEntry(undo.Kind.TAP, "vct5v0n0", 0, "cluster")]


@pytest.mark.parametrize(("change", "message"), [
    ({"format": 2}, ": format 2 is not 1, the one this agent writes"),
    ({"colour": "red"}, ": unknown field 'colour'"),
    ({"uid": "7"}, " uid: '7' is not an integer"),
    ({"entries": [{"kind": "socket", "name": "x"}]},
     " entries[0].kind: 'socket' is not one of 'bridge', 'tap'"),
    ({"entries": [{"kind": "tap", "name": "x", "mtu": 1}]},
     " entries[0]: unknown field 'mtu'"),
])
def test_undo_logs_are_read_strictly(tmp_path: Path, change: dict[str, object],
                                     message: str) -> None:
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    undo.create(layout, "6", 7, "bob")
    data = json.loads(layout.undo_log("6").read_text())
    layout.undo_log("6").write_text(json.dumps({**data, **change}))
    with pytest.raises(ResourceError) as caught:
        undo.load(layout, "6")
    assert str(caught.value).startswith(f"the undo log {layout.undo_log('6')}{message}")
    assert "fix or remove it" in str(caught.value) and "\n" not in str(caught.value)


def test_fam_region_owned_sized_and_shared(tmp_path: Path) -> None:
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    uid, gid = os.getuid(), os.getgid()  # the job's user is the test's: no root needed
    log = undo.create(layout, "9", uid, "me")
    path = fam.ensure_region(layout, log, "fam", 1 << 20, uid, gid)
    assert path == layout.fam_region("9", "fam")
    info = path.stat()
    assert (info.st_size, info.st_uid, stat.S_IMODE(info.st_mode)) == (1 << 20, uid, 0o600)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
    assert path.parent.stat().st_uid == os.geteuid()  # the agent's
    path.write_bytes(b"kept" + bytes((1 << 20) - 4))
    assert fam.ensure_region(layout, log, "fam", 1 << 20, uid, gid) == path
    assert path.read_bytes()[:4] == b"kept"  # the same file, not a new one
    with pytest.raises(ResourceError, match="exists with 1048576 bytes, not 2097152"):
        fam.ensure_region(layout, log, "fam", 2 << 20, uid, gid)
    with pytest.raises(ResourceError, match="does not fit"):
        fam.ensure_region(layout, log, "huge", 1 << 62, uid, gid)
    # A link planted where a region goes is refused, never followed.
    target = tmp_path / "target"
    target.write_text("precious")
    (path.parent / "planted").symlink_to(target)
    with pytest.raises(ResourceError, match="cannot make FAM region"):
        fam.ensure_region(layout, log, "planted", 1 << 20, uid, gid)
    assert target.read_text() == "precious"
    kinds = [(e.kind, e.name) for e in log.entries]
    assert (undo.Kind.FILE, str(path)) in kinds
    assert kinds.index((undo.Kind.DIR, str(path.parent))) < kinds.index((undo.Kind.FILE,
                                                                          str(path)))


def test_client_is_import_light_and_its_copy_complete() -> None:
    # The sandbox tests run the client from a copy of CLIENT_FILES, as other users.
    code = ("import sys; import vcluster.agent.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] not in "
            "sys.stdlib_module_names and m != '__main__'))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    modules = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for name in CLIENT_FILES}
    assert json.loads(out.replace("'", '"')) == sorted(modules)


def test_agent_is_import_light() -> None:
    code = ("import sys; import vcluster.agent.main, vcluster.agent.server, "
            "vcluster.agent.jobs, vcluster.agent.reconcile; "
            "print(sorted(m for m in ('click', 'pycdlib', 'qemu', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['yaml']"  # batch.yaml; nothing of the user CLI


@pytest.fixture
def host(tmp_path: Path) -> AgentHost:
    return AgentHost(tmp_path)


@pytest.fixture
def server(host: AgentHost) -> Iterator[AgentServer]:
    """A real agent server on a temporary socket (fake devices and SLURM, a MemoryStore)."""
    with served(host, max_connections=8, max_per_uid=8, root_reserve=8) as running:
        yield running


@pytest.fixture
def tight_server(host: AgentHost) -> Iterator[AgentServer]:
    """The same with room for 2 connections of users, 1 each, and 1 more for root."""
    with served(host, max_connections=2, max_per_uid=1, root_reserve=1) as running:
        yield running


def test_socket_framing_and_peer_rules(server: AgentServer) -> None:
    path = server.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    agent = client.AgentClient(path, timeout=10)
    assert agent.ping() == protocol.PingAnswer(version=protocol.VERSION, host=socket.gethostname())
    if os.geteuid() == 0:
        status = agent.status()
        assert status.jobs == () and status.node == "unit"
        assert agent.release("5") == protocol.ReleaseAnswer(job="5", removed=())
    else:
        with pytest.raises(AgentError, match=r"status needs root \(you are uid") as e:
            agent.status()
        assert e.value.code is Code.DENIED
    # Raw framing: garbage and old versions get a one-line answer with a code.
    for line, code in ((b"nonsense\n", "bad-request"),
                       (b'{"version": 0, "op": "ping"}\n', "unsupported-version")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(line)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False and answer["code"] == code
        assert set(answer) == {"ok", "code", "error"}
    with pytest.raises(client.AgentUnavailable, match="no vcluster agent socket") as gone:
        client.AgentClient(path.parent / "none.sock").ping()
    assert gone.value.code is Code.UNAVAILABLE


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
        "version": 2, "op": "vm-resources", "job": "5", "vm": 0,
        "networks": [{"name": "cluster", "type": "private"}]}).encode())
    assert isinstance(parsed, protocol.VmResources)
    assert parsed.networks == (protocol.NetworkSpec("cluster", "private", None),)
    assert protocol.parse(b'{"version":2,"op":"release","job":"7","user":"alice"}') == \
        protocol.Release("7", "alice")
    error = refusal({"version": 2, "op": "release", "job": "7", "user": "../x"})
    assert error.code is Code.BAD_REQUEST and "user: '../x' is not a user name" in str(error)


def vm_request(vm: int = 0, networks: tuple[protocol.NetworkSpec, ...] = (),
               fam_size: int | None = None) -> protocol.VmResources:
    fam_spec = None if fam_size is None else protocol.FamSpec("fam", fam_size)
    return protocol.VmResources("42", vm, networks, fam_spec)


def jobs_with(policy_dir: Path, tmp_path: Path) -> Jobs:
    from vcluster.agent.jobs import Settings
    from vcluster.agent.policy import load_policy
    from vcluster.agent.registration import StoreLink
    from vcluster.config.batch import StoreConfig

    link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",)))
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    return Jobs(Settings(node="unit", layout=layout), link, load_policy(policy_dir),
                FakeDevices(), FakeFirewall())


def test_site_policy_decides_networks_mtus_and_fam_sizes(tmp_path: Path) -> None:
    from vcluster.agent.peer import JobInfo

    site = write_site(tmp_path / "conf")
    jobs = jobs_with(site, tmp_path)
    info = JobInfo(job="42", uid=1000, user="alice", state="RUNNING", nodes="h1", tasks=2)
    cluster, data = (protocol.NetworkSpec("cluster", "private", None),
                     protocol.NetworkSpec("data", "private", 9000))
    assert jobs.check(vm_request(1, (cluster, data), 64 << 20), info) == \
        {"cluster": 1450, "data": 9000}

    def refused(request: protocol.VmResources, job: JobInfo = info) -> AgentError:
        with pytest.raises(AgentError) as caught:
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
        f"{site / 'networks.yaml'} (nat/private networks there: cluster, data, nat)" \
        in str(unknown)
    nat = refused(vm_request(0, (protocol.NetworkSpec("nat", "private", None),)))
    assert nat.code is Code.DENIED
    assert "network 'nat' is a nat network" in str(nat)
    assert "not private" in str(nat)
    assert jobs.check(vm_request(0, (protocol.NetworkSpec("nat", "nat", None),)), info) == \
        {"nat": 1500}
    no_type = refused(vm_request(0, (protocol.NetworkSpec("cluster", "vlan", None),)))
    assert "networks[0].type: 'vlan' is not a network type (expected 'nat' or 'private')" \
        in str(no_type)
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
    with pytest.raises(AgentError, match="this site allows no FAM regions"):
        bare.check(vm_request(0, (), 1 << 20), info)


def test_region_names_per_job_are_capped(tmp_path: Path) -> None:
    from vcluster.agent.policy import load_policy

    policy = load_policy(write_site(tmp_path / "conf"))
    names = {f"r{i}" for i in range(protocol.MAX_REGIONS)}
    policy.check_region_count("r0", names)  # an existing one again: fine
    policy.check_region_count("r0", set())
    with pytest.raises(AgentError, match=f"a job may have at most {protocol.MAX_REGIONS}") as e:
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


def test_a_second_locker_waits_for_the_first(tmp_path: Path) -> None:
    jobs = jobs_with(write_site(tmp_path / "conf"), tmp_path)
    holding, done, entered = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with jobs.locked("1"):
            holding.set()
            done.wait(10)

    def wait() -> None:
        with jobs.locked("1"):
            entered.set()

    holder = threading.Thread(target=hold)
    waiter = threading.Thread(target=wait)
    holder.start()
    try:
        assert holding.wait(5)
        waiter.start()
        # The waiter has asked for the lock (it counts as a user of it)...
        wait_for("the second locker to ask", lambda: jobs.lock_users("1") == 2, timeout=5)
        # ...and does not get it while the first holds it: one lock, shared.
        assert not entered.wait(0.3)
        assert jobs.lock_count() == 1
    finally:
        done.set()
        holder.join()
    assert entered.wait(5)  # and gets it once the first let go
    waiter.join()
    assert jobs.lock_count() == 0 and jobs.lock_users("1") == 0


def test_job_locks_are_dropped_after_use(tmp_path: Path) -> None:
    jobs = jobs_with(write_site(tmp_path / "conf"), tmp_path)
    for job in ("2", "3", "4"):
        jobs.release(job)  # nothing logged: nothing to do, no lock kept
    with pytest.raises(RuntimeError), jobs.locked("5"):
        raise RuntimeError("a failing operation")
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


def test_silent_and_trickling_clients_are_cut_off(server: AgentServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vcluster.agent import server as module

    monkeypatch.setattr(module, "READ_DEADLINE", 1.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
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


def test_connections_beyond_the_limits_are_told_busy(tight_server: AgentServer) -> None:
    server = tight_server
    uid = os.getuid()
    # Root may have its reserve (1) plus the free non-root slots (2); another user, 1.
    count, said = (3, "serves 3 requests of root") if uid == 0 else \
        (1, f"serves 1 requests of uid {uid} already")
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in idle:
            sock.connect(str(server.path))
        wait_for("the idle connections to be counted", lambda: server.active() == {uid: count})
        with pytest.raises(client.AgentError, match=said) as e:
            client.AgentClient(server.path, timeout=5).ping()
        assert e.value.code is Code.BUSY
    finally:
        for sock in idle:
            sock.close()
    wait_for("the idle connections to be let go", lambda: server.active() == {})
    assert client.AgentClient(server.path, timeout=5).ping().host == socket.gethostname()
