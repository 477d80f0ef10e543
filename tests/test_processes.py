"""Stopping processes the one way (signal, bounded wait, SIGKILL) and stop signals as a
cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vcluster.cancel import Cancellation, Cancelled
from vcluster.run import Ending, spawn, stop
from vcluster.sandbox import process
from vcluster.sandbox.state import Process

STUBBORN = [sys.executable, "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"]


def stubborn_child() -> subprocess.Popen[bytes]:
    """A child that ignores SIGTERM, once it does (it says so)."""
    proc = spawn(STUBBORN, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_stop_says_how_each_child_ended() -> None:
    polite = spawn(["sleep", "60"])
    started = time.monotonic()
    assert stop(polite, 5) is Ending.EXITED
    assert polite.returncode == -signal.SIGTERM and time.monotonic() - started < 2

    stubborn = stubborn_child()
    started = time.monotonic()
    assert stop(stubborn, 0.5) is Ending.KILLED
    assert stubborn.returncode == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 3

    done = spawn(["true"])
    done.wait()
    assert stop(done, 5) is Ending.ALREADY


def test_stop_without_a_signal_only_waits_then_kills() -> None:
    asked = spawn(["sleep", "60"])
    assert stop(asked, 0.3, signum=None) is Ending.KILLED  # nobody had asked it: it stayed
    assert asked.returncode == -signal.SIGKILL


def test_sandbox_daemons_stop_by_pid(tmp_path: Path) -> None:
    polite = process.start("polite", ["sleep", "60"], tmp_path / "polite.log")
    stubborn = process.start("stubborn", STUBBORN, tmp_path / "stubborn.log")
    deadline = time.monotonic() + 10
    while b"ready" not in (tmp_path / "stubborn.log").read_bytes():
        assert time.monotonic() < deadline, "the stubborn daemon did not start"
        time.sleep(0.02)
    killed = process.stop_all([polite, stubborn], timeout=0.5)
    assert killed == [stubborn]
    assert not process.alive(polite) and not process.alive(stubborn)
    # A record whose PID now belongs to someone else is never signalled.
    stranger = Process("stranger", os.getpid(), start_time=1, log="")
    assert process.stop_all([stranger], timeout=0.1) == []


def test_a_stop_signal_becomes_a_cancellation() -> None:
    cancel = Cancellation()
    with cancel.installed():
        assert not cancel.wait(0.01)
        cancel.check("stopped the cluster")  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert cancel.wait(5)  # returns at once: the handler set the flag
        with pytest.raises(Cancelled) as raised:
            cancel.check("stopped the cluster")
    assert str(raised.value) == ("stopped the cluster: the job was cancelled or reached its "
                                 "time limit (SIGTERM)")
    assert raised.value.exit_code == 130 and raised.value.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_blocked_signals_arrive_after_the_block() -> None:
    cancel = Cancellation()
    with cancel.installed():
        with cancel.blocked():
            os.kill(os.getpid(), signal.SIGHUP)
            assert not cancel.cancelled  # held back inside the block
        assert cancel.wait(5) and cancel.signal_name == "SIGHUP"
        assert cancel.reason == "the terminal hung up (SIGHUP)"
