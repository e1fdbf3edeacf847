"""Run by tests/test_ddp.py as `python tests/ddp_worker.py MODE OUT_DIR`: a 2-process CPU DDP fit of SAMNet.

Each rank saves its parameters after every batch to OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import SAMNet, dataset, flat_params, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_sam import SharpnessMonitor
from lightning_sam.callbacks import MEASURES

MODES: dict[str, dict[str, Any]] = {
    "per_device": {"sam_sync_ascent": False, "sam_accumulate_grad_batches": 1},
    "synced": {"sam_sync_ascent": True, "sam_accumulate_grad_batches": 1},
    "per_device_accumulate_2": {"sam_sync_ascent": False, "sam_accumulate_grad_batches": 2},
}


class WithUnusedParameter(SAMNet):
    """A parameter no pass uses: DDP's reducer must be told, in the synced (second) backward."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(2, 2)


class RecordingMonitor(SharpnessMonitor):
    """Keeps what each rank measured and what came out of the cross-rank mean."""

    def __init__(self) -> None:
        super().__init__(measures=list(MEASURES), every_n_steps=2)
        self.local: list[torch.Tensor] = []
        self.reduced: list[torch.Tensor] = []

    def _reduce(self, trainer: pl.Trainer, values: torch.Tensor) -> torch.Tensor:
        self.local.append(values.clone())
        self.reduced.append(super()._reduce(trainer, values).clone())
        return self.reduced[-1]


class SaveParams(Callback):
    def __init__(self) -> None:
        self.trajectory: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.trajectory.append(flat_params(pl_module).clone())


class RankData(pl.LightningDataModule):
    """Every WORLD-th sample for each rank, in order (explicit, instead of the sampler Lightning injects)."""

    def train_dataloader(self) -> Any:
        subset = torch.utils.data.Subset(dataset(), range(self.trainer.global_rank, 64, self.trainer.world_size))
        return torch.utils.data.DataLoader(subset, batch_size=8, shuffle=False)


def main(mode: str, out_dir: Path) -> None:
    torch.manual_seed(0)
    model = SAMNet()
    if mode == "monitor":
        monitor = RecordingMonitor()
        fit = trainer(
            strategy="ddp",
            devices=2,
            callbacks=[monitor],
            use_distributed_sampler=False,
            logger=CSVLogger(out_dir, name="csv"),
            log_every_n_steps=1,
        )
        fit.fit(model, datamodule=RankData())
        result = {"local": monitor.local, "reduced": monitor.reduced, "last_values": monitor.last_values}
        torch.save(result, out_dir / f"rank{fit.global_rank}.pt")
        return
    strategy = "ddp"
    if mode == "unused_parameters":
        torch.manual_seed(0)
        model, strategy = WithUnusedParameter(), "ddp_find_unused_parameters_true"
    for name, value in MODES.get(mode, MODES["per_device"]).items():
        setattr(model, name, value)
    saver = SaveParams()
    fit = trainer(strategy=strategy, devices=2, callbacks=[saver], use_distributed_sampler=False)
    fit.fit(model, datamodule=RankData())
    torch.save({"trajectory": saver.trajectory, "global_step": fit.global_step}, out_dir / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
