"""Validation of address plans shared by the network types."""

from __future__ import annotations

import ipaddress

from vcluster.schema.fields import Section


def subnet(section: Section, key: str = "subnet", *, smallest_prefix: int = 8,
           largest_prefix: int = 29) -> ipaddress.IPv4Network:
    """An IPv4 network in CIDR form, with room for at least a gateway and a few VMs."""
    expected = (f"an IPv4 network such as 10.200.0.0/24 "
                f"(prefix /{smallest_prefix} to /{largest_prefix})")
    text = section.string(key, required=True, expected=expected)
    assert text is not None
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise section.error(key, f"{text!r} is not a valid network: {e}", expected) from e
    if not smallest_prefix <= net.prefixlen <= largest_prefix:
        raise section.error(key, f"{text!r} has prefix /{net.prefixlen}", expected)
    return net


def port_range(section: Section, key: str, default: tuple[int, int] | None,
               low: int = 1, high: int = 65535) -> tuple[int, int] | None:
    """``first-last`` (inclusive), within ``low``..``high``."""
    expected = f"a range FIRST-LAST within {low}-{high}"
    text = section.string(key, expected=expected)
    if text is None:
        return default
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise section.error(key, f"{text!r} is not a range", expected)
    a, b = int(first), int(last)
    if not low <= a <= b <= high:
        raise section.error(key, f"{text!r} is out of bounds", expected)
    return a, b
