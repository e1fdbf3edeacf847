"""``lightning-sam demo [options]`` (or ``python -m lightning_sam demo``): see ``lightning_sam.demo``.

The command line is parsed and checked by ``lightning_sam._demo_cli``, which imports neither torch
nor Lightning, so that ``--help`` and every error answer at once; the demo's imports come after.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sam``; returns the exit code (bad input: 2, with one line on stderr)."""
    from lightning_sam._demo_cli import parse

    args = parse(sys.argv[1:] if argv is None else argv)  # --help, --version and errors exit here
    from lightning_sam.demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
