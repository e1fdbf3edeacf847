"""Run by tests/test_ddp.py as `python tests/ddp_worker.py OUT_DIR MODE [MODE ...]`: 2-process CPU DDP fits.

Each mode is one fit of a fresh module in the same process group; each rank saves what the
test needs to OUT_DIR/MODE/rank{R}.pt.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import Net, SAMNet, dataset, flat_params, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_sam import SAM, LookSAM, SAMStep, SharpnessMonitor
from lightning_sam.measures import MEASURES

# mode -> (sam_sync_ascent, accumulate_grad_batches)
SAM_MODES: dict[str, tuple[bool, int]] = {
    "per_device": (False, 1),
    "synced": (True, 1),
    "per_device_accumulate_2": (False, 2),
    "synced_accumulate_2": (True, 2),
}


class WithUnusedParameter(SAMNet):
    """A parameter no pass uses: DDP's reducer must be told, in the synced (second) backward."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(2, 2)


class FirstPassOnlyParameter(SAMNet):
    """A parameter that only the first pass uses: it steers the ascent, and gets no gradient to step with."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Parameter(torch.tensor(1.0))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x) if self.sam_second_pass else self(x) * self.gate
        return torch.nn.functional.cross_entropy(logits, y)


class NaNOnRankOne(SAMNet):
    """Rank 1's first-pass loss is NaN at batch 2: every rank must skip that step, bitwise."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 2 and self.global_rank == 1 and not self.sam_second_pass:
            loss = loss * math.nan
        return loss


class LookSAMNet(SAMNet):
    """LookSAM (k=2): its kept direction needs the global first gradient, so the ascent is synced by itself."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return LookSAM(self.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1, momentum=0.9)


class AliasedStep(SAMNet):
    """One function for train and validation (``training_step = _step``): the mixin's guard must not go by its name."""

    def _step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    training_step = _step
    validation_step = _step


def _undecorated(method: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:  # no functools.wraps: its name is "wrapper"
        return method(self, *args, **kwargs)

    return wrapper


class DecoratedStep(AliasedStep):
    training_step = _undecorated(AliasedStep._step)


class PartialStep(AliasedStep):
    def _staged(self, batch: Any, batch_idx: int, stage: str) -> Any:
        return self._step(batch, batch_idx)

    training_step = functools.partialmethod(_staged, stage="train")  # type: ignore[assignment]


class RecordingMonitor(SharpnessMonitor):
    """Keeps what each rank measured and what came out of the cross-rank mean."""

    def __init__(self) -> None:
        measures = [m for m in MEASURES if m != "preconditioned_max_eig"]  # SGD has no preconditioner
        super().__init__(measures=measures, every_n_steps=2, spectrum_epochs=[0], spectrum_iters=10, spectrum_runs=2)
        self.local: list[torch.Tensor] = []
        self.reduced: list[torch.Tensor] = []
        self.keys: list[list[str]] = []
        self.logged: list[dict[str, float]] = []

    def _log(self, trainer: pl.Trainer, values: dict[str, torch.Tensor]) -> None:
        super()._log(trainer, values)
        if values:
            self.keys.append(sorted(values))
            self.logged.append({k: self.last_values[f"sharpness/{k}"] for k in values})

    def _reduce(self, trainer: pl.Trainer, values: torch.Tensor) -> torch.Tensor:
        self.local.append(values.clone())
        self.reduced.append(super()._reduce(trainer, values).clone())
        return self.reduced[-1]


class SaveParams(Callback):
    def __init__(self) -> None:
        self.trajectory: list[torch.Tensor] = []
        self.optimizer_states: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.trajectory.append(flat_params(pl_module).clone())
        state = trainer.optimizers[0].state_dict()["state"]
        self.optimizer_states.append({k: v["momentum_buffer"].clone() for k, v in state.items()})


class RankData(pl.LightningDataModule):
    """Every WORLD-th sample for each rank, in order (explicit, instead of the sampler Lightning injects)."""

    def train_dataloader(self) -> Any:
        subset = torch.utils.data.Subset(dataset(), range(self.trainer.global_rank, 64, self.trainer.world_size))
        return torch.utils.data.DataLoader(subset, batch_size=8, shuffle=False)


def run(mode: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
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
        fit.fit(SAMNet(), datamodule=RankData())
        result = {
            "local": monitor.local,
            "reduced": monitor.reduced,
            "last_values": monitor.last_values,
            "checkpointed_batches": monitor.state_dict()["fixed_batches"],  # what rank 0 writes into a checkpoint
            "keys": monitor.keys,
            "logged": monitor.logged,
            "spectra": [(epoch, s.nodes, s.weights) for epoch, s in monitor.spectra],
        }
        torch.save(result, out_dir / f"rank{fit.global_rank}.pt")
        return
    modules: dict[str, tuple[type[pl.LightningModule], str]] = {
        "unused_parameters": (WithUnusedParameter, "ddp_find_unused_parameters_true"),
        "first_pass_only_parameter": (FirstPassOnlyParameter, "ddp_find_unused_parameters_true"),
        "nan_on_rank_one": (NaNOnRankOne, "ddp"),
        "automatic": (Net, "ddp"),
        "rho_zero": (SAMNet, "ddp"),
        "looksam": (LookSAMNet, "ddp"),
        "aliased_training_step": (AliasedStep, "ddp"),
        "decorated_training_step": (DecoratedStep, "ddp"),
        "partial_training_step": (PartialStep, "ddp"),
        "named_training_step": (SAMNet, "ddp"),
    }
    module_cls, strategy = modules.get(mode, (SAMNet, "ddp"))
    model = module_cls(rho=0.0) if mode == "rho_zero" else module_cls()
    sync_ascent, accumulate = SAM_MODES.get(mode, (False, 1))
    if isinstance(model, SAMNet):
        model.sam_sync_ascent = sync_ascent
    saver = SaveParams()
    fit = trainer(
        strategy=strategy,
        devices=2,
        callbacks=[saver],
        use_distributed_sampler=False,
        accumulate_grad_batches=accumulate,
    )
    fit.fit(model, datamodule=RankData())
    torch.save(
        {"trajectory": saver.trajectory, "momentum": saver.optimizer_states, "global_step": fit.global_step},
        out_dir / f"rank{fit.global_rank}.pt",
    )


def plain_loop(out_dir: Path) -> None:
    """No Lightning: torch's DDP, `SAM` and `SAMStep` in a hand-written loop (in the process group the fits made)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    step = SAMStep(opt, ddp)
    subset = torch.utils.data.Subset(dataset(), range(rank, 64, world))
    trajectory = []
    for x, y in torch.utils.data.DataLoader(subset, batch_size=8, shuffle=False):
        step.run(lambda x=x, y=y: torch.nn.functional.cross_entropy(ddp(x), y))
        opt.step()
        opt.zero_grad()
        trajectory.append(flat_params(model).clone())
    torch.save({"trajectory": trajectory}, out_dir / f"rank{rank}.pt")


def main(out_dir: Path, modes: list[str]) -> None:
    for mode in modes:
        if mode == "plain_loop":
            plain_loop(out_dir / mode)
        else:
            run(mode, out_dir / mode)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left to abort the process


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    main(Path(sys.argv[1]), sys.argv[2:])
