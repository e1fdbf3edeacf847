"""``lightning-sam demo [options]`` and ``lightning-sam plot RUN ...`` (or ``python -m lightning_sam ...``).

``demo``: see ``lightning_sam.demo``; ``plot``: see ``lightning_sam._plot_cli``. The command lines
are parsed and checked by ``lightning_sam._demo_cli`` and ``lightning_sam._plot_cli``, which import
neither torch nor Lightning, so that ``--help`` and every error answer at once; the slow imports
come after.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sam``; returns the exit code (bad input: 2, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from lightning_sam._plot_cli import main as plot

        return plot(argv[1:])
    from lightning_sam._demo_cli import parse

    args = parse(argv)  # --help, --version and errors exit here
    from lightning_sam.demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
