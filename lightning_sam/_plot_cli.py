"""``lightning-sam plot RUN [RUN ...]``: the sharpness curves of your own runs in one PNG.

The command line is parsed and checked here without importing torch or matplotlib, so that
``--help`` and every error answer at once. The runs are read by ``lightning_sam.runs`` and drawn
by ``lightning_sam._demo_plot.draw_runs``. An error is one line on stderr, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning_sam._demo_cli import _OneLineParser, install_extra

__all__ = ["PACKAGES", "main", "plot_parser"]

# What reading each format needs (a package, and how to install it); matplotlib draws the figure.
PACKAGES = {
    "matplotlib": ("matplotlib", install_extra("plot")),
    "wandb": ("wandb", install_extra("wandb")),
    "tensorboard": ("tensorboard", "pip install tensorboard"),
}


def plot_parser() -> argparse.ArgumentParser:
    """The ``lightning-sam plot`` command line.

    Examples:
        >>> args = plot_parser().parse_args(["logs/version_0", "--keys", "grad_norm", "--metric", "val_acc"])
        >>> [str(run) for run in args.runs], args.keys, args.metric, str(args.out)
        (['logs/version_0'], ['grad_norm'], ['val_acc'], 'sharpness.png')
    """
    p = _OneLineParser(
        prog="lightning-sam plot",
        usage="lightning-sam plot [-h] RUN [RUN ...] [--out FILE.png] [--keys KEY ...] [--metric KEY ...] [--title T]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Draw the sharpness curves that SharpnessMonitor logged in your own runs into one PNG, one colour per\n"
            "run: one panel per sharpness/* scalar against the optimizer step, and the Hessian spectrum density\n"
            "when a run logged one to W&B (spectrum_epochs=[...]).\n\n"
            "RUN is any mix of:\n"
            "  W&B run folders (wandb/offline-run-*, wandb/run-*) or a folder holding wandb/ (the save_dir)\n"
            "  CSVLogger folders (version_N with its metrics.csv) or a folder holding them\n"
            "  TensorBoard event files (events.out.tfevents.*) or folders holding them\n"
            "A run is labelled by its W&B name, else by its folder (e.g. lightning_logs/version_3)."
        ),
        epilog=(
            f"Needs matplotlib ({install_extra('plot')}),\nwandb for W&B runs and tensorboard for event files.\n"
            "example: lightning-sam plot wandb/offline-run-* lightning_logs --metric val_acc --out sharpness.png"
        ),
    )
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN", help="a run, or a folder of runs")
    p.add_argument("--out", type=Path, default=Path("sharpness.png"), metavar="FILE.png",
                   help="the PNG to write, its folder created if missing (default: sharpness.png)")  # fmt: skip
    p.add_argument("--keys", nargs="+", default=[], metavar="KEY",
                   help="only these panels, e.g. grad_norm sharpness/hessian_max_eig spectrum (the sharpness/ prefix "
                   "may be left out); default: every sharpness/* scalar the runs logged, and the spectrum "
                   "(give the RUNs first: what follows --keys is read as keys)")  # fmt: skip
    p.add_argument("--metric", nargs="+", default=[], metavar="KEY",
                   help="extra panels of other scalars the runs logged, e.g. val_acc train_loss")  # fmt: skip
    p.add_argument("--title", default="", metavar="T", help="the figure's title (default: none)")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What can be checked before reading a run: the paths exist, the output is a PNG, matplotlib is there."""
    if not args.runs:
        after = (
            " (a RUN after --keys or --metric is read as a key: give the runs first)"
            if args.keys or args.metric
            else ""
        )
        parser.error(f"needs at least one RUN{after}")
    for path in args.runs:
        if not path.exists():
            parser.error(f"RUN got {str(path)!r}, which does not exist")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out got {str(args.out)!r}; give a .png file")
    if args.out.is_dir():
        parser.error(f"--out got {str(args.out)!r}, a directory; give a .png file")
    _need(parser, "matplotlib", "to draw the figure")


def _need(parser: argparse.ArgumentParser, what: str, why: str) -> None:
    package, install = PACKAGES[what]
    if importlib.util.find_spec(package) is None:
        parser.error(f"needs the {package} package {why}: {install}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sam plot ARGV``; returns the exit code (bad input: 2, with one line on stderr).

    Examples:
        >>> main(["--out", "x.jpg", "."])
        2
    """
    parser = plot_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        _check(parser, args)
        from lightning_sam.runs import RunsError, drawable, find_runs, panel_keys, points, read_runs

        try:
            formats = {kind for kind, _ in find_runs(args.runs)}
            for kind in ("wandb", "tensorboard"):
                if kind in formats:
                    _need(parser, kind, f"to read {'W&B' if kind == 'wandb' else 'TensorBoard'} runs")
            runs = read_runs(args.runs)
            keys = panel_keys(runs, args.keys, args.metric)
            runs, skipped = drawable(runs, keys)
        except RunsError as error:
            parser.error(str(error))
        except OSError as error:  # a file that cannot be read
            parser.error(f"cannot read {error.filename!r}: {error.strerror}")
    except SystemExit as done:  # --help (0), or one line on stderr (2)
        return done.code if isinstance(done.code, int) else 2
    from lightning_sam._demo_plot import draw_runs

    try:
        with warnings.catch_warnings():  # numpy's overflow warnings on values near the float range: the error says it
            warnings.simplefilter("ignore", RuntimeWarning)
            path = draw_runs(runs, keys, args.out, args.title)
    except OSError as error:
        print(f"{parser.prog}: error: cannot write {str(args.out)!r}: {error.strerror or error}", file=sys.stderr)
        return 2
    except (ValueError, OverflowError) as error:  # matplotlib: values it cannot place on an axis (±1e308)
        print(f"{parser.prog}: error: cannot draw these values: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    count = points(runs, keys)
    print(f"wrote {path}: {len(runs)} run{'s' * (len(runs) != 1)}, {len(keys)} panels, {count} points")
    if skipped:
        print(f"skipped {len(skipped)} run{'s' * (len(skipped) != 1)} with nothing to draw in them: "
              f"{', '.join(run.label for run in skipped)}")  # fmt: skip
    return 0
