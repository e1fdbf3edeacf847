"""What the monitor's callbacks share: the fixed batch they measure on, and logging a round of values over ranks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_sam._compat import lightning_logging_step
from lightning_sam._observe import loss_in, observing
from lightning_sam._restore import generators_of, rng_state, set_rng_state
from lightning_sam.hessian import HVPFallbackWarning
from lightning_sam.measures import NotThisStep, Reduction, Unavailable, Untrusted

__all__ = ["LINALG_ERROR", "FixedBatchProbe", "LossFn", "Outcomes", "Schedule", "log_round", "warn_once"]

LossFn = Callable[[pl.LightningModule, Any], Tensor]
# An eigendecomposition that failed (a non-finite Lanczos matrix): the measure has no value this time.
LINALG_ERROR: type[Exception] = torch.linalg.LinAlgError  # type: ignore[attr-defined]


class FixedBatchProbe:
    """The batch a monitor measures on (the run's first training batch, on each rank) and its own random numbers.

    ``measuring`` runs the module on it in eval mode, float32, grad on, with every mode,
    statistic and random state put back afterwards. ``state_dict`` keeps every rank's
    batch (on the CPU) and the generator's state, so a resumed run measures on the same.
    """

    def __init__(self, loss_fn: LossFn | None, seed: int) -> None:
        self.loss_fn = loss_fn
        self.fixed_batches: list[Any] | None = None  # every rank's fixed batch, on the CPU
        self.fixed_batch: Any = None  # this rank's, on the module's device
        self.rng_state: Tensor = torch.Generator().manual_seed(seed).get_state()

    def state_dict(self) -> dict[str, Any]:
        return {"fixed_batches": self.fixed_batches, "rng_state": self.rng_state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        old = state_dict.get("fixed_batch")  # checkpoints of 0.1.0 kept one rank's batch
        self.fixed_batches = state_dict.get("fixed_batches", None if old is None else [old])
        self.rng_state = state_dict["rng_state"]

    def restore_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint's state is loaded: this rank's batch goes where the model is."""
        if self.fixed_batches:
            mine = self.fixed_batches[trainer.global_rank % len(self.fixed_batches)]
            self.fixed_batch = move_data_to_device(mine, pl_module.device)

    def capture(self, trainer: pl.Trainer, batch: Any) -> None:
        """Keep the run's first training batch (a collective on DDP, once per run: every rank's for the checkpoint)."""
        if self.fixed_batch is None:
            self.fixed_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
            mine = apply_to_collection(batch, Tensor, lambda t: t.detach().cpu())
            self.fixed_batches = (
                [mine]
                if trainer.world_size == 1
                else [trainer.strategy.broadcast(mine, src=rank) for rank in range(trainer.world_size)]
            )

    @contextmanager
    def measuring(
        self, pl_module: pl.LightningModule
    ) -> Iterator[tuple[Callable[[], Tensor], list[Tensor], torch.Generator]]:
        """Eval mode, float32, grad on, on the fixed batch; modes and random state restored afterwards."""
        params: list[Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
        modes = {m: m.training for m in pl_module.modules()}
        rng = rng_state(generators_of(pl_module))
        generator = torch.Generator().manual_seed(0)
        generator.set_state(self.rng_state)
        pl_module.eval()
        batch = self.fixed_batch

        def loss_fn() -> Tensor:
            return self.loss(pl_module, batch)

        try:
            with torch.inference_mode(False), torch.autocast(pl_module.device.type, enabled=False):
                yield loss_fn, params, generator
        finally:
            self.rng_state = generator.get_state()
            set_rng_state(rng)
            for m, training in modes.items():
                m.training = training

    def loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The training loss on ``batch`` in float32, with ``training_step``'s side effects undone."""
        with observing(pl_module):
            output = self.loss_fn(pl_module, batch) if self.loss_fn else pl_module.training_step(batch, 0)
        loss = loss_in(output)
        if loss is None:
            raise MisconfigurationException(
                "SharpnessMonitor needs training_step to return the loss (a tensor or a dict with 'loss'), got "
                f"{type(output).__name__}; or pass SharpnessMonitor(loss_fn=lambda module, batch: ...)."
            )
        return loss.float()


class MeasureFailed(RuntimeError):
    """A measure raised on another rank; that rank raises the error itself."""


def log_round(
    trainer: pl.Trainer,
    keys: Mapping[str, Reduction],
    values: Mapping[str, Tensor],
    error: BaseException | None = None,
) -> dict[str, float]:
    """Reduce one round of values over ranks and log it under ``sharpness/``; returns what was logged.

    Every rank calls this with the same ``keys`` (what the round's measures declare), so every
    rank enters the same collectives: one all-reduce of the sums, and one of the maxima when
    some key is an error bound. A key that some rank lacks (a measure unavailable there, or
    failed) is missing on all. ``error``: a measure that raised on this rank; once every rank
    knows, it is raised here and a ``MeasureFailed`` on the others, instead of a hang.
    """
    names = sorted(keys)
    if not names:  # the same on every rank: none enters a collective
        if error is not None:
            raise error
        return {}
    device = trainer.strategy.root_device
    world = trainer.world_size
    present = torch.tensor([k in values for k in names], dtype=torch.float32, device=device)
    stacked = torch.stack(
        [
            values[k].detach().to(device, torch.float32).reshape(()) if k in values else torch.zeros((), device=device)
            for k in names
        ]
    )
    if world > 1:
        # The mean of R estimates has the standard error sqrt(Σσ²)/R: sum variances, not errors.
        stderr = torch.tensor([keys[k] == "stderr" for k in names], device=device)
        failed = torch.tensor([float(error is not None)], device=device)
        summed = trainer.strategy.reduce(
            torch.cat([torch.where(stderr, stacked.square(), stacked), present, failed]), reduce_op="sum"
        )
        if float(summed[-1]) > 0:  # some rank's measure raised: raise everywhere, nobody waits
            if error is not None:
                raise error
            raise MeasureFailed("SharpnessMonitor: a measure raised on another rank (its error is in that rank's log).")
        n = len(names)
        total, present = summed[:n], summed[n : 2 * n]
        reduced = torch.where(stderr, total.sqrt() / world, total / world)
        worst = [i for i, k in enumerate(names) if keys[k] == "max"]
        if worst:  # an error bound: the worst rank's
            reduced[worst] = trainer.strategy.reduce(
                torch.where(present[worst] > 0, stacked[worst], -torch.inf), reduce_op="max"
            )
        stacked = reduced
    elif error is not None:
        raise error
    everywhere = present.tolist()
    metrics = {
        f"sharpness/{k}": float(v)
        for k, v, n in zip(names, stacked.tolist(), everywhere, strict=True)
        if n == world  # a key some rank lacks is missing for all
    }
    if metrics:
        step = lightning_logging_step(trainer)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
    return metrics


def warn_once(warned: set[str], key: str, message: str) -> None:
    """One ``RuntimeWarning`` per key (on rank zero)."""
    if key not in warned:
        warned.add(key)
        rank_zero_warn(message, category=RuntimeWarning)


class Schedule:
    """When each scheduled measure is due: on the multiples of its own interval, counted on from its last run."""

    def __init__(self, intervals: Mapping[str, int]) -> None:
        self.intervals = dict(intervals)
        self.last_step: dict[str, int] = {}
        self.next_due: dict[str, int] = {}
        self.soonest = 0
        self.restart(self.last_step)

    def restart(self, last_step: Mapping[str, int]) -> None:
        """From the steps each measure last ran at (a checkpoint's)."""
        self.last_step = dict(last_step)
        self.next_due = {m: (self.last_step.get(m, 0) // n + 1) * n for m, n in self.intervals.items()}
        self.soonest = min(self.next_due.values(), default=0)

    def due(self, step: int) -> list[str]:
        """The measures due at ``step`` (in the order of ``intervals``)."""
        return [m for m, due in self.next_due.items() if step >= due] if step >= self.soonest else []

    def done(self, measured: Sequence[str], step: int) -> None:
        self.restart({**self.last_step, **dict.fromkeys(measured, step)})


class Outcomes:
    """How each measure ends: its values, or the reason why not (one warning each), or an error kept for the round.

    A double-backward failure (``HVPFallbackWarning``) is told once and calls ``on_fallback``;
    any other warning of a measure goes out as Python's default filter would (once per place).
    """

    def __init__(self, on_fallback: Callable[[], None]) -> None:
        self.on_fallback = on_fallback
        self.warned: set[str] = set()
        self.error: BaseException | None = None
        self._registry: dict[Any, Any] = {}

    def warn(self, key: str, message: str) -> None:
        """One ``RuntimeWarning`` per key (on rank zero)."""
        warn_once(self.warned, key, message)

    def take_error(self) -> BaseException | None:
        """The first error since the last call (for the round's ``log_round``)."""
        error, self.error = self.error, None
        return error

    @contextmanager
    def of(self, name: str, outputs: dict[str, Tensor]) -> Iterator[None]:
        """Run one measure: its values into ``outputs`` (the block updates it)."""
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HVPFallbackWarning)
                try:
                    yield
                except Unavailable as reason:
                    warn_once(self.warned, name, f"SharpnessMonitor: {name} is skipped: {reason}")
                except Untrusted as untrusted:
                    outputs.update(untrusted.values)
                    warn_once(self.warned, f"{name}:untrusted", f"SharpnessMonitor: {name}: {untrusted}")
                except (NotThisStep, LINALG_ERROR):
                    pass
                except Exception as error:  # raised once every rank knows (log_round): no hang
                    if f"{name}:error" not in self.warned:  # on the rank where it happened: it may be the only one
                        self.warned.add(f"{name}:error")
                        warnings.warn(f"SharpnessMonitor: {name} raised {error!r}.", RuntimeWarning, stacklevel=2)
                    self.error = self.error or error
        finally:  # whatever the measure raised, its warnings go out
            for warning in caught:
                if issubclass(warning.category, HVPFallbackWarning):
                    self.on_fallback()
                    warn_once(self.warned, "hvp", f"SharpnessMonitor: {warning.message}")
                else:
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno, registry=self._registry
                    )
