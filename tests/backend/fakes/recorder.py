"""What the fake upstreams saw, readable from the test's thread while they run in their own."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RecordedRequest:
    provider: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    client: tuple[str, int] | None  # the address it came from: one per connection


@dataclass(frozen=True)
class StreamClose:
    provider: str
    model: str
    completed: bool  # False: the client went away (or the fake broke the stream on purpose)


@dataclass
class Recorder:
    requests: list[RecordedRequest] = field(default_factory=list)
    stream_closes: list[StreamClose] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def record_request(self, request: RecordedRequest) -> None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()

    def record_close(self, provider: str, model: str, completed: bool) -> None:
        with self._changed:
            self.stream_closes.append(StreamClose(provider, model, completed))
            self._changed.notify_all()

    def last_request(self, provider: str) -> RecordedRequest:
        with self._changed:
            for request in reversed(self.requests):
                if request.provider == provider:
                    return request
        raise LookupError(f"no request reached the fake {provider} upstream")

    def wait_for_close(self, provider: str, model: str, *, timeout: float = 5.0) -> StreamClose | None:
        """The next stream close of `model` at `provider` not yet taken, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i, close in enumerate(self.stream_closes):
                    if close.provider == provider and close.model == model:
                        return self.stream_closes.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def clear(self) -> None:
        with self._changed:
            self.requests.clear()
            self.stream_closes.clear()
