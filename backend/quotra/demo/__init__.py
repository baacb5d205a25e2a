"""`make demo` / `python -m quotra.demo`: Quotra's story told on a local Base Sepolia twin."""

from __future__ import annotations

import sys

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 with a one-line reason on failure, 130 on Ctrl-C."""
    from quotra.demo import onchain

    console = Console()
    try:
        onchain.run(console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the local chain was stopped[/]")
        return 130
    except Exception as exc:  # one line for the user, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        console.print(f"[bold red]demo failed:[/] {message}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
