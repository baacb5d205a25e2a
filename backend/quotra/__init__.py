"""Quotra: a pay-per-call AI model marketplace (the relay lives in this package)."""

__version__ = "0.1.0"
