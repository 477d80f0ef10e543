"""Run a shell command in a guest through its qemu-guest-agent socket; print its output.

``qga_exec.py SOCKET COMMAND``: exits with the command's status.  Stdlib only: the
test users run it with the system's Python, from a directory they can read.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import time
from typing import IO, Any


def call(stream: IO[str], execute: str, **arguments: Any) -> dict[str, Any]:
    stream.write(json.dumps({"execute": execute, "arguments": arguments}) + "\n")
    stream.flush()
    while True:
        answer: dict[str, Any] = json.loads(stream.readline())
        if "return" in answer or "error" in answer:
            return answer


def main(path: str, command: str) -> int:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(path)
    stream = sock.makefile("rw")
    call(stream, "guest-sync", id=4242)
    pid = call(stream, "guest-exec", path="/bin/sh", arg=["-c", command],
               **{"capture-output": True})["return"]["pid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = call(stream, "guest-exec-status", pid=pid)["return"]
        if status["exited"]:
            sys.stdout.write(base64.b64decode(status.get("out-data", "")).decode())
            return int(status.get("exitcode", 0))
        time.sleep(0.1)
    print("the command did not finish in 30 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
