"""Prepaid charges under a consumer-signed SpendPermission: `settle_charges`, the batch form,
revocation and `permission_remaining`."""

import dataclasses
import secrets

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, charge, events, high_s_raw, raw_charge, split


@pytest.fixture(scope="module", autouse=True)
def funded(escrow, consumer, consumer2, deposit):
    """Both consumers have 100 USDC deposited."""
    deposit(consumer, 100 * USDC)
    deposit(consumer2, 100 * USDC)


# ---------------------------------------------------------------- settle_charges


def test_settle_charges__debits_deposit_credits_split(
    escrow, operator, consumer, provider, provider2, sign_permission, assert_solvent
):
    permission, signature = sign_permission(consumer, 50 * USDC)
    digest = escrow.hash_permission(permission)
    reference = secrets.token_bytes(32)
    charges = [charge(provider, 3 * USDC + 7), charge(provider2, 1 * USDC + 9)]

    tx = escrow.settle_charges(permission, signature, reference, charges, 0, sender=operator)

    (share1, fee1), (share2, fee2) = split(3 * USDC + 7), split(1 * USDC + 9)
    total = 4 * USDC + 16
    assert escrow.deposits(consumer) == 100 * USDC - total
    assert escrow.earnings(provider) == share1
    assert escrow.earnings(provider2) == share2
    assert escrow.platform_fees() == fee1 + fee2
    assert escrow.permission_spent(digest) == total
    assert escrow.permission_remaining(permission) == 50 * USDC - total
    assert escrow.settled_references(reference)
    # Every credit names its provider.
    assert events(tx, escrow.Credited) == [
        escrow.Credited(provider=provider, settlement=reference, amount=3 * USDC + 7, fee=fee1),
        escrow.Credited(provider=provider2, settlement=reference, amount=1 * USDC + 9, fee=fee2),
    ]
    assert events(tx, escrow.ChargesSettled) == [
        escrow.ChargesSettled(
            consumer=consumer,
            permission=digest,
            reference=reference,
            amount=total,
            fee=fee1 + fee2,
            markup=0,
            count=2,
        )
    ]
    assert_solvent()


def test_settle_charges__many_providers_one_batch(
    accounts, escrow, operator, consumer, sign_permission, settle_charges, assert_solvent
):
    # Fee rounding is per charge: nine 9-unit charges carry no fee at all.
    providers = [accounts[i] for i in range(2, 10)]
    amounts = [9, 10, 11, 99, 1_001, 123_457, 2 * USDC + 1, 9]
    permission, signature = sign_permission(consumer, 10 * USDC)
    tx = settle_charges(
        permission, signature, [charge(p, a) for p, a in zip(providers, amounts, strict=True)]
    )
    for p, a in zip(providers, amounts, strict=True):
        assert escrow.earnings(p) == split(a)[0]
    assert escrow.platform_fees() == sum(split(a)[1] for a in amounts)
    [log] = events(tx, escrow.ChargesSettled)
    assert (log.amount, log.count) == (sum(amounts), len(amounts))
    assert_solvent(providers=tuple(providers))


def test_settle_charges__same_provider_twice_in_batch__one_run(
    escrow, consumer, provider, provider2, sign_permission, settle_charges, assert_solvent
):
    permission, signature = sign_permission(consumer)
    charges = [charge(provider, 15), charge(provider, 15), charge(provider2, 20), charge(provider, 10)]
    tx = settle_charges(permission, signature, charges)
    assert escrow.earnings(provider) == 2 * split(15)[0] + split(10)[0] == 37
    # Fee rounding stays per charge; consecutive charges to one provider are one credit.
    credits = [log.event_arguments for log in events(tx, escrow.Credited)]
    assert [(c["provider"], c["amount"], c["fee"]) for c in credits] == [
        (provider.address, 30, 2),
        (provider2.address, 20, 2),
        (provider.address, 10, 1),
    ]
    assert_solvent()


def test_settle_charges__successive_batches(escrow, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, 10 * USDC)
    settle_charges(permission, signature, [charge(provider, 4 * USDC)])
    settle_charges(permission, signature, [charge(provider, 6 * USDC)])
    assert escrow.permission_spent(escrow.hash_permission(permission)) == 10 * USDC
    assert escrow.permission_remaining(permission) == 0


def test_settle_charges__batch_replayed__reverts(escrow, operator, consumer, provider, sign_permission):
    permission, signature = sign_permission(consumer)
    args = (permission, signature, secrets.token_bytes(32), [charge(provider, USDC)], 0)
    escrow.settle_charges(*args, sender=operator)
    with ape.reverts("escrow: reference already settled"):
        escrow.settle_charges(*args, sender=operator)


def test_attack__same_reference_settled_twice__reverts(
    escrow, operator, consumer, provider, sign_permission, settle_charges, assert_solvent
):
    # Issue 15, item 5: a retry that re-reads `permission_spent` used to settle one batch twice
    # (within the allowance); each reference now settles once, whatever else the call says.
    permission, signature = sign_permission(consumer, 10 * USDC)
    reference = secrets.token_bytes(32)
    settle_charges(permission, signature, [charge(provider, USDC)], reference=reference)
    with ape.reverts("escrow: reference already settled"):
        settle_charges(permission, signature, [charge(provider, USDC)], reference=reference)
    other, other_signature = sign_permission(consumer, 10 * USDC)
    with ape.reverts("escrow: reference already settled"):
        settle_charges(other, other_signature, [charge(provider, USDC)], reference=reference)
    assert escrow.deposits(consumer) == 99 * USDC
    assert_solvent()


def test_settle_charges__allowance_exceeded__reverts(consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, 5 * USDC)
    with ape.reverts("escrow: allowance exceeded"):
        settle_charges(permission, signature, [charge(provider, 3 * USDC), charge(provider, 2 * USDC + 1)])


def test_settle_charges__allowance_exceeded_cumulatively__reverts(
    consumer, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, 5 * USDC)
    settle_charges(permission, signature, [charge(provider, 5 * USDC - 1)])
    with ape.reverts("escrow: allowance exceeded"):
        settle_charges(permission, signature, [charge(provider, 2)])


def test_settle_charges__deposit_exceeded__reverts(consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, 500 * USDC)
    with ape.reverts("escrow: deposit exceeded"):
        settle_charges(permission, signature, [charge(provider, 100 * USDC + 1)])


def test_settle_charges__no_deposit__reverts(provider, new_wallet, sign_permission, settle_charges):
    permission, signature = sign_permission(new_wallet())
    with ape.reverts("escrow: deposit exceeded"):
        settle_charges(permission, signature, [charge(provider, 1)])


def test_settle_charges__expired__reverts(chain, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, valid_until=chain.pending_timestamp + 60)
    chain.pending_timestamp = permission.valid_until
    with ape.reverts("escrow: permission expired"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_settle_charges__not_yet_valid__reverts(chain, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, valid_after=chain.pending_timestamp + 600)
    with ape.reverts("escrow: permission not yet valid"):
        settle_charges(permission, signature, [charge(provider, USDC)])
    chain.pending_timestamp = permission.valid_after
    settle_charges(permission, signature, [charge(provider, USDC)])


def test_settle_charges__caller_not_spender__reverts(
    escrow, owner, operator, relayer, consumer, provider, sign_permission, settle_charges
):
    escrow.set_operator(relayer, True, sender=owner)  # another operator, not the permission's spender
    permission, signature = sign_permission(consumer, spender=operator)
    with ape.reverts("escrow: caller is not the spender"):
        settle_charges(permission, signature, [charge(provider, USDC)], sender=relayer)


def test_settle_charges__spender_not_operator__reverts(
    stranger, consumer, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, spender=stranger)
    with ape.reverts("escrow: caller is not an operator"):
        settle_charges(permission, signature, [charge(provider, USDC)], sender=stranger)


def test_settle_charges__wrong_signer__reverts(
    consumer, consumer2, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer, signer=consumer2)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_settle_charges__tampered_allowance__reverts(consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer, USDC)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission._replace(allowance=50 * USDC), signature, [charge(provider, 2 * USDC)])


def test_settle_charges__garbage_signature__reverts(consumer, provider, sign_permission, settle_charges):
    permission, _ = sign_permission(consumer)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission, b"\x01" * 64, [charge(provider, USDC)])


def test_settle_charges__high_s_signature__reverts(consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        settle_charges(permission, high_s_raw(signature), [charge(provider, USDC)])


@pytest.mark.parametrize("field", ["chain_id", "verifying_contract", "name", "version"])
def test_settle_charges__wrong_domain__reverts(
    escrow, usdc, consumer, provider, sign_permission, settle_charges, escrow_domain, field
):
    wrong = {
        "chain_id": escrow_domain.chain_id + 1,
        "verifying_contract": str(usdc.address),  # another contract on the same chain
        "name": "Quotra",
        "version": "2",
    }[field]
    permission, signature = sign_permission(
        consumer, domain=dataclasses.replace(escrow_domain, **{field: wrong})
    )
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_settle_charges__other_escrow_permission__reverts(
    deploy_escrow, owner, operator, consumer, provider, sign_permission, chain
):
    other = deploy_escrow()
    other.set_operator(operator, True, sender=owner)
    permission, signature = sign_permission(consumer)  # signed for the session escrow
    with ape.reverts("escrow: invalid signature"):
        other.settle_charges(
            permission, signature, b"\x00" * 32, [charge(provider, USDC)], 0, sender=operator
        )


def test_settle_charges__zero_total__reverts(consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    with ape.reverts("escrow: zero amount"):
        settle_charges(permission, signature, [])
    with ape.reverts("escrow: zero amount"):
        settle_charges(permission, signature, [raw_charge(provider, 0)])


def test_settle_charges__zero_provider__reverts(consumer, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    with ape.reverts("escrow: zero provider"):
        settle_charges(permission, signature, [raw_charge(ZERO_ADDRESS, USDC)])


def test_settle_charges__paused__reverts(escrow, owner, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        settle_charges(permission, signature, [charge(provider, USDC)])


# ---------------------------------------------------------------- revocation


def test_revoke_permission__by_consumer(escrow, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    digest = escrow.hash_permission(permission)
    tx = escrow.revoke_permission(permission, sender=consumer)
    assert escrow.revoked(consumer, digest)
    assert events(tx, escrow.Revoked) == [escrow.Revoked(account=consumer, item=digest)]
    assert escrow.permission_remaining(permission) == 0
    with ape.reverts("escrow: permission revoked"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_revoke_permission__not_consumer__reverts(escrow, operator, consumer, sign_permission):
    permission, _ = sign_permission(consumer)
    with ape.reverts("escrow: not the consumer"):
        escrow.revoke_permission(permission, sender=operator)


def test_revoke__by_digest(escrow, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(consumer)
    settle_charges(permission, signature, [charge(provider, USDC)])
    escrow.revoke(escrow.hash_permission(permission), sender=consumer)
    with ape.reverts("escrow: permission revoked"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_revoke__by_someone_else__no_effect(
    escrow, stranger, consumer, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(consumer)
    escrow.revoke(escrow.hash_permission(permission), sender=stranger)
    settle_charges(permission, signature, [charge(provider, USDC)])


def test_revoke_with_signature__relayed_for_no_eth_consumer(
    chain, escrow, relayer, provider, new_wallet, sign_permission, sign_revocation, settle_charges
):
    wallet = new_wallet()
    permission, signature = sign_permission(wallet)
    digest = escrow.hash_permission(permission)

    tx = escrow.revoke_with_signature(wallet.address, digest, sign_revocation(wallet, digest), sender=relayer)

    assert chain.provider.get_balance(wallet.address) == 0
    assert escrow.revoked(wallet.address, digest)
    assert events(tx, escrow.Revoked) == [escrow.Revoked(account=wallet.address, item=digest)]
    with ape.reverts("escrow: permission revoked"):
        settle_charges(permission, signature, [charge(provider, 1)])


def test_revoke_with_signature__wrong_signer__reverts(
    escrow, relayer, consumer, consumer2, sign_permission, sign_revocation
):
    permission, _ = sign_permission(consumer)
    digest = escrow.hash_permission(permission)
    with ape.reverts("escrow: invalid signature"):
        escrow.revoke_with_signature(
            consumer, digest, sign_revocation(consumer, digest, signer=consumer2), sender=relayer
        )


def test_revoke_with_signature__other_item__reverts(
    escrow, relayer, consumer, sign_permission, sign_revocation
):
    permission, _ = sign_permission(consumer)
    signature = sign_revocation(consumer, secrets.token_bytes(32))
    with ape.reverts("escrow: invalid signature"):
        escrow.revoke_with_signature(consumer, escrow.hash_permission(permission), signature, sender=relayer)


def test_revocation__works_while_paused(
    escrow, owner, relayer, consumer, consumer2, sign_permission, sign_revocation
):
    escrow.pause(sender=owner)
    permission, _ = sign_permission(consumer)
    escrow.revoke_permission(permission, sender=consumer)
    other, _ = sign_permission(consumer2)
    digest = escrow.hash_permission(other)
    escrow.revoke_with_signature(consumer2, digest, sign_revocation(consumer2, digest), sender=relayer)
    assert escrow.permission_remaining(permission) == escrow.permission_remaining(other) == 0


# ---------------------------------------------------------------- settle_charges_batch


def test_settle_charges_batch__several_permissions(
    escrow, operator, consumer, consumer2, provider, provider2, sign_permission, assert_solvent
):
    p1, s1 = sign_permission(consumer, 10 * USDC)
    p2, s2 = sign_permission(consumer2, 20 * USDC)
    p3, s3 = sign_permission(consumer, 5 * USDC)  # a second permission of the same consumer
    batches = [
        (p1, s1, b"\x01" * 32, [charge(provider, 2 * USDC), charge(provider2, 3 * USDC)], 0),
        (p2, s2, b"\x02" * 32, [charge(provider2, 7 * USDC + 1)], 0),
        (p3, s3, b"\x03" * 32, [charge(provider, 1 * USDC)], 0),
        (p1, s1, b"\x04" * 32, [charge(provider, 1)], 0),  # p1 again, after its first batch
    ]

    tx = escrow.settle_charges_batch(batches, sender=operator)

    assert escrow.deposits(consumer) == 100 * USDC - 6 * USDC - 1
    assert escrow.deposits(consumer2) == 100 * USDC - 7 * USDC - 1
    assert escrow.permission_spent(escrow.hash_permission(p1)) == 5 * USDC + 1
    assert escrow.earnings(provider) == split(2 * USDC)[0] + split(USDC)[0] + split(1)[0]
    assert escrow.earnings(provider2) == split(3 * USDC)[0] + split(7 * USDC + 1)[0]
    logs = events(tx, escrow.ChargesSettled)
    assert [(log.consumer, log.reference, log.amount, log.count) for log in logs] == [
        (consumer, b"\x01" * 32, 5 * USDC, 2),
        (consumer2, b"\x02" * 32, 7 * USDC + 1, 1),
        (consumer, b"\x03" * 32, USDC, 1),
        (consumer, b"\x04" * 32, 1, 1),
    ]
    assert_solvent()


def test_settle_charges_batch__one_bad__reverts_all(
    escrow, operator, consumer, consumer2, provider, sign_permission
):
    p1, s1 = sign_permission(consumer, 10 * USDC)
    p2, s2 = sign_permission(consumer2, USDC)
    batches = [
        (p1, s1, b"\x01" * 32, [charge(provider, USDC)], 0),
        (p2, s2, b"\x02" * 32, [charge(provider, 2 * USDC)], 0),
    ]
    with ape.reverts("escrow: allowance exceeded"):
        escrow.settle_charges_batch(batches, sender=operator)
    assert escrow.deposits(consumer) == 100 * USDC


def test_settle_charges_batch__same_batch_twice__reverts(
    escrow, operator, consumer, provider, sign_permission
):
    p1, s1 = sign_permission(consumer, 10 * USDC)
    batch = (p1, s1, b"\x01" * 32, [charge(provider, USDC)], 0)
    with ape.reverts("escrow: reference already settled"):
        escrow.settle_charges_batch([batch, batch], sender=operator)


def test_settle_charges_batch__empty(escrow, operator):
    before = escrow.liabilities()
    tx = escrow.settle_charges_batch([], sender=operator)
    assert escrow.liabilities() == before
    assert events(tx, escrow.ChargesSettled) == []


def test_settle_charges_batch__not_operator__reverts(escrow, stranger, consumer, provider, sign_permission):
    p1, s1 = sign_permission(consumer, spender=stranger)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.settle_charges_batch([(p1, s1, b"\x01" * 32, [charge(provider, USDC)], 0)], sender=stranger)


def test_settle_charges_batch__paused__reverts(escrow, owner, operator, consumer, provider, sign_permission):
    p1, s1 = sign_permission(consumer)
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.settle_charges_batch([(p1, s1, b"\x01" * 32, [charge(provider, USDC)], 0)], sender=operator)


# ---------------------------------------------------------------- permission_remaining


def test_permission_remaining(chain, escrow, consumer, provider, sign_permission, settle_charges):
    permission, signature = sign_permission(
        consumer,
        10 * USDC,
        valid_after=chain.pending_timestamp + 100,
        valid_until=chain.pending_timestamp + 1_000,
    )
    assert escrow.permission_remaining(permission) == 0  # not yet valid
    chain.mine(timestamp=permission.valid_after)
    assert escrow.permission_remaining(permission) == 10 * USDC
    settle_charges(permission, signature, [charge(provider, 4 * USDC)])
    assert escrow.permission_remaining(permission) == 6 * USDC
    chain.mine(timestamp=permission.valid_until)
    assert escrow.permission_remaining(permission) == 0  # expired


def test_permission_remaining__does_not_check_signature(escrow, consumer):
    # A view over any permission: it says what the allowance would allow, not that it is signed.
    permission = (consumer.address, consumer.address, 7, 0, 2**64, 1, ZERO_ADDRESS, 0)
    assert escrow.permission_remaining(permission) == 7
