"""The agent's pure parts and local mechanics: schema, names, undo log, FAM files, socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcluster.agent import client, fam, netdev, protocol, undo
from vcluster.agent.protocol import Code, Refusal

ROOT = Path(__file__).resolve().parents[1]


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
    from vcluster.agent.registration import StoreLink
    from vcluster.agent.server import AgentServer
    from vcluster.agent.service import Agent
    from vcluster.config.batch import StoreConfig

    link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",)))
    jobs = Jobs(Settings(node="unit", state=tmp_path / "state", run=tmp_path / "run"), link)
    server = AgentServer(tmp_path / "run" / "agent.sock", Agent(jobs, Slurm("unit"), link))
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
