"""What the fake upstreams do, chosen by the requested model name, and the echo reply the
Anthropic and Gemini fakes give (one token per word, so tests can predict usage exactly).

Any model name not listed here gets a normal answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FAKE_API_KEY = "sk-test-quotra-fake-0123456789abcdefghijklmnop"

MODEL = "fake-model"
# Sleeps before answering (both plain and streaming): for client timeouts.
SLOW = "fake-slow"
SLOW_SECONDS = 2.0
# Streams a few chunks, then drops the TCP connection mid-body.
BREAK = "fake-break"
# Streams a few chunks, then ends the body cleanly but without the provider's end marker.
TRUNCATE = "fake-truncate"
# Streams slowly (DRIP_DELAY between events): for consumers that leave early.
DRIP = "fake-drip"
DRIP_DELAY = 0.02
# Streams a few chunks, then an error event in the provider's format.
STREAM_ERROR = "fake-stream-error"
# Refuses the key with an error message quoting the full key back (as careless proxies do).
ECHO_KEY = "fake-echo-key"
# Answers with a tool call to the first tool in the request (Anthropic, Gemini).
TOOL = "fake-tool"
# OpenAI only: SSE with comment lines, CRLF endings and a JSON payload split over data lines.
SSE_QUIRKS = "fake-sse-quirks"

RETRY_AFTER_SECONDS = 7
_ERROR = re.compile(r"^fake-error-(\d{3})$")


def error_model(status: int) -> str:
    """The model name that makes every fake answer `status` in its provider's error format."""
    return f"fake-error-{status}"


def error_status(model: str) -> int | None:
    match = _ERROR.match(model)
    return int(match.group(1)) if match else None


def count_tokens(*texts: str) -> int:
    return sum(len(text.split()) for text in texts)


@dataclass(frozen=True)
class EchoReply:
    text: str
    pieces: tuple[str, ...]  # streamed one per token; they join back to `text`
    hit_limit: bool  # max tokens reached
    stop_sequence: str | None  # which stop sequence ended it, if one did
    output_tokens: int


def echo_reply(last_user: str, max_tokens: int | None, stops: list[str]) -> EchoReply:
    """`Echo: <last user message>`, cut at the first stop sequence or after `max_tokens` words."""
    text = "Echo: " + " ".join(last_user.split())
    matched = None
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            text, matched = text[:at], stop
    words = text.split(" ")
    hit_limit = max_tokens is not None and len(text.split()) > max_tokens
    if hit_limit:
        assert max_tokens is not None
        words, matched = words[:max_tokens], None
        text = " ".join(words)
    pieces = tuple(w + " " for w in words[:-1]) + ((words[-1],) if words and words[-1] else ())
    return EchoReply(text, pieces, hit_limit, matched, count_tokens(text))
