"""The live per-VM progress display of ``vcluster alloc``.

On a terminal, one line per VM is redrawn in place (state and time in that
state); elsewhere (logs, tests) a line is printed at each change.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vcluster.lifecycle import VmState
from vcluster.store.records import VmRecord


class ProgressView:
    def __init__(self, names: list[str], out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.names = names
        self.records: dict[int, VmRecord] = {}
        self.start = time.monotonic()
        self.entered = {i: time.monotonic() for i in range(len(names))}
        self.tty = self.out.isatty()
        self._drawn = 0

    def update(self, index: int, record: VmRecord) -> None:
        old = self.records.get(index)
        self.records[index] = record
        if old is None or old.state != record.state:
            self.entered[index] = time.monotonic()
            if not self.tty:
                host = f" on {record.host}" if record.host else ""
                self.out.write(f"vcluster: {self.names[index]}: {record.state.value}{host} "
                               f"({time.monotonic() - self.start:.1f} s)\n")
                self.out.flush()
        self.draw()

    def line(self, index: int) -> str:
        record = self.records.get(index)
        state = record.state.value if record else VmState.PENDING.value
        host = record.host if record and record.host else "-"
        spent = time.monotonic() - self.entered[index]
        return f"  {self.names[index]:<8} {state:<10} {host:<12} {spent:6.1f} s"

    def draw(self) -> None:
        """Redraw every VM's line (terminal only)."""
        if not self.tty:
            return
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F")
        for i in range(len(self.names)):
            self.out.write("\x1b[2K" + self.line(i) + "\n")
        self._drawn = len(self.names)
        self.out.flush()

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for i in range(len(self.names)):
            record = self.records.get(i)
            state = record.state.value if record else "pending"
            counts[state] = counts.get(state, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
