# pragma version ~=0.4.3
# pragma nonreentrancy off
"""
@title MockUSDC
@custom:contract-name MockUSDC
@license GNU Affero General Public License v3.0 only
@notice A stand-in for Circle's FiatToken v2.2 on local chains only: 6 decimals,
        EIP-2612 `permit`, EIP-3009 `transferWithAuthorization`,
        `receiveWithAuthorization` and `cancelAuthorization`, EIP-712 domain
        name "USDC" and version "2" (Base Sepolia's). The local twin places its
        runtime code at the real Base Sepolia USDC address, so every client signs
        exactly what it signs on Base Sepolia.
@dev Built from snekmate's `erc20` module. High-s signatures are refused by
     snekmate's `ecdsa` (as USDC refuses them). Minting is restricted to the
     `erc20` minters (the deployer); the faucet script only runs on local chains.
"""

from ethereum.ercs import IERC20
implements: IERC20

from ethereum.ercs import IERC20Detailed
implements: IERC20Detailed

from snekmate.auth import ownable
initializes: ownable

from snekmate.tokens import erc20
initializes: erc20[ownable := ownable]

from snekmate.utils import ecdsa


# @dev Every external function of `erc20` (ERC-20, permit, mint, minters,
# ownership with the minter-role bookkeeping, `eip712Domain`).
exports: erc20.__interface__


# @dev EIP-3009 type hashes, spelled exactly as FiatToken spells them.
_TRANSFER_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
_RECEIVE_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
_CANCEL_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "CancelAuthorization(address authorizer,bytes32 nonce)"
)
_VERSION: constant(String[1]) = "2"


# @dev Whether `nonce` of `authorizer` has been used or cancelled (EIP-3009).
authorizationState: public(HashMap[address, HashMap[bytes32, bool]])


event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)


event AuthorizationCanceled:
    authorizer: indexed(address)
    nonce: indexed(bytes32)


@deploy
@payable
def __init__():
    """
    @dev Deploys with USDC's metadata; the deployer is owner and minter.
    """
    ownable.__init__()
    erc20.__init__("USDC", "USDC", 6, "USDC", _VERSION)


@external
@view
def version() -> String[1]:
    """
    @dev FiatToken's EIP-712 domain version.
    @return String The version, "2".
    """
    return _VERSION


@external
def transferWithAuthorization(
    from_: address,
    to: address,
    amount: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """
    @dev Executes a transfer signed by `from_` (EIP-3009). Anyone may submit it.
    @param from_ The payer, who signed.
    @param to The payee.
    @param amount The amount in atomic units.
    @param valid_after The time after which it is valid (exclusive).
    @param valid_before The time before which it is valid (exclusive).
    @param nonce A unique 32-byte nonce chosen by the payer.
    @param v The signature's recovery id (27 or 28).
    @param r The signature's r.
    @param s The signature's s (low-s only).
    """
    self._use_authorization(_TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from_, to, amount, valid_after, valid_before, nonce, v, r, s)
    erc20._transfer(from_, to, amount)


@external
def receiveWithAuthorization(
    from_: address,
    to: address,
    amount: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """
    @dev Like `transferWithAuthorization`, but only the payee may submit it,
         so it cannot be front-run.
    @param from_ The payer, who signed.
    @param to The payee, who must be the caller.
    @param amount The amount in atomic units.
    @param valid_after The time after which it is valid (exclusive).
    @param valid_before The time before which it is valid (exclusive).
    @param nonce A unique 32-byte nonce chosen by the payer.
    @param v The signature's recovery id (27 or 28).
    @param r The signature's r.
    @param s The signature's s (low-s only).
    """
    assert to == msg.sender, "FiatTokenV2: caller must be the payee"
    self._use_authorization(_RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from_, to, amount, valid_after, valid_before, nonce, v, r, s)
    erc20._transfer(from_, to, amount)


@external
def cancelAuthorization(authorizer: address, nonce: bytes32, v: uint8, r: bytes32, s: bytes32):
    """
    @dev Burns an unused authorization nonce, signed by its authorizer.
    @param authorizer The payer whose nonce is cancelled.
    @param nonce The nonce to cancel.
    @param v The signature's recovery id.
    @param r The signature's r.
    @param s The signature's s.
    """
    assert not self.authorizationState[authorizer][nonce], "FiatTokenV2: authorization is used or canceled"
    struct_hash: bytes32 = keccak256(abi_encode(_CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce))
    self._require_signer(authorizer, struct_hash, v, r, s)
    self.authorizationState[authorizer][nonce] = True
    log AuthorizationCanceled(authorizer=authorizer, nonce=nonce)


@internal
def _use_authorization(
    type_hash: bytes32,
    from_: address,
    to: address,
    amount: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """
    @dev Checks the window, the nonce and the signature, then marks the nonce used.
    """
    assert block.timestamp > valid_after, "FiatTokenV2: authorization is not yet valid"
    assert block.timestamp < valid_before, "FiatTokenV2: authorization is expired"
    assert not self.authorizationState[from_][nonce], "FiatTokenV2: authorization is used or canceled"
    struct_hash: bytes32 = keccak256(abi_encode(type_hash, from_, to, amount, valid_after, valid_before, nonce))
    self._require_signer(from_, struct_hash, v, r, s)
    self.authorizationState[from_][nonce] = True
    log AuthorizationUsed(authorizer=from_, nonce=nonce)


@internal
@view
def _require_signer(signer: address, struct_hash: bytes32, v: uint8, r: bytes32, s: bytes32):
    """
    @dev Reverts unless `signer` signed `struct_hash` under this token's domain.
         snekmate's `ecdsa` refuses high-s; `ecrecover` refuses v other than 27/28.
    """
    digest: bytes32 = erc20.eip712_domain_separator._hash_typed_data_v4(struct_hash)
    recovered: address = ecdsa._recover_vrs(digest, convert(v, uint256), convert(r, uint256), convert(s, uint256))
    assert recovered == signer, "FiatTokenV2: invalid signature"
