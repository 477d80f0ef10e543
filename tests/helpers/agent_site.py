"""An agent's host for tests, without root: a site policy, fake devices and SLURM, a MemoryStore.

``AgentHost`` builds ``Jobs`` exactly as ``vcluster-agent serve`` does, but
over a temporary layout, ``FakeDevices``, ``FakeSlurm`` and a
``MemoryStore`` behind a switchable opener; the job belongs to the test's
own uid, so chown and the ownership checks work as a normal user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.agent_fakes import FakeDevices, FakeSlurm, Opener
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

    def __post_init__(self) -> None:
        self.layout = HostLayout(state=self.root / "state", run=self.root / "run")
        self.opener = Opener(self.store)
        self.keys = Keys(PREFIX)
        self.policy = load_policy(write_site(self.root / "conf"))
        self.jobs = self.restart()

    def restart(self) -> Jobs:
        """A new agent on this host: nothing in memory, the same devices, files and store."""
        link = StoreLink(StoreConfig(endpoints=("http://127.0.0.1:9",), prefix=PREFIX),
                         opener=self.opener)
        self.jobs = Jobs(Settings(node=NODE, layout=self.layout), link, self.policy,
                         self.devices)
        return self.jobs

    def job(self, job: str, tasks: int = 4, user: str | None = None) -> JobInfo:
        """A running job of the test's own user, known to the fake SLURM."""
        info = JobInfo(job=job, uid=os.getuid(), user=user or me(), state="RUNNING",
                       nodes=NODE, tasks=tasks)
        self.slurm.run(info)
        return info

    def keys_under(self, prefix: str) -> list[str]:
        return [e.key for e in self.store.get_prefix(prefix)]


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
