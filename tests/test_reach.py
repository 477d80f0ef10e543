"""Reaching the VMs, in the 3-host sandbox, as real users: ssh, scp, nc, exec and NAT.

One cluster of tiny VMs (one per host, each with the private network on eth0
and nat on eth1) is booted for the module; every check drives the real
thing: OpenSSH on the login node and in the job, dropbear in the guests
behind their hosts' forwarded ports, qemu-guest-agent for exec, nftables on
the hosts.  A second user tries the first one's ports, files and job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support_agent import JobTool, store_put, store_value
from tests.support_alloc import (
    BackgroundAlloc,
    Shared,
    alloc,
    background_alloc,
    module_users,
    nothing_left_anywhere,
    shared_dir,
    tool,
    touch,
    wait_flag,
)
from tests.support_images import require_image
from tests.support_sandbox import Sandbox, sandbox

__all__ = ["sandbox", "tool"]

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

ALICE, BOB = "vcrs-alice", "vcrs-bob"
HOSTS = ("h1", "h2", "h3")
TEMPLATES = """\
noagent:
  inherits: tiny
  description: tiny without its guest agent
  append: console=ttyS0 quiet vcluster-tiny.no-qga
"""


@dataclass
class Booted:
    job: str
    running: BackgroundAlloc
    shared: Shared

    def vcluster(self, box: Sandbox, *args: str, user: str = ALICE, host: str | None = None,
                 check: bool = False, timeout: float = 60) -> tuple[int, str, str]:
        proc = box.run(["env", f"VCLUSTER_HOME={self.shared.home}", "vcluster", *args],
                       host=host, user=user, check=check, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def record(self, box: Sandbox, vm: int) -> dict[str, object]:
        value = store_value(box, f"/vcluster/users/{ALICE}/clusters/{self.job}/vms/{vm}")
        assert value is not None
        data: dict[str, object] = json.loads(value)
        return data


users = module_users(ALICE, BOB)


@pytest.fixture(scope="module")
def cluster(sandbox: Sandbox, users: None, tool: JobTool) -> Iterator[Booted]:
    require_image("tiny")
    with shared_dir(TEMPLATES, {}) as shared, \
         background_alloc(sandbox, ALICE, shared.home, "-N3", "-c", "1", "-E",
                          wait_flag(shared, "done"), "tiny:3") as running:
        booted = Booted(running.wait_ready(), running, shared)
        yield booted
        touch(shared.flags / "done")
        assert running.finish(120) == 0, running.output
    nothing_left_anywhere(sandbox, tool, booted.job, ALICE)


def test_ssh_runs_a_command_from_the_login_node_and_from_inside_the_job(
        sandbox: Sandbox, cluster: Booted) -> None:
    status, out, err = cluster.vcluster(sandbox, "ssh", "-j", cluster.job, "vm2", "hostname")
    assert (status, out.strip()) == (0, "vm2"), err
    # Inside the job, on another host than vm2's: the same port, the same keys.
    vm2_host = str(cluster.record(sandbox, 2)["host"])
    other = next(h for h in HOSTS if h != vm2_host)
    inside = sandbox.run(["srun", f"--jobid={cluster.job}", "--overlap", f"--nodelist={other}",
                          "-N1", "-n1", "--quiet", "env", f"VCLUSTER_HOME={cluster.shared.home}",
                          "vcluster", "ssh", "-j", cluster.job, "vm2", "hostname"],
                         user=ALICE, check=False)
    assert (inside.returncode, inside.stdout.strip()) == (0, "vm2"), inside.stderr
    # and on vm2's own host (the forward of the host's own address: nat output chain)
    own = sandbox.run(["srun", f"--jobid={cluster.job}", "--overlap",
                       f"--nodelist={vm2_host}", "-N1", "-n1", "--quiet", "env",
                       f"VCLUSTER_HOME={cluster.shared.home}", "vcluster", "ssh", "-j",
                       cluster.job, "vm2", "hostname"], user=ALICE, check=False)
    assert (own.returncode, own.stdout.strip()) == (0, "vm2"), own.stderr


def test_a_vm_showing_another_host_key_is_refused(sandbox: Sandbox, cluster: Booted) -> None:
    key = f"/vcluster/users/{ALICE}/clusters/{cluster.job}/vms/1"
    saved = store_value(sandbox, key)
    assert saved is not None
    record = json.loads(saved)
    other = sandbox.run(["sh", "-c", "d=$(mktemp -d) && ssh-keygen -q -t ed25519 -N '' "
                         "-f $d/k && cat $d/k.pub && rm -r $d"]).stdout.strip()
    store_put(sandbox, key, json.dumps({**record, "host_key": other}))
    try:
        status, out, err = cluster.vcluster(sandbox, "ssh", "-j", cluster.job, "vm1", "hostname")
        assert status != 0 and out == "", out
        assert "host key" in err.lower() and "vm1" in err, err
    finally:
        store_put(sandbox, key, saved)
    status, out, _ = cluster.vcluster(sandbox, "ssh", "-j", cluster.job, "vm1", "hostname")
    assert (status, out.strip()) == (0, "vm1")


def test_scp_copies_a_file_and_a_directory_to_a_vm_and_back(
        sandbox: Sandbox, cluster: Booted) -> None:
    area = cluster.shared.root / "scp"
    area.mkdir(mode=0o777)
    os.chmod(area, 0o777)
    data = os.urandom(10 << 20)
    (area / "ten.bin").write_bytes(data)
    tree = area / "tree" / "sub"
    tree.mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    os.chmod(area / "ten.bin", 0o644)
    for path in (area / "tree", tree, tree / "a.txt"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    job = cluster.job
    status, _, err = cluster.vcluster(sandbox, "scp", "-j", job, str(area / "ten.bin"),
                                      "vm1:/tmp/ten.bin", timeout=180)
    assert status == 0, err
    status, _, err = cluster.vcluster(sandbox, "scp", "-j", job, "vm1:/tmp/ten.bin",
                                      str(area / "back.bin"), timeout=180)
    assert status == 0, err
    assert hashlib.sha256((area / "back.bin").read_bytes()).hexdigest() == \
        hashlib.sha256(data).hexdigest()
    status, _, err = cluster.vcluster(sandbox, "scp", "-j", job, "-r", str(area / "tree"),
                                      "vm1:/tmp/", timeout=120)
    assert status == 0, err
    status, out, _ = cluster.vcluster(sandbox, "ssh", "-j", job, "vm1", "cat",
                                      "/tmp/tree/sub/a.txt")
    assert (status, out) == (0, "alpha\n")


def test_plain_ssh_reaches_a_vm_through_vcluster_nc(sandbox: Sandbox, cluster: Booted) -> None:
    job = cluster.job
    directory = f"/tmp/vcrs-ssh-{job}"
    status, out, err = cluster.vcluster(sandbox, "ssh-config", "-j", job, directory)
    assert status == 0, err
    assert f"ssh -F {directory}/config vm0" in out
    proxy = (f"env VCLUSTER_HOME={cluster.shared.home} vcluster nc -j {job} %h 22")
    proc = sandbox.run(["ssh", "-o", f"ProxyCommand={proxy}", "-i", f"{directory}/id_ed25519",
                        "-o", f"UserKnownHostsFile={directory}/known_hosts",
                        "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias=vcluster-{job}-vm1",
                        "-o", "BatchMode=yes", "root@vm1", "hostname"], user=ALICE, check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "vm1"), proc.stderr
    sandbox.run(["rm", "-rf", directory], user=ALICE)


def test_exec_runs_on_every_vm_and_reports_statuses(sandbox: Sandbox, cluster: Booted) -> None:
    job = cluster.job
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "--all", "--", "hostname")
    assert status == 0, err
    assert sorted(out.splitlines()) == ["vm0: vm0", "vm1: vm1", "vm2: vm2"]
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "vm1", "--", "sh", "-c",
                                        "echo seven; exit 7")
    assert (status, out) == (7, "seven\n"), err
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "--all", "--", "false")
    assert status == 1
    assert "vcluster: exec: every VM failed: vm0 (exit 1), vm1 (exit 1), vm2 (exit 1)" in err
    status, _, err = cluster.vcluster(sandbox, "exec", "-j", job, "vm[0-1]", "--", "sh", "-c",
                                      "[ $(hostname) = vm1 ]")
    assert status == 1 and "1 of 2 VMs failed: vm0 (exit 1)" in err, err
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "-u", "nobody", "vm2", "--",
                                        "id", "-u")
    assert (status, out) == (0, "65534\n"), err
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "--timeout", "1", "vm0",
                                        "--", "sleep", "30")
    assert status == 124 and "timed out after 1 s" in err, (status, out, err)
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", job, "vm2", "--", "no-such-tool")
    assert (status, out) == (127, ""), err
    assert "no-such-tool: " in err and "No such file or directory" in err, err


def test_vms_reach_outside_through_nat_and_their_ports_are_theirs(
        sandbox: Sandbox, cluster: Booted) -> None:
    controller = str(sandbox.state["controller"]["address"])
    status, out, err = cluster.vcluster(sandbox, "exec", "-j", cluster.job, "vm0", "--",
                                        "ping", "-c", "1", "-W", "3", controller)
    assert status == 0 and " 0% packet loss" in out, out + err
    status, out, _ = cluster.vcluster(sandbox, "exec", "-j", cluster.job, "vm0", "--",
                                      "ip", "route")
    assert re.search(r"^default via 10\.250\.\d+\.\d+ dev eth1", out, re.M), out


def test_a_second_user_gets_nothing_of_the_first_users_cluster(
        sandbox: Sandbox, cluster: Booted) -> None:
    job = cluster.job
    ssh = cluster.record(sandbox, 0)["ssh"]
    assert isinstance(ssh, dict)
    # Bob's own key at Alice's forwarded port: the guest does not know it.
    login = sandbox.run(["sh", "-c", "d=$(mktemp -d) && ssh-keygen -q -t ed25519 -N '' -f $d/k "
                         f"&& ssh -i $d/k -p {ssh['port']} -o BatchMode=yes "
                         "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                         f"root@{ssh['address']} true; s=$?; rm -r $d; exit $s"],
                        user=BOB, check=False)
    assert login.returncode != 0 and "Permission denied" in login.stderr, login.stderr
    # Nor Alice's cluster through vcluster: her keys and known hosts are in her store prefix.
    for args in (("ssh", "-j", job, "vm0", "true"), ("exec", "-j", job, "--all", "--", "true"),
                 ("ssh-config", "-j", job, "/tmp/vcrs-bob")):
        status, out, err = cluster.vcluster(sandbox, *args, user=BOB)
        assert status == 2 and out == "", (args, out, err)
        assert err.strip() == (f"vcluster: error: -j {job}: you have no cluster in job {job} "
                               "(expected one of: none)"), err
    # And straight at the store or the job: refused.
    key = f"/vcluster/users/{ALICE}/clusters/{job}/keys/id_ed25519"
    code = ("from vcluster.config.loader import load_batch; "
            "from vcluster.session import open_user_store; "
            f"print(open_user_store(load_batch()).get({key!r}))")
    peek = sandbox.run(["python3", "-c", code], user=BOB, check=False)
    assert peek.returncode != 0 and "permission" in (peek.stderr + peek.stdout).lower(), peek
    into = sandbox.run(["srun", f"--jobid={job}", "--overlap", "-N1", "-n1", "true"], user=BOB,
                       check=False)
    assert into.returncode != 0


def test_exec_on_an_image_without_a_guest_agent_names_the_template(
        sandbox: Sandbox, cluster: Booted) -> None:
    proc = alloc(sandbox, ALICE, cluster.shared.home, "-c", "1", "-w", "h3", "-E",
                 "vcluster exec vm0 -- true; echo exec-status=$?", "noagent:1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "exec-status=1" in out, out
    assert "vcluster: error: vm0: its guest agent did not answer: does the image of template " \
           "'noagent' run qemu-guest-agent?" in out, out


def test_bad_vm_names_are_one_line(sandbox: Sandbox, cluster: Booted) -> None:
    status, out, err = cluster.vcluster(sandbox, "ssh", "-j", cluster.job, "vm9", "true")
    assert (status, out) == (2, "")
    assert err == f"vcluster: error: 'vm9': no such VM in job {cluster.job} (expected vm0 to " \
                  "vm2)\n"
    status, _, err = cluster.vcluster(sandbox, "exec", "-j", cluster.job, "vm7", "--", "true")
    assert status == 2 and err.count("\n") == 1 and "there is no vm7" in err, err


def test_ps_shows_each_vms_ssh_port(sandbox: Sandbox, cluster: Booted) -> None:
    _, out, _ = cluster.vcluster(sandbox, "ps", "-l", "-j", cluster.job)
    for vm in range(3):
        ssh = cluster.record(sandbox, vm)["ssh"]
        assert isinstance(ssh, dict)
        assert f"{ssh['address']}:{ssh['port']}" in out, out

