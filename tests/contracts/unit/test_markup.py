"""An app developer's markup on prepaid charges: paid on top of the calls' base cost, credited
whole to the developer the payer's SpendPermission names, never above the rate it allows, and
claimable like any earnings."""

import secrets

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, charge, events, markup_of, split

MARKUP_BPS = 2_000  # a 20% app


@pytest.fixture(scope="module", autouse=True)
def funded(escrow, consumer, consumer2, deposit):
    """Both consumers have 100 USDC deposited."""
    deposit(consumer, 100 * USDC)
    deposit(consumer2, 100 * USDC)


@pytest.fixture
def developer(new_wallet):
    """An app developer's wallet: no USDC, no ETH."""
    return new_wallet(balance=0)


def test_settle_charges__markup__credited_whole_to_developer(
    escrow, operator, consumer, provider, provider2, developer, sign_permission, assert_solvent
):
    permission, signature = sign_permission(
        consumer, 50 * USDC, developer=developer, max_markup_bps=MARKUP_BPS
    )
    digest = escrow.hash_permission(permission)
    reference = secrets.token_bytes(32)
    base1, base2 = 10 * USDC, 3 * USDC + 7
    markup = markup_of(base1, MARKUP_BPS) + markup_of(base2, MARKUP_BPS)
    assert markup == 2 * USDC + 600_001

    tx = escrow.settle_charges(
        permission, signature, reference, [charge(provider, base1), charge(provider2, base2)], markup,
        sender=operator,
    )  # fmt: skip

    (share1, fee1), (share2, fee2) = split(base1), split(base2)
    paid = base1 + base2 + markup
    assert escrow.deposits(consumer) == 100 * USDC - paid
    assert escrow.permission_spent(digest) == paid
    # The provider gets exactly 90% of the base, the platform 10% of the base, the developer the markup.
    assert escrow.earnings(provider) == share1 == 9 * USDC
    assert escrow.earnings(provider2) == share2
    assert escrow.platform_fees() == fee1 + fee2 == USDC + 300_000
    assert escrow.earnings(developer.address) == markup
    assert events(tx, escrow.Credited) == [
        escrow.Credited(provider=provider, settlement=reference, amount=base1, fee=fee1),
        escrow.Credited(provider=provider2, settlement=reference, amount=base2, fee=fee2),
        escrow.Credited(provider=developer.address, settlement=reference, amount=markup, fee=0),
    ]
    assert events(tx, escrow.ChargesSettled) == [
        escrow.ChargesSettled(
            consumer=consumer,
            permission=digest,
            reference=reference,
            amount=paid,
            fee=fee1 + fee2,
            markup=markup,
            count=2,
        )
    ]
    assert_solvent(providers=(developer.address,))


def test_settle_charges__markup_at_the_signed_rate__settles(
    escrow, consumer, provider, developer, sign_permission, settle_charges
):
    # 7 units at 20% allow a markup of 1.4 units: 1 settles, 2 is above the permission.
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    with ape.reverts("escrow: markup above permission"):
        settle_charges(permission, signature, [charge(provider, 7)], markup=2)
    settle_charges(permission, signature, [charge(provider, 7)], markup=1)
    assert escrow.earnings(developer.address) == 1


def test_settle_charges__markup_above_permission__reverts(
    escrow, consumer, provider, developer, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    base = 10 * USDC
    with ape.reverts("escrow: markup above permission"):
        settle_charges(
            permission, signature, [charge(provider, base)], markup=markup_of(base, MARKUP_BPS) + 1
        )
    assert escrow.deposits(consumer) == 100 * USDC


def test_settle_charges__markup_under_plain_permission__reverts(
    consumer, provider, sign_permission, settle_charges
):
    # A permission that names no app allows no markup at all.
    permission, signature = sign_permission(consumer)
    with ape.reverts("escrow: markup above permission"):
        settle_charges(permission, signature, [charge(provider, USDC)], markup=1)


def test_attack__operator_raises_the_markup_rate__reverts(
    consumer, provider, developer, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    raised = permission._replace(max_markup_bps=10_000)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(raised, signature, [charge(provider, USDC)], markup=USDC)


def test_attack__operator_redirects_the_markup__reverts(
    operator, consumer, provider, developer, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    redirected = permission._replace(developer=operator.address)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(redirected, signature, [charge(provider, USDC)], markup=markup_of(USDC, MARKUP_BPS))


@pytest.mark.parametrize("who", ["zero", "escrow"])
def test_settle_charges__markup_to_invalid_developer__reverts(
    escrow, consumer, provider, sign_permission, settle_charges, who
):
    developer = {"zero": ZERO_ADDRESS, "escrow": escrow.address}[who]
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    with ape.reverts("escrow: invalid developer"):
        settle_charges(permission, signature, [charge(provider, USDC)], markup=1)
    # Without a markup the same permission settles: nothing is owed to the developer.
    settle_charges(permission, signature, [charge(provider, USDC)])


def test_settle_charges__markup_counts_against_allowance__reverts(
    consumer, provider, developer, sign_permission, settle_charges
):
    base = 10 * USDC
    markup = markup_of(base, MARKUP_BPS)
    permission, signature = sign_permission(
        consumer, base + markup - 1, developer=developer, max_markup_bps=MARKUP_BPS
    )
    with ape.reverts("escrow: allowance exceeded"):
        settle_charges(permission, signature, [charge(provider, base)], markup=markup)


def test_settle_charges__markup_counts_against_deposit__reverts(
    consumer, provider, developer, sign_permission, settle_charges
):
    base = 90 * USDC
    permission, signature = sign_permission(
        consumer, 500 * USDC, developer=developer, max_markup_bps=MARKUP_BPS
    )
    with ape.reverts("escrow: deposit exceeded"):
        settle_charges(permission, signature, [charge(provider, base)], markup=markup_of(base, MARKUP_BPS))


def test_settle_charges__markup_alone__reverts(consumer, developer, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    with ape.reverts("escrow: zero amount"):
        settle_charges(permission, signature, [], markup=1)


def test_settle_charges_batch__markups_to_each_permissions_developer(
    escrow, operator, consumer, consumer2, provider, developer, new_wallet, sign_permission, assert_solvent
):
    other = new_wallet(balance=0)
    p1, s1 = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    p2, s2 = sign_permission(consumer2, developer=other, max_markup_bps=500)
    batches = [
        (p1, s1, b"\x01" * 32, [charge(provider, 5 * USDC)], USDC),
        (p2, s2, b"\x02" * 32, [charge(provider, 2 * USDC)], 100_000),
        (p2, s2, b"\x03" * 32, [charge(provider, 1 * USDC)], 0),
    ]

    tx = escrow.settle_charges_batch(batches, sender=operator)

    assert escrow.earnings(developer.address) == USDC
    assert escrow.earnings(other.address) == 100_000
    assert escrow.earnings(provider) == split(5 * USDC)[0] + split(2 * USDC)[0] + split(USDC)[0]
    assert escrow.deposits(consumer) == 94 * USDC
    assert escrow.deposits(consumer2) == 97 * USDC - 100_000
    assert [(log.amount, log.markup) for log in events(tx, escrow.ChargesSettled)] == [
        (6 * USDC, USDC),
        (2 * USDC + 100_000, 100_000),
        (USDC, 0),
    ]
    assert_solvent(providers=(developer.address, other.address))


def test_settle_charges_batch__one_markup_too_high__reverts_all(
    escrow, operator, consumer, consumer2, provider, developer, sign_permission
):
    p1, s1 = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    p2, s2 = sign_permission(consumer2, developer=developer, max_markup_bps=100)
    batches = [
        (p1, s1, b"\x01" * 32, [charge(provider, USDC)], 200_000),
        (p2, s2, b"\x02" * 32, [charge(provider, USDC)], 10_001),
    ]
    with ape.reverts("escrow: markup above permission"):
        escrow.settle_charges_batch(batches, sender=operator)
    assert escrow.earnings(developer.address) == 0


def test_markup__claimed_eth_free_through_a_delegation(
    chain, escrow, usdc, relayer, consumer, provider, developer, sign_permission, settle_charges,
    sign_delegation, assert_solvent,
):  # fmt: skip
    permission, signature = sign_permission(consumer, developer=developer, max_markup_bps=MARKUP_BPS)
    settle_charges(permission, signature, [charge(provider, 10 * USDC)], markup=2 * USDC)
    delegation, delegation_signature = sign_delegation(developer, max_amount=2 * USDC, relayer_fee=10_000)

    escrow.claim_with_delegation(delegation, delegation_signature, 2 * USDC, sender=relayer)

    assert usdc.balanceOf(developer.address) == 2 * USDC - 10_000
    assert escrow.earnings(developer.address) == 0
    assert chain.provider.get_balance(developer.address) == 0
    assert_solvent(providers=(developer.address,))
