"""``vcluster.fork``: a function run in a forked child, as the local runners are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vcluster.fork import ForkError, fork_call
from vcluster.run import start_time


def _echo_upper() -> int:
    line = sys.stdin.readline()
    print(line.strip().upper(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    return 3


def test_the_child_reads_its_stdin_writes_its_stdout_and_ends_with_the_status() -> None:
    child = fork_call(_echo_upper, name="vcluster-test")
    child.stdin.write(b"hello\n")
    child.stdin.close()
    out = child.stdout.read().decode()
    deadline = time.monotonic() + 10
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (child.returncode, out) == (3, "HELLO\nto stderr\n")
    assert not child.alive()


def _sleep_named() -> int:
    time.sleep(60)
    return 0


def test_the_child_has_its_name_and_a_process_group_of_its_own() -> None:
    child = fork_call(_sleep_named, name="vcluster-vm7")
    try:
        deadline = time.monotonic() + 10
        comm = ""
        while comm != "vcluster-vm7" and time.monotonic() < deadline:
            comm = Path(f"/proc/{child.pid}/comm").read_text().strip()
            time.sleep(0.01)
        assert comm == "vcluster-vm7"
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    finally:
        child.signal(signal.SIGKILL)
        while child.alive():
            time.sleep(0.01)
    assert child.returncode == -signal.SIGKILL


def _raises() -> int:
    raise ValueError("the target's own error")


def test_a_target_that_raises_ends_the_child_with_1_and_its_traceback() -> None:
    child = fork_call(_raises, name="vcluster-test")
    child.stdin.close()
    out = child.stdout.read().decode()
    while child.poll() is None:
        time.sleep(0.01)
    assert child.returncode == 1 and "ValueError: the target's own error" in out


def test_the_child_dies_with_its_parent_however_it_dies() -> None:
    """A launcher killed outright (SIGKILL: nothing of it runs) takes its forked children
    with it: the kernel's parent-death signal."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from vcluster.fork import fork_call
        def sleep():
            time.sleep(60)
            return 0
        child = fork_call(sleep, name="vcluster-test")
        print(child.pid, flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    started = start_time(pid)
    assert started is not None
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert start_time(pid) != started, "the child outlived its parent"


def test_no_fork_while_another_thread_runs() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="busy", daemon=True)
    thread.start()
    try:
        with pytest.raises(ForkError, match="cannot fork vcluster-vm0 while threads run: busy"):
            fork_call(_sleep_named, name="vcluster-vm0")
    finally:
        stop.set()
        thread.join()
