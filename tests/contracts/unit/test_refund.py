"""`refund_payment`: an operator returns a credited x402 payment within the refund window, proven by
the payment's leaf in the root of the settlement that credited it."""

import ape
import pytest
from escrow_helpers import REFUND_WINDOW, USDC, ZERO_BYTES32, Settled, credit_of, events, leaf, split


def test_refund_payment__returns_amount_takes_share_and_fee(
    escrow, usdc, operator, consumer, provider, settle, earn, refund, assert_solvent
):
    earn(provider, 10 * USDC)  # earlier earnings, which the refund must not touch
    earnings_before, fees_before = escrow.earnings(provider), escrow.platform_fees()
    settled = settle(consumer, 3 * USDC + 1, provider)
    payer_before = usdc.balanceOf(consumer)

    tx = refund(settled)

    share, fee = split(settled.credit.amount)
    assert usdc.balanceOf(consumer) == payer_before + settled.credit.amount
    assert escrow.earnings(provider) == earnings_before
    assert escrow.platform_fees() == fees_before
    assert escrow.refunded(escrow.payment_reference(consumer, settled.credit.nonce))
    assert events(tx, escrow.PaymentRefunded) == [
        escrow.PaymentRefunded(
            payer=consumer,
            provider=provider,
            nonce=settled.credit.nonce,
            amount=settled.credit.amount,
            fee=fee,
        )
    ]
    assert share + fee == settled.credit.amount
    assert_solvent()


def test_refund_payment__partial_charge__returns_the_charge_only(
    escrow, usdc, consumer, provider, settle, earn, refund, assert_solvent
):
    # Authorized 20_300, charged 10_400: the rest is in the deposit already; a refund returns the
    # charge, out of the provider's share and the fee, and leaves the deposit alone.
    earn(provider, 10 * USDC)
    earnings_before, fees_before = escrow.earnings(provider), escrow.platform_fees()
    settled = settle(consumer, 20_300, provider, charged=10_400)
    payer_before = usdc.balanceOf(consumer)

    tx = refund(settled)

    assert usdc.balanceOf(consumer) == payer_before + 10_400
    assert escrow.deposits(consumer) == 9_900
    assert escrow.earnings(provider) == earnings_before
    assert escrow.platform_fees() == fees_before
    assert events(tx, escrow.PaymentRefunded) == [
        escrow.PaymentRefunded(
            payer=consumer, provider=provider, nonce=settled.credit.nonce, amount=10_400, fee=split(10_400)[1]
        )
    ]
    assert_solvent()


def test_attack__refund_of_the_authorized_value__reverts(
    escrow, consumer, provider, settle, earn, refund, assert_solvent
):
    # Claiming the authorized value instead of the charge: that leaf is in no root.
    earn(provider, 10 * USDC)
    settled = settle(consumer, 20_300, provider, charged=10_400)
    forged = settled._replace(credit=settled.credit._replace(amount=20_300))
    with ape.reverts("escrow: payment not settled here"):
        refund(forged)
    assert_solvent()


def test_refund_payment__one_of_a_batch(
    escrow, usdc, consumer, consumer2, provider, provider2, sign_payment, settle_batch, refund, assert_solvent
):
    payments = [
        sign_payment((consumer, consumer2)[i % 2], USDC + i, (provider, provider2)[i % 2]) for i in range(7)
    ]
    _, settled = settle_batch(payments)
    target = settled[4]
    before = usdc.balanceOf(consumer)

    refund(target)

    assert usdc.balanceOf(consumer) == before + target.credit.amount
    assert escrow.earnings(provider) == sum(split(p.amount)[0] for p in payments[0::2]) - split(USDC + 4)[0]
    assert_solvent()


def test_refund_payment__twice__reverts(escrow, consumer, provider, settle, earn, refund):
    earn(provider, 10 * USDC)
    settled = settle(consumer, USDC, provider)
    refund(settled)
    with ape.reverts("escrow: already refunded"):
        refund(settled)


def test_refund_payment__reconciled_payment(
    escrow, usdc, operator, consumer, provider, sign_payment, front_run, refund, assert_solvent
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.reconcile_authorization(payment, sender=operator)
    before = usdc.balanceOf(consumer)
    credit = credit_of(payment)
    refund(Settled(payment, credit, leaf(credit), []))
    assert usdc.balanceOf(consumer) == before + USDC
    assert escrow.earnings(provider) == 0
    assert_solvent(stray=USDC)


def test_refund_payment__at_window_end(chain, consumer, provider, settle, refund):
    settled = settle(consumer, USDC, provider)
    chain.pending_timestamp += REFUND_WINDOW
    refund(settled)


def test_refund_payment__after_window__reverts(chain, escrow, consumer, provider, settle, refund):
    settled = settle(consumer, USDC, provider)
    chain.pending_timestamp += REFUND_WINDOW + 1
    with ape.reverts("escrow: refund window closed"):
        refund(settled)


def test_refund_payment__window_runs_from_the_credit_not_valid_before(
    chain, consumer, provider, settle, refund
):
    # USDC accepts any validBefore up to 2**256-1: the window is the settlement's, not the signature's.
    settled = settle(consumer, USDC, provider, valid_before=2**256 - 1)
    chain.pending_timestamp += REFUND_WINDOW + 1
    with ape.reverts("escrow: refund window closed"):
        refund(settled)


def test_refund_payment__provider_already_claimed__reverts(escrow, consumer, provider, settle, refund):
    settled = settle(consumer, USDC, provider)
    escrow.claim(1, provider, sender=provider)
    with ape.reverts("escrow: provider share already claimed"):
        refund(settled)


def test_refund_payment__platform_fee_withdrawn__reverts(escrow, owner, consumer, provider, settle, refund):
    settled = settle(consumer, USDC, provider)
    escrow.withdraw_platform_fees(owner, 1, sender=owner)
    with ape.reverts("escrow: platform fee already withdrawn"):
        refund(settled)


def test_refund_payment__while_paused(
    escrow, usdc, owner, consumer, provider, settle, refund, assert_solvent
):
    settled = settle(consumer, USDC, provider)
    escrow.pause(sender=owner)
    before = usdc.balanceOf(consumer)
    refund(settled)
    assert usdc.balanceOf(consumer) == before + USDC
    assert_solvent()


def test_refund_payment__not_operator__reverts(consumer, provider, settle, refund):
    settled = settle(consumer, USDC, provider)
    for caller in (consumer, provider):
        with ape.reverts("escrow: caller is not an operator"):
            refund(settled, sender=caller)


# ---------------------------------------------------------------- the audit's attacks (issue 15, item 2)
# Each used to take money from a provider or the platform; each must now be refused and change
# nothing.


def test_attack__refund_cancelled_authorization__reverts(
    escrow, usdc, consumer, provider, sign_payment, cancel_authorization, earn, refund, assert_solvent
):
    earn(provider, 10 * USDC)
    payment = sign_payment(consumer, 10 * USDC, provider)
    cancel_authorization(consumer, payment)  # USDC marks it used; no money ever moved
    credit = credit_of(payment)
    earnings, fees, payer = escrow.earnings(provider), escrow.platform_fees(), usdc.balanceOf(consumer)
    with ape.reverts("escrow: payment not settled here"):
        refund(Settled(payment, credit, leaf(credit), []))
    assert (escrow.earnings(provider), escrow.platform_fees(), usdc.balanceOf(consumer)) == (
        earnings,
        fees,
        payer,
    )
    assert_solvent()


def test_attack__refund_front_run_never_credited__reverts(
    escrow, consumer, provider, sign_payment, front_run, earn, refund
):
    earn(provider, 10 * USDC)
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    credit = credit_of(payment)
    with ape.reverts("escrow: payment not settled here"):
        refund(Settled(payment, credit, leaf(credit), []))


@pytest.mark.parametrize("field", ["provider", "fee_bps", "amount", "payer", "nonce"])
def test_attack__refund_with_altered_credit__reverts(
    escrow, consumer2, provider, provider2, settle, earn, refund, field
):
    # A refund debiting a provider the payment was never credited to, or at another fee, or of
    # another amount: the altered leaf is in no root.
    earn(provider, 10 * USDC)
    earn(provider2, 10 * USDC)
    settled = settle(consumer2, USDC, provider)
    altered = {
        "provider": provider2.address,
        "fee_bps": 0,
        "amount": 2 * USDC,
        "payer": provider.address,
        "nonce": b"\x01" * 32,
    }[field]
    forged = settled._replace(credit=settled.credit._replace(**{field: altered}))
    before = (escrow.earnings(provider), escrow.earnings(provider2), escrow.platform_fees())
    with ape.reverts("escrow: payment not settled here"):
        refund(forged)
    assert (escrow.earnings(provider), escrow.earnings(provider2), escrow.platform_fees()) == before


def test_attack__refund_after_fee_change__splits_at_the_credited_fee(
    escrow, owner, consumer, provider, settle, earn, refund, assert_solvent
):
    earn(provider, 10 * USDC)
    earnings_before, fees_before = escrow.earnings(provider), escrow.platform_fees()
    settled = settle(consumer, USDC, provider)  # credited 900_000 / 100_000 at 10%
    escrow.set_fee_bps(0, sender=owner)
    refund(settled)  # takes back exactly 900_000 / 100_000, not 1_000_000 / 0
    assert escrow.earnings(provider) == earnings_before
    assert escrow.platform_fees() == fees_before
    assert_solvent()


def test_attack__refund_with_unknown_root_or_bad_proof__reverts(
    escrow, consumer, provider, sign_payment, settle_batch, earn, refund
):
    earn(provider, 10 * USDC)
    _, settled = settle_batch([sign_payment(consumer, USDC, provider) for _ in range(4)])
    target = settled[1]
    for forged in (
        target._replace(root=b"\x02" * 32),
        target._replace(root=ZERO_BYTES32, proof=[]),
        target._replace(proof=list(reversed(target.proof))),
        target._replace(proof=target.proof[:-1]),
        target._replace(root=target.proof[0], proof=[]),  # an inner node is not a stored root
        settled[2]._replace(credit=target.credit),
    ):
        with ape.reverts("escrow: payment not settled here"):
            refund(forged)
    refund(target)
