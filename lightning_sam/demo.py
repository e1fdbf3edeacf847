"""``lightning-sam demo``: SGD, SAM and SAM's variants side by side on digits with noisy labels.

Trains the same MLP once per method and seed (SGD, or a SAM optimizer through ``SAMMixin``) on
scikit-learn's bundled ``load_digits`` (no download) with symmetric label noise on the training
split, ``SharpnessMonitor`` attached; prints one table (mean ± sd over seeds per method), writes
one figure and ``results.csv``, and logs every run with its full configuration (to one W&B
project by default, offline without a W&B login). The command line is parsed and checked, without
importing torch, by ``lightning_sam._demo_cli``.

Needs the ``demo`` extra (scikit-learn, matplotlib, wandb, tensorboard): ``pip install ".[demo]"`` in the clone.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_sam
from lightning_sam._demo_cli import METHODS, parse_demo
from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.hessian import Spectrum
from lightning_sam.mixin import SAMMixin
from lightning_sam.optimizer import SAM

PROJECT = "lightning-sam-demo"
FIGURE = "sgd_vs_sam.png"
_SGD: dict[str, Any] = {"momentum": 0.9, "weight_decay": 5e-4}


def noisy_digits(noise: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Digits split 70/30 (stratified), with symmetric noise on the training labels.

    A fraction ``noise`` of the training labels is replaced by a uniformly drawn *other*
    class; the test split stays clean.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(y_train)
    flip = torch.rand(len(labels), generator=generator) < noise
    labels[flip] = (labels[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=generator)) % 10
    train = TensorDataset(torch.as_tensor(x_train, dtype=torch.float32), labels)
    return train, TensorDataset(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test))


def train_loader(train_set: Dataset[Any], batch_size: int) -> DataLoader[Any]:
    """Shuffled batches, all full: the last, ragged batch of each epoch is dropped.

    A 9-sample batch (1257 samples, batch 32) has a noisier gradient than the others: on the
    steps where it is logged, gradient-based measures spike.

    Examples:
        >>> train, _ = noisy_digits(0.4, seed=0)
        >>> {len(x) for x, _ in train_loader(train, 32)}, len(train_loader(train, 32))
        ({32}, 39)
    """
    return DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)


class DigitsMLP(pl.LightningModule):
    """A 64-256-256-10 MLP trained with SGD (momentum 0.9, weight decay 5e-4).

    Examples:
        >>> DigitsMLP()(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, lr: float = 0.05, hidden: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: D102
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:  # noqa: D102
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], **_SGD)


class SAMDigitsMLP(SAMMixin, DigitsMLP):
    """The same module with SAM or one of its variants: only the optimizer changes.

    ``optimizer`` names the class in ``lightning_sam`` (``"SAM"``, ``"LookSAM"``, ...) and
    ``settings`` its arguments besides ``rho`` and ``adaptive``.

    Examples:
        >>> type(SAMDigitsMLP(rho=0.1).configure_optimizers()).__name__
        'SAM'
        >>> SAMDigitsMLP(optimizer="LookSAM", settings={"k": 5}).configure_optimizers().k
        5
    """

    def __init__(
        self,
        lr: float = 0.05,
        hidden: int = 256,
        rho: float = 0.2,
        adaptive: bool = False,
        optimizer: str = "SAM",
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters()

    def configure_optimizers(self) -> Any:  # noqa: D102
        hp = self.hparams
        kind: type[SAM] = getattr(lightning_sam, hp["optimizer"])
        extra = dict(hp["settings"] or {})
        return kind(
            self.parameters(), torch.optim.SGD, rho=hp["rho"], adaptive=hp["adaptive"], lr=hp["lr"], **_SGD, **extra
        )


def build_module(method: str, args: argparse.Namespace) -> DigitsMLP:
    """The module for one of ``METHODS`` with the command line's settings.

    Examples:
        >>> from lightning_sam._demo_cli import parse_demo
        >>> opt = build_module("asam", parse_demo(["--logger", "csv"])).configure_optimizers()
        >>> opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"], opt.param_groups[0]["eta"]
        (1.0, True, 0.01)
    """
    spec = METHODS[method]
    if spec.optimizer is None:
        return DigitsMLP(lr=args.lr)
    kwargs = spec.kwargs(getattr(args, spec.rho_from or "rho"))
    rho, adaptive = kwargs.pop("rho"), kwargs.pop("adaptive", False)
    return SAMDigitsMLP(lr=args.lr, rho=rho, adaptive=adaptive, optimizer=spec.optimizer, settings=kwargs)


class _TestAccuracy(Callback):
    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "test_acc" in trainer.callback_metrics:
            self.curve.append((trainer.current_epoch + 1, float(trainer.callback_metrics["test_acc"])))


@dataclass
class RunResult:
    """What one fit produced. ``seconds`` is the slowest rank's time for the fit (``rank_seconds`` holds each).

    Examples:
        >>> RunResult("SAM", seed=0, test_acc=0.9, train_loss=1.2, seconds=5.0, sharpness={}).test_acc
        0.9
    """

    name: str
    seed: int
    test_acc: float
    train_loss: float
    seconds: float
    sharpness: dict[str, float]
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    sharpness_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    wandb_dir: str | None = None
    rank_zero: bool = True
    method: str = ""
    settings: str = ""
    rank_seconds: list[float] = field(default_factory=list)
    spectrum: Spectrum | None = None  # the Hessian's eigenvalue density at the end of training


class _Rejected(Exception):
    """A setting that Lightning rejected (the message names the options); the demo exits with 2."""


class _QuietLightning(logging.Filter):
    """Drops Lightning's tips about other products, and repeats of its information lines (one set per fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tip:" in message[:16]:
            return False
        if record.levelno > logging.INFO:
            return True
        seen = message in self.seen
        self.seen.add(message)
        return not seen


@contextmanager
def _quiet() -> Iterator[None]:
    """While the demo runs: no Lightning tips or repeated information lines, no warnings that do not concern it."""
    quiet = _QuietLightning()
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    for logger in loggers:
        logger.addFilter(quiet)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        with warnings.catch_warnings():
            for pattern in (
                ".*does not have many workers.*",
                ".*isinstance.treespec, LeafSpec.*",
                ".*logging interval.*",
            ):
                warnings.filterwarnings("ignore", pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _logger(kind: str, out_dir: Path, name: str, group: str) -> Any:
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(out_dir, name=name)
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out_dir, name=name)
    from lightning.pytorch.loggers import WandbLogger

    from lightning_sam.wandb_integration import offline_unless_logged_in

    # Offline unless logged in (or WANDB_MODE says otherwise): an explicit wandb.init(mode=...) beats any setting.
    return WandbLogger(project=PROJECT, name=name, group=group, save_dir=str(out_dir), mode=offline_unless_logged_in())


def run_config(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Everything that defines one run, as logged with it (W&B config, CSV/TensorBoard hparams).

    Examples:
        >>> from lightning_sam._demo_cli import parse_demo
        >>> config = run_config(parse_demo(["--logger", "csv", "--noise", "0.2"]), "looksam", seed=1)
        >>> config["method"], config["seed"], config["noise"], config["k"], config["rho"]
        ('looksam', 1, 0.2, 5, 0.2)
    """
    spec = METHODS[method]
    optimizer = spec.kwargs(getattr(args, spec.rho_from or "rho"))
    return {
        "method": method,
        "optimizer": spec.optimizer or "SGD",
        "method_settings": spec.describe(optimizer.get("rho")),
        **optimizer,
        "seed": seed,
        "noise": args.noise,
        "lr": args.lr,
        **_SGD,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "drop_last": True,
        "precision": args.precision,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "measures": list(args.measures),
        "every_n_steps": args.every_n_steps,
        "monitor_rho": args.rho,
        "data": "sklearn load_digits, 70/30 stratified split, symmetric noise on the training labels",
        "model": "MLP 64-256-256-10",
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "lightning_sam": lightning_sam.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _trainer(args: argparse.Namespace, **kwargs: Any) -> pl.Trainer:
    try:
        return pl.Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
            strategy=args.strategy,
            precision=args.precision,
            **kwargs,
        )
    except MisconfigurationException as error:
        given = f"{args.accelerator}, {args.devices}, {args.strategy}, {args.precision}"
        raise _Rejected(f"--accelerator/--devices/--strategy/--precision ({given}): {error}") from None


def fit_one(args: argparse.Namespace, method: str, seed: int, out_dir: Path, announce: str | None = None) -> RunResult:
    """Train one model and collect its numbers; ``announce`` is printed once its Trainer accepted the settings."""
    pl.seed_everything(seed, verbose=False)
    train_set, test_set = noisy_digits(args.noise, seed)
    module = build_module(method, args)
    logger = _logger(args.logger, out_dir, name=f"{method}-seed{seed}", group=f"noise{args.noise}")
    # The monitor's rho is --rho for every method, so that first_order compares them at the same radius.
    # And the Hessian's spectrum at the end of the last epoch: SGD's outliers against SAM's narrow bulk.
    monitor = SharpnessMonitor(
        measures=args.measures, every_n_steps=args.every_n_steps, rho=args.rho, spectrum_epochs=[args.epochs - 1]
    )
    accuracy = _TestAccuracy()
    trainer = _trainer(
        args,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[accuracy, *([monitor] if logger else [])],
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=(sys.stdout.isatty() or args.progress) and not args.quiet,
        default_root_dir=out_dir,
    )
    if announce and _is_launcher_rank():
        print(announce, flush=True)
    config = run_config(args, method, seed)
    if logger:
        logger.log_hyperparams(config)
    start = time.perf_counter()
    trainer.fit(module, train_loader(train_set, args.batch_size), DataLoader(test_set, batch_size=512))
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=trainer.strategy.root_device)
    rank_seconds = trainer.strategy.all_gather(elapsed).flatten().tolist()  # one per rank; the slowest counts
    wandb_dir = None
    if args.logger == "wandb" and trainer.is_global_zero:
        import wandb

        wandb_dir = wandb.run.dir.rsplit("/files", 1)[0] if wandb.run is not None else None
        wandb.finish()
    return RunResult(
        name=METHODS[method].label,
        seed=seed,
        test_acc=accuracy.curve[-1][1] if accuracy.curve else float("nan"),
        train_loss=float(trainer.callback_metrics.get("train_loss", float("nan"))),
        seconds=max(rank_seconds),
        sharpness=dict(monitor.last_values),
        accuracy_curve=accuracy.curve,
        sharpness_history=list(monitor.history),
        wandb_dir=wandb_dir,
        rank_zero=trainer.is_global_zero,
        method=method,
        settings=config["method_settings"],
        rank_seconds=rank_seconds,
        spectrum=monitor.spectra[-1][1] if monitor.spectra else None,
    )


def _mean_sd(values: Sequence[float], fmt: str, unit: str = "") -> str:
    """``mean ± sd`` (the sample standard deviation over seeds, to the mean's decimals); one seed: the value.

    Examples:
        >>> _mean_sd([0.0452, 0.0408], ".3g"), _mean_sd([71.0], ".1f", "%")
        ('0.043 ± 0.003', '71.0%')
    """
    values = [v for v in values if v == v]
    if not values:
        return "—"  # not measured for this method
    mean = format(statistics.mean(values), fmt)
    if len(values) == 1:
        return f"{mean}{unit}"
    decimals = len(mean.partition(".")[2]) if "e" not in mean else 2
    return f"{mean} ± {statistics.stdev(values):.{decimals}f}{unit}"


def sharpness_keys(results: Sequence[RunResult], measures: Sequence[str]) -> list[str]:
    """The ``sharpness/...`` values to report: the measures' own in the asked order, then the others they logged.

    ``hessian_top_eigs`` logs ``hessian_eig_1``, ...; diagnostics (``*_residual``, ``*_stderr``) are left out.

    Examples:
        >>> run = RunResult("SAM", 0, 0.9, 1.0, 5.0, {"sharpness/hessian_eig_1": 2.0, "sharpness/grad_norm": 1.0})
        >>> sharpness_keys([run], ["grad_norm", "hessian_top_eigs", "eos_ratio"])
        ['sharpness/grad_norm', 'sharpness/hessian_eig_1']
    """
    logged = list(dict.fromkeys(k for r in results for k in r.sharpness))
    keys = [f"sharpness/{m}" for m in measures if f"sharpness/{m}" in logged]
    return keys + [k for k in logged if k not in keys and not k.endswith(("_residual", "_stderr"))]


def results_table(results: list[RunResult], measures: Sequence[str]) -> str:
    """One row per method: its settings and the mean ± sd over seeds of each number.

    Examples:
        >>> runs = [RunResult("SGD", s, 0.7 + s / 100, 1.0, 6.0 + s, {"sharpness/grad_norm": 3.0}) for s in (0, 2)]
        >>> print(results_table(runs, ["grad_norm"]).splitlines()[2])
        | SGD |  | 2 | 71.0 ± 1.4% | 1.000 ± 0.000 | 3 ± 0 | 7.0 ± 1.4 s |
    """
    keys = sharpness_keys(results, measures)
    head = ["method", "settings", "seeds", "clean test acc", "final train loss", *[k.split("/")[1] for k in keys]]
    head.append("wall time per run")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name in dict.fromkeys(r.name for r in results):
        runs = [r for r in results if r.name == name]
        cells = [name, runs[0].settings, str(len(runs)), _mean_sd([100 * r.test_acc for r in runs], ".1f", "%")]
        cells.append(_mean_sd([r.train_loss for r in runs], ".3f"))
        cells += [_mean_sd([r.sharpness[k] for r in runs if k in r.sharpness], ".3g") for k in keys]
        cells.append(_mean_sd([r.seconds for r in runs], ".1f", " s"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def machine(args: argparse.Namespace) -> str:
    """Where the demo ran, in one line: processor, cores, threads, versions and the Trainer's device flags."""
    threads = torch.get_num_threads()
    device = f"{_cpu_name()}, {os.cpu_count()} CPU cores, torch on {_count(threads, 'thread')}"
    if args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)}, {device}"
    versions = f"torch {torch.__version__}, lightning {_version('lightning')}, Python {platform.python_version()}"
    flags = f"{args.precision} on {args.accelerator} x {args.devices} ({args.strategy})"
    return f"{platform.system()}, {device}; {versions}; {flags}"


def _count(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless n is 1.

    Examples:
        >>> _count(1, "run"), _count(9, "run")
        ('1 run', '9 runs')
    """
    return f"{n} {noun}{'s' * (n != 1)}"


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none): how busy it was around the runs."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _is_launcher_rank() -> bool:
    """Whether this process is the one the user started (DDP's launcher sets LOCAL_RANK in the copies it starts)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def report_run(result: RunResult, done: int, planned: int) -> None:
    """One line for a finished run, flushed at once (a pipe or a log file gets it too), from rank zero only.

    Examples:
        >>> report_run(RunResult("SAM", 1, 0.906, 1.2, 5.61, {}, settings="rho=0.2"), 2, 9)
        [2/9] SAM (rho=0.2), seed 1: clean test accuracy 90.6%, 5.6 s
    """
    if result.rank_zero:
        settings = f" ({result.settings})" if result.settings else ""
        accuracy = f"clean test accuracy {100 * result.test_acc:.1f}%"
        print(f"[{done}/{planned}] {result.name}{settings}, seed {result.seed}: {accuracy}, {result.seconds:.1f} s",
              flush=True)  # fmt: skip


def write_csv(results: list[RunResult], path: Path) -> Path:
    """One row per run: the numbers behind the table, seed by seed."""
    keys = sorted({k for r in results for k in r.sharpness})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "settings", "seed", "test_acc", "train_loss", "seconds", "rank_seconds", *keys])
        for r in results:
            ranks = " ".join(f"{s:.3f}" for s in r.rank_seconds)
            numbers = [f"{r.test_acc:.4f}", f"{r.train_loss:.4f}", f"{r.seconds:.3f}", ranks]
            writer.writerow([r.method, r.settings, r.seed, *numbers, *[r.sharpness.get(k, "") for k in keys]])
    return path


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments (from ``lightning_sam._demo_cli.parse_demo``); returns the exit code."""
    # In every process (DDP runs this whole command once per rank); OMP_NUM_THREADS too, or Lightning's launcher
    # would set cores // processes threads where it is unset.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    planned = [(m, seed) for seed in args.seeds for m in args.methods]  # seed-major: a slow spell hits every method
    threads = _count(args.threads, "thread")
    announce = f"{_count(len(planned), 'run')}, torch on {threads} per process; a line as each one ends"
    start = time.perf_counter()
    results: list[RunResult] = []
    try:
        with _quiet():
            for m, seed in planned:
                results.append(fit_one(args, m, seed, args.out_dir, announce=None if results else announce))
                report_run(results[-1], len(results), len(planned))
    except _Rejected as error:
        print(f"lightning-sam demo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    load_after = load_average()
    loaded = load_before is not None and load_after is not None
    load = f"load average {load_before:.1f} before, {load_after:.1f} after" if loaded else ""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # DDP: no gloo thread left to abort a rank as it exits
    if not results[-1].rank_zero:
        return 0
    from lightning_sam._demo_plot import draw

    seeds = " ".join(map(str, args.seeds))
    setting = (
        f"digits, {args.noise:.0%} symmetric label noise on the training labels, {args.epochs} epoch"
        f"{'s' * (args.epochs > 1)}, batch "
        f"{args.batch_size}, SGD lr {args.lr} (momentum 0.9, weight decay 5e-4), seeds {seeds}"
    )
    where = machine(args)
    timing = f"{_count(len(results), 'run')} in {total:.0f} s" + (f" ({load})" if load else "")
    print()
    print(setting)
    print(f"mean ± sd over {len(args.seeds)} seed(s); the monitor's first_order at rho={args.rho} for every method")
    print(results_table(results, args.measures))
    print(f"{timing}, on {where}")
    table = write_csv(results, args.out_dir / "results.csv")
    keys = sharpness_keys(results, args.measures)
    # The cost panel's times are this machine's at this load, not the methods' intrinsic costs: its label says so.
    conditions = f"torch on {threads}" + (f", load {load_before:.1f} → {load_after:.1f}" if loaded else "")
    figure = draw(results, keys, args.out_dir / FIGURE, title=f"{setting}\n{timing}, on {where}", cost_note=conditions)
    print(f"Figure: {figure}\nPer run: {table}")
    offline = [r.wandb_dir for r in results if r.wandb_dir and "offline-run" in r.wandb_dir]
    if offline:
        print("W&B runs were logged offline; upload them with:")
        print("  wandb sync " + " ".join(offline))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the demo; returns the exit code (2 with one line on stderr for bad input)."""
    try:
        args = parse_demo(argv)
    except SystemExit as done:  # --help, or a bad value (its line is printed)
        return done.code if isinstance(done.code, int) else 2
    return run(args)
