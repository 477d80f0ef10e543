"""The host agent for real: in the sandbox, with real SLURM jobs of real unix users."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.waiting import wait_for
from tests.support_agent import (
    JobTool,
    allocate,
    cancel,
    epilog_ran,
    idle_clients,
    job_tool,
    nothing_left,
    private,
    put_keys,
    store_entries,
    store_keys,
    unix_users,
)
from tests.support_sandbox import Sandbox, sandbox
from vcluster.agent import netdev, protocol, undo
from vcluster.sandbox.agents import RECONCILE_INTERVAL

__all__ = ["sandbox"]  # the fixture, imported so that pytest finds it

pytestmark = pytest.mark.slurm

USER_A, USER_B = "vcagent-a", "vcagent-b"
MIB = 1 << 20


@pytest.fixture(scope="module")
def users() -> Iterator[list[Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (useradd)")
    with unix_users(USER_A, USER_B) as made:
        yield made


# A second private network in h1's site policy, for this module (restored afterwards).
DATA_NETWORK = "\ndata:\n  type: private\n  subnet: 10.201.0.0/16\n  mtu: 9000\n"


@pytest.fixture(scope="module")
def tool(sandbox: Sandbox, users: list[Any]) -> Iterator[JobTool]:
    networks = sandbox.conf("h1") / "networks.yaml"
    original = networks.read_text()
    networks.write_text(original + DATA_NETWORK)
    try:
        sandbox.restart_agent("h1")  # the agent reads its policy when it starts
        with job_tool(sandbox) as made:
            yield made
    finally:
        networks.write_text(original)
        sandbox.restart_agent("h1")


def agent_pid(box: Sandbox, host: str) -> int:
    (pid,) = [p["pid"] for p in box.state["processes"] if p["name"] == f"agent@{host}"]
    return int(pid)


def agent_alive(box: Sandbox, host: str) -> bool:
    from vcluster.sandbox import process, state

    proc = state.require(box.directory).process(f"agent@{host}")
    return proc is not None and process.alive(proc)


def stop_agent(box: Sandbox, host: str) -> None:
    from vcluster.sandbox import process, state

    sandbox_state = state.require(box.directory)
    proc = sandbox_state.process(f"agent@{host}")
    assert proc is not None
    process.stop_all([proc])


def test_vm_resources_for_the_job_and_its_user_only(sandbox: Sandbox, tool: JobTool) -> None:
    job = allocate(sandbox, USER_A, ntasks=2)
    try:
        uid_a = tool.box.run(["id", "-u", USER_A]).stdout.strip()
        nets = [private("cluster", 1450), private("data", 9000)]
        fam = {"name": "fam", "size": MIB}
        first, again, vm1 = tool.step(USER_A, job, [
            {"vm": 0, "networks": nets, "fam": fam, "keep": True},
            {"vm": 0, "networks": nets, "fam": fam},  # while vm 0's taps are held: busy
            {"vm": 1, "networks": nets[:1], "fam": fam},
        ])
        assert "error" not in first, first
        taps = first["taps"]
        assert [t["network"] for t in taps] == ["cluster", "data"]
        # The fds are the taps the answer names, opened as QEMU expects.
        for tap in taps:
            assert tap["fd_ifname"] == tap["ifname"]
            assert tap["flags"] & netdev.TAP_FLAGS == netdev.TAP_FLAGS
        assert again.get("code") == "failed", again
        assert "is in use by another process" in again["error"]
        assert vm1["fam"]["path"] == first["fam"]["path"]  # one region per job and name
        assert first["fam"]["mapped"] and vm1["fam"]["mapped"]

        # On the host: a bridge per network, each tap a port of its bridge with the MTU.
        links = tool.links("h1")
        b0, b1 = netdev.bridge_name(job, 0), netdev.bridge_name(job, 1)
        assert links[b0]["kind"] == "bridge" and links[b0]["up"]
        assert links[b1]["kind"] == "bridge"
        expected = {netdev.tap_name(job, 0, 0): (b0, 1450), netdev.tap_name(job, 0, 1): (b1, 9000),
                    netdev.tap_name(job, 1, 0): (b0, 1450)}
        for name, (bridge, mtu) in expected.items():
            assert links[name]["kind"] == "tun"
            assert (links[name]["master"], links[name]["mtu"]) == (bridge, mtu)
        assert {t["ifname"] for t in taps} | {vm1["taps"][0]["ifname"]} == set(expected)

        # The FAM region: the job user's, 0600, in a directory others cannot list.
        path = Path(first["fam"]["path"])
        assert path == tool.run_dir("h1") / "jobs" / job / "fam" / "fam"
        info = path.stat()
        assert (info.st_size, str(info.st_uid), stat.S_IMODE(info.st_mode)) == (MIB, uid_a, 0o600)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o711
        assert path.parent.stat().st_uid == 0
        assert path.read_bytes()[:6] == b"marker"
        assert tool.box.run(["test", "-r", str(path)], user=USER_B, check=False).returncode != 0
        assert tool.box.run(["ls", str(path.parent)], user=USER_B, check=False).returncode != 0

        # The work directory for the VMs' files: the job user's, 0700, on disk.
        work = Path(first["workdir"])
        assert work == tool.state_dir("h1") / "work" / job
        assert vm1["workdir"] == first["workdir"]
        winfo = work.stat()
        assert (str(winfo.st_uid), stat.S_IMODE(winfo.st_mode)) == (uid_a, 0o700)
        tool.box.run(["sh", "-c", f"mkdir -p {work}/vm0/deep && ln -s / {work}/vm0/root"],
                     user=USER_A)
        assert tool.box.run(["ls", str(work)], user=USER_B, check=False).returncode != 0

        # A restarted runner gets the same devices and region.
        (re_vm0,) = tool.step(USER_A, job, [{"vm": 0, "networks": nets, "fam": fam}])
        assert [t["ifname"] for t in re_vm0["taps"]] == [t["ifname"] for t in taps]
        assert re_vm0["fam"]["path"] == first["fam"]["path"]

        # Not from a process outside the job, even the job's own user's.
        (outside,) = tool.outside(USER_A, job, [{"vm": 0, "networks": nets}])
        assert outside["code"] == "denied"
        assert f"is not part of job {job} on h1 (it is part of no job on h1)" in outside["error"]
        # Not from another user's job, naming this one.
        job_b = allocate(sandbox, USER_B)
        try:
            (other,) = tool.step(USER_B, job, [{"vm": 5, "networks": nets}], as_job=job_b)
            assert other["code"] == "denied"
            assert f"is not part of job {job} on h1 (it is part of job {job_b}" in other["error"]
        finally:
            cancel(sandbox, job_b)
        # Not from another uid inside the job (root's job, a process switched to user B).
        root_job = allocate(sandbox, "root")
        try:
            uid_b = tool.box.run(["id", "-u", USER_B]).stdout.strip()
            argv = tool.argv("h1", root_job, [{"vm": 0, "networks": nets}])
            proc = sandbox.run(["srun", f"--jobid={root_job}", "-w", "h1", "setpriv",
                                f"--reuid={USER_B}", f"--regid={USER_B}", "--clear-groups",
                                *argv])
            (switched,) = json.loads(proc.stdout.strip().splitlines()[-1])
            assert switched["code"] == "denied"
            assert switched["error"] == f"job {root_job} belongs to uid 0, not {uid_b}"
        finally:
            cancel(sandbox, root_job)

        # What the agent keeps for the job (status is root's).
        status = json.loads(tool.agent("h1", "status", "--json").stdout)
        (mine,) = [j["log"] for j in status["jobs"] if j["job"] == job]
        assert mine["user"] == USER_A and str(mine["uid"]) == uid_a
        kinds = [(e["kind"], e["name"]) for e in mine["entries"]]
        assert kinds[0] == ("store", USER_A)
        assert ("file", str(path)) in kinds and ("tap", netdev.tap_name(job, 1, 0)) in kinds
        assert f"/vcluster/jobs/{job}/owner" in store_keys(sandbox, f"/vcluster/jobs/{job}/")
    finally:
        cancel(sandbox, job)

    # The epilog released everything: devices, region, undo log, store keys.
    wait_for(f"the epilog of job {job}", lambda: epilog_ran(sandbox, job) is not None)
    assert epilog_ran(sandbox, job) == "ok"
    nothing_left(tool, job)
    assert store_keys(sandbox, f"/vcluster/jobs/{job}/") == []
    # release again: nothing to do, not an error.
    again_out = tool.agent("h1", "release", job).stdout
    assert f"job {job} released on h1: nothing to remove" in again_out


def test_a_private_network_spans_the_jobs_hosts(sandbox: Sandbox, tool: JobTool) -> None:
    job = allocate(sandbox, USER_A, host="h1,h2", ntasks=2)
    address = {h["name"]: h["address"] for h in sandbox.state["hosts"]}
    device, bridge = netdev.vxlan_name(job, 0), netdev.bridge_name(job, 0)
    try:
        # The launcher's question: on the login node (its agent), as the job's user,
        # outside the job's tasks; asked twice, one id.
        ask = [{"op": "vnis", "networks": ["cluster"]}]
        first, again = json.loads(sandbox.run(tool.argv("ctl", job, ask * 2),
                                              user=USER_A).stdout)
        assert "error" not in first, first
        vni = first["cluster"]
        assert again == first and 4096 <= vni <= 65535
        (other,) = json.loads(sandbox.run(tool.argv("ctl", job, ask), user=USER_B).stdout)
        assert other["code"] == "denied" and f"job {job} belongs to uid" in other["error"]
        entries = store_entries(sandbox, "/vcluster/")
        assert entries[f"/vcluster/jobs/{job}/vni/cluster"] == str(vni)
        assert json.loads(entries[f"/vcluster/pools/vni/{vni}"]) == \
            {"job": job, "user": USER_A, "network": "cluster"}

        # Each host's runner: the bridge joined to the other host by VXLAN, filtered.
        nets = [private("cluster", vni=vni)]
        for vm, host in enumerate(("h1", "h2")):
            (got,) = tool.step(USER_A, job, [{"vm": vm, "networks": nets}], host=host)
            assert "error" not in got, got
        for host, peer in (("h1", "h2"), ("h2", "h1")):
            link = tool.links(host)[device]
            assert (link["kind"], link["vni"], link["mtu"], link["master"], link["up"]) == \
                ("vxlan", vni, 1450, bridge, True)
            assert set(link["fdb"]) == {address[peer]}  # flood entry (and what it learned)
            assert tool.job_tables(host, job) == [f"vcluster_job_{job}"]
            status = json.loads(tool.agent(host, "status", "--json").stdout)
            (mine,) = [j["log"] for j in status["jobs"] if j["job"] == job]
            kinds = [(e["kind"], e["name"], e.get("vni")) for e in mine["entries"]]
            assert ("vxlan", device, vni) in kinds
            assert ("nft", f"vcluster_job_{job}", None) in kinds
        # An id that is not the job's is refused, and nothing more is made.
        (wrong,) = tool.step(USER_A, job, [{"vm": 0, "networks": [private("cluster",
                                                                          vni=vni + 1)]}])
        assert wrong["code"] == "denied" and f"VXLAN id {vni + 1} is not job {job}'s" in \
            wrong["error"]
    finally:
        cancel(sandbox, job)
    for host in ("h1", "h2"):
        def ended(on: str = host) -> bool:
            return epilog_ran(sandbox, job, on) is not None

        wait_for(f"the epilog of job {job} on {host}", ended)
        assert epilog_ran(sandbox, job, host) == "ok"
        nothing_left(tool, job, host)  # devices, entries, table, and the job's VXLAN id


def test_root_only_operations_and_bad_requests(sandbox: Sandbox, tool: JobTool) -> None:
    version = protocol.VERSION
    answers = tool.outside(USER_A, "1", [
        {"op": "release", "job": "1"},
        {"op": "status"},
        {"op": "ping"},
        {"raw": {"version": version, "op": "vm-resources", "job": "x1", "vm": 0,
                 "networks": []}},
        {"raw": {"version": version, "op": "vm-resources", "job": "1", "vm": 0,
                 "networks": [], "fam": {"name": "fam", "size": 3000}}},
        {"raw": {"version": version, "op": "no-such-op"}},
    ])
    release, status, ping, bad_job, bad_fam, bad_op = answers
    uid_a = tool.box.run(["id", "-u", USER_A]).stdout.strip()
    assert release == {"error": f"release needs root (you are uid {uid_a})", "code": "denied"}
    assert status["code"] == "denied"
    assert ping == {"version": version, "host": "h1"}
    assert bad_job["code"] == "bad-request"
    assert "job: 'x1' is not a SLURM job id" in bad_job["error"]
    assert bad_fam["code"] == "bad-request" and "fam.size: 3000 is not a power of two" in \
        bad_fam["error"]
    assert bad_op["code"] == "bad-request" and '"no-such-op" is not an operation' in bad_op["error"]


def test_agent_restart_keeps_a_running_jobs_resources(sandbox: Sandbox, tool: JobTool) -> None:
    job = allocate(sandbox, USER_A)
    nets = [private("cluster")]
    fam = {"name": "fam", "size": 2 * MIB}
    try:
        (first,) = tool.step(USER_A, job, [{"vm": 0, "networks": nets, "fam": fam}])
        before = tool.job_links("h1", job)
        assert before == [netdev.bridge_name(job, 0), netdev.tap_name(job, 0, 0)]
        old = agent_pid(sandbox, "h1")
        new = sandbox.restart_agent("h1")
        assert new != old and not Path(f"/proc/{old}/status").exists()
        time.sleep(2 * RECONCILE_INTERVAL + 1)  # two reconcile passes of the new agent
        assert tool.job_links("h1", job) == before
        assert Path(first["fam"]["path"]).stat().st_size == 2 * MIB
        (again,) = tool.step(USER_A, job, [{"vm": 0, "networks": nets, "fam": fam}])
        assert again["taps"][0]["ifname"] == first["taps"][0]["ifname"]
        assert again["fam"]["path"] == first["fam"]["path"]
    finally:
        cancel(sandbox, job)
    wait_for(f"the epilog of job {job}", lambda: epilog_ran(sandbox, job) is not None)
    assert epilog_ran(sandbox, job) == "ok"
    nothing_left(tool, job)


def test_reconcile_releases_ended_jobs_only(sandbox: Sandbox, tool: JobTool) -> None:
    running = allocate(sandbox, USER_A)
    ended = allocate(sandbox, USER_A)
    nets = [private("cluster")]
    try:
        for job in (running, ended):
            (got,) = tool.step(USER_A, job, [{"vm": 0, "networks": nets,
                                              "fam": {"name": "fam", "size": MIB}}])
            assert "error" not in got, got
        # A job that ends while the agent is down: its epilog cannot release.
        stop_agent(sandbox, "h1")
        cancel(sandbox, ended)
        wait_for(f"the epilog of job {ended}", lambda: epilog_ran(sandbox, ended) is not None)
        assert "no vcluster agent socket" in str(epilog_ran(sandbox, ended))
        assert tool.job_links("h1", ended) != []
        # A leftover of a job SLURM never heard of (an undo log and a bridge).
        ghost = "987654"
        bridge = netdev.bridge_name(ghost, 0)
        log = undo.create(tool.layout("h1"), ghost, 0, "root")
        log.record(undo.UndoEntry(undo.Kind.BRIDGE, bridge, network="cluster"))
        tool.add_bridge("h1", bridge)
        # The agent comes back: its reconcile pass releases both, and only those.
        sandbox.restart_agent("h1")
        wait_for("the reconcile pass", lambda: not tool.job_links("h1", ended)
                 and not tool.job_links("h1", ghost), timeout=15)
        nothing_left(tool, ended)
        nothing_left(tool, ghost)
        time.sleep(2 * RECONCILE_INTERVAL)  # more passes: the running job keeps everything
        assert tool.job_links("h1", running) == [netdev.bridge_name(running, 0),
                                                 netdev.tap_name(running, 0, 0)]
        assert (tool.run_dir("h1") / "jobs" / running / "fam" / "fam").exists()
        assert (tool.state_dir("h1") / "jobs" / running / "undo.json").exists()
    finally:
        cancel(sandbox, running)
        cancel(sandbox, ended)
        if not agent_alive(sandbox, "h1"):
            sandbox.restart_agent("h1")
    wait_for(f"the epilog of job {running}", lambda: epilog_ran(sandbox, running) is not None)
    nothing_left(tool, running)


CREDENTIALS_CHECK = r'''
import json, sys, tempfile
from pathlib import Path
from vcluster.config.batch import StoreConfig
from vcluster.errors import StorePermissionDenied
from vcluster.store import open_store
creds = json.loads(sys.argv[1])
tmp = Path(tempfile.mkdtemp())
(tmp / "ca").write_text(creds["ca_cert"])
(tmp / "pw").write_text(creds["password"])
store = open_store(StoreConfig(endpoints=tuple(creds["endpoints"]), ca_cert=tmp / "ca",
                               user=creds["user"], password_file=tmp / "pw"))
out = {}
store.put(creds["prefix"] + "probe", "mine")
out["own"] = store.get(creds["prefix"] + "probe").value
store.delete(creds["prefix"] + "probe")
for name, key in (("other", "/vcluster/users/someone-else/probe"), ("hosts", "/vcluster/hosts/x")):
    try:
        store.put(key, "x")
        out[name] = "written"
    except StorePermissionDenied as e:
        out[name] = "denied"
try:
    store.get_prefix("/vcluster/hosts/")
    out["read-hosts"] = "read"
except StorePermissionDenied:
    out["read-hosts"] = "denied"
print(json.dumps(out))
'''


def test_credentials_confined_to_the_users_prefix(sandbox: Sandbox, tool: JobTool) -> None:
    # Asked on the login node (ctl), as the user; used from there.
    socket = tool.socket("ctl")
    argv = ["/usr/bin/python3", tool.program("agent_job.py"), str(socket), "0",
            json.dumps([{"op": "credentials"}, {"op": "credentials"}])]
    first, second = json.loads(sandbox.run(argv, user=USER_A).stdout)
    assert first["user"] == f"vc-{USER_A}"
    assert first["prefix"] == f"/vcluster/users/{USER_A}/"
    assert first["endpoints"] == [sandbox.state["etcd_endpoint"]]
    assert first["ca_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert second["password"] == first["password"]  # asking again breaks no one
    root_password = Path(sandbox.state["etcd_password_file"]).read_text().strip()
    assert root_password not in json.dumps(first)
    out = json.loads(sandbox.run([sys.executable, "-c", CREDENTIALS_CHECK, json.dumps(first)])
                     .stdout)
    assert out == {"own": "mine", "other": "denied", "hosts": "denied", "read-hosts": "denied"}


def test_hosts_registered_under_a_lease(sandbox: Sandbox, tool: JobTool) -> None:
    keys = store_keys(sandbox, "/vcluster/hosts/")
    assert keys == [f"/vcluster/hosts/{h}" for h in sandbox.hosts]  # not ctl: no SLURM host
    status = json.loads(tool.agent("h2", "status", "--json").stdout)
    assert status["registered"] is True and status["node"] == "h2"


def test_site_limits_are_enforced_by_the_agent(sandbox: Sandbox, tool: JobTool) -> None:
    job = allocate(sandbox, USER_A, ntasks=2)
    conf = sandbox.conf("h1")
    try:
        regions = [{"vm": 0, "networks": [], "fam": {"name": f"r{i}", "size": MIB}}
                   for i in range(9)]
        answers = tool.step(USER_A, job, [
            {"vm": 0, "networks": [], "fam": {"name": "huge", "size": 2 << 30}},
            {"vm": 0, "networks": [private("evil")]},
            {"vm": 0, "networks": [{"name": "nat", "type": "private"}]},
            {"vm": 0, "networks": [private("cluster", 9000)]},
            {"vm": 2, "networks": [private("cluster")]},
            {"vm": 1, "networks": [{"name": "data", "type": "private"}]},  # mtu: the site's
            *regions,
        ])
        huge, evil, nat, mtu, index, data, *made = answers
        assert huge["code"] == "denied"
        assert "fam.size: region 'huge' of 2G is more than 1G, the largest fam.max-size of " \
            f"this site (fam.max-size of resource set 'default' at {conf}/resources.yaml:" \
            in huge["error"]
        assert evil["code"] == "denied"
        assert f"network 'evil' is not defined in {conf}/networks.yaml (nat/private " \
            "networks there: cluster, data, nat)" in evil["error"]
        assert nat["code"] == "denied" and "'nat' is a nat network" in nat["error"]
        assert mtu["code"] == "bad-request"
        assert f"mtu: 9000 differs from the MTU 1450 that {conf}/networks.yaml:" in mtu["error"]
        assert index["code"] == "denied"
        assert f"vm: 2 is not below the task count of job {job} (2;" in index["error"]
        assert "error" not in data, data
        assert tool.links("h1")[data["taps"][0]["ifname"]]["mtu"] == 9000
        *eight, ninth = made
        assert all("error" not in r for r in eight), eight
        assert ninth["code"] == "denied"
        assert "a job may have at most 8 (MAX_REGIONS of the vcluster agent)" in ninth["error"]
        assert not (tool.run_dir("h1") / "jobs" / job / "fam" / "r8").exists()
        assert not (tool.run_dir("h1") / "jobs" / job / "fam" / "huge").exists()
        # Nothing was made for the refused networks.
        assert tool.job_links("h1", job) == sorted([netdev.bridge_name(job, 0),
                                                    netdev.tap_name(job, 1, 0)])
    finally:
        cancel(sandbox, job)
    wait_for(f"the epilog of job {job}", lambda: epilog_ran(sandbox, job) is not None)
    nothing_left(tool, job)


def test_epilog_removes_cluster_keys_without_an_undo_log(sandbox: Sandbox,
                                                        tool: JobTool) -> None:
    # The agent of h2 is down when the job starts: no prolog record, no undo log there,
    # and no runner ever reaches it. A launcher (killed) left the cluster's keys.
    stop_agent(sandbox, "h2")
    try:
        job = allocate(sandbox, USER_A, host="h2")
    finally:
        sandbox.restart_agent("h2")
    try:
        assert not (tool.state_dir("h2") / "jobs" / job).exists()
        cluster = f"/vcluster/users/{USER_A}/clusters/{job}/"
        put_keys(sandbox, {cluster + "spec": "{}", cluster + "keys/id_ed25519": "PRIVATE",
                           f"/vcluster/jobs/{job}/owner": "{}"})
        other = f"/vcluster/users/{USER_A}/clusters/{int(job) + 100000}/spec"
        put_keys(sandbox, {other: "{}"})  # another job's: kept
    finally:
        cancel(sandbox, job)
    wait_for(f"the epilog of job {job}", lambda: epilog_ran(sandbox, job, "h2") is not None)
    assert epilog_ran(sandbox, job, "h2") == "ok"
    assert store_keys(sandbox, cluster) == []
    assert store_keys(sandbox, f"/vcluster/jobs/{job}/") == []
    assert store_keys(sandbox, other) == [other]
    out = tool.agent("h2", "release", str(int(job) + 100000), "--user", USER_A).stdout
    assert "nothing to remove" in out  # idempotent, and said so
    assert store_keys(sandbox, other) == []
    assert not (tool.state_dir("h2") / "jobs" / job).exists()
    # Only root may name a user.
    (refused,) = tool.outside(USER_A, job, [{"op": "release", "job": job, "user": USER_B}])
    assert refused["code"] == "denied"


def test_a_live_agents_socket_is_not_taken_over(sandbox: Sandbox, tool: JobTool) -> None:
    socket_path = tool.socket("h1")
    before = socket_path.stat().st_ino
    second = tool.agent("h1", "--config", str(sandbox.conf("h1")), "serve", "--node", "h1",
                        "--no-register", check=False)
    assert second.returncode != 0
    assert f"another agent answers on {socket_path}" in second.stderr
    assert "Traceback" not in second.stderr
    assert socket_path.stat().st_ino == before
    assert json.loads(tool.agent("h1", "ping").stdout)["host"] == "h1"
    # A node name SLURM does not know: refused at start-up, before touching the socket.
    unknown = tool.agent("h3", "--config", str(sandbox.conf("h3")), "serve", "--node",
                         "nosuch", check=False)
    assert unknown.returncode != 0
    assert "SLURM knows no node 'nosuch'" in unknown.stderr
    assert "--login-node" in unknown.stderr
    assert json.loads(tool.agent("h3", "ping").stdout)["host"] == "h3"


def test_idle_clients_do_not_block_root(sandbox: Sandbox, tool: JobTool) -> None:
    from vcluster.agent import server

    path = tool.socket("h1")
    with idle_clients(tool, path, USER_A, 40) as a, idle_clients(tool, path, USER_B, 40) as b:
        assert a.stdout is not None and b.stdout is not None
        first_a, first_b = json.loads(a.stdout.readline()), json.loads(b.stdout.readline())
        # 32 per user, 64 of all users: the rest is told "busy" at once.
        assert first_a["busy"] == 40 - server.MAX_PER_UID, first_a
        assert first_a["first"]["code"] == "busy"
        assert first_b["busy"] == 40 - (server.MAX_CONNECTIONS - server.MAX_PER_UID), first_b
        # Root still gets through, at once.
        start = time.monotonic()
        status = json.loads(tool.agent("h1", "status", "--json").stdout)
        tool.agent("h1", "release", "999999")
        took = time.monotonic() - start
        assert status["node"] == "h1" and took < 8, took
        (busy,) = tool.outside(USER_A, "1", [{"op": "ping"}])
        assert busy["code"] == "busy"
        # The idle ones are cut off after the read deadline, all of them.
        later_a, later_b = json.loads(a.stdout.readline()), json.loads(b.stdout.readline())
    for later, count in ((later_a, server.MAX_PER_UID),
                         (later_b, server.MAX_CONNECTIONS - server.MAX_PER_UID)):
        assert later["answered"] == count and later["left"] == 0, later
        assert f"no complete request within {server.READ_DEADLINE:g} s" in \
            later["sample"]["error"]
    (ping,) = tool.outside(USER_A, "1", [{"op": "ping"}])
    assert ping["host"] == "h1"
