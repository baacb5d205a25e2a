"""`make demo` / `quotra demo` / `python -m quotra_dev.demo`: the whole marketplace on one machine.

`marketplace` runs the story with real processes (twin, relay, local relayer, a local model);
`onchain` tells only the escrow's part, straight against the contracts.
"""

from __future__ import annotations

import sys

from rich.console import Console


def main(*, keep: bool = False, chain_only: bool = False) -> int:
    """Run the demo; 0 on success, 1 with a one-line reason on failure, 130 on Ctrl-C."""
    from quotra_dev.demo import marketplace, onchain

    console = Console()
    try:
        if chain_only:
            onchain.run(console)
        else:
            summary = marketplace.run(console, keep=keep)
            if not summary.ok:
                console.print("[bold red]demo failed:[/] a check did not hold (see above)")
                return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every process was stopped[/]")
        return 130
    except Exception as exc:  # one line for the user, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        console.print(f"[bold red]demo failed:[/] {message}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(keep="--keep" in sys.argv[1:], chain_only="--chain-only" in sys.argv[1:]))
