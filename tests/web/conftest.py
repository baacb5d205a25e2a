"""The marketplace in a real browser: headless Chromium from Debian (`apt-get install chromium`),
driven by Playwright for Python, against `quotra serve` as a real process on the Base Sepolia twin
(the escrow deployed, the operator settling and relaying). Wallets are `InjectedWallet`s: EIP-1193
providers in the page whose signatures eth-account makes in this process.

The Makefile runs these tests only where Chromium is installed (and says so where it is not);
`QUOTRA_CHROMIUM` names another binary. Screenshots go to `QUOTRA_SCREENSHOTS` (default
`.cache/screenshots`); `docs/screenshots/` holds the ones the README shows."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS / "backend", TESTS / "e2e"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from browser_wallet import InjectedWallet  # noqa: E402
from e2e_helpers import OnChain, deploy_escrow  # noqa: E402
from eth_account import Account  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright  # noqa: E402
from quotra.chain.deployment import DelegationFramework, Deployment  # noqa: E402
from quotra_dev import twin  # noqa: E402
from relay_helpers import listing_body, sign  # noqa: E402
from relays import RelayProcess, free_port, relay_env  # noqa: E402

FREE_CALLS = 2
SCREENSHOTS = Path(os.environ.get("QUOTRA_SCREENSHOTS", TESTS.parent / ".cache" / "screenshots"))


def chromium_path() -> str | None:
    return os.environ.get("QUOTRA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Market:
    url: str
    onchain: OnChain
    framework: DelegationFramework

    def upgrade(self, account: LocalAccount) -> None:
        """Make `account` a MetaMask smart account (EIP-7702 to the stateless DeleGator), as a
        wallet that can sign authorizations would; the escrow's owner sends and pays for the
        type-4 transaction, so the account still holds no ETH."""
        self.onchain.chain.upgrade(account, self.framework.stateless_delegator, self.onchain.owner)

    def eth(self, address: str) -> int:
        return int(self.onchain.chain.w3.eth.get_balance(address))  # type: ignore[arg-type]

    def usdc(self, address: str) -> int:
        return self.onchain.balance(address)

    def deposit(self, address: str) -> int:
        return int(self.onchain.escrow.functions.deposits(address).call())

    def sign_in(self, client: httpx.Client, account: LocalAccount) -> dict[str, str]:
        """An API client's SIWE session (the pages' Playwright event loop rules out asyncio here)."""
        message = client.post("/v1/auth/nonce", json={"address": account.address}).json()["message"]
        reply = client.post("/v1/auth/verify", json={"message": message, "signature": sign(account, message)})
        assert reply.status_code == 200, reply.text
        return {"Authorization": f"Bearer {reply.json()['access_token']}"}

    def create_listing(self, provider: LocalAccount, **body: Any) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            headers = self.sign_in(client, provider)
            reply = client.post("/v1/listings", json=listing_body(**body), headers=headers)
            assert reply.status_code == 201, reply.text
            return dict(reply.json())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QUOTRA_") and key not in ("QUOTRA_CHROMIUM", "QUOTRA_SCREENSHOTS"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    """The twin, the escrow, and `quotra serve` on it: the operator settles and is the relayer.
    The escrow has no withdrawal delay, so that a withdrawal requested on the page can be completed
    at once (the delay itself is the contract tests' business). The deployment file records
    MetaMask's Delegation Framework on the twin: ERC-7710 claims and periodic allowances are on."""
    tmp = tmp_path_factory.mktemp("market")
    with twin.start() as chain_:
        onchain = deploy_escrow(chain_, withdrawal_delay=0)
        assert chain_.framework is not None
        deployment = Deployment(
            network="base-sepolia-twin",
            chain_id=onchain.chain.chain_id,
            escrow=onchain.escrow.address,
            usdc=onchain.usdc.address,
            usdc_name="USDC",
            usdc_version="2",
            owner=onchain.owner.address,
            operators=(onchain.operator.address,),
            block=onchain.start_block,
            tx_hash="0x" + "00" * 32,
            fee_bps=int(onchain.escrow.functions.fee_bps().call()),
            withdrawal_delay=0,
            refund_window=86_400,
            delegation_framework=chain_.framework,
        )
        port = free_port()
        env = relay_env(
            onchain,
            f"sqlite+aiosqlite:///{tmp / 'relay.db'}",
            port,
            tmp / "data",
            QUOTRA_DEPLOYMENT_FILE=str(deployment.save(tmp / "base-sepolia-twin.json")),
            QUOTRA_ALLOWANCE_POLL_SECONDS="0.3",
            QUOTRA_PLAYGROUND_FREE_CALLS=str(FREE_CALLS),
            QUOTRA_WALLET_RPC_URL=chain_.rpc_url,
            QUOTRA_CLAIMS_POLL_SECONDS="0.3",
            QUOTRA_CLAIMS_STALE_SECONDS="0.5",
            QUOTRA_PREPAID_DEPOSIT_WAIT_SECONDS="20",
            QUOTRA_UPSTREAM_ALLOW_PRIVATE="true",
        )
        relay = RelayProcess("web-relay", env, port, tmp)
        relay.start()
        try:
            yield Market(relay.url, onchain, chain_.framework)
        finally:
            relay.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    assert executable, "Chromium is not installed (apt-get install chromium); the Makefile skips these tests"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@dataclass
class Person:
    """Someone at the browser: a wallet, a page, and what the page reported as broken."""

    wallet: InjectedWallet
    context: BrowserContext
    page: Page
    errors: list[str]

    @property
    def address(self) -> str:
        return self.wallet.address

    def signed_in(self, path: str) -> Page:
        """The page at `path`, its wallet connected and signed in with Ethereum."""
        self.page.goto(path)
        self.page.get_by_role("button", name="Connect Test Wallet").click()
        self.page.get_by_role("button", name="Sign in").click()
        return self.page

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def person(browser: Browser, market: Market) -> Iterator[Any]:
    """`person(account=None, **context options)`: a fresh browser context with its own wallet."""
    opened: list[Person] = []

    def open_(account: LocalAccount | None = None, **options: Any) -> Person:
        options.setdefault("viewport", {"width": 1280, "height": 900})
        options.setdefault("locale", "en-US")  # dates as the tests read them, whatever the machine's
        options.setdefault("timezone_id", "UTC")
        context = browser.new_context(base_url=market.url, **options)
        context.set_default_timeout(20_000)
        wallet = InjectedWallet(account or Account.create())
        wallet.install(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # CSP violations and failed module loads are console errors; refused API calls (401 for
        # "not signed in", 402 offers) are the pages' normal answers and say so on the page.
        page.on(
            "console",
            lambda message: (
                errors.append(message.text)
                if message.type == "error" and "Failed to load resource" not in message.text
                else None
            ),
        )
        opened.append(Person(wallet, context, page, errors))
        return opened[-1]

    yield open_
    for one in opened:
        one.context.close()
