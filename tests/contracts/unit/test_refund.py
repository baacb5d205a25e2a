"""`refund_payment`: an operator returns a credited x402 payment within the refund window."""

import ape
import pytest
from escrow_helpers import REFUND_WINDOW, USDC, ZERO_ADDRESS, events, split


def test_refund_payment__returns_amount_takes_share_and_fee(
    escrow, usdc, operator, consumer, provider, settle, earn, assert_solvent
):
    earn(provider, 10 * USDC)  # earlier earnings, which the refund must not touch
    earnings_before, fees_before = escrow.earnings(provider), escrow.platform_fees()
    payment = settle(consumer, 3 * USDC + 1, provider)
    payer_before = usdc.balanceOf(consumer)

    tx = escrow.refund_payment(payment, sender=operator)

    share, fee = split(payment.amount)
    assert usdc.balanceOf(consumer) == payer_before + payment.amount
    assert escrow.earnings(provider) == earnings_before
    assert escrow.platform_fees() == fees_before
    assert escrow.refunded(escrow.payment_reference(consumer, payment.nonce))
    assert events(tx, escrow.PaymentRefunded) == [
        escrow.PaymentRefunded(
            payer=consumer, provider=provider, nonce=payment.nonce, amount=payment.amount, fee=fee
        )
    ]
    assert share + fee == payment.amount
    assert_solvent()


def test_refund_payment__twice__reverts(escrow, operator, consumer, provider, settle, earn):
    earn(provider, 10 * USDC)
    payment = settle(consumer, USDC, provider)
    escrow.refund_payment(payment, sender=operator)
    with ape.reverts("escrow: already refunded"):
        escrow.refund_payment(payment, sender=operator)


def test_refund_payment__reconciled_payment(
    escrow, usdc, operator, consumer, provider, sign_payment, front_run, assert_solvent
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.reconcile_authorization(payment, sender=operator)
    before = usdc.balanceOf(consumer)
    escrow.refund_payment(payment, sender=operator)
    assert usdc.balanceOf(consumer) == before + USDC
    assert escrow.earnings(provider) == 0
    assert_solvent()


def test_refund_payment__at_window_end(chain, escrow, operator, consumer, provider, settle):
    payment = settle(consumer, USDC, provider, valid_before=chain.pending_timestamp + 100)
    chain.pending_timestamp = payment.valid_before + REFUND_WINDOW
    escrow.refund_payment(payment, sender=operator)


def test_refund_payment__after_window__reverts(chain, escrow, operator, consumer, provider, settle):
    payment = settle(consumer, USDC, provider, valid_before=chain.pending_timestamp + 100)
    chain.pending_timestamp = payment.valid_before + REFUND_WINDOW + 1
    with ape.reverts("escrow: refund window closed"):
        escrow.refund_payment(payment, sender=operator)


def test_refund_payment__provider_already_claimed__reverts(escrow, operator, consumer, provider, settle):
    payment = settle(consumer, USDC, provider)
    escrow.claim(1, provider, sender=provider)
    with ape.reverts("escrow: provider share already claimed"):
        escrow.refund_payment(payment, sender=operator)


def test_refund_payment__platform_fee_withdrawn__reverts(escrow, owner, operator, consumer, provider, settle):
    payment = settle(consumer, USDC, provider)
    escrow.withdraw_platform_fees(owner, 1, sender=owner)
    with ape.reverts("escrow: platform fee already withdrawn"):
        escrow.refund_payment(payment, sender=operator)


def test_refund_payment__while_paused(
    escrow, usdc, owner, operator, consumer, provider, settle, assert_solvent
):
    payment = settle(consumer, USDC, provider)
    escrow.pause(sender=owner)
    before = usdc.balanceOf(consumer)
    escrow.refund_payment(payment, sender=operator)
    assert usdc.balanceOf(consumer) == before + USDC
    assert_solvent()


def test_refund_payment__unused_authorization__reverts(
    escrow, operator, consumer, provider, sign_payment, earn
):
    earn(provider, 10 * USDC)
    with ape.reverts("escrow: authorization not used"):
        escrow.refund_payment(sign_payment(consumer, USDC, provider), sender=operator)


def test_refund_payment__tampered_amount__reverts(escrow, operator, consumer, provider, settle, earn):
    earn(provider, 10 * USDC)
    payment = settle(consumer, USDC, provider)
    with ape.reverts("escrow: invalid signature"):
        escrow.refund_payment(payment._replace(amount=5 * USDC), sender=operator)


def test_refund_payment__other_payer__reverts(escrow, operator, consumer, consumer2, provider, settle, earn):
    earn(provider, 10 * USDC)
    payment = settle(consumer, USDC, provider)
    with ape.reverts("escrow: invalid signature"):
        escrow.refund_payment(payment._replace(payer=consumer2.address), sender=operator)


def test_refund_payment__not_operator__reverts(escrow, consumer, provider, settle):
    payment = settle(consumer, USDC, provider)
    for caller in (consumer, provider):
        with ape.reverts("escrow: caller is not an operator"):
            escrow.refund_payment(payment, sender=caller)


@pytest.mark.parametrize(
    ("amount", "has_provider", "reason"), [(0, True, "zero amount"), (1, False, "zero provider")]
)
def test_refund_payment__invalid_payment__reverts(
    escrow, operator, consumer, provider, sign_payment, amount, has_provider, reason
):
    payment = sign_payment(consumer, amount, provider if has_provider else ZERO_ADDRESS)
    with ape.reverts(f"escrow: {reason}"):
        escrow.refund_payment(payment, sender=operator)


def test_refund_payment__after_fee_change__splits_at_the_current_fee(
    escrow, owner, operator, consumer, provider, settle, earn, assert_solvent
):
    # No per-payment record is kept, so a refund takes back share and fee at today's rate
    # (documented operator trust); the payer always gets exactly the signed amount.
    earn(provider, 10 * USDC)
    earnings_before, fees_before = escrow.earnings(provider), escrow.platform_fees()
    payment = settle(consumer, USDC, provider)  # credited 900_000 / 100_000 at 10%
    escrow.set_fee_bps(2_000, sender=owner)
    escrow.refund_payment(payment, sender=operator)  # takes back 800_000 / 200_000
    assert escrow.earnings(provider) == earnings_before + 100_000
    assert escrow.platform_fees() == fees_before - 100_000
    assert_solvent()


def test_refund_payment__far_future_valid_before(escrow, usdc, operator, consumer, provider, settle):
    # USDC accepts any validBefore up to 2**256-1; the window check must not overflow on it.
    payment = settle(consumer, USDC, provider, valid_before=2**256 - 1)
    before = usdc.balanceOf(consumer)
    escrow.refund_payment(payment, sender=operator)
    assert usdc.balanceOf(consumer) == before + USDC
