"""Build progress on stderr: one line per step with the elapsed time, ``[ 12s] step``.

Long commands (debootstrap) are streamed: their output is read line by line
and a short summary is printed now and then, so a build never looks stuck.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TextIO

from vcluster.errors import CommandError
from vcluster.run import StrPath, spawn


class Progress:
    """Prints steps with the time since the build started."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def step(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():4.0f}s] {message}", file=self.stream, flush=True)


def run_streaming(argv: Sequence[StrPath], progress: Progress, label: str, *,
                  summarize: Callable[[str], str | None] | None = None,
                  every: float = 5.0) -> None:
    """Run ``argv``, printing ``label: <summary>`` at most every ``every`` seconds.

    ``summarize`` turns an output line into a summary (None: not interesting).
    On failure a CommandError carries the last lines of output.
    """
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=20)
    last_shown = time.monotonic()
    pending: str | None = None
    with proc:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            summary = summarize(line) if summarize else line
            if summary:
                pending = summary
            if pending and time.monotonic() - last_shown >= every:
                progress.step(f"{label}: {pending}")
                pending = None
                last_shown = time.monotonic()
        rc = proc.wait()
    if rc != 0:
        args = [str(a) for a in argv]
        last = next((t for t in reversed(tail) if t.strip()), "")
        raise CommandError(args, f"{label} failed with exit status {rc}: {last}", "\n".join(tail))
