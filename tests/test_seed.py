"""Seed contents, read back from the ISO with pycdlib, and the user-data merge rules."""

from __future__ import annotations

import email
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from vcluster.errors import SeedError
from vcluster.seed import (
    HOSTS_TEMPLATE,
    GuestSettings,
    HostEntry,
    Interface,
    merge_config,
    merge_user_data,
    meta_data,
    network_config,
    read_seed,
    required_config,
    write_seed,
)

SETTINGS = GuestSettings(
    hostname="vm1", fqdn="vm1.c42.vcluster",
    hosts=(HostEntry("10.0.0.1", ("vm0",)), HostEntry("10.0.0.2", ("vm1",))),
    ssh_authorized_keys=("ssh-ed25519 AAAA cluster-key",),
    final_message="vcluster: ready",
)


def cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def mime_parts(text: str) -> list[tuple[str, str]]:
    """(content type, decoded payload) of each part of a multipart user-data."""
    message = email.message_from_string(text)
    assert message.is_multipart()
    out = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload.decode()))
    return out


def test_seed_iso_has_label_and_three_files(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    user_data = merge_user_data(None, required_config(SETTINGS))
    net = network_config([Interface("52:54:00:AA:00:01", "eth0", ("10.0.0.2/24",))])
    write_seed(seed, meta_data=meta_data("c42-vm1", "vm1"), user_data=user_data,
               network_config=net)
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        joliet = sorted(c.file_identifier().decode("utf-16_be")
                        for c in iso.list_children(joliet_path="/")
                        if not (c.is_dot() or c.is_dotdot()))
        assert joliet == ["meta-data", "network-config", "user-data"]
    finally:
        iso.close()
    files = read_seed(seed)
    assert set(files) == {"meta-data", "user-data", "network-config"}
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "c42-vm1", "local-hostname": "vm1"}
    assert files["user-data"] == user_data
    assert yaml.safe_load(files["network-config"]) == {"version": 1, "config": [{
        "type": "physical", "name": "eth0", "mac_address": "52:54:00:aa:00:01",
        "subnets": [{"type": "static", "address": "10.0.0.2/24"}]}]}
    assert list(tmp_path.iterdir()) == [seed]  # no temporary file left


def test_seed_without_network_config(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    write_seed(seed, meta_data="instance-id: x\n", user_data="#!/bin/sh\necho hi\n")
    assert read_seed(seed) == {"meta-data": "instance-id: x\n",
                               "user-data": "#!/bin/sh\necho hi\n"}


def test_seed_guest_files_go_in_their_directory(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    write_seed(seed, meta_data="instance-id: x\n", user_data="#!/bin/sh\n",
               guest_files={"authorized_keys": "ssh-ed25519 AAAA k\n",
                            "ssh_host_ed25519_key": key})
    assert read_seed(seed) == {"meta-data": "instance-id: x\n", "user-data": "#!/bin/sh\n",
                               "vcluster/authorized_keys": "ssh-ed25519 AAAA k\n",
                               "vcluster/ssh_host_ed25519_key": key}


def test_seed_guest_file_names_are_plain(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match=r"seed file '../x': expected a plain file name"):
        write_seed(tmp_path / "seed.iso", meta_data={}, user_data="",
                   guest_files={"../x": "y"})
    assert list(tmp_path.iterdir()) == []


def test_seed_write_error_is_a_seed_error(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="cannot write the cloud-init seed"):
        write_seed(tmp_path / "missing" / "seed.iso", meta_data={}, user_data="")


def test_read_seed_of_a_non_iso(tmp_path: Path) -> None:
    bad = tmp_path / "bad.iso"
    bad.write_bytes(b"not an iso" * 1000)
    with pytest.raises(SeedError, match="cannot read"):
        read_seed(bad)


def test_required_config() -> None:
    config = required_config(SETTINGS)
    assert config["hostname"] == "vm1" and config["fqdn"] == "vm1.c42.vcluster"
    assert config["manage_etc_hosts"] is True and config["preserve_hostname"] is False
    assert config["ssh_authorized_keys"] == ["ssh-ed25519 AAAA cluster-key"]
    assert config["final_message"] == "vcluster: ready"
    [hosts] = config["write_files"]
    assert hosts["path"] == HOSTS_TEMPLATE
    lines = hosts["content"].splitlines()
    assert lines[0] == "## template:jinja"
    assert "10.0.0.1 vm0" in lines and "10.0.0.2 vm1" in lines
    # vm1 is listed with its cluster address: no 127.0.1.1 line for it.
    assert not any(line.startswith("127.0.1.1") for line in lines)


def test_required_config_minimal() -> None:
    assert required_config(GuestSettings(hostname="a")) == {
        "hostname": "a", "preserve_hostname": False, "prefer_fqdn_over_hostname": False,
        "manage_etc_hosts": True}


def test_merge_cloud_config_vcluster_wins_lists_extend() -> None:
    template = {
        "hostname": "template-name", "manage_etc_hosts": False, "final_message": "theirs",
        "packages": ["vim"], "ssh_authorized_keys": ["ssh-rsa BBBB user-key"],
        "write_files": [{"path": "/etc/motd", "content": "hi"}],
        "timezone": "Europe/Paris",
    }
    merged = cloud_config(merge_user_data(template, required_config(SETTINGS)))
    assert merged["hostname"] == "vm1"
    assert merged["manage_etc_hosts"] is True
    assert merged["final_message"] == "vcluster: ready"
    assert merged["ssh_authorized_keys"] == ["ssh-rsa BBBB user-key",
                                             "ssh-ed25519 AAAA cluster-key"]
    assert [f["path"] for f in merged["write_files"]] == ["/etc/motd", HOSTS_TEMPLATE]
    assert merged["packages"] == ["vim"] and merged["timezone"] == "Europe/Paris"


def test_merge_cloud_config_text_and_nested_mappings() -> None:
    text = "#cloud-config\napt:\n  preserve_sources_list: true\nruncmd: [[ls]]\n"
    merged = merge_config(yaml.safe_load(text), {"apt": {"conf": "x"}, "runcmd": [["id"]]})
    assert merged == {"apt": {"preserve_sources_list": True, "conf": "x"},
                      "runcmd": [["ls"], ["id"]]}
    out = cloud_config(merge_user_data(text, {"hostname": "h"}))
    assert out["hostname"] == "h" and out["runcmd"] == [["ls"]]


def test_merge_empty_template() -> None:
    assert cloud_config(merge_user_data("", {"hostname": "h"})) == {"hostname": "h"}
    assert cloud_config(merge_user_data("#cloud-config\n", {"hostname": "h"})) == {"hostname": "h"}


def test_script_template_becomes_multipart() -> None:
    script = "#!/bin/sh\necho from the template\n"
    parts = mime_parts(merge_user_data(script, required_config(SETTINGS)))
    assert [kind for kind, _ in parts] == ["text/x-shellscript", "text/cloud-config"]
    assert parts[0][1] == script
    assert cloud_config(parts[1][1])["hostname"] == "vm1"


def test_multipart_template_gets_one_more_part() -> None:
    inner = merge_user_data("#!/bin/sh\ntrue\n", {"hostname": "first"})
    text = merge_user_data(inner, {"hostname": "second"})
    parts = mime_parts(text)
    assert [kind for kind, _ in parts] == \
        ["text/x-shellscript", "text/cloud-config", "text/cloud-config"]
    assert cloud_config(parts[-1][1])["hostname"] == "second"


@pytest.mark.parametrize("template, problem", [
    ("#cloud-config\n- a list\n", "not a mapping"),
    ("#cloud-config\nkey: [unclosed\n", "not valid YAML"),
    ("just some text\n", "not understood"),
])
def test_bad_templates(template: str, problem: str) -> None:
    with pytest.raises(SeedError, match=problem):
        merge_user_data(template, {"hostname": "h"})


def test_network_config_v1() -> None:
    config = network_config([
        Interface("52:54:00:00:00:01", "eth0", ("10.1.0.5/24", "fd00::5/64"),
                  gateway="10.1.0.1", mtu=1450, dns=("10.1.0.1",)),
        Interface("52:54:00:00:00:02", "eth1", dhcp=True),
    ])
    assert config == {"version": 1, "config": [
        {"type": "physical", "name": "eth0", "mac_address": "52:54:00:00:00:01", "mtu": 1450,
         "subnets": [{"type": "static", "address": "10.1.0.5/24", "gateway": "10.1.0.1",
                      "dns_nameservers": ["10.1.0.1"]},
                     {"type": "static", "address": "fd00::5/64"}]},
        {"type": "physical", "name": "eth1", "mac_address": "52:54:00:00:00:02",
         "subnets": [{"type": "dhcp"}]},
    ]}


def test_mac_survives_yaml_round_trip(tmp_path: Path) -> None:
    # 52:54:00:12:34:56 is a base-60 integer to a YAML 1.1 reader unless quoted.
    seed = tmp_path / "seed.iso"
    net = network_config([Interface("52:54:00:12:34:56", "eth0", ("10.0.0.9/24",))])
    write_seed(seed, meta_data={}, user_data="", network_config=net)
    back = yaml.safe_load(read_seed(seed)["network-config"])
    assert back["config"][0]["mac_address"] == "52:54:00:12:34:56"
