"""QEMU as the runner's child: started deaf to the step's stop signals, ended in three steps.

``start_qemu`` starts it with SIGTERM, SIGINT and SIGHUP blocked (SLURM
signals every process of a cancelled step; the runner powers the guest down
instead) and under ``setpriv --pdeathsig KILL``, so a runner killed outright
takes its QEMU with it.  ``shutdown`` ends it: the ACPI power button with a
bounded wait, then QMP ``quit``, then SIGKILL (``run.stop``: QEMU ignores the
blocked SIGTERM, so no signal comes before the kill).  ``exit_reason`` is the
one line the runner publishes when QEMU ended on its own.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Protocol

from vcluster.cancel import STOP_SIGNALS
from vcluster.errors import VmError
from vcluster.hostpaths import VmFiles
from vcluster.qemu import VmSpec, build_argv, show_argv
from vcluster.run import Ending, spawn, stop
from vcluster.vm.control import Qmp, QmpError

log = logging.getLogger(__name__)

QUIT_TIMEOUT = 5.0  # seconds QEMU gets to exit after QMP quit


class QemuStarter(Protocol):
    """Starts the QEMU of ``spec``, its stderr going to ``files.qemu_stderr``."""

    def __call__(self, spec: VmSpec, files: VmFiles) -> subprocess.Popen[bytes]: ...


def start_qemu(spec: VmSpec, files: VmFiles) -> subprocess.Popen[bytes]:
    """QEMU as our child, deaf to the step's stop signals, killed if we die.

    ``setpriv`` (util-linux) is what keeps a QEMU from outliving a runner
    killed with SIGKILL, so it is not optional.
    """
    if shutil.which("setpriv") is None:
        raise VmError("setpriv not found (install util-linux): without it QEMU could "
                      "outlive its runner")
    argv = build_argv(spec)
    log.info("%s: %s", spec.name, show_argv(argv))
    prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
    # The child inherits the mask; the runner's own handlers see the signals again after.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with open(files.qemu_stderr, "wb") as err:
            return spawn(prefix + argv, stderr=err, pass_fds=spec.pass_fds())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_reason(proc: subprocess.Popen[bytes], stderr: Path, when: str = "") -> str:
    """Why QEMU ended, with the last line it wrote to stderr."""
    code = proc.returncode
    try:
        lines = stderr.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    detail = f": {lines[-1].strip()}" if lines else ""
    if code is not None and code < 0:
        what = f"QEMU was killed by {signal.Signals(-code).name}"
    else:
        what = f"QEMU exited with status {code}"
    return f"{what}{when}{detail}"


def shutdown(proc: subprocess.Popen[bytes], qmp: Qmp, name: str,
             power_down: float | None = None) -> str:
    """End QEMU and say how: with ``power_down`` seconds for the guest to power off
    first (None: no power-down, the guest was not up), then QMP quit, then SIGKILL."""
    if proc.poll() is not None:
        return "QEMU was not running"
    if power_down is not None and qmp.connected:
        try:
            qmp.powerdown()
            proc.wait(timeout=power_down)
            return "the guest powered off"
        except QmpError as e:
            log.warning("%s: power-down failed: %s", name, e)
        except subprocess.TimeoutExpired:
            log.info("%s: the guest did not power off within %g s", name, power_down)
    asked = qmp.connected
    if asked:
        qmp.quit()
    ending = stop(proc, QUIT_TIMEOUT if asked else 0.0, signum=None)
    return "QEMU killed" if ending is Ending.KILLED else "QEMU quit"
