"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quotra_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "quotra_http_request_duration_seconds",
            "HTTP request latency (until the response starts)",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "quotra_upstream_errors_total", "Upstream failures", ["kind", "error"], registry=self.registry
        )
        self.listing_calls = Counter(
            "quotra_listing_calls_total",
            "Relayed calls per listing",
            ["listing", "outcome"],
            registry=self.registry,
        )
        self.x402_payments = Counter(
            "quotra_x402_payments_total",
            "x402 payments by outcome (reserved, captured, voided, or the x402 refusal reason)",
            ["outcome"],
            registry=self.registry,
        )
        self.settlements = Counter(
            "quotra_settlement_items_total",
            "Settled items (x402 authorizations, prepaid charges) by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.discrepancies = Counter(
            "quotra_reconcile_discrepancies_total",
            "Differences between the ledger and the escrow's events found by the indexer",
            ["kind"],
            registry=self.registry,
        )
        self.open_discrepancies = Gauge(
            "quotra_reconcile_open_discrepancies",
            "Discrepancies found by the indexer's last audit",
            ["kind"],
            registry=self.registry,
        )
        self.component_up = Gauge(
            "quotra_component_up",
            "1 when a component works (database, chain, deployment, x402, settlement), else 0",
            ["component"],
            registry=self.registry,
        )
        self.listing_tokens = Counter(
            "quotra_listing_tokens_total",
            "Tokens per listing",
            ["listing", "direction"],
            registry=self.registry,
        )
