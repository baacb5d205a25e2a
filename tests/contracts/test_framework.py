"""MetaMask's Delegation Framework (npm bytecode, v1.3.0) on the Base Sepolia twin, with the escrow:
an EIP-7702 provider account claims through a redeemed delegation and pays the relayer's fee in the
same redemption; the caveats hold (target, method, payee, cap, expiry, one use, revocation); a
consumer's smart account tops up its deposit under a periodic allowance, at most the period amount
per period; and a consumer withdraws its deposit without ever holding ETH."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from quotra.chain import delegation as dlg
from quotra.chain import eip712
from quotra.chain.deployment import DelegationFramework
from quotra_dev import framework, twin
from quotra_dev.chain import (
    Chain,
    TxFailed,
    account_from_key,
    new_account,
    read_usdc_domain,
    sign_authorization,
    sign_set_code,
)
from quotra_dev.relayer.local import deploy_escrow
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.logs import DISCARD

USDC = 10**6
DAY = 86_400
WITHDRAWAL_DELAY = 3_600


class World:
    """The twin with an escrow, its operator and a relayer (dev accounts with ETH)."""

    def __init__(self, chain_: twin.Twin) -> None:
        self.twin = chain_
        self.chain = Chain(chain_.rpc_url)
        self.w3 = self.chain.w3
        dev = [account_from_key(a.private_key) for a in chain_.accounts]
        self.owner, self.operator, self.relayer = dev[0], dev[1], dev[2]
        assert chain_.framework is not None
        self.fw: DelegationFramework = chain_.framework
        deployment = deploy_escrow(chain_.rpc_url, self.owner, (self.operator.address,))
        self.escrow = self.chain.contract("QuotraEscrow", deployment.escrow)
        self.usdc = self.chain.contract("MockUSDC", chain_.usdc)
        self.usdc_domain = read_usdc_domain(self.usdc, self.chain.chain_id)
        self.escrow_domain = eip712.escrow_domain(self.chain.chain_id, self.escrow.address)
        self.dm_domain = dlg.domain(self.chain.chain_id, self.fw.delegation_manager)
        self.dm = self.w3.eth.contract(
            address=self.fw.delegation_manager, abi=framework.abi("DelegationManager")
        )

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def balance(self, who: str) -> int:
        return int(self.usdc.functions.balanceOf(who).call())

    def eth(self, who: str) -> int:
        return int(self.w3.eth.get_balance(who))  # type: ignore[arg-type]

    def wallet(self, usdc: int = 0) -> LocalAccount:
        """A fresh EOA without ETH, holding `usdc`."""
        account = new_account()
        if usdc:
            self.twin.mint_usdc(account.address, usdc)
        return account

    def earn(self, provider: str, gross: int) -> int:
        """Credits `provider` for an x402 payment of `gross`; returns its share."""
        payer = self.wallet(gross)
        auth = sign_authorization(payer, self.usdc_domain, self.escrow.address, gross)
        self.chain.transact(
            self.escrow.functions.settle_authorizations([auth.payment(provider)]), self.operator
        )
        return gross - gross * int(self.escrow.functions.fee_bps().call()) // 10_000

    def sign(self, delegator: LocalAccount, delegation: dlg.Delegation) -> dlg.Delegation:
        signature = eip712.sign_digest(delegator.key, delegation.digest(self.dm_domain))
        return delegation.signed(signature.raw)

    def redeem(self, entries: list[dlg.Redemption], sender: LocalAccount, **kwargs: Any) -> Any:
        return self.chain.send(
            self.fw.delegation_manager,
            dlg.encode_redeem(entries),
            sender,
            label="redeemDelegations",
            **kwargs,
        )

    def revert(self, entries: list[dlg.Redemption], sender: LocalAccount) -> str:
        """The revert a redemption would end with (simulated from `sender`)."""
        call = {"from": sender.address, "to": self.fw.delegation_manager, "data": dlg.encode_redeem(entries)}
        with pytest.raises((ContractLogicError, Web3RPCError)) as caught:
            self.w3.eth.call(call)  # type: ignore[arg-type]
        data = getattr(caught.value, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            return dlg.describe_revert(data)
        return str(getattr(caught.value, "message", caught.value)).removeprefix("execution reverted: ")

    def disable(self, delegator: LocalAccount, target: dlg.Delegation) -> None:
        """The delegator disables `target` without ETH: it signs a one-use delegation letting the
        relayer make its account call `DelegationManager.disableDelegation(target)`."""
        off = dlg.disable_delegation(
            self.fw,
            delegator=delegator.address,
            delegate=self.relayer.address,
            target=target,
            salt=secrets.randbits(64),
        )
        entry = dlg.disable_redemption(self.sign(delegator, off), target, self.fw.delegation_manager)
        self.redeem([entry], self.relayer)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with twin.start() as chain_:
        yield World(chain_)


@pytest.fixture
def snapshot(world: World) -> Iterator[None]:
    """Each test starts from the module's state (anvil snapshot, reverted after the test)."""
    snap = world.twin.rpc("evm_snapshot")
    yield
    world.twin.rpc("evm_revert", snap)


pytestmark = pytest.mark.usefixtures("snapshot")


# ---------------------------------------------------------------- the framework itself


def test_framework__npm_bytecode_at_base_sepolia_addresses(world: World) -> None:
    deployed = framework.deployed(84532)
    assert deployed is not None and world.fw.contracts == deployed.contracts
    for name, address in world.fw.contracts.items():
        assert world.w3.eth.get_code(address), name  # type: ignore[arg-type]
    assert world.dm.functions.VERSION().call() == "1.3.0"
    assert bytes(world.dm.functions.getDomainHash().call()) == world.dm_domain.separator
    provider = world.wallet()
    delegation = dlg.claim_delegation(
        world.fw,
        provider=provider.address,
        delegate=world.relayer.address,
        escrow=world.escrow.address,
        usdc=world.usdc.address,
        payee=provider.address,
        cap=USDC,
        valid_until=world.now() + DAY,
        salt=7,
    )
    assert bytes(world.dm.functions.getDelegationHash(delegation.as_tuple()).call()) == delegation.hash


def test_eip7702_upgrade__sponsored__account_needs_no_eth(world: World) -> None:
    account = world.wallet()
    world.chain.upgrade(account, world.fw.stateless_delegator, world.relayer)
    assert dlg.is_delegated_to(world.w3.eth.get_code(account.address), world.fw.stateless_delegator)
    assert world.eth(account.address) == 0


# ---------------------------------------------------------------- provider claims (ERC-7710)


class Claim:
    """A provider with earnings, its signed claim and fee delegations to the relayer."""

    def __init__(
        self, world: World, *, cap: int = 2 * USDC, fee: int = 10_000, upgraded: bool = True
    ) -> None:
        self.world = world
        self.provider = world.wallet()
        self.earned = world.earn(self.provider.address, 10 * USDC)
        if upgraded:
            world.chain.upgrade(self.provider, world.fw.stateless_delegator, world.relayer)
        self.valid_until = world.now() + DAY
        self.fee_amount = fee
        common = {"provider": self.provider.address, "delegate": world.relayer.address}
        self.claim = world.sign(
            self.provider,
            dlg.claim_delegation(
                world.fw,
                **common,
                escrow=world.escrow.address,
                usdc=world.usdc.address,
                payee=self.provider.address,
                cap=cap,
                valid_until=self.valid_until,
                salt=secrets.randbits(64),
            ),
        )
        self.fee = world.sign(
            self.provider,
            dlg.fee_delegation(
                world.fw,
                **common,
                usdc=world.usdc.address,
                fee_collector=world.relayer.address,
                fee=fee,
                valid_until=self.valid_until,
                salt=secrets.randbits(64),
            ),
        )

    def entries(
        self, amount: int, *, payee: str | None = None, fee: int | None = None
    ) -> list[dlg.Redemption]:
        w = self.world
        return dlg.claim_redemptions(
            self.claim,
            self.fee,
            escrow=w.escrow.address,
            usdc=w.usdc.address,
            amount=amount,
            payee=payee or self.provider.address,
            fee_collector=w.relayer.address,
            fee_amount=self.fee_amount if fee is None else fee,
        )

    def with_execution(self, execution: dlg.Execution) -> list[dlg.Redemption]:
        """The claim delegation redeemed for some other call."""
        return [dlg.Redemption(dlg.encode_context([self.claim]), (execution,))]


def test_erc7710_claim__redeemed_by_relayer__provider_pays_no_gas(world: World) -> None:
    claim = Claim(world)
    relayer_before = world.balance(world.relayer.address)

    receipt = world.redeem(claim.entries(2 * USDC), world.relayer)

    assert world.balance(claim.provider.address) == 2 * USDC - 10_000
    assert world.balance(world.relayer.address) == relayer_before + 10_000
    assert world.escrow.functions.earnings(claim.provider.address).call() == claim.earned - 2 * USDC
    assert world.eth(claim.provider.address) == 0
    (event,) = world.escrow.events.Claimed().process_receipt(receipt, errors=DISCARD)
    assert (event["args"]["provider"], event["args"]["amount"]) == (claim.provider.address, 2 * USDC)
    assert world.balance(world.escrow.address) == world.escrow.functions.liabilities().call()


def test_erc7710_claim__upgrade_in_the_same_transaction(world: World) -> None:
    # The provider's first claim carries its EIP-7702 authorization: one sponsored type-4
    # transaction makes the EOA a smart account and redeems.
    claim = Claim(world, upgraded=False)
    nonce = world.w3.eth.get_transaction_count(claim.provider.address)
    auth = sign_set_code(claim.provider, world.fw.stateless_delegator, world.chain.chain_id, nonce)
    world.redeem(claim.entries(USDC), world.relayer, authorizations=[auth])
    assert world.balance(claim.provider.address) == USDC - 10_000
    assert world.eth(claim.provider.address) == 0


def test_erc7710_claim__without_fee_entry(world: World) -> None:
    claim = Claim(world)
    world.redeem(claim.entries(USDC)[:1], world.relayer)
    assert world.balance(claim.provider.address) == USDC


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong target", "AllowedTargetsEnforcer:target-address-not-allowed"),
        ("wrong method", "AllowedMethodsEnforcer:method-not-allowed"),
        ("wrong payee", "AllowedCalldataEnforcer:invalid-calldata"),
        ("amount over cap", "ERC20BalanceChangeEnforcer:exceeded-balance-decrease"),
        ("fee over its cap", "ERC20TransferAmountEnforcer:allowance-exceeded"),
        ("not the delegate", "InvalidDelegate"),
        ("signed by another key", "InvalidERC1271Signature"),
    ],
)
def test_erc7710_claim__caveats_hold(world: World, case: str, expected: str) -> None:
    claim = Claim(world)
    sender = world.relayer
    if case == "wrong target":
        entries = claim.with_execution(
            dlg.Execution(world.usdc.address, dlg.erc20_transfer(sender.address, 1))
        )
    elif case == "wrong method":
        request = world.escrow.functions.request_withdrawal(USDC)._encode_transaction_data()
        entries = claim.with_execution(dlg.Execution(world.escrow.address, bytes.fromhex(request[2:])))
    elif case == "wrong payee":
        entries = claim.entries(USDC, payee=sender.address)
    elif case == "amount over cap":
        entries = claim.entries(2 * USDC + 1)
    elif case == "fee over its cap":
        entries = claim.entries(USDC, fee=10_001)
    elif case == "not the delegate":
        entries, sender = claim.entries(USDC), world.operator
    else:
        forged = world.sign(world.wallet(), claim.claim)
        entries = [dlg.Redemption(dlg.encode_context([forged]), claim.entries(USDC)[0].executions)]
    assert world.revert(entries, sender) == expected


def test_erc7710_claim__after_expiry__reverts(world: World) -> None:
    claim = Claim(world)
    world.twin.rpc("evm_setNextBlockTimestamp", hex(claim.valid_until))
    world.twin.rpc("evm_mine")
    assert world.revert(claim.entries(USDC), world.relayer) == "TimestampEnforcer:expired-delegation"


def test_erc7710_claim__redeems_once(world: World) -> None:
    claim = Claim(world)
    world.redeem(claim.entries(USDC)[:1], world.relayer)
    assert world.revert(claim.entries(USDC)[:1], world.relayer) == "LimitedCallsEnforcer:limit-exceeded"


def test_erc7710_claim__after_disable_delegation__reverts(world: World) -> None:
    claim = Claim(world)
    world.disable(claim.provider, claim.claim)
    assert world.dm.functions.disabledDelegations(claim.claim.hash).call()
    assert world.revert(claim.entries(USDC), world.relayer) == "CannotUseADisabledDelegation"
    assert world.eth(claim.provider.address) == 0


def test_erc7710_claim__not_upgraded__reverts(world: World) -> None:
    # A plain EOA's signature verifies, but it has no account code to run the claim: plain EOAs
    # use the escrow's own `claim_with_delegation`.
    claim = Claim(world, upgraded=False)
    with pytest.raises(TxFailed):
        world.redeem(claim.entries(USDC), world.relayer)


# ---------------------------------------------------------------- periodic allowance (ERC-7715)


class Allowance:
    """A consumer smart account (EIP-7702) granting the operator's smart account a periodic
    USDC allowance, and the operator's top-ups into the consumer's deposit."""

    def __init__(self, world: World, *, period_amount: int = 5 * USDC, period: int = DAY) -> None:
        self.world = world
        self.consumer = world.wallet(50 * USDC)
        world.chain.upgrade(self.consumer, world.fw.stateless_delegator, world.relayer)
        if not dlg.is_delegated_to(
            world.w3.eth.get_code(world.operator.address), world.fw.stateless_delegator
        ):
            world.chain.upgrade(world.operator, world.fw.stateless_delegator, world.operator)
        self.start = world.now()
        self.delegation = world.sign(
            self.consumer,
            dlg.periodic_allowance(
                world.fw,
                consumer=self.consumer.address,
                delegate=world.operator.address,
                usdc=world.usdc.address,
                period_amount=period_amount,
                period_duration=period,
                start=self.start,
                expiry=self.start + 30 * DAY,
                salt=secrets.randbits(64),
            ),
        )
        self.context = dlg.encode_context([self.delegation])

    def entries(self, amount: int) -> list[dlg.Redemption]:
        w = self.world
        return dlg.top_up_redemptions(
            self.context,
            usdc=w.usdc.address,
            escrow=w.escrow.address,
            operator=w.operator.address,
            consumer=self.consumer.address,
            amount=amount,
        )

    def top_up(self, amount: int) -> Any:
        return self.world.redeem(self.entries(amount), self.world.operator)

    def deposit(self) -> int:
        return int(self.world.escrow.functions.deposits(self.consumer.address).call())


def test_allowance__tops_up_at_most_the_period_amount_per_period(world: World) -> None:
    allowance = Allowance(world)
    operator_before = world.balance(world.operator.address)
    receipt = allowance.top_up(3 * USDC)
    (event,) = world.escrow.events.Deposited().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["beneficiary"] == allowance.consumer.address
    allowance.top_up(2 * USDC)
    assert allowance.deposit() == 5 * USDC
    assert (
        world.revert(allowance.entries(1), world.operator)
        == "ERC20PeriodTransferEnforcer:transfer-amount-exceeded"
    )

    world.twin.rpc("evm_setNextBlockTimestamp", hex(allowance.start + DAY))
    world.twin.rpc("evm_mine")
    assert world.revert(allowance.entries(5 * USDC + 1), world.operator) == (
        "ERC20PeriodTransferEnforcer:transfer-amount-exceeded"
    )
    allowance.top_up(5 * USDC)
    assert allowance.deposit() == 10 * USDC
    assert world.balance(allowance.consumer.address) == 40 * USDC
    assert world.balance(world.operator.address) == operator_before  # it only passed the USDC on
    assert world.eth(allowance.consumer.address) == 0
    assert world.balance(world.escrow.address) == world.escrow.functions.liabilities().call()


def test_allowance__only_its_redeemer(world: World) -> None:
    allowance = Allowance(world)
    assert world.revert(allowance.entries(USDC)[:1], world.relayer) == "InvalidDelegate"


def test_allowance__revoked_with_disable_delegation(world: World) -> None:
    allowance = Allowance(world)
    allowance.top_up(USDC)
    world.disable(allowance.consumer, allowance.delegation)
    assert world.revert(allowance.entries(USDC), world.operator) == "CannotUseADisabledDelegation"
    assert world.eth(allowance.consumer.address) == 0


def test_allowance__read_by_the_relay(world: World) -> None:
    allowance = Allowance(world, period_amount=4 * USDC, period=3_600)
    read = dlg.read_allowance(
        world.fw,
        allowance.context,
        consumer=allowance.consumer.address,
        delegate=world.operator.address,
        usdc=world.usdc.address,
    )
    assert read.period == dlg.PeriodTerms(world.usdc.address, 4 * USDC, 3_600, allowance.start)
    assert read.expiry == allowance.start + 30 * DAY
    enforcer = world.w3.eth.contract(
        address=world.fw.address("ERC20PeriodTransferEnforcer"),
        abi=framework.abi("ERC20PeriodTransferEnforcer"),
    )
    terms = allowance.delegation.caveats[0].terms
    available, _, _ = enforcer.functions.getAvailableAmount(
        read.hash, world.fw.delegation_manager, terms
    ).call()
    assert available == 4 * USDC
    allowance.top_up(USDC)
    available, _, _ = enforcer.functions.getAvailableAmount(
        read.hash, world.fw.delegation_manager, terms
    ).call()
    assert available == 3 * USDC


# ---------------------------------------------------------------- ETH-free exits


def test_signed_withdrawal__completes_with_no_eth(world: World) -> None:
    # The consumer is a smart account (EIP-7702): the escrow checks its signatures with ERC-1271.
    allowance = Allowance(world)
    allowance.top_up(5 * USDC)
    consumer, f = allowance.consumer, world.escrow.functions
    deadline = world.now() + DAY

    def step(primary: str, amount: int) -> bytes:
        message = {
            "consumer": consumer.address,
            "relayer_fee" if primary == "Withdraw" else "amount": amount,
            "nonce": f.withdrawal_nonces(consumer.address).call(),
            "deadline": deadline,
        }
        return eip712.sign(consumer.key, world.escrow_domain, primary, message).raw

    world.chain.transact(
        f.request_withdrawal_with_signature(
            consumer.address, 5 * USDC, deadline, step("RequestWithdrawal", 5 * USDC)
        ),
        world.relayer,
    )
    world.twin.rpc("evm_increaseTime", hex(WITHDRAWAL_DELAY))
    world.twin.rpc("evm_mine")
    wallet_before, relayer_before = world.balance(consumer.address), world.balance(world.relayer.address)
    world.chain.transact(
        f.withdraw_with_signature(consumer.address, 20_000, deadline, step("Withdraw", 20_000)), world.relayer
    )
    assert world.balance(consumer.address) == wallet_before + 5 * USDC - 20_000
    assert world.balance(world.relayer.address) == relayer_before + 20_000
    assert f.deposits(consumer.address).call() == 0
    assert world.eth(consumer.address) == 0
    assert world.balance(world.escrow.address) == f.liabilities().call()
