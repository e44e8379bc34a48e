"""Which IP addresses an outbound fetch may reach, and an aiohttp resolver that enforces it at connect time.

A URL a client chooses must never make the server call its own loopback, a private network or the cloud
metadata service (SSRF); the check runs on the addresses the socket will actually use, so a DNS answer
that changes between a check and the connection (DNS rebinding) cannot slip past it.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["NonPublicAddress", "PublicAddressResolver", "is_public_address"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA IPv4 special-purpose registry entries that are not globally reachable, plus multicast and the
# reserved 240/4 (which holds the limited broadcast address).
_IPV4_REFUSED = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", including the unspecified address
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, where cloud metadata services answer
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255
    )
)

# Only 2000::/3 is allocated as global unicast; everything outside it (loopback, unspecified, ULA,
# link-local, site-local, multicast, discard-only, IPv4-compatible) is refused wholesale.
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_IPV6_REFUSED = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001::/23",  # IETF protocol assignments, including Teredo
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): translates into the operator's own networks
    )
)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known prefix (RFC 6052): the last 32 bits are IPv4
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def _ipv4_public(address: ipaddress.IPv4Address) -> bool:
    return not any(address in net for net in _IPV4_REFUSED)


def is_public_address(address: str | _IPAddress) -> bool:
    """Whether ``address`` is a globally reachable unicast address, looking through IPv6 forms of IPv4.

    An IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 address is judged by the IPv4 address it carries, so
    ``::ffff:127.0.0.1`` and ``64:ff9b::a9fe:a9fe`` are refused like ``127.0.0.1`` and ``169.254.169.254``.
    A string that is not an IP address is not public.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return False
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_public(address)
    # A zone index (fe80::1%eth0) does not change which network the address is in.
    address = ipaddress.IPv6Address(address.packed)
    if address in _IPV4_MAPPED or address in _NAT64:
        return _ipv4_public(ipaddress.IPv4Address(address.packed[-4:]))
    if address in _SIX_TO_FOUR:
        return _ipv4_public(ipaddress.IPv4Address(address.packed[2:6]))
    return address in _IPV6_GLOBAL_UNICAST and not any(address in net for net in _IPV6_REFUSED)


class NonPublicAddress(OSError):
    """A host resolved to an address that is not public; raised where aiohttp expects resolver failures."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves to an address that is not public")
        self.host = host


class PublicAddressResolver(AbstractResolver):
    """Resolves through ``resolver`` and refuses a host when any of its addresses is not public.

    Given to an aiohttp ``TCPConnector``, it is on the path of every connection to a named host, so the
    socket only ever connects to an address that passed the check. aiohttp does not resolve IP literals,
    so a URL whose host is an address must be checked with ``is_public_address`` before the request.
    The whole answer is refused rather than filtered: a host that names any internal address is treated
    as hostile, as it is when a rebinding setup mixes a public record with a private one.
    """

    __slots__ = ("_owns", "_resolver")

    def __init__(self, resolver: AbstractResolver, *, owns: bool = False) -> None:
        self._resolver = resolver
        self._owns = owns

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses of ``host``, all public; raises ``NonPublicAddress`` otherwise."""
        results = await self._resolver.resolve(host, port, family)
        if not results or not all(is_public_address(result["host"]) for result in results):
            raise NonPublicAddress(host)
        return results

    async def close(self) -> None:
        """Close the wrapped resolver when this one was given ownership of it."""
        if self._owns:
            await self._resolver.close()
