"""Relay configuration: one typed Settings object read from `QUOTRA_*` variables and `.env`.

With nothing configured the relay runs in dev mode (SQLite and a generated master key under
`./data/`); `QUOTRA_ENV=production` refuses missing or placeholder secrets instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("quotra.config")

# Public RPC endpoints of the chains the relay knows (offered to wallets, never used by the relay).
PUBLIC_RPC_URLS = {84532: "https://sepolia.base.org", 8453: "https://mainnet.base.org"}
PLACEHOLDERS = {"", "changeme", "change-me", "placeholder", "secret", "dev", "test", "xxx", "todo"}


class ConfigError(RuntimeError):
    """The configuration cannot be used (the message says what to fix)."""


def decode_master_key(value: str) -> bytes:
    """A master key is 32 bytes, written as 64 hex characters or base64 (standard or URL-safe)."""
    text = value.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        urlsafe = text.replace("+", "-").replace("/", "_").rstrip("=")
        raw = base64.b64decode(urlsafe + "=" * (-len(urlsafe) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("master key must be 32 bytes as 64 hex characters or base64") from exc
    if len(raw) != 32:
        raise ConfigError(f"master key must be 32 bytes, got {len(raw)}")
    return raw


def is_placeholder_secret(value: str | None) -> bool:
    if value is None:
        return True
    text = value.strip().lower()
    if text in PLACEHOLDERS or "changeme" in text or "placeholder" in text or "example" in text:
        return True
    return len(set(text)) <= 2  # "0000…", "aaaa…"


def master_key_id(key: bytes) -> str:
    """A short public name for a master key (stored beside each wrapped data key)."""
    return hashlib.sha256(b"quotra-kek-id|" + key).hexdigest()[:12]


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QUOTRA_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["dev", "test", "production"] = "dev"
    data_dir: Path = Path("data")
    database_url: str | None = None
    # 32 bytes (hex or base64). Previous keys stay readable until `quotra keys rotate` re-wraps.
    master_key: SecretStr | None = None
    previous_master_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    public_url: str = "http://127.0.0.1:8000"
    siwe_domain: str | None = None
    chain_id: int = 84532
    chain_rpc_url: str | None = None
    # The RPC URL the marketplace pages offer wallets (`wallet_addEthereumChain`): a public one,
    # never `chain_rpc_url` (which may carry a provider's API key). Default: the chain's public RPC.
    wallet_rpc_url: str | None = None
    deployment_file: Path | None = None
    # The deadline of one chain read (the x402 gate's, settlement's, the indexer's), one attempt:
    # an unreachable or hung node costs a paid call this long at most, then a 503.
    chain_read_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    session_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 86400)
    siwe_nonce_ttl_seconds: int = Field(default=600, ge=30, le=86400)
    # The relay's settling key (an escrow operator): the spender of prepaid SpendPermissions and
    # the sender of the relay's own transactions (DirectRelayer). Never logged.
    operator_key: SecretStr | None = None

    # Prepaid API keys (quotra.payments.prepaid).
    prepaid_key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    prepaid_max_keys_per_wallet: int = Field(default=50, ge=1)
    prepaid_refresh_seconds: float = Field(default=30.0, ge=0)  # 0 = no background refresher
    prepaid_permission_margin_seconds: int = Field(default=600, ge=0)
    prepaid_deposit_wait_seconds: float = Field(default=30.0, ge=0, le=300)
    # Auto top-up under consumers' periodic allowances (ERC-7715 style; quotra.payments.allowances):
    # when a deposit's available part is below this many USDC, redeem what the period still allows.
    allowance_low_water_usdc: Decimal = Field(default=Decimal(1), ge=0, le=Decimal(10**9))
    allowance_poll_seconds: float = Field(default=30.0, ge=0)  # 0 = no automatic top-ups

    # Relayer for gasless transactions (claims, revocations, deposits): `direct` submits with
    # operator_key; `oneshot` goes through a 1Shot-style JSON-RPC relayer (`quotra relayer` on the
    # twin) that reports back with Ed25519-signed webhooks, verified against its JWKS.
    relayer: Literal["direct", "oneshot"] = "direct"
    relayer_url: str | None = None
    relayer_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Default: <origin of relayer_url>/.well-known/jwks.json. HTTPS; http only to loopback outside production.
    relayer_jwks_url: str | None = None
    relayer_pinned_jwks: str | None = None  # a JWKS document (JSON) trusted without fetching
    relayer_webhook_url: str | None = None  # default: <public_url>/v1/webhooks/relayer
    webhook_tolerance_seconds: int = Field(default=300, ge=10, le=3600)
    jwks_cache_seconds: float = Field(default=600.0, ge=0)
    jwks_min_refetch_seconds: float = Field(default=30.0, ge=0)
    # The claims poller checks each open claim when due; with none open (another replica's) it
    # looks again this often.
    claims_poll_seconds: float = Field(default=60.0, gt=0)
    claims_stale_seconds: float = Field(default=20.0, ge=0)  # checked this long after its last news
    claims_delegation_ttl_seconds: int = Field(default=3600, ge=60)

    upstream_allow_private: bool = False
    upstream_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    upstream_denylist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    upstream_timeout_seconds: float = Field(default=60.0, gt=0, le=600)
    # A call's reservation is voided (nothing charged) if the call has not finished this long after
    # it was reserved (its relay stopped); the sweeper looks every `sweep_seconds`.
    call_timeout_seconds: float = Field(default=900.0, ge=10, le=86_400)
    sweep_seconds: float = Field(default=30.0, gt=0, le=3600)
    upstream_check_keys: bool = True
    cooldown_after_failures: int = Field(default=3, ge=1)
    cooldown_seconds: float = Field(default=60.0, ge=0)

    max_body_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000)
    max_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576)
    # Requests per minute per consumer without an API key (per process; keys have their own below).
    consumer_rate_per_minute: int = Field(default=120, ge=1)
    # Every API key's requests per minute unless the key has its own (shared by the replicas).
    key_rate_per_minute: int = Field(default=100, ge=1, le=10**9)
    # Sign-in per minute: verified sign-ins per wallet; nonce and verify requests per client address.
    signin_rate_per_minute: int = Field(default=5, ge=1)
    signin_rate_per_minute_ip: int = Field(default=20, ge=1)
    # Free playground calls: per consumer and listing, and per listing and UTC day across all
    # consumers (a listing may set its own `free_calls_per_day`; 0: none).
    playground_free_calls: int = Field(default=3, ge=0, le=1_000_000_000)
    playground_free_calls_per_day: int = Field(default=20, ge=0, le=1_000_000_000)
    sandbox_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Behind reverse proxies: the client is the address the outermost trusted proxy saw, the
    # `trusted_proxy_hops`-th entry of X-Forwarded-For from the right (each proxy appends the peer
    # it saw; the entries left of those are whatever the client wrote).
    trust_forwarded_for: bool = False
    trusted_proxy_hops: int = Field(default=1, ge=1, le=10)
    listing_cache_ttl_seconds: float = Field(default=2.0, ge=0)

    # ---- x402 per-call payments, settlement and the indexer ---------------------------------
    # The escrow and USDC come from `deployment_file` (deployments/<network>.json) unless given.
    escrow_address: str | None = None
    usdc_address: str | None = None
    escrow_start_block: int | None = Field(default=None, ge=0)
    # Instead of QUOTRA_OPERATOR_KEY (environment only): an encrypted keystore file, opened with
    # the password from the environment.
    operator_keystore: Path | None = None
    operator_keystore_password: SecretStr | None = None
    x402_enabled: bool = True
    x402_max_timeout_seconds: int = Field(default=300, ge=30, le=86_400)
    x402_settle_margin_seconds: int = Field(default=60, ge=0, le=3600)
    # How long the chain's head block is reused: each x402 call is checked against the payer's
    # balance as of that block, and what settles after it still counts as unpaid.
    x402_head_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    settlement_enabled: bool = True
    settlement_batch_size: int = Field(default=64, ge=1, le=64)  # the escrow takes at most 64
    settlement_max_age_seconds: float = Field(default=2.0, ge=0, le=3600)
    settlement_poll_seconds: float = Field(default=0.25, gt=0, le=60)
    # With nothing to settle the worker waits this long, or until this replica captures a call.
    settlement_idle_seconds: float = Field(default=5.0, gt=0, le=600)
    settlement_retry_base_seconds: float = Field(default=1.0, gt=0, le=600)
    settlement_retry_max_seconds: float = Field(default=60.0, gt=0, le=3600)
    settlement_stuck_seconds: float = Field(default=120.0, gt=0)
    indexer_enabled: bool = True
    indexer_poll_seconds: float = Field(default=2.0, gt=0, le=600)
    indexer_confirmations: int = Field(default=0, ge=0, le=1000)
    receipts_enabled: bool = True

    log_level: str = "INFO"
    log_json: bool = True
    # FastAPI's OpenTelemetry spans and metrics (for a configured OpenTelemetry SDK). Off, the relay
    # still exports Prometheus metrics at /metrics, and no request looks up OpenTelemetry's providers.
    opentelemetry: bool = False
    run_migrations_on_start: bool = True

    _split = field_validator(
        "previous_master_keys", "upstream_allowlist", "upstream_denylist", "sandbox_api_keys", mode="before"
    )(_split_list)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("public_url must be an absolute http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_relayer(self) -> Settings:
        from quotra.webhooks import check_jwks_url, parse_jwks

        if self.relayer == "oneshot" and not self.relayer_url:
            raise ValueError("QUOTRA_RELAYER=oneshot needs QUOTRA_RELAYER_URL")
        if self.effective_jwks_url:
            check_jwks_url(self.effective_jwks_url, allow_http_loopback=not self.is_production)
        if self.relayer_pinned_jwks:
            parse_jwks(json.loads(self.relayer_pinned_jwks))
        return self

    @model_validator(mode="after")
    def _check_call_timeout(self) -> Settings:
        if self.call_timeout_seconds <= self.upstream_timeout_seconds:
            raise ValueError(
                "QUOTRA_CALL_TIMEOUT_SECONDS must exceed QUOTRA_UPSTREAM_TIMEOUT_SECONDS: a call still "
                "waiting on its upstream would have its reservation voided under it"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.env != "production":
            return self
        key = self.master_key.get_secret_value() if self.master_key else None
        if is_placeholder_secret(key):
            raise ValueError(
                "QUOTRA_ENV=production needs QUOTRA_MASTER_KEY set to a real 32-byte key "
                '(generate one with: python -c "import secrets; print(secrets.token_hex(32))")'
            )
        assert key is not None
        try:
            decode_master_key(key)
        except ConfigError as exc:
            raise ValueError(f"QUOTRA_MASTER_KEY: {exc}") from exc
        for old in self.previous_master_keys:
            decode_master_key(old.get_secret_value())
        return self

    # ---- derived values, computed once -------------------------------------------------------

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'quotra.db').resolve()}"

    @property
    def effective_jwks_url(self) -> str | None:
        if self.relayer_jwks_url:
            return self.relayer_jwks_url
        if self.relayer == "oneshot" and self.relayer_url:
            parts = urlsplit(self.relayer_url)
            return f"{parts.scheme}://{parts.netloc}/.well-known/jwks.json"
        return None

    @property
    def effective_webhook_url(self) -> str:
        return self.relayer_webhook_url or f"{self.public_url}/v1/webhooks/relayer"

    @cached_property
    def public_origin(self) -> str:
        """The origin of `public_url` (scheme://host[:port]), as a browser's Origin header names it."""
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    @cached_property
    def effective_wallet_rpc_url(self) -> str | None:
        return self.wallet_rpc_url or PUBLIC_RPC_URLS.get(self.chain_id)

    @cached_property
    def expected_siwe_domain(self) -> str:
        return self.siwe_domain or urlsplit(self.public_url).netloc

    @cached_property
    def sandbox_key_set(self) -> frozenset[str]:
        return frozenset(k.get_secret_value() for k in self.sandbox_api_keys)

    def load_keyring(self) -> tuple[dict[str, bytes], str]:
        """The master keys by id and the id of the one new data keys are wrapped with.

        Dev mode with no key generates one, kept in `<data_dir>/master.key` (with a warning)."""
        if self.master_key is not None and self.master_key.get_secret_value().strip():
            primary = decode_master_key(self.master_key.get_secret_value())
        elif self.is_production:
            raise ConfigError("QUOTRA_MASTER_KEY is required in production")
        else:
            primary = self._dev_master_key()
        keys = {master_key_id(primary): primary}
        for old in self.previous_master_keys:
            raw = decode_master_key(old.get_secret_value())
            keys.setdefault(master_key_id(raw), raw)
        return keys, master_key_id(primary)

    def _dev_master_key(self) -> bytes:
        path = self.data_dir / "master.key"
        if path.exists():
            key = decode_master_key(path.read_text())
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key.hex() + "\n")
        log.warning(
            "dev mode: using the generated master key in %s; set QUOTRA_MASTER_KEY for real use", path
        )
        return key

    def write_dev_master_key(self, key: bytes) -> Path:
        """Used by `quotra keys rotate` in dev mode, where the key lives in the data folder."""
        path = self.data_dir / "master.key"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex() + "\n")
        tmp.replace(path)
        return path

    @property
    def uses_dev_master_key(self) -> bool:
        return self.master_key is None or not self.master_key.get_secret_value().strip()
