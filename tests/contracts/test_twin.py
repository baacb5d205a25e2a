"""The Base Sepolia twin as a real anvil process: chain id, USDC at the real address, its EIP-712
domain, and an EIP-3009 payment from a wallet without ETH signed exactly as on Base Sepolia."""

from __future__ import annotations

import secrets
import socket

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from quotra_dev import twin as twin_module
from web3.exceptions import ContractLogicError

USDC = 10**6
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
BASE_SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
DOMAIN = {"name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": BASE_SEPOLIA_USDC}
TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


@pytest.fixture(scope="module")
def twin():
    with twin_module.start() as chain:
        yield chain


def _signable(message):
    return encode_typed_data(
        full_message={
            "types": TYPES,
            "primaryType": "TransferWithAuthorization",
            "domain": DOMAIN,
            "message": message,
        }
    )


def _authorization(twin, payer, to, amount):
    now = twin.web3().eth.get_block("latest")["timestamp"]
    message = {
        "from": payer.address,
        "to": to,
        "value": amount,
        "validAfter": 0,
        "validBefore": now + 3_600,
        "nonce": secrets.token_bytes(32),
    }
    signed = Account.sign_message(_signable(message), payer.key)
    return message, signed


def _args(message, v, r, s):
    return (
        message["from"],
        message["to"],
        message["value"],
        message["validAfter"],
        message["validBefore"],
        message["nonce"],
        v,
        r.to_bytes(32, "big"),
        s.to_bytes(32, "big"),
    )


def test_twin__is_base_sepolia_chain(twin):
    w3 = twin.web3()
    assert twin.chain_id == 84532
    assert w3.eth.chain_id == 84532
    assert twin.rpc_url == f"http://127.0.0.1:{twin.port}"
    assert twin.usdc == BASE_SEPOLIA_USDC


def test_twin__dev_accounts_are_anvils_public_test_keys(twin):
    assert [account.address for account in twin.accounts] == twin.web3().eth.accounts
    for address, key in twin.accounts:
        assert Account.from_key(key).address == address
        assert twin.web3().eth.get_balance(address) == 10_000 * 10**18


def test_twin__starts_pristine(twin):
    # USDC is placed without mining, so addresses of later deployments are deterministic.
    w3 = twin.web3()
    assert w3.eth.block_number == 0
    assert w3.eth.get_transaction_count(twin.accounts[0].address) == 0


def test_twin__usdc_code_at_real_address(twin):
    assert len(twin.web3().eth.get_code(BASE_SEPOLIA_USDC)) > 1_000


def test_twin__usdc_metadata_and_roles(twin):
    token = twin.usdc_contract().functions
    owner = twin.accounts[0].address
    assert token.name().call() == "USDC"
    assert token.symbol().call() == "USDC"
    assert token.version().call() == "2"
    assert token.decimals().call() == 6
    assert token.owner().call() == owner
    assert token.is_minter(owner).call()
    assert not token.is_minter(twin.accounts[1].address).call()


def test_twin__usdc_domain_is_base_sepolias(twin):
    token = twin.usdc_contract().functions
    # eth-account's own domain hash of (USDC, 2, 84532, the real address) is the oracle.
    message = {"from": BASE_SEPOLIA_USDC, "to": BASE_SEPOLIA_USDC, "value": 0}
    message |= {"validAfter": 0, "validBefore": 0, "nonce": b"\x00" * 32}
    expected = _signable(message).header
    assert token.DOMAIN_SEPARATOR().call() == expected
    assert twin_module.usdc_domain_separator() == expected
    _, name, version, chain_id, verifying_contract, _, _ = token.eip712Domain().call()
    assert (name, version, chain_id, verifying_contract) == ("USDC", "2", 84532, BASE_SEPOLIA_USDC)


def test_twin__transfer_with_authorization_from_wallet_without_eth(twin):
    w3 = twin.web3()
    token = twin.usdc_contract()
    payer = twin_module.fresh_wallet()
    payee = twin_module.fresh_wallet().address
    relayer = twin.accounts[6].address
    twin.mint_usdc(payer.address, 10 * USDC)
    assert w3.eth.get_balance(payer.address) == 0

    message, signed = _authorization(twin, payer, payee, 3 * USDC)
    tx_hash = token.functions.transferWithAuthorization(
        *_args(message, signed.v, signed.r, signed.s)
    ).transact({"from": relayer})

    assert w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 1
    assert token.functions.balanceOf(payee).call() == 3 * USDC
    assert token.functions.balanceOf(payer.address).call() == 7 * USDC
    assert token.functions.authorizationState(payer.address, message["nonce"]).call()


def test_twin__transfer_with_authorization_high_s__refused(twin):
    token = twin.usdc_contract()
    payer = twin_module.fresh_wallet()
    twin.mint_usdc(payer.address, 10 * USDC)
    message, signed = _authorization(twin, payer, twin.accounts[2].address, USDC)
    high_s = _args(message, 55 - signed.v, signed.r, SECP256K1_N - signed.s)

    with pytest.raises(ContractLogicError, match="ecdsa: invalid signature `s` value"):
        token.functions.transferWithAuthorization(*high_s).call({"from": twin.accounts[6].address})
    # The low-s original still goes through: the refusal was about malleability only.
    token.functions.transferWithAuthorization(*_args(message, signed.v, signed.r, signed.s)).call(
        {"from": twin.accounts[6].address}
    )


def test_twin__ape_env_points_at_it(twin):
    assert twin.ape_env() == {"QUOTRA_TWIN_RPC_URL": twin.rpc_url, "APE_FOUNDRY_HOST": twin.rpc_url}


def test_twin__stop_kills_anvil_and_frees_the_port():
    chain = twin_module.start()
    port = chain.port
    chain.stop()
    chain.stop()  # idempotent
    assert not chain.running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_twin__state_file_survives_a_restart(tmp_path):
    state = tmp_path / "twin-state.json"
    holder = twin_module.fresh_wallet().address
    with twin_module.start(state_file=state) as chain:
        chain.mint_usdc(holder, 42 * USDC)
    with twin_module.start(state_file=state) as chain:
        assert chain.usdc_contract().functions.balanceOf(holder).call() == 42 * USDC
        chain.verify()
