"""What the agent does for each request, and who may ask for it.

``vm-resources`` is for a process of the job on this host (``prove_member``);
``vnis`` for the job's user anywhere, the login node included
(``prove_owner``: the launcher runs inside salloc, outside the job's tasks);
``credentials`` for any local user; the rest for root.
"""

from __future__ import annotations

import socket

from vcluster.agent import protocol as p
from vcluster.agent import vnis
from vcluster.agent.credentials import Issuer
from vcluster.agent.jobs import Jobs
from vcluster.agent.peer import (
    STARTING_STATES,
    Peer,
    SlurmQueries,
    prove_member,
    prove_owner,
    require_root,
)
from vcluster.agent.registration import Registration, StoreLink
from vcluster.errors import StoreError
from vcluster.store.base import Store

Handled = tuple[p.Answer, list[int]]  # the answer and the file descriptors sent with it


class Agent:
    """The request handlers of one agent (the server calls ``handle`` per request).

    A handler raises AgentError for what it refuses, or any VclusterError
    (ResourceError, StoreError, ...) for what it could not do; the server
    turns either into the wire's refusal.
    """

    def __init__(self, jobs: Jobs, slurm: SlurmQueries, link: StoreLink,
                 registration: Registration | None = None) -> None:
        self.jobs = jobs
        self.slurm = slurm
        self.link = link
        self.registration = registration
        self.issuer = Issuer(link.config)
        self.hostname = socket.gethostname()

    def handle(self, request: p.Request, peer: Peer) -> Handled:
        if isinstance(request, p.Ping):
            return p.PingAnswer(version=p.VERSION, host=self.hostname), []
        if isinstance(request, p.VmResources):
            info = prove_member(self.slurm, peer, request.job, self.jobs.settings.node)
            tunneled = any(net.vni is not None for net in request.networks)
            hosts = self.slurm.hostnames(info.nodes) if tunneled else []
            return self.jobs.vm_resources(request, info, peer.gid, hosts)
        if isinstance(request, p.Vnis):
            return self._vnis(request, peer), []
        if isinstance(request, p.Credentials):
            return self.issuer.issue(self._store(), peer.uid), []
        if isinstance(request, p.Prolog):
            require_root(peer, "prolog")
            known = self.slurm.job(request.job)
            if known is None:
                raise p.failed(f"job {request.job} is not known to SLURM")
            return self.jobs.prolog(known), []
        if isinstance(request, p.Release):
            require_root(peer, "release")
            return self.jobs.release(request.job, request.user), []
        if isinstance(request, p.Status):
            require_root(peer, "status")
            registered = self.registration is not None and self.registration.registered.is_set()
            return p.StatusAnswer(host=self.hostname, node=self.jobs.settings.node,
                                  registered=registered, jobs=self.jobs.status()), []
        raise p.bad_request(f"unknown request {request!r}")

    def _store(self) -> Store:
        try:
            return self.link.get()
        except StoreError as e:
            raise StoreError(f"the store cannot be reached: {e}") from e

    def _vnis(self, request: p.Vnis, peer: Peer) -> p.VnisAnswer:
        """The job's VXLAN ids, taken if need be; dropped again if the job ended meanwhile."""
        info = prove_owner(self.slurm, peer, request.job)
        store = self._store()
        taken = vnis.take_all(store, self.link.keys, self.jobs.policy, info.job, info.user,
                              request.networks)
        after = self.slurm.job(request.job)
        if after is None or after.state not in STARTING_STATES:
            # Its epilogs may have run already: nobody else would release these.
            vnis.release(store, self.link.keys, request.job)
            raise p.denied(f"job {request.job} ended while its VXLAN ids were being taken")
        return p.VnisAnswer(vnis=taken)
