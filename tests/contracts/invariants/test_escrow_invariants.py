"""Stateful fuzzing of QuotraEscrow (Curve-style `RuleBasedStateMachine`).

Every rule sends a real transaction to a private anvil, from one of eleven actors (owner, operator,
relayer, stranger, three consumers, three providers, a payee). A Python model predicts each outcome:
on success the chain must match the model, on a predicted revert the transaction must revert with
exactly the predicted reason and change nothing. Invariants (solvency, liabilities, caps, splits,
refunds only of what was credited, bounded relayer fees, conserved supply) are read from the chain
after every step.

The privileged actors play dishonest too: the operator settles, reconciles and refunds arbitrary
references (cancelled, front-run, already credited, with another provider or fee, unknown roots,
wrong proofs) and replays charge batches; relayers split delegated claims into many small ones; the
owner sweeps. The design's properties (DESIGN.md section 3) are asserted in the invariant whatever
they do.

    FUZZ_EXAMPLES=1000 .venv/bin/pytest tests/contracts/invariants     # a long run
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from escrow_harness import CHAIN_ID, Abi, Chain, Receipt, anvil, compile_contracts
from eth_utils import keccak
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from quotra.chain import eip712, merkle

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
STEPS = int(os.environ.get("FUZZ_STEPS", "40"))
# pytest-timeout's 300 s default would cut a long run short; scale it with the run instead.
pytestmark = pytest.mark.timeout(max(300, FUZZ_EXAMPLES * STEPS))

ZERO = "0x" + "00" * 20
MAX_UINT = 2**256 - 1
MAX_BPS = 10_000
MAX_FEE_BPS = 2_000
CHARGE_AMOUNT_BITS = 96
WITHDRAWAL_DELAY = 3_600
REFUND_WINDOW = 86_400
GENESIS_TIME = 1_900_000_000

ACTORS = (
    "owner",
    "operator",
    "relayer",
    "stranger",
    "consumer0",
    "consumer1",
    "consumer2",
    "provider0",
    "provider1",
    "provider2",
    "payee",
)
CONSUMERS = ("consumer0", "consumer1", "consumer2")
PROVIDERS = ("provider0", "provider1", "provider2")
# The operator holds USDC too: it pays for the front-run payments it reconciles.
MINTS = {
    "consumer0": 5_000_000,
    "consumer1": 5_000_000,
    "consumer2": 5_000_000,
    "stranger": 3_000_000,
    "operator": 3_000_000,
}

PAUSED = "pausable: contract is paused"
NOT_OWNER = "ownable: caller is not the owner"
NOT_OPERATOR = "escrow: caller is not an operator"
ZERO_AMOUNT = "escrow: zero amount"
NO_BALANCE = "erc20: transfer amount exceeds balance"

# Strategies. Small amounts exercise the fee's rounding, large ones the balances.
amounts = st.one_of(st.integers(1, 30), st.integers(1, 2_000_000))
amounts_or_zero = st.one_of(st.just(0), amounts)
consumers = st.sampled_from(CONSUMERS)
providers = st.sampled_from(PROVIDERS)
# Mostly the operator, sometimes a stranger (the access checks).
operator_or_stranger = st.sampled_from(("operator",) * 5 + ("stranger",))
owner_or_stranger = st.sampled_from(("owner",) * 5 + ("stranger",))
# True one time in ten, shrinking to False (`st.integers` would draw 0 far more often).
rarely = st.sampled_from((False,) * 9 + (True,))
# How much of a balance an amount takes: all of it, half, one unit over, or a random amount.
portions = st.sampled_from(("all", "half", "over", "random"))
charges_lists = st.lists(
    st.tuples(st.sampled_from(PROVIDERS * 6 + ("zero",)), st.one_of(st.just(0), amounts)),
    min_size=1,
    max_size=4,
)
# What an x402 call was charged of its authorization: all of it (flat price), part (per-token
# usage; the rest goes to the payer's deposit), nothing, or one unit over (refused).
usages = st.sampled_from(("all", "all", "part", "part", "none", "over"))
# A charge batch's developer markup: none, the most its permission allows, one unit over, or any.
markups = st.sampled_from(("none", "none", "max", "max", "over", "random"))


def first(*checks: tuple[bool, str]) -> str | None:
    """The reason of the first failing check, in the contract's order; None if all pass."""
    return next((reason for failed, reason in checks if failed), None)


def portion(kind: str, available: int, random_amount: int) -> int:
    return {"all": available, "half": available // 2, "over": available + 1, "random": random_amount}[kind]


# ---------------------------------------------------------------- signed items


@dataclass(frozen=True)
class CreditRecord:
    """How the escrow credited an x402 payment: by whom, the leaf's provider and fee, the split,
    and what a refund must present (its settlement root and proof)."""

    how: str  # "settle" | "reconcile"
    provider: str
    fee_bps: int
    fee: int
    share: int
    root: bytes
    proof: tuple[bytes, ...]


@dataclass(eq=False)
class Auth:
    """An x402 payment: an EIP-3009 TransferWithAuthorization to the escrow."""

    label: str
    payer: str
    provider: str
    amount: int
    charged: int  # what the call cost; the rest of `amount` goes to the payer's deposit
    valid_after: int
    valid_before: int
    nonce: bytes
    v: int
    r: bytes
    s: bytes
    forged: bool
    # Model bookkeeping: every credit (settle or reconcile) and every refund of this payment.
    credits: list[CreditRecord] = field(default_factory=list)
    refunds: list[CreditRecord] = field(default_factory=list)
    funds_arrived: bool = False
    cancelled: bool = False

    def __repr__(self) -> str:
        return (
            f"<{self.label} {self.payer}->{self.provider} amount={self.amount} charged={self.charged} "
            f"window=({self.valid_after},{self.valid_before}){' forged' if self.forged else ''}>"
        )


@dataclass(eq=False)
class Perm:
    """A consumer-signed SpendPermission."""

    label: str
    message: dict[str, Any]
    signature: bytes
    digest: bytes
    forged: bool

    def __repr__(self) -> str:
        m = self.message
        return (
            f"<{self.label} {m['consumer_name']} spender={m['spender_name']} allowance={m['allowance']} "
            f"window=[{m['valid_after']},{m['valid_until']}) developer={m['developer_name']} "
            f"markup<={m['max_markup_bps']}bps{' forged' if self.forged else ''}>"
        )


@dataclass(eq=False)
class Deleg:
    """A provider-signed Delegation."""

    label: str
    message: dict[str, Any]
    names: dict[str, str]
    signature: bytes
    digest: bytes
    forged: bool

    def __repr__(self) -> str:
        m = self.message
        return (
            f"<{self.label} {self.names['provider']} delegate={self.names['delegate']} "
            f"payee={self.names['payee']} max={m['max_amount']} relayer_fee={m['relayer_fee']} "
            f"until={m['valid_until']}{' forged' if self.forged else ''}>"
        )


# ---------------------------------------------------------------- deployment (once per session)


@dataclass
class Deployment:
    chain: Chain
    usdc: str
    escrow: str
    U: Abi
    E: Abi
    addr: dict[str, str]
    key: dict[str, bytes]
    escrow_domain: eip712.Domain
    usdc_domain: eip712.Domain
    genesis_time: int
    snapshot: str = ""
    examples: int = 0
    steps: int = 0
    # (function, "ok" or the revert reason) -> count, to see what the fuzzer actually reached.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)


def deploy(chain: Chain) -> Deployment:
    (usdc_abi, usdc_code), (escrow_abi, escrow_code) = compile_contracts(
        "contracts/test/MockUSDC.vy", "contracts/QuotraEscrow.vy"
    )
    U, E = Abi(usdc_abi), Abi(escrow_abi)
    addr = dict(zip(ACTORS, chain.accounts, strict=False)) | {"zero": ZERO}
    key = dict(zip(ACTORS, chain.keys, strict=False))
    now = GENESIS_TIME
    usdc = chain.deploy(addr["owner"], usdc_code, U.ctor_types, [], now)
    escrow = chain.deploy(
        addr["owner"], escrow_code, E.ctor_types, [usdc, WITHDRAWAL_DELAY, REFUND_WINDOW], now + 1
    )
    now += 2
    setup = [("owner", escrow, E.encode("set_operator", addr["operator"], True))]
    setup += [("owner", usdc, U.encode("mint", addr[who], amount)) for who, amount in MINTS.items()]
    setup += [(who, usdc, U.encode("approve", escrow, MAX_UINT)) for who in MINTS]
    for sender, to, data in setup:
        assert chain.send(addr[sender], to, data, now).status
        now += 1
    d = Deployment(
        chain,
        usdc,
        escrow,
        U,
        E,
        addr,
        key,
        eip712.escrow_domain(CHAIN_ID, escrow),
        eip712.Domain("USDC", "2", CHAIN_ID, usdc),
        now,
    )
    # The Python EIP-712 and the contract must agree, or every signature check below is moot.
    assert chain.call(usdc, U.encode("DOMAIN_SEPARATOR")) == "0x" + d.usdc_domain.separator.hex()
    d.snapshot = chain.rpc("evm_snapshot")
    return d


@pytest.fixture(scope="module")
def deployment():
    with anvil() as chain:
        yield deploy(chain)


# ---------------------------------------------------------------- the machine


class EscrowMachine(RuleBasedStateMachine):
    """Drives QuotraEscrow through random sequences of every entry point."""

    d: Deployment  # set by the test before hypothesis builds instances

    auths = Bundle("auths")
    perms = Bundle("perms")
    delegs = Bundle("delegs")

    def __init__(self) -> None:
        super().__init__()
        d = self.d
        chain = d.chain
        assert chain.rpc("evm_revert", d.snapshot)
        d.snapshot = chain.rpc("evm_snapshot")
        d.examples += 1
        self.chain = chain
        self.now = d.genesis_time  # the timestamp of the next block
        self.counter = itertools.count()
        # The model.
        self.bal = {d.addr[a]: MINTS.get(a, 0) for a in ACTORS} | {d.escrow: 0}
        self.supply = sum(MINTS.values())
        self.auth_used: set[tuple[str, bytes]] = set()  # USDC authorizationState (used or cancelled)
        self.fee_bps = 1_000
        self.paused = False
        self.deposits = dict.fromkeys(CONSUMERS, 0)
        self.withdrawals: dict[str, tuple[int, int]] = dict.fromkeys(CONSUMERS, (0, 0))
        self.earnings = dict.fromkeys(PROVIDERS, 0)
        self.platform_fees = 0
        self.stray = 0  # USDC held but owed to nobody: direct transfers and front-run payments
        self.spent: dict[bytes, int] = {}
        self.claimed: dict[bytes, int] = {}
        self.revoked: set[tuple[str, bytes]] = set()
        self.last_charges: tuple[Any, ...] | None = None
        self.reconciled: set[tuple[str, bytes]] = set()
        self.refunded: set[tuple[str, bytes]] = set()
        self.roots: dict[bytes, int] = {}  # settlement root -> when it was credited
        self.references: set[bytes] = set()  # charge batch references settled
        self.delegation_fees: dict[bytes, int] = {}  # relayer fees paid under each delegation
        self.all_auths: list[Auth] = []
        self.all_perms: list[Perm] = []
        self.all_delegs: list[Deleg] = []
        self.last_receive: tuple[Any, ...] | None = None

    # ------------------------------------------------------------ plumbing

    def a(self, name: str) -> str:
        return self.d.addr[name]

    def tx(self, sender: str, to: str, data: str, expect: str | None, what: str) -> Receipt:
        """Sends one transaction at `self.now` and checks it against the predicted outcome."""
        note(f"[t={self.now}] {sender}: {what} -> {'ok' if expect is None else repr(expect)}")
        r = self.chain.send(self.a(sender), to, data, self.now)
        assert r.block_timestamp == self.now
        self.now += 1
        self.d.steps += 1
        self.d.outcomes[what.split("(")[0], expect or "ok"] += 1
        if expect is None:
            assert r.status, f"{what}: unexpected revert {r.reason!r}"
        else:
            assert not r.status, f"{what}: expected revert {expect!r}, but it succeeded"
            assert r.reason == expect, f"{what}: reverted with {r.reason!r}, expected {expect!r}"
            assert not r.logs
        return r

    def escrow_tx(self, sender: str, fn: str, args: tuple[Any, ...], expect: str | None) -> Receipt:
        return self.tx(sender, self.d.escrow, self.d.E.encode(fn, *args), expect, f"{fn}{self._short(args)}")

    def usdc_tx(self, sender: str, fn: str, args: tuple[Any, ...], expect: str | None) -> Receipt:
        return self.tx(
            sender, self.d.usdc, self.d.U.encode(fn, *args), expect, f"usdc.{fn}{self._short(args)}"
        )

    def _short(self, args: Any) -> str:
        """Arguments for `note`: actor names for addresses, short hex for bytes."""
        names = {v: k for k, v in self.d.addr.items()} | {self.d.escrow: "escrow", self.d.usdc: "usdc"}

        def show(value: Any) -> str:
            if isinstance(value, bytes):
                return "0x" + value.hex()[:8] + ".."
            if isinstance(value, str) and value in names:
                return names[value]
            if isinstance(value, tuple | list):
                inner = ", ".join(show(v) for v in value)
                return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
            return repr(value)

        return show(tuple(args))

    def events(self, r: Receipt) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for log in r.logs:
            if log["address"].lower() == self.d.escrow.lower():
                decoded = self.d.E.decode_log(log)
                assert decoded is not None
                out.append(decoded)
        return out

    def move(self, frm: str, to: str, amount: int) -> None:
        """A USDC transfer in the model."""
        assert self.bal[frm] >= amount
        self.bal[frm] -= amount
        self.bal[to] = self.bal.get(to, 0) + amount

    def liabilities(self) -> int:
        return sum(self.deposits.values()) + sum(self.earnings.values()) + self.platform_fees

    def split(self, amount: int, bps: int | None = None) -> tuple[int, int]:
        fee = amount * (self.fee_bps if bps is None else bps) // MAX_BPS
        return fee, amount - fee

    def sign(
        self, signer: str, domain: eip712.Domain, primary: str, message: dict[str, Any]
    ) -> eip712.Signature:
        return eip712.sign(self.d.key[signer], domain, primary, message)

    def nonce(self) -> bytes:
        return keccak(text=f"quotra-fuzz-{next(self.counter)}")

    # ------------------------------------------------------------ setup per example

    @initialize(
        target=perms,
        deposits=st.lists(st.one_of(st.just(0), st.integers(1, 3_000_000)), min_size=3, max_size=3),
        allowances=st.lists(st.integers(0, 4_000_000), min_size=3, max_size=3),
        charges=st.lists(charges_lists, min_size=3, max_size=3),
        apps=st.lists(
            st.tuples(
                st.sampled_from(("zero", *PROVIDERS, "escrow")), st.sampled_from((0, 500, 2_000, 10_000))
            ),
            min_size=3,
            max_size=3,
        ),
    )
    def setup_consumers(
        self,
        deposits: list[int],
        allowances: list[int],
        charges: list[list[tuple[str, int]]],
        apps: list[tuple[str, int]],
    ):
        """Each consumer deposits, signs a long permission for the operator (most of them for an
        app: naming a developer, a provider here, and its most markup), and is charged once (so
        that providers start with earnings and the platform with fees)."""
        perms = []
        for consumer, amount, allowance, batch, (developer, markup_bps) in zip(
            CONSUMERS, deposits, allowances, charges, apps, strict=True
        ):
            if amount:
                self.escrow_tx(consumer, "deposit", (amount, self.a(consumer)), None)
                self.move(self.a(consumer), self.d.escrow, amount)
                self.deposits[consumer] += amount
            perm = self._permission(
                consumer, "operator", allowance, 0, self.now + 10**6, False, developer, markup_bps
            )
            perms.append(perm)
            batch = [(p, a) for p, a in batch if p != "zero"]
            if 0 < sum(a for _, a in batch) <= min(amount, allowance):
                self._settle_charges("operator", perm, batch, "none", keccak(text=consumer))
        return multiple(*perms)

    # ------------------------------------------------------------ deposits and withdrawals

    @rule(
        sender=st.sampled_from((*CONSUMERS, "stranger")),
        beneficiary=st.sampled_from(CONSUMERS * 3 + ("zero", "escrow")),
        amount=amounts_or_zero,
    )
    def deposit(self, sender: str, beneficiary: str, amount: int) -> None:
        expect = first(
            (self.paused, PAUSED),
            (amount == 0, ZERO_AMOUNT),
            (beneficiary == "zero", "escrow: zero beneficiary"),
            (beneficiary == "escrow", "escrow: escrow as beneficiary"),
            (self.bal[self.a(sender)] < amount, NO_BALANCE),
        )
        to = self.d.escrow if beneficiary == "escrow" else self.a(beneficiary)
        r = self.escrow_tx(sender, "deposit", (amount, to), expect)
        if expect is None:
            self.move(self.a(sender), self.d.escrow, amount)
            self.deposits[beneficiary] += amount
            assert self.events(r) == [
                (
                    "Deposited",
                    {"sender": self.a(sender), "beneficiary": self.a(beneficiary), "amount": amount},
                )
            ]

    @rule(
        consumer=consumers,
        amount=amounts_or_zero,
        variant=st.sampled_from(("ok", "ok", "ok", "forged", "early", "late", "replay")),
    )
    def deposit_with_authorization(self, consumer: str, amount: int, variant: str) -> None:
        """A relayer submits the consumer's ReceiveWithAuthorization (gasless deposit)."""
        if variant == "replay" and self.last_receive is not None:
            consumer, args, forged = self.last_receive
        else:
            valid_after = self.now + 60 if variant == "early" else self.now - 1
            valid_before = self.now if variant == "late" else self.now + 600
            message = {
                "from": self.a(consumer),
                "to": self.d.escrow,
                "value": amount,
                "validAfter": valid_after,
                "validBefore": valid_before,
                "nonce": self.nonce(),
            }
            forged = variant == "forged"
            signer = (
                "consumer1" if forged and consumer != "consumer1" else ("consumer0" if forged else consumer)
            )
            sig = self.sign(signer, self.d.usdc_domain, "ReceiveWithAuthorization", message)
            args = (
                self.a(consumer),
                amount,
                valid_after,
                valid_before,
                message["nonce"],
                sig.v,
                sig.r,
                sig.s,
            )
        _, amount, valid_after, valid_before, nonce, *_ = args
        expect = first(
            (self.paused, PAUSED),
            (amount == 0, ZERO_AMOUNT),
            (self.now <= valid_after, "FiatTokenV2: authorization is not yet valid"),
            (self.now >= valid_before, "FiatTokenV2: authorization is expired"),
            ((self.a(consumer), nonce) in self.auth_used, "FiatTokenV2: authorization is used or canceled"),
            (forged, "FiatTokenV2: invalid signature"),
            (self.bal[self.a(consumer)] < amount, NO_BALANCE),
        )
        r = self.escrow_tx("relayer", "deposit_with_authorization", args, expect)
        if expect is None:
            self.auth_used.add((self.a(consumer), nonce))
            self.move(self.a(consumer), self.d.escrow, amount)
            self.deposits[consumer] += amount
            self.last_receive = (consumer, args, forged)
            assert self.events(r) == [
                (
                    "Deposited",
                    {"sender": self.a("relayer"), "beneficiary": self.a(consumer), "amount": amount},
                )
            ]

    @rule(consumer=consumers, kind=portions, amount=amounts_or_zero)
    def request_withdrawal(self, consumer: str, kind: str, amount: int) -> None:
        amount = portion(kind, self.deposits[consumer], amount)
        expect = first(
            (amount == 0, ZERO_AMOUNT),
            (amount > self.deposits[consumer], "escrow: amount exceeds deposit"),
        )
        unlock_at = self.now + WITHDRAWAL_DELAY
        self.escrow_tx(consumer, "request_withdrawal", (amount,), expect)
        if expect is None:
            self.withdrawals[consumer] = (amount, unlock_at)

    @rule(consumer=consumers)
    def cancel_withdrawal(self, consumer: str) -> None:
        expect = first((self.withdrawals[consumer][0] == 0, "escrow: no pending withdrawal"))
        self.escrow_tx(consumer, "cancel_withdrawal", (), expect)
        if expect is None:
            self.withdrawals[consumer] = (0, 0)

    @rule(consumer=consumers, pending=st.booleans(), wait=st.booleans())
    def withdraw(self, consumer: str, pending: bool, wait: bool) -> None:
        if pending:  # prefer a consumer with a pending request, if there is one
            consumer = next((c for c in CONSUMERS if self.withdrawals[c][0]), consumer)
        requested, unlock_at = self.withdrawals[consumer]
        if wait and self.now < unlock_at:
            note(f"[t={self.now}] wait for the unlock at {unlock_at}")
            self.now = unlock_at
        expect = first(
            (requested == 0, "escrow: no pending withdrawal"),
            (self.now < unlock_at, "escrow: withdrawal locked"),
        )
        r = self.escrow_tx(consumer, "withdraw", (), expect)
        if expect is None:
            amount = min(requested, self.deposits[consumer])
            self.withdrawals[consumer] = (0, 0)
            self.deposits[consumer] -= amount
            self.move(self.d.escrow, self.a(consumer), amount)
            assert self.events(r) == [("Withdrawn", {"consumer": self.a(consumer), "amount": amount})]

    @rule(
        seconds=st.one_of(st.sampled_from((1, 5, 599, 3_599, 3_600, 86_400, 90_000)), st.integers(1, 200_000))
    )
    def advance_time(self, seconds: int) -> None:
        note(f"[t={self.now}] advance time by {seconds}s")
        self.now += seconds

    # ------------------------------------------------------------ x402 per-call payments

    @rule(
        target=auths,
        payer=consumers,
        provider=st.sampled_from(PROVIDERS * 8 + ("zero",)),
        amount=st.one_of(amounts, st.just(0)),
        window=st.sampled_from(("open", "open", "open", "short", "future")),
        forged=rarely,
        usage=usages,
        used=st.integers(0, 2_000_000),
    )
    def sign_authorization(
        self, payer: str, provider: str, amount: int, window: str, forged: bool, usage: str, used: int
    ) -> Auth:
        """The consumer's x402 client signs a TransferWithAuthorization to the escrow (no tx)."""
        valid_after = self.now + 100 if window == "future" else self.now - 1
        valid_before = self.now + 3 if window == "short" else self.now + 3_600
        message = {
            "from": self.a(payer),
            "to": self.d.escrow,
            "value": amount,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": self.nonce(),
        }
        signer = CONSUMERS[(CONSUMERS.index(payer) + 1) % 3] if forged else payer
        sig = self.sign(signer, self.d.usdc_domain, "TransferWithAuthorization", message)
        charged = {"all": amount, "part": used % (amount + 1), "none": 0, "over": amount + 1}[usage]
        auth = Auth(
            f"auth{len(self.all_auths)}",
            payer,
            provider,
            amount,
            charged,
            valid_after,
            valid_before,
            message["nonce"],
            sig.v,
            sig.r,
            sig.s,
            forged,
        )
        self.all_auths.append(auth)
        note(f"[t={self.now}] signed {auth!r}")
        return auth

    def pools(self) -> dict[str, list[Auth]]:
        return {
            "fresh": [
                a
                for a in self.all_auths
                if (self.a(a.payer), a.nonce) not in self.auth_used
                and 0 < a.amount >= a.charged
                and a.provider != "zero"
            ],
            "front-run": [a for a in self.all_auths if a.funds_arrived and not a.credits and a.amount],
            "credited": [a for a in self.all_auths if a.credits and not a.refunds],
            "refunded": [a for a in self.all_auths if a.refunds],
            "cancelled": [a for a in self.all_auths if a.cancelled],
        }

    def pick(self, drawn: Auth, prefer: str) -> Auth:
        """The drawn authorization, or the latest one in a given state (reaching the rare paths:
        reconcile after a front-run, refund after a credit, and so on)."""
        pool = self.pools().get(prefer)
        return pool[-1] if pool else drawn

    def payment(self, auth: Auth) -> tuple[Any, ...]:
        return (
            self.a(auth.payer),
            self.a(auth.provider),
            auth.amount,
            auth.charged,
            auth.valid_after,
            auth.valid_before,
            auth.nonce,
            auth.v,
            auth.r,
            auth.s,
        )

    def usdc_refusal(self, auth: Auth) -> str | None:
        """Why USDC's transferWithAuthorization would refuse `auth` now (MockUSDC's order)."""
        return first(
            (self.now <= auth.valid_after, "FiatTokenV2: authorization is not yet valid"),
            (self.now >= auth.valid_before, "FiatTokenV2: authorization is expired"),
            (
                (self.a(auth.payer), auth.nonce) in self.auth_used,
                "FiatTokenV2: authorization is used or canceled",
            ),
            (auth.forged, "FiatTokenV2: invalid signature"),
            (self.bal[self.a(auth.payer)] < auth.amount, NO_BALANCE),
        )

    def payment_checks(self, auth: Auth) -> tuple[tuple[bool, str], ...]:
        return (
            (auth.amount == 0, ZERO_AMOUNT),
            (auth.charged > auth.amount, "escrow: charged above value"),
            (auth.provider == "zero", "escrow: zero provider"),
        )

    def pay_in(self, auth: Auth) -> None:
        """USDC accepted `auth`: its funds are now at the escrow."""
        self.auth_used.add((self.a(auth.payer), auth.nonce))
        self.move(self.a(auth.payer), self.d.escrow, auth.amount)
        auth.funds_arrived = True

    def credit_leaf(self, auth: Auth, bps: int) -> bytes:
        return merkle.Credit(self.a(auth.payer), auth.nonce, self.a(auth.provider), auth.charged, bps).leaf

    def credit(self, auth: Auth, how: str, bps: int, root: bytes, proof: list[bytes]) -> int:
        fee, share = self.split(auth.charged, bps)
        self.earnings[auth.provider] += share
        self.platform_fees += fee
        auth.credits.append(CreditRecord(how, auth.provider, bps, fee, share, root, tuple(proof)))
        return fee

    @rule(
        batch=st.lists(auths, min_size=1, max_size=5),
        fresh=st.sampled_from((True, True, False)),
        caller=operator_or_stranger,
    )
    def settle_authorizations(self, batch: list[Auth], fresh: bool, caller: str) -> None:
        """Batch settlement; a refused authorization (used, front-run, cancelled, expired) is skipped.
        The batch may repeat an authorization or name any provider: the operator is free to.
        `fresh` swaps in the latest unused authorizations, so that most batches credit something."""
        if fresh:
            unused = self.pools()["fresh"]
            batch = unused[-len(batch) :] or batch
        expect = first(
            (caller != "operator", NOT_OPERATOR),
            (self.paused, PAUSED),
            *itertools.chain.from_iterable(self.payment_checks(a) for a in batch),
        )
        mined_at = self.now
        r = self.escrow_tx(caller, "settle_authorizations", ([self.payment(a) for a in batch],), expect)
        if expect is None:
            bps = self.fee_bps
            # USDC judged each authorization at the block's time, before `tx` moved the clock on.
            after, self.now = self.now, mined_at
            refusals = []
            for auth in batch:
                refusals.append(self.usdc_refusal(auth))
                if refusals[-1] is None:
                    self.pay_in(auth)
            self.now = after
            credited = [a for a, refusal in zip(batch, refusals, strict=True) if refusal is None]
            failed = [
                ("PaymentFailed", a.nonce) for a, refusal in zip(batch, refusals, strict=True) if refusal
            ]
            leaves = [self.credit_leaf(a, bps) for a in credited]
            root = merkle.root(leaves) if leaves else b"\x00" * 32
            fee = 0
            for i, auth in enumerate(credited):
                fee += self.credit(auth, "settle", bps, root, merkle.proof(leaves, i))
                # The unused rest of the authorization is the payer's deposit.
                self.deposits[auth.payer] += auth.amount - auth.charged
            if credited:
                self.roots[root] = mined_at
            # One PaymentFailed per refused authorization, one Credited per run of payments to a
            # provider, then the batch's summary, whose fee is the sum of each payment's own split.
            runs: list[list[Any]] = []
            for auth in credited:
                f, _ = self.split(auth.charged, bps)
                if runs and runs[-1][0] == self.a(auth.provider):
                    runs[-1][1] += auth.charged
                    runs[-1][2] += f
                else:
                    runs.append([self.a(auth.provider), auth.charged, f])
            amount = sum(a.charged for a in credited)
            events = self.events(r)
            # One Deposited per credited payment charged less than it authorized, in batch order.
            rests = [(self.a(a.payer), a.amount - a.charged) for a in credited if a.charged < a.amount]
            assert [(e["beneficiary"], e["amount"]) for n, e in events if n == "Deposited"] == rests
            events = [(n, e) for n, e in events if n != "Deposited"]
            assert [(n, e["nonce"]) for n, e in events[: len(failed)]] == failed
            assert [
                (e["provider"], e["settlement"], e["amount"], e["fee"]) for _, e in events[len(failed) : -1]
            ] == [(p, root, a, f) for p, a, f in runs]
            name, e = events[-1]
            assert (name, e["operator"], e["root"], e["count"], e["amount"], e["fee"]) == (
                "PaymentsSettled",
                self.a(caller),
                root,
                len(credited),
                amount,
                fee,
            )

    @rule(
        auth=auths,
        prefer=st.sampled_from(("drawn", "fresh", "fresh")),
        submitter=st.sampled_from(("stranger", "relayer", "provider0")),
    )
    def front_run(self, auth: Auth, prefer: str, submitter: str) -> None:
        """Someone submits the authorization straight to USDC: funds arrive uncredited."""
        auth = self.pick(auth, prefer)
        args = self.payment(auth)
        usdc_args = (args[0], self.d.escrow, args[2], *args[4:])
        expect = self.usdc_refusal(auth)
        self.usdc_tx(submitter, "transferWithAuthorization", usdc_args, expect)
        if expect is None:
            self.pay_in(auth)
            self.stray += auth.amount

    @rule(auth=auths, prefer=st.sampled_from(("drawn", "fresh")))
    def cancel_authorization(self, auth: Auth, prefer: str) -> None:
        """The payer burns the authorization's nonce at USDC (EIP-3009 cancelAuthorization)."""
        auth = self.pick(auth, prefer)
        message = {"authorizer": self.a(auth.payer), "nonce": auth.nonce}
        sig = self.sign(auth.payer, self.d.usdc_domain, "CancelAuthorization", message)
        used = (self.a(auth.payer), auth.nonce) in self.auth_used
        expect = first((used, "FiatTokenV2: authorization is used or canceled"))
        self.usdc_tx(
            "relayer", "cancelAuthorization", (self.a(auth.payer), auth.nonce, sig.v, sig.r, sig.s), expect
        )
        if expect is None:
            self.auth_used.add((self.a(auth.payer), auth.nonce))
            auth.cancelled = True

    @rule(
        auth=auths,
        prefer=st.sampled_from(("drawn", "drawn", "fresh", "front-run", "credited", "refunded", "cancelled")),
        caller=operator_or_stranger,
    )
    def reconcile_authorization(self, auth: Auth, prefer: str, caller: str) -> None:
        """The operator reconciles any used reference, front-run or not (settled here, cancelled):
        whatever it credits, it pays in itself."""
        auth = self.pick(auth, prefer)
        ref = (self.a(auth.payer), auth.nonce)
        expect = first(
            (caller != "operator", NOT_OPERATOR),
            (self.paused, PAUSED),
            *self.payment_checks(auth),
            (ref in self.reconciled, "escrow: already reconciled"),
            (auth.forged, "escrow: invalid signature"),
            (ref not in self.auth_used, "escrow: authorization not used"),
            (self.bal[self.a("operator")] < auth.charged, NO_BALANCE),
        )
        r = self.escrow_tx(caller, "reconcile_authorization", (self.payment(auth),), expect)
        if expect is None:
            # The operator pays in the charge only; any front-run funds stay stray.
            self.reconciled.add(ref)
            self.move(self.a("operator"), self.d.escrow, auth.charged)
            leaf = self.credit_leaf(auth, self.fee_bps)
            self.roots[leaf] = self.now - 1
            fee = self.credit(auth, "reconcile", self.fee_bps, leaf, [])
            names = [n for n, _ in self.events(r)]
            assert names == ["Credited", "PaymentReconciled"], names
            (_, args), *_ = [e for e in self.events(r) if e[0] == "PaymentReconciled"]
            assert (args["amount"], args["fee"]) == (auth.charged, fee)

    @precondition(lambda self: any(a.credits for a in self.all_auths))
    @rule(
        auth=auths,
        prefer=st.sampled_from(
            ("drawn", "drawn", "credited", "credited", "refunded", "cancelled", "front-run")
        ),
        forge=st.sampled_from(("honest",) * 4 + ("provider", "fee", "amount", "root", "proof", "other")),
        late=rarely,
        caller=operator_or_stranger,
    )
    def refund_payment(self, auth: Auth, prefer: str, forge: str, late: bool, caller: str) -> None:
        """The operator refunds a payment as it says it was credited: honestly, or naming another
        provider, fee, amount, root or proof, or one that was never credited (cancelled, front-run)."""
        auth = self.pick(auth, prefer)
        record = auth.credits[-1] if auth.credits else None
        credit = {
            "payer": self.a(auth.payer),
            "nonce": auth.nonce,
            "provider": self.a(record.provider if record else auth.provider),
            "amount": auth.charged,
            "fee_bps": record.fee_bps if record else self.fee_bps,
        }
        root = record.root if record else self.credit_leaf(auth, self.fee_bps)
        proof = list(record.proof) if record else []
        other = next((a for a in reversed(self.all_auths) if a.credits and a is not auth), None)
        if forge == "provider":
            named = record.provider if record else auth.provider
            credit["provider"] = self.a(
                PROVIDERS[(PROVIDERS.index(named) + 1) % 3] if named in PROVIDERS else "provider0"
            )
        elif forge == "fee":
            credit["fee_bps"] = (credit["fee_bps"] + 1) % (MAX_FEE_BPS + 1)
        elif forge == "amount":
            credit["amount"] += 1
        elif forge == "root":
            root = keccak(root)
        elif forge == "proof":
            proof = [*proof, keccak(text="sibling")]
        elif forge == "other" and other is not None:
            root, proof = other.credits[-1].root, list(other.credits[-1].proof)
        if late and root in self.roots:
            note(f"[t={self.now}] wait until the refund window of {auth.label} has closed")
            self.now = max(self.now, self.roots[root] + REFUND_WINDOW + 1)
        leaf = merkle.Credit(*credit.values()).leaf
        proven = root in self.roots and merkle.verify(proof, root, leaf)
        provider_name = next((n for n in PROVIDERS if self.a(n) == credit["provider"]), None)
        fee = credit["amount"] * credit["fee_bps"] // MAX_BPS
        share = credit["amount"] - fee
        ref = (self.a(auth.payer), auth.nonce)
        expect = first(
            (caller != "operator", NOT_OPERATOR),
            (not proven, "escrow: payment not settled here"),
            (proven and self.now - self.roots[root] > REFUND_WINDOW, "escrow: refund window closed"),
            (ref in self.refunded, "escrow: already refunded"),
            (
                proven and self.earnings.get(provider_name or "", 0) < share,
                "escrow: provider share already claimed",
            ),
            (self.platform_fees < fee, "escrow: platform fee already withdrawn"),
        )
        r = self.escrow_tx(caller, "refund_payment", (tuple(credit.values()), root, proof), expect)
        if expect is None:
            # A proven leaf is one of this payment's credits: the refund undoes exactly that one.
            matched = next(
                c
                for c in auth.credits
                if (c.root, c.provider, c.fee_bps) == (root, provider_name, credit["fee_bps"])
            )
            assert (matched.fee, matched.share) == (fee, share)
            self.refunded.add(ref)
            self.earnings[matched.provider] -= share
            self.platform_fees -= fee
            self.move(self.d.escrow, self.a(auth.payer), auth.charged)
            auth.refunds.append(matched)
            (_, args), *_ = [e for e in self.events(r) if e[0] == "PaymentRefunded"]
            assert (args["amount"], args["fee"]) == (auth.charged, fee)

    # ------------------------------------------------------------ prepaid: permissions and charges

    def _permission(
        self,
        consumer: str,
        spender: str,
        allowance: int,
        valid_after: int,
        valid_until: int,
        forged: bool,
        developer: str = "zero",
        max_markup_bps: int = 0,
    ) -> Perm:
        message = {
            "consumer": self.a(consumer),
            "spender": self.a(spender),
            "allowance": allowance,
            "valid_after": valid_after,
            "valid_until": valid_until,
            "salt": next(self.counter),
            "developer": self.d.escrow if developer == "escrow" else self.a(developer),
            "max_markup_bps": max_markup_bps,
        }
        signer = CONSUMERS[(CONSUMERS.index(consumer) + 1) % 3] if forged else consumer
        sig = self.sign(signer, self.d.escrow_domain, "SpendPermission", message)
        digest = eip712.digest(self.d.escrow_domain, "SpendPermission", message)
        message |= {"consumer_name": consumer, "spender_name": spender, "developer_name": developer}
        perm = Perm(f"perm{len(self.all_perms)}", message, sig.raw, digest, forged)
        self.all_perms.append(perm)
        self.spent[digest] = 0
        note(f"[t={self.now}] signed {perm!r}")
        return perm

    @rule(
        target=perms,
        consumer=consumers,
        spender=st.sampled_from(("operator",) * 6 + ("stranger",)),
        allowance=st.one_of(st.integers(0, 4_000_000), st.integers(0, 100)),
        start=st.sampled_from(("zero", "now", "now", "later")),
        length=st.sampled_from(("seconds", "hour", "hour", "long")),
        forged=rarely,
        developer=st.sampled_from(("zero",) * 3 + PROVIDERS + ("escrow",)),
        max_markup_bps=st.sampled_from((0, 1, 500, 2_000, 10_000)),
    )
    def sign_permission(
        self,
        consumer: str,
        spender: str,
        allowance: int,
        start: str,
        length: str,
        forged: bool,
        developer: str,
        max_markup_bps: int,
    ) -> Perm:
        """A consumer's permission; most name an app developer (a provider here, whose earnings
        the model follows) that the charges may pay a markup, some an invalid one."""
        valid_after = {"zero": 0, "now": self.now, "later": self.now + 600}[start]
        valid_until = {"seconds": self.now + 5, "hour": self.now + 3_600, "long": 2**40}[length]
        return self._permission(
            consumer, spender, allowance, valid_after, valid_until, forged, developer, max_markup_bps
        )

    def permission_struct(self, perm: Perm) -> tuple[Any, ...]:
        m = perm.message
        return tuple(m[name] for name, _ in eip712.TYPES["SpendPermission"])

    def markup(self, perm: Perm, charges: list[tuple[str, int]], kind: str) -> int:
        """A batch's markup of `kind` for its base total under `perm`."""
        most = sum(amount for _, amount in charges) * perm.message["max_markup_bps"] // MAX_BPS
        return {"none": 0, "max": most, "over": most + 1, "random": 1 + most // 3 + len(charges)}[kind]

    def apply_charges(
        self, perm: Perm, ref: bytes, charges: list[tuple[str, int]], markup: int, caller: str, bps: int
    ) -> tuple[str | None, int, int]:
        """Checks one permission's charges in the contract's order and applies them to the model
        (the caller restores the model on a predicted revert). Returns (reason, total paid with
        the markup, total_fee)."""
        m = perm.message
        consumer = m["consumer_name"]
        total = sum(amount for _, amount in charges)
        paid = total + markup
        reason = first(
            (m["spender_name"] != caller, "escrow: caller is not the spender"),
            (self.now < m["valid_after"], "escrow: permission not yet valid"),
            (self.now >= m["valid_until"], "escrow: permission expired"),
            ((consumer, perm.digest) in self.revoked, "escrow: permission revoked"),
            (perm.forged, "escrow: invalid signature"),
            (ref in self.references, "escrow: reference already settled"),
            (any(p == "zero" for p, _ in charges), "escrow: zero provider"),
            (total == 0, ZERO_AMOUNT),
            (markup * MAX_BPS > total * m["max_markup_bps"], "escrow: markup above permission"),
            (markup > 0 and m["developer_name"] in ("zero", "escrow"), "escrow: invalid developer"),
            (self.spent[perm.digest] + paid > m["allowance"], "escrow: allowance exceeded"),
            (paid > self.deposits[consumer], "escrow: deposit exceeded"),
        )
        if reason is not None:
            return reason, 0, 0
        total_fee = 0
        for provider, amount in charges:
            fee, share = self.split(amount, bps)
            self.earnings[provider] += share
            total_fee += fee
        if markup:
            self.earnings[m["developer_name"]] += markup  # all of it, no platform fee
        self.platform_fees += total_fee
        self.deposits[consumer] -= paid
        self.spent[perm.digest] += paid
        self.references.add(ref)
        return None, paid, total_fee

    def _model_state(self) -> tuple[Any, ...]:
        return copy.deepcopy((self.earnings, self.platform_fees, self.deposits, self.spent, self.references))

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self.earnings, self.platform_fees, self.deposits, self.spent, self.references = saved

    def charges_arg(self, charges: list[tuple[str, int]]) -> list[int]:
        """Each charge packed as `provider << 96 | amount`."""
        return [(int(self.a(p), 16) << CHARGE_AMOUNT_BITS) | amount for p, amount in charges]

    def charge_runs(
        self, perm: Perm, charges: list[tuple[str, int]], markup: int, ref: bytes, bps: int
    ) -> list[tuple[Any, ...]]:
        """The `Credited` events of one permission's charges: one per run of a provider, then the
        developer's markup."""
        runs: list[list[Any]] = []
        for provider, amount in charges:
            fee, _ = self.split(amount, bps)
            if runs and runs[-1][0] == self.a(provider):
                runs[-1][2] += amount
                runs[-1][3] += fee
            else:
                runs.append([self.a(provider), ref, amount, fee])
        if markup:
            runs.append([perm.message["developer"], ref, markup, 0])
        return [tuple(run) for run in runs]

    def charge_events(self, r: Receipt) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for n, e in self.events(r):
            if n == "ChargesSettled":
                out.append((e["permission"], e["reference"], e["amount"], e["fee"], e["markup"], e["count"]))
            else:
                assert n == "Credited", n
                out.append((e["provider"], e["settlement"], e["amount"], e["fee"]))
        return out

    def reference(self, reuse: bool) -> bytes:
        """A fresh batch reference, or (a dishonest or crashed relay) one already settled."""
        if reuse and self.references:
            return sorted(self.references)[0]
        return keccak(text=f"reference-{next(self.counter)}")

    @rule(perm=perms, charges=charges_lists, markup=markups, reuse=rarely, caller=operator_or_stranger)
    def settle_charges(
        self, perm: Perm, charges: list[tuple[str, int]], markup: str, reuse: bool, caller: str
    ) -> None:
        self._settle_charges(caller, perm, charges, markup, self.reference(reuse))

    @precondition(lambda self: self.last_charges is not None)
    @rule()
    def retry_last_charges(self) -> None:
        """The relay retries a batch that already landed (a crash between send and record)."""
        self._settle_charges(*self.last_charges)

    def _settle_charges(
        self, caller: str, perm: Perm, charges: list[tuple[str, int]], markup_kind: str, ref: bytes
    ) -> None:
        saved = self._model_state()
        expect = first((caller != "operator", NOT_OPERATOR), (self.paused, PAUSED))
        total = total_fee = 0
        bps = self.fee_bps
        markup = self.markup(perm, charges, markup_kind)
        if expect is None:
            expect, total, total_fee = self.apply_charges(perm, ref, charges, markup, caller, bps)
        if expect is not None:
            self._restore(saved)
        args = (self.permission_struct(perm), perm.signature, ref, self.charges_arg(charges), markup)
        r = self.escrow_tx(caller, "settle_charges", args, expect)
        if expect is None:
            self.last_charges = (caller, perm, charges, markup_kind, ref)
            assert self.charge_events(r) == [
                *self.charge_runs(perm, charges, markup, ref, bps),
                (perm.digest, ref, total, total_fee, markup, len(charges)),
            ]

    @rule(
        batches=st.lists(st.tuples(perms, charges_lists, markups, rarely), min_size=1, max_size=3),
        caller=operator_or_stranger,
    )
    def settle_charges_batch(
        self, batches: list[tuple[Perm, list[tuple[str, int]], str, bool]], caller: str
    ) -> None:
        saved = self._model_state()
        bps = self.fee_bps
        expect = first((caller != "operator", NOT_OPERATOR), (self.paused, PAUSED))
        arg, expected_events = [], []
        for perm, charges, markup_kind, reuse in batches:
            ref = self.reference(reuse)
            markup = self.markup(perm, charges, markup_kind)
            arg.append((self.permission_struct(perm), perm.signature, ref, self.charges_arg(charges), markup))
            if expect is None:
                expect, total, total_fee = self.apply_charges(perm, ref, charges, markup, caller, bps)
                expected_events += self.charge_runs(perm, charges, markup, ref, bps)
                expected_events.append((perm.digest, ref, total, total_fee, markup, len(charges)))
        if expect is not None:
            self._restore(saved)
        r = self.escrow_tx(caller, "settle_charges_batch", (arg,), expect)
        if expect is None:
            assert self.charge_events(r) == expected_events

    @rule(perm=perms, how=st.sampled_from(("direct", "digest", "signature", "stranger", "forged signature")))
    def revoke_permission(self, perm: Perm, how: str) -> None:
        consumer = perm.message["consumer_name"]
        self._revoke(consumer, perm.digest, how, "revoke_permission", (self.permission_struct(perm),))

    def _revoke(self, signer: str, digest: bytes, how: str, fn: str, item_args: tuple[Any, ...]) -> None:
        """Revocation four ways; works while paused."""
        if how == "direct":
            self.escrow_tx(signer, fn, item_args, None)
        elif how == "stranger":
            reason = "escrow: not the consumer" if fn == "revoke_permission" else "escrow: not the provider"
            self.escrow_tx("stranger", fn, item_args, reason)
            return
        elif how == "digest":
            self.escrow_tx(signer, "revoke", (digest,), None)
        else:
            forged = how == "forged signature"
            message = {"account": self.a(signer), "item": digest}
            sig = self.sign("stranger" if forged else signer, self.d.escrow_domain, "Revocation", message)
            expect = "escrow: invalid signature" if forged else None
            self.escrow_tx("relayer", "revoke_with_signature", (self.a(signer), digest, sig.raw), expect)
            if forged:
                return
        self.revoked.add((signer, digest))

    # ------------------------------------------------------------ claims and delegations

    @rule(
        provider=providers,
        kind=portions,
        amount=amounts_or_zero,
        payee=st.sampled_from(("self",) * 4 + ("payee", "zero", "escrow")),
    )
    def claim(self, provider: str, kind: str, amount: int, payee: str) -> None:
        amount = portion(kind, self.earnings[provider], amount)
        to = provider if payee == "self" else payee
        expect = first(
            (amount == 0, ZERO_AMOUNT),
            (to == "zero", "escrow: zero payee"),
            (to == "escrow", "escrow: escrow as payee"),
            (amount > self.earnings[provider], "escrow: amount exceeds earnings"),
        )
        address = self.d.escrow if to == "escrow" else self.a(to)
        self.escrow_tx(provider, "claim", (amount, address), expect)
        if expect is None:
            self.earnings[provider] -= amount
            self.move(self.d.escrow, self.a(to), amount)

    @rule(
        target=delegs,
        provider=providers,
        delegate=st.sampled_from(("zero", "zero", "relayer", "stranger")),
        payee=st.sampled_from(("self", "self", "payee", "stranger", "zero", "escrow")),
        max_amount=st.one_of(st.integers(1, 2_000_000), st.integers(0, 50)),
        relayer_fee=st.one_of(st.just(0), st.integers(0, 5_000), st.integers(0, 60)),
        until=st.sampled_from(("seconds", "hour", "hour", "long")),
        forged=rarely,
    )
    def sign_delegation(
        self,
        provider: str,
        delegate: str,
        payee: str,
        max_amount: int,
        relayer_fee: int,
        until: str,
        forged: bool,
    ) -> Deleg:
        payee = provider if payee == "self" else payee
        message = {
            "provider": self.a(provider),
            "delegate": self.a(delegate),
            "payee": self.d.escrow if payee == "escrow" else self.a(payee),
            "max_amount": max_amount,
            "relayer_fee": relayer_fee,
            "valid_until": {"seconds": self.now + 5, "hour": self.now + 3_600, "long": 2**40}[until],
            "salt": next(self.counter),
        }
        signer = PROVIDERS[(PROVIDERS.index(provider) + 1) % 3] if forged else provider
        sig = self.sign(signer, self.d.escrow_domain, "Delegation", message)
        digest = eip712.digest(self.d.escrow_domain, "Delegation", message)
        names = {"provider": provider, "delegate": delegate, "payee": payee}
        deleg = Deleg(f"deleg{len(self.all_delegs)}", message, names, sig.raw, digest, forged)
        self.all_delegs.append(deleg)
        self.claimed[digest] = 0
        note(f"[t={self.now}] signed {deleg!r}")
        return deleg

    def delegation_struct(self, deleg: Deleg) -> tuple[Any, ...]:
        m = deleg.message
        return (
            m["provider"],
            m["delegate"],
            m["payee"],
            m["max_amount"],
            m["relayer_fee"],
            m["valid_until"],
            m["salt"],
        )

    @rule(
        deleg=delegs,
        caller=st.sampled_from(("relayer", "relayer", "relayer", "stranger")),
        kind=st.sampled_from(("fit", "fit", "cap", "earnings", "random", "over cap", "fee", "split", "zero")),
        amount=amounts,
    )
    def claim_with_delegation(self, deleg: Deleg, caller: str, kind: str, amount: int) -> None:
        """A relayer claims under a delegation; "split" is the relayer taking many minimal claims,
        each just above what would round its pro-rata fee to zero."""
        m, names = deleg.message, deleg.names
        provider = names["provider"]
        cap_left = m["max_amount"] - self.claimed[deleg.digest]
        minimal = -(-m["max_amount"] // m["relayer_fee"]) if m["relayer_fee"] else 1
        amount = {
            "fit": min(cap_left, self.earnings[provider]),
            "cap": cap_left,
            "earnings": self.earnings[provider],
            "random": amount,
            "over cap": cap_left + 1,
            "fee": m["relayer_fee"],
            "split": minimal,
            "zero": 0,
        }[kind]
        expect = first(
            (names["delegate"] not in ("zero", caller), "escrow: not the delegate"),
            (self.now >= m["valid_until"], "escrow: delegation expired"),
            (names["payee"] == "zero", "escrow: zero payee"),
            (names["payee"] == "escrow", "escrow: escrow as payee"),
            (amount == 0, ZERO_AMOUNT),
            (m["relayer_fee"] >= m["max_amount"], "escrow: relayer fee not below cap"),
            ((provider, deleg.digest) in self.revoked, "escrow: delegation revoked"),
            (self.claimed[deleg.digest] + amount > m["max_amount"], "escrow: delegation cap exceeded"),
            (deleg.forged, "escrow: invalid signature"),
            (amount > self.earnings[provider], "escrow: amount exceeds earnings"),
        )
        r = self.escrow_tx(
            caller, "claim_with_delegation", (self.delegation_struct(deleg), deleg.signature, amount), expect
        )
        if expect is None:
            fee = m["relayer_fee"] * amount // m["max_amount"]
            self.claimed[deleg.digest] += amount
            self.delegation_fees[deleg.digest] = self.delegation_fees.get(deleg.digest, 0) + fee
            self.earnings[provider] -= amount
            self.move(self.d.escrow, self.a(caller), fee)
            self.move(self.d.escrow, self.a(names["payee"]), amount - fee)
            (_, args), *_ = self.events(r)
            assert (args["delegation"], args["amount"], args["relayer_fee"]) == (deleg.digest, amount, fee)

    @rule(
        deleg=delegs, how=st.sampled_from(("direct", "digest", "signature", "stranger", "forged signature"))
    )
    def revoke_delegation(self, deleg: Deleg, how: str) -> None:
        self._revoke(
            deleg.names["provider"], deleg.digest, how, "revoke_delegation", (self.delegation_struct(deleg),)
        )

    # ------------------------------------------------------------ owner

    @rule(
        caller=owner_or_stranger,
        bps=st.one_of(st.integers(0, MAX_FEE_BPS), st.sampled_from((0, 2_000, 2_001, 10_000))),
    )
    def set_fee_bps(self, caller: str, bps: int) -> None:
        expect = first((caller != "owner", NOT_OWNER), (bps > MAX_FEE_BPS, "escrow: fee above cap"))
        self.escrow_tx(caller, "set_fee_bps", (bps,), expect)
        if expect is None:
            self.fee_bps = bps

    @rule(caller=owner_or_stranger)
    def pause(self, caller: str) -> None:
        expect = first((caller != "owner", NOT_OWNER), (self.paused, PAUSED))
        self.escrow_tx(caller, "pause", (), expect)
        if expect is None:
            self.paused = True

    @rule(caller=owner_or_stranger)
    def unpause(self, caller: str) -> None:
        expect = first((caller != "owner", NOT_OWNER), (not self.paused, "pausable: contract is not paused"))
        self.escrow_tx(caller, "unpause", (), expect)
        if expect is None:
            self.paused = False

    @rule(
        caller=owner_or_stranger,
        to=st.sampled_from(("owner", "owner", "payee", "zero", "escrow")),
        kind=portions,
        amount=amounts_or_zero,
    )
    def withdraw_platform_fees(self, caller: str, to: str, kind: str, amount: int) -> None:
        amount = portion(kind, self.platform_fees, amount)
        expect = first(
            (caller != "owner", NOT_OWNER),
            (to == "zero", "escrow: zero payee"),
            (to == "escrow", "escrow: escrow as payee"),
            (amount == 0, ZERO_AMOUNT),
            (amount > self.platform_fees, "escrow: amount exceeds fees"),
        )
        address = self.d.escrow if to == "escrow" else self.a(to)
        self.escrow_tx(caller, "withdraw_platform_fees", (address, amount), expect)
        if expect is None:
            self.platform_fees -= amount
            self.move(self.d.escrow, self.a(to), amount)

    @rule(sender=st.sampled_from(("stranger", *CONSUMERS)), amount=amounts)
    def stray_transfer(self, sender: str, amount: int) -> None:
        """USDC sent straight to the escrow by mistake: owed to nobody, sweepable."""
        expect = first((self.bal[self.a(sender)] < amount, NO_BALANCE))
        self.usdc_tx(sender, "transfer", (self.d.escrow, amount), expect)
        if expect is None:
            self.move(self.a(sender), self.d.escrow, amount)
            self.stray += amount

    @rule(caller=owner_or_stranger, to=st.sampled_from(("owner", "owner", "zero", "escrow")))
    def sweep(self, caller: str, to: str) -> None:
        excess = self.bal[self.d.escrow] - self.liabilities()
        expect = first(
            (caller != "owner", NOT_OWNER),
            (to == "zero", "escrow: zero payee"),
            (to == "escrow", "escrow: escrow as payee"),
            (excess == 0, "escrow: nothing to sweep"),
        )
        address = self.d.escrow if to == "escrow" else self.a(to)
        self.escrow_tx(caller, "sweep", (self.d.usdc, address), expect)
        if expect is None:
            self.move(self.d.escrow, self.a(to), excess)
            self.stray -= excess

    # ------------------------------------------------------------ invariants

    @invariant()
    def chain_matches_model_and_design(self) -> None:
        d, E, U = self.d, self.d.E, self.d.U
        names = [*ACTORS, "escrow"]
        holders = [*(d.addr[a] for a in ACTORS), d.escrow]
        calls: list[tuple[str, str]] = [(d.usdc, U.encode("balanceOf", h)) for h in holders]
        calls += [(d.usdc, U.encode("totalSupply"))]
        views = ("liabilities", "total_deposits", "total_earnings", "platform_fees", "fee_bps", "paused")
        calls += [(d.escrow, E.encode(v)) for v in views]
        calls += [(d.escrow, E.encode("deposits", self.a(c))) for c in CONSUMERS]
        calls += [(d.escrow, E.encode("withdrawals", self.a(c))) for c in CONSUMERS]
        calls += [(d.escrow, E.encode("earnings", self.a(p))) for p in PROVIDERS]
        calls += [(d.escrow, E.encode("permission_spent", p.digest)) for p in self.all_perms]
        calls += [(d.escrow, E.encode("delegation_claimed", g.digest)) for g in self.all_delegs]
        roots = sorted(self.roots)
        calls += [(d.escrow, E.encode("settlement_roots", root)) for root in roots]
        references = sorted(self.references)
        calls += [(d.escrow, E.encode("settled_references", ref)) for ref in references]
        raw = iter(
            self.chain.batch([("eth_call", [{"to": to, "data": data}, "latest"]) for to, data in calls])
        )

        def read(abi: Abi, fn: str) -> Any:
            return abi.decode(fn, next(raw))

        balances = {n: read(U, "balanceOf") for n in names}
        supply = read(U, "totalSupply")
        liabilities, total_deposits, total_earnings, platform_fees, fee_bps, paused = (
            read(E, v) for v in views
        )
        deposits = {c: read(E, "deposits") for c in CONSUMERS}
        withdrawals = {c: tuple(read(E, "withdrawals")) for c in CONSUMERS}
        earnings = {p: read(E, "earnings") for p in PROVIDERS}
        spent = [read(E, "permission_spent") for _ in self.all_perms]
        claimed = [read(E, "delegation_claimed") for _ in self.all_delegs]
        settled_at = [read(E, "settlement_roots") for _ in roots]
        settled_refs = [read(E, "settled_references") for _ in references]

        # Solvency: the escrow holds exactly what it owes plus what nobody is owed.
        escrow_balance = balances["escrow"]
        assert escrow_balance >= liabilities, f"insolvent: holds {escrow_balance}, owes {liabilities}"
        assert escrow_balance == liabilities + self.stray
        assert liabilities == total_deposits + total_earnings + platform_fees == self.liabilities()
        assert total_deposits == sum(deposits.values()) and total_earnings == sum(earnings.values())
        # The chain equals the model.
        assert deposits == self.deposits
        assert earnings == self.earnings
        assert platform_fees == self.platform_fees
        assert withdrawals == self.withdrawals
        assert (fee_bps, paused) == (self.fee_bps, self.paused)
        assert fee_bps <= MAX_FEE_BPS
        assert balances == {n: self.bal[h] for n, h in zip(names, holders, strict=True)}
        # USDC is conserved: nothing minted or burnt, all of it held by the actors and the escrow.
        assert supply == self.supply == sum(balances.values())
        # Caps: no permission spent above its allowance, no delegation claimed above its cap.
        for perm, value in zip(self.all_perms, spent, strict=True):
            assert value == self.spent[perm.digest] <= perm.message["allowance"], perm
        for deleg, value in zip(self.all_delegs, claimed, strict=True):
            assert value == self.claimed[deleg.digest] <= deleg.message["max_amount"], deleg
        # Every settlement's root is committed with its time; every settled batch reference kept.
        assert settled_at == [self.roots[root] for root in roots]
        assert all(settled_refs)
        # x402: USDC settles an authorization once; the escrow reconciles it at most once, and
        # every credit, settled or reconciled, brought its own amount in (the solvency equality
        # above holds with `stray` moved only by front-runs, mistaken transfers and sweeps). A
        # credit splits what was charged, never more than was authorized.
        for auth in self.all_auths:
            for c in auth.credits:
                assert c.fee + c.share == auth.charged <= auth.amount, auth
                assert c.how in ("settle", "reconcile"), auth
                assert c.fee == auth.charged * c.fee_bps // MAX_BPS, auth
            assert sum(1 for c in auth.credits if c.how == "settle") <= 1, auth
            assert sum(1 for c in auth.credits if c.how == "reconcile") <= 1, auth
            # A refund returns a payment credited here, once, at the split of that very credit,
            # taken from the provider that credit paid.
            assert len(auth.refunds) <= 1, auth
            for refund in auth.refunds:
                assert refund in auth.credits, auth
        # Relayers: whatever the number of claims, a delegation's fees never exceed its signed fee.
        for deleg in self.all_delegs:
            assert self.delegation_fees.get(deleg.digest, 0) <= deleg.message["relayer_fee"], deleg


# ---------------------------------------------------------------- the test


def test_escrow_state_machine(deployment: Deployment) -> None:
    EscrowMachine.d = deployment
    started = time.monotonic()
    run_state_machine_as_test(
        EscrowMachine,
        settings=settings(
            max_examples=FUZZ_EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=False,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
        ),
    )
    elapsed = time.monotonic() - started
    print(
        f"\nescrow invariants: {deployment.examples} examples, {deployment.steps} transactions "
        f"in {elapsed:.1f}s ({deployment.steps / elapsed:.0f} tx/s)"
    )
    if os.environ.get("FUZZ_STATS"):
        for (fn, outcome), count in sorted(deployment.outcomes.items()):
            print(f"{count:6d}  {fn:32s} {outcome}")
