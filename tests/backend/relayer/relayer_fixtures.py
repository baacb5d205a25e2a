"""Helpers of the relayer tests: a twin with an escrow, the local relayer, a webhook sink."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from quotra.chain import eip712
from quotra.chain.client import DelegationArgs
from quotra.chain.deployment import Deployment
from quotra.webhooks import Ed25519Signer
from quotra_dev import twin as twin_module
from quotra_dev.chain import ZERO_ADDRESS, Chain, new_account, sign_authorization
from quotra_dev.relayer import RelayerConfig
from quotra_dev.relayer.local import ThreadedServer

MIN_FEE = 10_000  # 0.01 USDC


@dataclass
class ChainEnv:
    twin: twin_module.Twin
    chain: Chain
    deployment: Deployment
    deployment_file: Path
    owner: LocalAccount
    operator: LocalAccount
    gas: LocalAccount  # the local relayer's gas key

    @property
    def escrow(self) -> Any:
        return self.chain.contract("QuotraEscrow", self.deployment.escrow)

    @property
    def usdc(self) -> Any:
        return self.chain.contract("MockUSDC", self.deployment.usdc)

    def now(self) -> int:
        return int(self.chain.w3.eth.get_block("latest")["timestamp"])

    def balance(self, address: str) -> int:
        return int(self.usdc.functions.balanceOf(address).call())

    def earnings(self, address: str) -> int:
        return int(self.escrow.functions.earnings(address).call())

    def fund_provider(self, provider: str, gross: int) -> int:
        """A consumer pays `gross` per x402 and the operator settles it; returns the provider's share."""
        consumer = new_account()
        self.twin.mint_usdc(consumer.address, gross)
        auth = sign_authorization(consumer, self.deployment.usdc_domain, self.deployment.escrow, gross)
        self.chain.transact(
            self.escrow.functions.settle_authorizations([auth.payment(provider)]), self.operator
        )
        return gross - gross * self.deployment.fee_bps // 10_000

    def delegation(
        self, provider: LocalAccount, amount: int, *, signer: LocalAccount | None = None, **fields: Any
    ) -> tuple[DelegationArgs, str]:
        values: dict[str, Any] = {
            "provider": provider.address,
            "delegate": ZERO_ADDRESS,
            "payee": provider.address,
            "max_amount": amount,
            "relayer_fee": MIN_FEE,
            "valid_until": self.now() + 3600,
            "salt": secrets.randbits(64),
        }
        values.update(fields)
        delegation = DelegationArgs(**values)
        signature = eip712.sign(
            (signer or provider).key, self.deployment.escrow_domain, "Delegation", delegation.as_message()
        )
        return delegation, signature.hex


@dataclass
class Sink:
    """A webhook receiver: records what it is sent; fails the first `failures` deliveries."""

    failures: int = 0
    only: bytes | None = None  # fail only deliveries whose body contains this
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> JSONResponse:
            body = await request.body()
            self.received.append((dict(request.headers), body))
            failing = self.failures > 0 and (self.only is None or self.only in body)
            status = 500 if failing else 200
            self.failures -= failing
            self.answers.append(status)
            return JSONResponse({}, status_code=status)

        return app


@dataclass
class LocalRelayer:
    server: ThreadedServer
    config: RelayerConfig

    @property
    def url(self) -> str:
        return self.server.url + "/relayers"

    @property
    def jwks_url(self) -> str:
        return self.server.url + "/.well-known/jwks.json"

    @property
    def core(self) -> Any:
        return self.server.app.state.core

    def idle(self) -> None:
        self.server.call(self.core.idle)


def relayer_config(env: ChainEnv, **overrides: Any) -> RelayerConfig:
    values: dict[str, Any] = {
        "rpc_url": env.twin.rpc_url,
        "gas_account": env.gas,
        "chain_id": env.deployment.chain_id,
        "usdc": env.deployment.usdc,
        "targets": (env.deployment.escrow,),
        "signer": Ed25519Signer.generate(),
        "min_fee": MIN_FEE,
        "webhook_backoff": 0.05,
        "poll_interval": 0.05,
    }
    values.update(overrides)
    return RelayerConfig(**values)


async def eventually(check: Any, within: float = 15.0, every: float = 0.05) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)
