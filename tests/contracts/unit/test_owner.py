"""Owner functions: operators, fee, pause, platform fees, sweep and two-step ownership."""

import ape
import pytest
from escrow_helpers import MAX_FEE_BPS, SOMEONE, USDC, ZERO_ADDRESS, events, split

NOT_OWNER = "ownable: caller is not the owner"


# ---------------------------------------------------------------- access control


@pytest.mark.parametrize(
    ("function", "args"),
    [
        ("set_operator", (SOMEONE, True)),
        ("set_fee_bps", (500,)),
        ("pause", ()),
        ("unpause", ()),
        ("withdraw_platform_fees", (SOMEONE, 1)),
        ("sweep", (SOMEONE, SOMEONE)),
        ("transfer_ownership", (SOMEONE,)),
    ],
)
@pytest.mark.parametrize("caller", ["operator", "stranger"])
def test_owner_function__not_owner__reverts(escrow, request, function, args, caller):
    with ape.reverts(NOT_OWNER):
        getattr(escrow, function)(*args, sender=request.getfixturevalue(caller))


def test_renounce_ownership__not_exported(escrow):
    assert not hasattr(escrow, "renounce_ownership")


# ---------------------------------------------------------------- operators


def test_set_operator__grant_and_revoke(escrow, owner, relayer):
    tx = escrow.set_operator(relayer, True, sender=owner)
    assert escrow.is_operator(relayer)
    assert events(tx, escrow.OperatorSet) == [escrow.OperatorSet(operator=relayer, status=True)]
    tx = escrow.set_operator(relayer, False, sender=owner)
    assert not escrow.is_operator(relayer)
    assert events(tx, escrow.OperatorSet) == [escrow.OperatorSet(operator=relayer, status=False)]


def test_set_operator__zero__reverts(escrow, owner):
    with ape.reverts("escrow: zero operator"):
        escrow.set_operator(ZERO_ADDRESS, True, sender=owner)


def test_set_operator__new_operator_settles(escrow, owner, relayer, consumer, provider, sign_payment):
    escrow.set_operator(relayer, True, sender=owner)
    escrow.settle_authorizations([sign_payment(consumer, USDC, provider)], sender=relayer)
    assert escrow.earnings(provider) == split(USDC)[0]


# ---------------------------------------------------------------- fee


@pytest.mark.parametrize("fee_bps", [0, 1, 250, MAX_FEE_BPS])
def test_set_fee_bps(escrow, owner, consumer, provider, settle, fee_bps):
    tx = escrow.set_fee_bps(fee_bps, sender=owner)
    assert escrow.fee_bps() == fee_bps
    assert events(tx, escrow.FeeSet) == [escrow.FeeSet(fee_bps=fee_bps)]
    settle(consumer, 3 * USDC + 1, provider)
    assert (escrow.earnings(provider), escrow.platform_fees()) == split(3 * USDC + 1, fee_bps)


@pytest.mark.parametrize("fee_bps", [MAX_FEE_BPS + 1, 10_000, 2**256 - 1])
def test_set_fee_bps__above_cap__reverts(escrow, owner, fee_bps):
    with ape.reverts("escrow: fee above cap"):
        escrow.set_fee_bps(fee_bps, sender=owner)


# ---------------------------------------------------------------- pause


def test_pause_unpause(escrow, owner):
    tx = escrow.pause(sender=owner)
    assert escrow.paused()
    assert events(tx, escrow.Paused) == [escrow.Paused(account=owner)]
    with ape.reverts("pausable: contract is paused"):
        escrow.pause(sender=owner)
    tx = escrow.unpause(sender=owner)
    assert not escrow.paused()
    assert events(tx, escrow.Unpaused) == [escrow.Unpaused(account=owner)]
    with ape.reverts("pausable: contract is not paused"):
        escrow.unpause(sender=owner)


# ---------------------------------------------------------------- platform fees


def test_withdraw_platform_fees(escrow, usdc, owner, consumer, provider, settle, assert_solvent):
    settle(consumer, 10 * USDC + 5, provider)
    fees = escrow.platform_fees()
    assert fees == split(10 * USDC + 5)[1]
    treasury = SOMEONE
    tx = escrow.withdraw_platform_fees(treasury, fees - 1, sender=owner)
    assert usdc.balanceOf(treasury) == fees - 1
    assert escrow.platform_fees() == 1
    assert events(tx, escrow.PlatformFeesWithdrawn) == [
        escrow.PlatformFeesWithdrawn(to=treasury, amount=fees - 1)
    ]
    assert_solvent()
    with ape.reverts("escrow: amount exceeds fees"):
        escrow.withdraw_platform_fees(treasury, 2, sender=owner)


def test_withdraw_platform_fees__cannot_touch_earnings(escrow, owner, consumer, provider, settle):
    settle(consumer, 10 * USDC, provider)
    with ape.reverts("escrow: amount exceeds fees"):
        escrow.withdraw_platform_fees(owner, USDC + 1, sender=owner)


def test_withdraw_platform_fees__works_while_paused(
    escrow, owner, consumer, provider, settle, assert_solvent
):
    settle(consumer, 10 * USDC, provider)
    escrow.pause(sender=owner)
    escrow.withdraw_platform_fees(owner, USDC, sender=owner)
    assert escrow.platform_fees() == 0
    assert_solvent()


def test_withdraw_platform_fees__zero_amount__reverts(escrow, owner):
    with ape.reverts("escrow: zero amount"):
        escrow.withdraw_platform_fees(owner, 0, sender=owner)


def test_withdraw_platform_fees__zero_payee__reverts(escrow, owner):
    with ape.reverts("escrow: zero payee"):
        escrow.withdraw_platform_fees(ZERO_ADDRESS, 1, sender=owner)


def test_withdraw_platform_fees__escrow_as_payee__reverts(escrow, owner, consumer, provider, settle):
    settle(consumer, USDC, provider)
    with ape.reverts("escrow: escrow as payee"):
        escrow.withdraw_platform_fees(escrow, 1, sender=owner)


# ---------------------------------------------------------------- sweep


def test_sweep__usdc_only_the_excess(
    escrow, usdc, owner, stranger, consumer, provider, settle, deposit, mint, assert_solvent
):
    settle(consumer, 10 * USDC, provider)
    deposit(consumer, 5 * USDC)
    mint(stranger, 3 * USDC)
    usdc.transfer(escrow, 3 * USDC, sender=stranger)  # by mistake
    assert_solvent(stray=3 * USDC)
    before = usdc.balanceOf(stranger)

    tx = escrow.sweep(usdc, stranger, sender=owner)

    assert tx.return_value == 3 * USDC
    assert usdc.balanceOf(stranger) == before + 3 * USDC
    assert events(tx, escrow.Swept) == [escrow.Swept(token=usdc, to=stranger, amount=3 * USDC)]
    assert_solvent()
    with ape.reverts("escrow: nothing to sweep"):
        escrow.sweep(usdc, stranger, sender=owner)


def test_sweep__front_run_funds_are_excess(
    escrow, usdc, owner, operator, consumer, provider, sign_payment, front_run
):
    # A front-run payment's funds are owed to nobody on-chain, reconciled or not: a reconcile is
    # paid by the operator (see test_reconcile.py), and the owner returns the front-run funds.
    front_run(payment := sign_payment(consumer, USDC, provider))
    assert escrow.sweep.call(usdc, owner, sender=owner) == USDC
    escrow.reconcile_authorization(payment, sender=operator)
    assert escrow.sweep.call(usdc, owner, sender=owner) == USDC


def test_sweep__usdc_nothing_to_sweep__reverts(escrow, usdc, owner, consumer, provider, settle):
    settle(consumer, USDC, provider)
    with ape.reverts("escrow: nothing to sweep"):
        escrow.sweep(usdc, owner, sender=owner)


def test_sweep__other_token_fully(project, escrow, owner, stranger):
    other = owner.deploy(project.MockUSDC)
    other.mint(escrow, 42 * USDC, sender=owner)
    tx = escrow.sweep(other, stranger, sender=owner)
    assert tx.return_value == 42 * USDC
    assert other.balanceOf(stranger) == 42 * USDC
    assert other.balanceOf(escrow) == 0
    assert events(tx, escrow.Swept) == [escrow.Swept(token=other, to=stranger, amount=42 * USDC)]
    with ape.reverts("escrow: nothing to sweep"):
        escrow.sweep(other, stranger, sender=owner)


def test_sweep__zero_payee__reverts(escrow, usdc, owner):
    with ape.reverts("escrow: zero payee"):
        escrow.sweep(usdc, ZERO_ADDRESS, sender=owner)


def test_sweep__escrow_as_payee__reverts(escrow, usdc, owner, stranger, mint):
    mint(stranger, USDC)
    usdc.transfer(escrow, USDC, sender=stranger)
    with ape.reverts("escrow: escrow as payee"):
        escrow.sweep(usdc, escrow, sender=owner)


# ---------------------------------------------------------------- ownership


def test_transfer_ownership__two_step(escrow, owner, stranger, relayer):
    tx = escrow.transfer_ownership(stranger, sender=owner)
    assert escrow.pending_owner() == stranger
    assert escrow.owner() == owner  # nothing changes until accepted
    assert events(tx, escrow.OwnershipTransferStarted) == [
        escrow.OwnershipTransferStarted(previous_owner=owner, new_owner=stranger)
    ]
    with ape.reverts("ownable_2step: caller is not the new owner"):
        escrow.accept_ownership(sender=relayer)

    tx = escrow.accept_ownership(sender=stranger)

    assert escrow.owner() == stranger
    assert escrow.pending_owner() == ZERO_ADDRESS
    assert events(tx, escrow.OwnershipTransferred) == [
        escrow.OwnershipTransferred(previous_owner=owner, new_owner=stranger)
    ]
    with ape.reverts(NOT_OWNER):
        escrow.set_fee_bps(0, sender=owner)
    escrow.set_fee_bps(0, sender=stranger)


def test_accept_ownership__nothing_pending__reverts(escrow, stranger):
    with ape.reverts("ownable_2step: caller is not the new owner"):
        escrow.accept_ownership(sender=stranger)


def test_transfer_ownership__replaced_before_accept(escrow, owner, stranger, relayer):
    escrow.transfer_ownership(stranger, sender=owner)
    escrow.transfer_ownership(relayer, sender=owner)
    with ape.reverts("ownable_2step: caller is not the new owner"):
        escrow.accept_ownership(sender=stranger)
    escrow.accept_ownership(sender=relayer)
    assert escrow.owner() == relayer
