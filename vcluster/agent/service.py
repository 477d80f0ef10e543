"""What the agent does for each request, and who may ask for it."""

from __future__ import annotations

import socket

from vcluster.agent import protocol as p
from vcluster.agent.credentials import Issuer
from vcluster.agent.jobs import Jobs
from vcluster.agent.peer import Peer, SlurmQueries, prove_member, require_root
from vcluster.agent.registration import Registration, StoreLink
from vcluster.errors import StoreError

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
            return self.jobs.vm_resources(request, info, peer.gid)
        if isinstance(request, p.Credentials):
            try:
                store = self.link.get()
            except StoreError as e:
                raise StoreError(f"the store cannot be reached: {e}") from e
            return self.issuer.issue(store, peer.uid), []
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
