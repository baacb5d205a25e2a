"""The local Base Sepolia twin: an anvil with chain id 84532 and MockUSDC at the real USDC address.

Scripts, tests and the demo start and stop the twin through this module, so wallets, the x402
SDK and the relay see exactly the chain id (`eip155:84532`), token address and EIP-712 domain
(name "USDC", version "2") they see on Base Sepolia, and MetaMask's Delegation Framework at its
Base Sepolia addresses (`quotra_dev.framework`), on the Prague hardfork so that EOAs can become
smart accounts with EIP-7702.

    with twin.start() as chain:
        w3 = chain.web3()
        ...

The dev accounts are anvil's default ones, derived from the public test mnemonic
``test test ... junk``: their keys are published everywhere and must never hold real value.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NamedTuple

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from quotra.chain.deployment import DelegationFramework
from web3 import Web3

BASE_SEPOLIA_CHAIN_ID: Final = 84532
# Circle's USDC on Base Sepolia (FiatToken v2.2, EIP-712 domain "USDC" / "2").
BASE_SEPOLIA_USDC: Final = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
USDC_NAME: Final = "USDC"
USDC_VERSION: Final = "2"
USDC_DECIMALS: Final = 6

# Vyper 0.4.3's default EVM target; @nonreentrant uses transient storage (Cancun+).
HARDFORK: Final = "prague"
ANVIL_MNEMONIC: Final = "test test test test test test test test test test test junk"


class DevAccount(NamedTuple):
    """An anvil dev account: a PUBLIC test key, funded only on the local twin."""

    address: str
    private_key: str


DEV_ACCOUNT_COUNT: Final = 10


def _derive_dev_accounts(count: int) -> tuple[DevAccount, ...]:
    """anvil's accounts for ANVIL_MNEMONIC (m/44'/60'/0'/0/i), derived here so that no key
    is written in any file. They are public test keys all the same."""
    Account.enable_unaudited_hdwallet_features()
    accounts = []
    for i in range(count):
        acct = Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        accounts.append(DevAccount(acct.address, "0x" + bytes(acct.key).hex()))
    return tuple(accounts)


DEV_ACCOUNTS: Final[tuple[DevAccount, ...]] = _derive_dev_accounts(DEV_ACCOUNT_COUNT)

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
MOCK_USDC_SOURCE: Final = "contracts/test/MockUSDC.vy"

_EIP712_DOMAIN_TYPEHASH: Final = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


class TwinError(RuntimeError):
    """The twin could not be started or is not what it claims to be."""


def usdc_domain_separator(
    chain_id: int = BASE_SEPOLIA_CHAIN_ID, verifying_contract: str = BASE_SEPOLIA_USDC
) -> bytes:
    """The EIP-712 domain separator FiatToken computes for (name "USDC", version "2")."""
    return keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                _EIP712_DOMAIN_TYPEHASH,
                keccak(text=USDC_NAME),
                keccak(text=USDC_VERSION),
                chain_id,
                to_checksum_address(verifying_contract),
            ],
        )
    )


def fresh_wallet() -> LocalAccount:
    """A new random wallet with no ETH: a consumer who holds only USDC."""
    return Account.create()


def find_anvil() -> str:
    """The anvil binary: $QUOTRA_ANVIL, the npm-pinned one in node_modules, then $PATH.

    The native binary of the npm package is preferred over its node wrapper: one process
    less to start and to kill.
    """
    if env := os.environ.get("QUOTRA_ANVIL"):
        return env
    for root in (REPO_ROOT, Path.cwd()):
        modules = root / "node_modules"
        for native in sorted(modules.glob("@foundry-rs/anvil-*/bin/anvil")):
            if os.access(native, os.X_OK):
                return str(native)
        wrapper = modules / ".bin" / "anvil"
        if os.access(wrapper, os.X_OK):
            return str(wrapper)
    if found := shutil.which("anvil"):
        return found
    raise TwinError("anvil not found: run `npm ci` (package.json pins @foundry-rs/anvil) or set QUOTRA_ANVIL")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_mock_usdc(root: Path = REPO_ROOT) -> tuple[str, list[dict[str, Any]]]:
    """MockUSDC's creation bytecode and ABI.

    From ape's build output (`.build/__local__.json`) when it was compiled from the current
    source, else compiled here with vyper (same settings as ape-config.yaml; a few seconds).
    """
    source_path = root / MOCK_USDC_SOURCE
    manifest_path = root / ".build" / "__local__.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        contract = manifest.get("contractTypes", {}).get("MockUSDC")
        built_source = manifest.get("sources", {}).get(MOCK_USDC_SOURCE, {}).get("content")
        if contract and built_source == source_path.read_text():
            return contract["deploymentBytecode"]["bytecode"], contract["abi"]

    from vyper.cli.vyper_compile import compile_files  # heavy import, only when needed
    from vyper.compiler.settings import Settings

    out = compile_files(
        [str(source_path)],
        ("bytecode", "abi"),
        paths=[str(root)],
        settings=Settings(evm_version=HARDFORK),
    )
    (compiled,) = out.values()
    return compiled["bytecode"], compiled["abi"]


def place_contract(rpc: Callable[..., Any], address: str, creation_code: str, sender: str) -> None:
    """Places the contract `creation_code` creates at `address`, without mining anything.

    The constructor is simulated (`debug_traceCall` with the `prestateTracer` in diff mode, sent
    from `sender`): its runtime code (with the immutables it computed), the storage it wrote and
    its nonce are then set at `address` (`anvil_setCode`, `anvil_setStorageAt`, `anvil_setNonce`).
    So the twin starts at block 0 with every dev account at nonce 0. A constructor that creates
    other contracts is refused (they would sit where the simulation created them).
    """
    diff = rpc(
        "debug_traceCall",
        {"from": sender, "data": creation_code, "gas": hex(30_000_000)},
        "latest",
        {"tracer": "prestateTracer", "tracerConfig": {"diffMode": True}},
    )
    created = [
        account
        for created_at, account in diff["post"].items()
        if account.get("code") and created_at.lower() != sender.lower()
    ]
    if len(created) != 1:
        raise TwinError(f"unexpected constructor trace for {address}: {list(diff['post'])}")
    (account,) = created
    target = to_checksum_address(address)
    rpc("anvil_setCode", target, account["code"])
    for slot, value in account.get("storage", {}).items():
        rpc("anvil_setStorageAt", target, slot, value)
    if nonce := account.get("nonce"):
        rpc("anvil_setNonce", target, hex(nonce))


class Twin:
    """A running twin. Create it with :func:`start`; stop it with :meth:`stop` or `with`."""

    chain_id: int = BASE_SEPOLIA_CHAIN_ID
    usdc: str = BASE_SEPOLIA_USDC

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        usdc_owner: str,
        usdc_abi: list[dict[str, Any]],
        log: IO[bytes],
    ) -> None:
        self.process = process
        self.port = port
        self.rpc_url = f"http://127.0.0.1:{port}"
        self.usdc_owner = usdc_owner
        self.usdc_abi = usdc_abi
        self.accounts: list[DevAccount] = list(DEV_ACCOUNTS)
        self.framework: DelegationFramework | None = None
        self._log = log
        self._web3: Web3 | None = None
        atexit.register(self.stop)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stops anvil (SIGTERM to its process group; with `state_file`, anvil writes it). Idempotent."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Twin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Twin {self.rpc_url} chain_id={self.chain_id} usdc={self.usdc} {state}>"

    # -- clients -----------------------------------------------------------------------------

    def web3(self) -> Web3:
        """A (cached) synchronous web3 client of the twin."""
        if self._web3 is None:
            self._web3 = Web3(Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": 30}))
        return self._web3

    def usdc_contract(self) -> Any:
        """The USDC token as a web3 contract."""
        return self.web3().eth.contract(address=to_checksum_address(self.usdc), abi=self.usdc_abi)

    def ape_env(self) -> dict[str, str]:
        """Environment for `ape` subprocesses: `--network base:sepolia-twin` (node provider) or
        `--network base:local:foundry` (foundry provider attached to this anvil)."""
        return {"QUOTRA_TWIN_RPC_URL": self.rpc_url, "APE_FOUNDRY_HOST": self.rpc_url}

    def rpc(self, method: str, *params: Any) -> Any:
        """A raw JSON-RPC call; raises TwinError on an RPC error."""
        response = self.web3().provider.make_request(method, list(params))  # type: ignore[arg-type]
        if "error" in response:
            raise TwinError(f"{method}: {response['error']}")
        return response.get("result")

    # -- test helpers ------------------------------------------------------------------------

    def mint_usdc(self, to: str, amount: int) -> None:
        """Mints `amount` atomic units of twin USDC to `to` (the owner is the minter)."""
        tx_hash = (
            self.usdc_contract()
            .functions.mint(to_checksum_address(to), amount)
            .transact({"from": self.usdc_owner})
        )
        receipt = self.web3().eth.wait_for_transaction_receipt(tx_hash)
        if receipt["status"] != 1:
            raise TwinError(f"mint failed: {tx_hash.hex()}")

    def fund_eth(self, to: str, wei: int) -> None:
        """Sets the ETH balance of `to` (anvil_setBalance)."""
        self.rpc("anvil_setBalance", to_checksum_address(to), hex(wei))

    # -- setup -------------------------------------------------------------------------------

    def _install_usdc(self, creation_code: str) -> None:
        """Places MockUSDC at the real USDC address with the storage its constructor writes
        (unless it is there: loaded from a --state file). The EIP-712 domain is rebuilt from
        `self` and `chain.id`, so it names the USDC address."""
        if not self.web3().eth.get_code(to_checksum_address(self.usdc)):
            place_contract(self.rpc, self.usdc, creation_code, self.usdc_owner)

    def _install_framework(self) -> None:
        """MetaMask's Delegation Framework (npm bytecode) at its Base Sepolia addresses; the
        DelegationManager is owned by the USDC owner."""
        from quotra_dev import framework  # it builds on this module

        self.framework = framework.install(self.rpc, self.usdc_owner)

    def verify(self) -> None:
        """Raises TwinError unless the chain looks like Base Sepolia's USDC to a client."""
        w3 = self.web3()
        token = self.usdc_contract().functions
        checks: dict[str, tuple[Any, Any]] = {
            "chain id": (w3.eth.chain_id, BASE_SEPOLIA_CHAIN_ID),
            "name": (token.name().call(), USDC_NAME),
            "version": (token.version().call(), USDC_VERSION),
            "decimals": (token.decimals().call(), USDC_DECIMALS),
            "owner": (token.owner().call(), to_checksum_address(self.usdc_owner)),
            "minter": (token.is_minter(self.usdc_owner).call(), True),
            "DOMAIN_SEPARATOR": (bytes(token.DOMAIN_SEPARATOR().call()), usdc_domain_separator()),
        }
        wrong = {name: got for name, (got, want) in checks.items() if got != want}
        if wrong:
            raise TwinError(f"the twin's USDC is not Base Sepolia's: {wrong}")


def start(
    port: int | None = None,
    *,
    usdc_owner: str | None = None,
    state_file: str | os.PathLike[str] | None = None,
    block_time: float | None = None,
    anvil: str | None = None,
    timeout: float = 15.0,
) -> Twin:
    """Starts anvil as a Base Sepolia twin with MockUSDC at the real USDC address.

    Args:
        port: the port on 127.0.0.1; a free one when None (retried if another process takes it).
        usdc_owner: owner and minter of USDC, a dev account (unlocked: `mint_usdc` sends from it);
            the first dev account when None.
        state_file: anvil `--state`: loaded if it exists (USDC is then left as it was), written
            when the twin stops.
        block_time: seconds between blocks; None mines a block per transaction.
        anvil: path of the anvil binary; see :func:`find_anvil`.
        timeout: seconds to wait for the RPC to answer.
    """
    binary = anvil or find_anvil()
    creation_code, abi = load_mock_usdc()
    owner = to_checksum_address(usdc_owner or DEV_ACCOUNTS[0].address)
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log = tempfile.TemporaryFile(prefix="quotra-anvil-")  # noqa: SIM115 - owned by the Twin
        cmd = [
            binary,
            "--host", "127.0.0.1",
            "--port", str(chosen),
            "--chain-id", str(BASE_SEPOLIA_CHAIN_ID),
            "--hardfork", HARDFORK,
            "--mnemonic", ANVIL_MNEMONIC,
            "--accounts", str(len(DEV_ACCOUNTS)),
            "--silent",
        ]  # fmt: skip
        if block_time is not None:
            cmd += ["--block-time", str(block_time)]
        if state_file is not None:
            cmd += ["--state", os.fspath(state_file)]
        # Own process group: stop() also reaches the native anvil behind npm's node wrapper.
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        twin = Twin(process, chosen, owner, abi, log)
        try:
            _wait_until_ready(twin, timeout)
        except TwinError:
            output = _read_log(log)
            twin.stop()
            if "in use" in output and attempt + 1 < attempts:
                continue
            raise TwinError(f"anvil did not start on port {chosen}: {output.strip()[-2000:]}") from None
        try:
            twin._install_usdc(creation_code)
            twin.verify()
            twin._install_framework()
            lost_race = not twin.running  # what answered was another anvil on that port
        except TwinError:
            lost_race = not twin.running
            if not lost_race or attempt + 1 == attempts:
                twin.stop()
                raise
        except BaseException:
            twin.stop()
            raise
        if not lost_race:
            return twin
        output = _read_log(log)
        twin.stop()
        if attempt + 1 == attempts:
            raise TwinError(f"anvil exited on port {chosen}: {output.strip()[-2000:]}")
    raise TwinError("no free port found for anvil")  # unreachable: the loop returns or raises


def _wait_until_ready(twin: Twin, timeout: float) -> None:
    payload = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not twin.running:
            raise TwinError("anvil exited")
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            twin.rpc_url, data=payload, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as response:  # noqa: S310
                if json.loads(response.read()).get("result") == hex(BASE_SEPOLIA_CHAIN_ID):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    raise TwinError(f"anvil did not answer within {timeout} s")


def _read_log(log: IO[bytes]) -> str:
    with contextlib.suppress(ValueError, OSError):
        log.seek(0)
        return log.read().decode(errors="replace")
    return ""


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def main(argv: list[str] | None = None) -> None:
    """`python -m quotra_dev.twin [--port N] [--state FILE]`: runs a twin until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--state", default=None, help="anvil state file, loaded and written back")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that the `with` block stops anvil
    with start(args.port, state_file=args.state) as chain:
        for name, value in chain.ape_env().items():
            print(f"export {name}={value}")
        print(f"# chain id {chain.chain_id}, USDC {chain.usdc} (owner {chain.usdc_owner})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
