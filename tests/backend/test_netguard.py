"""SSRF guard for openai-compatible base URLs: when a listing is saved, and at connect time."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import pytest
from quotra.app import create_app
from quotra.config import Settings
from quotra.netguard import GuardedResolver, NetGuard, UnsafeUpstream
from quotra.upstream import UpstreamUnavailable
from relay_helpers import listing_body

STRICT = NetGuard.from_lists(allow_private=False, allowlist=[], denylist=[])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/v1",
        "http://10.1.2.3/v1",
        "http://192.168.0.10/v1",
        "http://172.16.5.5/v1",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata (link-local)
        "http://[::1]:8000/v1",
        "http://[fe80::1]/v1",
        "http://[::ffff:127.0.0.1]/v1",  # IPv4-mapped loopback
        "http://0.0.0.0/v1",
        "http://100.64.0.1/v1",  # carrier-grade NAT
        "http://localhost:11434/v1",  # resolves to loopback
    ],
)
async def test_internal_addresses_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUpstream):
        await STRICT.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://93.184.216.34/",
        "file:///etc/passwd",
        "http://user:pw@93.184.216.34/",
        "http:///v1",
        "http://93.184.216.34:99999/",
        "http://[::1/v1",  # urlsplit raises
        "http://a..example/v1",  # an empty label: IDNA refuses it before any lookup
        "http://" + "a" * 64 + ".example/v1",  # a label longer than 63
    ],
)
async def test_malformed_or_credentialed_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUpstream):
        await STRICT.check_url(url)


async def test_unresolvable_host_is_refused() -> None:
    with pytest.raises(UnsafeUpstream, match="does not resolve"):
        await STRICT.check_url("http://no-such-host.invalid/v1")


async def test_public_address_is_accepted() -> None:
    assert await STRICT.check_url("https://93.184.216.34/v1/") == "https://93.184.216.34/v1"


async def test_operator_can_allow_private_networks_hosts_or_cidrs() -> None:
    assert await NetGuard.from_lists(allow_private=True, allowlist=[], denylist=[]).check_url(
        "http://127.0.0.1:1/v1"
    )
    by_host = NetGuard.from_lists(allow_private=False, allowlist=["localhost"], denylist=[])
    assert await by_host.check_url("http://localhost:11434/v1")
    by_net = NetGuard.from_lists(allow_private=False, allowlist=["10.0.0.0/8"], denylist=[])
    assert await by_net.check_url("http://10.9.9.9/v1")
    with pytest.raises(UnsafeUpstream):
        await by_net.check_url("http://192.168.1.1/v1")


async def test_denylist_wins_even_for_public_addresses() -> None:
    guard = NetGuard.from_lists(
        allow_private=True, allowlist=[], denylist=["93.184.216.0/24", "blocked.example"]
    )
    with pytest.raises(UnsafeUpstream):
        await guard.check_url("http://93.184.216.34/v1")
    with pytest.raises(UnsafeUpstream):
        await guard.check_url("http://blocked.example/v1")


async def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    async def resolve(self: NetGuard, host: str, port: int) -> list:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.1")]

    monkeypatch.setattr(NetGuard, "resolve", resolve)
    with pytest.raises(UnsafeUpstream, match=r"10\.0\.0\.1"):
        await STRICT.check_url("http://mixed.example/v1")


async def test_resolver__name_resolving_to_loopback__refused_unless_allowed() -> None:
    with pytest.raises(UnsafeUpstream, match=r"localhost resolves to .*\(127\.0\.0\.1\)"):
        await GuardedResolver(STRICT).resolve("localhost", 80)

    for guard in (
        NetGuard.from_lists(allow_private=True, allowlist=[], denylist=[]),
        NetGuard.from_lists(allow_private=False, allowlist=["localhost"], denylist=[]),
    ):
        results = await GuardedResolver(guard).resolve("localhost", 80)
        assert results and all(ipaddress.ip_address(r["host"]).is_loopback for r in results)


async def test_resolver__denied_name__refused_before_resolving() -> None:
    guard = NetGuard.from_lists(allow_private=True, allowlist=[], denylist=["blocked.example"])

    with pytest.raises(UnsafeUpstream, match=r"blocked\.example is denied"):
        await GuardedResolver(guard).resolve("Blocked.Example.", 443)


@pytest.mark.parametrize(
    ("allow_private", "refusal"),
    [(False, "address refused: base_url host localhost"), (True, "could not connect")],
)
async def test_relay_upstream_calls__connect_through_the_guard(
    make_settings: Callable[..., Settings], allow_private: bool, refusal: str
) -> None:
    # An openai-compatible listing saved while its name resolved to a public address, later
    # resolving to loopback: refused when private networks are not allowed, tried when they are.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    app = create_app(make_settings(upstream_allow_private=allow_private, prepaid_refresh_seconds=0))
    async with app.router.lifespan_context(app):
        adapters = app.state.runtime.listings.adapters
        adapter = adapters.get("openai-compatible", f"http://localhost:{closed_port}/v1")

        with pytest.raises(UpstreamUnavailable, match=refusal):
            await adapter.check_key("")


async def test_listing_with_loopback_base_url_is_refused_over_http(relay) -> None:
    _, headers = await relay.provider()
    body = listing_body(kind="openai-compatible", base_url="http://127.0.0.1:11434/v1", api_key="sk-x")
    reply = await relay.client.post("/v1/listings", json=body, headers=headers)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "unsafe_base_url" and reply.json()["error"]["param"] == "base_url"
    assert relay.upstream.keys_seen == []  # refused before any upstream contact


async def test_listing_with_allowed_private_base_url_is_created(start_relay) -> None:
    async with start_relay(upstream_allow_private=True) as relay:
        _, headers = await relay.provider()
        body = listing_body(kind="openai-compatible", base_url="http://127.0.0.1:11434/v1/", api_key="sk-x")
        reply = await relay.client.post("/v1/listings", json=body, headers=headers)
        assert reply.status_code == 201
        assert reply.json()["base_url"] == "http://127.0.0.1:11434/v1"
