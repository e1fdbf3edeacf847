"""Run by tests/test_ddp.py as `python tests/ddp_worker.py OUT_DIR MODE [MODE ...]`: 2-process CPU DDP fits.

Each mode is one fit of a fresh module in the same process group; each rank saves what the
test needs to OUT_DIR/MODE/rank{R}.pt.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import lightning.pytorch as pl
import torch
from helpers import Net, SAMNet, dataset, flat_params, leave_process_group, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sam import SAM, LookSAM, SAMStep, SharpnessMonitor, plots, sharpness
from lightning_sam.measures import MEASURES, FixedBatch, Measure, Unavailable

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
    """Keeps what each rank measured in each round, and what came out of the reduction over ranks."""

    def __init__(self, **kwargs: Any) -> None:
        measures = [m for m in MEASURES if m not in ("preconditioned_max_eig", "sam_eos_ratio")]  # SGD's
        settings: dict[str, Any] = {
            "measures": measures,
            "every_n_steps": 2,
            "spectrum_epochs": [0],
            "spectrum_iters": 10,
            "spectrum_runs": 2,
            **kwargs,
        }
        super().__init__(**settings)
        self.local: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []

    def _log(
        self, trainer: pl.Trainer, keys: dict[str, Any], values: dict[str, torch.Tensor], error: Any = None
    ) -> None:
        before = len(self.history)
        super()._log(trainer, keys, values, error)
        self.local.append({k: float(v) for k, v in values.items()})
        self.logged.append(self.history[-1][1] if len(self.history) > before else {})

    def _record(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        super()._record(trainer, metrics)
        if "sharpness/negative_fraction" in metrics:
            self.logged.append(metrics)


def _rank_one_only(batch: FixedBatch) -> dict[str, torch.Tensor]:
    """A measure that rank 1 does not have."""
    if torch.distributed.get_rank() == 1:
        raise Unavailable("not on rank 1")
    return {"rank_one_only": batch.loss_fn()}


def _rank_one_raises(batch: FixedBatch) -> dict[str, torch.Tensor]:
    """A measure that raises on rank 1 only: a configuration error, which a measure raises as any other."""
    if torch.distributed.get_rank() == 1:
        raise MisconfigurationException("rank 1's measure broke")
    return {"rank_one_raises": batch.loss_fn()}


_SPECTRUM = sharpness.hessian_spectrum


def _spectrum_failing_on_rank_one(*args: Any, **kwargs: Any) -> Any:
    if torch.distributed.get_rank() == 1:
        raise torch.linalg.LinAlgError("rank 1's eigendecomposition failed")  # type: ignore[attr-defined]
    return _SPECTRUM(*args, **kwargs)


def monitored_trainer(monitor: SharpnessMonitor, out_dir: Path) -> pl.Trainer:
    """A 2-process DDP Trainer logging every step to a CSV logger, with ``monitor``."""
    return trainer(
        strategy="ddp",
        devices=2,
        callbacks=[monitor],
        use_distributed_sampler=False,
        logger=CSVLogger(out_dir, name="csv"),
        log_every_n_steps=1,
    )


def failing_on_rank_one(out_dir: Path, raises: bool) -> None:
    """A fit whose measures (a registry entry, the spectrum) fail on rank 1 only: no rank may wait for the other."""
    name = "rank_one_raises" if raises else "rank_one_only"
    MEASURES[name] = Measure(
        _rank_one_raises if raises else _rank_one_only, per_step=False, keys=lambda _: {name: "mean"}
    )
    monitor = RecordingMonitor(measures=["grad_norm", "hessian_max_eig", name])
    fit = monitored_trainer(monitor, out_dir)
    error = None
    with patch.object(plots.sharpness, "hessian_spectrum", _spectrum_failing_on_rank_one):
        error = fit_catching(fit, SAMNet())
    del MEASURES[name]
    result = {"history": monitor.history, "error": error, "global_step": fit.global_step}
    torch.save(result, out_dir / f"rank{fit.global_rank}.pt")


def fit_catching(fit: pl.Trainer, module: pl.LightningModule) -> str | None:
    """Fit on `RankData`; what it raised, as ``"Type: message"``, or None."""
    try:
        fit.fit(module, datamodule=RankData())
    except Exception as raised:
        return f"{type(raised).__name__}: {raised}"
    return None


_LOSS_ALONG = sharpness.loss_along


def _loss_along_failing_on_rank_one(*args: Any, **kwargs: Any) -> Any:
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("rank 1's landscape broke")
    return _LOSS_ALONG(*args, **kwargs)


# What the plots read of a WandbLogger besides the patched log_line_plot: its run's name and id (figure file names).
FAKE_WANDB_LOGGER = SimpleNamespace(experiment=SimpleNamespace(name="fake-run", id="0"))


def landscape_failing_on_rank_one(out_dir: Path) -> None:
    """The landscape plot fails on rank 1 at the end of epoch 0 (a W&B logger stands in): both ranks must raise."""
    monitor = RecordingMonitor(measures=["grad_norm"], landscape_epochs=[0], landscape_points=3)
    fit = monitored_trainer(monitor, out_dir)
    with (
        patch.object(plots, "find_wandb_logger", lambda loggers: FAKE_WANDB_LOGGER),
        patch.object(plots, "log_line_plot", lambda *args, **kwargs: None),
        patch.object(plots.sharpness, "loss_along", _loss_along_failing_on_rank_one),
    ):
        error = fit_catching(fit, SAMNet())
    torch.save({"error": error}, out_dir / f"rank{fit.global_rank}.pt")


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
        fit = monitored_trainer(monitor, out_dir)
        fit.fit(SAMNet(), datamodule=RankData())
        result = {
            "local": monitor.local,
            "last_values": monitor.last_values,
            "checkpointed_batches": monitor.state_dict()["fixed_batches"],  # what rank 0 writes into a checkpoint
            "history": monitor.history,
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
        elif mode == "landscape_fails_on_rank_one_raises":
            (out_dir / mode).mkdir(parents=True, exist_ok=True)
            landscape_failing_on_rank_one(out_dir / mode)
        elif mode.startswith("monitor_fails_on_rank_one"):
            (out_dir / mode).mkdir(parents=True, exist_ok=True)
            failing_on_rank_one(out_dir / mode, raises=mode.endswith("raises"))
        else:
            run(mode, out_dir / mode)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    main(Path(sys.argv[1]), sys.argv[2:])
    leave_process_group()
