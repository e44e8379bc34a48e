"""The outbound address policy: which addresses count as public, and the resolver that refuses the rest."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from mcpguard.oauth.public_addresses import NonPublicAddress, PublicAddressResolver, is_public_address


class StaticResolver(AbstractResolver):
    """Answers from a fixed table, as a DNS server under an attacker's control would; counts its closes."""

    def __init__(self, answers: Mapping[str, Sequence[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.closed = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The table's addresses for ``host``; an unknown host fails like an NXDOMAIN."""
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        """Count the close, so ownership can be checked."""
        self.closed += 1


NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.0.9",
    "0.0.0.0",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "192.0.0.170",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.251",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::127.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::192.168.0.1",
    "64:ff9b:1::808:808",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "100::1",
    "2001:db8::1",
    "2001::1",
    "3fff::1",
    "not-an-address",
    "",
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",
    "100.128.0.0",
    "172.32.0.1",
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_internal_and_special_addresses_are_not_public(address: str) -> None:
    """Loopback, private, link-local, CGNAT, multicast, reserved and their IPv6 wrappings are all refused."""
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_global_unicast_addresses_are_public(address: str) -> None:
    """Ordinary internet addresses, also when carried in a mapped, NAT64 or 6to4 IPv6 address, pass."""
    assert is_public_address(address)


def test_public_answer_passes_through_unchanged() -> None:
    """A host whose every address is public resolves to exactly what the wrapped resolver said."""
    inner = StaticResolver({"client.example": ["93.184.215.14", "2606:4700:4700::1111"]})

    async def resolve() -> list[ResolveResult]:
        return await PublicAddressResolver(inner).resolve("client.example", 443, socket.AF_UNSPEC)

    assert [result["host"] for result in asyncio.run(resolve())] == ["93.184.215.14", "2606:4700:4700::1111"]


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize(
    "answer", [["127.0.0.1"], ["93.184.215.14", "10.0.0.1"], ["2606:4700:4700::1111", "::ffff:169.254.169.254"], []]
)
def test_answer_with_any_internal_address_refused(answer: list[str]) -> None:
    """One internal address in the answer refuses the host, rather than being filtered out of it."""
    guard = PublicAddressResolver(StaticResolver({"rebind.example": answer}))
    with pytest.raises(NonPublicAddress) as refused:
        asyncio.run(guard.resolve("rebind.example", 443))
    assert refused.value.host == "rebind.example"


def test_wrapped_resolver_closed_only_when_owned() -> None:
    """Closing the guard closes the resolver it wraps only when it was given ownership."""
    shared, owned = StaticResolver({}), StaticResolver({})

    async def close_both() -> None:
        await PublicAddressResolver(shared).close()
        await PublicAddressResolver(owned, owns=True).close()

    asyncio.run(close_both())
    assert (shared.closed, owned.closed) == (0, 1)
