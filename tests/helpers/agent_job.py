"""Ask the local agent as a SLURM task would, and print what came: ``agent_job.py SOCKET JOB PLAN``.

The sandbox tests run it as the job's user with the system's python3, from a
directory every user can read that holds this file and the part of vcluster
the agent's client needs (``tests/support_agent.job_tool`` copies both), so
``vcluster`` below is that copy.  PLAN is a JSON list of steps:

- ``{"vm": I, "networks": [{name, type, mtu, vni}], "fam": {name, size} |
  null, "keep": bool}``: vm-resources through the client (``keep``: hold the
  taps open until the end);
- ``{"op": "ping" | "credentials" | "status" | "prolog" | "release", "job":
  J, "user": U}``: that call of the client; ``{"op": "vnis", "networks":
  [...]}``: the job's VXLAN ids (JOB of the command line);
- ``{"raw": {...}}``: the object sent as it is, for requests the client
  would never build.

Prints one JSON list, an item per step: the answer as the codec writes it,
or ``{"error": MESSAGE, "code": CODE}``.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
import sys
from typing import Any

from vcluster import codec
from vcluster.agent.client import AgentClient, AgentError, VmDevices
from vcluster.agent.protocol import MAX_MESSAGE, FamSpec, NetworkSpec

TUNGETIFF = 0x800454D2


def tap_of(fd: int) -> tuple[str, int]:
    raw = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    name, flags = struct.unpack_from("16sH", raw)
    return bytes(name).rstrip(b"\0").decode(), int(flags)


def fam_check(path: str, size: int) -> bool:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        m[0:6] = b"marker"
        return bytes(m[0:6]) == b"marker"


def raw(path: str, message: dict[str, Any]) -> Any:
    """The agent's reply to ``message``: its answer, or its refusal as an error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = sock.makefile("rb").readline(MAX_MESSAGE)
    data = json.loads(reply)
    if data.get("ok") is True:
        return data["answer"]
    return {"error": data["error"], "code": data["code"]}


def described(dev: VmDevices) -> dict[str, Any]:
    taps = []
    for t in dev.taps:
        name, flags = tap_of(t.fd)
        taps.append({"network": t.network, "ifname": t.ifname, "fd_ifname": name,
                     "flags": flags})
    fam = None
    if dev.fam is not None:
        fam = {"path": str(dev.fam.path), "size": dev.fam.size,
               "mapped": fam_check(str(dev.fam.path), dev.fam.size)}
    return {"taps": taps, "fam": fam, "workdir": str(dev.workdir), "pid": os.getpid()}


def call(client: AgentClient, step: dict[str, Any], job: str) -> object:
    op = step["op"]
    if op == "vnis":
        return client.vnis(job, step["networks"])
    if op == "ping":
        return client.ping()
    if op == "credentials":
        return client.credentials()
    if op == "status":
        return client.status()
    if op == "prolog":
        return client.prolog(step["job"])
    if op == "release":
        return client.release(step["job"], step.get("user"))
    raise SystemExit(f"agent_job.py: unknown op {op!r}")


def main(socket_path: str, job: str, plan: list[dict[str, Any]]) -> None:
    client = AgentClient(socket_path)
    results: list[Any] = []
    held: list[VmDevices] = []
    for step in plan:
        try:
            if "raw" in step:
                results.append(raw(socket_path, step["raw"]))
                continue
            if "op" in step:
                answer = call(client, step, job)
                results.append(answer if isinstance(answer, dict) else codec.to_data(answer))
                continue
            networks = [codec.from_data(NetworkSpec, n) for n in step["networks"]]
            fam = None if step.get("fam") is None else codec.from_data(FamSpec, step["fam"])
            dev = client.vm_resources(job, step["vm"], networks, fam)
        except AgentError as e:
            results.append({"error": str(e), "code": str(e.code)})
            continue
        results.append(described(dev))
        if step.get("keep"):
            held.append(dev)
        else:
            dev.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
