"""Accuracy against cost for SGD, SAM, ASAM and every variant, measured side by side in one run; at equal epochs and at
equal compute.

Accuracy: the clean test accuracy on scikit-learn's digits with 40% noisy training labels (the demo's task: a
64-256-256-10 MLP, SGD with momentum, 40 epochs, batch 32), for each seed. Cost: the mean step time over 40 steps
(so that every kind of step of a periodic method is in it) of each method divided by that of plain SGD measured
just before it, on the 784-1024-1024-10 MLP at batch 128, in plain loops driven by ``SAMStep``; the median of the
rounds; and each method's wall-clock on the task itself over SGD's (the median over seeds), which is the cost of
the methods that choose their SAM steps from the training's own gradients (AE-SAM), and its passes per step.
Writes the accuracy-against-cost figure with ``--figure``.

``--equal-compute`` then trains every method again for the epochs that SAM's wall-clock buys it, from each method's
own measured time per epoch on the task (SGD gets about twice SAM's epochs), and prints the second table: accuracy
at equal compute, with the wall-clock of those runs over SAM's as measured.

    python benchmarks/bench_variants.py [--seeds 0 1 2] [--epochs 40] [--rounds 5] [--equal-compute]
        [--figure docs/img/variants.png]

``--breakdown`` prints instead where each method's step time goes on that MLP: the base optimizer's step (timed by
its step hooks), the method's own work (every phase of SAM's step protocol, timed: norms, the copy, perturbation and
restore of the weights, the variant's direction and state, the verdict) and the rest, the forward and backward
passes, in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_sam import AESAM, GSAM, MSAM, RST, SAM, AELookSAM, FriendlySAM, LookSAM, SAMStep
from lightning_sam.demo import noisy_digits

SGD: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RHO = 0.2  # the demo's

# name -> (what it is, optimizer factory); None is plain SGD
METHODS: dict[str, tuple[str, Callable[[Any], torch.optim.Optimizer]]] = {
    "SGD": ("momentum 0.9", lambda p: torch.optim.SGD(p, **SGD)),
    "SAM": (f"rho={RHO}", lambda p: SAM(p, torch.optim.SGD, rho=RHO, **SGD)),
    "ASAM": ("rho=1.0, eta=0.01", lambda p: SAM(p, torch.optim.SGD, rho=1.0, adaptive=True, eta=0.01, **SGD)),
    "LookSAM": (f"rho={RHO}, k=5, alpha=0.7", lambda p: LookSAM(p, torch.optim.SGD, rho=RHO, k=5, alpha=0.7, **SGD)),
    "GSAM": (f"rho={RHO}, alpha=0.1", lambda p: GSAM(p, torch.optim.SGD, rho=RHO, alpha=0.1, **SGD)),
    "FriendlySAM": (
        f"rho={RHO}, sigma=1, lmbda=0.9",
        lambda p: FriendlySAM(p, torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.9, **SGD),
    ),
    "MSAM": ("rho=0.3", lambda p: MSAM(p, torch.optim.SGD, rho=0.3, **SGD)),
    "AE-SAM": (
        f"rho={RHO}, delta=0.9, lambda1=-1, lambda2=1",
        lambda p: AESAM(p, torch.optim.SGD, rho=RHO, delta=0.9, lambda1=-1.0, lambda2=1.0, **SGD),
    ),
    "AE-LookSAM": (
        f"rho={RHO}, alpha=0.7, delta=0.9, lambda1=-1, lambda2=1",
        lambda p: AELookSAM(p, torch.optim.SGD, rho=RHO, alpha=0.7, delta=0.9, lambda1=-1.0, lambda2=1.0, **SGD),
    ),
    "RST": (f"rho={RHO}, p=0.5", lambda p: RST(p, torch.optim.SGD, rho=RHO, p=0.5, **SGD)),  # seeded per run below
    "SAM every 2nd step": (f"rho={RHO}, interval=2", lambda p: SAM(p, torch.optim.SGD, rho=RHO, interval=2, **SGD)),
    "SAM every 4th step": (f"rho={RHO}, interval=4", lambda p: SAM(p, torch.optim.SGD, rho=RHO, interval=4, **SGD)),
    "late-phase SAM": (
        f"rho={RHO}, start=2/3 of the steps",
        lambda p: SAM(p, torch.optim.SGD, rho=RHO, start=2 / 3, **SGD),
    ),
}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: SAMStep | None, x: Any, y: Any) -> None:
    if step is None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return
    step.run(lambda: nn.functional.cross_entropy(model(x), y))
    opt.step()
    opt.zero_grad()


@dataclass(frozen=True)
class Run:
    """One training run on the demo's task: its clean test accuracy, its wall-clock and its passes per step."""

    accuracy: float
    seconds: float
    passes_per_step: float


def train(name: str, seed: int, epochs: int) -> Run:
    torch.manual_seed(seed)
    train_set, test_set = noisy_digits(0.4, seed=seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    opt = METHODS[name][1](model.parameters())
    if isinstance(opt, RST):  # its own generator: each seed its own draws
        opt = RST(model.parameters(), torch.optim.SGD, rho=RHO, p=0.5, seed=seed, **SGD)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
    if isinstance(opt, SAM) and opt.total_steps is None:
        opt.total_steps = epochs * len(loader)
    step = SAMStep(opt, model) if isinstance(opt, SAM) else None
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            train_step(model, opt, step, x, y)
    seconds = time.perf_counter() - start
    x, y = test_set.tensors
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return Run(accuracy, seconds, forwards[0] / (epochs * len(loader)))


def runs_of(names: Sequence[str], seeds: Sequence[int], epochs: Callable[[str], int]) -> dict[str, list[Run]]:
    """Every method on every seed, the methods interleaved within each seed (the machine's drift is shared)."""
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            runs[name].append(train(name, seed, epochs(name)))
    return runs


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def equal_compute(runs: dict[str, list[Run]], seeds: Sequence[int], epochs: int) -> dict[str, list[Run]]:
    """Every method again, for the epochs that SAM's wall-clock buys it: its measured time per epoch, not a guess.

    The time per epoch of each method is the median over seeds of its runs at ``epochs`` epochs (the equal-epochs
    table's runs, so that a method whose cost changes over training, AE-SAM's, is timed over a whole run).
    """
    per_epoch = {name: statistics.median(r.seconds for r in rs) / epochs for name, rs in runs.items()}
    budget = per_epoch["SAM"] * epochs
    given = {name: max(1, round(budget / per_epoch[name])) for name in runs}
    equal = runs_of(list(runs), seeds, given.__getitem__)
    print(
        f"\nAt equal compute: each method trains for the epochs SAM's {epochs} take ({budget:.1f} s per run, the "
        "median over seeds), from its own measured time per epoch; the last columns are measured in these runs."
    )
    print()
    print(
        "| method | epochs | accuracy (mean ± sd) | gain over SGD at equal compute | gain over SGD at equal epochs "
        "| wall-clock / SAM's | passes per step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    sgd_equal, sgd_epochs = (statistics.mean(r.accuracy for r in rs["SGD"]) for rs in (equal, runs))
    sam_seconds = statistics.median(r.seconds for r in equal["SAM"])
    for name, rs in equal.items():
        mean, spread = mean_sd([r.accuracy for r in rs])
        at_epochs = statistics.mean(r.accuracy for r in runs[name]) - sgd_epochs
        ratio = statistics.median(r.seconds for r in rs) / sam_seconds
        passes = statistics.mean(r.passes_per_step for r in rs)
        print(
            f"| {name} | {given[name]} | {mean:.1%} ± {spread:.1%} | {mean - sgd_equal:+.1%} | {at_epochs:+.1%} "
            f"| {ratio:.2f}x | {passes:.2f} |"
        )
    return equal


def step_time(name: str, steps: int = 40, warmup: int = 10) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = METHODS[name][1](model.parameters())
    if isinstance(opt, SAM) and opt.total_steps is None:  # late-phase: SAM on the last third of the timed steps
        opt.total_steps = int(1.5 * warmup) + steps
    step = SAMStep(opt, model) if isinstance(opt, SAM) else None
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    for _ in range(warmup):
        train_step(model, opt, step, x, y)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, step, x, y)
    return (time.perf_counter() - start) / steps


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def step_parts(name: str, steps: int = 40, warmup: int = 10) -> dict[str, float]:
    """Seconds per step: in all, in the base optimizer's step, in SAM's protocol (without the base step); passes."""
    model = mlp()
    opt = METHODS[name][1](model.parameters())
    if isinstance(opt, SAM) and opt.total_steps is None:
        opt.total_steps = int(1.5 * warmup) + steps
    step = SAMStep(opt, model) if isinstance(opt, SAM) else None
    spent = {"base": 0.0, "protocol": 0.0, "forwards": 0.0}
    model.register_forward_hook(lambda *_: spent.__setitem__("forwards", spent["forwards"] + 1))
    base = opt.base_optimizer if isinstance(opt, SAM) else opt
    started = [0.0]
    base.register_step_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter()))
    base.register_step_post_hook(lambda *_: spent.__setitem__("base", spent["base"] + time.perf_counter() - started[0]))
    if isinstance(opt, SAM):  # time every phase of the protocol; the base step inside finish is counted apart
        for phase in ("open", "perturb", "restore", "end_micro_batch", "finish"):
            _timed(opt.protocol, phase, spent)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    for _ in range(warmup):
        train_step(model, opt, step, x, y)
    spent.update(base=0.0, protocol=0.0, forwards=0.0)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, step, x, y)
    total = time.perf_counter() - start
    own = spent["protocol"] - (spent["base"] if isinstance(opt, SAM) else 0.0)
    return {
        "total": total / steps,
        "base": spent["base"] / steps,
        "own": own / steps,
        "passes": (total - own - spent["base"]) / steps,
        "forwards": spent["forwards"] / steps,
    }


def _timed(protocol: Any, phase: str, spent: dict[str, float]) -> None:
    method = getattr(protocol, phase)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent["protocol"] += time.perf_counter() - start

    setattr(protocol, phase, timed)


def breakdown(rounds: int) -> None:
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name in METHODS:
            parts[name].append(step_parts(name))

    def median(name: str, key: str) -> float:
        return statistics.median(p[key] for p in parts[name])

    print(f"784-1024-1024-10 MLP, batch 128, {rounds} interleaved rounds, torch {torch.__version__}; ms per step")
    print()
    print("| method | forward+backward passes | their time | base step | the method's own work | step | / SGD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    sgd = median("SGD", "total")
    for name in METHODS:
        print(
            f"| {name} | {median(name, 'forwards'):.2f} | {median(name, 'passes') * 1e3:.1f} | "
            f"{median(name, 'base') * 1e3:.1f} | {median(name, 'own') * 1e3:.1f} | {median(name, 'total') * 1e3:.1f} | "
            f"{median(name, 'total') / sgd:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--figure", default=None, help="write the accuracy-against-cost figure (PNG) there")
    parser.add_argument("--breakdown", action="store_true", help="where the step time goes, instead of the table")
    parser.add_argument(
        "--equal-compute", action="store_true", help="then every method again, for the epochs SAM's wall-clock buys it"
    )
    args = parser.parse_args()
    if args.breakdown:
        breakdown(args.rounds)
        return

    ratios: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):  # each method against an SGD run just before it: the machine's drift cancels
        for name in METHODS:
            sgd = step_time("SGD")
            ratios[name].append(step_time(name) / sgd)
    ratio = {name: statistics.median(r) for name, r in ratios.items()}
    runs_of(list(METHODS), [0], lambda _: 1)  # a warm-up of every method's code path: the runs below are timed
    runs = runs_of(list(METHODS), args.seeds, lambda _: args.epochs)
    accuracies = {name: [r.accuracy for r in rs] for name, rs in runs.items()}

    print(
        f"digits, 40% label noise, {args.epochs} epochs, seeds {args.seeds}; step time: 784-1024-1024-10 MLP, batch "
        f"128, {args.rounds} interleaved rounds, torch {torch.__version__}"
    )
    print()
    print(
        "| method | settings | clean test accuracy (mean ± sd) | gain over SGD | step time / SGD "
        "| wall-clock on the task / SGD | passes per step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    sgd = statistics.mean(accuracies["SGD"])
    sgd_seconds = statistics.median(r.seconds for r in runs["SGD"])
    for name, (settings, _) in METHODS.items():
        mean, spread = mean_sd(accuracies[name])
        passes = statistics.mean(r.passes_per_step for r in runs[name])
        wall = statistics.median(r.seconds for r in runs[name]) / sgd_seconds
        print(
            f"| {name} | {settings} | {mean:.1%} ± {spread:.1%} | {mean - sgd:+.1%} | {ratio[name]:.2f}x "
            f"| {wall:.2f}x | {passes:.2f} |"
        )
    if args.equal_compute:
        equal_compute(runs, args.seeds, args.epochs)
    if args.figure:
        figure(accuracies, ratio, args.figure)


def figure(accuracies: dict[str, list[float]], ratio: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, accs in accuracies.items():
        mean = statistics.mean(accs)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.errorbar(ratio[name], 100 * mean, yerr=100 * spread, fmt="o", capsize=3)
        ax.annotate(name, (ratio[name], 100 * mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("step time relative to SGD (784-1024-1024-10 MLP, CPU)")
    ax.set_ylabel("clean test accuracy, % (digits, 40% noisy labels)")
    ax.set_title("Accuracy against cost: mean and sd over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
