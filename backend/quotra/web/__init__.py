"""The marketplace in a browser: a few HTML pages and their static files (plain ES modules, no
build step), served by the relay itself on its own origin under a strict Content-Security-Policy.

The pages talk only to this relay's API (`connect-src 'self'`). Browser libraries (`marked`,
`DOMPurify`) are pinned in package.json and copied into `static/vendor/` by `make setup`
(tools/web_vendor.py); they ship as package data and are never fetched from a CDN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_DIR: Final = Path(__file__).resolve().parent
PAGES_DIR: Final = WEB_DIR / "pages"
STATIC_DIR: Final = WEB_DIR / "static"
VENDOR_FILES: Final = ("marked.esm.js", "purify.es.mjs")

# No inline script or style, nothing from another origin, never framed.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidated on every load (ETag), so a new release is picked up at once.
    "Cache-Control": "no-cache",
}
PAGES: Final = {
    "/": "market.html",
    "/playground": "playground.html",
    "/account": "account.html",
    "/provider": "provider.html",
}


def missing_vendor_files() -> list[str]:
    """The browser libraries `make setup` should have copied, if any are missing."""
    return [name for name in VENDOR_FILES if not (STATIC_DIR / "vendor" / name).is_file()]


class SecureStaticFiles(StaticFiles):
    """Static files with the pages' security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def _page_route(filename: str) -> object:
    async def page() -> FileResponse:
        return FileResponse(PAGES_DIR / filename, media_type="text/html", headers=SECURITY_HEADERS)

    page.__name__ = f"page_{filename.removesuffix('.html')}"
    return page


router = APIRouter(include_in_schema=False)
for _path, _file in PAGES.items():
    router.add_api_route(_path, _page_route(_file), methods=["GET"])  # type: ignore[arg-type]


def static_files() -> SecureStaticFiles:
    return SecureStaticFiles(directory=STATIC_DIR)
