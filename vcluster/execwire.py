"""The status line that ends ``vcluster internal exec``'s output: written on the VMs' host,
read back by ``vcluster exec`` and the batch launcher through srun."""

from __future__ import annotations

import json

MARK = b"\x1evcluster-exec-status "  # starts the last stdout line: JSON {"vmN": status}
NO_GUEST_AGENT = -1  # a VM's status when its guest agent did not answer


def status_line(statuses: dict[str, int]) -> bytes:
    """The line ``vcluster internal exec`` prints last."""
    return MARK + json.dumps(statuses).encode() + b"\n"


def parse_status_line(line: bytes) -> dict[int, int] | None:
    """VM index -> exit status from a status line; None for any other line."""
    if not line.startswith(MARK):
        return None
    data = json.loads(line[len(MARK):])
    return {int(name.removeprefix("vm")): int(status) for name, status in data.items()}
