"""`SAM` without Lightning: a hand-written loop, then the same with Lightning Fabric.

    python examples/plain_pytorch.py [--epochs 20] [--fabric-only | --loop-only]

Both train an MLP on scikit-learn's bundled digits with 40% noisy training labels and
print the clean test accuracy. Both drive the optimizer with `SAMStep`, which runs SAM's
two passes (same dropout masks, BatchNorm statistics from the first pass, non-finite
steps skipped, the first pass's gradient per device under DDP): one `run` per batch,
then `opt.step()`. The davda54/sam API (`step(closure)`, `first_step`/`second_step`)
works too; see the README.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_sam import SAM, SAMStep
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
    sam = SAMStep(opt, model)
    for _ in range(epochs):
        for x, y in DataLoader(train_set, batch_size=32, shuffle=True):
            sam.run(lambda x=x, y=y: loss_fn(model(x), y))  # the gradient at w + e is in .grad, w is restored
            opt.step()  # the SGD step (skipped if the gradient is not finite)
            opt.zero_grad()
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
    # Fabric's precision wants every backward to go through fabric.backward, the ascent's too.
    sam = SAMStep(opt.optimizer, model, backward=fabric.backward, ascent_backward=fabric.backward)
    for _ in range(epochs):
        for x, y in train_loader:
            sam.run(lambda x=x, y=y: loss_fn(model(x), y))
            opt.step()
            opt.zero_grad()
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
