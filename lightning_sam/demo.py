"""``lightning-sam demo``: plain SGD and SAM side by side on digits with noisy labels.

Trains the same MLP twice per seed, with SGD and with SAM (through ``SAMMixin``), on
scikit-learn's bundled ``load_digits`` (no download) with symmetric label noise on the
training split, ``SharpnessMonitor`` attached; prints a results table, writes a PNG
figure and logs every run to one W&B project (offline without a W&B login).

Needs the ``demo`` extra (scikit-learn, matplotlib): ``pip install "lightning-sam[demo]"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.measures import MEASURES
from lightning_sam.mixin import SAMMixin
from lightning_sam.optimizer import SAM

LOGGERS = ("wandb", "csv", "tensorboard", "none")
PROJECT = "lightning-sam-demo"
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
    """The same module with SAM: only the optimizer changes.

    Examples:
        >>> type(SAMDigitsMLP(rho=0.1).configure_optimizers()).__name__
        'SAM'
    """

    def __init__(self, lr: float = 0.05, hidden: int = 256, rho: float = 0.2, adaptive: bool = False) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.save_hyperparameters()

    def configure_optimizers(self) -> Any:  # noqa: D102
        hp = self.hparams
        return SAM(self.parameters(), torch.optim.SGD, rho=hp["rho"], adaptive=hp["adaptive"], lr=hp["lr"], **_SGD)


class _TestAccuracy(Callback):
    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "test_acc" in trainer.callback_metrics:
            self.curve.append((trainer.current_epoch + 1, float(trainer.callback_metrics["test_acc"])))


@dataclass
class RunResult:
    """What one fit produced.

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

    # Offline unless logged in (or WANDB_MODE says otherwise): an explicit wandb.init(mode=...) beats any setting.
    mode = None if "WANDB_MODE" in os.environ or _wandb_logged_in() else "offline"
    return WandbLogger(project=PROJECT, name=name, group=group, save_dir=str(out_dir), mode=mode)


def _wandb_logged_in() -> bool:
    """Whether W&B has credentials, asked without a prompt or a network call."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # a wandb without login(prompt=...)
        return bool(os.environ.get("WANDB_API_KEY"))


def fit_one(args: argparse.Namespace, use_sam: bool, seed: int, out_dir: Path) -> RunResult:
    """Train one model and collect its numbers."""
    pl.seed_everything(seed, verbose=False)
    train_set, test_set = noisy_digits(args.noise, seed)
    name = f"{'sam' if use_sam else 'sgd'}-seed{seed}"
    module: DigitsMLP = (
        SAMDigitsMLP(lr=args.lr, rho=args.rho, adaptive=args.adaptive) if use_sam else DigitsMLP(lr=args.lr)
    )
    logger = _logger(args.logger, out_dir, name, group=f"noise{args.noise}")
    # The monitor's rho is SAM's, so that first_order compares SGD and SAM at the same radius.
    monitor = SharpnessMonitor(measures=args.measures, every_n_steps=args.every_n_steps, rho=args.rho)
    accuracy = _TestAccuracy()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        logger=logger,
        callbacks=[accuracy, *([monitor] if logger else [])],
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.quiet,
        default_root_dir=out_dir,
    )
    start = time.perf_counter()
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(test_set, batch_size=512),
    )
    seconds = time.perf_counter() - start
    wandb_dir = None
    if args.logger == "wandb" and trainer.is_global_zero:
        import wandb

        wandb_dir = wandb.run.dir.rsplit("/files", 1)[0] if wandb.run is not None else None
        wandb.finish()
    return RunResult(
        name="SAM" if use_sam else "SGD",
        seed=seed,
        test_acc=accuracy.curve[-1][1] if accuracy.curve else float("nan"),
        train_loss=float(trainer.callback_metrics.get("train_loss", float("nan"))),
        seconds=seconds,
        sharpness=dict(monitor.last_values),
        accuracy_curve=accuracy.curve,
        sharpness_history=list(monitor.history),
        wandb_dir=wandb_dir,
        rank_zero=trainer.is_global_zero,
    )


def results_table(results: list[RunResult], measures: list[str]) -> str:
    """One row per run, then the mean over seeds of each optimizer."""
    keys = [f"sharpness/{m}" for m in measures if any(f"sharpness/{m}" in r.sharpness for r in results)]
    head = ["run", "seed", "clean test acc", "final train loss", *[k.split("/")[1] for k in keys], "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in results:
        values = [f"{r.sharpness[k]:.4g}" if k in r.sharpness else "" for k in keys]
        cells = [r.name, str(r.seed), f"{r.test_acc:.1%}", f"{r.train_loss:.3f}", *values, f"{r.seconds:.1f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    for name in ("SGD", "SAM"):
        runs = [r for r in results if r.name == name]
        if len(runs) > 1:
            acc = statistics.mean(r.test_acc for r in runs)
            lines.append(f"| **{name} mean** | {len(runs)} seeds | **{acc:.1%}** |" + " |" * (len(head) - 3))
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> Path:
    """Test accuracy per epoch and the sharpness curves, SGD beside SAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in results for _, row in r.sharpness_history for k in row})
    cols = min(3, 1 + len(keys))
    rows = -(-(1 + len(keys)) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    axes = grid.reshape(1, -1)
    for ax in axes[0, 1 + len(keys) :]:
        ax.set_visible(False)
    colors = {"SGD": "tab:blue", "SAM": "tab:red"}
    for r in results:
        label = f"{r.name} (seed {r.seed})"
        if r.accuracy_curve:
            epochs, accs = zip(*r.accuracy_curve, strict=True)
            axes[0, 0].plot(epochs, accs, color=colors[r.name], alpha=0.8, label=label)
        for ax, key in zip(axes[0, 1:], keys, strict=False):
            points = [(step, row[key]) for step, row in r.sharpness_history if key in row]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color=colors[r.name], alpha=0.8, marker="." if len(points) < 20 else None)
    axes[0, 0].set(title="clean test accuracy", xlabel="epoch")
    axes[0, 0].legend(fontsize=7)
    for ax, key in zip(axes[0, 1:], keys, strict=False):
        ax.set(title=key, xlabel="step")
        if key.endswith(("hessian_max_eig", "hessian_trace")):
            ax.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    """The demo's command line."""
    p = argparse.ArgumentParser(
        prog="lightning-sam demo",
        description="Train plain SGD and SAM side by side on scikit-learn's digits with noisy training labels.",
    )
    p.add_argument("--noise", type=float, default=0.4, help="fraction of training labels replaced at random, in [0, 1)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--rho", type=float, default=0.2, help="SAM's radius")
    p.add_argument("--adaptive", action="store_true", help="ASAM (use a larger --rho, e.g. 1.0)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2; works on CPU)")
    p.add_argument("--logger", default="wandb", help=f"one of {', '.join(LOGGERS)}")
    p.add_argument("--measures", nargs="+", default=["first_order", "grad_norm", "hessian_max_eig", "eos_ratio"])
    p.add_argument("--every-n-steps", type=int, default=200, help="interval of the Hessian measures")
    p.add_argument("--out-dir", type=Path, default=Path("lightning_sam_demo"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    if not 0 <= args.noise < 1:
        return f"--noise must be in [0, 1), got {args.noise}"
    if args.epochs < 1:
        return f"--epochs must be at least 1, got {args.epochs}"
    if args.logger not in LOGGERS:
        return f"--logger must be one of {', '.join(LOGGERS)}, got {args.logger!r}"
    if args.rho < 0:
        return f"--rho must be >= 0, got {args.rho}"
    if args.every_n_steps < 1:
        return f"--every-n-steps must be at least 1, got {args.every_n_steps}"
    unknown = [m for m in args.measures if m not in MEASURES]
    if unknown:
        return f"unknown --measures {unknown}; choose from {', '.join(MEASURES)}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    args = parser().parse_args(argv)
    problem = check(args)
    if problem:
        print(f"lightning-sam demo: error: {problem}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    os.environ.setdefault("WANDB_SILENT", "true")
    results = [fit_one(args, use_sam, seed, args.out_dir) for seed in args.seeds for use_sam in (False, True)]
    if not results[-1].rank_zero:
        return 0
    print()
    print(f"digits, {args.noise:.0%} symmetric label noise, {args.epochs} epochs, SAM rho={args.rho}")
    print(results_table(results, args.measures))
    figure = plot(results, args.out_dir / "sgd_vs_sam.png")
    print(f"\nFigure: {figure}")
    offline = [r.wandb_dir for r in results if r.wandb_dir and "offline-run" in r.wandb_dir]
    if offline:
        print("W&B runs were logged offline; upload them with:")
        print("  wandb sync " + " ".join(offline))
    return 0
