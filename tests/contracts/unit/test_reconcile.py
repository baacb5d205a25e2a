"""Front-running: an x402 authorization submitted straight to USDC, then `reconcile_authorization`,
which the operator pays for: the escrow never credits funds it did not receive itself."""

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, credit_of, events, leaf, split


def test_front_run__funds_arrive_uncredited(
    escrow, usdc, consumer, provider, sign_payment, front_run, assert_solvent
):
    payment = sign_payment(consumer, 3 * USDC, provider)
    front_run(payment)
    assert usdc.balanceOf(escrow) == 3 * USDC
    assert escrow.liabilities() == 0
    assert escrow.earnings(provider) == 0
    assert_solvent(stray=3 * USDC)


def test_reconcile_authorization__operator_pays_once(
    escrow, usdc, operator, consumer, provider, sign_payment, front_run, assert_solvent
):
    payment = sign_payment(consumer, 3 * USDC + 3, provider)
    front_run(payment)
    reference = escrow.payment_reference(consumer, payment.nonce)
    assert not escrow.reconciled(reference)
    operator_before = usdc.balanceOf(operator)

    tx = escrow.reconcile_authorization(payment, sender=operator)

    share, fee = split(payment.amount)
    assert escrow.earnings(provider) == share
    assert escrow.platform_fees() == fee
    assert escrow.reconciled(reference)
    assert usdc.balanceOf(operator) == operator_before - payment.amount
    # Committed like a batch of one, so that it can be refunded like any credited payment.
    root = leaf(credit_of(payment))
    assert escrow.settlement_roots(root) == tx.timestamp
    assert events(tx, escrow.Credited) == [
        escrow.Credited(provider=provider, settlement=root, amount=payment.amount, fee=fee)
    ]
    assert events(tx, escrow.PaymentReconciled) == [
        escrow.PaymentReconciled(
            payer=consumer, provider=provider, nonce=payment.nonce, amount=payment.amount, fee=fee
        )
    ]
    # The front-run funds stay outside the books, for the owner's sweep.
    assert_solvent(stray=payment.amount)
    with ape.reverts("escrow: already reconciled"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__after_batch_skipped_it(
    escrow, operator, consumer, provider, provider2, sign_payment, front_run, assert_solvent
):
    payments = [sign_payment(consumer, USDC, provider), sign_payment(consumer, 2 * USDC, provider2)]
    front_run(payments[1])
    escrow.settle_authorizations(payments, sender=operator)
    escrow.reconcile_authorization(payments[1], sender=operator)
    assert escrow.earnings(provider2) == split(2 * USDC)[0]
    assert_solvent(stray=2 * USDC)


def test_reconcile_authorization__second_time_other_provider__reverts(
    escrow, operator, consumer, provider, provider2, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.reconcile_authorization(payment, sender=operator)
    with ape.reverts("escrow: already reconciled"):
        escrow.reconcile_authorization(payment._replace(provider=provider2.address), sender=operator)


def test_reconcile_authorization__operator_without_funds__reverts(
    escrow, usdc, operator, stranger, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    usdc.transfer(stranger, usdc.balanceOf(operator), sender=operator)
    with ape.reverts("erc20: transfer amount exceeds balance"):
        escrow.reconcile_authorization(payment, sender=operator)
    assert escrow.earnings(provider) == 0


def test_reconcile_authorization__operator_without_allowance__reverts(
    escrow, usdc, operator, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    usdc.approve(escrow, 0, sender=operator)
    with ape.reverts("erc20: insufficient allowance"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__unused__reverts(escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider)
    with ape.reverts("escrow: authorization not used"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__wrong_signer__reverts(
    escrow, operator, consumer, consumer2, provider, sign_payment, front_run
):
    front_run(sign_payment(consumer, USDC, provider))
    forged = sign_payment(consumer, USDC, provider, signer=consumer2)
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(forged, sender=operator)


def test_reconcile_authorization__tampered_amount__reverts(
    escrow, operator, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(payment._replace(amount=USDC // 2, charged=USDC // 2), sender=operator)


def test_reconcile_authorization__paid_to_someone_else__reverts(
    escrow, usdc, relayer, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, to=relayer)
    usdc.transferWithAuthorization(
        consumer, relayer, USDC, 0, payment.valid_before, payment.nonce, payment.v, payment.r, payment.s,
        sender=relayer,
    )  # fmt: skip
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__not_operator__reverts(
    escrow, usdc, stranger, consumer, provider, sign_payment, front_run, mint
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    mint(stranger, USDC)
    usdc.approve(escrow, USDC, sender=stranger)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.reconcile_authorization(payment, sender=stranger)


def test_reconcile_authorization__paused__reverts(
    escrow, owner, operator, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.reconcile_authorization(payment, sender=operator)


@pytest.mark.parametrize(
    ("amount", "who", "reason"),
    [(0, "provider", "zero amount"), (1, "zero", "zero provider"), (1, "escrow", "escrow as provider")],
)
def test_reconcile_authorization__invalid_payment__reverts(
    escrow, operator, consumer, provider, sign_payment, amount, who, reason
):
    to = {"provider": provider, "zero": ZERO_ADDRESS, "escrow": escrow}[who]
    payment = sign_payment(consumer, amount, to)
    with ape.reverts(f"escrow: {reason}"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__charged_below_value__operator_pays_the_charge_only(
    escrow, usdc, operator, consumer, provider, sign_payment, front_run, assert_solvent
):
    # A per-token call that cost 10_400 of a 20_300 authorization. The escrow cannot tell whether
    # the front-run funds are this payment's (or a cancelled authorization's: none), so the unused
    # rest is credited to no deposit: it stays outside the books with the front-run funds.
    payment = sign_payment(consumer, 20_300, provider, charged=10_400)
    front_run(payment)
    operator_before = usdc.balanceOf(operator)

    tx = escrow.reconcile_authorization(payment, sender=operator)

    share, fee = split(10_400)
    assert escrow.earnings(provider) == share
    assert escrow.platform_fees() == fee
    assert escrow.deposits(consumer) == 0
    assert usdc.balanceOf(operator) == operator_before - 10_400
    assert escrow.settlement_roots(leaf(credit_of(payment))) == tx.timestamp
    assert events(tx, escrow.PaymentReconciled) == [
        escrow.PaymentReconciled(
            payer=consumer, provider=provider, nonce=payment.nonce, amount=10_400, fee=fee
        )
    ]
    assert_solvent(stray=20_300)


def test_reconcile_authorization__charged_above_value__reverts(
    escrow, operator, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider, charged=USDC + 1)
    front_run(payment)
    with ape.reverts("escrow: charged above value"):
        escrow.reconcile_authorization(payment, sender=operator)


# ---------------------------------------------------------------- the audit's attacks (issue 15, item 3)
# USDC records a cancelled authorization exactly as a used one, and without a per-payment slot
# (22k gas a call) the escrow cannot tell a payment settled here from a front-run one. So a
# reconcile no longer takes anything from the escrow: whatever the operator reconciles, it pays
# for, and stray funds (someone else's front-run payment, a mistaken transfer) stay untouched.


def test_attack__reconcile_already_settled_payment__takes_no_stray_funds(
    escrow, usdc, operator, stranger, consumer, provider, settle, mint, assert_solvent
):
    settled = settle(consumer, 10 * USDC, provider)
    mint(stranger, 10 * USDC)
    usdc.transfer(escrow, 10 * USDC, sender=stranger)  # stray funds the attack used to take
    operator_before = usdc.balanceOf(operator)

    escrow.reconcile_authorization(settled.payment, sender=operator)

    # The second credit cost the operator exactly what it credited; the stray funds are intact.
    assert usdc.balanceOf(operator) == operator_before - 10 * USDC
    assert escrow.earnings(provider) == 2 * split(10 * USDC)[0]
    assert_solvent(stray=10 * USDC)


def test_attack__reconcile_cancelled_authorization__takes_no_front_run_funds(
    escrow,
    usdc,
    operator,
    consumer,
    consumer2,
    provider,
    provider2,
    sign_payment,
    front_run,
    cancel_authorization,
    assert_solvent,
):
    front_run(paid := sign_payment(consumer, USDC, provider))
    cancel_authorization(consumer2, cancelled := sign_payment(consumer2, USDC, provider2))
    operator_before = usdc.balanceOf(operator)

    escrow.reconcile_authorization(cancelled, sender=operator)  # USDC reports cancelled as used

    assert usdc.balanceOf(operator) == operator_before - USDC  # paid by the operator...
    escrow.reconcile_authorization(paid, sender=operator)  # ...so the real front-run still credits
    assert escrow.earnings(provider) == split(USDC)[0]
    assert_solvent(stray=USDC)


def test_attack__sweep_before_reconcile__provider_still_paid(
    escrow, usdc, owner, operator, consumer, provider, sign_payment, front_run, assert_solvent
):
    # Issue 15, item 4: the owner sweeping a front-run payment no longer strands its provider.
    payment = sign_payment(consumer, 2 * USDC, provider)
    front_run(payment)
    assert escrow.sweep(usdc, owner, sender=owner).return_value == 2 * USDC

    escrow.reconcile_authorization(payment, sender=operator)

    assert escrow.earnings(provider) == split(2 * USDC)[0]
    assert_solvent()
