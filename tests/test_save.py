"""``vcluster save`` in the sandbox, as a real user, with debian guests: what is saved is there.

Two clusters, one after the other (the second boots what the first saved):

A. ``deb:2,tinyd``, ``deb`` being the user's copy of the site's debian
   (``vcluster image copy``): vm0 writes a 50 MB file and ``vcluster save
   vm0`` adds a layer to ``user:deb``; vm1 is saved as a new image
   ``user:mine`` (``-d``); tiny's data disk is saved as ``user:data`` (``-i``);
   vm0 and vm1 save into ``deb`` at once; saves are killed on the host; the
   bad inputs are refused; a save is cut short by killing its VM's runner.
B. ``deb@1`` (vm0's save), ``mine``, and a tiny whose disk starts as ``data``:
   vm0 has the file, with its checksum; vm1 boots from the user's new image;
   vm2's disk holds what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_for
from tests.support_agent import JobTool
from tests.support_alloc import (
    BackgroundAlloc,
    Shared,
    background_alloc,
    job_process,
    module_users,
    nothing_left_anywhere,
    runner_pid,
    shared_dir,
    tool,
    touch,
    wait_flag,
)
from tests.support_images import require_image
from tests.support_sandbox import Sandbox, sandbox

__all__ = ["sandbox", "tool"]

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

ALICE = "vcsv-alice"
users = module_users(ALICE)
WRITE_50MB = ("dd if=/dev/urandom of={path} bs=1M count=50 status=none && sync && "
              "sha256sum {path}")
SAVED = re.compile(r"^(\S+@\d+) (/\S+)$", re.MULTILINE)


@dataclass
class Running:
    """A cluster of ALICE's, kept up until ``end``."""

    box: Sandbox
    shared: Shared
    alloc: BackgroundAlloc
    job: str
    flag: str

    def vcluster(self, *args: str, timeout: float = 600) -> tuple[int, str, str]:
        proc = self.box.run(["env", f"VCLUSTER_HOME={self.shared.home}", "vcluster", *args],
                            user=ALICE, check=False, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def sh(self, vm: str, command: str) -> str:
        status, out, err = self.vcluster("exec", "-j", self.job, vm, "--", "sh", "-c", command)
        assert status == 0, err
        return out.strip()

    def save(self, *args: str) -> str:
        """``vcluster save ARGS``: the revision it made (IMAGE@REV)."""
        status, out, err = self.vcluster("save", "-j", self.job, *args)
        assert status == 0, err
        match = SAVED.search(out)
        assert match, out
        return match.group(1)


@pytest.fixture(scope="module")
def shared(users: None) -> Iterator[Shared]:
    require_image("debian")
    require_image("tiny")
    with shared_dir("", {}) as made:
        repo = made.home / "images"
        repo.mkdir()
        os.chown(repo, _uid(ALICE), -1)
        yield made


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def user_repo(shared: Shared) -> Path:
    return shared.home / "images"


@contextlib.contextmanager
def cluster(box: Sandbox, shared: Shared, tool: JobTool, flag: str,
            *args: str) -> Iterator[Running]:
    with background_alloc(box, ALICE, shared.home, "-E", wait_flag(shared, flag),
                          *args) as running:
        job = running.wait_ready(timeout=420)
        yield Running(box, shared, running, job, flag)
        touch(shared.flags / flag)
        assert running.finish(180) == 0, running.output
    nothing_left_anywhere(box, tool, job, ALICE)


def revisions_are_whole(repo: Path, name: str) -> list[int]:
    """Every revision of ``name`` is listed whole and passes qemu-img check; their numbers."""
    found = []
    for entry in sorted((repo / name).iterdir()):
        assert entry.name.isdigit(), f"a partial revision is visible: {entry}"
        info = json.loads((entry / "image.json").read_text())
        check = subprocess.run(["qemu-img", "check", "-U", str(entry / info["files"]["disk"])],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        found.append(int(entry.name))
    return found


TEMPLATES_A = """\
deb:
  inherits: debian
  image: user:deb
tinyd:
  inherits: tiny
  disks: [{name: data, size: 16M}]
"""
DATA_MARK = "vcluster-data-disk"


@pytest.fixture(scope="module")
def saved(sandbox: Sandbox, shared: Shared, tool: JobTool) -> Iterator[dict[str, str]]:
    """Cluster A, and what it saved: the file's checksum line, the revisions, the errors."""
    copy = sandbox.run(["env", f"VCLUSTER_HOME={shared.home}", "vcluster", "image", "copy",
                        "site:debian", "user:deb"], user=ALICE, timeout=300)
    assert copy.stdout.startswith("deb@0 "), copy.stdout
    (shared.home / "templates.yaml").write_text(TEMPLATES_A)
    out: dict[str, str] = {}
    with cluster(sandbox, shared, tool, "a-done", "-N2", "-c", "1", "deb:2,tinyd") as a:
        out["first"] = a.sh("vm0", WRITE_50MB.format(path="/var/tmp/first.bin"))
        out["layer"] = a.save("vm0")
        out["mine"] = a.save("-d", "user:mine", "vm1")
        # tiny's data disk (its /dev/vda: tiny has no root disk), saved as a data image
        a.sh("vm2", f"printf {DATA_MARK} | dd of=/dev/vda bs=512 seek=100 conv=fsync "
                    "2>/dev/null; echo written")
        out["data"] = a.save("-i", "data", "-d", "user:data", "vm2")
        procs = [subprocess.Popen(  # two VMs saving into one image at once
            [sys.executable, "-m", "vcluster", "sandbox", "run", "--dir", str(sandbox.directory),
             "--user", ALICE, "--", "env", f"VCLUSTER_HOME={shared.home}", "vcluster", "save",
             "-j", a.job, vm], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for vm in ("vm0", "vm1")]
        results = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        out["concurrent"] = " ".join(m.group(1) for o, _ in results
                                     if (m := SAVED.search(o)))
        out["kills"] = json.dumps(kill_saves(a, 5))
        out["bad"] = json.dumps(bad_inputs(a))
        out["killed"] = kill_runner_mid_save(a)
    yield out


def kill_saves(a: Running, times: int) -> dict[str, object]:
    """Saves of vm0 whose process on the VM's host is killed at a random moment; then the
    guest must still write, and the next save must work."""
    rng = random.Random(1201)
    killed = 0
    for _ in range(times):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vcluster", "sandbox", "run", "--dir", str(a.box.directory),
             "--user", ALICE, "--", "env", f"VCLUSTER_HOME={a.shared.home}", "vcluster",
             "save", "-j", a.job, "vm0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid: list[int] = []

        def started(found: list[int] = pid, cli: subprocess.Popen[bytes] = proc) -> bool:
            with contextlib.suppress(AssertionError):
                found.append(job_process(a.job, (b"internal", b"save")))
            return bool(found) or cli.poll() is not None

        wait_for("the save to start on the VM's host", started, 60)
        time.sleep(rng.uniform(0, 0.6))
        with contextlib.suppress(ProcessLookupError):
            if pid:
                os.kill(pid[0], signal.SIGKILL)
                killed += 1
        proc.wait(60)
    status, _, err = a.vcluster("exec", "-j", a.job, "--timeout", "30", "vm0", "--", "sh",
                                "-c", "touch /var/tmp/after-kills && echo written")
    return {"killed": killed, "write": [status, err], "next": a.save("vm0")}


def bad_inputs(a: Running) -> dict[str, tuple[int, str]]:
    before = sorted(str(p) for p in user_repo(a.shared).rglob("*"))
    results = {}
    for args in (["vm7"], ["vm2"], ["-d", "site:x", "vm0"], ["-d", "a/b", "vm0"],
                 ["-d", "my image", "vm0"], ["-i", "data", "vm2"], ["-i", "nope", "vm0"]):
        status, _, err = a.vcluster("save", "-j", a.job, *args)
        results[" ".join(args)] = (status, err.strip())
    assert sorted(str(p) for p in user_repo(a.shared).rglob("*")) == before, "bad input wrote"
    return results


def kill_runner_mid_save(a: Running) -> str:
    """A full save of vm1 whose runner is killed during the copy: what the save said."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vcluster", "sandbox", "run", "--dir", str(a.box.directory),
         "--user", ALICE, "--", "env", f"VCLUSTER_HOME={a.shared.home}", "vcluster", "save",
         "-j", a.job, "--full", "-d", "user:mine", "vm1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    repo = user_repo(a.shared)
    wait_for("the save to stage its copy", lambda: any(repo.glob(".build-mine-*/disk.qcow2"))
             or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.communicate()
    os.kill(runner_pid(a.job, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, (out, err)
    return err


def test_save_adds_a_layer_to_the_vms_image(shared: Shared, saved: dict[str, str]) -> None:
    assert saved["layer"] == "deb@1"
    info = json.loads((user_repo(shared) / "deb" / "1" / "image.json").read_text())
    assert (info["parent"], info["made_by"]) == (0, ALICE)
    assert info["source"].startswith("vm0 of job ")
    layer = user_repo(shared) / "deb" / "1" / "disk.qcow2"
    assert layer.stat().st_blocks * 512 < 150 << 20  # the change, not the whole disk


def test_a_save_into_a_new_image_of_the_user_is_listed(
        sandbox: Sandbox, shared: Shared, saved: dict[str, str]) -> None:
    assert saved["mine"] == "mine@0"
    proc = sandbox.run(["env", f"VCLUSTER_HOME={shared.home}", "vcluster", "image", "list",
                        "-R", "user"], user=ALICE)
    assert re.search(r"^user:mine@0\s+disk\s+\S+\s+-\s+\S+\s+saved by " + ALICE, proc.stdout,
                     re.MULTILINE), proc.stdout


def test_a_templates_disk_is_saved_as_a_data_image(shared: Shared,
                                                    saved: dict[str, str]) -> None:
    assert saved["data"] == "data@0"
    info = json.loads((user_repo(shared) / "data" / "0" / "image.json").read_text())
    assert info["source"].startswith("disk 'data' of vm2 of job ")
    assert "kernel" not in info["files"]


def test_two_concurrent_saves_into_one_image_make_two_valid_revisions(
        shared: Shared, saved: dict[str, str]) -> None:
    refs = saved["concurrent"].split()
    assert len(refs) == 2 and len(set(refs)) == 2, refs
    assert all(r.startswith("deb@") for r in refs), refs
    revisions = revisions_are_whole(user_repo(shared), "deb")
    assert {int(r.split("@")[1]) for r in refs} <= set(revisions)


def test_saves_killed_on_the_host_leave_the_vm_running_and_the_next_save_works(
        shared: Shared, saved: dict[str, str]) -> None:
    kills = json.loads(saved["kills"])
    assert kills["killed"] >= 3, kills
    assert kills["write"][0] == 0, kills  # the guest's file systems are not left frozen
    assert kills["next"].startswith("deb@"), kills
    revisions_are_whole(user_repo(shared), "deb")


def test_bad_inputs_are_one_line_and_write_nothing(saved: dict[str, str]) -> None:
    results = {k: tuple(v) for k, v in json.loads(saved["bad"]).items()}
    expected = {
        "vm7": "no such VM in job",
        "vm2": "a kernel and initramfs image: it has no disk to save",
        "-d site:x vm0": "you cannot write the site repository",
        "-d a/b vm0": "'a/b' is not an image name",
        "-d my image vm0": "'my image' is not an image name",
        "-i data vm2": "disk 'data' of vm2 of job",  # it started empty: -d is needed
        "-i nope vm0": "has no disk 'nope' (its disks: root)",
    }
    for args, text in expected.items():
        status, err = results[args]
        assert status == 2 and len(err.splitlines()) == 1 and text in err, (args, err)


def test_a_save_whose_runner_is_killed_leaves_no_partial_revision(
        shared: Shared, saved: dict[str, str]) -> None:
    assert "vcluster: error:" in saved["killed"], saved["killed"]
    revisions_are_whole(user_repo(shared), "mine")
    revisions_are_whole(user_repo(shared), "deb")


def test_a_new_cluster_from_the_saved_revisions_has_the_file(
        sandbox: Sandbox, shared: Shared, tool: JobTool, saved: dict[str, str]) -> None:
    (shared.home / "templates.yaml").write_text(
        f"deb1:\n  inherits: debian\n  image: user:{saved['layer']}\n"
        "mine:\n  inherits: debian\n  image: user:mine@0\n"
        f"tinydata:\n  inherits: tiny\n  disks: [{{name: data, image: user:{saved['data']}}}]\n")
    with cluster(sandbox, shared, tool, "b-done", "-N2", "-c", "1", "deb1,mine,tinydata") as b:
        assert b.sh("vm0", "sha256sum /var/tmp/first.bin") == saved["first"]
        assert b.sh("vm1", "hostname") == "vm1"  # booted from the user's new image
        # the data disk starts as the saved data image
        assert b.sh("vm2", f"dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | "
                           f"head -c {len(DATA_MARK)}") == DATA_MARK
