"""cloud-init NoCloud seeds: what vcluster tells a guest, written as an ISO with pycdlib.

A seed holds ``meta-data`` (instance id, hostname), ``user-data`` (the
template's, merged with what vcluster must set) and ``network-config``
(version 1, interfaces matched by MAC address, static subnets).
"""

from __future__ import annotations

import email.message
import email.parser
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import yaml

from vcluster.errors import SeedError

SEED_FILES = ("meta-data", "user-data", "network-config")
GUEST_DIR = "vcluster"  # the seed's directory of files for images without cloud-init
_GUEST_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
HOSTS_TEMPLATE = "/etc/cloud/templates/hosts.debian.tmpl"

# Keys whose values vcluster decides; the template cannot override them.
VCLUSTER_KEYS = frozenset({
    "hostname", "fqdn", "prefer_fqdn_over_hostname", "preserve_hostname", "manage_etc_hosts",
    "final_message", "ssh_keys", "ssh_deletekeys", "ssh_genkeytypes",
})


@dataclass(frozen=True)
class HostEntry:
    """One line of the guest's /etc/hosts."""

    address: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Interface:
    """A guest NIC, found by its MAC address, with static addresses (CIDR notation)."""

    mac: str
    name: str
    addresses: tuple[str, ...] = ()
    gateway: str | None = None
    mtu: int | None = None
    dns: tuple[str, ...] = ()
    dhcp: bool = False


@dataclass(frozen=True)
class GuestSettings:
    """What vcluster must set in every guest, whatever the template says."""

    hostname: str
    fqdn: str | None = None
    hosts: tuple[HostEntry, ...] = ()
    ssh_authorized_keys: tuple[str, ...] = ()
    final_message: str | None = None


def meta_data(instance_id: str, hostname: str) -> dict[str, str]:
    return {"instance-id": instance_id, "local-hostname": hostname}


def hosts_template(settings: GuestSettings) -> str:
    """cloud-init's /etc/hosts template, with the cluster's entries appended.

    cloud-init rewrites /etc/hosts from this template on every boot when
    ``manage_etc_hosts`` is true, so the entries survive reboots.
    """
    lines = ["## template:jinja", "127.0.0.1 localhost"]
    listed = {name for entry in settings.hosts for name in entry.names}
    if settings.hostname not in listed:
        lines.append("127.0.1.1 {{fqdn}} {{hostname}}")
    lines += ["::1 localhost ip6-localhost ip6-loopback",
              "ff02::1 ip6-allnodes", "ff02::2 ip6-allrouters"]
    lines += [f"{entry.address} {' '.join(entry.names)}" for entry in settings.hosts]
    return "\n".join(lines) + "\n"


def required_config(settings: GuestSettings) -> dict[str, Any]:
    """The cloud-config vcluster needs in every guest."""
    config: dict[str, Any] = {
        "hostname": settings.hostname,
        "preserve_hostname": False,
        "prefer_fqdn_over_hostname": False,
        "manage_etc_hosts": True,
    }
    if settings.fqdn:
        config["fqdn"] = settings.fqdn
    if settings.hosts:
        config["write_files"] = [
            {"path": HOSTS_TEMPLATE, "content": hosts_template(settings), "permissions": "0644"},
        ]
    if settings.ssh_authorized_keys:
        config["ssh_authorized_keys"] = list(settings.ssh_authorized_keys)
    if settings.final_message:
        config["final_message"] = settings.final_message
    return config


def merge_config(template: Mapping[str, Any], required: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two cloud-configs: lists are extended, mappings merged, scalars from ``required``.

    Keys in VCLUSTER_KEYS always take vcluster's value.
    """
    out = dict(template)
    for key, value in required.items():
        old = out.get(key)
        if key in VCLUSTER_KEYS or old is None:
            out[key] = value
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        elif isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge_config(old, value)
        else:
            out[key] = value
    return out


def cloud_config_text(config: Mapping[str, Any]) -> str:
    return "#cloud-config\n" + yaml.safe_dump(dict(config), sort_keys=False,
                                              default_flow_style=False)


def _parse_cloud_config(text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SeedError(f"user-data: the template's #cloud-config is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SeedError("user-data: the template's #cloud-config is not a mapping")
    return data


def _multipart(required: Mapping[str, Any], parts: Sequence[email.message.Message]) -> str:
    outer = MIMEMultipart()
    for part in parts:
        outer.attach(part)
    ours = MIMEText(cloud_config_text(required), "cloud-config", "utf-8")
    ours.add_header("Content-Disposition", "attachment", filename="vcluster.cfg")
    outer.attach(ours)
    return outer.as_string()


def merge_user_data(template: str | Mapping[str, Any] | None, required: Mapping[str, Any]) -> str:
    """The guest's user-data: the template's, with vcluster's settings merged in.

    A cloud-config (mapping or ``#cloud-config`` text) is merged key by key; a
    script (``#!``) or a MIME multipart document becomes a multipart with
    vcluster's cloud-config as one more part.
    """
    if template is None:
        return cloud_config_text(required)
    if isinstance(template, Mapping):
        return cloud_config_text(merge_config(template, required))
    text = template.lstrip("\ufeff")
    if not text.strip():
        return cloud_config_text(required)
    if text.startswith("#cloud-config"):
        return cloud_config_text(merge_config(_parse_cloud_config(text), required))
    if text.startswith("#!"):
        script = MIMEText(text, "x-shellscript", "utf-8")
        script.add_header("Content-Disposition", "attachment", filename="template.sh")
        return _multipart(required, [script])
    if text.lower().startswith(("content-type:", "mime-version:")):
        message = email.parser.Parser().parsestr(text)
        if not message.is_multipart():
            return _multipart(required, [message])
        parts = [p for p in message.get_payload() if isinstance(p, email.message.Message)]
        return _multipart(required, parts)
    raise SeedError(
        "user-data: the template's user-data is not understood "
        "(expected a mapping, #cloud-config text, a #! script or a MIME multipart document)")


def network_config(interfaces: Sequence[Interface]) -> dict[str, Any]:
    """cloud-init network-config version 1: each NIC matched by MAC, static subnets."""
    config: list[dict[str, Any]] = []
    for nic in interfaces:
        subnets: list[dict[str, Any]] = []
        if nic.dhcp:
            subnets.append({"type": "dhcp"})
        for i, address in enumerate(nic.addresses):
            subnet: dict[str, Any] = {"type": "static", "address": address}
            if i == 0 and nic.gateway:
                subnet["gateway"] = nic.gateway
            if i == 0 and nic.dns:
                subnet["dns_nameservers"] = list(nic.dns)
            subnets.append(subnet)
        entry: dict[str, Any] = {"type": "physical", "name": nic.name,
                                 "mac_address": nic.mac.lower(), "subnets": subnets}
        if nic.mtu:
            entry["mtu"] = nic.mtu
        config.append(entry)
    return {"version": 1, "config": config}


def _text(value: str | Mapping[str, Any]) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(dict(value), sort_keys=False, default_flow_style=False)


def write_seed(path: Path, *, meta_data: str | Mapping[str, Any], user_data: str,
               network_config: str | Mapping[str, Any] | None = None,
               guest_files: Mapping[str, str] | None = None) -> None:
    """Write a NoCloud seed ISO (volume label ``cidata``) to ``path``, atomically.

    ``guest_files`` (name: text) go into the seed's ``vcluster/`` directory,
    for images without cloud-init (tiny's /init reads ``authorized_keys`` and
    ``ssh_host_ed25519_key`` there); cloud-init ignores them.
    """
    import pycdlib

    files = {"meta-data": _text(meta_data), "user-data": user_data}
    if network_config is not None:
        files["network-config"] = _text(network_config)
    for name in guest_files or {}:
        if not _GUEST_FILE_RE.match(name):
            raise SeedError(f"seed file {name!r}: expected a plain file name (letters, digits, "
                            "_ . -)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    iso = pycdlib.PyCdlib()
    try:
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
        for name, text in files.items():
            _add_file(iso, "", name, text)
        if guest_files:
            iso.add_directory(f"/{GUEST_DIR.upper()}", rr_name=GUEST_DIR,
                              joliet_path=f"/{GUEST_DIR}")
            for name, text in guest_files.items():
                _add_file(iso, GUEST_DIR, name, text)
        iso.write(str(tmp))
        os.replace(tmp, path)
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as e:
        raise SeedError(f"cannot write the cloud-init seed {path}: {e}") from e
    finally:
        iso.close()
        tmp.unlink(missing_ok=True)


def _add_file(iso: Any, directory: str, name: str, text: str) -> None:
    data = text.encode("utf-8")
    iso_dir = f"/{directory.upper()}" if directory else ""
    joliet_dir = f"/{directory}" if directory else ""
    iso_name = name.upper().replace("-", "_").replace(".", "_") + ".;1"
    iso.add_fp(io.BytesIO(data), len(data), f"{iso_dir}/{iso_name}", rr_name=name,
               joliet_path=f"{joliet_dir}/{name}")


def read_seed(path: Path) -> dict[str, str]:
    """The files of a seed ISO by their Rock Ridge names (for checks and debugging)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as e:
        raise SeedError(f"cannot read the cloud-init seed {path}: {e}") from e
    try:
        out: dict[str, str] = {}
        directories = [""]
        while directories:
            directory = directories.pop()
            for child in iso.list_children(rr_path=directory or "/"):
                if child.is_dot() or child.is_dotdot():
                    continue
                name = f"{directory}/{child.rock_ridge.name().decode()}"
                if child.is_dir():
                    directories.append(name)
                    continue
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path=name)
                out[name.lstrip("/")] = buf.getvalue().decode("utf-8")
        return out
    finally:
        iso.close()
