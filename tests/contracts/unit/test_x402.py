"""x402 `exact` payments: `settle_authorization` and the batch `settle_authorizations`."""

import dataclasses

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, events, high_s, split

# ---------------------------------------------------------------- settle_authorization


@pytest.mark.parametrize("amount", [1, 9, 10, 11, 1_234_567, 25 * USDC])
def test_settle_authorization__credits_exact_split(
    escrow, usdc, operator, consumer, provider, sign_payment, assert_solvent, amount
):
    payment = sign_payment(consumer, amount, provider)
    payer_before = usdc.balanceOf(consumer)

    tx = escrow.settle_authorization(payment, sender=operator)

    share, fee = split(amount)
    assert share + fee == amount
    assert escrow.earnings(provider) == share
    assert escrow.total_earnings() == share
    assert escrow.platform_fees() == fee
    assert usdc.balanceOf(consumer) == payer_before - amount
    assert usdc.balanceOf(escrow) == amount
    assert usdc.authorizationState(consumer, payment.nonce)
    assert events(tx, escrow.PaymentSettled) == [
        escrow.PaymentSettled(payer=consumer, provider=provider, nonce=payment.nonce, amount=amount, fee=fee)
    ]
    assert_solvent()


def test_settle_authorization__no_eth_payer(escrow, usdc, operator, provider, new_wallet, sign_payment):
    wallet = new_wallet()
    escrow.settle_authorization(sign_payment(wallet, 2 * USDC, provider), sender=operator)
    assert usdc.balanceOf(wallet.address) == 998 * USDC
    assert ape.chain.provider.get_balance(wallet.address) == 0


def test_settle_authorization__replay__reverts(escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider)
    escrow.settle_authorization(payment, sender=operator)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__same_nonce_other_provider__reverts(
    escrow, operator, consumer, provider, provider2, sign_payment
):
    payment = sign_payment(consumer, USDC, provider)
    escrow.settle_authorization(payment, sender=operator)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        escrow.settle_authorization(payment._replace(provider=provider2.address), sender=operator)


def test_settle_authorization__expired__reverts(chain, escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider, valid_before=chain.pending_timestamp + 60)
    chain.pending_timestamp += 61
    with ape.reverts("FiatTokenV2: authorization is expired"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__not_yet_valid__reverts(
    chain, escrow, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, valid_after=chain.pending_timestamp + 600)
    with ape.reverts("FiatTokenV2: authorization is not yet valid"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__wrong_signer__reverts(
    escrow, operator, consumer, consumer2, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, signer=consumer2)
    with ape.reverts("FiatTokenV2: invalid signature"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__signed_for_another_to__reverts(
    escrow, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, to=provider)
    with ape.reverts("FiatTokenV2: invalid signature"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__tampered_amount__reverts(escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider)
    with ape.reverts("FiatTokenV2: invalid signature"):
        escrow.settle_authorization(payment._replace(amount=2 * USDC), sender=operator)


@pytest.mark.parametrize("field", ["chain_id", "name", "version", "verifying_contract"])
def test_settle_authorization__wrong_domain__reverts(
    escrow, operator, consumer, provider, sign_payment, usdc_eip712, field
):
    wrong = {
        "chain_id": usdc_eip712.chain_id + 1,
        "name": "USD Coin",  # mainnet USDC's name: signing for the wrong network
        "version": "1",
        "verifying_contract": str(escrow.address),
    }[field]
    domain = dataclasses.replace(usdc_eip712, **{field: wrong})
    payment = sign_payment(consumer, USDC, provider, domain=domain)
    with ape.reverts("FiatTokenV2: invalid signature"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__receive_authorization_type__reverts(
    escrow, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, primary="ReceiveWithAuthorization")
    with ape.reverts("FiatTokenV2: invalid signature"):
        escrow.settle_authorization(payment, sender=operator)


def test_settle_authorization__high_s__reverts(escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider)
    v, s = high_s(payment.v, payment.s)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        escrow.settle_authorization(payment._replace(v=v, s=s), sender=operator)


def test_settle_authorization__payer_lacks_funds__reverts(
    escrow, operator, provider, new_wallet, sign_payment
):
    wallet = new_wallet(balance=USDC - 1)
    with ape.reverts("erc20: transfer amount exceeds balance"):
        escrow.settle_authorization(sign_payment(wallet, USDC, provider), sender=operator)


@pytest.mark.parametrize("caller", ["stranger", "provider", "owner"])
def test_settle_authorization__not_operator__reverts(
    escrow, consumer, provider, sign_payment, request, caller
):
    payment = sign_payment(consumer, USDC, provider)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_authorization(payment, sender=request.getfixturevalue(caller))


def test_settle_authorization__removed_operator__reverts(
    escrow, owner, operator, consumer, provider, sign_payment
):
    escrow.set_operator(operator, False, sender=owner)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_authorization(sign_payment(consumer, USDC, provider), sender=operator)


def test_settle_authorization__paused__reverts(escrow, owner, operator, consumer, provider, sign_payment):
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.settle_authorization(sign_payment(consumer, USDC, provider), sender=operator)


def test_settle_authorization__zero_amount__reverts(escrow, operator, consumer, provider, sign_payment):
    with ape.reverts("escrow: zero amount"):
        escrow.settle_authorization(sign_payment(consumer, 0, provider), sender=operator)


def test_settle_authorization__zero_provider__reverts(escrow, operator, consumer, sign_payment):
    with ape.reverts("escrow: zero provider"):
        escrow.settle_authorization(sign_payment(consumer, USDC, ZERO_ADDRESS), sender=operator)


def test_settle_authorization__uses_current_fee(escrow, owner, operator, consumer, provider, sign_payment):
    escrow.set_fee_bps(2_000, sender=owner)
    escrow.settle_authorization(sign_payment(consumer, USDC, provider), sender=operator)
    assert escrow.earnings(provider) == 800_000
    assert escrow.platform_fees() == 200_000


# ---------------------------------------------------------------- settle_authorizations


def test_settle_authorizations__all_credited(
    escrow, usdc, operator, consumer, consumer2, provider, provider2, sign_payment, assert_solvent
):
    payments = [
        sign_payment(consumer, 1 * USDC, provider),
        sign_payment(consumer2, 3 * USDC + 7, provider2),
        sign_payment(consumer, 19, provider),
    ]
    assert escrow.settle_authorizations.call(payments, sender=operator) == 3

    tx = escrow.settle_authorizations(payments, sender=operator)

    assert tx.return_value == 3
    splits = [split(p.amount) for p in payments]
    assert escrow.earnings(provider) == splits[0][0] + splits[2][0]
    assert escrow.earnings(provider2) == splits[1][0]
    assert escrow.platform_fees() == sum(fee for _, fee in splits)
    assert usdc.balanceOf(escrow) == sum(p.amount for p in payments)
    # One event for the whole batch; each payment shows as USDC's AuthorizationUsed.
    fees = sum(fee for _, fee in splits)
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(operator=operator, count=3, amount=sum(p.amount for p in payments), fee=fees)
    ]
    assert events(tx, escrow.PaymentSettled) == events(tx, escrow.PaymentFailed) == []
    assert [log.nonce for log in events(tx, usdc.AuthorizationUsed)] == [p.nonce for p in payments]
    assert_solvent()


def test_settle_authorizations__front_run_one__skipped(
    escrow, usdc, operator, consumer, provider, provider2, sign_payment, front_run, assert_solvent
):
    payments = [sign_payment(consumer, (i + 1) * USDC, provider if i % 2 else provider2) for i in range(3)]
    front_run(payments[1])

    tx = escrow.settle_authorizations(payments, sender=operator)

    assert tx.return_value == 2
    failed = payments[1]
    assert events(tx, escrow.PaymentFailed) == [
        escrow.PaymentFailed(payer=consumer, provider=failed.provider, nonce=failed.nonce)
    ]
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(count=2, amount=4 * USDC, fee=split(USDC)[1] + split(3 * USDC)[1])
    ]
    assert escrow.earnings(provider) == 0
    assert escrow.earnings(provider2) == split(USDC)[0] + split(3 * USDC)[0]
    # The front-run funds sit in the escrow, owed to nobody until reconciled.
    assert_solvent(stray=failed.amount)


def test_settle_authorizations__invalid_ones__skipped(
    chain, escrow, operator, consumer, consumer2, provider, sign_payment, assert_solvent
):
    good = sign_payment(consumer, USDC, provider)
    bad = [
        sign_payment(consumer, USDC, provider, signer=consumer2),
        sign_payment(consumer, USDC, provider, valid_after=chain.pending_timestamp + 600),
        sign_payment(consumer, USDC, provider, to=provider),
    ]
    tx = escrow.settle_authorizations([*bad, good], sender=operator)
    assert tx.return_value == 1
    assert len(events(tx, escrow.PaymentFailed)) == 3
    assert escrow.earnings(provider) == split(USDC)[0]
    assert_solvent()


def test_settle_authorizations__duplicate_in_batch__second_skipped(
    escrow, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider)
    tx = escrow.settle_authorizations([payment, payment], sender=operator)
    assert tx.return_value == 1
    assert len(events(tx, escrow.PaymentFailed)) == 1
    assert escrow.earnings(provider) == split(USDC)[0]


def test_settle_authorizations__empty__returns_zero(escrow, operator):
    tx = escrow.settle_authorizations([], sender=operator)
    assert events(tx, escrow.PaymentsSettled) == [escrow.PaymentsSettled(count=0, amount=0, fee=0)]
    assert tx.return_value == 0
    assert escrow.liabilities() == 0


def test_settle_authorizations__zero_amount__reverts_batch(
    escrow, operator, consumer, provider, sign_payment
):
    payments = [sign_payment(consumer, USDC, provider), sign_payment(consumer, 0, provider)]
    with ape.reverts("escrow: zero amount"):
        escrow.settle_authorizations(payments, sender=operator)


def test_settle_authorizations__zero_provider__reverts_batch(escrow, operator, consumer, sign_payment):
    with ape.reverts("escrow: zero provider"):
        escrow.settle_authorizations([sign_payment(consumer, USDC, ZERO_ADDRESS)], sender=operator)


def test_settle_authorizations__not_operator__reverts(escrow, stranger, consumer, provider, sign_payment):
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_authorizations([sign_payment(consumer, USDC, provider)], sender=stranger)


def test_settle_authorizations__paused__reverts(escrow, owner, operator, consumer, provider, sign_payment):
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.settle_authorizations([sign_payment(consumer, USDC, provider)], sender=operator)


def test_settle_authorizations__max_batch(escrow, operator, consumer, provider, sign_payment, assert_solvent):
    payments = [sign_payment(consumer, 10_000 + i, provider) for i in range(escrow.MAX_PAYMENTS())]
    tx = escrow.settle_authorizations(payments, sender=operator)
    assert tx.return_value == 64
    assert escrow.earnings(provider) == sum(split(p.amount)[0] for p in payments)
    assert_solvent()
