"""Open N connections to the agent and send nothing: ``agent_hold.py SOCKET N``.

Prints two JSON lines: how many were told "busy" at once (and the first such
answer), then, once the agent cut the others off or 40 s passed, how many got
an answer (and one of them) and how many are left.  Run as a plain user with
the system's python3 (``JobTool.idle_clients``).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import Any


def hold(path: str, count: int) -> None:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        socks.append(s)
    time.sleep(1.0)
    ready, _, _ = select.select(socks, [], [], 0)
    busy = [json.loads(s.recv(4096)) for s in ready]
    print(json.dumps({"busy": len(busy), "first": busy[0] if busy else None}), flush=True)
    rest = [s for s in socks if s not in ready]
    answers: list[Any] = []
    deadline = time.monotonic() + 40
    while rest and time.monotonic() < deadline:
        got, _, _ = select.select(rest, [], [], 1)
        for s in got:
            answers.append(json.loads(s.recv(4096)))
            rest.remove(s)
    print(json.dumps({"answered": len(answers), "sample": answers[0] if answers else None,
                      "left": len(rest)}), flush=True)


if __name__ == "__main__":
    hold(sys.argv[1], int(sys.argv[2]))
