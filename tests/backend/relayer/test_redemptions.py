"""What the relay accepts of Delegation Framework delegations (no chain): a claim, a fee or a
disable grant only in exactly the shape the relay proposes, and a redemption kept as JSON that
resends byte for byte what was signed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from eth_account import Account
from quotra.chain import delegation as dlg
from quotra.chain.deployment import DelegationFramework
from quotra.chain.relayer import ChainCall

NAMES = (
    "DelegationManager",
    "EIP7702StatelessDeleGatorImpl",
    "AllowedTargetsEnforcer",
    "AllowedMethodsEnforcer",
    "AllowedCalldataEnforcer",
    "ERC20TransferAmountEnforcer",
    "ERC20BalanceChangeEnforcer",
    "ExactCalldataEnforcer",
    "TimestampEnforcer",
    "LimitedCallsEnforcer",
)
FW = DelegationFramework(
    version="1.3.0", contracts={name: "0x" + f"{i + 1:040x}" for i, name in enumerate(NAMES)}
)
ESCROW, USDC = "0x" + "e5" * 20, "0x" + "0c" * 20
PROVIDER, RELAYER = Account.create().address, Account.create().address


def claim(**changes: object) -> dlg.Delegation:
    fields: dict[str, object] = {
        "provider": PROVIDER,
        "delegate": RELAYER,
        "escrow": ESCROW,
        "usdc": USDC,
        "payee": PROVIDER,
        "cap": 2_000_000,
        "valid_until": 1_900_000_000,
        "salt": 7,
    }
    return dlg.claim_delegation(FW, **{**fields, **changes})  # type: ignore[arg-type]


def test_read_claim__the_relay_shape__gives_payee_cap_expiry() -> None:
    grant = dlg.read_claim(FW, claim(), escrow=ESCROW, usdc=USDC)
    assert grant == dlg.ClaimGrant(PROVIDER, 2_000_000, 1_900_000_000)


@pytest.mark.parametrize(
    "change",
    ["another escrow", "an extra caveat", "a caveat dropped", "many uses", "an unknown enforcer", "not root"],
)
def test_read_claim__any_other_shape__refused(change: str) -> None:
    original = claim()
    caveats = list(original.caveats)
    if change == "another escrow":
        delegation = claim(escrow=USDC)
    elif change == "an extra caveat":
        delegation = replace(original, caveats=(*caveats, caveats[0]))
    elif change == "a caveat dropped":
        delegation = replace(original, caveats=tuple(caveats[:-1]))
    elif change == "many uses":
        caveats[4] = dlg.Caveat(caveats[4].enforcer, dlg.limited_calls(100))
        delegation = replace(original, caveats=tuple(caveats))
    elif change == "an unknown enforcer":
        caveats[0] = dlg.Caveat("0x" + "99" * 20, caveats[0].terms)
        delegation = replace(original, caveats=tuple(caveats))
    else:
        delegation = replace(original, authority=b"\x01" * 32)
    with pytest.raises(dlg.DelegationError):
        dlg.read_claim(FW, delegation, escrow=ESCROW, usdc=USDC)


def test_read_fee__pays_only_the_named_collector() -> None:
    fee = dlg.fee_delegation(
        FW, provider=PROVIDER, delegate=RELAYER, usdc=USDC, fee_collector=RELAYER, fee=10_000,
        valid_until=1_900_000_000, salt=8,
    )  # fmt: skip
    assert dlg.read_fee(FW, fee, usdc=USDC, fee_collector=RELAYER) == 10_000
    with pytest.raises(dlg.DelegationError):
        dlg.read_fee(FW, fee, usdc=USDC, fee_collector=PROVIDER)


def test_check_disable__exactly_that_delegation__by_its_delegator() -> None:
    target = claim()
    grant = dlg.disable_delegation(FW, delegator=PROVIDER, delegate=RELAYER, target=target, salt=9)
    dlg.check_disable(FW, grant, target)
    dlg.check_disable(FW, grant, target.signed(b"\x01" * 65))  # the target's signature is not pinned
    with pytest.raises(dlg.DelegationError):
        dlg.check_disable(FW, grant, claim(salt=10))
    other = dlg.disable_delegation(FW, delegator=RELAYER, delegate=RELAYER, target=target, salt=9)
    with pytest.raises(dlg.DelegationError, match="only the delegation's delegator"):
        dlg.check_disable(FW, other, target)


def test_redemption_json__resends_exactly_what_was_signed() -> None:
    account = Account.create()
    signed = Account.sign_authorization(
        {"chainId": 84532, "address": FW.stateless_delegator, "nonce": 3}, account.key
    )
    auth = dlg.SetCodeAuthorization(84532, FW.stateless_delegator, 3, signed.y_parity, signed.r, signed.s)
    fee = dlg.fee_delegation(
        FW, provider=PROVIDER, delegate=RELAYER, usdc=USDC, fee_collector=RELAYER, fee=10_000,
        valid_until=1_900_000_000, salt=8,
    )  # fmt: skip
    entries = dlg.claim_redemptions(
        claim().signed(b"\x02" * 65), fee.signed(b"\x03" * 65), escrow=ESCROW, usdc=USDC, amount=1_500_000,
        payee=PROVIDER, fee_collector=RELAYER, fee_amount=10_000,
    )  # fmt: skip
    call = ChainCall.redeem(FW.delegation_manager, entries, label="redeemDelegations", authorizations=[auth])
    again = ChainCall.from_redemption_json(
        FW.delegation_manager, call.redemption_json(), label="redeemDelegations"
    )
    assert (again.to, again.data, again.authorizations) == (call.to, call.data, call.authorizations)
    assert [e.context for e in again.redemptions] == [e.context for e in call.redemptions]
    assert again.authorizations[0].authority == account.address
