"""`SAM` without Lightning: a hand-written loop, then the same with Lightning Fabric.

    python examples/plain_pytorch.py [--epochs 20] [--fabric-only | --loop-only]

Both train an MLP on scikit-learn's bundled digits with 40% noisy training labels and
print the clean test accuracy. The loop shows the davda54/sam API (`step(closure)`,
or `first_step`/`second_step` around your own backward, here with a GradScaler's
`step` finishing the SAM step).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_sam import SAM
from lightning_sam.demo import noisy_digits


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def accuracy(model: nn.Module, data: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    model.train()
    return correct / len(data.dataset)


def plain_loop(epochs: int) -> float:
    torch.manual_seed(0)
    train_set, test_set = noisy_digits(0.4, seed=0)
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        for x, y in DataLoader(train_set, batch_size=32, shuffle=True):

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            closure()  # the gradient at w
            opt.step(closure)  # the gradient at w + e, w restored bitwise, then the SGD step
    return accuracy(model, DataLoader(test_set, batch_size=512))


def with_fabric(epochs: int) -> float:
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    fabric.seed_everything(0)
    train_set, test_set = noisy_digits(0.4, seed=0)
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model, opt = fabric.setup(model, opt)
    train_loader = fabric.setup_dataloaders(DataLoader(train_set, batch_size=32, shuffle=True))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in train_loader:
            opt.zero_grad()
            fabric.backward(loss_fn(model(x), y))  # gradient at w
            opt.first_step(zero_grad=True)  # move to w + e
            fabric.backward(loss_fn(model(x), y))  # gradient at w + e
            opt.step()  # no closure after first_step: restore w, then the SGD step
    return accuracy(model, DataLoader(test_set, batch_size=512))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--loop-only", action="store_true")
    parser.add_argument("--fabric-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.fabric_only:
        print(f"plain loop: clean test accuracy {plain_loop(args.epochs):.1%}")
    if not args.loop_only:
        print(f"Fabric (bf16-mixed): clean test accuracy {with_fabric(args.epochs):.1%}")


if __name__ == "__main__":
    main()
