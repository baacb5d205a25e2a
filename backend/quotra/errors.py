"""One exception hierarchy for the relay, rendered once (in `quotra.app`) as OpenAI error objects.

Body shape: `{"error": {"message", "type", "param", "code"}}`, which every OpenAI client parses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class QuotraError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}


class BadRequest(QuotraError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InputTooLarge(BadRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(QuotraError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PaymentRequired(QuotraError):
    status_code = 402
    type = "payment_required"
    code = "payment_required"


class Forbidden(QuotraError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(QuotraError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(QuotraError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(QuotraError):
    status_code = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RateLimited(QuotraError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExhausted(QuotraError):
    status_code = 429
    type = "insufficient_quota"
    code = "listing_quota_exhausted"


class UpstreamFailed(QuotraError):
    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class ServiceUnavailable(QuotraError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


@contextmanager
def chain_read() -> Iterator[None]:
    """Reading the chain: any failure but the relay's own errors is a 503 `chain_unavailable`."""
    try:
        yield
    except QuotraError:
        raise
    except Exception as exc:
        raise ServiceUnavailable("The chain could not be read; try again", code="chain_unavailable") from exc


def error_body(
    status: int, message: str, *, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
