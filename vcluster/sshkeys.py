"""ssh key pairs: the cluster's (made at launch, kept under the user's store prefix) and each
guest's host key (made by its runner, published with the VM's record)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from vcluster.run import run

PRIVATE = "id_ed25519"
PUBLIC = "id_ed25519.pub"


@dataclass(frozen=True)
class KeyPair:
    private: str  # OpenSSH format
    public: str  # one line: "ssh-ed25519 AAAA... comment"


def generate(comment: str) -> KeyPair:
    """A fresh ed25519 key pair (ssh-keygen, no passphrase: the VMs are throw-away)."""
    with tempfile.TemporaryDirectory(prefix="vcluster-key-") as tmp:
        path = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
        return KeyPair(path.read_text(), path.with_suffix(".pub").read_text().strip())
