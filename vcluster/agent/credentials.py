"""etcd credentials for local users, so that the etcd root password never leaves root.

Unix user ``alice`` gets etcd user ``vc-alice`` with a role granting
read-write on ``<prefix>/users/alice/`` only.  The password is derived
(HMAC-SHA256) from the agent's own store password and the user name, so every
agent of the site hands out the same password without coordinating, and a
user's second request (another VM runner, another host) does not invalidate
the password the first one is using.  The first request per user in an
agent's lifetime (re)creates the user and role in etcd; later ones only
answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import pwd
import threading

from vcluster.agent.protocol import CredentialsAnswer
from vcluster.config.batch import StoreConfig
from vcluster.errors import CredentialsError, InputError, StoreError
from vcluster.store.base import Store
from vcluster.store.keys import Keys

ETCD_USER_PREFIX = "vc-"


def derive_password(secret: str, user: str) -> str:
    digest = hmac.new(secret.encode(), f"vcluster etcd user {user}".encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class Issuer:
    """Hands out per-user etcd credentials through a root store connection."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.keys = Keys(config.prefix)
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def issue(self, store: Store, uid: int) -> CredentialsAnswer:
        try:
            unix = pwd.getpwuid(uid).pw_name
        except KeyError:
            raise CredentialsError(f"uid {uid} has no user name on this host") from None
        try:
            prefix = self.keys.user_prefix(unix)
        except InputError as e:
            raise CredentialsError(f"user {unix!r}: {e}") from e
        secret = self.config.password()
        if not secret:
            raise CredentialsError("the agent's store has no password-file in batch.yaml, so "
                                   "it cannot issue etcd users (is etcd authentication "
                                   "enabled?)")
        user = ETCD_USER_PREFIX + unix
        password = derive_password(secret, user)
        with self._lock:
            if user not in self._done:
                add = getattr(store, "add_prefix_user", None)
                if add is None:
                    raise CredentialsError(f"the {self.config.backend} store cannot issue "
                                           "users")
                try:
                    add(user, password, prefix)
                except StoreError as e:
                    raise CredentialsError(f"cannot make etcd user {user}: {e}") from e
                self._done.add(user)
        ca = None
        if self.config.ca_cert is not None:
            try:
                ca = self.config.ca_cert.read_text()
            except OSError as e:
                raise CredentialsError(f"cannot read the store's CA certificate "
                                       f"{self.config.ca_cert}: {e.strerror}") from e
        return CredentialsAnswer(user=user, password=password, prefix=prefix,
                                 endpoints=tuple(self.config.endpoints), ca_cert=ca)
