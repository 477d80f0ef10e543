"""Knowing a guest is up: its ready line on the serial console log.

QEMU appends everything the guest writes on ttyS0 to the console log,
whether or not anyone is attached.  A ``LogWatcher`` reads the new bytes of
that file on each ``poll`` and looks for the marker at the start of a word
boundary and followed by the end of a word, so ``vm1`` never matches the
ready line of ``vm10``.  The caller bounds the wait.
"""

from __future__ import annotations

import re
from pathlib import Path


class ReadyMatcher:
    """Finds ``marker`` in text fed in arbitrary pieces (lines may be split)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self._pattern = re.compile(re.escape(marker) + r"(?=\s|$)")
        self._partial = ""
        self.matched = False

    def feed(self, text: str) -> bool:
        """Add ``text``; whether the marker has been seen on a complete line."""
        if self.matched:
            return True
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if len(self._partial) > 64 * 1024:  # a guest that never ends a line
            self._partial = self._partial[-4096:]
        self.matched = any(self._pattern.search(line.rstrip("\r")) for line in lines)
        return self.matched


class LogWatcher:
    """Follows a growing log file, feeding a ReadyMatcher."""

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.matcher = ReadyMatcher(marker)
        self._offset = 0

    def skip_to_end(self) -> None:
        """Look only at what is appended from now on (a log kept across boots)."""
        try:
            self._offset = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = 0

    def poll(self) -> bool:
        """Read what was appended since the last poll; whether the guest is ready."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return False
        self._offset += len(data)
        return self.matcher.feed(data.decode("utf-8", errors="replace")) if data else \
            self.matcher.matched
