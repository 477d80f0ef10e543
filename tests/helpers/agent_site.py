"""An agent's host for tests, without root: a site policy, fake devices and SLURM, a MemoryStore.

``AgentHost`` builds ``Jobs`` exactly as ``vcluster-agent serve`` does, but
over a temporary layout, ``FakeDevices``, ``FakeFirewall``, ``FakeSlurm`` and
a ``MemoryStore`` behind a switchable opener; the job belongs to the test's
own uid, so chown and the ownership checks work as a normal user.
``tunnel_hosts`` makes several such hosts on one store, registered, each with
an underlay ``eth0``, for networks that span hosts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.agent_fakes import FakeDevices, FakeFirewall, FakeSlurm, Opener
from vcluster.agent import vnis
from vcluster.agent.jobs import Jobs, Settings
from vcluster.agent.peer import JobInfo
from vcluster.agent.policy import load_policy
from vcluster.agent.registration import StoreLink
from vcluster.agent.server import AgentServer
from vcluster.agent.service import Agent
from vcluster.config.batch import StoreConfig
from vcluster.hostpaths import HostLayout
from vcluster.store.keys import Keys
from vcluster.store.memory import MemoryStore
from vcluster.store.records import HostRecord, to_json

NODE = "unit"
PREFIX = "/vcluster"


def write_site(directory: Path, max_size: str = "64M") -> Path:
    """A site policy: private networks cluster (MTU 1450) and data (9000), a nat one."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "networks.yaml").write_text(
        "cluster:\n  type: private\n  subnet: 10.200.0.0/16\n  mtu: 1450\n"
        "data:\n  type: private\n  subnet: 10.201.0.0/16\n  mtu: 9000\n"
        "nat:\n  type: nat\n  subnet: 10.250.0.0/24\n")
    (directory / "resources.yaml").write_text(
        "small:\n  networks: [cluster]\n  fam:\n    max-size: 16M\n    default-size: 16M\n"
        f"big:\n  networks: [cluster, data]\n  fam:\n    max-size: {max_size}\n"
        "    default-size: 16M\n")
    return directory


def me() -> str:
    """The test's own user name (the jobs' user)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


@dataclass
class AgentHost:
    """One host's agent state in ``root`` (a tmp_path)."""

    root: Path
    devices: FakeDevices = field(default_factory=FakeDevices)
    slurm: FakeSlurm = field(default_factory=FakeSlurm)
    store: MemoryStore = field(default_factory=MemoryStore)
    firewall: FakeFirewall = field(default_factory=FakeFirewall)
    node: str = NODE
    networks: str | None = None  # networks.yaml instead of write_site's

    def __post_init__(self) -> None:
        self.names: dict[str, str] = {}  # host name: IPv4 address, for ``resolve``
        self.layout = HostLayout(state=self.root / "state", run=self.root / "run")
        self.opener = Opener(self.store)
        self.keys = Keys(PREFIX)
        site = write_site(self.root / "conf")
        if self.networks is not None:
            (site / "networks.yaml").write_text(self.networks)
        self.policy = load_policy(site)
        self.jobs = self.restart()

    def restart(self) -> Jobs:
        """A new agent on this host: nothing in memory, the same devices, files and store."""
        link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",), prefix=PREFIX),
                         opener=self.opener)
        self.jobs = Jobs(Settings(node=self.node, layout=self.layout), link, self.policy,
                         self.devices, self.firewall, resolve=self.resolve)
        return self.jobs

    def resolve(self, name: str) -> str | None:
        """Names resolve to what ``names`` says (IPv4 literals to themselves)."""
        if name.replace(".", "").isdigit():
            return name
        return self.names.get(name)

    def job(self, job: str, tasks: int = 4, user: str | None = None,
            nodes: str | None = None) -> JobInfo:
        """A running job of the test's own user, known to the fake SLURM."""
        info = JobInfo(job=job, uid=os.getuid(), user=user or me(), state="RUNNING",
                       nodes=nodes or self.node, tasks=tasks)
        self.slurm.run(info)
        return info

    def keys_under(self, prefix: str) -> list[str]:
        return [e.key for e in self.store.get_prefix(prefix)]


ADDRESSES = {"h1": "10.199.0.11", "h2": "10.199.0.12", "h3": "10.199.0.13"}


def tunnel_site(vni_range: str = "4096-65535", mtu: int = 1450, underlay: str = "") -> str:
    """networks.yaml: cluster (line 1; its vni-range on line 5), data, nat."""
    return (f"cluster:\n  type: private\n  subnet: 10.200.0.0/16\n  mtu: {mtu}\n"
            f"  vni-range: {vni_range}\n{underlay}"
            "data:\n  type: private\n  subnet: 10.201.0.0/16\n  mtu: 9000\n"
            "  vni-range: 5000-5999\n  vxlan-port: 4790\n"
            "nat:\n  type: nat\n  subnet: 10.250.0.0/24\n")


def tunnel_hosts(tmp_path: Path, names: tuple[str, ...] = ("h1", "h2"), underlay_mtu: int = 1550,
          networks: str | None = None, register: bool = True) -> dict[str, AgentHost]:
    """Agents of ``names`` on one store, each registered with its eth0 address."""
    store = MemoryStore()
    out: dict[str, AgentHost] = {}
    for name in names:
        host = AgentHost(tmp_path / name, store=store, node=name,
                         networks=networks or tunnel_site())
        host.devices.add_interface("eth0", underlay_mtu, ADDRESSES[name])
        if register:
            record = HostRecord(name=name, address=ADDRESSES[name], version="test", since=1.0)
            store.put(host.keys.host(name), to_json(record))
        out[name] = host
    return out


def job_on(all_hosts: dict[str, AgentHost], job: str, tasks: int = 2) -> JobInfo:
    """A job holding every host of ``all_hosts``, known to each one's SLURM."""
    nodes = ",".join(all_hosts)
    infos = [h.job(job, tasks=tasks, nodes=nodes) for h in all_hosts.values()]
    return infos[0]


def take_vnis(host: AgentHost, job: str, *networks: str) -> dict[str, int]:
    """The job's VXLAN ids of ``networks``, as the ``vnis`` request takes them."""
    store = host.jobs.link.get()
    return vnis.take_all(store, host.keys, host.policy, job, me(), networks)



@contextlib.contextmanager
def served(host: AgentHost, max_connections: int = 1, max_per_uid: int = 1,
           root_reserve: int = 1) -> Iterator[AgentServer]:
    """A real agent server for ``host`` on its layout's socket, in a thread of the test."""
    agent = Agent(host.jobs, host.slurm, host.jobs.link)
    server = AgentServer(host.layout.agent_socket, agent, max_connections=max_connections,
                         max_per_uid=max_per_uid, root_reserve=root_reserve)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
