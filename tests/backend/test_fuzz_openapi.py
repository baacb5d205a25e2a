"""Schemathesis over the relay's own OpenAPI document: no input may produce a 5xx."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from test_live_server import sandbox_listing, serve

# `make test` sets FUZZ_EXAMPLES; bounded so the whole run stays well under a minute.
EXAMPLES = min(int(os.environ.get("FUZZ_EXAMPLES", "15")), 15)


def test_no_input_produces_a_server_error(make_settings: Any) -> None:
    import httpx
    from eth_account import Account
    from relay_helpers import sign

    with serve(lambda **kw: make_settings(consumer_rate_per_minute=1_000_000, **kw)) as url:
        listing = sandbox_listing(url, models=["fuzz-model"])
        account = Account.create()
        with httpx.Client(base_url=url) as client:
            message = client.post("/v1/auth/nonce", json={"address": account.address}).json()["message"]
            token = client.post(
                "/v1/auth/verify", json={"message": message, "signature": sign(account, message)}
            )
            openapi = client.get("/openapi.json").json()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        schema = schemathesis.openapi.from_dict(openapi)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        seen: dict[int, int] = {}

        for operation in operations:
            definition = operation.definition.raw
            has_input = "requestBody" in definition or any(
                p.get("in") == "query" for p in definition.get("parameters", [])
            )
            # Invalid path strings are already covered by positive generation (any string).
            modes = list(schemathesis.GenerationMode) if has_input else [schemathesis.GenerationMode.POSITIVE]
            for mode in modes:

                @given(case=operation.as_strategy(generation_mode=mode))
                @hypothesis_settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: Any) -> None:
                    if (
                        "listing_id" in (case.path_parameters or {})
                        and case.path_parameters["listing_id"] == ""
                    ):
                        case.path_parameters["listing_id"] = listing["id"]
                    response = case.call(base_url=url, headers=headers, timeout=10)
                    seen[response.status_code] = seen.get(response.status_code, 0) + 1
                    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
                    content_type = (response.headers.get("content-type") or [""])[0]
                    if response.status_code >= 400 and content_type.startswith("application/json"):
                        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

                try:
                    check()
                except Unsatisfiable:
                    # nothing in this operation can be made invalid (no parameters, no body)
                    assert mode is schemathesis.GenerationMode.NEGATIVE
        assert 200 in seen and 400 in seen  # both valid and invalid inputs were exercised
