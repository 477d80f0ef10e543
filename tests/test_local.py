"""The local backend on this machine, as root and as a normal user: no SLURM, no etcd, no
/etc/vcluster (``VCLUSTER_CONF`` is an empty directory, HOME is empty but for a link to
the test images), real QEMU and the tiny image.

Root's clusters get taps on a bridge from the agent's code in the launcher; a normal
user's are rootless (a vde_switch, QEMU's user-mode NAT, FAM in /tmp/vcluster-UID).
Each test checks the sharing itself (vm1 reads what vm0 wrote in the FAM region, vm0
pings vm1 over the private network) and that nothing of the job is left afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support_agent import unix_users
from tests.support_images import require_image
from tests.support_local import LocalUser, leftovers, local_user, qemus, wait_gone

pytestmark = [pytest.mark.qemu, pytest.mark.images]

CAROL = "vclt-carol"
SHARE = ("vcluster exec vm0 -- fam write 8 0x0badcafe && "
         "echo \"vm1 read: $(vcluster exec vm1 -- fam read 8)\" && "
         "vcluster exec vm0 -- ping -c 2 -W 5 10.200.0.2 && vcluster ps -l && "
         "echo \"ssh: $(vcluster ssh vm1 -- hostname)\"")


@pytest.fixture(scope="module")
def root() -> Iterator[LocalUser]:
    require_root("root's local clusters make taps and bridges")
    require_image("tiny")
    with local_user("root") as made:
        yield made


@pytest.fixture(scope="module")
def carol() -> Iterator[LocalUser]:
    require_root("the tests make a unix user")
    require_image("tiny")
    with unix_users(CAROL), local_user(CAROL) as made:
        yield made


@pytest.fixture(params=["root", "rootless"])
def who(request: pytest.FixtureRequest) -> LocalUser:
    user: LocalUser = request.getfixturevalue("root" if request.param == "root" else "carol")
    return user


def test_a_local_cluster_shares_its_fam_region_and_network_and_leaves_nothing(
        who: LocalUser) -> None:
    assert not who.store.exists()  # no store file: the first command makes it
    done = who.run("alloc", "-E", SHARE, "tiny-fam:2")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "vm1 read: 0x0BADCAFE" in done.stdout, out
    assert "2 packets transmitted, 2 received" in done.stdout, out
    assert "2 VMs ready in" in done.stderr
    assert "ssh: vm1" in done.stdout, out
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("vm")]
    vms = {words[0]: words for words in lines if len(words) >= 4 and words[2] == "ready"}
    assert set(vms) == {"vm0", "vm1"}, out
    # ssh through user-mode NAT: a port of 127.0.0.1 only, whoever runs the cluster
    assert all(words[-1].startswith("127.0.0.1:") for words in vms.values()), out
    assert leftovers(who) == []


def _store_value(user: LocalUser, key: str) -> str:
    with closing(sqlite3.connect(user.store)) as db:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    assert row is not None, key
    return str(row[0])


def test_kill_9_of_the_launcher_takes_its_qemus_and_the_next_command_removes_the_rest(
        who: LocalUser, tmp_path: Path) -> None:
    log = tmp_path / "alloc.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(who.argv("alloc", "-E", "sleep 600", "tiny:2"), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=who.home)
    try:
        deadline = time.monotonic() + 120
        while "ready in" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        job = log.read_text().split("VCLUSTER_JOB_ID=")[1].split()[0]
        record = json.loads(_store_value(who, f"/vcluster/local/jobs/{job}"))
        assert len(qemus(who.uid)) == 2
        os.kill(record["pid"], signal.SIGKILL)
        took = wait_gone(who.uid, 5.0)
        print(f"QEMUs gone {took:.2f} s after kill -9 of the launcher")
        assert leftovers(who) != []  # its devices, files and keys are still there
        ps = who.run("ps")
        assert ps.returncode == 0, ps.stderr
        assert f"local job {job}: its launcher (pid {record['pid']}) is gone" in ps.stderr
        assert "no clusters" in ps.stderr
        assert leftovers(who) == []  # the user's sleep too: it was the job's
        gc = who.run("gc")
        assert gc.returncode == 0 and "nothing to remove" in gc.stderr
    finally:
        proc.kill()
        proc.wait()


def test_a_local_batch_job_runs_its_script_and_returns_its_status(carol: LocalUser) -> None:
    script = carol.home / "job.sh"
    script.write_text("#!/bin/sh\n#VCLUSTER tiny-fam:2\n#SBATCH -J famjob\n"
                      "vcluster exec vm0 -- fam write 8 0x0ba7c4ed\n"
                      "echo \"vm1 read: $(vcluster exec vm1 -- fam read 8) args: $*\"\n"
                      "exit 3\n")
    os.chown(script, carol.uid, -1)
    done = carol.run("batch", "--wait", "job.sh", "x", "y")
    assert done.returncode == 3, done.stdout + done.stderr
    job = done.stdout.split("Submitted batch job ")[1].split()[0]
    output = (carol.home / f"vcluster-{job}.out").read_text()
    assert "vm1 read: 0x0BA7C4ED args: x y" in output, output
    assert "job.sh (on the host) exited with status 3" in output
    assert leftovers(carol) == []
    refused = carol.run("batch", "-p", "debug", "job.sh")
    assert refused.returncode == 2
    assert "the command line: --partition=debug: the local backend runs the job on this " \
        "machine" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1



def test_cancel_stops_a_local_batch_job_and_leaves_nothing(carol: LocalUser) -> None:
    script = carol.home / "long.sh"
    script.write_text("#!/bin/sh\n#VCLUSTER tiny:1\n"
                      "echo \"vm0 says: $(vcluster exec vm0 -- echo hello)\"\nsleep 600\n")
    os.chown(script, carol.uid, -1)
    submitted = carol.run("batch", "long.sh")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.split("Submitted batch job ")[1].split()[0]
    output = carol.home / f"vcluster-{job}.out"
    deadline = time.monotonic() + 120
    while "vm0 says: hello" not in (output.read_text() if output.exists() else ""):
        assert time.monotonic() < deadline, output.read_text() if output.exists() else ""
        time.sleep(0.2)
    assert len(qemus(carol.uid)) == 1
    refused = carol.run("cancel", job, "999")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"vcluster: error: 999: no running local job of yours has that "
                              f"id (yours: {job}; vcluster ps lists them)\n")
    assert len(qemus(carol.uid)) == 1  # a wrong id in the list: nothing was signalled
    done = carol.run("cancel", job)
    assert done.returncode == 0, done.stderr
    assert f"job {job}: stopping (SIGTERM to its launcher, pid" in done.stderr
    assert done.stderr.endswith(f"vcluster: job {job}: cancelled\n"), done.stderr
    assert qemus(carol.uid) == []
    assert leftovers(carol) == []  # the script's sleep too: it was the job's
    assert f"job {job}: stopped" in output.read_text()  # its launcher's own end
    again = carol.run("cancel", job)
    assert again.returncode == 2 and "no running local job of yours" in again.stderr
    assert carol.run("cancel", "x1").stderr.endswith(
        "Invalid value for 'JOBID...': 'x1' is not a job id (a number, as vcluster ps lists "
        "them)\n")

DATA_MARK = "vcluster-local-save"


def test_save_keeps_a_local_vms_disk_and_a_new_cluster_starts_from_it(carol: LocalUser
                                                                       ) -> None:
    templates = carol.home / ".vcluster" / "templates.yaml"
    templates.write_text("tinyd:\n  inherits: tiny\n  disks: [{name: data, size: 16M}]\n"
                         "tinydata:\n  inherits: tiny\n"
                         "  disks: [{name: data, image: user:data}]\n")
    os.chown(templates, carol.uid, -1)
    write = (f"vcluster exec vm0 -- sh -c 'printf {DATA_MARK} | dd of=/dev/vda bs=512 "
             "seek=100 conv=fsync 2>/dev/null' && vcluster save -i data -d user:data vm0")
    done = carol.run("alloc", "-E", write, "tinyd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (carol.home / ".vcluster" / "images" / "data" / "0" / "image.json").is_file()
    read = (f"vcluster exec vm0 -- sh -c 'dd if=/dev/vda bs=512 skip=100 count=1 "
            f"2>/dev/null | head -c {len(DATA_MARK)}'")
    again = carol.run("alloc", "-E", read, "tinydata")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == DATA_MARK, again.stdout
    assert leftovers(carol) == []


def test_a_shared_disk_is_one_image_both_vms_write_and_read(carol: LocalUser) -> None:
    templates = carol.home / ".vcluster" / "templates.yaml"
    templates.write_text("tinysh:\n  inherits: tiny\n"
                         "  disks: [{name: shared, size: 16M, shared: true}]\n")
    os.chown(templates, carol.uid, -1)
    script = ("vcluster exec vm0 -- sh -c 'printf written-by-vm0 | dd of=/dev/vda bs=512 "
              "seek=8 conv=fsync 2>/dev/null' && echo \"vm1 read: $(vcluster exec vm1 -- sh -c "
              "'dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 14')\" && "
              "ls ~/.local/state/vcluster/work/*/")
    done = carol.run("alloc", "-E", script, "tinysh:2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vm1 read: written-by-vm0" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count("shared-shared.raw") == 1, done.stdout  # one image for both
    assert leftovers(carol) == []


def test_doctor_says_kvm_is_unusable_here_within_10_s(root: LocalUser) -> None:
    started = time.monotonic()
    done = root.run("doctor", timeout=30)
    took = time.monotonic() - started
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 10, f"vcluster doctor took {took:.1f} s"
    lines = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert lines["kvm"].startswith("warn") and "unusable" in lines["kvm"] \
        and "TCG" in lines["kvm"], lines["kvm"]
    assert lines["backend"].startswith("ok") and "local" in lines["backend"]
    assert lines["store"].startswith("ok") and "sqlite" in lines["store"]
    assert lines["qemu"].startswith("ok") and "QEMU emulator version" in lines["qemu"]


def test_doctor_without_qemu_says_how_to_install_it(root: LocalUser, tmp_path: Path) -> None:
    done = root.run("doctor", env={"PATH": str(tmp_path)}, timeout=30)
    assert done.returncode == 1, done.stdout
    lines = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert lines["qemu"].startswith("FAIL") and \
        "apt-get install qemu-system-x86" in lines["qemu"], lines["qemu"]
    assert lines["kvm"].startswith("warn") and "no QEMU" in lines["kvm"]


def test_doctor_on_a_slurm_site_without_slurm_fails_the_backend(root: LocalUser,
                                                                tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "batch.yaml").write_text("batch:\n  backend: slurm\n")
    done = root.run("doctor", env={"VCLUSTER_CONF": str(conf), "PATH": "/usr/bin:/bin"},
                    timeout=30)
    assert done.returncode == 1, done.stdout
    lines = {line.split()[1]: line for line in done.stdout.splitlines()}
    backend = lines["backend"]
    assert backend.startswith("FAIL") and "slurm" in backend, backend
