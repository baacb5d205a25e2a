"""x402 `exact` payments: `settle_authorizations`, its Merkle commitment and its credit events."""

import dataclasses

import ape
import pytest
from escrow_helpers import (
    USDC,
    WITHDRAWAL_DELAY,
    ZERO_ADDRESS,
    ZERO_BYTES32,
    credit_of,
    events,
    high_s,
    leaf,
    settlement,
    split,
)
from quotra.chain import merkle

# ---------------------------------------------------------------- one payment


@pytest.mark.parametrize("amount", [1, 9, 10, 11, 1_234_567, 25 * USDC])
def test_settle_authorizations__one__credits_exact_split(
    escrow, usdc, operator, consumer, provider, sign_payment, settle_batch, assert_solvent, amount
):
    payment = sign_payment(consumer, amount, provider)
    payer_before = usdc.balanceOf(consumer)

    tx, (settled,) = settle_batch([payment])

    share, fee = split(amount)
    assert share + fee == amount
    assert escrow.earnings(provider) == share
    assert escrow.total_earnings() == share
    assert escrow.platform_fees() == fee
    assert usdc.balanceOf(consumer) == payer_before - amount
    assert usdc.balanceOf(escrow) == amount
    assert usdc.authorizationState(consumer, payment.nonce)
    # A batch of one commits its single leaf as the root, with the time it was credited.
    assert settled.root == leaf(settled.credit) == escrow.hash_credit(settled.credit)
    assert escrow.settlement_roots(settled.root) == tx.timestamp
    assert events(tx, escrow.Credited) == [
        escrow.Credited(provider=provider, settlement=settled.root, amount=amount, fee=fee)
    ]
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(operator=operator, root=settled.root, count=1, amount=amount, fee=fee)
    ]
    assert_solvent()


def test_settle_authorizations__no_eth_payer(escrow, usdc, provider, new_wallet, settle):
    wallet = new_wallet()
    settle(wallet, 2 * USDC, provider)
    assert usdc.balanceOf(wallet.address) == 998 * USDC
    assert ape.chain.provider.get_balance(wallet.address) == 0


def test_settle_authorizations__uses_current_fee(escrow, owner, consumer, provider, settle):
    escrow.set_fee_bps(2_000, sender=owner)
    settled = settle(consumer, USDC, provider)
    assert escrow.earnings(provider) == 800_000
    assert escrow.platform_fees() == 200_000
    assert settled.credit.fee_bps == 2_000


# Whatever USDC refuses is skipped, credited to nobody and committed to no root; USDC's own
# reason shows why (checked with the same authorization sent to USDC directly).
REFUSALS = {
    "replay": "FiatTokenV2: authorization is used or canceled",
    "expired": "FiatTokenV2: authorization is expired",
    "not yet valid": "FiatTokenV2: authorization is not yet valid",
    "wrong signer": "FiatTokenV2: invalid signature",
    "signed for another payee": "FiatTokenV2: invalid signature",
    "tampered amount": "FiatTokenV2: invalid signature",
    "receive type": "FiatTokenV2: invalid signature",
    "mainnet domain name": "FiatTokenV2: invalid signature",
    "other chain": "FiatTokenV2: invalid signature",
    "high s": "ecdsa: invalid signature `s` value",
    "unfunded": "erc20: transfer amount exceeds balance",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_settle_authorizations__refused_by_usdc__skipped_uncredited(
    chain,
    escrow,
    usdc,
    operator,
    relayer,
    consumer,
    consumer2,
    provider,
    sign_payment,
    settle,
    new_wallet,
    usdc_eip712,
    assert_solvent,
    case,
):
    if case == "replay":
        payment = settle(consumer, USDC, provider).payment
    elif case == "expired":
        payment = sign_payment(consumer, USDC, provider, valid_before=chain.pending_timestamp + 60)
        chain.pending_timestamp += 61
    elif case == "not yet valid":
        payment = sign_payment(consumer, USDC, provider, valid_after=chain.pending_timestamp + 600)
    elif case == "wrong signer":
        payment = sign_payment(consumer, USDC, provider, signer=consumer2)
    elif case == "signed for another payee":
        payment = sign_payment(consumer, USDC, provider, to=provider)
    elif case == "tampered amount":
        payment = sign_payment(consumer, USDC, provider)._replace(amount=2 * USDC)
    elif case == "receive type":
        payment = sign_payment(consumer, USDC, provider, primary="ReceiveWithAuthorization")
    elif case in ("mainnet domain name", "other chain"):
        wrong = {"name": "USD Coin"} if case == "mainnet domain name" else {"chain_id": 1}
        payment = sign_payment(consumer, USDC, provider, domain=dataclasses.replace(usdc_eip712, **wrong))
    elif case == "high s":
        payment = sign_payment(consumer, USDC, provider)
        v, s = high_s(payment.v, payment.s)
        payment = payment._replace(v=v, s=s)
    else:
        payment = sign_payment(new_wallet(balance=USDC - 1), USDC, provider)
    liabilities = escrow.liabilities()
    committed = escrow.settlement_roots(leaf(credit_of(payment)))  # only a replay's was

    tx = escrow.settle_authorizations([payment], sender=operator)

    assert tx.return_value == ZERO_BYTES32
    assert events(tx, escrow.PaymentFailed) == [
        escrow.PaymentFailed(payer=payment.payer, provider=provider, nonce=payment.nonce)
    ]
    assert events(tx, escrow.Credited) == []
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(operator=operator, root=ZERO_BYTES32, count=0, amount=0, fee=0)
    ]
    assert escrow.liabilities() == liabilities
    assert escrow.settlement_roots(leaf(credit_of(payment))) == committed
    with ape.reverts(REFUSALS[case]):
        usdc.transferWithAuthorization(payment.payer, escrow, payment.amount, *payment[4:], sender=relayer)
    assert_solvent()


# ---------------------------------------------------------------- per-token calls: what was used


@pytest.mark.parametrize(("value", "charged"), [(20_300, 10_400), (USDC, USDC - 1), (11, 1), (USDC, 0)])
def test_settle_authorizations__charged_below_value__rest_to_payer_deposit(
    chain,
    escrow,
    usdc,
    operator,
    consumer,
    provider,
    sign_payment,
    settle_batch,
    assert_solvent,
    value,
    charged,
):
    # A per-token call authorized for the listing's maximum and charged what it used: the whole
    # authorization comes in, the charge is split, the unused rest is the payer's deposit.
    payment = sign_payment(consumer, value, provider, charged=charged)
    payer_before = usdc.balanceOf(consumer)

    tx, (settled,) = settle_batch([payment])

    share, fee = split(charged)
    rest = value - charged
    assert usdc.balanceOf(consumer) == payer_before - value
    assert usdc.balanceOf(escrow) == value
    assert escrow.earnings(provider) == share
    assert escrow.platform_fees() == fee
    assert escrow.deposits(consumer) == escrow.total_deposits() == rest
    assert escrow.liabilities() == value
    # The leaf a refund proves carries what was charged, not the authorized value.
    assert settled.credit.amount == charged
    assert settled.root == escrow.hash_credit(settled.credit)
    assert events(tx, escrow.Deposited) == [
        escrow.Deposited(sender=consumer, beneficiary=consumer, amount=rest)
    ]
    assert events(tx, escrow.Credited) == [
        escrow.Credited(provider=provider, settlement=settled.root, amount=charged, fee=fee)
    ]
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(operator=operator, root=settled.root, count=1, amount=charged, fee=fee)
    ]
    assert_solvent()
    # The rest is withdrawable like any deposit.
    request = escrow.request_withdrawal(rest, sender=consumer)
    chain.pending_timestamp = request.timestamp + WITHDRAWAL_DELAY
    escrow.withdraw(sender=consumer)
    assert usdc.balanceOf(consumer) == payer_before - charged
    assert escrow.deposits(consumer) == 0
    assert_solvent()


def test_settle_authorizations__charged_value__no_deposit(
    escrow, consumer, provider, sign_payment, settle_batch, assert_solvent
):
    # A flat-priced call (or one that used the maximum) charges all it authorized.
    tx, _ = settle_batch([sign_payment(consumer, USDC, provider, charged=USDC)])
    assert events(tx, escrow.Deposited) == []
    assert escrow.deposits(consumer) == 0
    assert escrow.earnings(provider) == split(USDC)[0]
    assert_solvent()


def test_settle_authorizations__charged_above_value__reverts_batch(
    escrow, operator, consumer, provider, sign_payment
):
    payments = [
        sign_payment(consumer, USDC, provider),
        sign_payment(consumer, USDC, provider, charged=USDC + 1),
    ]
    with ape.reverts("escrow: charged above value"):
        escrow.settle_authorizations(payments, sender=operator)


def test_settle_authorizations__batch_of_partial_charges__rests_per_payer(
    escrow,
    usdc,
    operator,
    consumer,
    consumer2,
    provider,
    provider2,
    sign_payment,
    settle_batch,
    assert_solvent,
):
    payments = [
        sign_payment(consumer, 20_300, provider, charged=10_400),
        sign_payment(consumer2, 5 * USDC, provider, charged=5 * USDC),
        sign_payment(consumer, 7_000, provider2, charged=6_999),
        sign_payment(consumer2, 3 * USDC, provider2, charged=USDC + 3),
    ]

    tx, settled = settle_batch(payments)

    assert escrow.deposits(consumer) == (20_300 - 10_400) + 1
    assert escrow.deposits(consumer2) == 2 * USDC - 3
    assert escrow.earnings(provider) == split(10_400)[0] + split(5 * USDC)[0]
    assert escrow.earnings(provider2) == split(6_999)[0] + split(USDC + 3)[0]
    assert escrow.platform_fees() == sum(split(p.charged)[1] for p in payments)
    assert usdc.balanceOf(escrow) == sum(p.amount for p in payments)
    assert [s.credit.amount for s in settled] == [p.charged for p in payments]
    assert [(d.beneficiary, d.amount) for d in events(tx, escrow.Deposited)] == [
        (consumer, 9_900),
        (consumer, 1),
        (consumer2, 2 * USDC - 3),
    ]
    assert_solvent()


def test_settle_authorizations__refused_partial_charge__no_deposit(
    escrow, operator, consumer, provider, sign_payment, settle, assert_solvent
):
    replayed = settle(consumer, USDC, provider, charged=USDC // 4).payment
    deposit_before, liabilities = escrow.deposits(consumer), escrow.liabilities()

    tx = escrow.settle_authorizations([replayed], sender=operator)

    assert events(tx, escrow.PaymentFailed) != []
    assert events(tx, escrow.Deposited) == []
    assert escrow.deposits(consumer) == deposit_before
    assert escrow.liabilities() == liabilities
    assert_solvent()


@pytest.mark.parametrize("caller", ["stranger", "provider", "owner"])
def test_settle_authorizations__not_operator__reverts(
    escrow, consumer, provider, sign_payment, request, caller
):
    payment = sign_payment(consumer, USDC, provider)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_authorizations([payment], sender=request.getfixturevalue(caller))


def test_settle_authorizations__removed_operator__reverts(
    escrow, owner, operator, consumer, provider, sign_payment
):
    escrow.set_operator(operator, False, sender=owner)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_authorizations([sign_payment(consumer, USDC, provider)], sender=operator)


def test_settle_authorizations__paused__reverts(escrow, owner, operator, consumer, provider, sign_payment):
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.settle_authorizations([sign_payment(consumer, USDC, provider)], sender=operator)


@pytest.mark.parametrize(
    ("amount", "who", "reason"),
    [(0, "provider", "zero amount"), (1, "zero", "zero provider"), (1, "escrow", "escrow as provider")],
)
def test_settle_authorizations__payment_never_creditable__reverts_batch(
    escrow, operator, consumer, provider, sign_payment, amount, who, reason
):
    to = {"provider": provider, "zero": ZERO_ADDRESS, "escrow": escrow}[who]
    payments = [sign_payment(consumer, USDC, provider), sign_payment(consumer, amount, to)]
    with ape.reverts(f"escrow: {reason}"):
        escrow.settle_authorizations(payments, sender=operator)


# ---------------------------------------------------------------- batches


def test_settle_authorizations__batch__root_and_runs(
    escrow,
    usdc,
    operator,
    consumer,
    consumer2,
    provider,
    provider2,
    sign_payment,
    settle_batch,
    assert_solvent,
):
    payments = [
        sign_payment(consumer, 1 * USDC, provider),
        sign_payment(consumer2, 3 * USDC + 7, provider),
        sign_payment(consumer, 19, provider2),
        sign_payment(consumer2, 5, provider),
    ]

    tx, settled = settle_batch(payments)

    splits = [split(p.amount) for p in payments]
    root = settled[0].root
    assert escrow.earnings(provider) == splits[0][0] + splits[1][0] + splits[3][0]
    assert escrow.earnings(provider2) == splits[2][0]
    assert escrow.platform_fees() == sum(fee for _, fee in splits)
    assert usdc.balanceOf(escrow) == sum(p.amount for p in payments)
    assert escrow.settlement_roots(root) == tx.timestamp
    # One credit per run of consecutive payments to a provider, each naming the root.
    runs = [(provider, payments[:2]), (provider2, payments[2:3]), (provider, payments[3:])]
    assert events(tx, escrow.Credited) == [
        escrow.Credited(
            provider=who,
            settlement=root,
            amount=sum(p.amount for p in run),
            fee=sum(split(p.amount)[1] for p in run),
        )
        for who, run in runs
    ]
    total_fee = sum(fee for _, fee in splits)
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(
            operator=operator, root=root, count=4, amount=sum(p.amount for p in payments), fee=total_fee
        )
    ]
    assert [log.nonce for log in events(tx, usdc.AuthorizationUsed)] == [p.nonce for p in payments]
    # Every payment's leaf is provably in the root.
    for s in settled:
        assert merkle.verify(s.proof, root, leaf(s.credit))
    assert_solvent()


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8, 13, 64])
def test_settle_authorizations__root_matches_the_relays_tree(
    escrow, operator, consumer, provider, provider2, sign_payment, settle_batch, count
):
    payments = [sign_payment(consumer, 1_000 + i, provider if i % 3 else provider2) for i in range(count)]
    tx, settled = settle_batch(payments)  # asserts the returned root equals quotra.chain.merkle's
    assert escrow.settlement_roots(settled[0].root) == tx.timestamp
    assert all(len(s.proof) <= escrow.MAX_PROOF_LENGTH() for s in settled)


def test_settle_authorizations__front_run_one__skipped(
    escrow, operator, consumer, provider, provider2, sign_payment, front_run, assert_solvent
):
    payments = [sign_payment(consumer, (i + 1) * USDC, provider if i % 2 else provider2) for i in range(3)]
    front_run(payments[1])

    tx = escrow.settle_authorizations(payments, sender=operator)

    credited = [payments[0], payments[2]]
    (root,) = {s.root for s in settlement(credited)}
    assert tx.return_value == root
    failed = payments[1]
    assert events(tx, escrow.PaymentFailed) == [
        escrow.PaymentFailed(payer=consumer, provider=failed.provider, nonce=failed.nonce)
    ]
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(root=root, count=2, amount=4 * USDC, fee=split(USDC)[1] + split(3 * USDC)[1])
    ]
    assert escrow.earnings(provider) == 0
    assert escrow.earnings(provider2) == split(USDC)[0] + split(3 * USDC)[0]
    # The front-run funds sit in the escrow, owed to nobody.
    assert_solvent(stray=failed.amount)


def test_settle_authorizations__duplicate_in_batch__second_skipped(
    escrow, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider)
    tx = escrow.settle_authorizations([payment, payment], sender=operator)
    assert tx.return_value == leaf(credit_of(payment))
    assert len(events(tx, escrow.PaymentFailed)) == 1
    assert escrow.earnings(provider) == split(USDC)[0]


def test_settle_authorizations__empty__credits_nothing(escrow, operator):
    tx = escrow.settle_authorizations([], sender=operator)
    assert events(tx, escrow.PaymentsSettled) == [
        escrow.PaymentsSettled(root=ZERO_BYTES32, count=0, amount=0, fee=0)
    ]
    assert tx.return_value == ZERO_BYTES32
    assert escrow.liabilities() == 0
    assert escrow.settlement_roots(ZERO_BYTES32) == 0


def test_settle_authorizations__max_batch(
    escrow, consumer, provider, sign_payment, settle_batch, assert_solvent
):
    payments = [sign_payment(consumer, 10_000 + i, provider) for i in range(escrow.MAX_PAYMENTS())]
    tx, _ = settle_batch(payments)
    assert escrow.earnings(provider) == sum(split(p.amount)[0] for p in payments)
    assert len(events(tx, escrow.Credited)) == 1
    assert_solvent()
