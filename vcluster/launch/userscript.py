"""A batch job's script, once its cluster is ready: on the job's first host, or in vm0.

On the host the script is a private file of the launcher's temporary
directory, run with its arguments in a process group of its own (so that
stopping reaches everything it started), its stdin closed and its output
the job's.  In vm0 (``-b``) it is handed to the guest agent as the stdin of
a small shell that saves it, runs it and removes it (``launch.vmexec``):
its output comes into the job's output when it ends.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vcluster.execwire import NO_GUEST_AGENT
from vcluster.launch.launcher import BatchScript
from vcluster.launch.vmexec import VmCommand, run_in_vms
from vcluster.run import spawn

# In the guest: save stdin as $1, run it with the other arguments, remove it, pass on its status.
SAVE_AND_RUN = 'f=$1; shift; umask 077; cat > "$f" && chmod 700 "$f" && "$f" "$@"; s=$?; ' \
               'rm -f "$f"; exit $s'


def run_host_script(script: BatchScript, env: dict[str, str], tmp: Path) -> subprocess.Popen[bytes]:
    """Start the script on this host (the caller waits for it)."""
    path = tmp / "script"
    path.write_text(script.text)
    path.chmod(0o700)
    return spawn([path, *script.args], env=env, stdin=subprocess.DEVNULL, stdout=None,
                 stderr=None, process_group=0)


def vm_script_argv(job: str, script: BatchScript) -> tuple[str, ...]:
    return ("/bin/sh", "-c", SAVE_AND_RUN, "sh", f"/tmp/vcluster-batch-{job}", *script.args)


def run_vm_script(job: str, host: str, script: BatchScript, template: str, *,
                  cancelled: Callable[[], bool], out: TextIO, local: bool = False) -> int:
    """Run the script in vm0 (on ``host``) and wait for it; its exit status."""
    command = VmCommand(job, {host: [0]}, vm_script_argv(job, script),
                        stdin=script.text.encode(), local=local)
    statuses = run_in_vms(command, cancelled)
    status = statuses.get(0)
    if status is None:
        out.write(f"vcluster: job {job}: error: vm0: no answer from its host {host} (see the "
                  "lines above)\n")
        return 1
    if status == NO_GUEST_AGENT:
        out.write(f"vcluster: job {job}: error: vm0: its guest agent did not answer: does the "
                  f"image of template {template!r} run qemu-guest-agent?\n")
        return 1
    return status
