"""Run by tests/test_switching.py as `python tests/switching_worker.py OUT_DIR`: 2-process CPU DDP fits (gloo).

One fit per switching method in the same process group, each rank on its own data; each rank saves the SAM steps
counted after every batch, its losses and its final weights to OUT_DIR/METHOD/rank{R}.pt.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import flat_params, leave_process_group, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sam import AESAM, RST, AELookSAM, SAMMixin, SAMStep

METHODS = ("aesam", "aelooksam", "rst", "aesam_accumulate_2")  # the last: the window's first micro-batch decides
AE = {"delta": 0.5, "lambda1": -0.5, "lambda2": 0.5}


class Switching(SAMMixin, pl.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.method = method

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        sgd = {"rho": 0.05, "lr": 0.1, "momentum": 0.9}
        if self.method.startswith("aesam"):
            return AESAM(self.parameters(), torch.optim.SGD, **AE, **sgd)
        if self.method == "aelooksam":
            return AELookSAM(self.parameters(), torch.optim.SGD, alpha=0.7, **AE, **sgd)
        return RST(self.parameters(), torch.optim.SGD, p=0.3, p_end=0.8, schedule="linear", seed=5, **sgd)


class Record(Callback):
    def __init__(self) -> None:
        self.ascents: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        self.ascents.append(trainer.optimizers[0].ascents_taken)
        self.losses.append(float(outputs["loss"]))


class RankData(pl.LightningDataModule):
    """Each rank draws its own batches (another seed): the first passes' gradients differ between the ranks."""

    def train_dataloader(self) -> Any:
        gen = torch.Generator().manual_seed(100 + self.trainer.global_rank)
        data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * 3) for _ in range(16)]
        return torch.utils.data.DataLoader(data, batch_size=None)


def main(out_dir: Path) -> None:
    for method in METHODS:
        (out_dir / method).mkdir(parents=True, exist_ok=True)
        module, record = Switching(method), Record()
        accumulate = 2 if method.endswith("accumulate_2") else 1
        fit = trainer(
            strategy="ddp",
            devices=2,
            callbacks=[record],
            use_distributed_sampler=False,
            accumulate_grad_batches=accumulate,
        )
        fit.fit(module, datamodule=RankData())
        result = {"ascents": record.ascents, "losses": record.losses, "weights": flat_params(module)}
        torch.save(result, out_dir / method / f"rank{fit.global_rank}.pt")


def plain_loop_no_sync(out_dir: Path) -> None:
    """A plain DDP loop accumulating 2 micro-batches, the first under ``no_sync`` (each rank's own gradient there):
    AE-SAM's ranks must still decide alike, or one would wait in a pass the other skips."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = AESAM(ddp.parameters(), torch.optim.SGD, **AE, rho=0.05, lr=0.1, momentum=0.9, total_steps=8)
    step = SAMStep(opt, ddp)
    gen = torch.Generator().manual_seed(100 + rank)
    ascents = []
    for _ in range(8):
        for micro in range(2):
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * 3
            with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
                step.run(lambda x=x, y=y: nn.functional.mse_loss(ddp(x), y) / 2)
        opt.step()
        opt.zero_grad()
        ascents.append(opt.ascents_taken)
    torch.save({"ascents": ascents, "weights": flat_params(net)}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    plain_loop_no_sync(Path(sys.argv[1]) / "plain_no_sync")  # in the process group the fits made
    leave_process_group()
