# pragma version ~=0.4.3
# pragma nonreentrancy off
"""
@title LyingWallet
@custom:contract-name LyingWallet
@license GNU Affero General Public License v3.0 only
@notice An ERC-1271 wallet for tests only that answers `isValidSignature` with
        whatever 32 bytes it is told to (a wrong magic value, the magic value
        right-aligned, `true`), or reverts, whatever the signature.
"""


# @dev The raw 32-byte word `isValidSignature` returns.
answer: public(bytes32)
# @dev Whether `isValidSignature` reverts instead.
reverts: public(bool)


@deploy
def __init__(answer_: bytes32):
    """
    @dev Deploys a wallet that always answers `answer_`.
    @param answer_ The 32-byte word to return.
    """
    self.answer = answer_


@external
def set_answer(answer_: bytes32, reverts_: bool):
    """
    @dev Changes the answer (anyone may: test-only).
    @param answer_ The 32-byte word to return.
    @param reverts_ True to revert instead.
    """
    self.answer = answer_
    self.reverts = reverts_


@external
@view
def isValidSignature(hash: bytes32, signature: Bytes[65]) -> bytes32:
    """
    @dev ERC-1271 `isValidSignature(bytes32,bytes)`, answering without looking.
    @param hash Ignored.
    @param signature Ignored.
    @return bytes32 The configured answer.
    """
    assert not self.reverts, "wallet: refused"
    return self.answer
