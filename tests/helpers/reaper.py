"""Run a daemon as a child subreaper's child: ``python3 reaper.py PROGRAM [ARG...]``.

libvirtd double-forks its QEMUs and dnsmasq. Their new parent is the
nearest subreaper above libvirtd. In the test session that is pytest: the
sandbox's fixture makes it one, and it does not reap them. A QEMU that
libvirt killed then stays a zombie, and libvirt's kill(pid, 0) still finds
it. Each destroy waits out its 15 s SIGTERM/SIGKILL loop, and one remove
of three VMs took over 240 s in CI.

This process is the subreaper instead: it reaps every orphan at once. It
passes SIGTERM and SIGINT on to PROGRAM and exits with PROGRAM's status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # no child left at all
            return child.returncode or 0
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
