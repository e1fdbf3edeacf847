"""`SAMMixin`: SAM's two forward/backward passes inside a LightningModule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import (
    LightningOptimizer,
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
)
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import Metric
from typing_extensions import override

from lightning_sam.optimizer import SAM

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SAMMixin"]


class SAMMixin:
    """Make a LightningModule train with SAM: put it first among the base classes.

    The module keeps its ``training_step`` (returning the loss, or a dict with
    ``"loss"``) and returns a [`SAM`][lightning_sam.SAM] optimizer from
    ``configure_optimizers`` (alone, in a list, or in a dict with ``lr_scheduler``).
    The mixin switches to manual optimization and runs, for every batch:

    1. ``training_step`` at ``w`` and its backward (on DDP without the all-reduce,
       unless ``sam_sync_ascent``);
    2. [`SAM.first_step`][lightning_sam.SAM.first_step]: save ``w``, move to ``w + e``;
    3. ``training_step`` again at ``w + e``, with the same random numbers (dropout
       masks), its ``self.log`` calls, torchmetrics updates and BatchNorm statistics
       discarded; backward with the all-reduce;
    4. the optimizer step through Lightning's precision plugin: with fp16, the
       GradScaler unscales once and skips the step on a non-finite gradient from
       either pass; SAM restores ``w`` bitwise and the base optimizer steps;
    5. the LR schedulers, with the Trainer's own semantics.

    Settings are class attributes; override them in the class body or assign them
    in ``__init__``. The Trainer's ``gradient_clip_val`` and
    ``accumulate_grad_batches`` do not apply to manual optimization: use
    ``sam_gradient_clip_val`` and ``sam_accumulate_grad_batches``.

    Attributes:
        sam_accumulate_grad_batches: Micro-batches per optimizer step. Each is
            perturbed with its own gradient; the perturbed gradients add up, and DDP
            all-reduces only on the last one.
        sam_gradient_clip_val: Clip the final (unscaled) gradient to this value
            through ``configure_gradient_clipping``; None or 0 disables clipping.
        sam_gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        sam_sync_ascent: On DDP, all-reduce the first gradient too, so that every
            rank uses the same perturbation. By default each rank perturbs with its
            own gradient (m-sharpness, as in Foret et al.), which also saves one
            all-reduce per step.
        sam_same_randomness: Replay the random state of the first pass in the
            second, so that both see the same dropout masks (like the original JAX
            code, which reuses its PRNG key).
        sam_nonfinite: Without a GradScaler (32-bit, bf16), what a non-finite loss
            or first gradient does: ``"skip"`` the step with a warning (weights and
            optimizer state untouched) or ``"raise"``. With fp16 the GradScaler
            skips such steps and lowers its scale, as Lightning does.
        sam_stats: After each batch: ``"loss"`` (at ``w``), ``"perturbed_loss"`` (at
            ``w + e``), ``"first_order_sharpness"`` (their difference) and
            ``"grad_norm"`` (the unscaled ``‖T g‖`` that set the perturbation), as
            detached tensors, for [`SharpnessMonitor`] and your own logging.

    Example:
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_sam import SAM, SAMMixin
        >>> class Regression(SAMMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         loss = torch.nn.functional.mse_loss(self.layer(x), y)
        ...         self.log("train_loss", loss)
        ...         return loss
        ...
        ...     def configure_optimizers(self):
        ...         return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> trainer.global_step
        4
    """

    sam_accumulate_grad_batches: int = 1
    sam_gradient_clip_val: float | None = None
    sam_gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    sam_sync_ascent: bool = False
    sam_same_randomness: bool = True
    sam_nonfinite: Literal["skip", "raise"] = "skip"
    sam_stats: dict[str, Tensor]
    _sam_scheduler_configs: list[LRSchedulerConfig]
    _sam_in_second_pass: bool = False
    _sam_finite: Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrap in _WRAPPERS.items():
            # The class's own hook, or one that a base listed before the mixin provides.
            method = getattr(cls, name)
            if not getattr(method, "_sam_wrapped", False):
                setattr(cls, name, wrap(method))

    @property
    def automatic_optimization(self) -> bool:
        """Always False: the mixin runs the optimization itself."""
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise MisconfigurationException(
                "SAMMixin runs manual optimization; do not set automatic_optimization = True. "
                "Remove SAMMixin from the module's bases to train without SAM."
            )

    @property
    def sam_second_pass(self) -> bool:
        """True while ``training_step`` runs at the perturbed weights ``w + e``."""
        return self._sam_in_second_pass

    def configure_callbacks(self) -> Any:
        """Check the SAM settings against the Trainer before Lightning's own checks run."""
        _check_settings(self, self._sam_module.trainer)
        return super().configure_callbacks()  # type: ignore[misc]

    @property
    def _sam_module(self) -> pl.LightningModule:
        return self  # type: ignore[return-value]

    def _sam_optimizer(self) -> tuple[LightningOptimizer, SAM]:
        optimizers = self._sam_module.optimizers()
        if isinstance(optimizers, list):
            if len(optimizers) != 1:
                raise MisconfigurationException(
                    f"SAMMixin drives exactly one optimizer, but configure_optimizers returned {len(optimizers)}. "
                    "Return a single SAM(...) optimizer (put several parameter groups in it if you need them)."
                )
            optimizers = optimizers[0]
        if not isinstance(optimizers.optimizer, SAM):
            raise MisconfigurationException(
                f"SAMMixin needs configure_optimizers to return a lightning_sam.SAM, got "
                f"{type(optimizers.optimizer).__name__}. Wrap the base optimizer class: "
                "SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)."
            )
        return optimizers, optimizers.optimizer

    def _sam_configure_optimizers(self, configure: Callable[[], Any]) -> Any:
        """Keep the scheduler settings that Lightning drops under manual optimization.

        Lightning reads ``monitor``/``strict`` and detects ``ReduceLROnPlateau`` only under
        automatic optimization (and warns that they are ignored otherwise). The mixin steps
        the schedulers itself, so it parses the output the automatic way and hands
        Lightning the output without those keys.
        """
        output = configure()
        _, schedulers, monitor = _configure_optimizers(output)
        self._sam_scheduler_configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        trainer = self._sam_module._trainer  # None when called outside a fit
        callbacks: list[Callback] = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]
        if trainer is not None and not any(isinstance(c, _PendingPlateauSchedulers) for c in callbacks):
            callbacks.insert(0, _PendingPlateauSchedulers())  # first, so LearningRateMonitor sees the new lr
        return _without_plateau_keys(output)

    def _sam_step(self, run_step: Callable[[], Any]) -> Any:
        """One batch of SAM: both passes, then (every ``sam_accumulate_grad_batches``) the step."""
        module = self._sam_module
        trainer = module.trainer
        loop = trainer.fit_loop.epoch_loop
        opt, sam = self._sam_optimizer()
        scaler: torch.amp.GradScaler | None = getattr(trainer.precision_plugin, "scaler", None)
        k = self.sam_accumulate_grad_batches
        batch_idx = loop.batch_idx
        first_micro_batch = batch_idx % k == 0
        last_micro_batch = (batch_idx + 1) % k == 0 or loop._num_ready_batches_reached()

        if first_micro_batch:
            sam.zero_grad()
            self._sam_finite = torch.ones((), dtype=torch.bool, device=module.device)
        params = [p for group in sam.param_groups for p in group["params"]]
        accumulated = [p.grad for p in params]  # the perturbed gradients so far wait aside during pass 1
        for p in params:
            p.grad = None

        rng_before = _collect_rng_states() if self.sam_same_randomness else None
        with _unless(self.sam_sync_ascent, _no_backward_sync(trainer)):
            output = run_step()
            loss = _loss_of(output)
            module.manual_backward(loss / k)
        grad_norm = sam.first_step(zero_grad=True)
        try:
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            for p, g in zip(params, accumulated, strict=True):
                p.grad = g

            rng_after = _collect_rng_states() if rng_before is not None else None
            if rng_before is not None:
                _set_rng_states(rng_before)
            with self._sam_second_pass_flag(), observing(module), _unless(last_micro_batch, _no_backward_sync(trainer)):
                perturbed_loss = _loss_of(run_step())
                backward_loss = perturbed_loss / k
                if scaler is not None:  # a non-finite first pass makes the scaler skip this step too
                    backward_loss = backward_loss * torch.where(finite, 1.0, math.nan)
                module.manual_backward(backward_loss)
            if rng_after is not None:
                _set_rng_states(rng_after)

            finite &= torch.isfinite(perturbed_loss.detach())
            self._sam_finite &= finite
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            self.sam_stats = {
                "loss": loss.detach(),
                "perturbed_loss": perturbed_loss.detach(),
                "first_order_sharpness": (perturbed_loss - loss).detach(),
                "grad_norm": grad_norm * k / scale,  # of the loss itself, not of loss / k
            }
            if not last_micro_batch:
                return output  # the weights go back to w below; the gradients keep accumulating
            if scaler is None and not trainer.strategy.reduce_boolean_decision(bool(self._sam_finite), all=True):
                sam.zero_grad()
                message = (
                    f"SAMMixin: a non-finite loss or gradient at global step {trainer.global_step}; the step was "
                    "skipped and the weights and optimizer state are unchanged."
                )
                if self.sam_nonfinite == "raise":
                    raise FloatingPointError(message + " (sam_nonfinite='raise')")
                rank_zero_warn(message + " Set sam_nonfinite='raise' to stop instead.", category=RuntimeWarning)
                return output

            with self._sam_clipping(sam):
                opt.step()  # precision plugin: unscale (fp16), hooks, SAM.step() -> restore w, base step
            self._sam_step_schedulers(batch_idx)
            return output
        finally:
            # Back to w unless SAM.step() already did: after an accumulating micro-batch, a skipped step (the
            # GradScaler's or ours), or an error anywhere above. The weights are never left at w + e.
            sam.restore()

    @contextmanager
    def _sam_second_pass_flag(self) -> Iterator[None]:
        self._sam_in_second_pass = True
        try:
            yield
        finally:
            self._sam_in_second_pass = False

    @contextmanager
    def _sam_clipping(self, sam: SAM) -> Iterator[None]:
        """Clip the final gradient right before the base optimizer steps (after unscaling)."""
        clip_val = self.sam_gradient_clip_val
        if not clip_val:
            yield
            return
        module = self._sam_module

        def clip(*_: Any) -> None:
            module.configure_gradient_clipping(sam, clip_val, self.sam_gradient_clip_algorithm)

        handle = sam.base_optimizer.register_step_pre_hook(clip)
        try:
            yield
        finally:
            handle.remove()

    def _sam_step_schedulers(self, batch_idx: int) -> None:
        """After an optimizer step: the Trainer's non-plateau 'step' and (last batch) 'epoch' schedulers."""
        self._sam_update_schedulers("step", plateau=False, index=batch_idx + 1)
        if self._sam_module.trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            self._sam_update_schedulers("epoch", plateau=False, index=self._sam_module.current_epoch + 1)

    def _sam_step_pending_plateau_schedulers(self, batch_idx: int) -> None:
        """ReduceLROnPlateau waits for metrics logged after the batch (validation): step it at the next batch.

        Lightning steps 'step' plateau schedulers after each batch's validation and 'epoch'
        ones after the epoch, from loop code that manual optimization skips. Both only
        matter from the next optimizer step on, so they are stepped at the start of the
        next batch (before other callbacks' ``on_train_batch_start``), with the metrics of
        that moment. This also holds across a resume: checkpoints are saved before those
        updates, in Lightning too.
        """
        trainer = self._sam_module.trainer
        if batch_idx > 0:
            if batch_idx % self.sam_accumulate_grad_batches == 0:  # the previous batch made an optimizer step
                self._sam_update_schedulers("step", plateau=True, index=batch_idx)
        elif self._sam_module.current_epoch > 0:
            self._sam_update_schedulers("step", plateau=True, index=int(trainer.num_training_batches))
            self._sam_update_schedulers("epoch", plateau=True, index=self._sam_module.current_epoch)

    def _sam_update_schedulers(self, interval: str, plateau: bool, index: int) -> None:
        """Lightning's ``_update_learning_rates``, which manual optimization skips."""
        module = self._sam_module
        trainer = module.trainer
        progress = trainer.fit_loop.epoch_loop.scheduler_progress
        for config in getattr(self, "_sam_scheduler_configs", trainer.lr_scheduler_configs):
            if config.interval != interval or config.reduce_on_plateau != plateau or index % config.frequency:
                continue
            monitor_val = None
            if plateau:
                monitor_val = trainer.callback_metrics.get(str(config.monitor))
                if monitor_val is None:
                    message = (
                        f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available. "
                        f"Available metrics are: {list(trainer.callback_metrics)}."
                    )
                    if config.strict:
                        raise MisconfigurationException(message + " Log it, or set `strict: False`.")
                    rank_zero_warn(message + " Skipping learning rate update.", category=RuntimeWarning)
                    continue
            progress.increment_ready()
            module.lr_scheduler_step(config.scheduler, monitor_val)
            progress.increment_completed()


class _PendingPlateauSchedulers(Callback):
    """Put first among the Trainer's callbacks by the mixin: the plateau schedulers' late step."""

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(pl_module, SAMMixin):
            pl_module._sam_step_pending_plateau_schedulers(batch_idx)


def _outermost(around: Callable[[Any, Callable[[], Any]], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a hook so that ``around(self, call)`` runs once, however deep ``super()`` calls nest."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        flag = f"_sam_inside_{method.__name__}"

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            call = functools.partial(method, self, *args, **kwargs)
            if self.__dict__.get(flag):  # a subclass's hook calling super()
                return call()
            self.__dict__[flag] = True
            try:
                return around(self, call)
            finally:
                self.__dict__[flag] = False

        wrapper._sam_wrapped = True  # type: ignore[attr-defined]
        return wrapper

    return wrap


_WRAPPERS = {
    "training_step": _outermost(lambda self, call: self._sam_step(call)),
    "configure_optimizers": _outermost(lambda self, call: self._sam_configure_optimizers(call)),
}


def _inherited(name: str) -> Callable[..., Any]:
    """``class SAMNet(SAMMixin, Net)``: the hook of the class after the mixin (``Net``)."""

    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(SAMMixin, self), name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    return hook


for _name, _wrap in _WRAPPERS.items():
    setattr(SAMMixin, _name, _wrap(_inherited(_name)))


def _without_plateau_keys(conf: Any) -> Any:
    """``configure_optimizers`` output without the keys Lightning ignores (and warns about) when manual."""
    if isinstance(conf, list | tuple):
        return type(conf)(_without_plateau_keys(c) for c in conf)
    if isinstance(conf, dict):
        conf = {k: v for k, v in conf.items() if k not in _PLATEAU_KEYS}
        if isinstance(conf.get("lr_scheduler"), dict):
            conf["lr_scheduler"] = _without_plateau_keys(conf["lr_scheduler"])
    return conf


_PLATEAU_KEYS = ("monitor", "strict", "reduce_on_plateau")


def _check_settings(module: SAMMixin, trainer: pl.Trainer) -> None:
    k = module.sam_accumulate_grad_batches
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MisconfigurationException(f"sam_accumulate_grad_batches must be an integer >= 1, got {k!r}.")
    clip = module.sam_gradient_clip_val
    if clip is not None and not (isinstance(clip, int | float) and math.isfinite(clip) and clip >= 0):
        raise MisconfigurationException(f"sam_gradient_clip_val must be None or a number >= 0, got {clip!r}.")
    if module.sam_gradient_clip_algorithm not in ("norm", "value"):
        raise MisconfigurationException(
            f"sam_gradient_clip_algorithm must be 'norm' or 'value', got {module.sam_gradient_clip_algorithm!r}."
        )
    if module.sam_nonfinite not in ("skip", "raise"):
        raise MisconfigurationException(f"sam_nonfinite must be 'skip' or 'raise', got {module.sam_nonfinite!r}.")
    if trainer.gradient_clip_val:
        raise MisconfigurationException(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) does not apply to SAMMixin modules, which run "
            "manual optimization. Remove it from the Trainer and set `sam_gradient_clip_val` (and "
            "`sam_gradient_clip_algorithm`) on the module instead."
        )
    if trainer.accumulate_grad_batches != 1:
        raise MisconfigurationException(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not apply to SAMMixin modules, "
            "which run manual optimization. Remove it from the Trainer and set `sam_accumulate_grad_batches` on the "
            "module instead."
        )


def loss_in(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, or ``"loss"`` of a dict), else None."""
    loss = output.get("loss") if isinstance(output, dict) else output
    return loss if isinstance(loss, Tensor) else None


def _loss_of(output: Any) -> Tensor:
    loss = loss_in(output)
    if loss is None or not loss.requires_grad:
        raise MisconfigurationException(
            "With SAMMixin, training_step must return the loss (a tensor that requires grad, or a dict with "
            f"'loss'), got {type(output).__name__}. SAM needs it for both of its backward passes."
        )
    return loss


def _no_backward_sync(trainer: pl.Trainer) -> AbstractContextManager[Any]:
    strategy = trainer.strategy
    return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()


def _unless(condition: bool, context: AbstractContextManager[Any]) -> AbstractContextManager[Any]:
    return nullcontext() if condition else context


@contextmanager
def observing(module: pl.LightningModule) -> Iterator[None]:
    """Run ``training_step`` for its loss alone: no side effect survives the block.

    ``self.log``/``self.log_dict`` do nothing, every torchmetrics ``Metric`` and every
    BatchNorm's running statistics are put back as they were, and a SAMMixin module's
    ``training_step`` runs as written (not as a whole SAM step). The random state is the
    caller's business.
    """
    metrics = [(m, _metric_snapshot(m)) for m in module.modules() if isinstance(m, Metric)]
    buffers = _batchnorm_buffers(module)
    saved_buffers = [b.clone() for b in buffers]
    patched = {"log": _ignore, "log_dict": _ignore, "_sam_inside_training_step": True}
    previous = {name: module.__dict__[name] for name in patched if name in module.__dict__}
    module.__dict__.update(patched)
    try:
        yield
    finally:
        for name in patched:
            del module.__dict__[name]
        module.__dict__.update(previous)
        for metric, snapshot in metrics:
            metric.__dict__.update(snapshot)
        with torch.no_grad():
            for buffer, saved in zip(buffers, saved_buffers, strict=True):
                buffer.copy_(saved)


def _batchnorm_buffers(module: torch.nn.Module) -> list[Tensor]:
    """Running statistics that a forward pass in training mode updates."""
    return [
        buffer
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]


def _metric_snapshot(metric: Metric) -> dict[str, Any]:
    """What ``update``/``forward`` change: the states (copied) and the bookkeeping."""
    snapshot: dict[str, Any] = {
        name: value.clone() if isinstance(value, Tensor) else list(value) for name, value in metric.metric_state.items()
    }
    for name in ("_update_count", "_computed", "_forward_cache"):
        snapshot[name] = metric.__dict__.get(name)
    return snapshot


def _ignore(*_: Any, **__: Any) -> None:
    """Stands in for ``self.log`` and ``self.log_dict`` during the second pass."""
