"""`SharpnessMonitor`: estimate the sharpness of the model during training and log the curves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_sam import sharpness
from lightning_sam._observe import loss_in, observing
from lightning_sam.functional import grad_norm_squared, perturb_, restore_
from lightning_sam.mixin import SAMMixin
from lightning_sam.optimizer import SAM
from lightning_sam.wandb_integration import define_sharpness_metrics, find_wandb_logger, log_landscape

__all__ = ["SharpnessMonitor"]

CHEAP = ("first_order", "grad_norm")
EXPENSIVE = ("hessian_max_eig", "eos_ratio", "hessian_trace", "adaptive_avg", "adaptive_worst")
MEASURES = CHEAP + EXPENSIVE
DEFAULT_MEASURES = ("first_order", "grad_norm", "hessian_max_eig", "eos_ratio")

LossFn = Callable[[pl.LightningModule, Any], Tensor]


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
    | ``hessian_max_eig`` | top Hessian eigenvalue, power iteration, warm-started (Yao et al. 2020) | a few HVPs |
    | ``eos_ratio`` | ``λ_max`` over SGD's stability threshold ``(2+2β)/lr`` (Cohen et al. 2021) | free with it |
    | ``hessian_trace`` | Hutch++ trace estimate (Meyer et al. 2021) | ``trace_samples`` HVPs |
    | ``adaptive_avg`` | ``E[L(w+δ)] − L(w)``, ``δ ~ N(0, rho² w²)`` (Andriushchenko et al. 2023) | forwards |
    | ``adaptive_worst`` | worst case of the same within ``‖δ/|w|‖ ≤ rho`` | forward+backward steps |

    ``first_order`` and ``grad_norm`` are logged on the Trainer's logging steps
    (``log_every_n_steps``). The others run every ``every_n_steps`` optimizer steps and
    at the end of training, in eval mode, on a fixed batch: the first training batch
    of the run (on each rank). Estimates are computed in float32 with autocast off,
    with grad enabled even inside inference mode; on DDP they run on the unwrapped module,
    each rank on its own batch, and are averaged over ranks with one all-reduce. The
    monitor only observes: weights, ``.grad``, train/eval mode, BatchNorm statistics,
    torchmetrics states and the random state are all as they were.

    The loss is the module's ``training_step(batch, batch_idx)`` output (a tensor, or
    ``"loss"`` of a dict), with ``self.log`` silenced; pass ``loss_fn`` if that does not
    fit.

    Args:
        measures: Which measures to log (default: ``first_order``, ``grad_norm``,
            ``hessian_max_eig``, ``eos_ratio``).
        every_n_steps: Interval of the Hessian and adaptive measures, in optimizer steps;
            an int for all, or a mapping measure → interval.
        rho: Radius of ``first_order`` for modules without SAMMixin (SAMMixin modules
            report their own optimizer's step for free).
        adaptive_rho: Radius of the adaptive measures (relative to ``|w|``).
        power_iters: At most this many HVPs per top-eigenvalue estimate.
        power_tol: Relative change that ends power iteration.
        trace_samples: HVPs per trace estimate.
        adaptive_samples: Forward passes per average-case estimate.
        adaptive_steps: Ascent steps per worst-case estimate.
        landscape_epochs: Epochs at whose end a W&B line plot of the loss along the
            (filter-normalized) gradient direction and a filter-normalized random
            direction (Li et al. 2018) is logged; needs a ``WandbLogger``.
        landscape_points: Points per landscape curve.
        landscape_radius: The curves span ``[-radius, radius]`` filter-normalized steps.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` to use instead of ``training_step``.
        seed: Seed of the monitor's own random numbers (never the global generator).

    Example:
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
        >>> sorted(monitor.last_values)
        ['sharpness/eos_ratio', 'sharpness/first_order', 'sharpness/grad_norm', 'sharpness/hessian_max_eig']
    """

    def __init__(
        self,
        measures: Sequence[str] | None = None,
        every_n_steps: int | Mapping[str, int] = 250,
        rho: float = 0.05,
        adaptive_rho: float = 0.1,
        power_iters: int = 100,
        power_tol: float = 1e-3,
        trace_samples: int = 48,
        adaptive_samples: int = 16,
        adaptive_steps: int = 5,
        landscape_epochs: Sequence[int] = (),
        landscape_points: int = 21,
        landscape_radius: float = 1.0,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        self.measures = tuple(DEFAULT_MEASURES if measures is None else measures)
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures:
            raise MisconfigurationException(
                f"Unknown SharpnessMonitor measure(s) {unknown or '(none given)'}. Valid measures: {list(MEASURES)}."
            )
        intervals = every_n_steps if isinstance(every_n_steps, Mapping) else dict.fromkeys(EXPENSIVE, every_n_steps)
        bad_keys = [k for k in intervals if k not in EXPENSIVE]
        if bad_keys:
            raise MisconfigurationException(
                f"every_n_steps sets intervals of {bad_keys}, which have none: only {list(EXPENSIVE)} do "
                "(first_order and grad_norm follow the Trainer's log_every_n_steps)."
            )
        self.every_n_steps = {m: intervals.get(m, 250) for m in EXPENSIVE}
        for name, value in {
            **{f"every_n_steps[{m!r}]": v for m, v in self.every_n_steps.items()},
            "power_iters": power_iters,
            "trace_samples": trace_samples,
            "adaptive_samples": adaptive_samples,
            "adaptive_steps": adaptive_steps,
            "landscape_points": landscape_points,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"SharpnessMonitor {name} must be a positive integer, got {value!r}.")
        for name, number in {"rho": rho, "adaptive_rho": adaptive_rho, "power_tol": power_tol}.items():
            if not (isinstance(number, int | float) and math.isfinite(number) and number > 0):
                raise MisconfigurationException(f"SharpnessMonitor {name} must be a number > 0, got {number!r}.")
        if any(not isinstance(e, int) or e < 0 for e in landscape_epochs):
            raise MisconfigurationException(f"landscape_epochs must be epoch numbers >= 0, got {landscape_epochs!r}.")
        self.rho, self.adaptive_rho = rho, adaptive_rho
        self.power_iters, self.power_tol = power_iters, power_tol
        self.trace_samples, self.adaptive_samples, self.adaptive_steps = trace_samples, adaptive_samples, adaptive_steps
        self.landscape_epochs = tuple(landscape_epochs)
        self.landscape_points, self.landscape_radius = landscape_points, landscape_radius
        self.loss_fn = loss_fn
        self.seed = seed
        # State that survives checkpoints (``state_dict``).
        self.last_step: dict[str, int] = {}
        self.eigenvector: list[Tensor] | None = None
        self.fixed_batch: Any = None
        self.rng_state: Tensor = torch.Generator().manual_seed(seed).get_state()
        # What was logged: the last value of each key, and every (step, values) row of this process.
        self.last_values: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: dict[str, Tensor] = {}
        self._batch: Any = None
        self._batch_rng: tuple[Tensor, Tensor | None] | None = None
        self._warned: set[str] = set()
        self._state_key: str | None = None
        self._log_now = False
        self._shortest_interval = min(self.every_n_steps[m] for m in EXPENSIVE)

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
        return {
            "last_step": dict(self.last_step),
            "eigenvector": self.eigenvector,
            "fixed_batch": self.fixed_batch,
            "rng_state": self.rng_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = dict(state_dict["last_step"])
        self.eigenvector = state_dict["eigenvector"]
        self.fixed_batch = state_dict["fixed_batch"]
        self.rng_state = state_dict["rng_state"]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use SharpnessMonitor with a Trainer that has no logger: pass one, e.g. "
                "Trainer(logger=CSVLogger('logs')) or WandbLogger(project=...)."
            )
        if self.landscape_epochs and find_wandb_logger(trainer.loggers) is None:
            rank_zero_warn(
                "SharpnessMonitor(landscape_epochs=...) logs W&B line plots; without a WandbLogger it skips them."
            )
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is not None and trainer.is_global_zero:
            define_sharpness_metrics(wandb_logger)
        if self.eigenvector is not None:
            self.eigenvector = [v.to(pl_module.device) for v in self.eigenvector]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self._log_now = _should_log(trainer)
        self._batch_rng = _torch_rng_state() if self._log_now and "first_order" in self.measures else None
        if self.fixed_batch is None:
            self.fixed_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._log_now:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if "grad_norm" in self.measures:
            self._pending["grad_norm"] = grad_norm_squared(params, grads).sqrt().float()
        if "first_order" in self.measures and not isinstance(pl_module, SAMMixin):
            self._pending["first_order"] = self._first_order(pl_module, params, grads)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._log_now and step % self._shortest_interval:  # the common case: nothing to do
            return
        values = self._pending
        self._pending = {}
        if "first_order" in self.measures and isinstance(pl_module, SAMMixin) and self._log_now:
            values["first_order"] = pl_module.sam_stats["first_order_sharpness"].float()
        values.update(self._expensive(trainer, pl_module, at_end=False))
        self._log(trainer, values)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch not in self.landscape_epochs or self.fixed_batch is None:
            return
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is None:
            return
        with self._measuring(pl_module) as (loss_fn, params, generator):
            with torch.enable_grad():
                grads = list(torch.autograd.grad(loss_fn(), params))
            randoms = [torch.randn(p.shape, generator=generator).to(p) for p in params]
            alphas = torch.linspace(-self.landscape_radius, self.landscape_radius, self.landscape_points)
            curves = torch.stack(
                [
                    sharpness.loss_along(loss_fn, params, sharpness.filter_normalized(d, params), alphas)
                    for d in (grads, randoms)
                ]
            )
        curves = trainer.strategy.reduce(curves.float(), reduce_op="mean")
        if trainer.is_global_zero:
            log_landscape(
                wandb_logger,
                "sharpness/landscape",
                alphas,
                {"gradient direction": curves[0].cpu(), "random direction": curves[1].cpu()},
                step=trainer.global_step,
                title=f"Loss along filter-normalized directions, epoch {trainer.current_epoch}",
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, self._expensive(trainer, pl_module, at_end=True))

    def _expensive(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_end: bool) -> dict[str, Tensor]:
        step = trainer.global_step
        due = [
            m
            for m in self.measures
            if m in EXPENSIVE
            and self.last_step.get(m) != step
            and (at_end or (step > 0 and step % self.every_n_steps[m] == 0))
        ]
        if "eos_ratio" in due and "hessian_max_eig" not in due and self.last_step.get("hessian_max_eig") != step:
            due.append("hessian_max_eig")  # the ratio needs a fresh eigenvalue
        if not due:
            return {}
        if self.fixed_batch is None:
            self._warn_once("no_batch", "SharpnessMonitor: no training batch was seen, so nothing could be measured.")
            return {}
        values = self._estimate(trainer, pl_module, due)
        for m in due:
            self.last_step[m] = step
        return {m: v for m, v in values.items() if m in self.measures}

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[str]) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        with self._measuring(pl_module) as (loss_fn, params, generator):
            if "hessian_max_eig" in due:
                values["hessian_max_eig"], self.eigenvector = sharpness.hessian_max_eig(
                    loss_fn,
                    params,
                    max_iters=self.power_iters,
                    tol=self.power_tol,
                    init=self.eigenvector,
                    generator=generator,
                )
            if "eos_ratio" in due:
                threshold = _stability_threshold(trainer)
                if threshold is None:
                    self._warn_once(
                        "eos",
                        "SharpnessMonitor: eos_ratio needs an SGD (or SAM over SGD) optimizer, whose stability "
                        "threshold is (2 + 2·momentum)/lr; it is not logged for this optimizer.",
                    )
                else:
                    values["eos_ratio"] = values["hessian_max_eig"] / threshold
            if "hessian_trace" in due:
                values["hessian_trace"] = sharpness.hessian_trace(
                    loss_fn, params, samples=self.trace_samples, generator=generator
                )
            if "adaptive_avg" in due:
                values["adaptive_avg"] = sharpness.adaptive_sharpness_avg(
                    loss_fn, params, rho=self.adaptive_rho, samples=self.adaptive_samples, generator=generator
                )
            if "adaptive_worst" in due:
                values["adaptive_worst"] = sharpness.adaptive_sharpness_worst(
                    loss_fn, params, rho=self.adaptive_rho, steps=self.adaptive_steps
                )
        return {k: v.detach().float() for k, v in values.items()}

    @contextmanager
    def _measuring(
        self, pl_module: pl.LightningModule, eval_mode: bool = True, batch: Any = None
    ) -> Iterator[tuple[Callable[[], Tensor], list[Tensor], torch.Generator]]:
        """Eval mode (unless told), float32, grad on; modes and random state restored afterwards."""
        batch = self.fixed_batch if batch is None else batch
        params: list[Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
        modes = {m: m.training for m in pl_module.modules()} if eval_mode else {}
        rng = _collect_rng_states()
        generator = torch.Generator().manual_seed(0)
        generator.set_state(self.rng_state)
        if eval_mode:
            pl_module.eval()
        device_type = pl_module.device.type

        def loss_fn() -> Tensor:
            return self._loss(pl_module, batch)

        try:
            with torch.inference_mode(False), torch.autocast(device_type, enabled=False):
                yield loss_fn, params, generator
        finally:
            self.rng_state = generator.get_state()
            _set_rng_states(rng)
            for m, training in modes.items():
                m.training = training

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
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

    def _first_order(self, pl_module: pl.LightningModule, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """``L(w + e) − L(w)`` on the current batch, modes and random state as in its training step."""
        now = _collect_rng_states()

        def replayed() -> Tensor:  # dropout draws from torch's generators: replay the training step's
            if self._batch_rng is not None:
                _set_torch_rng_state(self._batch_rng)
            return self._loss(pl_module, self._batch)

        try:
            with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
                before = replayed()
                backup = perturb_(params, grads, self.rho / (grad_norm_squared(params, grads).sqrt() + 1e-12))
                try:
                    after = replayed()
                finally:
                    restore_(params, backup)
        finally:
            _set_rng_states(now)
        return (after - before).float()

    def _log(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> None:
        if not values:
            return
        keys = sorted(values)
        stacked = torch.stack([values[k].to(trainer.strategy.root_device).float().reshape(()) for k in keys])
        reduced = self._reduce(trainer, stacked)
        metrics = {f"sharpness/{k}": float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
        self.last_values.update(metrics)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.history.append((step, metrics))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _reduce(self, trainer: pl.Trainer, values: Tensor) -> Tensor:
        """Mean over ranks: one all-reduce for every value logged at this step."""
        reduced: Tensor = trainer.strategy.reduce(values, reduce_op="mean")
        return reduced

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)


def _torch_rng_state() -> tuple[Tensor, Tensor | None]:
    """Torch's CPU generator and the current CUDA device's (cheaper than Lightning's full set)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_torch_rng_state(state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def _should_log(trainer: pl.Trainer) -> bool:
    """The Trainer's own decision for ``self.log`` on this batch (``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def _stability_threshold(trainer: pl.Trainer) -> float | None:
    """``(2 + 2β)/lr`` for (heavy-ball) SGD, the edge of stability (Cohen et al. 2021); None otherwise."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if not isinstance(base, torch.optim.SGD):
        return None
    group = base.param_groups[0]
    return float((2 + 2 * group.get("momentum", 0.0)) / group["lr"])
