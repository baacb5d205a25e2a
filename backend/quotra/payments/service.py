"""Payments wiring: from the settings to a configured x402 gate, settlement worker and indexer.

`Payments` is created in the app's lifespan (and by `quotra settle` / `quotra reconcile`). With a
chain RPC and an escrow (`QUOTRA_ESCROW_ADDRESS`, or the deployment file) it reads USDC's EIP-712
domain from the chain once and offers x402; with the operator key it also settles. When the chain
cannot be reached at start the relay still serves (playground, API keys) and connects later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from quotra.calls.outbox import Outbox
from quotra.calls.store import CallStore
from quotra.chain.client import EscrowClient, USDCDomainMismatch
from quotra.chain.deployment import BASE_SEPOLIA_USDC, KNOWN_USDC, Deployment, DeploymentError
from quotra.chain.relayer import DirectRelayer, Relayer
from quotra.config import ConfigError, Settings
from quotra.metrics import Metrics
from quotra.payments import x402
from quotra.payments.indexer import EscrowEvents, Indexer
from quotra.payments.receipts import ReceiptSigner
from quotra.payments.settlement import LeaderLock, SettlementConfig, SettlementWorker
from quotra.payments.x402_gate import X402Gate
from quotra.store.repositories import Store

log = logging.getLogger("quotra.payments")
RECONNECT_MAX = 5.0  # seconds between two tries to reach a chain that was down at start


@dataclass(frozen=True)
class EscrowLocation:
    escrow: str
    usdc: str
    start_block: int


def escrow_location(settings: Settings) -> EscrowLocation | None:
    """Where the escrow is: the settings, else the deployment file; None when not configured."""
    if settings.escrow_address:
        usdc = settings.usdc_address or KNOWN_USDC.get(settings.chain_id, BASE_SEPOLIA_USDC)
        return EscrowLocation(
            to_checksum_address(settings.escrow_address),
            to_checksum_address(usdc),
            settings.escrow_start_block or 0,
        )
    if settings.deployment_file is not None:
        try:
            deployment = Deployment.load(settings.deployment_file)
        except DeploymentError as exc:
            log.warning("x402 disabled: %s", exc)
            return None
        start = settings.escrow_start_block if settings.escrow_start_block is not None else deployment.block
        return EscrowLocation(deployment.escrow, settings.usdc_address or deployment.usdc, start)
    return None


def load_operator(settings: Settings) -> LocalAccount | None:
    """The operator's settling key: `QUOTRA_OPERATOR_KEY`, or an encrypted keystore file
    (`QUOTRA_OPERATOR_KEYSTORE`) opened with `QUOTRA_OPERATOR_KEYSTORE_PASSWORD`. The key is
    never logged and never part of an error message."""
    if settings.operator_key is not None and settings.operator_key.get_secret_value().strip():
        try:
            account: LocalAccount = Account.from_key(settings.operator_key.get_secret_value().strip())
        except (ValueError, TypeError) as exc:
            raise ConfigError("QUOTRA_OPERATOR_KEY is not a valid secp256k1 private key") from exc
        return account
    if settings.operator_keystore is not None:
        if settings.operator_keystore_password is None:
            raise ConfigError("QUOTRA_OPERATOR_KEYSTORE needs QUOTRA_OPERATOR_KEYSTORE_PASSWORD")
        try:
            keystore = settings.operator_keystore.read_text(encoding="utf-8")
            key = Account.decrypt(keystore, settings.operator_keystore_password.get_secret_value())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot open the operator keystore {settings.operator_keystore}") from exc
        opened: LocalAccount = Account.from_key(key)
        return opened
    return None


class Payments:
    """The x402 gate, the settlement worker and the indexer of one relay process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        calls: CallStore,
        outbox: Outbox,
        client: EscrowClient | None = None,
        relayer: Relayer | None = None,
    ) -> None:
        """`client` and `relayer`: the app's own, when it has them. A `DirectRelayer` is shared so
        that one process never hands out the operator's transaction nonces twice."""
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self._app_client = client
        self._app_relayer = relayer
        self.outbox = outbox
        self.calls = calls
        self.gate = X402Gate(
            calls, metrics, public_url=settings.public_url, head_ttl=settings.x402_head_cache_seconds
        )
        self.location = escrow_location(settings) if settings.chain_rpc_url else None
        if client is not None and self.location is None:
            start = settings.escrow_start_block or 0
            self.location = EscrowLocation(client.escrow_address, client.usdc_address, start)
        self.gate.offered = self.configured
        self.client: EscrowClient | None = None
        self.operator: LocalAccount | None = None
        self.relayer: Relayer | None = None
        self.worker: SettlementWorker | None = None
        self.indexer: Indexer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def configured(self) -> bool:
        return self.settings.x402_enabled and self.location is not None

    def settlement_config(self) -> SettlementConfig:
        s = self.settings
        return SettlementConfig(
            batch_size=s.settlement_batch_size,
            max_age=s.settlement_max_age_seconds,
            poll=s.settlement_poll_seconds,
            idle=s.settlement_idle_seconds,
            retry_base=s.settlement_retry_base_seconds,
            retry_max=s.settlement_retry_max_seconds,
            stuck_after=s.settlement_stuck_seconds,
        )

    async def start(self, *, background: bool = True) -> None:
        """Connects to the chain (or keeps trying in the background) and starts the workers."""
        if not self.configured:
            return
        assert self.location is not None and self.settings.chain_rpc_url is not None
        self.operator = load_operator(self.settings)
        self.client = self._app_client or EscrowClient.connect(
            self.settings.chain_rpc_url,
            escrow=self.location.escrow,
            usdc=self.location.usdc,
            chain_id=self.settings.chain_id,
            timeout=self.settings.chain_read_timeout_seconds,
        )
        try:
            await asyncio.wait_for(self._connect(background=background), timeout=5)
        except Exception as exc:
            if not background:
                raise
            log.error("chain not reachable; x402 starts when it is", extra={"error": f"{type(exc).__name__}"})
            self._tasks.append(asyncio.create_task(self._connect_later()))

    async def _connect_later(self) -> None:
        """Tries again every second or two (at most `RECONNECT_MAX` apart): x402, settlement and
        the indexer start within seconds of the chain's return."""
        delay = 1.0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._connect(background=True), timeout=15)
                log.info("chain reachable: x402 on")
                return
            except Exception:
                delay = min(RECONNECT_MAX, delay * 2)

    async def _connect(self, *, background: bool) -> None:
        client, location, settings = self.client, self.location, self.settings
        assert client is not None and location is not None
        chain_id = await client.chain_id_onchain()
        if chain_id != settings.chain_id:
            raise ConfigError(
                f"the chain RPC serves chain {chain_id}, QUOTRA_CHAIN_ID is {settings.chain_id}"
            )
        try:
            domain = await client.usdc_domain()
        except USDCDomainMismatch as exc:
            raise ConfigError(str(exc)) from exc
        terms = x402.PaymentTerms(
            chain_id=chain_id,
            asset=location.usdc,
            asset_name=domain.name,
            asset_version=domain.version,
            pay_to=location.escrow,
            max_timeout_seconds=settings.x402_max_timeout_seconds,
            settle_margin_seconds=settings.x402_settle_margin_seconds,
        )
        receipts = None
        if self.operator is not None and settings.receipts_enabled:
            receipts = ReceiptSigner(bytes(self.operator.key))
        events = EscrowEvents(client, location.start_block)  # the worker's and the indexer's
        if self.operator is not None and settings.settlement_enabled:
            if not await client.is_operator(self.operator.address):
                log.warning("the operator key is not an operator of the escrow: settlements will be refused")
            shared = self._app_relayer
            if isinstance(shared, DirectRelayer) and shared.address == self.operator.address:
                self.relayer = shared
            else:
                self.relayer = DirectRelayer(client.w3, self.operator, chain_id=chain_id)
            self.worker = SettlementWorker(
                self.outbox,
                client,
                self.relayer,
                self.settlement_config(),
                metrics=self.metrics,
                start_block=location.start_block,
                lock=LeaderLock(self.store.engine),
                events=events,
            )
        elif self.operator is None:
            log.warning("x402 is on but nothing settles: set QUOTRA_OPERATOR_KEY (or a keystore)")
        self.indexer = Indexer(
            self.outbox,
            client,
            self.metrics,
            start_block=location.start_block,
            confirmations=settings.indexer_confirmations,
            poll=settings.indexer_poll_seconds,
            events=events,
        )
        self.gate.configure(client, terms, receipts)
        if background:
            if self.worker is not None:
                self.calls.on_capture.append(self.worker.wake)
                self._tasks.append(asyncio.create_task(self.worker.run(self._stop)))
            if settings.indexer_enabled:
                self._tasks.append(asyncio.create_task(self.indexer.run(self._stop)))
        log.info(
            "x402 on",
            extra={
                "network": terms.network,
                "escrow": terms.pay_to,
                "usdc": f"{terms.asset} ({terms.asset_name} v{terms.asset_version})",
                "settling": self.worker is not None,
            },
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=10)
            for task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        if self.client is not None and self.client is not self._app_client:
            with contextlib.suppress(Exception):
                await self.client.close()
