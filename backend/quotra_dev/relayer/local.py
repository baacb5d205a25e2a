"""Serving an ASGI app on a local port from a background thread (the demo and the tests run the
relay and the local relayer in one process this way, over real HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import uvicorn
from eth_account.signers.local import LocalAccount
from quotra.chain.deployment import BASE_SEPOLIA_USDC, Deployment

from quotra_dev.chain import Chain

T = TypeVar("T")


class ThreadedServer:
    """uvicorn on 127.0.0.1:`port` in a thread with its own event loop; `start()`/`stop()` may be
    repeated (a relayer that goes down and comes back on the same port)."""

    def __init__(self, app: Any, port: int, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> ThreadedServer:
        config = uvicorn.Config(
            self._asgi,
            host=self.host,
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            interface="asgi3",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"uvicorn-{self.port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the server on port {self.port} did not start within {timeout} s")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the first call of a (re)started server
            self._loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server thread's event loop (to run coroutines against the app's state)."""
        if self._loop is None:
            raise RuntimeError("the server is not running")
        return self._loop

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def deploy_escrow(
    rpc_url: str,
    owner: LocalAccount,
    operators: tuple[str, ...] = (),
    *,
    usdc: str = BASE_SEPOLIA_USDC,
    network: str = "base-sepolia-twin",
    withdrawal_delay: int = 3600,
    refund_window: int = 86_400,
) -> Deployment:
    """Deploy an escrow on a local chain with web3 (no ape) and return its deployment record."""
    chain = Chain(rpc_url)
    escrow = chain.deploy("QuotraEscrow", owner, usdc, withdrawal_delay, refund_window)
    receipt = None
    for operator in operators:
        receipt = chain.transact(escrow.functions.set_operator(operator, True), owner)
    token = chain.contract("MockUSDC", usdc)
    block = chain.w3.eth.block_number if receipt is None else receipt["blockNumber"]
    return Deployment(
        network=network,
        chain_id=chain.chain_id,
        escrow=escrow.address,
        usdc=usdc,
        usdc_name=token.functions.name().call(),
        usdc_version=token.functions.version().call(),
        owner=owner.address,
        operators=operators,
        block=max(0, block - len(operators) - 1),
        tx_hash="0x" + "00" * 32,
        fee_bps=escrow.functions.fee_bps().call(),
        withdrawal_delay=withdrawal_delay,
        refund_window=refund_window,
    )
