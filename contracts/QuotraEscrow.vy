# pragma version ~=0.4.3
# pragma nonreentrancy off
"""
@title Quotra Escrow
@custom:contract-name QuotraEscrow
@license GNU Affero General Public License v3.0 only
@notice The treasury of the Quotra marketplace. Consumers pay for AI model calls
        in USDC, per call (x402 `exact`: an EIP-3009 `TransferWithAuthorization`
        to this contract) or from a prepaid deposit under an EIP-712
        `SpendPermission` settled in batches. An x402 payment is charged what
        the call used (at most the authorized value); the unused rest of the
        authorization goes to the payer's deposit. Every charge is split
        exactly: `fee = amount * fee_bps // 10_000` to the platform, the rest to
        the provider whose key served the call. A prepaid charge may add an app
        developer's markup on top, all of it credited to the developer the
        payer's permission names, never above the markup rate it allows. Providers claim their earnings
        themselves or through a signed, revocable `Delegation` that any relayer
        may submit for a USDC fee bounded by what the provider signed (the
        ERC-7710 idea, written for this escrow).
@dev Trust model: consumer deposits move only back to the consumer (less the
     relayer fee it signed, when a relayer submits its signed withdrawal) or,
     under a consumer-signed permission, to providers, the platform and the
     developer it names (never above its allowance or markup rate, outside its
     window, after revocation, or twice for one batch reference). Provider earnings move only to the provider or to the payee of a
     provider-signed delegation (never above its cap, after expiry or
     revocation; the relayer's fee is the signed fee pro rata of the amount
     claimed, so splitting a claim never raises it). Every credit is backed by
     USDC that entered the escrow in the same transaction: a settled
     authorization, a settled charge, or, for a front-run authorization, the
     operator's own funds (`reconcile_authorization`). Every x402 credit is
     committed in a Merkle root of `(payer, nonce, provider, charged, fee_bps)`
     leaves, and a refund must prove its payment is one of them: it can only
     return a payment credited here, once, from the provider it was credited
     to, at the fee it was split at, and never more than was charged. What
     operators (the relay's settling keys) are still trusted with: naming the
     provider that served each call, metering what each x402 call used (never
     above what its payer authorized), and choosing which credited x402
     payments to refund within `refund_window`.
     Pausing stops deposits and settlements; claims, withdrawals, refunds and
     revocations always work. Solvency: `usdc.balanceOf(self) >= liabilities()`,
     equal except for tokens that reached the escrow outside its own calls
     (mistaken transfers, front-run authorizations), which only `sweep` moves.
@custom:security Per-call x402 settlement writes no per-payment storage slot
                 (one would cost 22k gas a call and miss the gas budget): each
                 batch stores one Merkle root, and USDC's own
                 `authorizationState` makes each (payer, nonce) settle once.
                 USDC records a cancelled authorization exactly as a used one
                 and a front-run one arrives as a bare transfer, so the escrow
                 never credits a payment out of funds it did not receive itself;
                 `reconcile_authorization` is paid by the operator instead.
"""

from ethereum.ercs import IERC20

from .interfaces import IFiatToken

from snekmate.auth import ownable
initializes: ownable

from snekmate.auth import ownable_2step
initializes: ownable_2step[ownable := ownable]

from snekmate.utils import pausable
initializes: pausable

from snekmate.utils import eip712_domain_separator
initializes: eip712_domain_separator

from snekmate.utils import signature_checker
from snekmate.utils import message_hash_utils
from snekmate.utils import merkle_proof_verification


# @dev `ownable.renounce_ownership` / `ownable_2step.renounce_ownership` are left
# out on purpose: an ownerless escrow could never change operators again and
# would strand the platform fees.
exports: (
    ownable.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
    pausable.paused,
    eip712_domain_separator.eip712Domain,
)


# ################################################################
#                            CONSTANTS                           #
# ################################################################

# @dev Basis points in one whole.
MAX_BPS: public(constant(uint256)) = 10_000
# @dev The platform fee can never be set above 20%.
MAX_FEE_BPS: public(constant(uint256)) = 2_000
# @dev The fee at deployment: 10%.
INITIAL_FEE_BPS: constant(uint256) = 1_000
# @dev Bounds of the batch entry points.
MAX_PAYMENTS: public(constant(uint256)) = 64
# @dev The longest Merkle proof of a batch of `MAX_PAYMENTS`: ceil(log2(64)).
MAX_PROOF_LENGTH: public(constant(uint256)) = 6
# @dev Bounds of the deploy-time delays: a deposit can never be locked for longer
# than this, nor a credited payment stay refundable for longer.
MAX_WITHDRAWAL_DELAY: public(constant(uint256)) = 30 * 86_400
MAX_REFUND_WINDOW: public(constant(uint256)) = 30 * 86_400
MAX_CHARGES: public(constant(uint256)) = 256
MAX_CHARGE_BATCHES: public(constant(uint256)) = 8
MAX_BATCH_CHARGES: public(constant(uint256)) = 64
# @dev Width of each of the three sums packed in `_totals`. USDC's whole
# supply needs fewer than 57 bits.
_TOTAL_BITS: constant(uint256) = 85
_TOTAL_MASK: constant(uint256) = (1 << _TOTAL_BITS) - 1
# @dev A prepaid charge travels packed in one word, `provider << 96 | amount`
# (see `quotra.chain.charges.pack_charge`): a third less calldata than a
# struct, and the 96-bit amount bound makes the per-charge arithmetic provably
# overflow-free, so it runs unchecked.
_CHARGE_AMOUNT_BITS: constant(uint256) = 96
_CHARGE_AMOUNT_MASK: constant(uint256) = (1 << _CHARGE_AMOUNT_BITS) - 1

# @dev EIP-712 type hashes. Field names and order match `quotra.chain.eip712`.
SPEND_PERMISSION_TYPEHASH: public(constant(bytes32)) = keccak256(
    "SpendPermission(address consumer,address spender,uint256 allowance,uint256 valid_after,uint256 valid_until,uint256 salt,address developer,uint256 max_markup_bps)"
)
DELEGATION_TYPEHASH: public(constant(bytes32)) = keccak256(
    "Delegation(address provider,address delegate,address payee,uint256 max_amount,uint256 relayer_fee,uint256 valid_until,uint256 salt)"
)
REVOCATION_TYPEHASH: public(constant(bytes32)) = keccak256("Revocation(address account,bytes32 item)")
# @dev USDC's EIP-3009 type hash (FiatToken v2), used to verify a front-run
# authorization before reconciling it.
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: public(constant(bytes32)) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
# @dev Type hashes of a consumer's signed withdrawal steps, which any relayer
# may submit. One shape for all three (field names and order match
# `quotra.chain.eip712`): `amount` is the amount to request, the relayer's fee
# out of the withdrawal, or the pending amount to cancel.
REQUEST_WITHDRAWAL_TYPEHASH: constant(bytes32) = keccak256(
    "RequestWithdrawal(address consumer,uint256 amount,uint256 nonce,uint256 deadline)"
)
WITHDRAW_TYPEHASH: constant(bytes32) = keccak256(
    "Withdraw(address consumer,uint256 relayer_fee,uint256 nonce,uint256 deadline)"
)
CANCEL_WITHDRAWAL_TYPEHASH: constant(bytes32) = keccak256(
    "CancelWithdrawal(address consumer,uint256 amount,uint256 nonce,uint256 deadline)"
)


# ################################################################
#                           IMMUTABLES                           #
# ################################################################

# @dev The USDC token held by this escrow.
usdc: public(immutable(address))
# @dev Seconds between `request_withdrawal` and `withdraw`, so that charges
# already served can still settle.
withdrawal_delay: public(immutable(uint256))
# @dev Seconds after an x402 payment was credited during which an operator may
# refund it.
refund_window: public(immutable(uint256))


# ################################################################
#                             STRUCTS                            #
# ################################################################

# @dev An x402 `exact` payment: the payer's EIP-3009 authorization paying
# `amount` to this escrow, the provider whose key served the call, and what
# the call cost (`charged`, at most `amount`; the rest goes to the payer's
# deposit).
struct Payment:
    payer: address
    provider: address
    amount: uint256
    charged: uint256
    valid_after: uint256
    valid_before: uint256
    nonce: bytes32
    v: uint8
    r: bytes32
    s: bytes32


# @dev A consumer's grant to `spender` (an operator) to charge up to
# `allowance` of their deposit for calls, within [valid_after, valid_until).
# The charges may pay `developer` (an app's owner) a markup of at most
# `max_markup_bps` of the calls' base cost on top; zero allows none.
struct SpendPermission:
    consumer: address
    spender: address
    allowance: uint256
    valid_after: uint256
    valid_until: uint256
    salt: uint256
    developer: address
    max_markup_bps: uint256


# @dev An x402 payment as this escrow credited it: the leaf of a settlement's
# Merkle root (see `hash_credit`), which a refund must prove. `amount` is what
# was charged and split, not the authorized value.
struct Credit:
    payer: address
    nonce: bytes32
    provider: address
    amount: uint256
    fee_bps: uint256


# @dev Consecutive credits to one provider within a batch, booked together.
struct Run:
    provider: address
    amount: uint256
    fee: uint256


# @dev One permission's charges, for the multi-permission entry point.
struct ChargeBatch:
    permission: SpendPermission
    signature: Bytes[65]
    reference: bytes32
    charges: DynArray[uint256, MAX_BATCH_CHARGES]
    markup: uint256


# @dev A provider's grant letting `delegate` (anyone if empty) claim up to
# `max_amount` of their earnings to `payee` until `valid_until`. The caller
# receives `relayer_fee` for claiming all of `max_amount`, pro rata for less:
# `relayer_fee * amount // max_amount` per claim, so however a relayer splits
# the claims, its fees never exceed `relayer_fee` in all.
struct Delegation:
    provider: address
    delegate: address
    payee: address
    max_amount: uint256
    relayer_fee: uint256
    valid_until: uint256
    salt: uint256


# @dev A pending withdrawal of a consumer's deposit.
struct WithdrawalRequest:
    amount: uint256
    unlock_at: uint256


# ################################################################
#                             STORAGE                            #
# ################################################################

# @dev The platform's share of every payment, in basis points.
fee_bps: public(uint256)
# @dev Settling keys of the relay.
is_operator: public(HashMap[address, bool])
# @dev Prepaid balance of each consumer.
deposits: public(HashMap[address, uint256])
# @dev Pending withdrawal of each consumer.
withdrawals: public(HashMap[address, WithdrawalRequest])
# @dev Unclaimed earnings of each provider.
earnings: public(HashMap[address, uint256])
# @dev Sum of `deposits`, sum of `earnings` and the unwithdrawn platform fees,
# packed into one slot (`_TOTAL_BITS` each, deposits highest) because every
# payment updates two of them; read them through `total_deposits()`,
# `total_earnings()` and `platform_fees()`.
_totals: uint256
# @dev Amount charged so far under each permission (by EIP-712 digest).
permission_spent: public(HashMap[bytes32, uint256])
# @dev Charge batch references already settled: each batch settles once.
settled_references: public(HashMap[bytes32, bool])
# @dev When each x402 settlement was credited, by its Merkle root (a batch's
# root, or a reconciled payment's single leaf); zero for an unknown root.
settlement_roots: public(HashMap[bytes32, uint256])
# @dev Amount claimed so far under each delegation (by EIP-712 digest).
delegation_claimed: public(HashMap[bytes32, uint256])
# @dev Items (permission or delegation digests) revoked by their signer.
revoked: public(HashMap[address, HashMap[bytes32, bool]])
# @dev x402 references (see `payment_reference`) credited by reconciliation.
reconciled: public(HashMap[bytes32, bool])
# @dev x402 references refunded.
refunded: public(HashMap[bytes32, bool])
# @dev Next nonce of each consumer's signed withdrawal steps.
withdrawal_nonces: public(HashMap[address, uint256])


# ################################################################
#                             EVENTS                             #
# ################################################################

event PaymentsSettled:
    operator: indexed(address)
    root: indexed(bytes32)
    count: uint256
    amount: uint256
    fee: uint256
    fee_bps: uint256


event Credited:
    provider: indexed(address)
    settlement: indexed(bytes32)
    amount: uint256
    fee: uint256


event PaymentFailed:
    payer: indexed(address)
    provider: indexed(address)
    nonce: indexed(bytes32)


event PaymentReconciled:
    payer: indexed(address)
    provider: indexed(address)
    nonce: indexed(bytes32)
    amount: uint256
    fee: uint256
    fee_bps: uint256


event PaymentRefunded:
    payer: indexed(address)
    provider: indexed(address)
    nonce: indexed(bytes32)
    amount: uint256
    fee: uint256


event ChargesSettled:
    consumer: indexed(address)
    permission: indexed(bytes32)
    reference: indexed(bytes32)
    amount: uint256
    fee: uint256
    markup: uint256
    count: uint256
    fee_bps: uint256


event Deposited:
    sender: indexed(address)
    beneficiary: indexed(address)
    amount: uint256


event WithdrawalRequested:
    consumer: indexed(address)
    amount: uint256
    unlock_at: uint256


event WithdrawalCancelled:
    consumer: indexed(address)


event Withdrawn:
    consumer: indexed(address)
    amount: uint256


event Claimed:
    provider: indexed(address)
    payee: indexed(address)
    delegation: indexed(bytes32)
    amount: uint256
    relayer: address
    relayer_fee: uint256


event Revoked:
    account: indexed(address)
    item: indexed(bytes32)


event OperatorSet:
    operator: indexed(address)
    status: bool


event FeeSet:
    fee_bps: uint256


event PlatformFeesWithdrawn:
    to: indexed(address)
    amount: uint256


event Swept:
    token: indexed(address)
    to: indexed(address)
    amount: uint256


# ################################################################
#                          CONSTRUCTOR                           #
# ################################################################

@deploy
def __init__(usdc_: address, withdrawal_delay_: uint256, refund_window_: uint256):
    """
    @dev Deploys the escrow for one USDC token; the deployer becomes owner.
    @param usdc_ The USDC (FiatToken) address on this chain.
    @param withdrawal_delay_ Seconds a consumer waits between requesting a
           withdrawal and withdrawing.
    @param refund_window_ Seconds after an x402 payment was credited during
           which operators may refund it.
    """
    assert usdc_.is_contract, "escrow: usdc has no code"
    assert withdrawal_delay_ <= MAX_WITHDRAWAL_DELAY, "escrow: withdrawal delay too long"
    assert refund_window_ <= MAX_REFUND_WINDOW, "escrow: refund window too long"
    ownable.__init__()
    ownable_2step.__init__()
    pausable.__init__()
    eip712_domain_separator.__init__("Quotra Escrow", "1")
    usdc = usdc_
    withdrawal_delay = withdrawal_delay_
    refund_window = refund_window_
    self.fee_bps = INITIAL_FEE_BPS
    log FeeSet(fee_bps=INITIAL_FEE_BPS)


# ################################################################
#                       x402 PER-CALL PAYMENTS                   #
# ################################################################

@external
@nonreentrant
def settle_authorizations(payments: DynArray[Payment, MAX_PAYMENTS]) -> bytes32:
    """
    @dev Settles x402 payments in one transaction: submits each payer's EIP-3009
         authorization to USDC (paying this escrow) and credits the split of
         what each call was charged in the same transaction, the unused rest of
         its authorization to its payer's deposit. An authorization that USDC refuses (used, cancelled,
         expired, unfunded) is skipped with a `PaymentFailed` event instead of
         failing the batch.
    @notice The credited payments are committed in one Merkle root of their
            `Credit` leaves (`hash_credit`, pairs hashed sorted), stored with
            the time, which a refund must prove membership in. Consecutive
            payments to one provider are booked together, with one `Credited`
            event per run: list a provider's payments together to save gas.
    @param payments The authorizations and the providers that served them.
    @return bytes32 The settlement's Merkle root (empty if nothing settled).
    """
    self._check_operator()
    pausable._require_not_paused()
    bps: uint256 = self.fee_bps
    leaves: DynArray[bytes32, MAX_PAYMENTS] = []
    runs: DynArray[Run, MAX_PAYMENTS] = []
    total: uint256 = 0
    total_fee: uint256 = 0
    returned: uint256 = 0
    for payment: Payment in payments:
        self._check_payment(payment)
        ok: bool = raw_call(
            usdc,
            abi_encode(
                payment.payer,
                self,
                payment.amount,
                payment.valid_after,
                payment.valid_before,
                payment.nonce,
                payment.v,
                payment.r,
                payment.s,
                method_id=method_id(
                    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
                ),
            ),
            revert_on_failure=False,
        )
        if not ok:
            log PaymentFailed(payer=payment.payer, provider=payment.provider, nonce=payment.nonce)
            continue
        # Unchecked sums: every amount here was just paid in by USDC, so they are all bounded
        # by its total supply (far below 2**240), `charged * bps` included.
        charged: uint256 = payment.charged
        if charged < payment.amount:
            rest: uint256 = unsafe_sub(payment.amount, charged)
            self.deposits[payment.payer] += rest
            returned = unsafe_add(returned, rest)
            log Deposited(sender=payment.payer, beneficiary=payment.payer, amount=rest)
        fee: uint256 = unsafe_div(unsafe_mul(charged, bps), MAX_BPS)
        leaves.append(self._hash_credit(payment.payer, payment.nonce, payment.provider, charged, bps))
        last: uint256 = unsafe_sub(len(runs), 1)  # past the end (2**256 - 1) before the first run
        if last < len(runs) and runs[last].provider == payment.provider:
            runs[last].amount = unsafe_add(runs[last].amount, charged)
            runs[last].fee = unsafe_add(runs[last].fee, fee)
        else:
            runs.append(Run(provider=payment.provider, amount=charged, fee=fee))
        total = unsafe_add(total, charged)
        total_fee = unsafe_add(total_fee, fee)
    root: bytes32 = empty(bytes32)
    if len(leaves) > 0:
        root = self._merkle_root(leaves)
        self.settlement_roots[root] = block.timestamp
        for run: Run in runs:
            self._credit(run.provider, root, run.amount, run.fee)
        self._update_totals(returned, 0, total - total_fee, 0, total_fee, 0)
    log PaymentsSettled(
        operator=msg.sender, root=root, count=len(leaves), amount=total, fee=total_fee, fee_bps=bps
    )
    return root


@external
@nonreentrant
def reconcile_authorization(payment: Payment):
    """
    @dev Credits an x402 payment whose authorization someone submitted straight
         to USDC (front-run), so that its provider is paid for the call. The
         operator pays the charged amount in: USDC records a cancelled
         authorization exactly as a used one, and the front-run funds arrived
         as a bare transfer, so the escrow cannot tell whether they are this
         payment's. The front-run funds themselves, the unused rest of the
         authorization included, stay outside the books, for `sweep`.
    @notice Credits once per reference, only for an authorization the payer
            signed to this escrow under USDC's own EIP-712 domain and that
            USDC marks used. The operator must have approved `charged`.
    @param payment The authorization and the provider that served the call.
    """
    self._check_operator()
    pausable._require_not_paused()
    self._check_payment(payment)
    reference: bytes32 = self._payment_reference(payment.payer, payment.nonce)
    assert not self.reconciled[reference], "escrow: already reconciled"
    self._verify_paid_authorization(payment)
    self.reconciled[reference] = True
    bps: uint256 = self.fee_bps
    charged: uint256 = payment.charged
    fee: uint256 = charged * bps // MAX_BPS
    leaf: bytes32 = self._hash_credit(payment.payer, payment.nonce, payment.provider, charged, bps)
    self.settlement_roots[leaf] = block.timestamp
    self._credit(payment.provider, leaf, charged, fee)
    self._update_totals(0, 0, charged - fee, 0, fee, 0)
    assert extcall IERC20(usdc).transferFrom(
        msg.sender, self, charged, default_return_value=True
    ), "escrow: transfer failed"
    log PaymentReconciled(
        payer=payment.payer, provider=payment.provider, nonce=payment.nonce, amount=charged, fee=fee, fee_bps=bps
    )


@external
@nonreentrant
def refund_payment(credit: Credit, root: bytes32, proof: DynArray[bytes32, MAX_PROOF_LENGTH]):
    """
    @dev Refunds what a credited x402 payment was charged to its payer, out of
         the share it credited to its provider and the fee it was split with,
         once, within `refund_window` after it was credited (the unused rest
         of its authorization is in the payer's deposit already).
    @notice Works while paused: a refund is an exit.
    @param credit The payment as it was credited (its leaf in `root`).
    @param root The Merkle root of the settlement that credited it.
    @param proof The sibling hashes from the leaf up to `root`.
    """
    self._check_operator()
    settled_at: uint256 = self.settlement_roots[root]
    leaf: bytes32 = self._hash_credit(credit.payer, credit.nonce, credit.provider, credit.amount, credit.fee_bps)
    assert settled_at != 0 and merkle_proof_verification._verify(proof, root, leaf), "escrow: payment not settled here"
    assert block.timestamp - settled_at <= refund_window, "escrow: refund window closed"
    reference: bytes32 = self._payment_reference(credit.payer, credit.nonce)
    assert not self.refunded[reference], "escrow: already refunded"
    fee: uint256 = credit.amount * credit.fee_bps // MAX_BPS
    share: uint256 = credit.amount - fee
    assert self.earnings[credit.provider] >= share, "escrow: provider share already claimed"
    assert self._platform_fees() >= fee, "escrow: platform fee already withdrawn"
    self.refunded[reference] = True
    self.earnings[credit.provider] -= share
    self._update_totals(0, 0, 0, share, 0, fee)
    self._transfer_out(credit.payer, credit.amount)
    log PaymentRefunded(payer=credit.payer, provider=credit.provider, nonce=credit.nonce, amount=credit.amount, fee=fee)


# ################################################################
#                    PREPAID DEPOSITS AND CHARGES                #
# ################################################################

@external
@nonreentrant
def deposit(amount: uint256, beneficiary: address):
    """
    @dev Deposits `amount` of the caller's USDC (approved beforehand) as
         prepaid balance of `beneficiary` (the caller, or anyone: a grant).
    @param amount The amount in atomic units.
    @param beneficiary The consumer credited.
    """
    pausable._require_not_paused()
    assert amount > 0, "escrow: zero amount"
    assert beneficiary != empty(address), "escrow: zero beneficiary"
    assert beneficiary != self, "escrow: escrow as beneficiary"
    assert extcall IERC20(usdc).transferFrom(msg.sender, self, amount, default_return_value=True), "escrow: transfer failed"
    self._credit_deposit(msg.sender, beneficiary, amount)


@external
@nonreentrant
def deposit_with_authorization(
    consumer: address,
    amount: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """
    @dev Gasless deposit: anyone (a relayer) submits the consumer's EIP-3009
         `ReceiveWithAuthorization` to this escrow, which only this contract can
         redeem, so it cannot be front-run. Credits the signer.
    @param consumer The payer, who signed and is credited.
    @param amount The amount in atomic units.
    @param valid_after The time after which the authorization is valid.
    @param valid_before The time before which the authorization is valid.
    @param nonce The authorization's 32-byte nonce.
    @param v The signature's recovery id.
    @param r The signature's r.
    @param s The signature's s.
    """
    pausable._require_not_paused()
    assert amount > 0, "escrow: zero amount"
    extcall IFiatToken(usdc).receiveWithAuthorization(consumer, self, amount, valid_after, valid_before, nonce, v, r, s)
    self._credit_deposit(msg.sender, consumer, amount)


@external
def request_withdrawal(amount: uint256):
    """
    @dev Starts a withdrawal of `amount` of the caller's deposit, possible after
         `withdrawal_delay`. Replaces any pending request. Charges already served
         can still settle against the deposit meanwhile.
    @param amount The amount in atomic units.
    """
    self._request_withdrawal(msg.sender, amount)


@external
def cancel_withdrawal():
    """
    @dev Cancels the caller's pending withdrawal.
    """
    self._cancel_withdrawal(msg.sender)


@external
@nonreentrant
def withdraw() -> uint256:
    """
    @dev Completes the caller's pending withdrawal once unlocked: pays out the
         requested amount, or what is left of the deposit if charges settled
         meanwhile. Works while paused.
    @return uint256 The amount paid out.
    """
    return self._withdraw(msg.sender, 0)


@external
@nonreentrant
def settle_charges(
    permission: SpendPermission,
    signature: Bytes[65],
    reference: bytes32,
    charges: DynArray[uint256, MAX_CHARGES],
    markup: uint256,
):
    """
    @dev Settles captured charges of prepaid calls under a consumer-signed
         permission, in one transaction for many calls and providers. The caller
         must be an operator and the permission's spender.
    @notice Idempotent: each `reference` settles once, so a retry after a crash
            is refused with "escrow: reference already settled" once the first
            attempt landed. Consecutive charges to one provider are booked
            together, with one `Credited` event per run. The consumer pays the
            charges plus `markup`, which is credited whole (no platform fee) to
            the permission's developer, with its own `Credited` event.
    @param permission The consumer's spend permission.
    @param signature The consumer's EIP-712 signature of it (EOA or ERC-1271).
    @param reference The relay's id of this batch, unique, echoed in the events.
    @param charges The charges, each `provider << 96 | amount`: the base cost of
           calls served by that provider (the relay sums a provider's calls).
    @param markup The developer's markup on these calls, at most
           `permission.max_markup_bps` of the charges' sum.
    """
    self._check_operator()
    pausable._require_not_paused()
    self._settle(permission, signature, reference, charges, markup)


@external
@nonreentrant
def settle_charges_batch(batches: DynArray[ChargeBatch, MAX_CHARGE_BATCHES]):
    """
    @dev `settle_charges` for several permissions in one transaction.
    @param batches Each permission with its signature, reference and charges.
    """
    self._check_operator()
    pausable._require_not_paused()
    for batch: ChargeBatch in batches:
        self._settle(batch.permission, batch.signature, batch.reference, batch.charges, batch.markup)


# ################################################################
#                       CLAIMS AND DELEGATIONS                   #
# ################################################################

@external
@nonreentrant
def claim(amount: uint256, payee: address):
    """
    @dev Pays `amount` of the caller's earnings to `payee`. Works while paused.
    @param amount The amount in atomic units.
    @param payee The receiver (the provider itself, or anyone it names).
    """
    assert amount > 0, "escrow: zero amount"
    self._check_payee(payee)
    self._debit_earnings(msg.sender, amount)
    self._transfer_out(payee, amount)
    log Claimed(provider=msg.sender, payee=payee, delegation=empty(bytes32), amount=amount, relayer=empty(address), relayer_fee=0)


@external
@nonreentrant
def claim_with_delegation(delegation: Delegation, signature: Bytes[65], amount: uint256):
    """
    @dev Claims `amount` of a provider's earnings under its signed delegation,
         for a provider without ETH: any relayer (or only `delegate`, if set)
         submits it and receives the signed relayer fee pro rata,
         `relayer_fee * amount // max_amount`; the payee gets the rest. Works
         while paused.
    @param delegation The provider's delegation.
    @param signature The provider's EIP-712 signature of it (EOA or ERC-1271).
    @param amount The amount taken from the earnings, relayer fee included.
    """
    assert delegation.delegate == empty(address) or delegation.delegate == msg.sender, "escrow: not the delegate"
    assert block.timestamp < delegation.valid_until, "escrow: delegation expired"
    self._check_payee(delegation.payee)
    assert amount > 0, "escrow: zero amount"
    assert delegation.relayer_fee < delegation.max_amount, "escrow: relayer fee not below cap"
    digest: bytes32 = self._hash_delegation(delegation)
    assert not self.revoked[delegation.provider][digest], "escrow: delegation revoked"
    claimed: uint256 = self.delegation_claimed[digest] + amount
    assert claimed <= delegation.max_amount, "escrow: delegation cap exceeded"
    assert signature_checker._is_valid_signature_now(delegation.provider, digest, signature), "escrow: invalid signature"
    self.delegation_claimed[digest] = claimed
    self._debit_earnings(delegation.provider, amount)
    # Below `amount`: `relayer_fee < max_amount` and `amount <= max_amount`.
    fee: uint256 = delegation.relayer_fee * amount // delegation.max_amount
    if fee > 0:
        self._transfer_out(msg.sender, fee)
    self._transfer_out(delegation.payee, amount - fee)
    log Claimed(
        provider=delegation.provider,
        payee=delegation.payee,
        delegation=digest,
        amount=amount,
        relayer=msg.sender,
        relayer_fee=fee,
    )


# ################################################################
#                           REVOCATIONS                          #
# ################################################################

@external
def revoke(item: bytes32):
    """
    @dev Revokes one of the caller's signed items (a permission or delegation
         digest, see `hash_permission` and `hash_delegation`).
    @param item The EIP-712 digest of the item.
    """
    self._revoke(msg.sender, item)


@external
def revoke_permission(permission: SpendPermission):
    """
    @dev Revokes a spend permission; only its consumer can.
    @param permission The permission.
    """
    assert msg.sender == permission.consumer, "escrow: not the consumer"
    self._revoke(msg.sender, self._hash_permission(permission))


@external
def revoke_delegation(delegation: Delegation):
    """
    @dev Revokes a delegation; only its provider can.
    @param delegation The delegation.
    """
    assert msg.sender == delegation.provider, "escrow: not the provider"
    self._revoke(msg.sender, self._hash_delegation(delegation))


@external
def revoke_with_signature(account: address, item: bytes32, signature: Bytes[65]):
    """
    @dev Gasless revocation: anyone submits `account`'s EIP-712 signature of
         `Revocation(account, item)`.
    @param account The signer of the revoked item.
    @param item The EIP-712 digest of the item.
    @param signature The account's signature (EOA or ERC-1271).
    """
    digest: bytes32 = self._hash_revocation(account, item)
    assert signature_checker._is_valid_signature_now(account, digest, signature), "escrow: invalid signature"
    self._revoke(account, item)


# ################################################################
#                       ETH-FREE EXITS                             #
# ################################################################

@external
def request_withdrawal_with_signature(consumer: address, amount: uint256, deadline: uint256, signature: Bytes[65]):
    """
    @dev `request_withdrawal` for a consumer without ETH: any relayer submits
         the consumer's signed `RequestWithdrawal`. No fee is taken here: a fee
         out of the deposit before the delay would let a consumer empty it
         ahead of charges already served; the relayer is paid by `Withdraw`.
    @param consumer The consumer, who signed.
    @param amount The amount in atomic units.
    @param deadline The time after which the signature is void.
    @param signature The consumer's EIP-712 signature (EOA or ERC-1271).
    """
    self._use_signature(REQUEST_WITHDRAWAL_TYPEHASH, consumer, amount, deadline, signature)
    self._request_withdrawal(consumer, amount)


@external
def cancel_withdrawal_with_signature(consumer: address, deadline: uint256, signature: Bytes[65]):
    """
    @dev `cancel_withdrawal` for a consumer without ETH: any relayer submits
         the consumer's signed `CancelWithdrawal` of the pending amount (a
         signature for another amount does not verify, so a cancellation
         signed for one request never cancels a later one).
    @param consumer The consumer, who signed.
    @param deadline The time after which the signature is void.
    @param signature The consumer's EIP-712 signature (EOA or ERC-1271).
    """
    self._use_signature(CANCEL_WITHDRAWAL_TYPEHASH, consumer, self.withdrawals[consumer].amount, deadline, signature)
    self._cancel_withdrawal(consumer)


@external
@nonreentrant
def withdraw_with_signature(consumer: address, relayer_fee: uint256, deadline: uint256, signature: Bytes[65]) -> uint256:
    """
    @dev `withdraw` for a consumer without ETH: any relayer submits the
         consumer's signed `Withdraw` and receives `relayer_fee` out of the
         amount paid out; the consumer gets the rest. Works while paused.
    @param consumer The consumer, who signed.
    @param relayer_fee The caller's fee in atomic units, at most the amount
           paid out.
    @param deadline The time after which the signature is void.
    @param signature The consumer's EIP-712 signature (EOA or ERC-1271).
    @return uint256 The amount paid out, relayer fee included.
    """
    self._use_signature(WITHDRAW_TYPEHASH, consumer, relayer_fee, deadline, signature)
    return self._withdraw(consumer, relayer_fee)


# ################################################################
#                              OWNER                             #
# ################################################################

@external
def set_operator(operator: address, status: bool):
    """
    @dev Grants or removes the operator (settling key) role.
    @param operator The address.
    @param status True to grant.
    """
    ownable._check_owner()
    assert operator != empty(address), "escrow: zero operator"
    self.is_operator[operator] = status
    log OperatorSet(operator=operator, status=status)


@external
def set_fee_bps(fee_bps_: uint256):
    """
    @dev Sets the platform fee for payments credited from now on.
    @param fee_bps_ The fee in basis points, at most `MAX_FEE_BPS`.
    """
    ownable._check_owner()
    assert fee_bps_ <= MAX_FEE_BPS, "escrow: fee above cap"
    self.fee_bps = fee_bps_
    log FeeSet(fee_bps=fee_bps_)


@external
def pause():
    """
    @dev Stops deposits and settlements. Claims, withdrawals, refunds and
         revocations keep working.
    """
    ownable._check_owner()
    pausable._pause()


@external
def unpause():
    """
    @dev Lifts the pause.
    """
    ownable._check_owner()
    pausable._unpause()


@external
@nonreentrant
def withdraw_platform_fees(to: address, amount: uint256):
    """
    @dev Pays out accumulated platform fees.
    @param to The receiver.
    @param amount The amount in atomic units.
    """
    ownable._check_owner()
    self._check_payee(to)
    assert amount > 0, "escrow: zero amount"
    assert amount <= self._platform_fees(), "escrow: amount exceeds fees"
    self._update_totals(0, 0, 0, 0, 0, amount)
    self._transfer_out(to, amount)
    log PlatformFeesWithdrawn(to=to, amount=amount)


@external
@nonreentrant
def sweep(token: address, to: address) -> uint256:
    """
    @dev Moves tokens that reached the escrow outside its own calls (mistaken
         transfers, front-run x402 authorizations, which `reconcile_authorization`
         pays the provider for out of the operator's funds): for USDC only the
         excess over `liabilities()`, for any other token the whole balance.
    @param token The token.
    @param to The receiver.
    @return uint256 The amount swept.
    """
    ownable._check_owner()
    self._check_payee(to)
    balance: uint256 = staticcall IERC20(token).balanceOf(self)
    amount: uint256 = balance
    if token == usdc:
        amount = balance - self._liabilities()
    assert amount > 0, "escrow: nothing to sweep"
    assert extcall IERC20(token).transfer(to, amount, default_return_value=True), "escrow: transfer failed"
    log Swept(token=token, to=to, amount=amount)
    return amount


# ################################################################
#                              VIEWS                             #
# ################################################################

@external
@view
def liabilities() -> uint256:
    """
    @dev Everything this escrow owes: deposits, earnings and platform fees.
    @return uint256 The amount in atomic units.
    """
    return self._liabilities()


@external
@view
def hash_permission(permission: SpendPermission) -> bytes32:
    """
    @dev The EIP-712 digest a consumer signs for `permission`.
    @param permission The permission.
    @return bytes32 The digest.
    """
    return self._hash_permission(permission)


@external
@view
def hash_delegation(delegation: Delegation) -> bytes32:
    """
    @dev The EIP-712 digest a provider signs for `delegation`.
    @param delegation The delegation.
    @return bytes32 The digest.
    """
    return self._hash_delegation(delegation)


@external
@view
def hash_revocation(account: address, item: bytes32) -> bytes32:
    """
    @dev The EIP-712 digest an account signs to revoke `item` gaslessly.
    @param account The signer.
    @param item The revoked item's digest.
    @return bytes32 The digest.
    """
    return self._hash_revocation(account, item)


@external
@view
def permission_remaining(permission: SpendPermission) -> uint256:
    """
    @dev What can still be charged under `permission` now: zero if revoked or
         outside its window, else the unspent allowance (the deposit may be
         lower).
    @param permission The permission.
    @return uint256 The amount in atomic units.
    """
    digest: bytes32 = self._hash_permission(permission)
    if self.revoked[permission.consumer][digest]:
        return 0
    if block.timestamp < permission.valid_after or block.timestamp >= permission.valid_until:
        return 0
    return permission.allowance - min(self.permission_spent[digest], permission.allowance)


@external
@view
def delegation_remaining(delegation: Delegation) -> uint256:
    """
    @dev What can still be claimed under `delegation` now: zero if revoked or
         expired, else its unused cap (the earnings may be lower).
    @param delegation The delegation.
    @return uint256 The amount in atomic units.
    """
    digest: bytes32 = self._hash_delegation(delegation)
    if self.revoked[delegation.provider][digest] or block.timestamp >= delegation.valid_until:
        return 0
    return delegation.max_amount - min(self.delegation_claimed[digest], delegation.max_amount)


@external
@view
def total_deposits() -> uint256:
    """
    @dev Sum of all consumers' deposits.
    @return uint256 The amount in atomic units.
    """
    return self._totals >> 2 * _TOTAL_BITS


@external
@view
def total_earnings() -> uint256:
    """
    @dev Sum of all providers' unclaimed earnings.
    @return uint256 The amount in atomic units.
    """
    return (self._totals >> _TOTAL_BITS) & _TOTAL_MASK


@external
@view
def platform_fees() -> uint256:
    """
    @dev Platform fees not yet withdrawn.
    @return uint256 The amount in atomic units.
    """
    return self._platform_fees()


@external
@pure
def payment_reference(payer: address, nonce: bytes32) -> bytes32:
    """
    @dev The key of an x402 payment in `reconciled` and `refunded`.
    @param payer The authorization's payer.
    @param nonce The authorization's nonce.
    @return bytes32 The reference.
    """
    return self._payment_reference(payer, nonce)


@external
@pure
def hash_credit(credit: Credit) -> bytes32:
    """
    @dev The Merkle leaf of a credited x402 payment.
    @param credit The payment as credited.
    @return bytes32 The leaf.
    """
    return self._hash_credit(credit.payer, credit.nonce, credit.provider, credit.amount, credit.fee_bps)


@external
@view
def fee_of(amount: uint256) -> uint256:
    """
    @dev The platform fee a payment of `amount` would be split with now.
    @param amount The amount in atomic units.
    @return uint256 The fee; the provider gets the rest.
    """
    return self._split(amount)


# ################################################################
#                        INTERNAL FUNCTIONS                      #
# ################################################################

@internal
@view
def _check_operator():
    """
    @dev Throws unless the caller is an operator.
    """
    assert self.is_operator[msg.sender], "escrow: caller is not an operator"


@internal
@view
def _check_provider(provider: address):
    """
    @dev Throws on a provider that could never claim what it is credited.
    """
    assert provider != empty(address), "escrow: zero provider"
    assert provider != self, "escrow: escrow as provider"


@internal
@view
def _check_payee(payee: address):
    """
    @dev Throws on a receiver that would strand the funds paid to it.
    """
    assert payee != empty(address), "escrow: zero payee"
    assert payee != self, "escrow: escrow as payee"


@internal
@view
def _check_payment(payment: Payment):
    """
    @dev Throws on a payment that could never be credited.
    """
    assert payment.amount > 0, "escrow: zero amount"
    assert payment.charged <= payment.amount, "escrow: charged above value"
    self._check_provider(payment.provider)


@internal
@view
def _split(amount: uint256) -> uint256:
    """
    @dev The platform fee of `amount` at the current rate.
    """
    return amount * self.fee_bps // MAX_BPS


@internal
@view
def _liabilities() -> uint256:
    """
    @dev Sum of all that is owed.
    """
    packed: uint256 = self._totals
    return (packed >> 2 * _TOTAL_BITS) + ((packed >> _TOTAL_BITS) & _TOTAL_MASK) + (packed & _TOTAL_MASK)


@internal
@view
def _platform_fees() -> uint256:
    """
    @dev Unwithdrawn platform fees, from the packed totals.
    """
    return self._totals & _TOTAL_MASK


@internal
def _update_totals(
    deposits_in: uint256,
    deposits_out: uint256,
    earnings_in: uint256,
    earnings_out: uint256,
    fees_in: uint256,
    fees_out: uint256,
):
    """
    @dev Applies one change to the packed totals in a single read and write.
         Underflow reverts (checked arithmetic); each sum must fit its field.
    """
    packed: uint256 = self._totals
    deposits_: uint256 = (packed >> 2 * _TOTAL_BITS) + deposits_in - deposits_out
    earnings_: uint256 = ((packed >> _TOTAL_BITS) & _TOTAL_MASK) + earnings_in - earnings_out
    fees_: uint256 = (packed & _TOTAL_MASK) + fees_in - fees_out
    assert max(deposits_, max(earnings_, fees_)) <= _TOTAL_MASK, "escrow: totals overflow"
    self._totals = (deposits_ << 2 * _TOTAL_BITS) | (earnings_ << _TOTAL_BITS) | fees_


@internal
@pure
def _payment_reference(payer: address, nonce: bytes32) -> bytes32:
    """
    @dev The reference of an x402 payment.
    """
    return keccak256(abi_encode(payer, nonce))


@internal
@pure
def _hash_credit(payer: address, nonce: bytes32, provider: address, amount: uint256, fee_bps: uint256) -> bytes32:
    """
    @dev The Merkle leaf of a credited x402 payment. Its 160-byte preimage can
         never be read as a pair of 32-byte nodes.
    """
    return keccak256(abi_encode(payer, nonce, provider, amount, fee_bps))


@internal
@pure
def _merkle_root(leaves: DynArray[bytes32, MAX_PAYMENTS]) -> bytes32:
    """
    @dev The Merkle root of `leaves` (at least one), built level by level in
         place: each pair hashed sorted (snekmate's `_hash_pair`), an odd last
         node carried up unchanged. `quotra.chain.merkle` builds the same tree
         and its proofs.
    """
    nodes: DynArray[bytes32, MAX_PAYMENTS] = leaves
    count: uint256 = len(nodes)
    for _: uint256 in range(MAX_PROOF_LENGTH):
        if count == 1:
            break
        parents: uint256 = unsafe_div(unsafe_add(count, 1), 2)
        for i: uint256 in range(parents, bound=MAX_PAYMENTS):
            left: uint256 = unsafe_add(i, i)
            if unsafe_add(left, 1) < count:
                nodes[i] = merkle_proof_verification._hash_pair(nodes[left], nodes[unsafe_add(left, 1)])
            else:
                nodes[i] = nodes[left]
        count = parents
    return nodes[0]


@internal
def _credit(provider: address, settlement: bytes32, amount: uint256, fee: uint256):
    """
    @dev Credits a provider its share of `amount` paid in for its calls (the
         totals are booked by the caller, once per transaction).
    """
    self.earnings[provider] += amount - fee
    log Credited(provider=provider, settlement=settlement, amount=amount, fee=fee)


@internal
@view
def _verify_paid_authorization(payment: Payment):
    """
    @dev Throws unless the payer signed a `TransferWithAuthorization` of
         `amount` to this escrow under USDC's domain and USDC marks it used
         (or cancelled: USDC does not tell the two apart).
    """
    struct_hash: bytes32 = keccak256(
        abi_encode(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH,
            payment.payer,
            self,
            payment.amount,
            payment.valid_after,
            payment.valid_before,
            payment.nonce,
        )
    )
    digest: bytes32 = message_hash_utils._to_typed_data_hash(
        staticcall IFiatToken(usdc).DOMAIN_SEPARATOR(), struct_hash
    )
    signature: Bytes[65] = concat(payment.r, payment.s, convert(payment.v, bytes1))
    assert signature_checker._is_valid_signature_now(payment.payer, digest, signature), "escrow: invalid signature"
    assert staticcall IFiatToken(usdc).authorizationState(payment.payer, payment.nonce), "escrow: authorization not used"


@internal
def _credit_deposit(sender: address, beneficiary: address, amount: uint256):
    """
    @dev Books a deposit that has arrived.
    """
    self.deposits[beneficiary] += amount
    self._update_totals(amount, 0, 0, 0, 0, 0)
    log Deposited(sender=sender, beneficiary=beneficiary, amount=amount)


@internal
@view
def _check_permission(permission: SpendPermission, signature: Bytes[65]) -> bytes32:
    """
    @dev Throws unless the caller may charge under `permission` now; returns
         its digest.
    """
    assert msg.sender == permission.spender, "escrow: caller is not the spender"
    assert block.timestamp >= permission.valid_after, "escrow: permission not yet valid"
    assert block.timestamp < permission.valid_until, "escrow: permission expired"
    digest: bytes32 = self._hash_permission(permission)
    assert not self.revoked[permission.consumer][digest], "escrow: permission revoked"
    assert signature_checker._is_valid_signature_now(permission.consumer, digest, signature), "escrow: invalid signature"
    return digest


@internal
def _take_reference(reference: bytes32):
    """
    @dev Marks a charge batch's reference settled; throws if it already was.
    """
    assert not self.settled_references[reference], "escrow: reference already settled"
    self.settled_references[reference] = True


@internal
def _credit_charges(charges: DynArray[uint256, MAX_CHARGES], reference: bytes32) -> (uint256, uint256):
    """
    @dev Credits each packed charge's provider share, one run of consecutive
         charges to a provider at a time; returns the total charged and the
         total fee. Unchecked arithmetic is safe: amounts are below 2**96,
         `fee_bps` below `MAX_BPS`, and at most `MAX_CHARGES` entries sum far
         below 2**256 (the deposit check then bounds the total).
    """
    bps: uint256 = self.fee_bps
    total: uint256 = 0
    total_fee: uint256 = 0
    run: Run = empty(Run)
    for packed: uint256 in charges:
        provider: address = convert(packed >> _CHARGE_AMOUNT_BITS, address)
        self._check_provider(provider)
        amount: uint256 = packed & _CHARGE_AMOUNT_MASK
        fee: uint256 = unsafe_div(unsafe_mul(amount, bps), MAX_BPS)
        if provider != run.provider:
            if run.provider != empty(address):
                self._credit(run.provider, reference, run.amount, run.fee)
            run = Run(provider=provider, amount=0, fee=0)
        run.amount = unsafe_add(run.amount, amount)
        run.fee = unsafe_add(run.fee, fee)
        total = unsafe_add(total, amount)
        total_fee = unsafe_add(total_fee, fee)
    if run.provider != empty(address):
        self._credit(run.provider, reference, run.amount, run.fee)
    return total, total_fee


@internal
def _settle(
    permission: SpendPermission,
    signature: Bytes[65],
    reference: bytes32,
    charges: DynArray[uint256, MAX_CHARGES],
    markup: uint256,
):
    """
    @dev Settles one permission's batch: credits the providers' shares and the
         developer's markup, debits the whole from the consumer's deposit and
         permission, and books it in the totals. The markup is bounded by the
         rate the consumer signed, over the batch's base total.
    """
    digest: bytes32 = self._check_permission(permission, signature)
    self._take_reference(reference)
    total: uint256 = 0
    total_fee: uint256 = 0
    total, total_fee = self._credit_charges(charges, reference)
    assert total > 0, "escrow: zero amount"
    if markup > 0:
        assert markup * MAX_BPS <= total * permission.max_markup_bps, "escrow: markup above permission"
        assert permission.developer not in [empty(address), self], "escrow: invalid developer"
        self._credit(permission.developer, reference, markup, 0)
        total += markup
    spent: uint256 = self.permission_spent[digest] + total
    assert spent <= permission.allowance, "escrow: allowance exceeded"
    assert total <= self.deposits[permission.consumer], "escrow: deposit exceeded"
    self.permission_spent[digest] = spent
    self.deposits[permission.consumer] -= total
    self._update_totals(0, total, total - total_fee, 0, total_fee, 0)
    log ChargesSettled(
        consumer=permission.consumer,
        permission=digest,
        reference=reference,
        amount=total,
        fee=total_fee,
        markup=markup,
        count=len(charges),
        fee_bps=self.fee_bps,
    )


@internal
def _debit_earnings(provider: address, amount: uint256):
    """
    @dev Takes `amount` from a provider's earnings.
    """
    assert amount <= self.earnings[provider], "escrow: amount exceeds earnings"
    self.earnings[provider] -= amount
    self._update_totals(0, 0, 0, amount, 0, 0)


@internal
def _revoke(account: address, item: bytes32):
    """
    @dev Marks `item` of `account` revoked.
    """
    self.revoked[account][item] = True
    log Revoked(account=account, item=item)


@internal
def _transfer_out(to: address, amount: uint256):
    """
    @dev Pays USDC out of the escrow.
    """
    assert extcall IERC20(usdc).transfer(to, amount, default_return_value=True), "escrow: transfer failed"


@internal
@view
def _hash_permission(permission: SpendPermission) -> bytes32:
    """
    @dev EIP-712 digest of a permission under this escrow's domain.
    """
    return eip712_domain_separator._hash_typed_data_v4(
        keccak256(
            abi_encode(
                SPEND_PERMISSION_TYPEHASH,
                permission.consumer,
                permission.spender,
                permission.allowance,
                permission.valid_after,
                permission.valid_until,
                permission.salt,
                permission.developer,
                permission.max_markup_bps,
            )
        )
    )


@internal
@view
def _hash_delegation(delegation: Delegation) -> bytes32:
    """
    @dev EIP-712 digest of a delegation under this escrow's domain.
    """
    return eip712_domain_separator._hash_typed_data_v4(
        keccak256(
            abi_encode(
                DELEGATION_TYPEHASH,
                delegation.provider,
                delegation.delegate,
                delegation.payee,
                delegation.max_amount,
                delegation.relayer_fee,
                delegation.valid_until,
                delegation.salt,
            )
        )
    )


@internal
@view
def _hash_revocation(account: address, item: bytes32) -> bytes32:
    """
    @dev EIP-712 digest of a gasless revocation under this escrow's domain.
    """
    return eip712_domain_separator._hash_typed_data_v4(keccak256(abi_encode(REVOCATION_TYPEHASH, account, item)))


@internal
def _use_signature(typehash: bytes32, consumer: address, amount: uint256, deadline: uint256, signature: Bytes[65]):
    """
    @dev Throws unless `consumer` signed the withdrawal step `typehash` of
         `amount` with its current nonce, and `deadline` has not passed; uses
         the nonce (before the ERC-1271 call).
    """
    assert block.timestamp <= deadline, "escrow: signature expired"
    nonce: uint256 = self.withdrawal_nonces[consumer]
    self.withdrawal_nonces[consumer] = nonce + 1
    digest: bytes32 = eip712_domain_separator._hash_typed_data_v4(
        keccak256(abi_encode(typehash, consumer, amount, nonce, deadline))
    )
    assert signature_checker._is_valid_signature_now(consumer, digest, signature), "escrow: invalid signature"


@internal
def _request_withdrawal(consumer: address, amount: uint256):
    """
    @dev Starts a withdrawal of `amount` of `consumer`'s deposit.
    """
    assert amount > 0, "escrow: zero amount"
    assert amount <= self.deposits[consumer], "escrow: amount exceeds deposit"
    unlock_at: uint256 = block.timestamp + withdrawal_delay
    self.withdrawals[consumer] = WithdrawalRequest(amount=amount, unlock_at=unlock_at)
    log WithdrawalRequested(consumer=consumer, amount=amount, unlock_at=unlock_at)


@internal
def _cancel_withdrawal(consumer: address):
    """
    @dev Cancels `consumer`'s pending withdrawal.
    """
    assert self.withdrawals[consumer].amount > 0, "escrow: no pending withdrawal"
    self.withdrawals[consumer] = empty(WithdrawalRequest)
    log WithdrawalCancelled(consumer=consumer)


@internal
def _withdraw(consumer: address, relayer_fee: uint256) -> uint256:
    """
    @dev Completes `consumer`'s unlocked withdrawal: the requested amount, or
         what is left of the deposit if charges settled meanwhile, paid to the
         consumer but for `relayer_fee`, paid to the caller.
    """
    request: WithdrawalRequest = self.withdrawals[consumer]
    assert request.amount > 0, "escrow: no pending withdrawal"
    assert block.timestamp >= request.unlock_at, "escrow: withdrawal locked"
    amount: uint256 = min(request.amount, self.deposits[consumer])
    assert relayer_fee <= amount, "escrow: fee exceeds withdrawal"
    self.withdrawals[consumer] = empty(WithdrawalRequest)
    self.deposits[consumer] -= amount
    self._update_totals(0, amount, 0, 0, 0, 0)
    if relayer_fee > 0:
        self._transfer_out(msg.sender, relayer_fee)
    if amount > relayer_fee:
        self._transfer_out(consumer, amount - relayer_fee)
    log Withdrawn(consumer=consumer, amount=amount)
    return amount

