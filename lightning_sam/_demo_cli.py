"""The ``lightning-sam`` command line: parsing and checking, without importing torch or Lightning.

Everything a user can get wrong on the command line is checked here, before the slow imports, so
that ``--help`` and every error answer at once. An error is one line on stderr that names the
option and its valid values, with exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning_sam._registry import METHODS, Method

__all__ = [
    "ACCELERATORS",
    "COMMANDS",
    "DEFAULT_MEASURES",
    "DEFAULT_METHODS",
    "LOGGERS",
    "LOGGER_PACKAGES",
    "MEASURE_NAMES",
    "METHODS",
    "PRECISIONS",
    "STRATEGIES",
    "Method",
    "demo_parser",
    "install_extra",
    "main_parser",
    "parse",
    "parse_demo",
]

LOGGERS = ("wandb", "csv", "tensorboard", "none")
# The packages a logger can use (any one of them); the demo extra installs the first.
LOGGER_PACKAGES: dict[str, tuple[str, ...]] = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
# Lightning's precision values (transformer-engine left out: it needs NVIDIA's package).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true", "32", "64", "bf16", "16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
# The demo reads its curves from callbacks in the process that runs the script, so it offers the strategies that
# train there (ddp starts copies of the whole script): spawned workers would take the callbacks with them.
STRATEGIES = ("auto", "ddp")
# The names of lightning_sam.measures.MEASURES (a test keeps the two in step).
MEASURE_NAMES = (
    "first_order",
    "grad_norm",
    "sam_fraction",
    "hessian_max_eig",
    "hessian_top_eigs",
    "preconditioned_max_eig",
    "eos_ratio",
    "sam_eos_ratio",
    "hessian_trace",
    "adaptive_avg",
    "adaptive_worst",
    "critical_sharpness",
)
DEFAULT_MEASURES = ("first_order", "grad_norm", "hessian_max_eig", "eos_ratio")
SEED_MAX = 2**32 - 1
TRAIN_SAMPLES = 1257  # scikit-learn's 1797 digits, 30% held out for the test split (lightning_sam.demo.noisy_digits)


DEFAULT_METHODS = ("sgd", "sam", "looksam")
COMMANDS = ("demo", "plot")  # `plot` is dispatched by lightning_sam.__main__ before this parser


def install_extra(extra: str) -> str:
    """How to install one of the package's extras (it is not on PyPI yet: from the clone it was installed from).

    Examples:
        >>> install_extra("demo")
        'pip install ".[demo]" in your lightning_sam clone'
    """
    return f'pip install ".[{extra}]" in your lightning_sam clone'


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` as one line and exit with 2."""
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + " ", message)
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], options, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            message += f" ({hint}{self.prog} --help lists the options)"
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _number(kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False) -> Any:
    """An argparse type: a finite number of ``kind`` in a range; its error message states the range."""
    name = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        wanted = f"{name} in [{low:g}, {high:g})" if kind is float else f"{name} from {low} to {high}"
    elif low is not None:
        wanted = f"{name} {'>' if open_low else '>='} {low:g}"
    else:
        wanted = name

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value)
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or (value < high if kind is float else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return convert


def _choice(values: Sequence[str]) -> Callable[[str], str]:
    """An argparse type: one of ``values``; its error message lists them."""

    def convert(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"got {text!r}; valid values: {', '.join(values)}")
        return text

    return convert


def _option(p: argparse.ArgumentParser, name: str, default: Any, text: str, **kwargs: Any) -> None:
    """Add an option whose help ends with its default."""
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    p.add_argument(name, default=default, help=f"{text} (default: {shown})".lstrip(), **kwargs)


def demo_parser() -> argparse.ArgumentParser:
    """The ``lightning-sam demo`` command line.

    Examples:
        >>> demo_parser().parse_args([]).methods
        ['sgd', 'sam', 'looksam']
    """
    methods = "\n".join(f"  {name:<12} {m.summary}" for name, m in METHODS.items())
    p = _OneLineParser(
        prog="lightning-sam demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train SGD, SAM and SAM's variants side by side on scikit-learn's digits (no download) with noisy\n"
            "training labels; print one table (clean test accuracy, sharpness and wall time per method, mean ± sd\n"
            "over seeds), draw one figure and log every run (to W&B offline without a login).\n\n"
            f"methods:\n{methods}"
        ),
        epilog=f"Needs the demo extra (scikit-learn, matplotlib, W&B, TensorBoard): {install_extra('demo')}",
    )

    def choices(values: Sequence[str]) -> str:
        return "{" + ",".join(values) + "}"

    _option(p, "--methods", list(DEFAULT_METHODS), f"what to train, from {choices(list(METHODS))}",
            nargs="+", type=_choice(list(METHODS)), metavar="METHOD")  # fmt: skip
    _option(p, "--seeds", [0, 1, 2], "one run per seed and method; the seed also draws the split and the noise",
            nargs="+", type=_number(int, 0, SEED_MAX), metavar="SEED")  # fmt: skip
    _option(p, "--noise", 0.4, "fraction of the training labels replaced by another class, in [0, 1)",
            type=_number(float, 0.0, 1.0))  # fmt: skip
    _option(p, "--epochs", 40, "training epochs, >= 1", type=_number(int, 1))
    _option(p, "--lr", 0.05, "SGD's learning rate, > 0", type=_number(float, 0.0, open_low=True))
    _option(p, "--batch-size", 32, "training batch size; each epoch's last, ragged batch is dropped",
            type=_number(int, 1))  # fmt: skip
    _option(p, "--rho", 0.2, "radius of sam, looksam, gsam, friendlysam and of the monitor's first_order, >= 0",
            type=_number(float, 0.0))  # fmt: skip
    _option(p, "--asam-rho", 1.0, "ASAM's radius, >= 0", type=_number(float, 0.0))
    _option(p, "--msam-rho", 0.3, "MSAM's radius, >= 0", type=_number(float, 0.0))
    p.add_argument("--adaptive", action="store_true", help="asam in place of sam in --methods (kept for old commands)")
    _option(p, "--precision", "32-true", f"Lightning's precision, from {choices(PRECISIONS)}",
            type=_choice(PRECISIONS), metavar="PRECISION")  # fmt: skip
    _option(p, "--accelerator", "cpu", f"from {choices(ACCELERATORS)}", type=_choice(ACCELERATORS), metavar="NAME")
    _option(p, "--devices", 1, "devices per run (processes on CPU), >= 1", type=_number(int, 1))
    _option(p, "--strategy", "auto", f"from {choices(STRATEGIES)}; ddp with --devices 2 works on CPU",
            type=_choice(STRATEGIES), metavar="NAME")  # fmt: skip
    _option(p, "--logger", "wandb", f"from {choices(LOGGERS)}; W&B logs offline without a login; none: no measures",
            type=_choice(LOGGERS), metavar="NAME")  # fmt: skip
    _option(p, "--measures", list(DEFAULT_MEASURES), f"SharpnessMonitor measures, from {choices(MEASURE_NAMES)}",
            nargs="+", type=_choice(MEASURE_NAMES), metavar="MEASURE")  # fmt: skip
    _option(p, "--every-n-steps", 200, "interval of the Hessian measures, in optimizer steps", type=_number(int, 1))
    _option(p, "--threads", 1, "torch's CPU threads per process, >= 1: the demo's MLP is too small for a second thread "
            "to pay, and on a busy machine more threads than free cores slow it down severalfold",
            type=_number(int, 1))  # fmt: skip
    _option(p, "--out-dir", Path("lightning_sam_demo"), "where the figure, results.csv and the logs go", type=Path)
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true", help="progress bars even when stdout is not a terminal")
    bars.add_argument("--quiet", action="store_true", help="no progress bars, even on a terminal")
    return p


def parse_demo(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the demo's arguments; a problem exits with code 2 and one line on stderr.

    Examples:
        >>> args = parse_demo(["--adaptive", "--methods", "sgd", "sam", "sam", "--logger", "csv"])
        >>> args.methods
        ['sgd', 'asam']
    """
    parser = demo_parser()
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys("asam" if args.adaptive and m == "sam" else m for m in args.methods))
    args.seeds = list(dict.fromkeys(args.seeds))
    args.measures = list(dict.fromkeys(args.measures))
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir got {str(args.out_dir)!r}, a file; give a directory (created if missing)")
    per_process = math.ceil(TRAIN_SAMPLES / args.devices)  # a process's share, as Lightning's DistributedSampler pads
    if args.batch_size > per_process:  # every epoch drops its ragged last batch: nothing would train
        where = f" ({per_process} per process with --devices {args.devices})" if per_process < TRAIN_SAMPLES else ""
        parser.error(
            f"--batch-size got {args.batch_size}, more than the training split's {TRAIN_SAMPLES} samples{where}; "
            f"give at most {per_process}"
        )
    if args.accelerator == "cpu" and args.precision in ("16-mixed", "16"):
        parser.error(
            f"--precision got {args.precision!r}: float16 AMP needs a GPU (--accelerator gpu); "
            "valid values on CPU: 32-true, bf16-mixed, 64-true, bf16-true"
        )
    for package in ("sklearn", "matplotlib"):
        if importlib.util.find_spec(package) is None:
            parser.error(f"needs {package}, which the demo extra installs: {install_extra('demo')}")
    packages = LOGGER_PACKAGES.get(args.logger, ())
    if packages and all(importlib.util.find_spec(name) is None for name in packages):
        parser.error(
            f"--logger {args.logger} needs the {packages[0]} package: {install_extra('demo')} "
            f"(or another --logger: {', '.join(LOGGERS)})"
        )
    return args


def _version() -> str:
    """The installed version, from the package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-sam")
    except PackageNotFoundError:  # a source tree that is not installed
        return "(not installed)"


def main_parser() -> argparse.ArgumentParser:
    """The top-level ``lightning-sam`` command line: its commands are ``demo`` and ``plot``."""
    p = _OneLineParser(
        prog="lightning-sam",
        usage="lightning-sam [-h] [--version] {demo,plot} [options]",
        description="Sharpness-Aware Minimization for PyTorch and PyTorch Lightning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "commands:\n"
            "  demo        SGD, SAM and SAM's variants side by side on digits with noisy labels\n"
            "              (lightning-sam demo --help lists its options)\n"
            "  plot        the sharpness curves of your own runs (W&B, CSV or TensorBoard logs) in one PNG\n"
            "              (lightning-sam plot --help lists its options)"
        ),
    )
    p.add_argument("--version", action="version", version=f"lightning-sam {_version()}")
    p.add_argument("command", nargs="?", type=_choice(list(COMMANDS)), metavar="COMMAND", help=argparse.SUPPRESS)
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``lightning-sam ARGV`` into the demo's arguments; ``--help``, ``--version`` and errors exit here.

    Examples:
        >>> parse(["demo", "--seeds", "3", "--logger", "csv"]).seeds
        [3]
    """
    argv = list(argv)
    if argv and argv[0] == "demo":
        return parse_demo(argv[1:])
    top = main_parser()
    if not argv:
        top.error(f"a command is needed; valid commands: {', '.join(COMMANDS)} (lightning-sam --help for more)")
    if not argv[0].startswith("-"):
        top.error(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)} (lightning-sam --help for more)")
    top.parse_args(argv)  # --help and --version exit with 0, anything else with one line and 2
    top.error(f"unrecognized arguments: {' '.join(argv)}")
