"""Clusters that span hosts, in the sandbox, as real users: private networks tunneled
between hosts (VXLAN), FAM regions placed on one host, and failures that say where.

Each test boots tiny VMs with ``vcluster alloc`` and drives their shells through
their serial consoles as root (tests/support_console.py): pings, ARP and FAM
reads and writes happen inside the guests, so the tests check the sharing itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support_agent import (
    JobTool,
    store_value,
)
from tests.support_alloc import (
    BackgroundAlloc,
    Shared,
    alloc,
    background_alloc,
    module_users,
    nothing_left_anywhere,
    shared_dir,
    tool,
    touch,
    wait_flag,
)
from tests.support_console import GuestShell
from tests.support_images import require_image
from tests.support_sandbox import Sandbox, sandbox
from vcluster.cluster import mac_address

__all__ = ["sandbox", "tool"]  # the session's sandbox fixture, imported so that pytest finds it

pytestmark = [pytest.mark.slurm, pytest.mark.qemu, pytest.mark.images]

ALICE, BOB = "vcmh-alice", "vcmh-bob"
HOSTS = ("h1", "h2", "h3")

TEMPLATES = """\
tinysh:
  inherits: tiny
  disks: [{name: shared, size: 16M, shared: true}]
jumbo:
  inherits: tiny
  resource-set: jumbo
narrow:
  inherits: tiny
  resource-set: narrow
"""

# Site policy for this module, on every machine (restored afterwards): a network
# whose MTU the sandbox's 1550-byte links cannot carry, and one with a single VNI.
SITE_NETWORKS = """
jumbo:
  type: private
  subnet: 10.210.0.0/16
  mtu: 1600
narrow:
  type: private
  subnet: 10.211.0.0/16
  vni-range: 5000-5000
"""
SITE_RESOURCES = """
jumbo:
  networks: [jumbo]
narrow:
  networks: [narrow]
"""


users = module_users(ALICE, BOB)


@pytest.fixture(scope="module")
def site(sandbox: Sandbox) -> Iterator[None]:
    """The module's networks and resource sets in every machine's policy."""
    machines = ("ctl", *HOSTS)
    saved: dict[Path, str] = {}
    for machine in machines:
        for name, extra in (("networks.yaml", SITE_NETWORKS),
                            ("resources.yaml", SITE_RESOURCES)):
            path = sandbox.conf(machine) / name
            saved[path] = path.read_text()
            path.write_text(saved[path] + extra)
    try:
        for machine in machines:
            sandbox.restart_agent(machine)  # agents read their policy at start
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)
        for machine in machines:
            sandbox.restart_agent(machine)


@pytest.fixture(scope="module")
def shared(users: None, site: None) -> Iterator[Shared]:
    require_image("tiny")
    with shared_dir(TEMPLATES, {}) as made:
        yield made


def shells(tool: JobTool, job: str, count: int) -> list[GuestShell]:
    """The console shell of each VM of ``job``, found on whichever host runs it."""
    found: list[GuestShell] = []
    for index in range(count):
        where = [h for h in HOSTS if tool.layout(h).vm(job, index).console_socket.exists()]
        assert len(where) == 1, f"vm{index} of job {job} runs on {where}"
        found.append(GuestShell(f"vm{index}@{where[0]}", tool.layout(where[0]).vm(job, index)))
    return found


def host_of(shell: GuestShell) -> str:
    return shell.name.split("@", 1)[1]


def ping(shell: GuestShell, address: str, *options: str) -> None:
    """Ping until the first answer (ARP and the tunnel settle), then the real check."""
    shell.run(f"for _ in $(seq 20); do ping -c 1 -W 1 {address} >/dev/null && break; done")
    out = shell.check(f"ping -c 2 -W 2 {' '.join(options)} {address}")
    assert " 0% packet loss" in out, out


def arp_replies(shell: GuestShell, address: str) -> set[str]:
    """The MAC addresses answering ARP for ``address`` on eth0 (busybox arping)."""
    result = shell.run(f"arping -c 3 -w 4 -I eth0 {address}")
    return {m.lower() for m in re.findall(r"\[([0-9A-Fa-f:]{17})\]", result.output)}


def finish(running: BackgroundAlloc, shared: Shared, flag: str) -> None:
    touch(shared.flags / flag)
    assert running.finish(120) == 0, running.output


# ------------------------------------------------------------------ one VM per host


def test_one_vm_per_host_reach_each_other_across_hosts(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with background_alloc(sandbox, ALICE, shared.home, "-N3", "-c", "1", "-E",
                          wait_flag(shared, "spread"), "tiny:3") as running:
        job = running.wait_ready()
        vm0, vm1, vm2 = shells(tool, job, 3)
        assert sorted(host_of(s) for s in (vm0, vm1, vm2)) == list(HOSTS)

        # Across hosts both ways, and a full-size frame (1422 + 28 = the MTU, 1450) with
        # don't-fragment set; one byte more does not fit.
        ping(vm0, "10.200.0.2")
        ping(vm0, "10.200.0.3")
        ping(vm2, "10.200.0.1")
        ping(vm0, "10.200.0.2", "-M do -s 1422")
        ping(vm2, "10.200.0.1", "-M do -s 1422")
        too_big = vm0.run("ping -c 1 -W 2 -M do -s 1423 10.200.0.2")
        assert too_big.status != 0 and "mtu=1450" in too_big.output, too_big
        # The guests' MTU is the network's (a bigger one would be dropped at the bridge).
        for shell in (vm0, vm1, vm2):
            assert shell.check("cat /sys/class/net/eth0/mtu").endswith("1450")
        # TCP really flows across hosts: a two-second stream moves at least 1 MB (with
        # the guests at a larger MTU than the bridge's it moved a few hundred KB).
        vm1.check("iperf3 -s -D")
        stream = vm0.check("iperf3 -c 10.200.0.2 -t 2 -f m", timeout=60)
        sender = [line for line in stream.splitlines() if line.rstrip().endswith("sender")]
        moved = re.search(r"([0-9.]+) MBytes", sender[-1]) if sender else None
        assert moved is not None and float(moved.group(1)) >= 1.0, stream

        # vcluster ps -l shows each VM with its host and address.
        listing = sandbox.run(["env", f"VCLUSTER_HOME={shared.home}", "vcluster", "ps", "-l",
                               "-j", job], user=ALICE).stdout
        for shell, address in ((vm0, "10.200.0.1"), (vm1, "10.200.0.2"),
                               (vm2, "10.200.0.3")):
            vm = shell.name.split("@")[0]
            assert re.search(rf"^{vm}\s+{host_of(shell)}\s+ready\s+{re.escape(address)}\b",
                             listing, re.M), listing

        # Each host has the job's tunnel; an agent killed and restarted keeps it, and
        # the VMs still reach each other through it.
        before = {h: tool.job_links(h, job) for h in HOSTS}
        assert all(any(name.startswith("vcx") for name in links)
                   for links in before.values()), before
        sandbox.restart_agent(host_of(vm1))
        assert {h: tool.job_links(h, job) for h in HOSTS} == before
        ping(vm0, "10.200.0.2")
        ping(vm1, "10.200.0.3")
        for shell in (vm0, vm1, vm2):
            shell.close()
        finish(running, shared, "spread")
    nothing_left_anywhere(sandbox, tool, job, ALICE)


# ------------------------------------------------------------------ two users side by side


def test_two_users_clusters_on_the_same_hosts_are_apart(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    args = ("-N2", "-w", "h1,h2", "-c", "1", "-E")
    with background_alloc(sandbox, ALICE, shared.home, *args, wait_flag(shared, "a"),
                          "tiny:2") as a, \
         background_alloc(sandbox, BOB, shared.home, *args, wait_flag(shared, "b"),
                          "tiny:2") as b:
        job_a, job_b = a.wait_ready(), b.wait_ready()
        a0, a1 = shells(tool, job_a, 2)
        b0, b1 = shells(tool, job_b, 2)

        # Different tunnels and bridges on the same hosts.
        vnis = {store_value(sandbox, f"/vcluster/jobs/{job}/vni/cluster")
                for job in (job_a, job_b)}
        assert None not in vnis and len(vnis) == 2, vnis
        for host in ("h1", "h2"):
            links_a, links_b = set(tool.job_links(host, job_a)), set(tool.job_links(host, job_b))
            assert links_a and links_b and not links_a & links_b

        # Each cluster works: both have 10.200.0.1 and .2, each reaching its own.
        ping(a0, "10.200.0.2")
        ping(b0, "10.200.0.2")
        assert arp_replies(a0, "10.200.0.2") == {mac_address(job_a, 1, 0)}
        assert arp_replies(b0, "10.200.0.2") == {mac_address(job_b, 1, 0)}

        # An address only bob's vm1 has: alice's VMs neither ARP nor ping it; the same
        # probe towards alice's own vm1 succeeds, so the probe would see a leak.
        b1.check("ip addr add 10.200.9.9/16 dev eth0")
        a1.check("ip addr add 10.200.8.8/16 dev eth0")
        assert arp_replies(a0, "10.200.9.9") == set()
        assert a0.run("ping -c 2 -W 2 10.200.9.9").status != 0
        assert arp_replies(b0, "10.200.8.8") == set()
        assert arp_replies(a0, "10.200.8.8") == {mac_address(job_a, 1, 0)}
        ping(a0, "10.200.8.8")
        for shell in (a0, a1, b0, b1):
            shell.close()
        finish(a, shared, "a")
        finish(b, shared, "b")
    nothing_left_anywhere(sandbox, tool, job_a, ALICE)
    nothing_left_anywhere(sandbox, tool, job_b, BOB)


# ------------------------------------------------------------------ FAM placement


def two_slots_on_h1_and_h2(sandbox: Sandbox, shared: Shared, flag: str,
                           definition: str) -> contextlib.AbstractContextManager[BackgroundAlloc]:
    """Alice's cluster of ``definition`` over h1 and h2, two VMs' room on each, held until
    ``finish(running, shared, flag)``."""
    return background_alloc(sandbox, ALICE, shared.home, "-N2", "-w", "h1,h2", "-c", "1",
                            "--ntasks-per-node=2", "-E", wait_flag(shared, flag), definition)


def test_a_fam_pair_is_placed_together_and_shares(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with two_slots_on_h1_and_h2(sandbox, shared, "fam", "tiny-fam:2,tiny:2") as running:
        job = running.wait_ready()
        vms = shells(tool, job, 4)
        assert host_of(vms[0]) == host_of(vms[1]), [s.name for s in vms]
        assert {host_of(s) for s in vms} == {"h1", "h2"}, [s.name for s in vms]
        vms[0].check("fam write 0 0x51515151")
        assert vms[1].check("fam read 0").lower().endswith("0x51515151")
        # The FAM-less VMs on the other host are on the same network as the pair.
        ping(vms[2], "10.200.0.1")
        for shell in vms:
            shell.close()
        finish(running, shared, "fam")
    nothing_left_anywhere(sandbox, tool, job, ALICE)


def test_vms_sharing_a_disk_are_placed_together_and_write_one_image(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with two_slots_on_h1_and_h2(sandbox, shared, "disk", "tiny:1,tinysh:2") as running:
        job = running.wait_ready()
        vms = shells(tool, job, 3)
        assert host_of(vms[1]) == host_of(vms[2]), [s.name for s in vms]
        vms[1].check("printf written-by-vm1 | dd of=/dev/vda bs=512 seek=8 conv=fsync")
        read = vms[2].check("dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 14")
        assert read.endswith("written-by-vm1"), read
        work = tool.layout(host_of(vms[1])).work_dir(job)
        assert (work / "shared-shared.raw").stat().st_size == 16 << 20
        for shell in vms:
            shell.close()
        finish(running, shared, "disk")
    nothing_left_anywhere(sandbox, tool, job, ALICE)


def test_a_fam_group_that_fits_no_host_is_refused_before_booting(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    # Two tasks over two nodes: one CPU on each, and the pair needs two on one host.
    proc = alloc(sandbox, ALICE, shared.home, "-N2", "-c", "1", "-E", "true", "tiny-fam:2")
    assert proc.returncode != 0, proc.stderr
    assert re.search(r"FAM region 'fam' \(vm0, vm1.*fits on no host", proc.stderr), \
        proc.stderr
    assert "booting" not in proc.stderr and "preparing" not in proc.stderr, proc.stderr
    job = re.search(r"Granted job allocation (\d+)", proc.stderr)
    assert job is not None, proc.stderr
    nothing_left_anywhere(sandbox, tool, job.group(1), ALICE)


# ------------------------------------------------------------------ failures that say where


def test_a_network_a_host_cannot_build_fails_fast_naming_the_host(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    proc = alloc(sandbox, ALICE, shared.home, "-w", "h2", "-c", "1", "-E", "true", "jumbo:1",
                 timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"vm0 failed on h2: .*h2.*MTU 1550.*'jumbo'.*1600", proc.stderr), \
        proc.stderr
    job = re.search(r"Granted job allocation (\d+)", proc.stderr)
    assert job is not None, proc.stderr
    nothing_left_anywhere(sandbox, tool, job.group(1), ALICE)


def test_an_exhausted_vni_pool_is_one_line_and_starts_nothing(
        sandbox: Sandbox, shared: Shared, tool: JobTool) -> None:
    with background_alloc(sandbox, ALICE, shared.home, "-c", "1", "-E",
                          wait_flag(shared, "narrow"), "narrow:1") as holder:
        held = holder.wait_ready()
        proc = alloc(sandbox, BOB, shared.home, "-c", "1", "-E", "true", "narrow:1")
        assert proc.returncode == 1, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1, proc.stderr
        assert re.search(r"network 'narrow'.*vni-range 5000-5000.*1 cluster", errors[0]), \
            errors[0]
        assert held in errors[0], errors[0]
        assert "booting" not in proc.stderr, proc.stderr
        refused = re.search(r"Granted job allocation (\d+)", proc.stderr)
        assert refused is not None, proc.stderr
        nothing_left_anywhere(sandbox, tool, refused.group(1), BOB)
        # The holder's VNI is still its own.
        assert store_value(sandbox, f"/vcluster/jobs/{held}/vni/narrow") == "5000"
        finish(holder, shared, "narrow")
    nothing_left_anywhere(sandbox, tool, held, ALICE)
