"""The ape scripts (`ape run deploy|admin|consumer|provider|faucet`) against a real twin process.

Each script runs as `ape run ... --network base:sepolia-twin:node --account TEST::<i>` in a
subprocess, exactly as an operator types it; ape's TEST accounts are anvil's dev accounts (same
public mnemonic). State is checked with web3 directly. Bad input must fail with a click error and
send nothing: the block number and the nonces stay unchanged.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_typing import HexStr
from eth_utils import to_checksum_address
from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra.chain.charges import pack_charge
from quotra.chain.deployment import Deployment, DeploymentError, deployment_path, load_for_chain
from quotra_dev import framework, twin
from quotra_dev.chain import Chain, account_from_key, delegation_tuple, permission_tuple, sign_authorization

ROOT = Path(__file__).resolve().parents[2]
APE = str(Path(sys.executable).with_name("ape"))
NETWORK = "base:sepolia-twin:node"
USDC = 10**6

DEV = twin.DEV_ACCOUNTS
OWNER, OPERATOR, PROVIDER, CONSUMER, RELAYER, PAYEE = (DEV[i] for i in range(6))

pytestmark = pytest.mark.timeout(240)


class Runner:
    def __init__(self, chain_: twin.Twin, deployments: Path) -> None:
        self.twin = chain_
        self.deployments = deployments
        self.env = {
            **os.environ,
            **chain_.ape_env(),
            "QUOTRA_DEPLOYMENTS_DIR": str(deployments),
            "PATH": f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONWARNINGS": "ignore",
        }
        self.env.setdefault("APE_DATA_FOLDER", str(ROOT / ".cache" / "ape"))

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [APE, "run", *args, "--network", NETWORK],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, f"ape run {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    @property
    def deployment_file(self) -> Path:
        return deployment_path("base", "sepolia-twin", self.deployments)


@pytest.fixture(scope="module")
def chain_() -> Iterator[twin.Twin]:
    with twin.start() as running:
        yield running


@pytest.fixture(scope="module")
def ape_run(chain_: twin.Twin, tmp_path_factory: pytest.TempPathFactory) -> Runner:
    return Runner(chain_, tmp_path_factory.mktemp("deployments"))


@pytest.fixture(scope="module")
def deployment(ape_run: Runner) -> Deployment:
    ape_run.ok(
        "deploy", "escrow", "--account", "TEST::0", "--operator", OPERATOR.address,
        "--withdrawal-delay", "1h", "--refund-window", "2d", "--yes",
    )  # fmt: skip
    return Deployment.load(ape_run.deployment_file)


@pytest.fixture(scope="module")
def web3_chain(chain_: twin.Twin) -> Chain:
    return Chain(chain_.rpc_url)


@pytest.fixture(scope="module")
def escrow(web3_chain: Chain, deployment: Deployment) -> Any:
    return web3_chain.contract("QuotraEscrow", deployment.escrow)


@pytest.fixture(scope="module")
def usdc(web3_chain: Chain, deployment: Deployment) -> Any:
    return web3_chain.contract("MockUSDC", deployment.usdc)


def chain_state(web3_chain: Chain) -> tuple[int, ...]:
    """The block number and every dev account's nonce: unchanged iff nothing was sent."""
    w3 = web3_chain.w3
    return (w3.eth.block_number, *(w3.eth.get_transaction_count(to_checksum_address(a.address)) for a in DEV))


def test_deploy__writes_the_deployment_file(
    chain_: twin.Twin, deployment: Deployment, web3_chain: Chain, escrow: Any
) -> None:
    w3 = web3_chain.w3
    receipt = w3.eth.get_transaction_receipt(HexStr(deployment.tx_hash))
    assert receipt["contractAddress"] == deployment.escrow
    assert receipt["blockNumber"] == deployment.block
    assert w3.eth.get_code(to_checksum_address(deployment.escrow))
    assert deployment.network == "base:sepolia-twin"
    assert deployment.chain_id == 84532
    assert deployment.usdc == twin.BASE_SEPOLIA_USDC
    assert (deployment.usdc_name, deployment.usdc_version) == ("USDC", "2")
    assert deployment.owner == OWNER.address == escrow.functions.owner().call()
    assert deployment.operators == (OPERATOR.address,)
    assert escrow.functions.is_operator(OPERATOR.address).call()
    assert deployment.fee_bps == 1_000
    assert (deployment.withdrawal_delay, deployment.refund_window) == (3_600, 2 * 86_400)
    assert int(deployment.deployed_at.timestamp()) == w3.eth.get_block(deployment.block)["timestamp"]
    # MetaMask's Delegation Framework, recorded where the twin has it: Base Sepolia's addresses.
    assert deployment.delegation_framework == chain_.framework
    assert deployment.delegation_framework.delegation_manager == "0xdb9B1e94B5b69Df7e401DDbedE43491141047dB3"
    # The escrow's EIP-712 domain in the record is the one the contract hashes with.
    permission = {
        "consumer": CONSUMER.address,
        "spender": OPERATOR.address,
        "allowance": 1,
        "valid_after": 0,
        "valid_until": 1,
        "salt": 7,
        "developer": PAYEE.address,
        "max_markup_bps": 2_000,
    }
    assert escrow.functions.hash_permission(permission_tuple(permission)).call() == eip712.digest(
        deployment.escrow_domain, "SpendPermission", permission
    )


# Commands that must be refused without sending anything. Type-level errors fail while click
# parses (before ape connects); the others are refused after reading the chain.
REFUSED: dict[str, tuple[tuple[str, ...], str]] = {
    "redeploy": (
        ("deploy", "escrow", "--account", "TEST::0", "--yes"),
        "an escrow is already deployed at",
    ),
    "negative-amount": (
        ("consumer", "deposit", "--account", "TEST::3", "--yes", "--", "-1"),
        "must not be negative",
    ),
    "bad-address": (
        ("consumer", "deposit", "1", "--for", "0xdead", "--account", "TEST::3"),
        "not an address",
    ),
    "fee-over-cap": (
        ("admin", "fee", "2001", "--account", "TEST::0", "--yes"),
        "2001 is above the cap of 2000",
    ),
    "over-earnings": (
        ("provider", "claim", "0.01", "--account", "TEST::5", "--yes"),
        "earnings are only 0.000000",
    ),
    "faucet-not-mock-usdc": (
        ("faucet", PAYEE.address, "--amount", "5"),
        "is not this project's MockUSDC",
    ),
}


@pytest.fixture(scope="module")
def refused(
    ape_run: Runner, deployment: Deployment, web3_chain: Chain, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Runs every REFUSED command concurrently (they are independent and send nothing), checks
    that the block number and all nonces are unchanged, and returns the results by name."""
    # For the faucet: a record whose USDC is some other contract (the escrow), as on a real network.
    elsewhere = tmp_path_factory.mktemp("not-mock-usdc")
    deployment.model_copy(update={"usdc": deployment.escrow}).save(
        deployment_path("base", "sepolia-twin", elsewhere)
    )
    envs = {"faucet-not-mock-usdc": {"QUOTRA_DEPLOYMENTS_DIR": str(elsewhere)}}
    before, recorded = chain_state(web3_chain), ape_run.deployment_file.read_text()
    with ThreadPoolExecutor(3) as pool:
        futures = {
            name: pool.submit(ape_run, *args, env=envs.get(name)) for name, (args, _) in REFUSED.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    assert chain_state(web3_chain) == before, "a refused command sent a transaction"
    assert ape_run.deployment_file.read_text() == recorded
    return results


@pytest.mark.parametrize("case", REFUSED)
def test_refused__click_error__nothing_sent(
    refused: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    done, message = refused[case], REFUSED[case][1]
    assert done.returncode == 2, done.stdout + done.stderr  # click's usage-error exit code
    assert message in done.stderr


def test_redeploy__names_the_live_escrow_and_force(
    refused: dict[str, subprocess.CompletedProcess[str]], deployment: Deployment
) -> None:
    assert f"already deployed at {deployment.escrow}" in refused["redeploy"].stderr
    assert "pass --force" in refused["redeploy"].stderr


def test_consumer_deposit__moves_exact_amounts(
    ape_run: Runner, deployment: Deployment, escrow: Any, usdc: Any
) -> None:
    ape_run.ok("faucet", CONSUMER.address, "--amount", "20")
    assert usdc.functions.balanceOf(CONSUMER.address).call() == 20 * USDC

    out = ape_run.ok("consumer", "deposit", "12.345678", "--account", "TEST::3", "--yes")

    assert "deposited 12.345678 USDC" in out
    assert usdc.functions.balanceOf(CONSUMER.address).call() == 20 * USDC - 12_345_678
    assert escrow.functions.deposits(CONSUMER.address).call() == 12_345_678
    assert (
        usdc.functions.balanceOf(escrow.address).call() == escrow.functions.liabilities().call() == 12_345_678
    )


def test_signed_permission__settles__provider_claims_exact_amounts(
    ape_run: Runner, deployment: Deployment, web3_chain: Chain, escrow: Any, usdc: Any
) -> None:
    signed = json.loads(
        ape_run.ok(
            "consumer", "sign-permission", "--allowance", "5.00", "--days", "30", "--account", "TEST::3"
        )
    )
    message, signature = signed["message"], bytes.fromhex(signed["signature"][2:])
    assert message["spender"] == OPERATOR.address  # the recorded operator by default
    assert message["allowance"] == 5 * USDC
    assert (
        signed["digest"] == "0x" + eip712.digest(deployment.escrow_domain, "SpendPermission", message).hex()
    )
    charges = [pack_charge(PROVIDER.address, 3 * USDC)]
    web3_chain.transact(
        escrow.functions.settle_charges(
            permission_tuple(message), signature, secrets.token_bytes(32), charges, 0
        ),
        account_from_key(OPERATOR.private_key),
    )
    assert escrow.functions.earnings(PROVIDER.address).call() == 2_700_000

    out = ape_run.ok("provider", "claim", "2.5", "--to", PAYEE.address, "--account", "TEST::2", "--yes")

    assert "claimed 2.500000 USDC" in out
    assert usdc.functions.balanceOf(PAYEE.address).call() == 2_500_000
    assert escrow.functions.earnings(PROVIDER.address).call() == 200_000
    assert usdc.functions.balanceOf(escrow.address).call() == escrow.functions.liabilities().call()


def test_signed_delegation__relayer_claims_with_fee(
    ape_run: Runner, deployment: Deployment, web3_chain: Chain, escrow: Any, usdc: Any
) -> None:
    earned = escrow.functions.earnings(PROVIDER.address).call()
    assert earned > 0, "runs after the provider earned in the previous test"
    signed = json.loads(
        ape_run.ok(
            "provider", "sign-delegation", "--max", "0.20", "--relayer-fee", "0.05", "--days", "7",
            "--payee", PAYEE.address, "--account", "TEST::2",
        )
    )  # fmt: skip
    message, signature = signed["message"], bytes.fromhex(signed["signature"][2:])
    assert (message["provider"], message["payee"]) == (PROVIDER.address, PAYEE.address)
    payee_before = usdc.functions.balanceOf(PAYEE.address).call()
    relayer_before = usdc.functions.balanceOf(RELAYER.address).call()

    web3_chain.transact(
        escrow.functions.claim_with_delegation(delegation_tuple(message), signature, 200_000),
        account_from_key(RELAYER.private_key),
    )

    assert usdc.functions.balanceOf(PAYEE.address).call() - payee_before == 150_000
    assert usdc.functions.balanceOf(RELAYER.address).call() - relayer_before == 50_000
    assert escrow.functions.earnings(PROVIDER.address).call() == earned - 200_000


# ---- MetaMask smart accounts: ERC-7710 claims, signed withdrawals, periodic allowances -----------

SMART = DEV[6]  # a provider (and consumer) whose EOA becomes a MetaMask smart account


def test_sign_erc7710__relayer_redeems_with_its_fee__then_disabled(
    ape_run: Runner, deployment: Deployment, web3_chain: Chain, escrow: Any, usdc: Any, tmp_path: Path
) -> None:
    fw = deployment.delegation_framework
    assert fw is not None
    relayer = account_from_key(RELAYER.private_key)
    payer = account_from_key(DEV[7].private_key)
    chain_ = web3_chain
    auth = sign_authorization(payer, deployment.usdc_domain, deployment.escrow, USDC)
    ape_run.twin.mint_usdc(payer.address, USDC)
    chain_.transact(
        escrow.functions.settle_authorizations([auth.payment(SMART.address)]),
        account_from_key(OPERATOR.private_key),
    )
    assert escrow.functions.earnings(SMART.address).call() == 900_000

    out = ape_run.ok(
        "provider", "sign-erc7710", "--max", "0.9", "--relayer", RELAYER.address, "--relayer-fee", "0.01",
        "--account", "TEST::6",
    )  # fmt: skip
    body = json.loads(out)
    (tmp_path / "claim.json").write_text(out)
    claim = dlg.Delegation.from_message(
        body["claim"]["message"], bytes.fromhex(body["claim"]["signature"][2:])
    )
    fee = dlg.Delegation.from_message(body["fee"]["message"], bytes.fromhex(body["fee"]["signature"][2:]))
    assert dlg.read_claim(fw, claim, escrow=deployment.escrow, usdc=deployment.usdc).cap == 900_000
    upgrade = dlg.SetCodeAuthorization.from_json(body["authorization"])
    assert (upgrade.authority, upgrade.address) == (SMART.address, fw.stateless_delegator)
    entries = dlg.claim_redemptions(
        claim, fee, escrow=deployment.escrow, usdc=deployment.usdc, amount=900_000, payee=SMART.address,
        fee_collector=RELAYER.address, fee_amount=10_000,
    )  # fmt: skip
    wallet_before, relayer_before = (
        usdc.functions.balanceOf(a).call() for a in (SMART.address, RELAYER.address)
    )
    chain_.send(fw.delegation_manager, dlg.encode_redeem(entries), relayer, authorizations=[upgrade])
    assert usdc.functions.balanceOf(SMART.address).call() - wallet_before == 890_000
    assert usdc.functions.balanceOf(RELAYER.address).call() - relayer_before == 10_000

    # Disabled without ETH, the claim's delegation and its fee's: one-use grants the relayer
    # redeems in one transaction.
    grants_body = json.loads(
        ape_run.ok(
            "provider", "disable-erc7710", "--claim-file", str(tmp_path / "claim.json"),
            "--relayer", RELAYER.address, "--account", "TEST::6",
        )
    )  # fmt: skip
    grants = [
        dlg.Delegation.from_message(g["message"], bytes.fromhex(g["signature"][2:]))
        for g in grants_body["grants"]
    ]
    assert [dlg.grant_target(fw, g, [claim, fee]) for g in grants] == [claim, fee]
    chain_.send(
        fw.delegation_manager,
        dlg.encode_redeem(
            [
                dlg.disable_redemption(g, t, fw.delegation_manager)
                for g, t in zip(grants, [claim, fee], strict=True)
            ]
        ),
        relayer,
    )
    manager = chain_.w3.eth.contract(address=fw.delegation_manager, abi=framework.abi("DelegationManager"))
    assert manager.functions.disabledDelegations(claim.hash).call() is True
    assert manager.functions.disabledDelegations(fee.hash).call() is True

    # Or from the account itself, with ETH.
    second = ape_run.ok(
        "provider", "sign-erc7710", "--max", "0.5", "--relayer", RELAYER.address, "--account", "TEST::6"
    )
    assert json.loads(second)["authorization"] is None  # a smart account already
    (tmp_path / "second.json").write_text(second)
    out = ape_run.ok(
        "provider",
        "disable-erc7710",
        "--claim-file",
        str(tmp_path / "second.json"),
        "--yes",
        "--account",
        "TEST::6",
    )
    target = dlg.Delegation.from_message(json.loads(second)["claim"]["message"])
    assert f"disabled 0x{target.hash.hex()}" in out
    assert manager.functions.disabledDelegations(target.hash).call() is True


def test_sign_withdrawal__steps_relayed__and_grant_allowance(
    ape_run: Runner, deployment: Deployment, web3_chain: Chain, escrow: Any, usdc: Any
) -> None:
    f, relayer = escrow.functions, account_from_key(RELAYER.private_key)
    assert f.deposits(CONSUMER.address).call() >= USDC, "runs after the consumer deposited"

    def relay(*args: str) -> None:
        body = json.loads(ape_run.ok("consumer", "sign-withdrawal", *args, "--account", "TEST::3"))
        message, signature = body["message"], bytes.fromhex(body["signature"][2:])
        consumer, deadline = message["consumer"], int(message["deadline"])
        call = {
            "request": lambda: f.request_withdrawal_with_signature(
                consumer, int(message["amount"]), deadline, signature
            ),
            "cancel": lambda: f.cancel_withdrawal_with_signature(consumer, deadline, signature),
            "withdraw": lambda: f.withdraw_with_signature(
                consumer, int(message["relayer_fee"]), deadline, signature
            ),
        }[body["step"]]()
        web3_chain.transact(call, relayer)

    relay("request", "1.0")
    assert f.withdrawals(CONSUMER.address).call()[0] == USDC
    relay("cancel")
    assert f.withdrawals(CONSUMER.address).call()[0] == 0
    deposit = f.deposits(CONSUMER.address).call()
    relay("request", "1.0")
    ape_run.twin.rpc("evm_increaseTime", hex(deployment.withdrawal_delay))
    ape_run.twin.rpc("evm_mine")
    wallet_before = usdc.functions.balanceOf(CONSUMER.address).call()
    relay("withdraw", "--relayer-fee", "0.01")
    assert usdc.functions.balanceOf(CONSUMER.address).call() - wallet_before == USDC - 10_000
    assert f.deposits(CONSUMER.address).call() == deposit - USDC
    assert usdc.functions.balanceOf(escrow.address).call() == f.liabilities().call()

    response = json.loads(
        ape_run.ok(
            "consumer", "grant-allowance", "--period-amount", "5", "--period", "1d", "--account", "TEST::6"
        )
    )
    fw = deployment.delegation_framework
    assert fw is not None and response["delegationManager"] == fw.delegation_manager
    allowance = dlg.read_allowance(
        fw, bytes.fromhex(response["context"][2:]), consumer=SMART.address, delegate=OPERATOR.address,
        usdc=deployment.usdc,
    )  # fmt: skip
    assert (allowance.period.amount, allowance.period.duration) == (5 * USDC, 86_400)
    digest = allowance.delegation.digest(dlg.domain(deployment.chain_id, fw.delegation_manager))
    assert (
        eip712.recover(digest, eip712.Signature.from_bytes(allowance.delegation.signature)) == SMART.address
    )


# ---- the click parameter types, in-process (no chain) -----------------------------------------


@pytest.fixture(scope="module")
def params() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        from scripts import _common
    finally:
        sys.path.remove(str(ROOT))
    return _common


@pytest.mark.parametrize(
    ("text", "atomic"),
    [
        ("1.50", 1_500_000),
        ("0.000001", 1),
        ("12.345678", 12_345_678),
        ("1_000", 1_000 * USDC),
        ("7", 7 * USDC),
    ],
)
def test_usdc_amount__parses_exactly(params: Any, text: str, atomic: int) -> None:
    assert params.USDC.convert(text, None, None) == atomic


@pytest.mark.parametrize("text", ["-1", "0", "1.0000001", "abc", "nan", "inf", "1e-7", ""])
def test_usdc_amount__bad__refused(params: Any, text: str) -> None:
    import click

    with pytest.raises(click.BadParameter):
        params.USDC.convert(text, None, None)


def test_address__checksums_and_refuses_typos(params: Any) -> None:
    import click

    lower = OPERATOR.address.lower()
    assert params.ADDRESS.convert(lower, None, None) == OPERATOR.address
    assert (
        params.ADDRESS.convert(OPERATOR.address.upper().replace("0X", "0x"), None, None) == OPERATOR.address
    )
    typo = "0x70997970c51812dc3A010C7d01b50e0d17dc79C8"  # one checksum letter lowered
    with pytest.raises(click.BadParameter, match="bad checksum"):
        params.ADDRESS.convert(typo, None, None)
    for bad in ("0x123", lower[2:], "0x" + "0" * 40, "0x" + "g" * 40):
        with pytest.raises(click.BadParameter):
            params.ADDRESS.convert(bad, None, None)


@pytest.mark.parametrize(
    ("text", "seconds"), [("3600", 3600), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)]
)
def test_duration__units(params: Any, text: str, seconds: int) -> None:
    assert params.Duration().convert(text, None, None) == seconds


# ---- the deployment record, in-process ---------------------------------------------------------


def _record(**changes: Any) -> Deployment:
    fields: dict[str, Any] = {
        "network": "base:sepolia-twin",
        "chain_id": 84532,
        "escrow": "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        "usdc": twin.BASE_SEPOLIA_USDC,
        "usdc_name": "USDC",
        "usdc_version": "2",
        "owner": OWNER.address,
        "operators": [OPERATOR.address],
        "block": 1,
        "tx_hash": "0x" + "ab" * 32,
        "fee_bps": 1_000,
        "withdrawal_delay": 3_600,
        "refund_window": 86_400,
    }
    return Deployment(**{**fields, **changes})


def test_deployment__round_trips_checksummed(tmp_path: Path) -> None:
    record = _record()
    assert record.escrow == "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    path = record.save(tmp_path / "base-sepolia-twin.json")
    assert Deployment.load(path) == record
    assert load_for_chain(path, 84532) == record
    assert record.usdc_domain == eip712.Domain("USDC", "2", 84532, twin.BASE_SEPOLIA_USDC)


def test_deployment__operator_list_follows_grants_and_removals() -> None:
    record = _record().with_operator(CONSUMER.address.lower(), True)
    assert record.operators == (OPERATOR.address, CONSUMER.address)
    assert record.with_operator(OPERATOR.address, False).operators == (CONSUMER.address,)


def test_deployment__missing_bad_or_other_chain__refused(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="no deployment file"):
        Deployment.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"chain_id": 1}')
    with pytest.raises(DeploymentError, match="unreadable"):
        Deployment.load(tmp_path / "bad.json")
    path = _record().save(tmp_path / "ok.json")
    with pytest.raises(DeploymentError, match="for chain 84532, but the connected chain is 8453"):
        load_for_chain(path, 8453)
    with pytest.raises(ValueError, match="not an address"):
        _record(escrow="0x1234")
