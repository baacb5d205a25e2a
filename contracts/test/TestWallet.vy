# pragma version ~=0.4.3
# pragma nonreentrancy off
"""
@title TestWallet
@custom:contract-name TestWallet
@license GNU Affero General Public License v3.0 only
@notice A minimal ERC-1271 smart account for tests only: a signature is valid
        when its owner EOA signed the hash; the owner can make the wallet call
        any contract (to claim, revoke or approve as the wallet).
"""

from snekmate.utils import ecdsa


# @dev The 4-byte magic value of ERC-1271 `isValidSignature(bytes32,bytes)`.
_MAGIC: constant(bytes4) = 0x1626BA7E


# @dev The EOA whose ECDSA signatures this wallet accepts.
wallet_owner: public(address)


@deploy
def __init__(wallet_owner_: address):
    """
    @dev Deploys a wallet controlled by `wallet_owner_`.
    @param wallet_owner_ The owner EOA.
    """
    self.wallet_owner = wallet_owner_


@external
@view
def isValidSignature(hash: bytes32, signature: Bytes[65]) -> bytes4:
    """
    @dev ERC-1271: the magic value iff the owner signed `hash`.
    @param hash The signed digest.
    @param signature The owner's 65-byte ECDSA signature.
    @return bytes4 0x1626ba7e when valid, 0xffffffff otherwise.
    """
    if ecdsa._recover_sig(hash, signature) == self.wallet_owner:
        return _MAGIC
    return 0xFFFFFFFF


@external
def execute(target: address, data: Bytes[1_024]) -> Bytes[256]:
    """
    @dev Calls `target` with `data` as this wallet; owner only.
    @param target The contract called.
    @param data The calldata.
    @return Bytes The call's return data.
    """
    assert msg.sender == self.wallet_owner, "wallet: caller is not the owner"
    return raw_call(target, data, max_outsize=256)
