"""``python -m lightning_sam demo [options]``: see ``lightning_sam.demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch the ``lightning-sam`` subcommands."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print("usage: lightning-sam demo [options]   (lightning-sam demo --help for the options)", file=sys.stderr)
        return 2
    from lightning_sam.demo import main as demo

    return demo(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
