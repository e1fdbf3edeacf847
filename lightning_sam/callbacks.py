"""`SharpnessMonitor`: estimate the sharpness of the model during training and log the curves."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_sam import sharpness
from lightning_sam._compat import lightning_logging_step, lightning_logs_this_batch
from lightning_sam._observe import loss_in, observing
from lightning_sam._restore import generators_of, rng_state, set_rng_state
from lightning_sam.figures import density_curve, save_spectrum_figure
from lightning_sam.hessian import HVP_BACKENDS, HVPFallbackWarning, Spectrum
from lightning_sam.measures import MEASURES, PER_MODULE_MEASURES, FixedBatch, NotThisStep, TrainingStep, Unavailable
from lightning_sam.wandb_integration import define_sharpness_metrics, find_wandb_logger, log_line_plot

__all__ = ["SharpnessMonitor"]

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
    | ``hessian_max_eig`` | top Hessian eigenvalue by Lanczos, warm-started, and its ``_residual`` | a few HVPs |
    | ``hessian_top_eigs`` | the ``top_k`` largest eigenvalues ``hessian_eig_i`` and their residuals | more HVPs |
    | ``preconditioned_max_eig`` | ``λ_max(P⁻¹H)`` for Adam/AdamW/RMSprop/Adagrad (Cohen et al. 2022) | a few HVPs |
    | ``eos_ratio`` | ``λ_max(S H)`` over the optimizer's edge of stability (1 = at the edge) | free with the above |
    | ``hessian_trace`` | Hutch++ trace estimate (Meyer et al. 2021) and its ``_stderr`` | ``trace_samples`` HVPs |
    | ``adaptive_avg`` | ``E[L(w+δ)] − L(w)``, ``δ ~ N(0, rho² w²)`` (Andriushchenko et al. 2023) | forwards |
    | ``adaptive_worst`` | worst case of the same within ``‖δ/|w|‖ ≤ rho`` | forward+backward steps |

    The Hessian's eigenvalue density (stochastic Lanczos quadrature, Ghorbani et al. 2019)
    and its fraction of negative eigenvalues (``sharpness/negative_fraction``) are logged at
    the end of ``spectrum_epochs``: a W&B line plot, and a figure file in the log directory
    for every logger. ``per_module=True`` adds ``hessian_max_eig`` and ``hessian_trace`` of
    each top-level submodule's block of the Hessian, as ``sharpness/<module>/...``.

    ``first_order`` and ``grad_norm`` are logged on the Trainer's logging steps
    (``log_every_n_steps``). The others run every ``every_n_steps`` optimizer steps and
    at the end of training, in eval mode, on a fixed batch: the first training batch
    of the run (on each rank; a checkpoint keeps every rank's). Each measure is one entry
    of the registry in [`lightning_sam.measures`][lightning_sam.measures]. Estimates are
    computed in float32 with autocast off, with grad enabled even inside inference mode;
    on DDP they run on the unwrapped module, each rank on its own batch, and are averaged
    over ranks with one all-reduce. The
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
        names = DEFAULT_MEASURES if measures is None else (measures,) if isinstance(measures, str) else measures
        self.measures = tuple(names)
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures:
            raise MisconfigurationException(
                f"Unknown SharpnessMonitor measure(s) {unknown or '(none given)'}. Valid measures: {list(MEASURES)}."
            )
        scheduled = [name for name, m in MEASURES.items() if not m.per_step]
        intervals = every_n_steps if isinstance(every_n_steps, Mapping) else dict.fromkeys(scheduled, every_n_steps)
        bad_keys = [k for k in intervals if k not in scheduled]
        if bad_keys:
            per_step = [name for name, m in MEASURES.items() if m.per_step]
            raise MisconfigurationException(
                f"every_n_steps sets intervals of {bad_keys}, which have none: only {scheduled} do "
                f"({', '.join(per_step)} follow the Trainer's log_every_n_steps)."
            )
        self.every_n_steps = {m: intervals.get(m, 250) for m in scheduled}
        for name, value in {
            **{f"every_n_steps[{m!r}]": v for m, v in self.every_n_steps.items()},
            "eig_iters": eig_iters,
            "top_k": top_k,
            "spectrum_iters": spectrum_iters,
            "spectrum_runs": spectrum_runs,
            "trace_samples": trace_samples,
            "adaptive_samples": adaptive_samples,
            "adaptive_steps": adaptive_steps,
            "landscape_points": landscape_points,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"SharpnessMonitor {name} must be a positive integer, got {value!r}.")
        for name, number in {"rho": rho, "adaptive_rho": adaptive_rho, "eig_tol": eig_tol}.items():
            if isinstance(number, bool) or not (
                isinstance(number, int | float) and math.isfinite(number) and number > 0
            ):
                raise MisconfigurationException(f"SharpnessMonitor {name} must be a number > 0, got {number!r}.")
        for name, epochs in {"landscape_epochs": landscape_epochs, "spectrum_epochs": spectrum_epochs}.items():
            if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
                raise MisconfigurationException(f"{name} must be epoch numbers >= 0, got {epochs!r}.")
        if hvp not in HVP_BACKENDS:
            raise MisconfigurationException(f"SharpnessMonitor hvp must be one of {list(HVP_BACKENDS)}, got {hvp!r}.")
        self.rho, self.adaptive_rho = rho, adaptive_rho
        self.eig_iters, self.eig_tol, self.top_k, self.hvp = eig_iters, eig_tol, top_k, hvp
        self.spectrum_epochs = tuple(spectrum_epochs)
        self.spectrum_iters, self.spectrum_runs = spectrum_iters, spectrum_runs
        self.per_module = per_module
        self.trace_samples, self.adaptive_samples, self.adaptive_steps = trace_samples, adaptive_samples, adaptive_steps
        self.landscape_epochs = tuple(landscape_epochs)
        self.landscape_points, self.landscape_radius = landscape_points, landscape_radius
        self.loss_fn = loss_fn
        self.seed = seed
        # State that survives checkpoints (``state_dict``).
        self.last_step: dict[str, int] = {}
        self.estimator_state: dict[str, Any] = {}  # the warm-start eigenvectors, per measure (and module)
        self.fixed_batches: list[Any] | None = None  # every rank's fixed batch, on the CPU
        self.fixed_batch: Any = None  # this rank's, on the module's device
        self.rng_state: Tensor = torch.Generator().manual_seed(seed).get_state()
        # What was logged: the last value of each key, and every (step, values) row of this process.
        self.last_values: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.spectra: list[tuple[int, Spectrum]] = []  # (epoch, every rank's runs) of each spectrum_epochs
        self._pending: dict[str, Tensor] = {}
        self._batch: Any = None
        self._batch_rng: Any = None
        self._warned: set[str] = set()
        self._warning_registry: dict[Any, Any] = {}
        self._state_key: str | None = None
        self._log_now = False
        self._per_step = [m for m in self.measures if MEASURES[m].per_step]
        self._scheduled = [m for m in MEASURES if m in self.measures and not MEASURES[m].per_step]  # registry order
        self._shortest_interval = min((self.every_n_steps[m] for m in self._scheduled), default=0)

    @property
    def eigenvector(self) -> list[Tensor] | None:
        """The warm start of ``hessian_max_eig``: its last eigenvector (None before the first estimate)."""
        vectors: list[list[Tensor]] | None = self.estimator_state.get("eigenvectors")
        return None if vectors is None else vectors[0]

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
            "estimator_state": self.estimator_state,
            "fixed_batches": self.fixed_batches,
            "rng_state": self.rng_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = dict(state_dict["last_step"])
        self.estimator_state = dict(state_dict.get("estimator_state", {}))
        if state_dict.get("eigenvector") is not None:  # checkpoints before 0.3 kept hessian_max_eig's vector alone
            self.estimator_state["eigenvectors"] = [state_dict["eigenvector"]]
        old = state_dict.get("fixed_batch")  # checkpoints of 0.1.0 kept one rank's batch
        self.fixed_batches = state_dict.get("fixed_batches", None if old is None else [old])
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
        needs_loss = [m for m in self.measures if m != "grad_norm"]
        if not pl_module.automatic_optimization and self.loss_fn is None and needs_loss:
            raise MisconfigurationException(
                f"SharpnessMonitor measures {needs_loss} need the loss, but this module uses manual optimization: its "
                "training_step steps the optimizer, so the monitor cannot call it. Pass "
                "SharpnessMonitor(loss_fn=lambda module, batch: ...) or measure only 'grad_norm'."
            )
        if self.landscape_epochs and find_wandb_logger(trainer.loggers) is None:
            rank_zero_warn(
                "SharpnessMonitor(landscape_epochs=...) logs W&B line plots; without a WandbLogger it skips them."
            )
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is not None and trainer.is_global_zero:
            define_sharpness_metrics(wandb_logger)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint's state is loaded: the restored tensors go where the model is.
        if self.fixed_batches:
            mine = self.fixed_batches[trainer.global_rank % len(self.fixed_batches)]
            self.fixed_batch = move_data_to_device(mine, pl_module.device)
        self.estimator_state = move_data_to_device(self.estimator_state, pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self._log_now = lightning_logs_this_batch(trainer)
        self._batch_rng = (
            rng_state(generators_of(pl_module)) if self._log_now and "first_order" in self.measures else None
        )
        if self.fixed_batch is None:
            self.fixed_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
            self.fixed_batches = _every_ranks(trainer, apply_to_collection(batch, Tensor, lambda t: t.detach().cpu()))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._log_now or not self._per_step:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        step = TrainingStep(
            params=params,
            grads=[p.grad for p in params if p.grad is not None],
            loss_fn=lambda: self._replayed_loss(pl_module),
            sam_stats=getattr(pl_module, "sam_stats", None),  # a SAMMixin module's numbers for this step
            rho=self.rho,
        )
        for name in self._per_step:
            with self._unless_unavailable(name):
                value = MEASURES[name].estimate(step)
                outputs = value if isinstance(value, dict) else {name: value}
                self._pending.update({key: v.detach().float() for key, v in outputs.items()})

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._log_now and (not self._scheduled or step % self._shortest_interval):  # the common case
            return
        values = self._pending
        self._pending = {}
        values.update(self._scheduled_measures(trainer, pl_module, at_end=False))
        self._log(trainer, values)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fixed_batch is None:
            return
        if trainer.current_epoch in self.spectrum_epochs:
            self._log_spectrum(trainer, pl_module)
        if trainer.current_epoch in self.landscape_epochs:
            self._log_landscape(trainer, pl_module)

    def _log_spectrum(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The eigenvalue density on the fixed batch: every rank's runs together, a plot, and the negative fraction."""
        spectrum = None
        with self._measuring(pl_module) as (loss_fn, params, generator):
            if not self._whole(params, "spectrum_epochs"):
                return
            with self._unless_unavailable("spectrum"):
                spectrum = sharpness.hessian_spectrum(
                    loss_fn,
                    params,
                    iters=self.spectrum_iters,
                    runs=self.spectrum_runs,
                    hvp=self.hvp,
                    generator=generator,
                )
        if spectrum is None:
            return
        if trainer.world_size > 1:
            gathered = [
                trainer.strategy.all_gather(t.to(trainer.strategy.root_device)).reshape(-1, t.shape[-1]).cpu()
                for t in (spectrum.nodes, spectrum.weights)
            ]
            spectrum = Spectrum(*gathered)
        epoch, step = trainer.current_epoch, trainer.global_step
        self.spectra.append((epoch, spectrum))
        self._log(trainer, {"negative_fraction": spectrum.negative_fraction()})
        log_dir = trainer.log_dir  # a collective on DDP (a broadcast of rank zero's): every rank asks
        if not trainer.is_global_zero:
            return
        title = f"Hessian eigenvalue density, epoch {epoch}"
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is not None:
            grid, density = density_curve(spectrum)
            curves = {"log10 density": density.clamp_min(1e-12).log10()}
            log_line_plot(wandb_logger, "sharpness/spectrum", grid, curves, step, title, xname="Hessian eigenvalue")
        path = Path(log_dir or trainer.default_root_dir) / "sharpness" / f"spectrum_epoch{epoch:03d}.png"
        try:
            save_spectrum_figure({"density": spectrum}, path, title)
        except ImportError:
            self._warn_once(
                "matplotlib", "SharpnessMonitor: the spectrum figure needs matplotlib: pip install matplotlib."
            )

    def _whole(self, params: list[Tensor], what: str) -> bool:
        """Whether an epoch-end plot can run: trainable parameters, unsharded (it needs whole ones)."""
        if any(isinstance(p, DTensor) for p in params):
            self._warn_once(what, f"SharpnessMonitor: {what} is skipped: {_SHARDED}")
            return False
        return bool(params)

    def _log_landscape(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is None:
            return
        with self._measuring(pl_module) as (loss_fn, params, generator):
            if not self._whole(params, "landscape_epochs"):
                return
            grads = sharpness.gradients(loss_fn(), params)
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
            log_line_plot(
                wandb_logger,
                "sharpness/landscape",
                alphas,
                {"gradient direction": curves[0].cpu(), "random direction": curves[1].cpu()},
                step=trainer.global_step,
                title=f"Loss along filter-normalized directions, epoch {trainer.current_epoch}",
                xname="step along the filter-normalized direction",
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, self._scheduled_measures(trainer, pl_module, at_end=True))

    def _scheduled_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_end: bool
    ) -> dict[str, Tensor]:
        step = trainer.global_step
        due = [
            m
            for m in self._scheduled
            if self.last_step.get(m) != step and (at_end or (step > 0 and step % self.every_n_steps[m] == 0))
        ]
        if not due:
            return {}
        if self.fixed_batch is None:
            self._warn_once("no_batch", "SharpnessMonitor: no training batch was seen, so nothing could be measured.")
            return {}
        logged: dict[str, Tensor] = {}
        with self._measuring(pl_module) as (loss_fn, params, generator):
            if not params:
                self._warn_once("no_params", "SharpnessMonitor: the module has no trainable parameter to measure.")
                return {}
            if any(isinstance(p, DTensor) for p in params):
                skipped = [name for name in due if not MEASURES[name].sharded]
                if skipped:
                    self._warn_once("sharded", f"SharpnessMonitor: {skipped} are skipped: {_SHARDED}")
                due = [name for name in due if MEASURES[name].sharded]
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            blocks = [("", params, self.estimator_state, due)]
            if self.per_module:
                per_module = [m for m in due if m in PER_MODULE_MEASURES]
                blocks += [
                    (f"{name}/", block, self.estimator_state.setdefault(f"module:{name}", {}), per_module)
                    for name, block in _top_level_blocks(pl_module)
                ]
            for prefix, block, state, names in blocks:
                batch = FixedBatch(loss_fn, block, generator, optimizer, self, state)
                for name in names:
                    with self._unless_unavailable(name):
                        value = MEASURES[name].estimate(batch)
                        outputs = value if isinstance(value, dict) else {name: value}
                        if name in outputs:  # hessian_top_eigs has no value of its own name
                            batch.values[name] = outputs[name]
                        logged.update({prefix + key: v.detach().float() for key, v in outputs.items()})
        for m in due:
            self.last_step[m] = step
        return logged

    @contextmanager
    def _unless_unavailable(self, name: str) -> Iterator[None]:
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HVPFallbackWarning)
                try:
                    yield
                except Unavailable as reason:
                    self._warn_once(name, f"SharpnessMonitor: {name} is skipped: {reason}")
                except NotThisStep:
                    pass
        finally:  # whatever the measure raised, its warnings go out: the fallback's once, the others as Python would
            for warning in caught:
                if issubclass(warning.category, HVPFallbackWarning):
                    self.hvp = "finite_difference"  # from now on, without trying double backward again
                    self._warn_once("hvp", f"SharpnessMonitor: {warning.message}")
                else:
                    warnings.warn_explicit(
                        warning.message,
                        warning.category,
                        warning.filename,
                        warning.lineno,
                        registry=self._warning_registry,  # once per place, as the default filter does
                    )

    @contextmanager
    def _measuring(
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
            return self._loss(pl_module, batch)

        try:
            with torch.inference_mode(False), torch.autocast(pl_module.device.type, enabled=False):
                yield loss_fn, params, generator
        finally:
            self.rng_state = generator.get_state()
            set_rng_state(rng)
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

    def _replayed_loss(self, pl_module: pl.LightningModule) -> Tensor:
        """The loss on the batch just trained on, in its mode and with its training step's random numbers."""
        now = rng_state(generators_of(pl_module))
        try:
            if self._batch_rng is not None:
                set_rng_state(self._batch_rng)  # dropout and augmentations: replay the step's random numbers
            with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
                return self._loss(pl_module, self._batch)
        finally:
            set_rng_state(now)

    def _log(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> None:
        if not values:
            return
        keys = sorted(values)
        stacked = torch.stack([values[k].to(trainer.strategy.root_device).float().reshape(()) for k in keys])
        # The mean over ranks of R estimates has the standard error sqrt(Σσ²)/R: reduce variances, not errors.
        stderr = torch.tensor([k.endswith("_stderr") for k in keys], device=stacked.device)
        reduced = self._reduce(trainer, torch.where(stderr, stacked.square(), stacked))
        reduced = torch.where(stderr, (reduced / trainer.world_size).sqrt(), reduced)
        residual = [i for i, k in enumerate(keys) if k.endswith("_residual")]
        if residual and trainer.world_size > 1:  # an error bound: the worst rank's
            reduced[residual] = trainer.strategy.reduce(stacked[residual], reduce_op="max")
        metrics = {f"sharpness/{k}": float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
        self.last_values.update(metrics)
        step = lightning_logging_step(trainer)
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


_SHARDED = (
    "the parameters are sharded (DTensors: FSDP2, tensor parallelism), and these estimators need gradients of the "
    "fixed batch's loss from torch.autograd (Hessian-vector products are a double backward) or whole parameters, "
    "which sharded modules do not give; first_order and grad_norm are measured."
)


def _top_level_blocks(pl_module: pl.LightningModule) -> list[tuple[str, list[Tensor]]]:
    """Each top-level submodule's trainable parameters (the blocks of ``per_module``)."""
    blocks: list[tuple[str, list[Tensor]]] = [
        (name, [p for p in child.parameters() if p.requires_grad]) for name, child in pl_module.named_children()
    ]
    return [(name, params) for name, params in blocks if params]


def _every_ranks(trainer: pl.Trainer, mine: Any) -> list[Any]:
    """Each rank's object, in rank order, on every rank (once per run: the fixed batches for the checkpoint)."""
    if trainer.world_size == 1:
        return [mine]
    return [trainer.strategy.broadcast(mine, src=rank) for rank in range(trainer.world_size)]
