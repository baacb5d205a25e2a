"""The upstream adapter contract: the exceptions, usage and completion types every adapter
returns, and the `Adapter` protocol the relay codes against.

Every adapter speaks OpenAI chat-completions on its side: `complete` returns an OpenAI
`chat.completion` object, `stream` yields `chat.completion.chunk` objects whose last one carries
`usage` (with `choices == []`). Messages of these exceptions never contain an API key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "Adapter",
    "Completion",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamUnavailable",
    "Usage",
    "approx_tokens",
]


class UpstreamError(Exception):
    """An upstream call failed.

    `status_code` is the upstream's HTTP status when it answered, otherwise 504 (timeout) or 502
    (connection error, broken stream, unreadable answer). `retryable` says whether the same
    request with the same key may succeed later. `provider` is the adapter kind, `error_type`
    the provider's own error type or code when it sent one.
    """

    default_status: ClassVar[int] = 502
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retryable: bool | None = None,
        provider: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = self.default_status if status_code is None else status_code
        if retryable is not None:
            self.retryable = retryable
        self.provider = provider
        self.error_type = error_type

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code}, message={self.message!r})"


class UpstreamAuthError(UpstreamError):
    """The upstream refused the API key (401/403, or Gemini's 400 API_KEY_INVALID)."""

    default_status = 401


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429. `retry_after` is in seconds when the upstream said so."""

    default_status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """5xx, overload, timeout, connection error, or a stream that broke off."""

    default_status = 502
    retryable = True


class UpstreamBadRequest(UpstreamError):
    """The request itself was refused (400/404/422...): the client's fault, not the provider's."""

    default_status = 400


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class Completion:
    body: dict[str, Any]
    """An OpenAI `chat.completion` object; its `usage` matches `usage`."""
    usage: Usage


@runtime_checkable
class Adapter(Protocol):
    kind: str

    async def complete(self, request: dict[str, Any], *, api_key: str, model: str) -> Completion: ...

    def stream(self, request: dict[str, Any], *, api_key: str, model: str) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI chunks; the last one carries `usage` and has `choices == []`.

        Nothing is sent until the first `__anext__()`, which raises the upstream's refusal
        (auth, rate limit, bad request) before any chunk exists, so a relay can pull the first
        chunk before it commits to a 200. Closing the iterator (or cancelling the task that
        iterates it) closes the upstream request.
        """
        ...

    async def check_key(self, api_key: str) -> None: ...


def approx_tokens(chars: int) -> int:
    """Token estimate used where an upstream reports none: about four characters per token."""
    return (chars + 3) // 4
