"""Step time of a SAMMixin module against the same module under automatic optimization.

Every configuration runs in this one process, round after round, interleaved, so that
machine noise hits all alike; each round is a fresh Trainer and the step time is taken
between ``on_train_batch_start`` and ``on_train_batch_end`` (no data loading). Printed:
the median step time of each and its ratio to Lightning's automatic optimization with
the base optimizer, the spread of the round medians (how steady each is), the same
SAMMixin with a fresh copy of the weights allocated every step (what version 0.1 did,
before SAM kept one buffer), plus plain PyTorch loops (base optimizer; the floor of any
SAM, two forward/backward passes with no SAM work; and ``pytorch_optimizer.SAM``) to show
what Lightning itself costs. On CUDA it also prints
peak memory.

    python benchmarks/bench_mixin.py [--device cpu|cuda] [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytorch_optimizer
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAM, SAMMixin

SGD = {"lr": 0.01, "momentum": 0.9}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "cnn (3x32x32, batch 64)": (cnn, (3, 32, 32), 64),
    "mlp 784-1024-1024-10 (batch 128)": (mlp, (784,), 128),
}


class Plain(pl.LightningModule):
    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), **SGD)


class WithSAM(SAMMixin, Plain):
    def __init__(self, make: Callable[[], nn.Module], fresh_copy: bool = False) -> None:
        super().__init__(make)
        self.fresh_copy = fresh_copy

    def configure_optimizers(self) -> Any:
        opt = SAM(self.parameters(), torch.optim.SGD, rho=0.05, **SGD)
        if self.fresh_copy:  # version 0.1: a new copy of the weights at every first_step
            opt.protocol.buffers.get = lambda params, role, wide=False: [torch.empty_like(p) for p in params]  # type: ignore[method-assign]
        return opt


class StepTimer(Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args: Any) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self.start)


def data(shape: tuple[int, ...], batch: int, steps: int, device: torch.device) -> DataLoader[Any]:
    x = torch.randn(batch * steps, *shape, device=device)
    y = torch.randint(0, 10, (batch * steps,), device=device)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def lightning_run(module: pl.LightningModule, loader: DataLoader[Any], device: torch.device, warmup: int) -> float:
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    return statistics.median(timer.times[warmup:])


def plain_run(
    make: Callable[[], nn.Module], loader: DataLoader[Any], device: torch.device, warmup: int, sam: str
) -> float:
    torch.manual_seed(0)
    model = make().to(device)
    if sam in ("none", "two_passes"):
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **SGD)
    else:
        opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, foreach=sam == "foreach", **SGD)
    times = []
    for x, y in loader:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if sam == "none":
            opt.step()
        elif sam == "two_passes":  # the floor: both passes, no SAM bookkeeping (norm, copy, perturb, restore)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            opt.first_step(zero_grad=True)  # type: ignore[attr-defined]
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step()  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def peak_memory(run: Callable[[], float], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() / 2**20


TARGETS = {"cnn": 2.0, "mlp": 2.0}


def measure(
    name: str, make: Callable[[], nn.Module], loader: DataLoader[Any], device: torch.device, rounds: int, warmup: int
) -> str:
    runs: dict[str, Callable[[], float]] = {
        "auto": lambda: lightning_run(Plain(make), loader, device, warmup),
        "sam": lambda: lightning_run(WithSAM(make), loader, device, warmup),
        "sam_fresh": lambda: lightning_run(WithSAM(make, fresh_copy=True), loader, device, warmup),
        "plain": lambda: plain_run(make, loader, device, warmup, "none"),
        "two_passes": lambda: plain_run(make, loader, device, warmup, "two_passes"),
        "po_foreach": lambda: plain_run(make, loader, device, warmup, "foreach"),
        "po_loop": lambda: plain_run(make, loader, device, warmup, "loop"),
    }
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            samples[key].append(run())
    t = {key: statistics.median(v) for key, v in samples.items()}

    def spread(key: str) -> str:
        return f"{(max(samples[key]) - min(samples[key])) / t[key]:.0%}"

    mem_auto, mem_sam = peak_memory(runs["auto"], device), peak_memory(runs["sam"], device)
    memory = f"{mem_auto:.0f} / {mem_sam:.0f}" if mem_auto is not None and mem_sam is not None else "n/a on CPU"
    target = TARGETS[name.split()[0]]
    return (
        f"| {name} | {t['auto'] * 1e3:.2f} ({spread('auto')}) | {t['sam'] * 1e3:.2f} ({spread('sam')}) "
        f"| {t['sam'] / t['auto']:.2f}x (<= {target}x) "
        f"| {t['sam_fresh'] / t['auto']:.2f}x ({spread('sam_fresh')}) "
        f"| {t['plain'] * 1e3:.2f} | {t['two_passes'] / t['plain']:.2f}x "
        f"| {t['po_foreach'] / t['plain']:.2f}x / {t['po_loop'] / t['plain']:.2f}x "
        f"| {memory} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    name_of = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"device: {device} ({name_of}), torch {torch.__version__}, lightning {pl.__version__}, "
        f"{args.rounds} interleaved rounds of {args.steps} steps (median step time; in brackets the spread of the "
        "round medians, (max - min) / median)"
    )
    print()
    print(
        "| workload | Lightning automatic, SGD (ms) | SAMMixin + SAM(SGD) (ms) | ratio (target) "
        "| ratio with a fresh weight copy per step (0.1) "
        "| plain loop SGD (ms) | plain loop, two passes and no SAM work (ratio to plain SGD) "
        "| plain pytorch_optimizer.SAM foreach / no foreach (ratio to plain SGD) "
        "| peak MiB automatic / SAMMixin |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (make, shape, batch) in WORKLOADS.items():
        print(measure(name, make, data(shape, batch, args.steps, device), device, args.rounds, args.warmup))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    main()
