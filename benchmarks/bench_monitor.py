"""Cost of `SharpnessMonitor()` with its defaults on the demo workload.

Fits the demo's digits MLP (SGD, and SAM through SAMMixin) with and without the default
monitor, same Trainer and CSV logger, interleaved round by round in one process (the order
alternating), and prints the median fit times. Whole-fit times on a shared machine move
by several percent from run to run, so it also prints the time spent inside the
monitor's hooks as a share of the monitored fit: that is the monitor's cost, measured
directly. Target: at most 5%.

    python benchmarks/bench_monitor.py [--rounds 6] [--epochs 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_sam import SharpnessMonitor
from lightning_sam.demo import DigitsMLP, SAMDigitsMLP, noisy_digits


class TimedMonitor(SharpnessMonitor):
    """The default monitor, adding up the time spent in its hooks."""

    spent = 0.0


def _timed(name: str) -> Any:
    hook = getattr(SharpnessMonitor, name)

    def timed(self: TimedMonitor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            TimedMonitor.spent += time.perf_counter() - start

    return timed


for _hook in ("setup", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_train_end"):
    setattr(TimedMonitor, _hook, _timed(_hook))


def fit_seconds(use_sam: bool, with_monitor: bool, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    train_set, test_set = noisy_digits(0.4, 0)
    module = SAMDigitsMLP() if use_sam else DigitsMLP()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tempfile.mkdtemp()),
        callbacks=[TimedMonitor(rho=0.2)] if with_monitor else [],
        log_every_n_steps=25,  # as in the demo
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(test_set, batch_size=512))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    configs = [(sam, mon) for sam in (False, True) for mon in (False, True)]
    samples: dict[tuple[bool, bool], list[float]] = {c: [] for c in configs}
    inside: dict[bool, list[float]] = {False: [], True: []}
    for config in configs:  # warm-up: imports, first-call costs
        fit_seconds(*config, 2)
    for round_ in range(args.rounds):
        for config in configs if round_ % 2 == 0 else configs[::-1]:  # alternate the order: no position bias
            TimedMonitor.spent = 0.0
            samples[config].append(fit_seconds(*config, args.epochs))
            if config[1]:
                inside[config[0]].append(TimedMonitor.spent / samples[config][-1])
    t = {c: statistics.median(v) for c, v in samples.items()}
    print(
        f"demo workload (digits MLP, {args.epochs} epochs, batch 32), CPU, torch {torch.__version__}, "
        f"median of {args.rounds} interleaved rounds"
    )
    print()
    print(
        "| optimizer | fit without monitor (s) | fit with SharpnessMonitor() (s) | difference "
        "| time in the monitor's hooks / fit time (target <= 5%) |"
    )
    print("|---|---:|---:|---:|---:|")
    for sam in (False, True):
        base, monitored = t[(sam, False)], t[(sam, True)]
        share = statistics.median(inside[sam])
        name = "SAM (SAMMixin)" if sam else "SGD"
        print(f"| {name} | {base:.2f} | {monitored:.2f} | {monitored / base - 1:+.1%} | {share:.1%} |")


if __name__ == "__main__":
    main()
