"""Deployment state and the pure views: the EIP-712 hashes must equal the Python module's."""

import secrets

import ape
import pytest
from escrow_helpers import (
    FEE_BPS,
    MAX_BPS,
    MAX_FEE_BPS,
    REFUND_WINDOW,
    WITHDRAWAL_DELAY,
    ZERO_ADDRESS,
    Delegation,
    SpendPermission,
    events,
)
from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st
from quotra.chain import eip712, merkle


def _random_address() -> str:
    return to_checksum_address(secrets.token_bytes(20))


def test_deploy__initial_state(escrow, owner, operator, usdc):
    assert escrow.owner() == owner
    assert escrow.pending_owner() == ZERO_ADDRESS
    assert escrow.usdc() == usdc
    assert escrow.withdrawal_delay() == WITHDRAWAL_DELAY
    assert escrow.refund_window() == REFUND_WINDOW
    assert escrow.fee_bps() == FEE_BPS
    assert escrow.MAX_BPS() == MAX_BPS
    assert escrow.MAX_FEE_BPS() == MAX_FEE_BPS
    assert escrow.is_operator(operator)
    assert not escrow.is_operator(owner)
    assert not escrow.paused()
    assert escrow.liabilities() == 0
    assert escrow.platform_fees() == 0


def test_deploy__emits_fee_set(deploy_escrow):
    contract = deploy_escrow()
    receipt = contract.creation_metadata.receipt
    assert events(receipt, contract.FeeSet) == [contract.FeeSet(fee_bps=FEE_BPS)]


# Issue 15, item 6: deploy-time parameters that would lock or fake every balance are refused.


@pytest.mark.parametrize("token", ["zero", "eoa"])
def test_deploy__usdc_without_code__reverts(deploy_escrow, stranger, token):
    # A codeless "USDC" answers every call with success and no data: settlement would credit
    # payments whose funds never arrived.
    with ape.reverts("escrow: usdc has no code"):
        deploy_escrow(token=ZERO_ADDRESS if token == "zero" else stranger.address)


@pytest.mark.parametrize(
    ("delay", "window", "reason"),
    [
        (30 * 86_400 + 1, REFUND_WINDOW, "withdrawal delay too long"),
        (2**256 - 1, REFUND_WINDOW, "withdrawal delay too long"),
        (WITHDRAWAL_DELAY, 30 * 86_400 + 1, "refund window too long"),
        (WITHDRAWAL_DELAY, 2**256 - 1, "refund window too long"),
    ],
)
def test_deploy__unbounded_delays__revert(deploy_escrow, delay, window, reason):
    with ape.reverts(f"escrow: {reason}"):
        deploy_escrow(delay, window)


def test_deploy__longest_delays(deploy_escrow):
    contract = deploy_escrow(30 * 86_400, 30 * 86_400)
    assert contract.MAX_WITHDRAWAL_DELAY() == contract.withdrawal_delay() == 30 * 86_400
    assert contract.MAX_REFUND_WINDOW() == contract.refund_window() == 30 * 86_400


def test_eip712_domain(escrow, chain):
    fields, name, version, chain_id, verifying_contract, salt, extensions = escrow.eip712Domain()
    assert fields == b"\x0f"
    assert (
        (name, version) == (eip712.ESCROW_DOMAIN_NAME, eip712.ESCROW_DOMAIN_VERSION) == ("Quotra Escrow", "1")
    )
    assert chain_id == chain.chain_id
    assert verifying_contract == escrow.address
    assert salt == b"\x00" * 32
    assert list(extensions) == []


def test_type_hashes__match_python_module(escrow):
    assert escrow.SPEND_PERMISSION_TYPEHASH() == eip712.TYPE_HASHES["SpendPermission"]
    assert escrow.DELEGATION_TYPEHASH() == eip712.TYPE_HASHES["Delegation"]
    assert escrow.REVOCATION_TYPEHASH() == eip712.TYPE_HASHES["Revocation"]
    assert escrow.TRANSFER_WITH_AUTHORIZATION_TYPEHASH() == eip712.TYPE_HASHES["TransferWithAuthorization"]


ADDRESSES = st.binary(min_size=20, max_size=20).map(lambda raw: to_checksum_address(raw))
UINT256 = st.integers(min_value=0, max_value=2**256 - 1)
BYTES32 = st.binary(min_size=32, max_size=32)
# The views are pure, so examples need no chain isolation; a few dozen calls are enough.
HASH_SETTINGS = settings(max_examples=25, deadline=None)


@HASH_SETTINGS
@given(
    parties=st.tuples(ADDRESSES, ADDRESSES),
    values=st.tuples(UINT256, UINT256, UINT256, UINT256),
    developer=ADDRESSES,
    markup_bps=UINT256,
)
def test_hash_permission__matches_python_module(
    escrow, escrow_domain, parties, values, developer, markup_bps
):
    permission = SpendPermission(*parties, *values, developer, markup_bps)
    expected = eip712.digest(escrow_domain, "SpendPermission", permission._asdict())
    assert escrow.hash_permission(permission) == expected


@HASH_SETTINGS
@given(
    parties=st.tuples(ADDRESSES, ADDRESSES, ADDRESSES), values=st.tuples(UINT256, UINT256, UINT256, UINT256)
)
def test_hash_delegation__matches_python_module(escrow, escrow_domain, parties, values):
    delegation = Delegation(*parties, *values)
    expected = eip712.digest(escrow_domain, "Delegation", delegation._asdict())
    assert escrow.hash_delegation(delegation) == expected


@HASH_SETTINGS
@given(account=ADDRESSES, item=BYTES32)
def test_hash_revocation__matches_python_module(escrow, escrow_domain, account, item):
    expected = eip712.digest(escrow_domain, "Revocation", {"account": account, "item": item})
    assert escrow.hash_revocation(account, item) == expected


def test_hash_delegation__empty_delegate__matches_python_module(escrow, escrow_domain):
    delegation = Delegation(_random_address(), ZERO_ADDRESS, _random_address(), 10, 1, 2**64, 7)
    expected = eip712.digest(escrow_domain, "Delegation", delegation._asdict())
    assert escrow.hash_delegation(delegation) == expected


def test_hash_permission__depends_on_domain(escrow, chain, escrow_domain):
    permission = SpendPermission(_random_address(), _random_address(), 1, 0, 2, 3)
    other_chain = eip712.escrow_domain(chain.chain_id + 1, str(escrow.address))
    other_contract = eip712.escrow_domain(chain.chain_id, _random_address())
    onchain = escrow.hash_permission(permission)
    assert onchain != eip712.digest(other_chain, "SpendPermission", permission._asdict())
    assert onchain != eip712.digest(other_contract, "SpendPermission", permission._asdict())


@pytest.mark.parametrize("amount", [0, 1, 9, 10, 999, 1_000_000, 123_456_789, 2**200])
def test_fee_of(escrow, amount):
    assert escrow.fee_of(amount) == amount * FEE_BPS // MAX_BPS


def test_fee_of__follows_fee_bps(escrow, owner):
    escrow.set_fee_bps(MAX_FEE_BPS, sender=owner)
    assert escrow.fee_of(1_000_000) == 200_000
    escrow.set_fee_bps(0, sender=owner)
    assert escrow.fee_of(1_000_000) == 0


def test_payment_reference(escrow):
    payer, nonce = _random_address(), secrets.token_bytes(32)
    assert escrow.payment_reference(payer, nonce) == keccak(encode(["address", "bytes32"], [payer, nonce]))
    assert escrow.payment_reference(payer, nonce) != escrow.payment_reference(_random_address(), nonce)


@settings(max_examples=25, deadline=None)
@given(
    nonce=st.binary(min_size=32, max_size=32),
    amount=st.integers(0, 2**256 - 1),
    fee_bps=st.integers(0, 2**256 - 1),
)
def test_hash_credit__matches_python_module(escrow, nonce, amount, fee_bps):
    credit = (_random_address(), nonce, _random_address(), amount, fee_bps)
    assert escrow.hash_credit(credit) == merkle.Credit(*credit).leaf
