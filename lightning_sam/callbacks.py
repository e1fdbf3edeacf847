"""`SharpnessMonitor`: estimate the sharpness of the model during training and log the curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_sam._compat import lightning_logging_step, lightning_logs_this_batch
from lightning_sam._measuring import FixedBatchProbe, LossFn, Outcomes, Schedule, log_round
from lightning_sam._restore import generators_of, rng_state, set_rng_state
from lightning_sam.hessian import Spectrum
from lightning_sam.measures import (
    MEASURES,
    PER_MODULE_MEASURES,
    FixedBatch,
    Reduction,
    TrainingStep,
    check_settings,
    chosen,
    intervals,
)
from lightning_sam.plots import LandscapePlot, SpectrumPlot
from lightning_sam.stability import base_of
from lightning_sam.wandb_integration import define_sharpness_metrics, find_wandb_logger

__all__ = ["SharpnessMonitor"]

DEFAULT_MEASURES = ("first_order", "grad_norm", "sam_fraction", "hessian_max_eig", "eos_ratio")


class SharpnessMonitor(Callback):
    r"""Estimate how sharp the model is during training and log it under ``sharpness/``.

    Works with any LightningModule (plain SGD too, which is the comparison that shows what
    SAM does) and any Lightning logger; with a ``WandbLogger`` the curves use
    ``trainer/global_step`` as x axis, the run summary keeps each measure's min, max and
    last value, and 1-D loss-landscape slices can be logged as line plots.

    | key under ``sharpness/`` | measure | cost |
    |---|---|---|
    | ``first_order`` | ``L(w+e) − L(w)``, ``e = rho·g/‖g‖`` (Foret et al. 2021) | free with SAMMixin, else 2 forwards |
    | ``grad_norm`` | ``‖g‖`` of the gradient the optimizer steps with | free |
    | ``sam_fraction`` | the fraction of the steps so far that were SAM steps (a SAM optimizer's) | free |
    | ``hessian_max_eig`` | top Hessian eigenvalue by Lanczos, warm-started, and its ``_residual`` | a few HVPs |
    | ``hessian_top_eigs`` | the ``top_k`` largest eigenvalues ``hessian_eig_i`` and their residuals | more HVPs |
    | ``preconditioned_max_eig`` | ``λ_max(P⁻¹H)`` for Adam/AdamW/RMSprop/Adagrad (Cohen et al. 2022) | a few HVPs |
    | ``eos_ratio`` | ``λ_max(S H)`` over the base optimizer's edge of stability (1 = at it) | free with the above |
    | ``sam_eos_ratio`` | ``λ_max(H)`` over SAM's edge (Long & Bartlett 2024), SAM over SGD | + one gradient |
    | ``hessian_trace`` | Hutch++ trace estimate (Meyer et al. 2021) and its ``_stderr`` | ``trace_samples`` HVPs |
    | ``adaptive_avg`` | ``E[L(w+δ)] − L(w)``, ``δ ~ N(0, rho² w²)`` (Andriushchenko et al. 2023) | forwards |
    | ``adaptive_worst`` | worst case of the same within ``‖δ/|w|‖ ≤ rho`` | forward+backward steps |
    | ``critical_sharpness`` | ``2/η_c`` along the last update (Kalra et al. 2026) | 5-8 forwards |

    The Hessian's eigenvalue density (stochastic Lanczos quadrature, Ghorbani et al. 2019)
    and its fraction of negative eigenvalues (``sharpness/negative_fraction``) are logged at
    the end of ``spectrum_epochs``: a W&B line plot, and a figure file in the log directory
    for every logger (a [`SpectrumPlot`][lightning_sam.SpectrumPlot] the monitor runs; the
    landscape is a [`LandscapePlot`][lightning_sam.LandscapePlot]). ``per_module=True`` adds
    ``hessian_max_eig`` and ``hessian_trace`` of each top-level submodule's block of the
    Hessian, as ``sharpness/<module>/...``.

    ``first_order``, ``grad_norm`` and ``sam_fraction`` are logged on the Trainer's logging steps
    (``log_every_n_steps``). The others run on the multiples of their own ``every_n_steps``
    and at the end of training, in eval mode, on a fixed batch: the first training batch
    of the run (on each rank; a checkpoint keeps every rank's); ``critical_sharpness``
    on the batch just trained on. Each measure is one entry of the registry in
    [`lightning_sam.measures`][lightning_sam.measures], with its keys and their reduction
    over ranks. Estimates are computed in float32 with autocast off, with grad enabled
    even inside inference mode; on DDP they run on the unwrapped module, each rank on its
    own batch, and are averaged over ranks, every rank entering the same collectives with
    the same keys (a value some rank lacks is missing on all); on sharded parameters
    (FSDP2, tensor parallelism) they are of the global Hessian, over sharded vectors. The
    monitor only observes: weights, ``.grad``, train/eval mode, BatchNorm statistics,
    torchmetrics states and the random state are all as they were.

    The loss is the module's ``training_step(batch, batch_idx)`` output (a tensor, or
    ``"loss"`` of a dict), with ``self.log`` silenced; pass ``loss_fn`` if that does not
    fit. Modules under manual optimization step the optimizer inside ``training_step``,
    so they need ``loss_fn`` for every measure but ``grad_norm``.

    Args:
        measures: Which measures to log, a name or a list (default: ``first_order``,
            ``grad_norm``, ``hessian_max_eig``, ``eos_ratio``).
        every_n_steps: Interval of the Hessian and adaptive measures, in optimizer steps;
            an int for all, or a mapping measure → interval.
        rho: Radius of ``first_order`` for modules without SAMMixin (SAMMixin modules
            report their own optimizer's step for free).
        adaptive_rho: Radius of the adaptive measures (relative to ``|w|``).
        eig_iters: At most this many Hessian-vector products (Lanczos steps) per eigenvalue estimate.
        eig_tol: Relative residual ``‖Hv − λv‖/|λ|`` that ends Lanczos (an error bar on ``λ``).
        top_k: How many eigenvalues ``hessian_top_eigs`` logs.
        hvp: Hessian-vector products: ``"autograd"`` (double backward), ``"finite_difference"``
            (two gradients; for models without double backward), or ``"auto"`` (autograd,
            falling back to finite differences with one warning where double backward raises).
        trace_samples: HVPs per trace estimate.
        adaptive_samples: Forward passes per average-case estimate.
        adaptive_steps: Ascent steps per worst-case estimate.
        landscape_epochs: Epochs at whose end a W&B line plot of the loss along the
            (filter-normalized) gradient direction and a filter-normalized random
            direction (Li et al. 2018) is logged; needs a ``WandbLogger``.
        landscape_points: Points per landscape curve.
        landscape_radius: The curves span ``[-radius, radius]`` filter-normalized steps.
        spectrum_epochs: Epochs at whose end the eigenvalue density is logged.
        spectrum_iters: Lanczos steps per density estimate.
        spectrum_runs: Random start vectors per density estimate (per rank).
        per_module: Also measure each top-level submodule's Hessian block.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` to use instead of ``training_step``.
        seed: Seed of the monitor's own random numbers (never the global generator).

    Examples:
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> from lightning_sam import SharpnessMonitor
        >>> class Regression(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self.layer(x), y)
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> import tempfile
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        >>> monitor = SharpnessMonitor(every_n_steps=4)
        >>> trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tempfile.mkdtemp()), callbacks=[monitor],
        ...                      log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> sorted(monitor.last_values)  # doctest: +NORMALIZE_WHITESPACE
        ['sharpness/eos_ratio', 'sharpness/first_order', 'sharpness/grad_norm', 'sharpness/hessian_max_eig',
         'sharpness/hessian_max_eig_residual']
    """

    def __init__(
        self,
        measures: str | Sequence[str] | None = None,
        every_n_steps: int | Mapping[str, int] = 250,
        rho: float = 0.05,
        adaptive_rho: float = 0.1,
        eig_iters: int = 100,
        eig_tol: float = 1e-2,
        top_k: int = 3,
        hvp: str = "auto",
        trace_samples: int = 48,
        adaptive_samples: int = 16,
        adaptive_steps: int = 5,
        landscape_epochs: Sequence[int] = (),
        landscape_points: int = 21,
        landscape_radius: float = 1.0,
        spectrum_epochs: Sequence[int] = (),
        spectrum_iters: int = 80,
        spectrum_runs: int = 1,
        per_module: bool = False,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        try:
            self.measures = chosen(DEFAULT_MEASURES if measures is None else measures)
            self.every_n_steps = intervals(every_n_steps)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None
        settings = {
            "rho": rho,
            "adaptive_rho": adaptive_rho,
            "eig_iters": eig_iters,
            "eig_tol": eig_tol,
            "top_k": top_k,
            "hvp": hvp,
            "trace_samples": trace_samples,
            "adaptive_samples": adaptive_samples,
            "adaptive_steps": adaptive_steps,
        }
        if (why := check_settings(settings)) is not None:
            raise MisconfigurationException(why)
        self.rho, self.adaptive_rho = rho, adaptive_rho
        self.eig_iters, self.eig_tol, self.top_k, self.hvp = eig_iters, eig_tol, top_k, hvp
        self.trace_samples, self.adaptive_samples, self.adaptive_steps = trace_samples, adaptive_samples, adaptive_steps
        self.per_module = per_module
        self.loss_fn, self.seed = loss_fn, seed
        self.probe = FixedBatchProbe(loss_fn, seed)  # the fixed batch and the monitor's own random numbers
        # The epoch-end plots, on the monitor's fixed batch (each is also a callback of its own).
        self.spectrum = SpectrumPlot(spectrum_epochs, spectrum_iters, spectrum_runs, hvp, probe=self.probe)
        self.landscape = LandscapePlot(landscape_epochs, landscape_points, landscape_radius, probe=self.probe)
        self.spectrum_epochs, self.landscape_epochs = self.spectrum.epochs, self.landscape.epochs
        # State that survives checkpoints (``state_dict``, with the schedule's last steps).
        self.estimator_state: dict[str, Any] = {}  # the warm-start eigenvectors, per measure (and module)
        # What was logged: the last value of each key, and every (step, values) row of this process.
        self.last_values: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: dict[str, Tensor] = {}
        self._batch: Any = None
        self._batch_rng: Any = None
        # The weights and learning rates before a step whose update is measured.
        self._before_update: tuple[list[Tensor], list[float]] | None = None
        self._outcomes = Outcomes(on_fallback=self._finite_differences_from_now_on)
        self._state_key: str | None = None
        self._log_now = False
        self._per_step = [m for m in self.measures if MEASURES[m].per_step]
        self._scheduled = [m for m in MEASURES if m in self.measures and not MEASURES[m].per_step]  # registry order
        self._schedule = Schedule({m: self.every_n_steps[m] for m in self._scheduled})

    def _finite_differences_from_now_on(self) -> None:
        self.hvp = "finite_difference"  # double backward failed once: not tried again

    @property
    def fixed_batch(self) -> Any:
        """This rank's fixed batch, on the module's device (None before the first batch)."""
        return self.probe.fixed_batch

    @property
    def rng_state(self) -> Tensor:
        """The state of the monitor's own random generator."""
        return self.probe.rng_state

    @property
    def spectra(self) -> list[tuple[int, Spectrum]]:
        """``(epoch, Spectrum)`` of each of ``spectrum_epochs`` (every rank's runs)."""
        return self.spectrum.spectra

    @property
    def eigenvector(self) -> list[Tensor] | None:
        """The warm start of ``hessian_max_eig``: its last eigenvector (None before the first estimate)."""
        vectors: list[list[Tensor]] | None = self.estimator_state.get("eigenvectors")
        return None if vectors is None else vectors[0]

    @property
    def last_step(self) -> dict[str, int]:
        """The optimizer step each scheduled measure last ran at."""
        return self._schedule.last_step

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it on every hook call: build it once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                measures=self.measures, every_n_steps=self.every_n_steps, rho=self.rho
            )
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        # Sharded warm starts go whole into the checkpoint (a collective: Lightning asks every rank), and come back
        # as whole tensors, which the estimators cut into this rank's shard.
        whole = apply_to_collection(self.estimator_state, DTensor, lambda t: t.full_tensor())
        return {
            "last_step": dict(self.last_step),
            "estimator_state": whole,
            "hvp": self.hvp,  # after a fallback: finite differences, without trying double backward again
            **self.probe.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.restart(state_dict["last_step"])
        self.estimator_state = dict(state_dict.get("estimator_state", {}))
        if self.hvp == "auto" and state_dict.get("hvp") == "finite_difference":
            self._finite_differences_from_now_on()
        if state_dict.get("eigenvector") is not None:  # checkpoints before 0.3 kept hessian_max_eig's vector alone
            self.estimator_state["eigenvectors"] = [state_dict["eigenvector"]]
        self.probe.load_state_dict(state_dict)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use SharpnessMonitor with a Trainer that has no logger: pass one, e.g. "
                "Trainer(logger=CSVLogger('logs')) or WandbLogger(project=...)."
            )
        needs_loss = [m for m in self.measures if m != "grad_norm"]
        if not pl_module.automatic_optimization and self.loss_fn is None and needs_loss:
            raise MisconfigurationException(
                f"SharpnessMonitor measures {needs_loss} need the loss, but this module uses manual optimization: its "
                "training_step steps the optimizer, so the monitor cannot call it. Pass "
                "SharpnessMonitor(loss_fn=lambda module, batch: ...) or measure only 'grad_norm'."
            )
        self.landscape.setup(trainer, pl_module, stage)
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is not None and trainer.is_global_zero:
            define_sharpness_metrics(wandb_logger, {m: MEASURES[m].summary for m in self.measures})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint's state is loaded: the restored tensors go where the model is.
        self.probe.restore_to(trainer, pl_module)
        self.estimator_state = move_data_to_device(self.estimator_state, pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self._log_now = lightning_logs_this_batch(trainer)
        # A manual training step may step each of its optimizers: the global step may rise by that many.
        ahead = max(1, len(trainer.optimizers)) if not pl_module.automatic_optimization else 1
        replayed = (self._log_now and "first_order" in self.measures) or self._update_due(trainer, ahead)
        self._batch_rng = rng_state(generators_of(pl_module)) if replayed else None
        self.probe.capture(trainer, batch)

    def _update_due(self, trainer: pl.Trainer, ahead: int = 1) -> bool:
        """Whether a measure of an update is due after one of the coming ``ahead`` optimizer steps."""
        return any(MEASURES[m].needs_update for m in self._schedule.due(trainer.global_step + ahead))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._update_due(trainer):
            weights = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]
            lrs = [float(g["lr"]) for g in base_of(optimizer).param_groups if g["params"]]
            self._before_update = weights, lrs
        if not self._log_now or not self._per_step:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        step = TrainingStep(
            params=params,
            grads=[p.grad for p in params if p.grad is not None],
            loss_fn=lambda: self._replayed_loss(pl_module),
            sam_stats=getattr(pl_module, "sam_stats", None),  # a SAMMixin module's numbers for this step
            optimizer=optimizer,
            settings=self,
        )
        for name in self._per_step:
            with self._outcomes.of(name, self._pending):
                self._pending.update(MEASURES[name].estimate(step))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self._schedule.due(step)
        if not self._log_now and not due:  # the common case
            return
        keys = {k: r for m in self._per_step for k, r in MEASURES[m].keys(self).items()} if self._log_now else {}
        values, self._pending = self._pending, {}
        error = self._outcomes.take_error()
        if due:
            for measured in (
                self._update_measures(trainer, pl_module, due),
                self._scheduled_measures(trainer, pl_module, due),
            ):
                keys.update(measured[0])
                values.update(measured[1])
                error = error or measured[2]
            self._schedule.done(due, step)
        self._log(trainer, keys, values, error)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe.fixed_batch is None:
            return
        if trainer.current_epoch in self.spectrum.epochs:
            self.spectrum.hvp = self.hvp  # finite differences, once double backward has failed
            self._record(trainer, self.spectrum.plot(trainer, pl_module))
        if trainer.current_epoch in self.landscape.epochs:
            self.landscape.plot(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = [m for m in self._scheduled if self.last_step.get(m) != trainer.global_step]
        if due:
            self._before_update = None  # no update to look along at the end
            keys, values, error = self._update_measures(trainer, pl_module, due)
            more = self._scheduled_measures(trainer, pl_module, due)
            self._schedule.done(due, trainer.global_step)
            self._log(trainer, {**keys, **more[0]}, {**values, **more[1]}, error or more[2])

    def _update_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[str]
    ) -> tuple[dict[str, Reduction], dict[str, Tensor], BaseException | None]:
        """The due measures of the last update, on the batch it came from (in its mode, with its random numbers)."""
        due = [m for m in due if MEASURES[m].needs_update]
        before, self._before_update = self._before_update or (None, None), None
        keys: dict[str, Reduction] = {k: r for m in due for k, r in MEASURES[m].keys(self).items()}
        values: dict[str, Tensor] = {}
        if not due:
            return keys, values, None
        params: list[Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
        sharded = any(isinstance(p, DTensor) for p in params)

        def loss_fn() -> Tensor:
            loss = self._replayed_loss(pl_module)  # sharded: one loss for all ranks, each deciding alike
            return trainer.strategy.reduce(loss, reduce_op="mean") if sharded else loss

        step = TrainingStep(
            params=params,
            grads=[],
            loss_fn=loss_fn,
            sam_stats=getattr(pl_module, "sam_stats", None),
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
            settings=self,
            before=before[0],
            lrs=before[1],
            state=self.estimator_state.setdefault("update", {}),
        )
        for name in due:
            with self._outcomes.of(name, values):
                values.update(MEASURES[name].estimate(step))
        return keys, values, self._outcomes.take_error()

    def _scheduled_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[str]
    ) -> tuple[dict[str, Reduction], dict[str, Tensor], BaseException | None]:
        """The due measures on the fixed batch: the keys they declare, the values this rank has, and any error."""
        due = [m for m in due if not MEASURES[m].needs_update]
        keys: dict[str, Reduction] = {k: r for m in due for k, r in MEASURES[m].keys(self).items()}
        modules = [name for name, _ in _top_level_blocks(pl_module)] if self.per_module else []
        per_module = [m for m in due if m in PER_MODULE_MEASURES]
        keys.update(
            {f"{name}/{k}": r for name in modules for m in per_module for k, r in MEASURES[m].keys(self).items()}
        )
        if any(isinstance(p, DTensor) for p in pl_module.parameters()):
            # On sharded parameters every rank holds the same global estimate: not R independent ones to average.
            keys = {k: "mean" if r == "stderr" else r for k, r in keys.items()}
        logged: dict[str, Tensor] = {}
        if self.probe.fixed_batch is None:
            self._outcomes.warn("no_batch", "SharpnessMonitor: no training batch was seen, so nothing was measured.")
            return keys, logged, None
        with self.probe.measuring(pl_module) as (loss_fn, params, generator):
            if not params:
                self._outcomes.warn("no_params", "SharpnessMonitor: the module has no trainable parameter to measure.")
                return keys, logged, None
            if any(isinstance(p, DTensor) for p in params):
                skipped = [name for name in due if not MEASURES[name].sharded]
                if skipped:
                    self._outcomes.warn("sharded", f"SharpnessMonitor: {skipped} are skipped: {_SHARDED}")
                due = [name for name in due if MEASURES[name].sharded]
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            blocks = [("", params, self.estimator_state, due)]
            blocks += (
                [
                    (f"{name}/", block, self.estimator_state.setdefault(f"module:{name}", {}), per_module)
                    for name, block in _top_level_blocks(pl_module)
                ]
                if self.per_module
                else []
            )
            for prefix, block, state, names in blocks:
                batch = FixedBatch(loss_fn, block, generator, optimizer, self, state)
                for name in names:
                    outputs: dict[str, Tensor] = {}
                    with self._outcomes.of(name, outputs):
                        outputs.update(MEASURES[name].estimate(batch))
                    batch.values.update(outputs)
                    logged.update({prefix + key: v.detach().float() for key, v in outputs.items()})
        return keys, logged, self._outcomes.take_error()

    def _replayed_loss(self, pl_module: pl.LightningModule) -> Tensor:
        """The loss on the batch just trained on, in its mode and with its training step's random numbers."""
        now = rng_state(generators_of(pl_module))
        try:
            if self._batch_rng is not None:
                set_rng_state(self._batch_rng)  # dropout and augmentations: replay the step's random numbers
            with torch.autocast(pl_module.device.type, enabled=False):
                return self.probe.loss(pl_module, self._batch)
        finally:
            set_rng_state(now)

    def _log(
        self,
        trainer: pl.Trainer,
        keys: dict[str, Reduction],
        values: dict[str, Tensor],
        error: BaseException | None = None,
    ) -> None:
        self._record(trainer, log_round(trainer, keys, values, error))

    def _record(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if metrics:
            self.last_values.update(metrics)
            self.history.append((lightning_logging_step(trainer), metrics))


_SHARDED = (
    "the parameters are sharded (DTensors: FSDP2, tensor parallelism), and these estimators draw random "
    "perturbations of whole parameters; the Hessian measures, critical_sharpness, first_order and grad_norm run there."
)


def _top_level_blocks(pl_module: pl.LightningModule) -> list[tuple[str, list[Tensor]]]:
    """Each top-level submodule's trainable parameters (the blocks of ``per_module``)."""
    blocks: list[tuple[str, list[Tensor]]] = [
        (name, [p for p in child.parameters() if p.requires_grad]) for name, child in pl_module.named_children()
    ]
    return [(name, params) for name, params in blocks if params]
