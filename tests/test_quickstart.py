"""The README's two-command start, as written: the quick start on a clean clone, and the
test command being the one CI runs.

The quick start's command is parsed out of the README ("## Quick start", its first
indented line), so the README cannot drift from what is tested.  It runs on a clean
clone of HEAD, as root, with an empty HOME and an empty ``VCLUSTER_CONF`` (no
/etc/vcluster, no store file): it installs what is missing, puts vcluster on the PATH,
builds (or reuses) the tiny image and runs the main job, whose output must show vm1
reading vm0's write; then nothing of the job may be left.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_root
from tests.support_local import LocalUser, leftovers

README = ROOT / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def commands(title: str) -> list[str]:
    """The indented code lines of a README section, comments dropped."""
    return [line.strip().split("  #")[0].strip() for line in section(title).splitlines()
            if line.startswith("    ") and line.strip()]


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    quick = commands("Quick start")
    assert quick[:2] == ["bash quickstart.sh", "bash .ci/run"], quick
    test_command = commands("Test")[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_command)}( |$)", ci, re.MULTILINE), test_command


@pytest.mark.qemu
def test_the_quick_start_as_written_runs_the_main_job_and_leaves_nothing() -> None:
    require_root("the quick start installs packages and vcluster for every user")
    command = commands("Quick start")[0]
    with tempfile.TemporaryDirectory(prefix="vcl-quick-", dir="/tmp") as tmp:
        base = Path(tmp)
        clone, home, conf = base / "clone", base / "home", base / "conf"
        home.mkdir()
        conf.mkdir()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {"HOME": str(home), "VCLUSTER_CONF": str(conf), "LANG": "C.UTF-8",
               "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, text=True,
                              capture_output=True, timeout=1500, stdin=subprocess.DEVNULL)
        out = done.stdout + done.stderr
        print(out)
        assert done.returncode == 0, out[-4000:]
        assert "vm1 reads what vm0 wrote: 0x00C0FFEE" in done.stdout, out[-4000:]
        steps = re.findall(r"^\[ *(\d+)s\] (.+)$", done.stdout, re.MULTILINE)
        names = [name for _, name in steps]
        for expected in ("system packages", "vcluster in", "vcluster doctor",
                         "the tiny image", "the main job", "done"):
            assert any(n.startswith(expected) for n in names), names
        assert Path("/usr/local/bin/vcluster").exists()
        user = LocalUser("root", 0, home, conf)
        assert user.store.exists()
        assert leftovers(user) == []
