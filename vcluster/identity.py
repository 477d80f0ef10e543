"""Who the caller is, from the kernel (the uid), never from $USER or $LOGNAME.

The store's per-user prefix, the agent's credentials and SLURM all go by the
uid; a stale or forged ``USER`` must not send a launcher to another prefix.
"""

from __future__ import annotations

import os
import pwd
import socket

from vcluster.errors import VclusterError


def user_name(uid: int | None = None) -> str:
    """The login name of ``uid`` (default: the calling process's real uid)."""
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError as e:
        raise VclusterError(f"uid {uid} has no user name (not in the password database)") from e


def host_name() -> str:
    """This machine's short name (as SLURM names its nodes): the host name up to its first dot."""
    return socket.gethostname().split(".", 1)[0]
