"""Cluster specs for the VM runner tests, and store access inside a sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vcluster.cluster import (
    BootPlan,
    ClusterPlan,
    ClusterSpec,
    FamPlan,
    NicPlan,
    Readiness,
    VmPlan,
)
from vcluster.images.repo import Image

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForVmTests vcluster-test"


def tiny_boot(image: Image) -> BootPlan:
    assert image.kernel is not None and image.initrd is not None
    return BootPlan(image=image.ref, kind="initramfs", kernel=image.kernel, initrd=image.initrd,
                    disk=None, append=image.info.append, readiness=Readiness.TINY_INIT)


def fake_tiny_boot(kernel: Path = Path("/images/tiny/vmlinuz"),
                   initrd: Path = Path("/images/tiny/initramfs.img")) -> BootPlan:
    """A tiny image's boot plan whose files need not exist (for fakes that never read them)."""
    return BootPlan(image="tiny@1", kind="initramfs", kernel=kernel, initrd=initrd, disk=None,
                    append="console=ttyS0", readiness=Readiness.TINY_INIT)


def disk_boot(kernel: Path = Path("/images/vmlinuz"), initrd: Path | None = None,
              disk: Path = Path("/images/base.qcow2")) -> BootPlan:
    return BootPlan(image="debian@1", kind="disk", kernel=kernel, initrd=initrd, disk=disk,
                    append="root=/dev/vda rw console=ttyS0",
                    readiness=Readiness.FINAL_MESSAGE)


def nic(index: int, network: str = "cluster", mtu: int = 1450) -> NicPlan:
    return NicPlan(network, "private", mtu, f"10.77.0.{index + 1}/24", "virtio-net-pci")


def vm_plan(index: int, boot: BootPlan, *, nics: int = 1, fam: FamPlan | None = None,
            user_data: str | None = None, qemu_args: tuple[str, ...] = (),
            memory: int = 256 << 20, cpu_model: str | None = None) -> VmPlan:
    return VmPlan(index=index, template="tiny", vcpus=1, memory=memory, boot=boot,
                  nics=tuple(nic(index, f"net{n}" if n else "cluster") for n in range(nics)),
                  fam=fam, disks=(), user_data=user_data, machine="pc", cpu_model=cpu_model,
                  qemu_args=qemu_args)


def cluster_spec(job: str, vms: list[VmPlan], *, user: str = "root", uid: int = 0,
                 accel: str = "tcg") -> ClusterSpec:
    plan = ClusterPlan(definition=f"tiny:{len(vms)}", vms=tuple(vms), accel=accel,
                       qemu_binary="qemu-system-x86_64")
    return ClusterSpec(job=job, name="vm-test", user=user, uid=uid, created=time.time(),
                       ssh_public_key=SSH_KEY, plan=plan)


# A python program run inside the sandbox's controller namespace (where etcd
# listens) as root, with the controller's configuration.
STORE_TOOL = r"""
import json, sys, time
from pathlib import Path
from vcluster.config.batch import parse_batch
from vcluster.config.paths import system_dir
from vcluster.schema.source import load_yaml
from vcluster.store import open_store
path = system_dir() / "batch.yaml"
store = open_store(parse_batch(load_yaml(path), path).store)
op, key = sys.argv[1], sys.argv[2]
if op == "put":
    store.put(key, sys.stdin.read())
elif op == "get":
    entry = store.get(key)
    print(json.dumps(None if entry is None else entry.value))
elif op == "delete-prefix":
    print(store.delete_prefix(key))
elif op == "wait":
    wanted, deadline = set(sys.argv[3].split(",")), time.monotonic() + float(sys.argv[4])
    seen = []
    while time.monotonic() < deadline:
        entry = store.get(key)
        if entry is not None:
            state = json.loads(entry.value)["state"]
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in wanted:
                print(json.dumps({"record": json.loads(entry.value), "seen": seen}))
                sys.exit(0)
        time.sleep(0.2)
    print(json.dumps({"record": None if entry is None else json.loads(entry.value),
                      "seen": seen}))
    sys.exit(3)
store.close()
"""


def store_tool(sandbox_dir: Path, *args: str, stdin: str = "",
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    from vcluster.sandbox.state import require
    from vcluster.sandbox.use import command

    cmd = command(require(sandbox_dir), [sys.executable, "-c", STORE_TOOL, *args])
    return subprocess.run(cmd.argv, env=cmd.env, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_state(sandbox_dir: Path, key: str, states: str, timeout: float) -> dict[str, Any]:
    """Poll a VM record until its state is one of ``states``; {record, seen}."""
    proc = store_tool(sandbox_dir, "wait", key, states, str(timeout), timeout=timeout + 30)
    if proc.returncode not in (0, 3):
        raise AssertionError(f"store tool failed: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["reached"] = proc.returncode == 0
    return result
