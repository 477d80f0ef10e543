"""Choosing the accelerator: explicit settings, and ``auto`` never hanging (real QEMU)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support_images import require_image
from vcluster.vm.accel import (
    PROBE_CACHE,
    cached_problem,
    choose_accel,
    keep_problem,
    kvm_api_problem,
    probe_key,
)
from vcluster.vm.console import tail_lines


def test_explicit_settings_are_taken_as_they_are() -> None:
    for name in ("tcg", "kvm"):
        accel = choose_accel(name, binary="qemu-system-x86_64", kernel=Path("/nonexistent"))
        assert accel.name == name and name in accel.reason


def test_auto_without_a_kvm_device_is_tcg_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    accel = choose_accel("auto", binary="qemu-system-x86_64", kernel=Path("/nonexistent"),
                         device=tmp_path / "kvm")
    assert accel.name == "tcg" and "cannot open" in accel.reason
    assert time.monotonic() - started < 1
    assert kvm_api_problem(tmp_path / "kvm") is not None


@pytest.mark.qemu
@pytest.mark.images
def test_auto_is_bounded_and_says_why() -> None:
    image = require_image("tiny")
    assert image.kernel is not None
    started = time.monotonic()
    accel = choose_accel("auto", binary="qemu-system-x86_64", kernel=image.kernel,
                         probe_timeout=4)
    took = time.monotonic() - started
    print(f"auto chose {accel.name} in {took:.1f} s: {accel.reason}")
    assert accel.name in ("kvm", "tcg") and accel.reason.startswith("qemu.accel is auto")
    assert took < 4 + 10  # the probe's bound plus QEMU's start and stop


def test_a_kept_verdict_holds_for_its_boot_qemu_and_kvm_device_only(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    key = probe_key("sh", device)
    assert key is not None and key["boot"]
    cache = tmp_path / PROBE_CACHE
    assert cached_problem(cache, key) == (False, None)
    keep_problem(cache, key, "a KVM test boot failed: no")
    assert cached_problem(cache, key) == (True, "a KVM test boot failed: no")
    keep_problem(cache, key, None)
    assert cached_problem(cache, key) == (True, None)
    assert cached_problem(cache, dict(key, qemu=["/usr/bin/other", 1, 2])) == (False, None)
    device.unlink()
    device.write_bytes(b"")  # a new /dev/kvm (the module reloaded): a new inode
    assert cached_problem(cache, probe_key("sh", device) or {}) == (False, None)
    assert probe_key("no-such-qemu", device) is None
    cache.write_text("{not json")
    assert cached_problem(cache, key) == (False, None)
    keep_problem(tmp_path / "missing" / PROBE_CACHE, key, None)  # cannot be written: no cache


@pytest.mark.qemu
@pytest.mark.images
def test_auto_probes_once_and_then_takes_the_kept_verdict(tmp_path: Path) -> None:
    image = require_image("tiny")
    assert image.kernel is not None
    first = choose_accel("auto", binary="qemu-system-x86_64", kernel=image.kernel,
                         probe_timeout=4, cache_dir=tmp_path)
    if not (tmp_path / PROBE_CACHE).exists():
        pytest.skip(f"no test boot ran here: {first.reason}")
    started = time.monotonic()
    again = choose_accel("auto", binary="qemu-system-x86_64", kernel=image.kernel,
                         probe_timeout=4, cache_dir=tmp_path)
    took = time.monotonic() - started
    print(f"first: {first.reason}\nagain in {took:.3f} s: {again.reason}")
    assert again.name == first.name and str(tmp_path / PROBE_CACHE) in again.reason
    assert took < 0.05


def test_console_tail_drops_escapes_and_blank_lines(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert tail_lines(log) == ()
    log.write_bytes(b"\x1bcfirst\r\n\r\n\x1b[1;32mgreen\x1b[0m\r\n" +
                    b"".join(b"line %d\r\n" % i for i in range(30)))
    lines = tail_lines(log, 3)
    assert lines == ("line 27", "line 28", "line 29")
    assert tail_lines(log, 40)[:2] == ("first", "green")
