"""Time SAM's bookkeeping (``first_step`` + ``second_step``, no forward/backward).

Compares ``lightning_sam.SAM`` with ``pytorch_optimizer.SAM(foreach=False)`` and
``(foreach=True)`` on a model with many parameter tensors, all in one process with the
measurements interleaved, and prints each time relative to the fastest reference.

    python benchmarks/bench_optimizer.py [--layers 100] [--width 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytorch_optimizer
import torch
from torch import nn

from lightning_sam import SAM


class NoStepSGD(torch.optim.SGD):
    """SGD whose step does nothing, so that only SAM's own work is timed."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


def build(layers: int, width: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def timer(make_opt: Callable[[nn.Module], torch.optim.Optimizer], model: nn.Module, device: str) -> Callable[[], float]:
    opt = make_opt(model)
    grads = [p.grad for p in model.parameters()]

    def one_step() -> float:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.first_step()  # type: ignore[attr-defined]
        opt.second_step()  # type: ignore[attr-defined]
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return one_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=100, help="Linear layers (2 parameter tensors each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--with-base-step",
        dest="no_base_step",
        action="store_false",
        help="include SGD's own step (by default the base optimizer's step is a no-op: SAM's work alone)",
    )
    args = parser.parse_args()

    sgd = {"lr": 0.01, "momentum": 0.9}
    base = NoStepSGD if args.no_base_step else torch.optim.SGD
    candidates: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "pytorch_optimizer.SAM(foreach=False)": lambda m: pytorch_optimizer.SAM(
            m.parameters(), base, foreach=False, **sgd
        ),
        "pytorch_optimizer.SAM(foreach=True)": lambda m: pytorch_optimizer.SAM(
            m.parameters(), base, foreach=True, **sgd
        ),
        "lightning_sam.SAM(foreach=False)": lambda m: SAM(m.parameters(), base, foreach=False, **sgd),
        "lightning_sam.SAM(foreach=True)": lambda m: SAM(m.parameters(), base, foreach=True, **sgd),
        "lightning_sam.SAM() (default)": lambda m: SAM(m.parameters(), base, **sgd),
    }
    timers = {
        name: timer(make, build(args.layers, args.width, args.device), args.device) for name, make in candidates.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(args.warmup + args.rounds):
        for name, run in timers.items():  # interleaved: machine noise hits every candidate alike
            elapsed = run()
            if round_ >= args.warmup:
                samples[name].append(elapsed)

    medians = {name: statistics.median(times) for name, times in samples.items()}
    best_reference = min(t for name, t in medians.items() if name.startswith("pytorch_optimizer"))
    n_tensors = 2 * args.layers
    what = "SAM's work alone (no-op base step)" if args.no_base_step else "including the SGD momentum step"
    print(f"first_step + second_step, {what}, {n_tensors} tensors of {args.width}x{args.width}")
    print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, median of {args.rounds} interleaved rounds"
    )
    print()
    print("| implementation | median ms | vs fastest pytorch_optimizer |")
    print("|---|---:|---:|")
    for name, t in medians.items():
        print(f"| {name} | {t * 1e3:.2f} | {t / best_reference:.2f}x |")


if __name__ == "__main__":
    main()
