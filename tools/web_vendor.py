"""Copies the marketplace pages' browser libraries, pinned in package.json and installed by npm,
into the relay's static files (backend/quotra/web/static/vendor/), with their licences: what
`make setup` runs. The relay ships them as package data; nothing is fetched from a CDN."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "backend" / "quotra" / "web" / "static" / "vendor"
# (npm package, file in it, name under vendor/)
FILES = (
    ("marked", "lib/marked.esm.js", "marked.esm.js"),
    ("marked", "LICENSE", "marked.LICENSE"),
    ("dompurify", "dist/purify.es.mjs", "purify.es.mjs"),
    ("dompurify", "LICENSE", "dompurify.LICENSE"),
)


def main() -> int:
    VENDOR.mkdir(parents=True, exist_ok=True)
    for package, path, name in FILES:
        source = ROOT / "node_modules" / package / path
        if not source.is_file():
            print(f"web_vendor: {source} is missing; run `npm install` (make setup)", file=sys.stderr)
            return 1
        # The source map comment would make browser tools ask for a file that is not shipped.
        text = source.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if not line.startswith("//# sourceMappingURL=")]
        (VENDOR / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"web_vendor: {len(FILES)} files in {VENDOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
