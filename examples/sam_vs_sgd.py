"""SAM against plain SGD on scikit-learn's bundled digits with noisy training labels.

A plain PyTorch loop with `lightning_sam.SAM`: no download, about half a minute on a
laptop CPU. Run it as ``python examples/sam_vs_sgd.py [--epochs 40] [--noise 0.4]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_sam import SAM


def noisy_digits(noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Digits split 70/30; a fraction ``noise`` of training labels replaced by random other classes."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(y_train)
    flip = torch.rand(len(labels), generator=gen) < noise
    labels[flip] = (labels[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=gen)) % 10
    as_float = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return as_float(x_train), labels, as_float(x_test), torch.as_tensor(y_test)


def train(use_sam: bool, epochs: int, noise: float, rho: float, seed: int) -> tuple[float, float, float]:
    """Train an MLP; return clean test accuracy, final train loss and wall time."""
    x_train, y_train, x_test, y_test = noisy_digits(noise, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    opt = (
        SAM(model.parameters(), torch.optim.SGD, rho=rho, **kwargs)
        if use_sam
        else torch.optim.SGD(model.parameters(), **kwargs)
    )
    loss_fn = nn.CrossEntropyLoss()
    start, loss = time.perf_counter(), torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(32):
            x, y = x_train[idx], y_train[idx]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = closure()  # gradient at w
            if use_sam:
                opt.step(closure)  # gradient at w + e, then the SGD step
            else:
                opt.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, loss.item(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels replaced at random")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.noise < 1:
        parser.error(f"--noise must be in [0, 1), got {args.noise}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    print(f"digits, {args.noise:.0%} label noise, {args.epochs} epochs, seed {args.seed}")
    print("| optimizer | clean test accuracy | final train loss | wall time |")
    print("|---|---:|---:|---:|")
    for name, use_sam in (("SGD", False), (f"SAM (rho={args.rho})", True)):
        accuracy, loss, seconds = train(use_sam, args.epochs, args.noise, args.rho, args.seed)
        print(f"| {name} | {accuracy:.1%} | {loss:.3f} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
