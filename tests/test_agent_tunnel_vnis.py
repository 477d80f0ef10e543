"""VXLAN ids for private networks across hosts, without root: taken once, never twice, by whom.

The ``vnis`` request's allocation (``agent/vnis.py``) on a MemoryStore, with
threads racing for ids, the exhaustion message, the rules of who may ask,
and the protocol's new fields.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest

from tests.helpers.agent_site import PREFIX, me, take_vnis, tunnel_hosts, tunnel_site
from vcluster import codec
from vcluster.agent import vnis
from vcluster.agent.peer import JobInfo, Peer
from vcluster.agent.protocol import (
    AgentError,
    Code,
    NetworkSpec,
    VmResources,
    Vnis,
    VnisAnswer,
    parse,
)
from vcluster.agent.service import Agent
from vcluster.store.records import VniHolder, from_json

# ------------------------------------------------------------------ VXLAN ids


def test_vxlan_ids_are_taken_once_per_job_and_network(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",)).values()
    first = take_vnis(h1, "12", "cluster", "data")
    assert 4096 <= first["cluster"] <= 65535 and 5000 <= first["data"] <= 5999
    assert take_vnis(h1, "12", "data", "cluster") == first  # idempotent, in any order
    assert take_vnis(h1, "12", "cluster") == {"cluster": first["cluster"]}
    store, keys = h1.store, h1.keys
    for network, vni in first.items():
        held = store.get(keys.job_vni("12", network))
        assert held is not None and held.value == str(vni)
        pool = store.get(keys.vni(vni))
        assert pool is not None
        assert from_json(VniHolder, pool.value) == VniHolder(job="12", user=me(),
                                                             network=network)
        assert json.loads(pool.value) == {"job": "12", "user": me(), "network": network}
    other = take_vnis(h1, "13", "cluster")
    assert other["cluster"] != first["cluster"]
    # The store's layout, as the launcher's side and the release code know it.
    assert keys.job_vni("12", "cluster") == f"{PREFIX}/jobs/12/vni/cluster"
    assert keys.job_vnis_prefix("12") == f"{PREFIX}/jobs/12/vni/"


def test_racing_requests_get_one_id_per_job_and_never_one_twice(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",), networks=tunnel_site("4096-4159")).values()
    store, keys = h1.store, h1.keys
    jobs = [str(100 + i) for i in range(24)]
    got: dict[str, list[int]] = {job: [] for job in jobs}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2 * len(jobs))
    lock = threading.Lock()

    def ask(job: str) -> None:
        try:
            barrier.wait(10)
            # Every request starts at the same id: as many collisions as can be.
            vni = vnis.take(store, keys, job, me(), "cluster", (4096, 4159), "here",
                            rng=random.Random(0))
            with lock:
                got[job].append(vni)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert all(len(v) == 2 and v[0] == v[1] for v in got.values()), got  # one per job
    given = [v[0] for v in got.values()]
    assert len(set(given)) == len(jobs)  # none twice
    pool = {keys.vni_of(e.key): vnis.holder_job(e.value)
            for e in store.get_prefix(keys.vni_pool_prefix())}
    assert pool == {v[0]: job for job, v in got.items()}


def test_an_exhausted_range_says_which_and_who_holds_it(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",), networks=tunnel_site("4096-4097")).values()
    assert sorted(take_vnis(h1, "12", "cluster").values()) + \
        sorted(take_vnis(h1, "13", "cluster").values()) in ([4096, 4097], [4097, 4096])
    with pytest.raises(AgentError) as caught:
        take_vnis(h1, "14", "cluster")
    origin = f"{h1.root / 'conf' / 'networks.yaml'}:5"
    assert str(caught.value) == (
        f"network 'cluster': no free VXLAN id in vni-range 4096-4097 ({origin}): 2 clusters "
        "hold them (jobs 12, 13); try again when one ends, or widen the range")
    assert caught.value.code is Code.FAILED
    assert h1.keys_under(h1.keys.job_prefix("14")) == []  # nothing half-taken
    # One ends (its epilog): its id is free again.
    vnis.release(h1.store, h1.keys, "12")
    assert h1.keys_under(h1.keys.job_prefix("12")) == []
    assert take_vnis(h1, "14", "cluster")["cluster"] in (4096, 4097)
    # Held by one cluster: said in the singular.
    (h9,) = tunnel_hosts(tmp_path / "one", ("h1",), networks=tunnel_site("4096-4096")).values()
    take_vnis(h9, "7", "cluster")
    with pytest.raises(AgentError, match=r": 1 cluster holds them \(job 7\); try again"):
        take_vnis(h9, "8", "cluster")


def test_only_site_networks_that_span_hosts_have_ids(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",)).values()
    conf = h1.root / "conf" / "networks.yaml"
    with pytest.raises(AgentError) as unknown:
        take_vnis(h1, "12", "cluster", "evil")
    assert unknown.value.code is Code.DENIED
    assert str(unknown.value) == (f"networks[1]: network 'evil' is not defined in {conf} "
                                  "(networks there that span hosts: cluster, data)")
    with pytest.raises(AgentError, match=r"network 'nat' is a nat network .* which does not "
                                         "span hosts") as nat:
        take_vnis(h1, "12", "nat")
    assert nat.value.code is Code.DENIED
    assert h1.keys_under(f"{PREFIX}/pools/") == []  # nothing taken for a refused request


class EndingSlurm:
    """SLURM saying the job runs, then (from the ``ends_after``-th question) nothing."""

    def __init__(self, info: JobInfo, ends_after: int) -> None:
        self.node, self.info, self.ends_after, self.asked = "h1", info, ends_after, 0

    def job_of_pid(self, pid: int) -> str | None:
        return None

    def job(self, job: str) -> JobInfo | None:
        self.asked += 1
        return self.info if self.asked < self.ends_after else None

    def jobs_holding_node(self) -> set[str] | None:
        return set()

    def hostnames(self, nodelist: str) -> list[str]:
        return nodelist.split(",")


def test_who_may_ask_for_a_jobs_ids(tmp_path: Path) -> None:
    (h1,) = tunnel_hosts(tmp_path, ("h1",)).values()
    info = h1.job("12")
    agent = Agent(h1.jobs, h1.slurm, h1.jobs.link)
    me_peer = Peer(pid=4242, uid=os.getuid(), gid=os.getgid())  # in no job: the login node
    answer, fds = agent.handle(Vnis("12", ("cluster",)), me_peer)
    assert fds == [] and isinstance(answer, VnisAnswer)
    assert answer == VnisAnswer(vnis=take_vnis(h1, "12", "cluster"))
    root, stranger = Peer(1, 0, 0), Peer(1, os.getuid() + 1, 0)
    if os.getuid() != 0:
        assert agent.handle(Vnis("12", ("cluster",)), root)[0] == answer
        with pytest.raises(AgentError, match=f"job 12 belongs to uid {os.getuid()}, not "
                                             f"{os.getuid() + 1}") as e:
            agent.handle(Vnis("12", ("cluster",)), stranger)
        assert e.value.code is Code.DENIED
    with pytest.raises(AgentError, match="job 99 is not known to SLURM") as e:
        agent.handle(Vnis("99", ("cluster",)), me_peer)
    assert e.value.code is Code.DENIED
    h1.slurm.jobs["12"] = JobInfo("12", info.uid, info.user, "COMPLETING", "h1", 4)
    with pytest.raises(AgentError, match="job 12 is COMPLETING, not running") as e:
        agent.handle(Vnis("12", ("cluster",)), me_peer)
    assert e.value.code is Code.DENIED
    # A job that ends while its ids are taken: nothing is kept (its epilogs may be done).
    ending = Agent(h1.jobs, EndingSlurm(h1.job("13"), ends_after=2), h1.jobs.link)
    with pytest.raises(AgentError, match="job 13 ended while its VXLAN ids were being taken"):
        ending.handle(Vnis("13", ("cluster", "data")), me_peer)
    assert h1.keys_under(h1.keys.job_prefix("13")) == []
    assert [e.key for e in h1.store.get_prefix(h1.keys.vni_pool_prefix())
            if vnis.owned_by(e.value, "13")] == []


def test_the_protocol_carries_ids() -> None:
    spec = NetworkSpec("cluster", "private", vni=4100)
    request = VmResources("12", 0, (spec,))
    line = json.dumps({"version": 2, "op": "vm-resources", "job": "12", "vm": 0,
                       "networks": [{"name": "cluster", "type": "private", "vni": 4100}]})
    assert parse(line.encode()) == request
    assert parse(b'{"version":2,"op":"vnis","job":"12","networks":["cluster","data"]}') == \
        Vnis("12", ("cluster", "data"))
    for bad, said in ((b'{"version":2,"op":"vnis","job":"12","networks":["a","a"]}',
                       "a name appears twice"),
                      (b'{"version":2,"op":"vnis","job":"12","networks":["../x"]}',
                       "networks[0]: '../x' is not a name"),
                      (b'{"version":2,"op":"vnis","job":"x","networks":[]}',
                       "job: 'x' is not a SLURM job id"),
                      (b'{"version":2,"op":"vm-resources","job":"1","vm":0,"networks":'
                       b'[{"name":"c","type":"private","vni":16777216}]}',
                       "networks[0].vni: 16777216 is out of range (expected a VXLAN id, 1 "
                       "to 16777215)")):
        with pytest.raises(AgentError, match=said.replace("[", r"\[").replace("]", r"\]")
                           .replace("(", r"\(").replace(")", r"\)")) as e:
            parse(bad)
        assert e.value.code is Code.BAD_REQUEST
    answer = VnisAnswer(vnis={"cluster": 4100})
    assert codec.from_json(VnisAnswer, codec.to_json(answer)) == answer
