"""ssh key pairs: the cluster's (made at launch, kept under the user's store prefix) and each
guest's host key (made by its runner, published with the VM's record)."""

from __future__ import annotations

import tempfile
import threading
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


class Background:
    """``generate(comment)`` in a thread of its own, started now: ssh-keygen runs while
    the caller goes on with its work (a launch makes its keys on its way to the VMs'
    boots); ``result`` waits for it.  Not a daemon thread: the interpreter waits for it
    at exit, so its temporary directory (a private key) is always removed."""

    def __init__(self, comment: str) -> None:
        self._pair: KeyPair | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._generate, args=(comment,),
                                        name="ssh-keygen")
        self._thread.start()

    def _generate(self, comment: str) -> None:
        try:
            self._pair = generate(comment)
        except Exception as e:  # handed to whoever takes the result
            self._error = e

    def result(self) -> KeyPair:
        """The key pair (or the error ssh-keygen ended with), once it is made."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._pair is not None  # set unless _error is
        return self._pair
