"""The store's key layout (DESIGN.md), built in one place.

Everything lives under one configurable prefix (``store.prefix``, default
``/vcluster``)::

    <prefix>/hosts/<host>                              agent registration (lease)
    <prefix>/pools/vni/<id>                            VniHolder (compare-and-swap)
    <prefix>/pools/nat/<network>/<host>/<block>        NatHolder: a job's block of a nat subnet
    <prefix>/pools/ssh-ports/<host>/<port>             PortHolder: a host port forwarded to a VM
    <prefix>/jobs/<jobid>/owner                        JobOwner
    <prefix>/jobs/<jobid>/hosts/<host>/setup           HostSetup
    <prefix>/jobs/<jobid>/vni/<network>                the VXLAN id of the job's network
    <prefix>/users/<user>/clusters/<jobid>/spec        the resolved cluster definition
    <prefix>/users/<user>/clusters/<jobid>/vms/<i>     VmRecord
    <prefix>/users/<user>/clusters/<jobid>/keys/<name> per-cluster ssh key pair
    <prefix>/local/next-job                            the local backend's next job id
    <prefix>/local/jobs/<jobid>                        LocalJob: a local launcher and its VMs

Methods named ``*_prefix`` return a prefix ending in ``/``, ready for
``get_prefix``/``watch_prefix`` and for etcd role permissions: the slash keeps
user ``al`` from covering ``alice``.  Every name that goes into a key is
checked (no ``/``, no whitespace or control characters, not ``.``/``..``), so
a hostile job name cannot climb into another user's prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vcluster.errors import InputError

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=:-]*$")
VNI_MAX = (1 << 24) - 1


def check_component(what: str, name: str) -> str:
    """Return ``name`` if it can be one component of a key, else raise InputError."""
    if not _COMPONENT_RE.match(name) or len(name) > 255:
        raise InputError(
            f"{what} {name!r} cannot be part of a store key "
            "(expected letters, digits and . _ @ + = : -, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Keys:
    """Key builders under one prefix, such as ``Keys("/vcluster")``."""

    prefix: str = "/vcluster"

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise InputError(f"store prefix {self.prefix!r}: expected a prefix starting "
                             "with / and not ending with /, such as /vcluster")

    # hosts
    def hosts_prefix(self) -> str:
        return f"{self.prefix}/hosts/"

    def host(self, host: str) -> str:
        return self.hosts_prefix() + check_component("host name", host)

    # pools
    def vni_pool_prefix(self) -> str:
        return f"{self.prefix}/pools/vni/"

    def vni(self, vni: int) -> str:
        if isinstance(vni, bool) or not 1 <= vni <= VNI_MAX:
            raise InputError(f"VXLAN id {vni!r} is out of range (expected 1 to {VNI_MAX})")
        return f"{self.vni_pool_prefix()}{vni}"

    def nat_pool_prefix(self, network: str, host: str) -> str:
        """The blocks of nat network ``network`` given out on ``host`` (keys: first address)."""
        return (f"{self.prefix}/pools/nat/{check_component('network name', network)}/"
                f"{check_component('host name', host)}/")

    def nat_block(self, network: str, host: str, block: str) -> str:
        return self.nat_pool_prefix(network, host) + check_component("address", block)

    def port_pool_prefix(self, host: str) -> str:
        """The ports of ``host`` forwarded to VMs' ssh ports (keys: the port)."""
        return f"{self.prefix}/pools/ssh-ports/{check_component('host name', host)}/"

    def port(self, host: str, port: int) -> str:
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise InputError(f"port {port!r} is out of range (expected 1 to 65535)")
        return f"{self.port_pool_prefix(host)}{port}"

    # jobs (written by agents)
    def job_prefix(self, jobid: str) -> str:
        return f"{self.prefix}/jobs/{check_component('job id', jobid)}/"

    def job_owner(self, jobid: str) -> str:
        return self.job_prefix(jobid) + "owner"

    def job_hosts_prefix(self, jobid: str) -> str:
        return self.job_prefix(jobid) + "hosts/"

    def job_host_setup(self, jobid: str, host: str) -> str:
        return f"{self.job_hosts_prefix(jobid)}{check_component('host name', host)}/setup"

    def job_vnis_prefix(self, jobid: str) -> str:
        return self.job_prefix(jobid) + "vni/"

    def job_vni(self, jobid: str, network: str) -> str:
        """The VXLAN id the agents took for ``network`` of the job (its value: the id)."""
        return self.job_vnis_prefix(jobid) + check_component("network name", network)

    # the local backend's jobs (one machine, no SLURM)
    @property
    def local_next_job(self) -> str:
        return f"{self.prefix}/local/next-job"

    @property
    def local_jobs_prefix(self) -> str:
        return f"{self.prefix}/local/jobs/"

    def local_job(self, jobid: str) -> str:
        return self.local_jobs_prefix + check_component("job id", jobid)

    # users and their clusters (each user's etcd role covers user_prefix)
    def user_prefix(self, user: str) -> str:
        return f"{self.prefix}/users/{check_component('user name', user)}/"

    def clusters_prefix(self, user: str) -> str:
        return self.user_prefix(user) + "clusters/"

    def cluster_prefix(self, user: str, jobid: str) -> str:
        return f"{self.clusters_prefix(user)}{check_component('job id', jobid)}/"

    def cluster_spec(self, user: str, jobid: str) -> str:
        return self.cluster_prefix(user, jobid) + "spec"

    def vms_prefix(self, user: str, jobid: str) -> str:
        return self.cluster_prefix(user, jobid) + "vms/"

    def vm(self, user: str, jobid: str, index: int) -> str:
        if isinstance(index, bool) or index < 0:
            raise InputError(f"VM index {index!r} is not a number from 0 up")
        return f"{self.vms_prefix(user, jobid)}{index}"

    def cluster_keys_prefix(self, user: str, jobid: str) -> str:
        return self.cluster_prefix(user, jobid) + "keys/"

    def cluster_key(self, user: str, jobid: str, name: str) -> str:
        return self.cluster_keys_prefix(user, jobid) + check_component("key name", name)

    # reading keys back
    def last_component(self, key: str, under: str) -> str:
        """The name after ``under`` in ``key`` (``vms/3`` → ``3``), or InputError."""
        if not key.startswith(under) or "/" in key[len(under):] or key == under:
            raise InputError(f"store key {key!r} is not directly under {under!r}")
        return key[len(under):]

    def vm_index(self, key: str, user: str, jobid: str) -> int:
        """The VM index of a key built by ``vm``."""
        text = self.last_component(key, self.vms_prefix(user, jobid))
        if not text.isdigit():
            raise InputError(f"store key {key!r} does not end in a VM index")
        return int(text)

    def vni_of(self, key: str) -> int:
        """The VXLAN id of a key built by ``vni``."""
        text = self.last_component(key, self.vni_pool_prefix())
        if not text.isdigit():
            raise InputError(f"store key {key!r} does not end in a VXLAN id")
        return int(text)
