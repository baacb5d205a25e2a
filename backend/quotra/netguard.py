"""SSRF guard for provider-supplied base URLs (`openai-compatible` listings).

Every address a host name resolves to must be public, unless the operator allows private
networks or lists the host/network explicitly. A listing's base URL is checked when it is saved,
and again on every connection by `GuardedResolver`, so a name that later resolves elsewhere (DNS
rebinding) cannot reach an internal address. Name resolution runs in the loop's executor.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from quotra.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeUpstream(BadRequest):
    code = "unsafe_base_url"


def _parse_rules(entries: list[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.lower().rstrip("."))
    return frozenset(hosts), tuple(networks)


def _is_internal(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return _is_internal(mapped)
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


@dataclass(frozen=True)
class NetGuard:
    allow_private: bool = False
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_hosts: frozenset[str] = frozenset()
    deny_networks: tuple[IPNetwork, ...] = ()
    require_https: bool = False

    @classmethod
    def from_lists(
        cls, *, allow_private: bool, allowlist: list[str], denylist: list[str], require_https: bool = False
    ) -> NetGuard:
        allow_hosts, allow_networks = _parse_rules(allowlist)
        deny_hosts, deny_networks = _parse_rules(denylist)
        return cls(allow_private, allow_hosts, allow_networks, deny_hosts, deny_networks, require_https)

    def check_host(self, host: str) -> None:
        if host in self.deny_hosts:
            raise UnsafeUpstream(f"base_url host {host} is denied", param="base_url")

    def check_address(self, host: str, address: IPAddress) -> None:
        if any(address in net for net in self.deny_networks):
            raise UnsafeUpstream(f"base_url host {host} resolves to a denied address", param="base_url")
        if not _is_internal(address):
            return
        if (
            self.allow_private
            or host in self.allow_hosts
            or any(address in net for net in self.allow_networks)
        ):
            return
        raise UnsafeUpstream(
            f"base_url host {host} resolves to a private, loopback or link-local address ({address})",
            param="base_url",
        )

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5.0)
        except (OSError, TimeoutError, UnicodeError) as exc:  # UnicodeError: not a valid host name (IDNA)
            raise UnsafeUpstream(f"base_url host {host} does not resolve", param="base_url") from exc
        return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]

    async def check_url(self, url: str) -> str:
        """Returns the normalised URL or raises `UnsafeUpstream`."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise UnsafeUpstream("base_url is not a URL", param="base_url") from exc
        if parts.scheme not in ("http", "https"):
            raise UnsafeUpstream("base_url must be http(s)", param="base_url")
        if self.require_https and parts.scheme != "https":
            raise UnsafeUpstream("base_url must use https", param="base_url")
        if parts.username or parts.password:
            raise UnsafeUpstream("base_url must not contain credentials", param="base_url")
        try:
            host = (parts.hostname or "").lower().rstrip(".")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise UnsafeUpstream("base_url has a bad port", param="base_url") from exc
        if not host:
            raise UnsafeUpstream("base_url needs a host", param="base_url")
        self.check_host(host)
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            if host in self.allow_hosts:
                return url.rstrip("/")
            addresses = await self.resolve(host, port)
        if not addresses:
            raise UnsafeUpstream(f"base_url host {host} does not resolve", param="base_url")
        for address in addresses:
            self.check_address(host, address)
        return url.rstrip("/")


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, refusing (with `UnsafeUpstream`) a name the guard denies or
    that resolves to any address it refuses. aiohttp caches what passed, and never asks a
    resolver about an IP literal: `check_url` vetted those when the listing was saved."""

    def __init__(self, guard: NetGuard) -> None:
        self._guard = guard
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        self._guard.check_host(name)
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            self._guard.check_address(name, ipaddress.ip_address(result["host"].split("%")[0]))
        return results

    async def close(self) -> None:
        await self._resolver.close()
