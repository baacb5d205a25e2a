"""How the relay's routes are declared: request bodies are parsed within `quotra.bounds`, and
every route names in OpenAPI the errors it answers (OpenAI's error shape), so that the document
says what the relay really does."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any, Final

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict

from quotra import bounds


class BoundedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = bounds.loads(await self.body())
        return self._json


class BoundedRoute(APIRoute):
    """A route whose JSON body is parsed by `quotra.bounds.loads` (a bad one is a 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedRequest(request.scope, request.receive))

        return bounded


class ErrorObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape; a 402 also carries the x402 v1 offer (`x402Version`, `accepts`)."""

    model_config = ConfigDict(extra="allow")

    error: ErrorObject


_MEANING: Final = {
    400: "Invalid request: a parameter or the body is malformed or out of bounds",
    401: "Not signed in, an invalid session, or an unknown API key",
    402: "Payment required: the free calls are used up or the budget does not cover the call",
    403: "Not allowed for this wallet",
    404: "Not found, or not offered by this relay",
    409: "Conflicts with what exists (a payment already used, a claim in flight)",
    413: "The request body is too large",
    429: "Rate limited, or the listing has no calls left",
    431: "The request headers are too large",
    502: "The upstream failed; nothing was charged",
    503: "A dependency (the chain, the relayer, the database) is unavailable; nothing was charged",
}
# Any route may answer these: the middleware bounds every request before it reaches one.
_EVERY_ROUTE: Final = (413, 431)


# OpenAPI links: where what one operation answers leads (what a stateful client, or schemathesis,
# follows): (path, method, status) -> (parameter, where its value is in the answer, operations).
_LINKS: Final = {
    ("/v1/listings", "post", "201"): (
        "listing_id",
        "$response.body#/id",
        [("/v1/listings/{listing_id}", m) for m in ("get", "patch", "delete")]
        + [("/v1/listings/{listing_id}/pause", "post"), ("/v1/listings/{listing_id}/resume", "post")],
    ),
    ("/v1/account/keys", "post", "201"): (
        "key_id",
        "$response.body#/id",
        [("/v1/account/keys/{key_id}", "patch"), ("/v1/account/keys/{key_id}", "delete")],
    ),
    ("/v1/provider/claims", "post", "202"): (
        "claim_id",
        "$response.body#/id",
        [("/v1/provider/claims/{claim_id}", "get")],
    ),
    ("/v1/revocations", "post", "202"): (
        "revocation_id",
        "$response.body#/id",
        [("/v1/revocations/{revocation_id}", "get")],
    ),
    ("/v1/chat/completions", "post", "200"): (
        "call_id",
        "$response.header.Quotra-Call-Id",
        [("/v1/calls/{call_id}", "get")],
    ),
}


def _links(schema: dict[str, Any]) -> None:
    for (path, method, status), (parameter, value, targets) in _LINKS.items():
        response = schema["paths"][path][method]["responses"][status]
        response["links"] = {
            re.sub(r"[^A-Za-z0-9_]+", "_", f"{target_method}{target}").strip("_"): {
                "operationRef": "#/paths/"
                + target.replace("~", "~0").replace("/", "~1")
                + "/"
                + target_method,
                "parameters": {parameter: value},
            }
            for target, target_method in targets
        }


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that answers these errors."""
    return {status: {"model": ErrorResponse, "description": _MEANING[status]} for status in statuses}


def relayed(model: type[BaseModel], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that has the relayer submit a signed message and waits for it
    (bounded): 200 once final, 202 while only submitted, and these errors."""
    return {202: {"model": model, "description": "Submitted, not yet confirmed"}, **errors(*statuses)}


def submitted(response: Response, result: dict[str, Any]) -> bool:
    """Whether the relayer's transaction is only submitted (`status`), then answered with 202."""
    if result["status"] != "submitted":
        return False
    response.status_code = 202
    return True


def openapi_document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: FastAPI's document with the relay's errors and links. Validation errors are
    400s, never FastAPI's 422, and the middleware's bounds apply to every route."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation["responses"]
                    responses.pop("422", None)
                    for status in _EVERY_ROUTE:
                        responses.setdefault(
                            str(status),
                            {
                                "description": _MEANING[status],
                                "content": {
                                    "application/json": {
                                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                                    }
                                },
                            },
                        )
            _links(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(error.pop("$defs"))
            components["ErrorResponse"] = error
            app.openapi_schema = schema
        return app.openapi_schema

    return document
