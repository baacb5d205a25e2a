"""Provider claims: `claim`, `claim_with_delegation` (ETH-free, by a relayer), revocation of
delegations and `delegation_remaining`."""

import dataclasses

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, ZERO_BYTES32, events, high_s_raw, split

# provider earns 90 USDC in every test of this module (100 USDC gross at 10%).
EARNED = split(100 * USDC)[0]


@pytest.fixture(scope="module", autouse=True)
def earned(earn, provider):
    earn(provider, 100 * USDC)


# ---------------------------------------------------------------- claim


def test_claim__to_self(escrow, usdc, provider, assert_solvent):
    before = usdc.balanceOf(provider)
    tx = escrow.claim(40 * USDC, provider, sender=provider)
    assert usdc.balanceOf(provider) == before + 40 * USDC
    assert escrow.earnings(provider) == EARNED - 40 * USDC
    assert events(tx, escrow.Claimed) == [
        escrow.Claimed(
            provider=provider,
            payee=provider,
            delegation=ZERO_BYTES32,
            amount=40 * USDC,
            relayer=ZERO_ADDRESS,
            relayer_fee=0,
        )
    ]
    assert_solvent()


def test_claim__to_another_payee(escrow, usdc, provider, new_wallet, assert_solvent):
    payee = new_wallet(balance=0)
    tx = escrow.claim(EARNED, payee.address, sender=provider)
    assert usdc.balanceOf(payee.address) == EARNED
    assert escrow.earnings(provider) == 0
    assert events(tx, escrow.Claimed) == [
        escrow.Claimed(provider=provider, payee=payee.address, amount=EARNED)
    ]
    assert_solvent()


def test_claim__over_earnings__reverts(escrow, provider):
    with ape.reverts("escrow: amount exceeds earnings"):
        escrow.claim(EARNED + 1, provider, sender=provider)


def test_claim__no_earnings__reverts(escrow, provider2):
    with ape.reverts("escrow: amount exceeds earnings"):
        escrow.claim(1, provider2, sender=provider2)


def test_claim__zero_amount__reverts(escrow, provider):
    with ape.reverts("escrow: zero amount"):
        escrow.claim(0, provider, sender=provider)


def test_claim__zero_payee__reverts(escrow, provider):
    with ape.reverts("escrow: zero payee"):
        escrow.claim(USDC, ZERO_ADDRESS, sender=provider)


def test_claim__escrow_as_payee__reverts(escrow, provider):
    # Paid to itself, the amount would leave the books but not the escrow: sweepable by the owner.
    with ape.reverts("escrow: escrow as payee"):
        escrow.claim(USDC, escrow, sender=provider)


def test_claim__works_while_paused(escrow, usdc, owner, provider, assert_solvent):
    escrow.pause(sender=owner)
    escrow.claim(EARNED, provider, sender=provider)
    assert escrow.earnings(provider) == 0
    assert_solvent()


# ---------------------------------------------------------------- claim_with_delegation


def test_claim_with_delegation__any_relayer(
    chain, escrow, usdc, relayer, provider, new_wallet, sign_delegation, assert_solvent
):
    payee = new_wallet(balance=0)
    delegation, signature = sign_delegation(
        provider, payee.address, max_amount=10 * USDC, relayer_fee=USDC // 2
    )
    digest = escrow.hash_delegation(delegation)
    relayer_before = usdc.balanceOf(relayer)

    tx = escrow.claim_with_delegation(delegation, signature, 10 * USDC, sender=relayer)

    assert usdc.balanceOf(relayer) == relayer_before + USDC // 2
    assert usdc.balanceOf(payee.address) == 10 * USDC - USDC // 2
    assert escrow.earnings(provider) == EARNED - 10 * USDC
    assert escrow.delegation_claimed(digest) == 10 * USDC
    assert events(tx, escrow.Claimed) == [
        escrow.Claimed(
            provider=provider,
            payee=payee.address,
            delegation=digest,
            amount=10 * USDC,
            relayer=relayer,
            relayer_fee=USDC // 2,
        )
    ]
    assert_solvent()


def test_claim_with_delegation__no_eth_provider(
    chain, escrow, usdc, relayer, new_wallet, earn, sign_delegation, assert_solvent
):
    wallet = new_wallet(balance=0)
    earn(wallet.address, 10 * USDC)
    delegation, signature = sign_delegation(wallet, max_amount=split(10 * USDC)[0], relayer_fee=1_000)
    escrow.claim_with_delegation(delegation, signature, split(10 * USDC)[0], sender=relayer)
    assert usdc.balanceOf(wallet.address) == split(10 * USDC)[0] - 1_000
    assert chain.provider.get_balance(wallet.address) == 0
    assert_solvent(providers=(wallet.address,))


def test_claim_with_delegation__zero_relayer_fee(
    escrow, usdc, stranger, provider, provider2, sign_delegation
):
    delegation, signature = sign_delegation(provider, provider2)
    before = usdc.balanceOf(stranger), usdc.balanceOf(provider2)
    escrow.claim_with_delegation(delegation, signature, 5 * USDC, sender=stranger)
    assert (usdc.balanceOf(stranger), usdc.balanceOf(provider2)) == (before[0], before[1] + 5 * USDC)


def test_claim_with_delegation__named_delegate(escrow, usdc, relayer, stranger, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, delegate=relayer, max_amount=USDC, relayer_fee=7)
    with ape.reverts("escrow: not the delegate"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=stranger)
    with ape.reverts("escrow: not the delegate"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=provider)
    before = usdc.balanceOf(relayer)
    escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)
    assert usdc.balanceOf(relayer) == before + 7


def test_claim_with_delegation__cumulative_cap(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, max_amount=10 * USDC, relayer_fee=1)
    digest = escrow.hash_delegation(delegation)
    for amount in (3 * USDC, 4 * USDC, 3 * USDC):
        escrow.claim_with_delegation(delegation, signature, amount, sender=relayer)
    assert escrow.delegation_claimed(digest) == 10 * USDC
    assert escrow.delegation_remaining(delegation) == 0
    with ape.reverts("escrow: delegation cap exceeded"):
        escrow.claim_with_delegation(delegation, signature, 2, sender=relayer)


def test_claim_with_delegation__above_cap__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, max_amount=10 * USDC)
    with ape.reverts("escrow: delegation cap exceeded"):
        escrow.claim_with_delegation(delegation, signature, 10 * USDC + 1, sender=relayer)


def test_claim_with_delegation__over_earnings__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, max_amount=1_000 * USDC)
    with ape.reverts("escrow: amount exceeds earnings"):
        escrow.claim_with_delegation(delegation, signature, EARNED + 1, sender=relayer)


def test_claim_with_delegation__expired__reverts(chain, escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, valid_until=chain.pending_timestamp + 60)
    chain.pending_timestamp = delegation.valid_until
    with ape.reverts("escrow: delegation expired"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim_with_delegation__revoked_by_provider__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider)
    escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)
    digest = escrow.hash_delegation(delegation)
    tx = escrow.revoke_delegation(delegation, sender=provider)
    assert events(tx, escrow.Revoked) == [escrow.Revoked(account=provider, item=digest)]
    assert escrow.delegation_remaining(delegation) == 0
    with ape.reverts("escrow: delegation revoked"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim_with_delegation__revoked_by_digest__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider)
    escrow.revoke(escrow.hash_delegation(delegation), sender=provider)
    with ape.reverts("escrow: delegation revoked"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim_with_delegation__revoked_with_signature__reverts(
    escrow, relayer, new_wallet, earn, sign_delegation, sign_revocation
):
    wallet = new_wallet(balance=0)  # a provider without ETH revokes through a relayer
    earn(wallet.address, 10 * USDC)
    delegation, signature = sign_delegation(wallet)
    digest = escrow.hash_delegation(delegation)
    escrow.revoke_with_signature(wallet.address, digest, sign_revocation(wallet, digest), sender=relayer)
    with ape.reverts("escrow: delegation revoked"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_revoke_delegation__not_provider__reverts(escrow, relayer, provider, sign_delegation):
    delegation, _ = sign_delegation(provider, delegate=relayer)
    with ape.reverts("escrow: not the provider"):
        escrow.revoke_delegation(delegation, sender=relayer)


def test_claim_with_delegation__wrong_signer__reverts(escrow, relayer, provider, provider2, sign_delegation):
    delegation, signature = sign_delegation(provider, signer=provider2)
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim_with_delegation__redirected_payee__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider)
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(
            delegation._replace(payee=relayer.address), signature, USDC, sender=relayer
        )


def test_claim_with_delegation__raised_fee__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, relayer_fee=1)
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(
            delegation._replace(relayer_fee=USDC), signature, 2 * USDC, sender=relayer
        )


def test_claim_with_delegation__high_s__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        escrow.claim_with_delegation(delegation, high_s_raw(signature), USDC, sender=relayer)


def test_claim_with_delegation__other_chain__reverts(
    escrow, relayer, provider, sign_delegation, escrow_domain
):
    delegation, signature = sign_delegation(
        provider, domain=dataclasses.replace(escrow_domain, chain_id=escrow_domain.chain_id + 1)
    )
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


@pytest.mark.parametrize("fee", [USDC, USDC + 1])
def test_claim_with_delegation__fee_not_below_cap__reverts(escrow, relayer, provider, sign_delegation, fee):
    delegation, signature = sign_delegation(provider, max_amount=USDC, relayer_fee=fee)
    with ape.reverts("escrow: relayer fee not below cap"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim_with_delegation__zero_amount__reverts(escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(provider, relayer_fee=USDC)
    with ape.reverts("escrow: zero amount"):
        escrow.claim_with_delegation(delegation, signature, 0, sender=relayer)


@pytest.mark.parametrize(("payee", "reason"), [("zero", "zero payee"), ("escrow", "escrow as payee")])
def test_claim_with_delegation__stranding_payee__reverts(
    escrow, relayer, provider, sign_delegation, payee, reason
):
    delegation, signature = sign_delegation(provider, ZERO_ADDRESS if payee == "zero" else escrow.address)
    with ape.reverts(f"escrow: {reason}"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


@pytest.mark.parametrize(("amount", "fee"), [(10 * USDC, 50_000), (USDC, 5_000), (1_999, 9), (199, 0)])
def test_claim_with_delegation__fee_pro_rata(escrow, usdc, relayer, provider, sign_delegation, amount, fee):
    delegation, signature = sign_delegation(provider, max_amount=10 * USDC, relayer_fee=50_000)
    before = usdc.balanceOf(relayer), usdc.balanceOf(provider)
    tx = escrow.claim_with_delegation(delegation, signature, amount, sender=relayer)
    assert (usdc.balanceOf(relayer), usdc.balanceOf(provider)) == (before[0] + fee, before[1] + amount - fee)
    assert events(tx, escrow.Claimed)[0].relayer_fee == fee


def test_attack__relayer_splits_claims__fees_bounded_by_the_signed_fee(
    escrow, usdc, relayer, provider, new_wallet, sign_delegation, assert_solvent
):
    # Issue 15, item 1: a delegation of 10 USDC with a 0.05 USDC relayer fee, split into minimal
    # claims, used to pay the relayer 0.05 USDC per claim (9.95 USDC over 199 claims).
    payee = new_wallet(balance=0)
    delegation, signature = sign_delegation(provider, payee.address, max_amount=10 * USDC, relayer_fee=50_000)
    relayer_before = usdc.balanceOf(relayer)
    for _ in range(25):
        escrow.claim_with_delegation(delegation, signature, 50_001, sender=relayer)
    rest = 10 * USDC - 25 * 50_001
    escrow.claim_with_delegation(delegation, signature, rest, sender=relayer)
    fees = usdc.balanceOf(relayer) - relayer_before
    assert fees <= 50_000
    assert usdc.balanceOf(payee.address) == 10 * USDC - fees >= 10 * USDC - 50_000
    assert escrow.delegation_remaining(delegation) == 0
    assert_solvent()


def test_claim_with_delegation__works_while_paused(
    escrow, owner, relayer, provider, sign_delegation, assert_solvent
):
    delegation, signature = sign_delegation(provider, relayer_fee=1)
    escrow.pause(sender=owner)
    escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)
    assert escrow.earnings(provider) == EARNED - USDC
    assert_solvent()


# ---------------------------------------------------------------- delegation_remaining


def test_delegation_remaining(chain, escrow, relayer, provider, sign_delegation):
    delegation, signature = sign_delegation(
        provider, max_amount=10 * USDC, valid_until=chain.pending_timestamp + 500
    )
    assert escrow.delegation_remaining(delegation) == 10 * USDC
    escrow.claim_with_delegation(delegation, signature, 4 * USDC, sender=relayer)
    assert escrow.delegation_remaining(delegation) == 6 * USDC
    chain.mine(timestamp=delegation.valid_until)
    assert escrow.delegation_remaining(delegation) == 0


def test_delegation_remaining__above_earnings(escrow, provider, sign_delegation):
    # The cap, not what is claimable now: earnings may be lower.
    delegation, _ = sign_delegation(provider, max_amount=10_000 * USDC)
    assert escrow.delegation_remaining(delegation) == 10_000 * USDC
