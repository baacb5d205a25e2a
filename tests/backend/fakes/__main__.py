"""`python tests/backend/fakes` (or `python -m fakes` from tests/backend): serve the fakes."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

if not __package__:  # run by path: make `fakes` (and an uninstalled `quotra`) importable
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here.parents[2] / "backend")]

from fakes.server import start_fake_upstreams


def main() -> None:
    with start_fake_upstreams() as fakes:
        for kind, url in fakes.base_urls.items():
            print(f"{kind:18} {url}")
        print(f"{'api key':18} {fakes.api_key}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
