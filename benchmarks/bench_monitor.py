"""Cost of `SharpnessMonitor()` with its defaults on the demo workload, and its estimators against PyHessian.

Part ``overhead``:

Fits the demo's digits MLP (SGD, and SAM through SAMMixin) with and without the default
monitor, same Trainer and CSV logger, interleaved round by round in one process (the order
alternating), and prints the median fit times. Whole-fit times on a shared machine move
by several percent from run to run, so it also prints the time spent inside the
monitor's hooks as a share of the monitored fit: that is the monitor's cost, measured
directly. Target: at most 5%.

Part ``pyhessian``: on a small CNN (digits, one batch of 128, after 100 SGD steps), cold
start, the top eigenvalue by `hessian_top_eigs` against PyHessian's `eigenvalues()` with
its defaults (power iteration, maxIter=100, tol=1e-3), interleaved over 10 random starts:
median time and worst error against the dense Hessian's eigenvalue (target: <= 0.5x the
time at <= 1% error); and the trace: PyHessian's `trace()` with its defaults (Hutchinson
until the running mean settles) against Hutch++ with the fewest products that reach the
same RMS error over 10 seeds (target: fewer products).

Part ``measures``: each measure's cost per call, in forward+backward passes of the training
batch (timed in the same process), for the demo's digits MLP (SGD) and a small
``nn.TransformerEncoder`` classifier (AdamW, random tokens), each measure alone in a short
fit (``every_n_steps=5``, ``log_every_n_steps=5``): the time inside the monitor's hooks over
the calls made. From it, the share of a fit at Lightning's defaults (per-step measures on
every 50th step, ``log_every_n_steps``; the others every 250th, ``every_n_steps``):
``cost per call / (interval x step time)``. Targets: the default set at most 5%,
``critical_sharpness`` at most 1%.

    python benchmarks/bench_monitor.py [--part overhead|pyhessian|measures|all] [--rounds 6] [--epochs 40]
"""

from __future__ import annotations

import argparse
import math
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


HOOKS = (
    "setup",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
)
for _hook in HOOKS:
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


def small_cnn() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:128], dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target[:128])
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y


def dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = dict(model.named_parameters())
    sizes, shapes = [p.numel() for p in params.values()], [p.shape for p in params.values()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(params, tensors, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().flatten() for p in params.values()]))


def against_pyhessian(starts: int = 10) -> None:
    from pyhessian import hessian as PyHessian

    from lightning_sam.sharpness import hessian_top_eigs, hessian_trace

    model, x, y = small_cnn()
    params = list(model.parameters())
    hessian = dense_hessian(model, x, y).double()
    exact_top, exact_trace = torch.linalg.eigvalsh(hessian).max().item(), torch.trace(hessian).item()

    def loss_fn() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x), y)

    def theirs() -> PyHessian:
        h = PyHessian(model, torch.nn.functional.cross_entropy, data=(x, y), cuda=False)
        return h

    def clear() -> None:
        for p in params:
            p.grad = None  # PyHessian leaves create_graph gradients behind

    times: dict[str, list[float]] = {"PyHessian": [], "tol=1e-2": [], "tol=3e-2": []}
    errors: dict[str, list[float]] = {k: [] for k in times}
    products: dict[str, list[int]] = {k: [] for k in times}
    for seed in range(starts + 1):  # the first round warms up
        order = list(times) if seed % 2 else list(times)[::-1]
        for name in order:
            torch.manual_seed(seed)
            start = time.perf_counter()
            if name == "PyHessian":
                h = theirs()
                values, _ = h.eigenvalues()
                value, count = values[0], -1
            else:
                tol = float(name.split("=")[1])
                top = hessian_top_eigs(loss_fn, params, tol=tol, generator=torch.Generator().manual_seed(seed))
                value, count = top.eigenvalues[0].item(), top.products
            elapsed = time.perf_counter() - start
            clear()
            if seed:
                times[name].append(elapsed)
                errors[name].append(abs(value - exact_top) / exact_top)
                products[name].append(count)
    n = sum(p.numel() for p in params)
    print(f"small CNN ({n} parameters), one batch of 128 digits, CPU, torch {torch.__version__}, {starts} cold starts")
    print()
    print("| top eigenvalue | median time (ms) | time / PyHessian's | worst error vs dense | HVPs (median) |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["PyHessian"])
    for name in times:
        label = "PyHessian `eigenvalues()` (defaults)" if name == "PyHessian" else f"`hessian_top_eigs({name})`"
        hvps = "-" if name == "PyHessian" else f"{statistics.median(products[name]):.0f}"
        t = statistics.median(times[name])
        print(f"| {label} | {1e3 * t:.1f} | {t / base:.2f}x | {max(errors[name]):.2%} | {hvps} |")

    def rms(values: list[float]) -> float:
        return math.sqrt(statistics.fmean(v * v for v in values))

    their_errors, their_products = [], []
    for seed in range(starts):
        torch.manual_seed(seed)
        samples = theirs().trace()
        clear()
        their_errors.append(statistics.fmean(samples) - exact_trace)
        their_products.append(len(samples))
    target = rms(their_errors)
    print()
    print(f"| trace (exact {exact_trace:.2f}) | HVPs per estimate | RMS error over {starts} seeds |")
    print("|---|---:|---:|")
    print(f"| PyHessian `trace()` (defaults) | {statistics.median(their_products):.0f} (median) | {target:.3f} |")
    for samples in (6, 9, 12, 18, 24, 36, 48, 72, 96):
        ours = [
            hessian_trace(loss_fn, params, samples=samples, generator=torch.Generator().manual_seed(seed)).trace.item()
            - exact_trace
            for seed in range(starts)
        ]
        print(f"| `hessian_trace(samples={samples})`, Hutch++ | {samples} | {rms(ours):.3f} |")
        if rms(ours) <= target:
            break


class TokenClassifier(pl.LightningModule):
    """A 2-layer ``nn.TransformerEncoder`` (d_model 64, 4 heads) over 32 tokens, mean-pooled, AdamW."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        logits = self.head(self.encoder(self.embed(tokens)).mean(dim=1))
        return torch.nn.functional.cross_entropy(logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def workloads() -> dict[str, tuple[type[pl.LightningModule], DataLoader[Any], list[str]]]:
    from lightning_sam.measures import MEASURES

    train_set, _ = noisy_digits(0.4, 0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (512, 32), generator=generator)
    labels = tokens[:, :4].sum(dim=1) % 4
    token_set = torch.utils.data.TensorDataset(tokens, labels)
    every = [m for m in MEASURES if m not in ("sam_eos_ratio",)]
    return {
        "digits MLP (SGD)": (
            DigitsMLP,
            DataLoader(train_set, batch_size=32, shuffle=True),
            [m for m in every if m != "preconditioned_max_eig"],
        ),
        "transformer (AdamW)": (TokenClassifier, DataLoader(token_set, batch_size=32, shuffle=True), every),
    }


def pass_seconds(module: pl.LightningModule, batch: Any, reps: int = 20) -> float:
    """Median time of one forward+backward of ``training_step`` on ``batch``."""
    times = []
    for _ in range(reps + 3):
        start = time.perf_counter()
        module.zero_grad()
        module.training_step(batch, 0).backward()
        times.append(time.perf_counter() - start)
    module.zero_grad()
    return statistics.median(times[3:])


def measure_costs(steps: int = 40) -> None:
    from lightning_sam.callbacks import DEFAULT_MEASURES
    from lightning_sam.measures import MEASURES

    print(f"each measure alone, {steps}-step fits, CPU, torch {torch.__version__}; 1 pass = forward+backward")
    print()
    print(
        "| workload | measure | calls | per call (ms) | in passes | share of a fit at the defaults "
        "(target: defaults <= 5%, critical_sharpness <= 1%) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, (module_cls, data, names) in workloads().items():
        pl.seed_everything(0, verbose=False)
        module = module_cls()
        batch = next(iter(data))
        unit = pass_seconds(module, batch)
        plain = pl.Trainer(
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        start = time.perf_counter()
        plain.fit(module_cls(), data)
        step_seconds = (time.perf_counter() - start) / steps
        seconds_per_call(module_cls, data, 10, names)  # warm-up: first calls, lazy imports
        for measured in [*names, "defaults"]:
            chosen = list(DEFAULT_MEASURES) if measured == "defaults" else [measured]
            per_call, calls = seconds_per_call(module_cls, data, steps, chosen)
            if measured == "defaults":
                per_step = [m for m in chosen if MEASURES[m].per_step]
                # Per-step measures every 50 steps, the rest every 250: split the time by a fit of each part.
                share = _share_of_defaults(module_cls, data, steps, chosen, per_step, step_seconds)
            else:
                interval = 50 if MEASURES[measured].per_step else 250
                share = per_call / (interval * step_seconds)
            print(f"| {name} | {measured} | {calls} | {1e3 * per_call:.1f} | {per_call / unit:.1f} | {share:.2%} |")


def seconds_per_call(
    module_cls: type[pl.LightningModule], data: DataLoader[Any], steps: int, measures: list[str]
) -> tuple[float, int]:
    """The time inside the monitor's hooks per logged round, in a fit measuring every 5 steps, and the rounds."""
    pl.seed_everything(0, verbose=False)
    TimedMonitor.spent = 0.0
    monitor = TimedMonitor(measures=measures, every_n_steps=5)
    fit = pl.Trainer(
        max_steps=steps,
        logger=CSVLogger(tempfile.mkdtemp()),
        callbacks=[monitor],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    fit.fit(module_cls(), data)
    calls = len(monitor.history)
    return TimedMonitor.spent / max(calls, 1), calls


def _share_of_defaults(
    module_cls: type[pl.LightningModule],
    data: DataLoader[Any],
    steps: int,
    chosen: list[str],
    per_step: list[str],
    step_seconds: float,
) -> float:
    """The default set's share of a fit at Lightning's intervals, from one fit of its per-step and one of the rest."""
    share = 0.0
    for part, interval in ((per_step, 50), ([m for m in chosen if m not in per_step], 250)):
        if part:
            share += seconds_per_call(module_cls, data, steps, part)[0] / (interval * step_seconds)
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["overhead", "pyhessian", "measures", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.part in ("pyhessian", "all"):
        against_pyhessian()
        print()
    if args.part in ("measures", "all"):
        measure_costs()
        print()
    if args.part in ("pyhessian", "measures"):
        return
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
