"""Boot the built images for real under QEMU TCG with seeds written by vcluster.seed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support_images import (
    FAM_A,
    FAM_B,
    SshTarget,
    TestVm,
    boot,
    free_loopback_port,
    guest_script,
    require_image,
    ssh_keygen,
    vm_factory,
)
from vcluster.qemu import Disk, SharedMemory, VmSpec
from vcluster.run import run
from vcluster.seed import (
    GuestSettings,
    HostEntry,
    Interface,
    merge_user_data,
    meta_data,
    network_config,
    required_config,
    write_seed,
)

pytestmark = [pytest.mark.qemu, pytest.mark.images]

TINY_TIMEOUT = 30.0
DEBIAN_TIMEOUT = 150.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, private paths: unix socket names are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vct-") as tmp:
        yield Path(tmp)


@pytest.fixture
def vms(workdir: Path) -> Iterator[list[TestVm]]:
    with vm_factory(workdir) as started:
        yield started


def tiny_spec(name: str, seed: Path, **kw: object) -> VmSpec:
    image = require_image("tiny")
    assert image.kernel is not None and image.initrd is not None
    return VmSpec(name=name, accel="tcg", cpu="qemu64", memory=256 << 20, cpus=1,
                  kernel=image.kernel, initrd=image.initrd, append=image.info.append,
                  seed=seed, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("interface", ["virtio", "cdrom"])
def test_tiny_boots_to_its_shell(workdir: Path, vms: list[TestVm], interface: str) -> None:
    seed = workdir / "seed.iso"
    write_seed(seed, meta_data=meta_data("tiny-test-0", "tiny-test-0"),
               user_data="#!/bin/sh\necho user-data ran on $(hostname)\n")
    vm = boot(vms, tiny_spec("tiny0", seed, seed_interface=interface), workdir)
    took = vm.wait_for("vcluster-tiny: ready hostname=tiny-test-0", TINY_TIMEOUT)
    print(f"tiny ({interface} seed) ready after {took:.1f} s")
    vm.wait_for("user-data ran on tiny-test-0", 1)
    vm.send("echo $((6 * 7))-from-the-shell")
    vm.wait_for("42-from-the-shell", 10)
    log = vm.log.read_text(errors="replace")
    # no guest agent port: /init skips qemu-ga quietly; dropbear made a host key of its own
    assert "qemu-ga" not in log and "vcluster-tiny: cannot" not in log, log


NET_CHECK = guest_script("net-check.sh")


def test_tiny_applies_network_config_and_has_vxlan(workdir: Path, vms: list[TestVm]) -> None:
    mac = "52:54:00:0a:0b:0c"
    seed = workdir / "seed.iso"
    write_seed(seed, meta_data=meta_data("tiny-net", "tiny-net"), user_data=NET_CHECK,
               network_config=network_config([Interface(mac, "eth0", ("10.78.0.5/24",),
                                                         mtu=1400)]))
    # restrict=on: the user-mode NIC sends nothing outside QEMU.
    spec = tiny_spec("tinynet", seed, extra=("-netdev", "user,id=n0,restrict=on", "-device",
                                             f"virtio-net-pci,netdev=n0,mac={mac}"))
    vm = boot(vms, spec, workdir)
    vm.wait_for("vcluster-tiny: ready hostname=tiny-net", TINY_TIMEOUT)
    log = vm.log.read_text(errors="replace")
    assert "net-check: eth0 10.78.0.5/24" in log
    assert "net-check: mtu 1400" in log  # the seed's MTU, not the NIC's 1500
    assert "net-check: vxlan ok" in log and "net-check: bridge ok" in log


def test_tiny_serves_ssh_scp_and_the_guest_agent(workdir: Path, vms: list[TestVm]) -> None:
    """One tiny VM, reached the way vcluster reaches VMs: ssh, scp and the guest agent.

    The seed carries root's authorized key and the ssh host key (its vcluster/
    directory) and a gateway; a user-mode NIC (restrict=on: nothing leaves QEMU)
    forwards a loopback port to the guest's port 22.
    """
    client_pub = ssh_keygen(workdir / "id_ed25519")
    host_pub = ssh_keygen(workdir / "host_ed25519")
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"tiny-ssh {host_pub}\n")
    mac, port = "52:54:00:0a:0d:01", free_loopback_port()
    seed = workdir / "seed.iso"
    write_seed(seed, meta_data=meta_data("tiny-ssh", "tiny-ssh"), user_data="",
               network_config=network_config([Interface(mac, "eth0", ("10.79.0.5/24",),
                                                         gateway="10.79.0.2")]),
               guest_files={"authorized_keys": client_pub + "\n",
                            "ssh_host_ed25519_key": (workdir / "host_ed25519").read_text()})
    netdev = (f"user,id=n0,restrict=on,net=10.79.0.0/24,host=10.79.0.2,"
              f"hostfwd=tcp:127.0.0.1:{port}-10.79.0.5:22")
    spec = tiny_spec("tinyssh", seed, guest_agent_socket=workdir / "qga.sock",
                     extra=("-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={mac}"))
    vm = boot(vms, spec, workdir)
    took = vm.wait_for("vcluster-tiny: ready hostname=tiny-ssh", TINY_TIMEOUT)
    user = require_image("tiny").info.user  # what vcluster logs in as
    assert user == "root"
    target = SshTarget(port, workdir / "id_ed25519", known_hosts, "tiny-ssh", user)
    login = target.wait(20)
    print(f"tiny with ssh and qemu-ga ready after {took:.1f} s; first ssh login {login:.1f} s on")

    # (a) a key login, the served host key checked against the seed's
    assert target.ssh("hostname").stdout.strip() == "tiny-ssh"
    print(f"PATH of an ssh command: {target.ssh('echo $PATH').stdout.strip()}")
    other = workdir / "other_known_hosts"
    other.write_text(f"tiny-ssh {ssh_keygen(workdir / 'other_host')}\n")
    refused = SshTarget(port, workdir / "id_ed25519", other, "tiny-ssh", user).ssh(
        "true", check=False)
    assert refused.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    # (b) scp (SFTP) in and back: 1 MiB, unchanged
    blob = workdir / "blob"
    blob.write_bytes(os.urandom(1 << 20))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    start = time.monotonic()
    target.scp(str(blob), ":/tmp/blob")
    assert target.ssh("sha256sum", "/tmp/blob").stdout.split()[0] == digest
    target.scp(":/tmp/blob", str(workdir / "back"))
    print(f"scp of 1 MiB in and back: {time.monotonic() - start:.1f} s")
    assert hashlib.sha256((workdir / "back").read_bytes()).hexdigest() == digest
    # (d) the default route through the seed's gateway
    routes = target.ssh("ip", "route").stdout
    assert "default via 10.79.0.2 dev eth0" in routes, routes
    # (c) the guest agent: ping, and exec with captured output and the exit code
    out, code = guest_exec(workdir / "qga.sock", ["/bin/sh", "-c", "echo hi; exit 7"], 30)
    assert (out, code) == (b"hi\n", 7)
    assert "vcluster-tiny: cannot" not in vm.log.read_text(errors="replace")


def guest_exec(path: Path, argv: list[str], timeout: float) -> tuple[bytes, int]:
    """guest-ping, then guest-exec ``argv`` and poll guest-exec-status: (stdout, exit code)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + timeout
    with QEMUMonitorProtocol(str(path)) as qga:
        qga.connect(negotiate=False)  # qemu-ga sends no greeting
        qga.settimeout(timeout)
        assert qga.cmd("guest-ping") == {}
        pid = qga.cmd("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})
        assert isinstance(pid, dict)
        while time.monotonic() < deadline:
            status = qga.cmd("guest-exec-status", pid=pid["pid"])
            assert isinstance(status, dict)
            if status["exited"]:
                return base64.b64decode(status.get("out-data", "")), status["exitcode"]
            time.sleep(0.2)
    pytest.fail(f"guest-exec {argv}: not done after {timeout:g} s")


TOOLS_CHECK = guest_script("tools-check.sh")
PAIR_CHECK = guest_script("pair-check.sh")


def test_tiny_runs_debian_ping_and_iperf3(workdir: Path, vms: list[TestVm]) -> None:
    """iputils' ping and iperf3 are dynamically linked: they run, with their libraries."""
    seed = workdir / "seed.iso"
    write_seed(seed, meta_data=meta_data("tiny-tools", "tiny-tools"), user_data=TOOLS_CHECK)
    vm = boot(vms, tiny_spec("tinytools", seed), workdir)
    vm.wait_for("vcluster-tiny: ready hostname=tiny-tools", TINY_TIMEOUT)
    log = vm.log.read_text(errors="replace")
    assert "tools-check: ping from iputils" in log
    # -M do: DF set, a 1450-byte packet (1422 + ICMP 8 + IP 20)
    assert "tools-check: 1430 bytes from 127.0.0.1: icmp_seq=1" in log
    assert "tools-check: 1 packets transmitted, 1 received, 0% packet loss" in log
    assert re.search(r"tools-check: iperf 3\.\d+", log), log
    assert re.search(r"tools-check: iperf3 .* Mbits/sec .*receiver", log), log
    # and on the shell, as a user types it
    vm.send("ping -M do -s 1422 -c 1 127.0.0.1 >/dev/null && echo typed-ping-$((40 + 2))")
    vm.wait_for("typed-ping-42", 10)


def test_tiny_pair_sends_full_size_frames_with_df(workdir: Path, vms: list[TestVm]) -> None:
    """Two tiny VMs on one QEMU link (unix datagram sockets: nothing leaves the host)."""
    names = ("tiny-pa", "tiny-pb")
    booted = []
    for index, name in enumerate(names, 1):
        peer = names[2 - index]
        mac = f"52:54:00:0a:0c:0{index}"
        seed = workdir / f"{name}.iso"
        write_seed(seed, meta_data=meta_data(name, name), user_data=PAIR_CHECK,
                   network_config=network_config([Interface(mac, "eth0",
                                                            (f"10.81.0.{index}/24",))]))
        netdev = (f"dgram,id=n0,local.type=unix,local.path={workdir / name}.net,"
                  f"remote.type=unix,remote.path={workdir / peer}.net")
        spec = tiny_spec(name, seed, extra=("-netdev", netdev, "-device",
                                            f"virtio-net-pci,netdev=n0,mac={mac}"))
        booted.append(boot(vms, spec, workdir))
    client, server = booted
    server.wait_for("pair-check: iperf3 server started", TINY_TIMEOUT)
    took = client.wait_for("vcluster-tiny: ready hostname=tiny-pa", 90)
    log = client.log.read_text(errors="replace")
    assert "pair-check: eth0 mtu 1450" in log
    assert "pair-check: 1430 bytes from 10.81.0.2: icmp_seq=1" in log, log
    assert "pair-check: 1 packets transmitted, 1 received, 0% packet loss" in log, log
    assert re.search(r"pair-check: ping: local error: message too long, mtu[=:] ?1450", log), log
    rate = re.search(r"pair-check: iperf3 .* ([\d.]+) Mbits/sec .*receiver", log)
    assert rate, log
    print(f"tiny pair: client ready after {took:.1f} s, iperf3 {rate.group(1)} Mbit/s")


# A #! user-data script per VM: A writes a marker word into the FAM region, B
# waits for it, answers at offset 8, and A waits for the answer.


def test_tiny_fam_is_shared_between_two_vms(workdir: Path, vms: list[TestVm]) -> None:
    fam = workdir / "fam.bin"
    size = 1 << 20
    fam.write_bytes(b"\0" * size)
    booted = []
    for name, script in (("tiny-a", FAM_A), ("tiny-b", FAM_B)):
        seed = workdir / f"{name}.iso"
        write_seed(seed, meta_data=meta_data(name, name), user_data=script)
        booted.append(boot(vms, tiny_spec(name, seed, fam=SharedMemory(fam, size)), workdir))
    a, b = booted
    b.wait_for("fam-b: read 0x76636C31", 60)
    a.wait_for("fam-a: read 0x62626232", 60)
    data = fam.read_bytes()
    assert struct.unpack_from("<I", data, 0)[0] == 0x76636C31
    assert struct.unpack_from("<I", data, 8)[0] == 0x62626232


def test_debian_boots_with_cloud_init(workdir: Path, vms: list[TestVm]) -> None:
    image = require_image("debian")
    assert image.disk is not None and image.kernel is not None and image.initrd is not None
    overlay = workdir / "vm0.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         str(image.disk.resolve()), str(overlay)])
    mac = "52:54:00:12:34:56"
    settings = GuestSettings(
        hostname="vcl-deb-0", fqdn="vcl-deb-0.cluster.test",
        hosts=(HostEntry("10.77.0.10", ("vcl-deb-0",)), HostEntry("10.77.0.11", ("vcl-deb-1",))),
        ssh_authorized_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests vcluster-test",),
        final_message="vcluster-test: cloud-init done after $UPTIME s",
    )
    template = {"runcmd": [
        ["sh", "-c", "echo vcluster-test: hostname=$(hostname) > /dev/ttyS0"],
        ["sh", "-c", "echo vcluster-test: hosts $(grep vcl-deb-1 /etc/hosts) > /dev/ttyS0"],
        ["sh", "-c", "echo vcluster-test: addr $(ip -br -4 addr show eth0) > /dev/ttyS0"],
    ]}
    seed = workdir / "seed.iso"
    write_seed(
        seed,
        meta_data=meta_data("vcl-deb-0-instance", "vcl-deb-0"),
        user_data=merge_user_data(template, required_config(settings)),
        network_config=network_config([Interface(mac=mac, name="eth0",
                                                 addresses=("10.77.0.10/24",))]),
    )
    # An isolated user-mode NIC (restrict=on: no traffic leaves QEMU) so that the
    # MAC-matched static network-config is applied to a real interface.
    spec = VmSpec(
        name="debian0", accel="tcg", cpu="qemu64", memory=1 << 30, cpus=1,
        kernel=image.kernel, initrd=image.initrd, append=image.info.append,
        disks=(Disk(overlay),), seed=seed, guest_agent_socket=workdir / "qga.sock",
        extra=("-netdev", "user,id=n0,restrict=on",
               "-device", f"virtio-net-pci,netdev=n0,mac={mac}"),
    )
    vm = boot(vms, spec, workdir)
    took = vm.wait_for("vcluster-test: cloud-init done", DEBIAN_TIMEOUT)
    print(f"debian: cloud-init done after {took:.1f} s")
    log = vm.log.read_text(errors="replace")
    assert "vcluster-test: hostname=vcl-deb-0" in log
    assert "vcluster-test: hosts 10.77.0.11 vcl-deb-1" in log
    assert "10.77.0.10/24" in log
    assert guest_agent_answers(workdir / "qga.sock", 30)


def guest_agent_answers(path: Path, timeout: float) -> bool:
    """qemu-guest-agent answers guest-sync on its virtio-serial channel."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.settimeout(2)
        while time.monotonic() < deadline:
            conn.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": 4242}}).encode())
            try:
                reply = conn.recv(4096)
            except TimeoutError:
                continue
            if b'"return": 4242' in reply:
                return True
    return False
