"""SAM on a sharded model: FSDP2 (`fully_shard`) with Lightning's ModelParallelStrategy, then the same with Fabric.

    python examples/fsdp.py --devices 2 [--fabric] [--epochs 10] [--accelerator cpu|gpu]

Runs on the CPU with 2 processes (gloo). Each rank keeps half of every weight, half of its gradient and half of
SAM's saved copy of the weights; the ascent uses the norm of the full gradient (every shard, every rank), so the
run equals one process on the global batch. The example prints, on rank 0, the clean test accuracy on digits with
40% noisy labels and the parameters each rank holds. The Lightning run also has a SharpnessMonitor: its Hessian
curves (Lanczos over the sharded parameters, from FSDP2's own gradients) go to ``logs/`` (CSV), and the last values
are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

import lightning as L
import lightning.pytorch as pl
import torch
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_sam import SAM, SAMMixin, SAMStep, SharpnessMonitor
from lightning_sam.demo import noisy_digits


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: each Linear is its own unit of all-gather/reduce-scatter, then the whole model."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class ShardedClassifier(SAMMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def configure_model(self) -> None:  # Lightning calls this with the device mesh in place
        shard(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return SAM(self.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, weight_decay=5e-4)


def local_and_total(model: nn.Module) -> tuple[int, int]:
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def with_lightning(args: argparse.Namespace) -> None:
    train_set, test_set = noisy_digits(0.4, seed=0)
    strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    measures = ["first_order", "grad_norm", "hessian_max_eig", "hessian_trace", "eos_ratio", "sam_eos_ratio"]
    monitor = SharpnessMonitor(measures=[*measures, "critical_sharpness"], every_n_steps=10)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=CSVLogger("logs", name="fsdp"),
        callbacks=[monitor],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    pl.seed_everything(0, verbose=False)
    model = ShardedClassifier()
    trainer.fit(model, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(test_set, batch_size=256))
    local, total = local_and_total(model)
    if trainer.is_global_zero:
        print(f"Lightning: clean test accuracy {float(trainer.callback_metrics['val_acc']):.1%}")
        print(f"rank 0 holds {local} of the {total} parameters (SAM's copy of the weights: those {local} too)")
        print("sharpness at the end:", ", ".join(f"{k} {v:.4g}" for k, v in sorted(monitor.last_values.items())))


def with_fabric(args: argparse.Namespace) -> None:
    strategy = FabricModelParallelStrategy(
        lambda model, mesh: shard(model, mesh["data_parallel"]), data_parallel_size=args.devices, tensor_parallel_size=1
    )
    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0, verbose=False)
    train_set, test_set = noisy_digits(0.4, seed=0)
    model = fabric.setup(mlp())
    opt = fabric.setup_optimizers(
        SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9, weight_decay=5e-4)
    )
    train_loader, test_loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(test_set, batch_size=256)
    )
    sam = SAMStep(opt.optimizer, model, backward=fabric.backward)  # sharded: the ascent goes through backward
    for _ in range(args.epochs):
        for x, y in train_loader:
            sam.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    correct = int(fabric.all_reduce(torch.tensor(correct), reduce_op="sum"))
    if fabric.global_rank == 0:
        print(f"Fabric: clean test accuracy {correct / len(test_set):.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fabric", action="store_true", help="the Fabric loop instead of the Lightning Trainer")
    args = parser.parse_args(argv)
    (with_fabric if args.fabric else with_lightning)(args)


def leave() -> NoReturn:
    """Every rank done, the process group torn down, then exit without the interpreter's own teardown.

    FSDP2 keeps its gloo process groups alive after ``destroy_process_group`` (DTensor's caches hold the device
    mesh, and the mesh its groups), so they would be destroyed while Python shuts down, which can abort a finished
    run ("terminate called without an active exception", exit code -6; pytorch/pytorch#190489).
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while the other still sends
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    leave()
