"""Which addresses are public: the egress policy's test for every address a host resolves to."""

from __future__ import annotations

import ipaddress


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_problem(address: str) -> str | None:
    """Why an address is not a public one (None: it is)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip in ipaddress.ip_network("::/96"):
            return f"{ip} is an IPv4-compatible address (deprecated, not public)"
        if embedded is not None:
            inner = address_problem(str(embedded))
            return f"{ip} embeds {inner}" if inner else None
    for test, label in (
        ("is_unspecified", "unspecified"), ("is_loopback", "loopback"), ("is_link_local", "link-local"),
        ("is_multicast", "multicast"), ("is_private", "private"), ("is_reserved", "reserved"),
    ):
        if getattr(ip, test):
            return f"{ip} is a {label} address"
    if ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10"):
        return f"{ip} is a carrier-grade NAT address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None
