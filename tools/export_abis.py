"""Writes the escrow's ABI from ape's build output into the package (`quotra/chain/abi`), which
the relay loads at run time: run after `make compile` whenever QuotraEscrow.vy changes."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    build = json.loads((ROOT / ".build" / "__local__.json").read_text())
    target = ROOT / "backend" / "quotra" / "chain" / "abi" / "QuotraEscrow.json"
    target.write_text(json.dumps(build["contractTypes"]["QuotraEscrow"]["abi"], indent=1) + "\n")
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
