"""The sandbox test bed, for real: munge, slurmctld and slurmd in network namespaces."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support_sandbox import Sandbox, running_sandbox, sandbox, sandbox_dir, vcluster
from vcluster.config.batch import parse_batch
from vcluster.sandbox.slurmconf import SANDBOX_OVERRIDES, parse_fragment, slurm_dir
from vcluster.schema.source import load_yaml

__all__ = ["sandbox", "sandbox_dir"]  # fixtures, imported so that pytest finds them

LINE = re.compile(r"^\S+ (?P<script>prolog|epilog) job=(?P<job>\d+) node=(?P<node>\S+) "
                  r"uid=(?P<uid>\d+) job_uid=(?P<job_uid>\d*) job_user=(?P<user>\S*)"
                  r" agent=(?P<agent>.*)$")


STORE_HELPER = str(Path(__file__).resolve().parent / "helpers" / "sandbox_store.py")


def netns_names() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def root_links() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(directory))]


def script_runs(box: Sandbox, job: str) -> dict[str, dict[str, str]]:
    """node -> {script: uid} for the prolog/epilog lines of ``job``."""
    runs: dict[str, dict[str, str]] = {}
    for line in box.script_log():
        m = LINE.match(line)
        assert m, f"unexpected line in the prolog/epilog log: {line!r}"
        if m["job"] == job:
            runs.setdefault(m["node"], {})[m["script"]] = m["uid"]
    return runs


def wait_for_scripts(box: Sandbox, job: str, nodes: set[str], timeout: float = 10) -> None:
    """The epilog runs after srun returns: wait until both scripts logged on every node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = script_runs(box, job)
        if set(runs) == nodes and all(set(r) == {"prolog", "epilog"} for r in runs.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"prolog/epilog of job {job} did not run on {sorted(nodes)}: "
                         f"{script_runs(box, job)}")


def job_ids(box: Sandbox) -> set[str]:
    return {m["job"] for line in box.script_log() if (m := LINE.match(line))}


@pytest.mark.slurm
def test_up_srun_status_down_leaves_nothing(sandbox_dir: Path) -> None:
    directory = sandbox_dir
    netns_before, links_before = netns_names(), root_links()
    started = time.monotonic()
    with running_sandbox(directory, hosts=3) as box:
        sid, pids, tag = box.id, box.pids(), "vc" + box.id.removeprefix("vcsb-")
        assert re.fullmatch(r"vcsb-[0-9a-f]{6}", sid)
        assert {f"{sid}-ctl", f"{sid}-h1", f"{sid}-h2", f"{sid}-h3"} <= netns_names()
        names = sorted(p["name"] for p in box.state["processes"])
        assert names == ["agent@ctl", "agent@h1", "agent@h2", "agent@h3", "etcd", "munged",
                         "slurmctld", "slurmd@h1", "slurmd@h2", "slurmd@h3"]

        # srun -N3 hostname: three distinct host names.
        out = box.run(["srun", "-N3", "hostname"]).stdout.split()
        assert sorted(out) == ["h1", "h2", "h3"]
        (job,) = job_ids(box)
        wait_for_scripts(box, job, {"h1", "h2", "h3"})
        for node, scripts in script_runs(box, job).items():
            assert scripts == {"prolog": "0", "epilog": "0"}, node  # as root
        # ... and each reached its host's agent.
        agent_results = {m["agent"] for line in box.script_log()
                         if (m := LINE.match(line)) and m["job"] == job}
        assert agent_results == {"ok"}, box.script_log()

        # status: every daemon alive, every host with its address and SLURM state.
        status = box.status()
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"sandbox {sid} in {directory}: up" in status.stdout
        for pid in pids:
            assert re.search(rf"pid {pid}\s+alive", status.stdout), status.stdout
        for i, host in enumerate(["h1", "h2", "h3"]):
            assert re.search(rf"{host}\s+10\.199\.0\.{11 + i}\s+netns {sid}-{host}\s+"
                             r"\(slurm: idle\)", status.stdout), status.stdout

        # A second up over a running sandbox is refused.
        again = vcluster("sandbox", "up", "--dir", str(directory))
        assert again.returncode == 1
        assert f"sandbox {sid} runs in {directory}; stop it first" in again.stderr
        assert "Traceback" not in again.stderr

    # down (done by running_sandbox, which also reaped the adopted daemons).
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived down"
    assert not directory.exists()
    # (Only names with the sandbox's id: other tests may be making namespaces meanwhile.)
    assert not any(n.startswith(sid) for n in netns_names())
    assert not any(n.startswith("vcsb-") for n in netns_names() - netns_before)
    assert not any(tag in name for name in root_links() | links_before)
    assert mounts_under(directory) == []
    assert not [p for p in Path("/sys/fs/cgroup").rglob("*slurm*")]

    # down again: nothing to do, not an error; status says there is none.
    again = vcluster("sandbox", "down", "--dir", str(directory))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert vcluster("sandbox", "status", "--dir", str(directory)).returncode == 3
    assert time.monotonic() - started < 30


@pytest.mark.slurm
def test_hosts_users_and_configuration(sandbox: Sandbox) -> None:
    assert sandbox.hosts == ["h1", "h2", "h3"]
    assert sandbox.run(["hostname"]).stdout.strip() == "ctl"
    assert sandbox.run(["hostname"], host="h2").stdout.strip() == "h2"
    env = sandbox.run(["sh", "-c", 'echo "$VCLUSTER_CONF $SLURM_CONF"'], host="h3").stdout
    assert env.split() == [str(sandbox.conf("h3")), str(sandbox.directory / "slurm/slurm.conf")]
    assert sandbox.run(["sh", "-c", "command -v vcluster"]).returncode == 0

    # Each machine's configuration is valid and has directories of its own.
    for machine in ("ctl", *sandbox.hosts):
        path = sandbox.conf(machine) / "batch.yaml"
        batch = parse_batch(load_yaml(path), path)
        assert batch.backend == "slurm" and batch.qemu.accel == "tcg"
        assert batch.directories.state == sandbox.directory / "hosts" / machine / "state"
        assert (sandbox.conf(machine) / "templates.yaml").is_file()

    # Hosts reach each other over links with room for VXLAN around a 1500-byte frame,
    # at addresses apart from the sample private network's.
    link = "vc" + sandbox.id.removeprefix("vcsb-") + "-eth"  # SandboxState.tag + "-eth"
    shown = sandbox.run(["ip", "-o", "link", "show", link], host="h2").stdout.split()
    assert int(shown[shown.index("mtu") + 1]) >= 1550
    address = sandbox.run(["ip", "-o", "-4", "addr", "show", link],
                          host="h2").stdout.split()[3]
    assert address == "10.199.0.12/24"

    # The store, through the machine's own batch.yaml, from a host's namespace.
    assert sandbox.run([sys.executable, STORE_HELPER, "put"], host="h1").stdout == "h1\n"
    whoami = sandbox.run([sys.executable, STORE_HELPER, "get"], host="h3").stdout
    assert whoami == "h1\n"

    # A job of an unprivileged user: the scripts still run as root, and see the job's uid.
    before = set(sandbox.script_log())
    assert sandbox.run(["id", "-u"], user="nobody").stdout.strip() == "65534"
    out = sandbox.run(["srun", "-N2", "sh", "-c", "echo $(hostname) $(id -u)"], user="nobody")
    lines = sorted(out.stdout.splitlines())
    assert len(lines) == 2 and all(line.endswith(" 65534") for line in lines)
    new = [m for line in sandbox.script_log() if line not in before and (m := LINE.match(line))]
    assert new and all(m["uid"] == "0" and m["job_uid"] == "65534" for m in new)
    assert all(m["user"] == "nobody" for m in new)

    # The command's exit status comes through.
    assert sandbox.run(["sh", "-c", "exit 7"], check=False).returncode == 7


@pytest.mark.slurm
def test_two_sandboxes_do_not_collide(sandbox: Sandbox, sandbox_dir: Path) -> None:
    with running_sandbox(sandbox_dir, hosts=1) as second:
        assert second.id != sandbox.id
        assert second.run(["srun", "hostname"]).stdout.strip() == "h1"
        assert sorted(sandbox.run(["srun", "-N3", "hostname"]).stdout.split()) == [
            "h1", "h2", "h3"]
    assert sandbox.status().returncode == 0


@pytest.mark.slurm
def test_failed_up_rolls_back(sandbox_dir: Path) -> None:
    # A directory too long for munge's socket: up fails after making namespaces.
    directory = sandbox_dir / ("x" * 90)
    before = netns_names()
    proc = vcluster("sandbox", "up", "--dir", str(directory), "--hosts", "2")
    assert proc.returncode == 1
    assert "too long for a unix socket path" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "removing what was made" in proc.stdout
    assert not any(n.startswith("vcsb-") for n in netns_names() - before)
    assert not directory.exists()
    assert mounts_under(sandbox_dir) == []


@pytest.mark.slurm
def test_unsearchable_dir_is_refused_up_front(tmp_path: Path) -> None:
    # pytest's tmp_path is mode 700: munged could not reach its socket there.
    proc = vcluster("sandbox", "up", "--dir", str(tmp_path / "sb"))
    assert proc.returncode == 1
    assert "searchable by all" in proc.stderr and "chmod o+x" in proc.stderr
    assert not (tmp_path / "sb").exists()


@pytest.mark.slurm
def test_dir_another_user_could_change_is_refused() -> None:
    # Root writes scripts slurmd runs as root there: a user's directory would be a way in.
    parent = Path(tempfile.mkdtemp(prefix="vcluster-test-", dir="/var/tmp"))
    try:
        parent.chmod(0o755)
        os.chown(parent, 65534, 65534)
        proc = vcluster("sandbox", "up", "--dir", str(parent / "sb"))
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"vcluster: error: --dir {parent}/sb: {parent} belongs to uid 65534 or others may "
            "write to it; root keeps files there that slurmd runs as root, so it must be root's "
            "alone (choose another --dir)")
        assert not (parent / "sb").exists()
    finally:
        shutil.rmtree(parent)


@pytest.mark.slurm
def test_bad_input_is_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    d = ["--dir", str(sandbox.directory)]
    cases = [
        (["sandbox", "up", "--dir", str(tmp_path / "x"), "--hosts", "0"], 2, "--hosts"),
        (["sandbox", "run", *d, "--host", "h9", "--", "true"], 1,
         "has no host 'h9' (it has ctl, h1, h2, h3)"),
        (["sandbox", "run", *d, "--user", "no-such-user-x", "--", "true"], 2,
         "--user no-such-user-x: no such user"),
        (["sandbox", "run", "--dir", str(tmp_path / "none"), "--", "true"], 1,
         "no sandbox in"),
        (["sandbox", "status", "--dir", str(tmp_path / "none")], 3, "no sandbox in"),
    ]
    for args, code, message in cases:
        proc = vcluster(*args)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert message in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len([x for x in proc.stderr.splitlines() if x.strip()]) <= 3  # click's usage


def test_fragment_is_what_the_sandbox_uses(tmp_path: Path) -> None:
    """The sandbox's slurm.conf carries every fragment setting (overrides are explained)."""
    from vcluster.sandbox.slurmconf import SlurmLayout, render_conf
    from vcluster.sandbox.state import Host

    fragment = slurm_dir() / "slurm.conf.fragment"
    settings = dict(parse_fragment(fragment))
    assert settings["PrologFlags"] == "Alloc,NoHold"
    machine = Host("ctl", "10.200.0.1", "n", "u", "c")
    hosts = [Host("h1", "10.200.0.11", "n1", "u1", "c1")]
    conf = render_conf(cluster="vc000000", layout=SlurmLayout(tmp_path), controller=machine,
                       hosts=hosts, munge_socket=tmp_path / "m", cpus=2, memory_mb=1024,
                       fragment=fragment)
    rendered = dict(line.split("=", 1) for line in conf.splitlines()
                    if "=" in line and not line.startswith(("#", "NodeName", "PartitionName")))
    for key, value in settings.items():
        if key in ("Prolog", "Epilog"):
            assert rendered[key] == str(tmp_path / key.lower())
        elif key in SANDBOX_OVERRIDES:
            assert rendered[key] == SANDBOX_OVERRIDES[key][0]
        else:
            assert rendered[key] == value, key
    for script in ("prolog", "epilog"):
        assert os.access(slurm_dir() / script, os.X_OK)

