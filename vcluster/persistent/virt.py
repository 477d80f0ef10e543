"""The libvirt connection of persistent clusters (libvirt-python), and its errors in words.

libvirt-python is imported here only, when a ``cluster`` command needs it.
The URI is ``libvirt.uri`` in batch.yaml, else ``qemu:///system`` for root
and ``qemu:///session`` for a user.  A libvirtd that cannot be reached is one
line saying how to start it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vcluster.errors import VclusterError

if TYPE_CHECKING:
    import libvirt

SYSTEM_URI = "qemu:///system"
SESSION_URI = "qemu:///session"
START_HINT = ("start it: `virtlogd -d && libvirtd -d` as root, or `systemctl start libvirtd` "
              "where systemd runs")


class LibvirtError(VclusterError):
    """libvirtd cannot be reached, or refused what was asked of it."""


def default_uri() -> str:
    return SYSTEM_URI if os.geteuid() == 0 else SESSION_URI


def is_session(uri: str) -> bool:
    """Whether ``uri`` is a user's own libvirtd (which makes no networks, nor bridges)."""
    from urllib.parse import urlsplit

    return urlsplit(uri).path.rstrip("/") == "/session"


def _module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LibvirtError("libvirt-python is not installed (pip install libvirt-python; it "
                           "builds against libvirt-dev and pkg-config: apt-get install "
                           "libvirt-dev pkg-config)") from None
    # libvirt prints every error on stderr by default; ours say what they mean
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str) -> libvirt.virConnect:
    """An open connection to ``uri``; LibvirtError saying how to start libvirtd if none."""
    lv = _module()
    try:
        conn: libvirt.virConnect = lv.open(uri)
    except lv.libvirtError as e:
        raise LibvirtError(f"cannot reach libvirtd at {uri}: {message(e)} ({START_HINT})"
                           ) from None
    return conn


def message(error: Exception) -> str:
    """A libvirt error's own message, on one line."""
    text = getattr(error, "get_error_message", lambda: None)() or str(error)
    return " ".join(str(text).split())


def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a libvirt error raised as LibvirtError naming ``what`` was asked."""
    lv = _module()
    try:
        return fn(*args)
    except lv.libvirtError as e:
        raise LibvirtError(f"{what}: {message(e)}") from None


def _lookup(what: str, find: Callable[[str], Any], name: str, missing: int) -> Any:
    lv = _module()
    try:
        return find(name)
    except lv.libvirtError as e:
        if e.get_error_code() == missing:
            return None
        raise LibvirtError(f"{what} {name}: {message(e)}") from None


def domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain named ``name``, None if there is none."""
    return _lookup("domain", conn.lookupByName, name, _module().VIR_ERR_NO_DOMAIN)


def network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork | None:
    """The network named ``name``, None if there is none."""
    return _lookup("network", conn.networkLookupByName, name, _module().VIR_ERR_NO_NETWORK)


def is_running(dom: libvirt.virDomain) -> bool:
    """Whether the domain has a QEMU (running, paused, shutting down...)."""
    return bool(dom.isActive())


def state_name(dom: libvirt.virDomain) -> str:
    """libvirt's word for the domain's state: running, shut off, paused, ..."""
    lv = _module()
    names = {lv.VIR_DOMAIN_NOSTATE: "no state", lv.VIR_DOMAIN_RUNNING: "running",
             lv.VIR_DOMAIN_BLOCKED: "blocked", lv.VIR_DOMAIN_PAUSED: "paused",
             lv.VIR_DOMAIN_SHUTDOWN: "shutting down", lv.VIR_DOMAIN_SHUTOFF: "shut off",
             lv.VIR_DOMAIN_CRASHED: "crashed", lv.VIR_DOMAIN_PMSUSPENDED: "suspended"}
    state, _reason = dom.state()
    return names.get(state, f"state {state}")


def wait_stopped(dom: libvirt.virDomain, timeout: float, poll: float = 0.1) -> bool:
    """Wait up to ``timeout`` seconds for the domain to stop; whether it did."""
    deadline = time.monotonic() + timeout
    while is_running(dom):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def power_button(dom: libvirt.virDomain) -> None:
    """ACPI's power button (a guest that ignores it stays up: the caller's wait is bounded)."""
    lv = _module()
    call(f"{dom.name()}: ACPI shutdown", dom.shutdownFlags, lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)


def undefine(dom: libvirt.virDomain) -> None:
    lv = _module()
    flags = lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    call(f"undefine domain {dom.name()}", dom.undefineFlags, flags)


def set_metadata(dom: libvirt.virDomain, element: str, prefix: str, namespace: str) -> None:
    """Replace the domain's metadata element of ``namespace`` (kept, and live if running)."""
    lv = _module()
    flags = lv.VIR_DOMAIN_AFFECT_CONFIG | (lv.VIR_DOMAIN_AFFECT_LIVE if is_running(dom) else 0)
    call(f"metadata of {dom.name()}", dom.setMetadata, lv.VIR_DOMAIN_METADATA_ELEMENT, element,
         prefix, namespace, flags)


def reserve(net: libvirt.virNetwork, host: str, what: str) -> None:
    """Add the DHCP reservation ``host`` (``<host mac= name= ip=/>``) to the network, kept
    and live if it runs; one that is there already (a clone cut short) is replaced."""
    lv = _module()
    flags = lv.VIR_NETWORK_UPDATE_AFFECT_CONFIG | (
        lv.VIR_NETWORK_UPDATE_AFFECT_LIVE if net.isActive() else 0)
    section = lv.VIR_NETWORK_SECTION_IP_DHCP_HOST
    with contextlib.suppress(lv.libvirtError):  # none yet
        net.update(lv.VIR_NETWORK_UPDATE_COMMAND_DELETE, section, -1, host, flags)
    call(what, net.update, lv.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, section, -1, host, flags)
