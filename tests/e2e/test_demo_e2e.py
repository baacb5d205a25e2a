"""The marketplace demo end to end: twin, `ape run deploy escrow`, `quotra serve` and `quotra relayer`
as real processes, the local model server; the story's exact balances checked from its summary."""

from __future__ import annotations

import io
import time

from quotra_dev.demo.marketplace import MarketplaceSummary, run
from rich.console import Console

MAX_BPS = 10_000


def test_marketplace_story__exact_money__chain_equals_the_calls() -> None:
    output = io.StringIO()
    started = time.monotonic()
    summary = run(Console(file=output, width=140))
    elapsed = time.monotonic() - started
    text = output.getvalue()
    assert isinstance(summary, MarketplaceSummary)
    assert summary.ok, text

    # The playground: three free calls, then a 402.
    assert (summary.playground_calls, summary.playground_refused_status) == (3, 402)
    assert summary.x402_paid == [20_000, 20_000]
    assert len(summary.prepaid_paid) == 2 and all(a > 10_000 for a in summary.prepaid_paid)
    assert summary.api_key.startswith("sk-quotra")

    # Exact money: the provider earns 90% of what the consumer paid for its calls.
    paid = summary.total_paid
    assert paid % 10 == 0
    assert summary.provider_earned == paid * (MAX_BPS - summary.fee_bps) // MAX_BPS == paid * 9 // 10
    assert summary.platform_fees == paid - summary.provider_earned
    assert summary.claim_status == "confirmed"
    assert summary.claim_amount == summary.provider_earned
    assert summary.relayer_fee == 10_000
    assert summary.provider_wallet_after == summary.provider_earned - summary.relayer_fee
    assert summary.provider_earnings_after == 0
    # The consumer withdrew the rest of its deposit without ETH, less the relayer's fee.
    assert summary.withdrawal_status == "confirmed" and summary.withdrawal_fee == 10_000
    assert summary.withdrawn == summary.deposit - sum(summary.prepaid_paid)
    assert summary.consumer_wallet_after == (
        summary.consumer_minted
        - sum(summary.x402_paid)
        - summary.deposit
        + summary.withdrawn
        - summary.withdrawal_fee
    )
    assert summary.consumer_deposit_after == 0
    assert summary.claim_gas > 0  # one redeemDelegations: the ERC-7710 claim and the relayer's fee
    assert summary.eth_balances == {"consumer": 0, "provider": 0}

    # Chain == the relay's calls: solvency and `quotra reconcile` (each provider's settled calls
    # add up to its `Credited` events); every paid call settled in exactly one transaction.
    assert summary.escrow_balance == summary.liabilities
    assert summary.reconcile_exit == 0
    assert summary.gas_per_call and all(gas > 0 for _, gas, _ in summary.gas_per_call)
    settled: dict[str, int] = {}
    for path, _gas, calls in summary.gas_per_call:
        settled[path] = settled.get(path, 0) + calls
    assert settled == {
        "x402 (settle_authorizations)": len(summary.x402_paid),
        "prepaid (settle_charges)": len(summary.prepaid_paid),
    }
    assert "ERC-7710 claim confirmed" in text and "quotra reconcile" in text
    assert "redeemDelegations (ERC-7710)" in text and "Withdraw (signed)" in text
    assert "0x" + "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80" not in text
    assert elapsed < 90, elapsed
