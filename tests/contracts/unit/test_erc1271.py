"""Smart-account signers (ERC-1271): consumers' permissions, providers' delegations and
revocations are checked with `isValidSignature` when the signer has code."""

import ape
import pytest
from escrow_helpers import ERC1271_MAGIC, USDC, charge, split


def _word(prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    return prefix + b"\x00" * (32 - len(prefix) - len(suffix)) + suffix


@pytest.fixture(scope="module", autouse=True)
def funded_wallet(escrow, smart_wallet, consumer, deposit):
    """The smart wallet has a 50 USDC deposit, granted by `consumer`."""
    deposit(consumer, 50 * USDC, smart_wallet.address)


# ---------------------------------------------------------------- consumers


def test_permission__smart_account_consumer__accepted(
    escrow,
    smart_wallet,
    wallet_owner,
    provider,
    sign_permission,
    settle_charges,
    assert_solvent,
):
    permission, signature = sign_permission(smart_wallet, 10 * USDC, signer=wallet_owner)
    settle_charges(permission, signature, [charge(provider, 4 * USDC)])
    assert escrow.deposits(smart_wallet) == 46 * USDC
    assert escrow.earnings(provider) == split(4 * USDC)[0]
    assert_solvent(consumers=(smart_wallet,))


def test_permission__smart_account_wrong_owner__reverts(
    smart_wallet, consumer, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(smart_wallet, signer=consumer)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission, signature, [charge(provider, USDC)])


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(_word(b"\xff\xff\xff\xff"), id="wrong-magic"),
        pytest.param(_word(suffix=ERC1271_MAGIC), id="magic-right-aligned"),
        pytest.param(_word(suffix=b"\x01"), id="true"),
        pytest.param(_word(), id="zero"),
        pytest.param(None, id="reverts"),
    ],
)
def test_permission__lying_smart_account__reverts(
    project, owner, consumer, provider, deposit, sign_permission, settle_charges, answer
):
    liar = owner.deploy(project.LyingWallet, answer or _word(ERC1271_MAGIC))
    if answer is None:
        liar.set_answer(_word(ERC1271_MAGIC), True, sender=owner)
    deposit(consumer, 5 * USDC, liar.address)
    permission, signature = sign_permission(liar, signer=consumer)
    with ape.reverts("escrow: invalid signature"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_permission__smart_account_answering_magic__is_trusted(
    project, owner, consumer, provider, deposit, sign_permission, settle_charges
):
    # ERC-1271 leaves validity to the account: one that approves everything is its owner's choice.
    yes_man = owner.deploy(project.LyingWallet, _word(ERC1271_MAGIC))
    deposit(consumer, 5 * USDC, yes_man.address)
    permission, signature = sign_permission(yes_man, signer=consumer)
    settle_charges(permission, signature, [charge(provider, USDC)])


def test_revoke_permission__by_smart_account(
    escrow, smart_wallet, wallet_owner, provider, sign_permission, settle_charges
):
    permission, signature = sign_permission(smart_wallet, signer=wallet_owner)
    smart_wallet.execute(escrow, escrow.revoke_permission.encode_input(permission), sender=wallet_owner)
    with ape.reverts("escrow: permission revoked"):
        settle_charges(permission, signature, [charge(provider, USDC)])


def test_revoke_with_signature__smart_account(
    escrow, relayer, smart_wallet, wallet_owner, consumer, sign_permission, sign_revocation
):
    permission, _ = sign_permission(smart_wallet, signer=wallet_owner)
    digest = escrow.hash_permission(permission)
    with ape.reverts("escrow: invalid signature"):
        escrow.revoke_with_signature(
            smart_wallet, digest, sign_revocation(smart_wallet, digest, signer=consumer), sender=relayer
        )
    escrow.revoke_with_signature(
        smart_wallet, digest, sign_revocation(smart_wallet, digest, signer=wallet_owner), sender=relayer
    )
    assert escrow.revoked(smart_wallet, digest)


# ---------------------------------------------------------------- providers


def test_delegation__smart_account_provider__accepted(
    escrow, usdc, relayer, smart_wallet, wallet_owner, earn, sign_delegation, assert_solvent
):
    earn(smart_wallet, 10 * USDC)
    earned = split(10 * USDC)[0]
    payee = wallet_owner
    delegation, signature = sign_delegation(
        smart_wallet, payee, max_amount=earned, relayer_fee=100, signer=wallet_owner
    )
    before = usdc.balanceOf(payee)
    escrow.claim_with_delegation(delegation, signature, earned, sender=relayer)
    assert usdc.balanceOf(payee) == before + earned - 100
    assert escrow.earnings(smart_wallet) == 0
    assert_solvent(providers=(smart_wallet,), consumers=(smart_wallet,))


def test_delegation__smart_account_wrong_owner__reverts(
    relayer, smart_wallet, provider, earn, sign_delegation, escrow
):
    earn(smart_wallet, 10 * USDC)
    delegation, signature = sign_delegation(smart_wallet, signer=provider)
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_delegation__lying_smart_account__reverts(
    project, owner, escrow, relayer, provider, earn, sign_delegation
):
    liar = owner.deploy(project.LyingWallet, _word(b"\xff\xff\xff\xff"))
    earn(liar, 10 * USDC)
    delegation, signature = sign_delegation(liar, signer=provider)
    with ape.reverts("escrow: invalid signature"):
        escrow.claim_with_delegation(delegation, signature, USDC, sender=relayer)


def test_claim__by_smart_account(escrow, usdc, smart_wallet, wallet_owner, earn, assert_solvent):
    earn(smart_wallet, 10 * USDC)
    before = usdc.balanceOf(wallet_owner)
    smart_wallet.execute(escrow, escrow.claim.encode_input(USDC, wallet_owner), sender=wallet_owner)
    assert usdc.balanceOf(wallet_owner) == before + USDC
    assert_solvent(providers=(smart_wallet,), consumers=(smart_wallet,))
