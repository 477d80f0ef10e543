"""The agent's wire protocol, typed both ways: round trips, refusals, and a real socket.

Every request and answer goes through vcluster.codec on both ends; these
tests hold each to a round trip and check that what does not decode is
refused naming the field.  The last ones talk to a real server (fake
devices and SLURM, a MemoryStore) with the real client, as the test's own
user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers.agent_site import AgentHost, me, served
from vcluster import codec
from vcluster.agent import netdev
from vcluster.agent import protocol as p
from vcluster.agent.client import AgentClient, AgentUnavailable
from vcluster.agent.protocol import AgentError, Code
from vcluster.errors import VclusterError

REQUESTS: list[p.Request] = [
    p.Ping(),
    p.VmResources("123", 2, (p.NetworkSpec("cluster", "private", 1450),
                             p.NetworkSpec("data", "private")), p.FamSpec("fam", 1 << 26)),
    p.VmResources("5", 0, ()),
    p.VmResources("12", 1, (p.NetworkSpec("cluster", "private", vni=4100),)),
    p.Vnis("12", ("cluster", "data")),
    p.Vnis("12", ()),
    p.Credentials(),
    p.Prolog("7"),
    p.Release("7"),
    p.Release("7", "alice"),
    p.Status(),
]

LOGGED = p.LoggedJob(uid=1000, user="alice", created=1.5, published=True,
                     networks={"cluster": 0},
                     entries=(p.LoggedEntry("store", "alice"),
                              p.LoggedEntry("nft", "vcluster_job_123"),
                              p.LoggedEntry("vxlan", "vcx3fn0", network="cluster", vni=4100),
                              p.LoggedEntry("tap", "vct3fv0n0", vm=0, network="cluster")))
ANSWERS: list[p.Answer] = [
    p.PingAnswer(version=1, host="h1"),
    p.VmResourcesAnswer(taps=(p.TapInfo("cluster", "vct3fv0n0"),
                              p.TapInfo("data", "vct3fv0n1", "02:00:00:00:00:01")),
                        fam=p.FamRegion(Path("/run/vcluster/jobs/123/fam/fam"), 1 << 26),
                        workdir=Path("/var/lib/vcluster/work/123")),
    p.VmResourcesAnswer(taps=(), fam=None, workdir=Path("/w")),
    p.VnisAnswer(vnis={"cluster": 4100, "data": 5000}),
    p.CredentialsAnswer(user="vc-alice", password="secret", prefix="/vcluster/users/alice/",
                        endpoints=("https://ctl:2379",), ca_cert="-----BEGIN CERTIFICATE-----"),
    p.PrologAnswer(job="7", published=False),
    p.ReleaseAnswer(job="7", removed=("tap vct7v0n0", "store keys (user alice)")),
    p.StatusAnswer(host="h1", node="h1", registered=True,
                   jobs=(p.JobStatus("3", log=LOGGED), p.JobStatus("4", error="unreadable"))),
]


def unreadable(message: str) -> Exception:
    return ValueError(message)


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_: p.Request) -> None:
    line = p.encode_request(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    data = json.loads(line)
    assert (data["version"], data["op"]) == (p.VERSION, request_.op)
    assert p.parse(line) == request_


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: type(a).__name__)
def test_every_answer_round_trips(answer: p.Answer) -> None:
    line = p.encode_reply(p.Answered(True, answer))
    assert json.loads(line)["ok"] is True
    assert p.decode_reply(line, type(answer), unreadable) == answer


def test_every_op_has_a_request_class_and_a_client_method() -> None:
    assert list(p.OPS) == ["ping", "vm-resources", "vnis", "credentials", "prolog", "release",
                           "status"]
    for op in p.OPS:
        assert callable(getattr(AgentClient, op.replace("-", "_")))


def test_refusals_come_back_as_agent_errors() -> None:
    line = p.encode_reply(p.Refused(False, "denied", "release needs root (you are uid 5)"))
    with pytest.raises(AgentError, match=r"^release needs root \(you are uid 5\)$") as e:
        p.decode_reply(line, p.ReleaseAnswer, unreadable)
    assert e.value.code is Code.DENIED
    # A code a newer agent may send reads as a failure, with its message.
    newer = b'{"ok": false, "code": "overheated", "error": "too hot"}\n'
    with pytest.raises(AgentError, match="too hot") as e:
        p.decode_reply(newer, p.PingAnswer, unreadable)
    assert e.value.code is Code.FAILED
    assert isinstance(e.value, VclusterError)


@pytest.mark.parametrize(("reply", "message"), [
    (b"{", "the reply is not JSON"),
    (b'{"ok": true}', "reply Answered: missing field 'answer'"),
    (b'{"ok": "yes", "answer": {}}', "reply Answered.ok: 'yes' is not one of True"),
    (b'{"ok": true, "answer": {"version": 1, "host": "h1", "load": 3}}',
     "reply answer: unknown field 'load'"),
    (b'{"ok": true, "answer": {"taps": [{"network": "c"}], "fam": null, "workdir": "/w"}}',
     "reply answer.taps[0]: missing field 'ifname'"),
    (b'{"ok": false, "code": "denied"}', "reply Refused: missing field 'error'"),
])
def test_unreadable_replies_name_what_is_wrong(reply: bytes, message: str) -> None:
    cls: type[object] = p.VmResourcesAnswer if b"taps" in reply else p.PingAnswer
    with pytest.raises(ValueError) as e:
        p.decode_reply(reply, cls, unreadable)
    assert message in str(e.value)


def test_a_job_status_is_its_log_or_an_error() -> None:
    for bad in ({"job": "3"}, {"job": "3", "error": "x", "log": codec.to_data(LOGGED)}):
        with pytest.raises(codec.CodecError, match="either its log or an error"):
            codec.from_data(p.JobStatus, bad)


def test_credentials_do_not_show_the_password() -> None:
    answer = p.CredentialsAnswer(user="vc-a", password="hunter2", prefix="/p/",
                                 endpoints=())
    assert "hunter2" not in repr(answer)


def test_the_protocol_is_import_light() -> None:
    code = ("import sys; import vcluster.agent.protocol; "
            "print(sorted(m for m in sys.modules if m.startswith('vcluster')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.replace("'", '"')) == [
        "vcluster", "vcluster.agent", "vcluster.agent.protocol", "vcluster.codec",
        "vcluster.errors"]


# ------------------------------------------------------------------ over the socket


@pytest.fixture
def host(tmp_path: Path) -> AgentHost:
    return AgentHost(tmp_path)


def test_the_typed_client_gets_open_taps_a_region_and_a_workdir(host: AgentHost) -> None:
    info = host.job("21", tasks=1)
    host.slurm.pids[os.getpid()] = "21"  # this test's process is a task of the job
    with served(host, max_connections=4, max_per_uid=4, root_reserve=4) as server:
        agent = AgentClient(server.path, timeout=10)
        devices = agent.vm_resources("21", 0, [p.NetworkSpec("cluster", "private")],
                                     p.FamSpec("fam", 1 << 20))
        try:
            assert [(t.network, t.ifname, t.mac) for t in devices.taps] == \
                [("cluster", netdev.tap_name("21", 0, 0), None)]
            os.fstat(devices.taps[0].fd)  # a descriptor of ours, passed over the socket
            assert devices.fam == p.FamRegion(host.layout.fam_region("21", "fam"), 1 << 20)
            assert devices.workdir == host.layout.work_dir("21") and devices.workdir.is_dir()
        finally:
            devices.close()
        # What the agent refuses comes back with its code, through the one boundary.
        with pytest.raises(AgentError, match=r"request networks\[0\]\.mtu: 40 is out of "
                                             "range") as e:
            agent.vm_resources("21", 0, [p.NetworkSpec("cluster", "private", 40)], None)
        assert e.value.code is Code.BAD_REQUEST
        with pytest.raises(AgentError, match="vm: 1 is not below the task count") as e:
            agent.vm_resources("21", 1, [], None)
        assert e.value.code is Code.DENIED
        with pytest.raises(AgentError, match="exists with 1048576 bytes, not 2097152") as e:
            agent.vm_resources("21", 0, [], p.FamSpec("fam", 2 << 20))  # a ResourceError
        assert e.value.code is Code.FAILED
        with pytest.raises(AgentError, match="is not part of job 22") as e:
            agent.vm_resources("22", 0, [], None)
        assert e.value.code is Code.DENIED
        with pytest.raises(AgentError, match=r"has no password-file in batch\.yaml") as e:
            agent.credentials()  # a CredentialsError: the test's store issues no users
        assert e.value.code is Code.FAILED
        if os.geteuid() == 0:
            status = agent.status()
            assert [j.job for j in status.jobs] == ["21"] and status.node == "unit"
            log = status.jobs[0].log
            assert log is not None and log.user == info.user == me()
            released = agent.release("21", me())
            assert f"tree {host.layout.work_dir('21')}" in released.removed
            assert agent.status().jobs == ()


def test_a_broken_answer_is_the_agent_being_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b'{"ok": true, "answer": {"version": "one", "host": "x"}}\n')

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(AgentUnavailable, match=r"sent a broken answer \(reply "
                                                   r"answer\.version: 'one' is not an "
                                                   "integer"):
            AgentClient(path, timeout=5).ping()
        thread.join()


def test_the_agent_commands_print_the_typed_answers(host: AgentHost,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from vcluster.agent.main import main

    conf = host.root / "conf"
    (conf / "batch.yaml").write_text(f"directories:\n  state: {host.layout.state}\n"
                                     f"  run: {host.layout.run}\n")
    info = host.job("31")
    _answer, fds = host.jobs.vm_resources(
        p.VmResources("31", 0, (p.NetworkSpec("cluster", "private"),)), info, os.getgid())
    for fd in fds:
        os.close(fd)
    with served(host, max_connections=4, max_per_uid=4, root_reserve=4):
        assert main(["--config", str(conf), "ping"]) == 0
        assert json.loads(capsys.readouterr().out) == {"version": p.VERSION,
                                                       "host": socket.gethostname()}
        if os.geteuid() != 0:
            assert main(["--config", str(conf), "status"]) == 1
            assert "vcluster-agent: status needs root" in capsys.readouterr().err
            return
        assert main(["--config", str(conf), "status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        bridge, tap = netdev.bridge_name("31", 0), netdev.tap_name("31", 0, 0)
        assert lines == [
            f"host {socket.gethostname()} (node unit), registered in the store: no",
            f"job 31 of {me()} (uid {os.getuid()}):",
            f"  store   {me()}",
            f"  bridge  {bridge} network=cluster",
            f"  tap     {tap} vm=0 network=cluster",
            f"  tree    {host.layout.work_dir('31')}",
        ]
        assert main(["--config", str(conf), "status", "--json"]) == 0
        status = codec.from_json(p.StatusAnswer, capsys.readouterr().out)
        assert [j.job for j in status.jobs] == ["31"] and status.node == "unit"
        assert main(["--config", str(conf), "release", "31", "--user", me()]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"job 31 released on {socket.gethostname()}: tree ")
        assert f"tap {tap}" in out and f"store keys (user {me()})" in out
        assert main(["--config", str(conf), "release", "31"]) == 0
        assert "nothing to remove" in capsys.readouterr().out
