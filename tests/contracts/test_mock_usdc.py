"""MockUSDC: FiatToken v2.2's metadata, EIP-3009 and EIP-2612 behaviour, revert strings included."""

from __future__ import annotations

import secrets

import ape
import pytest
from eth_abi import encode
from eth_utils import keccak

USDC = 10**6
AMOUNT = 25 * USDC
ZERO_ADDRESS = "0x" + "00" * 20
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


@pytest.fixture
def funded(mint, consumer):
    mint(consumer, 100 * USDC)
    return consumer


def _transfer(usdc, message, sig, sender):
    return usdc.transferWithAuthorization(
        message["from"],
        message["to"],
        message["value"],
        message["validAfter"],
        message["validBefore"],
        message["nonce"],
        sig.v,
        sig.r,
        sig.s,
        sender=sender,
    )


def _receive(usdc, message, sig, sender):
    return usdc.receiveWithAuthorization(
        message["from"],
        message["to"],
        message["value"],
        message["validAfter"],
        message["validBefore"],
        message["nonce"],
        sig.v,
        sig.r,
        sig.s,
        sender=sender,
    )


# ---------------------------------------------------------------- metadata


def test_metadata__matches_base_sepolia_usdc(usdc, owner):
    assert usdc.name() == "USDC"
    assert usdc.symbol() == "USDC"
    assert usdc.decimals() == 6
    assert usdc.version() == "2"
    assert usdc.totalSupply() == 0
    assert usdc.owner() == owner
    assert usdc.is_minter(owner)


def test_domain_separator__is_eip712_of_name_version_chain_and_address(usdc, chain):
    expected = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(
                    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
                ),
                keccak(text="USDC"),
                keccak(text="2"),
                chain.chain_id,
                str(usdc.address),
            ],
        )
    )
    assert usdc.DOMAIN_SEPARATOR() == expected
    fields, name, version, chain_id, verifying_contract, salt, extensions = usdc.eip712Domain()
    assert (fields, name, version, chain_id) == (b"\x0f", "USDC", "2", chain.chain_id)
    assert verifying_contract == usdc.address
    assert (salt, extensions) == (b"\x00" * 32, [])


# ---------------------------------------------------------------- mint


def test_mint__by_minter__credits_and_emits(usdc, owner, consumer):
    tx = usdc.mint(consumer, AMOUNT, sender=owner)
    assert usdc.balanceOf(consumer) == AMOUNT
    assert usdc.totalSupply() == AMOUNT
    assert tx.events == [usdc.Transfer(sender=ZERO_ADDRESS, receiver=consumer, value=AMOUNT)]


def test_mint__by_non_minter__reverts(usdc, stranger):
    with ape.reverts("erc20: access is denied"):
        usdc.mint(stranger, AMOUNT, sender=stranger)


# ---------------------------------------------------------------- transferWithAuthorization


def test_transfer_with_authorization__moves_funds_and_marks_nonce(
    usdc, funded, provider, relayer, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    assert not usdc.authorizationState(funded, message["nonce"])

    tx = _transfer(usdc, message, sig, relayer)

    assert usdc.balanceOf(funded) == 75 * USDC
    assert usdc.balanceOf(provider) == AMOUNT
    assert usdc.authorizationState(funded, message["nonce"])
    assert tx.events == [
        usdc.AuthorizationUsed(authorizer=funded, nonce=message["nonce"]),
        usdc.Transfer(sender=funded, receiver=provider, value=AMOUNT),
    ]


def test_transfer_with_authorization__replayed__reverts(usdc, funded, provider, relayer, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    _transfer(usdc, message, sig, relayer)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__expired__reverts(
    usdc, funded, provider, relayer, chain, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT, valid_before=chain.pending_timestamp - 1)
    with ape.reverts("FiatTokenV2: authorization is expired"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__not_yet_valid__reverts(
    usdc, funded, provider, relayer, chain, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT, valid_after=chain.pending_timestamp + 600)
    with ape.reverts("FiatTokenV2: authorization is not yet valid"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__wrong_signer__reverts(
    usdc, funded, provider, relayer, stranger, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT, signer=stranger)
    with ape.reverts("FiatTokenV2: invalid signature"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__tampered_amount__reverts(
    usdc, funded, provider, relayer, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    with ape.reverts("FiatTokenV2: invalid signature"):
        _transfer(usdc, {**message, "value": AMOUNT + 1}, sig, relayer)


def test_transfer_with_authorization__other_domain__reverts(
    usdc, funded, provider, relayer, usdc_domain, sign_authorization
):
    # Mainnet USDC's name: a signature for another domain must not verify here.
    message, sig = sign_authorization(funded, provider, AMOUNT, domain={**usdc_domain, "name": "USD Coin"})
    with ape.reverts("FiatTokenV2: invalid signature"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__high_s__reverts(usdc, funded, provider, relayer, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        _transfer(usdc, message, sig.high_s(), relayer)


@pytest.mark.parametrize("v", [0, 1, 26, 29])
def test_transfer_with_authorization__v_not_27_or_28__reverts(
    usdc, funded, provider, relayer, sign_authorization, v
):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    with ape.reverts("ecdsa: invalid signature"):
        _transfer(usdc, message, sig._replace(v=v), relayer)


def test_transfer_with_authorization__receive_signature__reverts(
    usdc, funded, provider, relayer, sign_authorization
):
    # The type hash is part of what is signed: a ReceiveWithAuthorization is not a transfer.
    message, sig = sign_authorization(funded, provider, AMOUNT, kind="ReceiveWithAuthorization")
    with ape.reverts("FiatTokenV2: invalid signature"):
        _transfer(usdc, message, sig, relayer)


def test_transfer_with_authorization__above_balance__reverts(
    usdc, funded, provider, relayer, sign_authorization
):
    message, sig = sign_authorization(funded, provider, 100 * USDC + 1)
    with ape.reverts("erc20: transfer amount exceeds balance"):
        _transfer(usdc, message, sig, relayer)


# ---------------------------------------------------------------- receiveWithAuthorization


def test_receive_with_authorization__by_payee__moves_funds(usdc, funded, provider, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT, kind="ReceiveWithAuthorization")
    tx = _receive(usdc, message, sig, provider)
    assert usdc.balanceOf(provider) == AMOUNT
    assert usdc.authorizationState(funded, message["nonce"])
    assert tx.events == [
        usdc.AuthorizationUsed(authorizer=funded, nonce=message["nonce"]),
        usdc.Transfer(sender=funded, receiver=provider, value=AMOUNT),
    ]


def test_receive_with_authorization__by_other__reverts(usdc, funded, provider, relayer, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT, kind="ReceiveWithAuthorization")
    with ape.reverts("FiatTokenV2: caller must be the payee"):
        _receive(usdc, message, sig, relayer)


def test_receive_with_authorization__transfer_signature__reverts(usdc, funded, provider, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    with ape.reverts("FiatTokenV2: invalid signature"):
        _receive(usdc, message, sig, provider)


def test_receive_with_authorization__replayed__reverts(usdc, funded, provider, sign_authorization):
    message, sig = sign_authorization(funded, provider, AMOUNT, kind="ReceiveWithAuthorization")
    _receive(usdc, message, sig, provider)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        _receive(usdc, message, sig, provider)


# ---------------------------------------------------------------- cancelAuthorization


@pytest.fixture
def sign_cancel(sign_usdc_typed):
    def _sign_cancel(authorizer, nonce, signer=None):
        message = {"authorizer": str(authorizer.address), "nonce": nonce}
        return sign_usdc_typed(signer or authorizer, "CancelAuthorization", message)

    return _sign_cancel


def test_cancel_authorization__burns_the_nonce(
    usdc, funded, provider, relayer, sign_cancel, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    cancel = sign_cancel(funded, message["nonce"])

    tx = usdc.cancelAuthorization(funded, message["nonce"], *cancel, sender=relayer)

    assert usdc.authorizationState(funded, message["nonce"])
    assert tx.events == [usdc.AuthorizationCanceled(authorizer=funded, nonce=message["nonce"])]
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        _transfer(usdc, message, sig, relayer)
    assert usdc.balanceOf(provider) == 0


def test_cancel_authorization__twice__reverts(usdc, funded, relayer, sign_cancel):
    nonce = secrets.token_bytes(32)
    cancel = sign_cancel(funded, nonce)
    usdc.cancelAuthorization(funded, nonce, *cancel, sender=relayer)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        usdc.cancelAuthorization(funded, nonce, *cancel, sender=relayer)


def test_cancel_authorization__after_use__reverts(
    usdc, funded, provider, relayer, sign_cancel, sign_authorization
):
    message, sig = sign_authorization(funded, provider, AMOUNT)
    _transfer(usdc, message, sig, relayer)
    cancel = sign_cancel(funded, message["nonce"])
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        usdc.cancelAuthorization(funded, message["nonce"], *cancel, sender=relayer)


def test_cancel_authorization__wrong_signer__reverts(usdc, funded, relayer, stranger, sign_cancel):
    nonce = secrets.token_bytes(32)
    cancel = sign_cancel(funded, nonce, signer=stranger)
    with ape.reverts("FiatTokenV2: invalid signature"):
        usdc.cancelAuthorization(funded, nonce, *cancel, sender=relayer)


def test_cancel_authorization__high_s__reverts(usdc, funded, relayer, sign_cancel):
    nonce = secrets.token_bytes(32)
    cancel = sign_cancel(funded, nonce)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        usdc.cancelAuthorization(funded, nonce, *cancel.high_s(), sender=relayer)


# ---------------------------------------------------------------- permit (EIP-2612)


@pytest.fixture
def sign_permit(usdc, sign_usdc_typed):
    def _sign_permit(holder, spender, value, deadline, signer=None):
        message = {
            "owner": str(holder.address),
            "spender": str(spender.address),
            "value": value,
            "nonce": usdc.nonces(holder),
            "deadline": deadline,
        }
        return sign_usdc_typed(signer or holder, "Permit", message)

    return _sign_permit


def test_permit__sets_allowance_and_bumps_nonce(usdc, funded, provider, relayer, chain, sign_permit):
    deadline = chain.pending_timestamp + 600
    sig = sign_permit(funded, provider, AMOUNT, deadline)

    tx = usdc.permit(funded, provider, AMOUNT, deadline, *sig, sender=relayer)

    assert usdc.allowance(funded, provider) == AMOUNT
    assert usdc.nonces(funded) == 1
    assert tx.events == [usdc.Approval(owner=funded, spender=provider, value=AMOUNT)]
    usdc.transferFrom(funded, provider, AMOUNT, sender=provider)
    assert usdc.balanceOf(provider) == AMOUNT


def test_permit__replayed__reverts(usdc, funded, provider, relayer, chain, sign_permit):
    deadline = chain.pending_timestamp + 600
    sig = sign_permit(funded, provider, AMOUNT, deadline)
    usdc.permit(funded, provider, AMOUNT, deadline, *sig, sender=relayer)
    with ape.reverts("erc20: invalid signature"):  # the nonce moved on
        usdc.permit(funded, provider, AMOUNT, deadline, *sig, sender=relayer)


def test_permit__expired__reverts(usdc, funded, provider, relayer, chain, sign_permit):
    deadline = chain.pending_timestamp - 1
    sig = sign_permit(funded, provider, AMOUNT, deadline)
    with ape.reverts("erc20: expired deadline"):
        usdc.permit(funded, provider, AMOUNT, deadline, *sig, sender=relayer)


def test_permit__wrong_signer__reverts(usdc, funded, provider, relayer, stranger, chain, sign_permit):
    deadline = chain.pending_timestamp + 600
    sig = sign_permit(funded, provider, AMOUNT, deadline, signer=stranger)
    with ape.reverts("erc20: invalid signature"):
        usdc.permit(funded, provider, AMOUNT, deadline, *sig, sender=relayer)


def test_permit__high_s__reverts(usdc, funded, provider, relayer, chain, sign_permit):
    deadline = chain.pending_timestamp + 600
    sig = sign_permit(funded, provider, AMOUNT, deadline)
    with ape.reverts("ecdsa: invalid signature `s` value"):
        usdc.permit(funded, provider, AMOUNT, deadline, *sig.high_s(), sender=relayer)
