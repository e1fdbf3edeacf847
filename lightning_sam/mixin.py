"""`SAMMixin`: SAM inside Lightning's own automatic optimization, every Trainer feature as without SAM."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.overrides.distributed import prepare_for_backward
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_sam._compat import attached_trainer, lightning_steps_after_this_batch, optimizers_in
from lightning_sam._observe import loss_in, observing
from lightning_sam._restore import generators_of
from lightning_sam.optimizer import SAM
from lightning_sam.step import SAMStep

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SAMMixin"]

_REPLACED_SETTINGS = {
    "sam_accumulate_grad_batches": "Trainer(accumulate_grad_batches=...)",
    "sam_gradient_clip_val": "Trainer(gradient_clip_val=...)",
    "sam_gradient_clip_algorithm": "Trainer(gradient_clip_algorithm=...)",
}


_HOOKS = ("training_step", "on_before_zero_grad", "backward", "configure_optimizers", "configure_callbacks")


class SAMMixin:
    """Make a LightningModule train with SAM: put it first among the base classes.

    The module keeps its ``training_step`` (returning the loss, or a dict with
    ``"loss"``) and returns a [`SAM`][lightning_sam.SAM] optimizer from
    ``configure_optimizers`` (alone, in a list, or in a dict with ``lr_scheduler``).
    Nothing else changes: the module stays under Lightning's automatic optimization,
    so every Trainer flag, callback and hook does what it does without SAM
    (accumulation, clipping, schedulers, ``lr_find``, SWA, precision, DDP, resume; the
    "Trainer features with SAM" page has the table). SAM's work happens inside the
    hooks Lightning already calls, for every batch:

    1. ``training_step`` at ``w``, as Lightning runs it (its logs, metrics, BatchNorm
       statistics and output are the batch's);
    2. inside ``backward``: its loss is back-propagated on its own (on DDP without the
       all-reduce, unless ``sam_sync_ascent``), [`SAM.first_step`][lightning_sam.SAM.first_step]
       moves to ``w + e``, ``training_step`` runs again at ``w + e`` with the same random
       numbers and its ``self.log`` calls, torchmetrics updates and BatchNorm statistics
       discarded, its loss is back-propagated (all-reduced, scaled and divided by the
       accumulation steps as Lightning does it), and the weights go back to ``w``
       bitwise;
    3. Lightning's optimizer step, with the gradient from ``w + e``: unscaling,
       ``on_before_optimizer_step``, clipping, then ``SAM.step()`` steps the base
       optimizer, or skips a non-finite step (weights and optimizer state unchanged; a
       GradScaler backs off as usual).

    Settings are class attributes; override them in the class body or assign them in
    ``__init__``.

    Attributes:
        sam_sync_ascent: On DDP, ``True`` all-reduces the first gradient too, so that
            every rank uses the same perturbation; by default (``None``) each rank perturbs
            with its own gradient (m-sharpness, as in Foret et al.), which also saves one
            all-reduce per step. Under sharding (FSDP2, tensor parallelism through
            ``ModelParallelStrategy``) the ascent is always global: a per-device ascent
            would need unsharded gradients, and ``False`` gets a warning that says so.
        sam_same_randomness: Replay the random state of the first pass in the second
            (torch's, Python's ``random``, numpy's global one and every ``torch.Generator``
            attribute of the module or its submodules), so that both see the same dropout
            masks and augmentations, like the original JAX code, which reuses its PRNG key;
            each stream advances once per batch, as without SAM.
        sam_nonfinite: Without a GradScaler (32-bit, bf16), what a non-finite gradient
            does: ``"skip"`` the step with a warning (weights and optimizer state
            untouched) or ``"raise"`` ``FloatingPointError``. With fp16 the GradScaler
            skips such steps and lowers its scale, as Lightning does.
        sam_stats: After each batch: ``"loss"`` (at ``w``), ``"perturbed_loss"`` (at
            ``w + e``), ``"first_order_sharpness"`` (their difference) and
            ``"grad_norm"`` (the unscaled ``‖T g‖`` of the batch's loss that set the
            perturbation), as detached tensors, for
            [`SharpnessMonitor`][lightning_sam.SharpnessMonitor] and your own logging; a
            one-pass step has ``"loss"`` alone. Every batch also has ``"sam_fraction"``: the
            fraction of the optimizer steps taken so far that were SAM steps
            ([`SAM.sam_fraction`][lightning_sam.SAM.sam_fraction], a float32 tensor on the loss's device).

    Examples:
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
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> trainer.global_step
        2
    """

    # TorchScript compiles every property it is not told to leave alone (to_torchscript)
    __jit_unused_properties__: ClassVar[list[str]] = [
        *LightningModule.__jit_unused_properties__,
        "sam_second_pass",
        "_sam_module",
    ]
    __jit_ignored_attributes__: ClassVar[list[str]] = [
        "sam_stats",
        "_sam_driver",
        "_sam_in_second_pass",
        *(f"_sam_inside_{hook}" for hook in _HOOKS),
    ]
    sam_sync_ascent: bool | None = None
    sam_same_randomness: bool = True
    sam_nonfinite: Literal["skip", "raise"] = "skip"
    sam_stats: dict[str, Tensor]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrap in _WRAPPERS.items():
            # The class's own hook, or one that a base listed before the mixin provides.
            method = getattr(cls, name)
            if not getattr(method, "_sam_wrapped", False):
                setattr(cls, name, wrap(method))

    @property
    def sam_second_pass(self) -> bool:
        """True while ``training_step`` runs at the perturbed weights ``w + e``."""
        return bool(self.__dict__.get("_sam_in_second_pass"))

    @property
    def _sam_module(self) -> pl.LightningModule:
        return self  # type: ignore[return-value]

    def _sam_configure_callbacks(self, configure: Callable[[], Any]) -> Any:
        """At the very start of ``fit``, before any process group or device is set up: check, and take over."""
        _take_over(self, self._sam_module)
        return configure()

    def _sam_configure_optimizers(self, configure: Callable[[], Any]) -> Any:
        """Check what ``configure_optimizers`` returned and, in a fit, put its SAM under a `_LightningSAM`."""
        module = self._sam_module
        _take_over(self, module)  # again: configure_callbacks may be one set on the instance
        output = configure()
        trainer = attached_trainer(module)  # None when called outside a fit
        if trainer is None or output is None:  # None: Lightning fits without an optimizer (and says so); so do we
            return output
        optimizers = optimizers_in(output)
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"SAMMixin drives exactly one optimizer, but configure_optimizers returned {len(optimizers)}. "
                "Return a single SAM(...) optimizer (put several parameter groups in it if you need them)."
            )
        if not isinstance(optimizers[0], SAM):
            cli = "configure_optimizers" in module.__dict__  # LightningCLI's --optimizer, or another hook set there
            raise MisconfigurationException(
                f"SAMMixin needs configure_optimizers to return a lightning_sam.SAM, got "
                f"{type(optimizers[0]).__name__}. "
                + (
                    "It came from LightningCLI's --optimizer (or another configure_optimizers set on the "
                    "instance): wrap it in SAM there, e.g. --optimizer=lightning_sam.SAM "
                    "--optimizer.base_optimizer=torch.optim.SGD --optimizer.base_optimizer.lr=0.1 --optimizer.rho=0.05 "
                    "(YAML: optimizer: {class_path: lightning_sam.SAM, init_args: {rho: 0.05, base_optimizer: "
                    "{class_path: torch.optim.SGD, init_args: {lr: 0.1}}}}), or drop --optimizer and return SAM "
                    "from the module's own configure_optimizers."
                    if cli
                    else "Wrap the base optimizer class: SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, "
                    "momentum=0.9)."
                )
            )
        optimizer = optimizers[0]
        driver = _LightningSAM(module, self, optimizer)
        if driver.step.global_ascent and self.sam_sync_ascent is False:
            why = "the parameters are sharded" if driver.step.sharded else f"{type(optimizer).__name__} keeps it"
            rank_zero_warn(
                "SAMMixin: sam_sync_ascent = False asks for a per-device ascent, which needs each rank's own "
                f"gradient; {why}, so the ascent uses the global gradient (as sam_sync_ascent = True). Remove the "
                "setting to silence this warning."
            )
        module.__dict__["_sam_driver"] = driver
        return output


class _LightningSAM:
    """Maps one fit's Lightning hooks onto a [`SAMStep`][lightning_sam.SAMStep]."""

    def __init__(self, module: pl.LightningModule, settings: SAMMixin, optimizer: SAM) -> None:
        self.module, self.settings = module, settings
        trainer = module.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.step = SAMStep(
            optimizer,
            module,
            ascent_backward=Tensor.backward if settings.sam_sync_ascent else None,  # SAMStep knows when it must
            scaler=self.scaler,
            same_randomness=settings.sam_same_randomness,
            nonfinite=settings.sam_nonfinite,
        )
        self.iterates = is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True)
        # MSAM's ascent needs no gradient: its first forward never prepares a backward
        self.sync_ascent = (
            bool(settings.sam_sync_ascent) or self.step.global_ascent
        ) and not optimizer.policy.pre_forward
        self.pending: tuple[tuple[Any, ...], dict[str, Any], Tensor] | None = None
        # a schedule over the training without its length (late-phase SAM, AE-SAM's threshold, RST's probability):
        self.needs_length = optimizer.policy.length_needed(optimizer)  # the fit it was planned for, when it was
        self.length_of: tuple[Any, ...] | None = () if self.needs_length and not optimizer.total_steps else None
        self.paused_sync: DistributedDataParallel | None = None
        self.generators_of_epoch = -1  # the epoch whose first batch looked for the module's generators

    def first_pass(self, training_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Lightning's ``training_step`` call: the pass at ``w``, remembered for the second pass."""
        self._resume_sync()  # in case the last batch had no backward (SWA's BatchNorm epoch)
        self.pending = None
        if self.length_of is not None:  # late-phase SAM: its length, now that the data is set up (and restored)
            trainer = self.module.trainer
            fit = (trainer.max_steps, trainer.max_epochs, trainer.num_training_batches)
            if fit != self.length_of:  # the first batch, or a tuner's trial (BatchSizeFinder) came before
                self.step.optimizer.total_steps, self.length_of = planned_steps(trainer, self.needs_length), fit
        if self.generators_of_epoch != (epoch := self.module.trainer.current_epoch):  # one made in on_train_start,
            self.step.generators, self.generators_of_epoch = generators_of(self.module), epoch  # or each epoch
        self.step.begin()
        # AE-SAM decides after the backward: the first pass is always ready for a second one (a step left open by a
        # skipped window may still answer here; window_starts opens the fresh one, the backward decides)
        if not (self.step.ascending or self.step.optimizer.policy.decides_after_first_pass):
            output = training_step(*args, **kwargs)
            if (loss := loss_in(output)) is not None:
                self.settings.sam_stats = self._stats(loss=loss.detach())
            return output
        recorder = _Recorder(args[0]) if self.iterates else None
        if recorder is not None:
            args = (recorder, *args[1:])
        ddp = self._ddp()
        if ddp is not None and not self.sync_ascent and ddp.require_backward_grad_sync:
            ddp.require_backward_grad_sync = False  # DDP's forward must not prepare the first backward's all-reduce
            self.paused_sync = ddp
        try:
            output = training_step(*args, **kwargs)
        except BaseException:
            self._resume_sync()
            raise
        loss = loss_in(output)
        if loss is not None:
            second_args = (recorder.replay(), *args[1:]) if recorder is not None else args
            self.pending = (second_args, kwargs, loss.detach())
        return output

    def backward(self, backward: Callable[[Tensor], Any], loss: Tensor) -> None:
        """Lightning's ``backward`` call: the ascent, the pass at ``w + e`` and its backward, back to ``w``."""
        if self.pending is None:  # one pass (a step without ascent), or a backward we did not see coming
            self._resume_sync()
            backward(loss)
            self.step.end_one_pass()
            self._finalize()
            return
        args, kwargs, raw_loss = self.pending
        self.pending = None
        trainer = self.module.trainer
        ddp = self._ddp()
        try:  # from the move to w + e until the weights are back: any exception puts them back before it leaves
            try:
                if ddp is not None and self.sync_ascent and not ddp.require_backward_grad_sync:
                    with _sync_enabled(ddp, loss):  # inside an accumulation window Lightning paused the all-reduce
                        norm = self.step.ascend(loss, scaled=True)
                else:
                    norm = self.step.ascend(loss, scaled=True)  # the precision plugin scaled it
            finally:
                self._resume_sync()
            if not self.step.ascending:  # the first pass decided against the ascent (AE-SAM): the batch's only one
                self._finalize()
                self.settings.sam_stats = self._stats(loss=raw_loss)
                return
            with self._second_pass(), observing(self.module, batchnorm=False):
                forward = lambda: _loss_of(trainer.strategy.training_step(*args, **kwargs))  # noqa: E731
                perturbed = self.step.second_forward(forward)
            self.step.second_backward(perturbed / trainer.accumulate_grad_batches, backward)  # SAMStep scales it
        except BaseException:
            self.step.abandon()
            raise
        self._finalize()
        self.settings.sam_stats = self._stats(loss=raw_loss, perturbed_loss=perturbed.detach())
        if not self.step.optimizer.policy.pre_forward:  # MSAM's move is not SAM's ascent: no first-order sharpness
            scale = self.step.grad_scale()
            unscale = trainer.accumulate_grad_batches / (scale if scale is not None else 1.0)
            self.settings.sam_stats["first_order_sharpness"] = perturbed.detach() - raw_loss
            self.settings.sam_stats["grad_norm"] = norm * unscale

    def _stats(self, **values: Tensor) -> dict[str, Tensor]:
        """The batch's numbers, and the fraction of the steps taken so far that were SAM steps."""
        device = next(iter(values.values())).device if values else None  # where Lightning logs it (sync_dist)
        return {**values, "sam_fraction": torch.full((), self.step.optimizer.sam_fraction, device=device)}

    def _finalize(self) -> None:
        """After the window's last backward: the variant's direction, for the hooks and the clipping that follow."""
        if lightning_steps_after_this_batch(self.module.trainer):
            self.step.optimizer.finalize_gradient(self.step.grad_scale())

    def window_starts(self) -> None:
        """Lightning's ``on_before_zero_grad``: an optimizer step begins (its first batch's first pass has run).

        A step still open from an earlier window never reached SAM's ``step()`` (the GradScaler
        skipped it, or its last batch had no backward): it is dropped here, with all it kept.
        Lightning zeroes the gradients after the first pass, so the gradients alone cannot tell.
        """
        protocol = self.step.optimizer.protocol
        if protocol.ctx is not None and protocol.ctx.micro_batches > 0:
            protocol.begin(grad_scale=self.step.grad_scale(), nonfinite=self.step.nonfinite)

    def _ddp(self) -> DistributedDataParallel | None:
        model = self.module.trainer.strategy.model
        return model if isinstance(model, DistributedDataParallel) else None

    def _resume_sync(self) -> None:
        if self.paused_sync is not None:
            self.paused_sync.require_backward_grad_sync = True
            self.paused_sync = None

    @contextmanager
    def _second_pass(self) -> Iterator[None]:
        self.module.__dict__["_sam_in_second_pass"] = True
        try:
            yield
        finally:
            self.module.__dict__["_sam_in_second_pass"] = False


@contextmanager
def _sync_enabled(ddp: DistributedDataParallel, loss: Tensor) -> Iterator[None]:
    """The next backward of ``loss`` all-reduces, though Lightning's ``no_sync`` is in force."""
    ddp.require_backward_grad_sync = True
    try:
        prepare_for_backward(ddp, loss)
        yield
    finally:
        ddp.require_backward_grad_sync = False


class _Recorder:
    """``training_step(self, dataloader_iter)``: what the first pass draws, the second pass gets again."""

    def __init__(self, iterator: Any) -> None:
        self._iterator = iterator
        self._drawn: list[Any] = []

    def __iter__(self) -> _Recorder:
        return self

    def __next__(self) -> Any:
        item = next(self._iterator)
        self._drawn.append(item)
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)

    def replay(self) -> Iterator[Any]:
        return iter(list(self._drawn))


def _outermost(
    hook: str, around: Callable[[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a hook so that ``around(self, method, args, kwargs)`` runs once, however deep ``super()`` calls nest.

    The re-entry guard is named after the hook, never after the function that implements it
    (``training_step = _step``, a decorator, a ``partialmethod``).
    """
    flag = f"_sam_inside_{hook}"

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.__dict__.get(flag):  # a subclass's hook calling super()
                return method(self, *args, **kwargs)
            self.__dict__[flag] = True
            try:
                return around(self, functools.partial(method, self), args, kwargs)
            finally:
                self.__dict__[flag] = False

        wrapper._sam_wrapped = True  # type: ignore[attr-defined]
        return wrapper

    return wrap


def _driver(module: Any) -> _LightningSAM | None:
    """This fit's driver, or None in a fit without an optimizer; during training only.

    Raises:
        MisconfigurationException: The fit has a SAM that the mixin never saw configured.
    """
    driver: _LightningSAM | None = module.__dict__.get("_sam_driver")
    optimizers = module.trainer.optimizers
    if driver is not None and optimizers and driver.step.optimizer is optimizers[0]:
        return driver
    if optimizers and isinstance(optimizers[0], SAM):
        raise MisconfigurationException(
            "SAMMixin never saw this fit's configure_optimizers: configure_callbacks and configure_optimizers are "
            "both set on the instance, so neither runs through the mixin. Define one of them in the class."
        )
    return None


def _around_training_step(
    self: Any, training_step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    driver = _driver(self) if self.trainer.training else None
    if driver is None:
        return training_step(*args, **kwargs)
    return driver.first_pass(training_step, args, kwargs)


def _around_backward(self: Any, backward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    driver = _driver(self)
    if driver is None:
        return backward(*args, **kwargs)
    loss, *rest = args
    return driver.backward(lambda tensor: backward(tensor, *rest, **kwargs), loss)


def _around_zero_grad(self: Any, hook: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    driver = _driver(self) if self.trainer.training else None
    if driver is not None:
        driver.window_starts()
    return hook(*args, **kwargs)


_AROUND: dict[str, Callable[[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]] = {
    "training_step": _around_training_step,
    "on_before_zero_grad": _around_zero_grad,
    "backward": _around_backward,
    "configure_optimizers": lambda self, configure, args, kwargs: self._sam_configure_optimizers(configure),
    "configure_callbacks": lambda self, configure, args, kwargs: self._sam_configure_callbacks(configure),
}
_WRAPPERS = {name: _outermost(name, around) for name, around in _AROUND.items()}


class _InstanceHook:
    """A hook assigned on the instance (``module.training_step = f``), run through the mixin as a method is.

    It holds its module and the hook (no closure), so it pickles and deep-copies with the
    module, and Lightning's introspection (signature, ``is_overridden``) sees through it to
    what it would see of the hook itself (``__wrapped__``).
    """

    def __init__(self, module: Any, name: str, hook: Callable[..., Any]) -> None:
        self.module, self.name, self.hook = module, name, hook
        self.__wrapped__ = getattr(hook, "__wrapped__", hook)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _INSTANCE_WRAPPERS[self.name](self.module, *args, **kwargs)


def _instance_hook(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__[name].hook(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


_INSTANCE_WRAPPERS = {name: _outermost(name, around)(_instance_hook(name)) for name, around in _AROUND.items()}


def _take_over(settings: SAMMixin, module: Any) -> None:
    """At the start of a fit: refuse what SAM cannot do, forget the last fit, drive the instance's hooks."""
    trainer = attached_trainer(module)
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return
    _check_settings(settings, module)
    _check_strategy(trainer.strategy)
    module.__dict__.pop("_sam_driver", None)
    for name in _AROUND:
        hook = module.__dict__.get(name)
        if callable(hook) and not isinstance(hook, _InstanceHook):
            module.__dict__[name] = _InstanceHook(module, name, hook)


def _inherited(name: str) -> Callable[..., Any]:
    """``class SAMNet(SAMMixin, Net)``: the hook of the class after the mixin (``Net``)."""

    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(SAMMixin, self), name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    return hook


for _name, _wrap in _WRAPPERS.items():
    setattr(SAMMixin, _name, _wrap(_inherited(_name)))


def planned_steps(trainer: pl.Trainer, needed_by: str | None = None) -> int:
    """The fit's length in optimizer steps as Lightning will run it (for a fractional ``start``, AE-SAM, RST).

    Every epoch's batches over that epoch's accumulation (``GradientAccumulationScheduler``
    changes it), bounded by ``max_steps``; every epoch is taken to be as long as the
    current one (with ``reload_dataloaders_every_n_epochs`` and loaders of changing length,
    pass ``total_steps``). The mixin reads it at the first batch, when the data is set up,
    never before (reading it earlier makes Lightning set up the data before a mid-epoch
    resume restores it), and again when the fit's shape changes (a tuner's trial runs
    first: ``BatchSizeFinder``, ``LearningRateFinder``).

    Args:
        trainer: The fit's Trainer.
        needed_by: What needs the length, as the error names it (a policy's ``length_needed``).

    Raises:
        MisconfigurationException: The length is not known (iterable data without a length,
            ``max_time`` without ``max_epochs``): it asks for ``total_steps`` (or a step number).
    """
    max_steps, max_epochs, batches = trainer.max_steps, trainer.max_epochs, trainer.num_training_batches
    if max_epochs in (None, -1) or batches == float("inf"):
        if max_steps != -1:
            return int(max_steps)
        why = "its data has no length" if batches == float("inf") else "it stops on max_time (or never)"
        what = needed_by or "SAM(start=<fraction>)"
        instead = ", an integer start (a step number)," if what.startswith("SAM(start") else ""
        raise MisconfigurationException(
            f"{what} needs the training's length, and this fit cannot know it: {why}. Pass "
            f"total_steps=<optimizer steps> to the optimizer{instead} or Trainer(max_steps=...)."
        )
    callbacks = getattr(trainer, "callbacks", [])  # set by the Trainer, not declared on it
    schedule = next((cb for cb in callbacks if isinstance(cb, GradientAccumulationScheduler)), None)
    total = 0
    for epoch in range(max(int(max_epochs), 1)):
        accumulate = schedule.get_accumulate_grad_batches(epoch) if schedule else trainer.accumulate_grad_batches
        total += math.ceil(batches / accumulate)
    return min(total, int(max_steps)) if max_steps != -1 else total


def _check_settings(settings: SAMMixin, module: pl.LightningModule) -> None:
    if not module.automatic_optimization:
        raise MisconfigurationException(
            "SAMMixin runs SAM inside Lightning's automatic optimization, but this module sets "
            "automatic_optimization = False. For a hand-written training_step, drop SAMMixin and drive the optimizer "
            "with lightning_sam.SAMStep(opt, self, backward=self.manual_backward) inside it."
        )
    for name, replacement in _REPLACED_SETTINGS.items():
        if hasattr(settings, name):
            raise MisconfigurationException(
                f"`{name}` is gone: SAMMixin modules use {replacement} like any other module. Remove `{name}` from the "
                "module and set the Trainer flag instead."
            )
    if settings.sam_sync_ascent not in (None, True, False):
        raise MisconfigurationException(
            f"sam_sync_ascent must be None, True or False, got {settings.sam_sync_ascent!r}."
        )
    if not isinstance(settings.sam_same_randomness, bool):
        raise MisconfigurationException(
            f"sam_same_randomness must be True or False, got {settings.sam_same_randomness!r}."
        )
    if settings.sam_nonfinite not in ("skip", "raise"):
        raise MisconfigurationException(f"sam_nonfinite must be 'skip' or 'raise', got {settings.sam_nonfinite!r}.")


def _check_strategy(strategy: Strategy) -> None:
    """Strategies whose gradients SAM cannot see or steer, refused with what to use instead."""
    if isinstance(strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            "SAMMixin does not support DeepSpeedStrategy: ZeRO keeps the gradients in its own buffers, where SAM "
            "cannot read them for the ascent. Use strategy='ddp', or ModelParallelStrategy with FSDP2 "
            "(fully_shard in configure_model) to shard the model."
        )
    if isinstance(strategy, FSDPStrategy):
        raise MisconfigurationException(
            "SAMMixin does not support FSDPStrategy (FSDP1): its flat parameters hide each rank's gradient shard "
            "from SAM's global norm. Use ModelParallelStrategy with FSDP2: call "
            "torch.distributed.fsdp.fully_shard on your layers in configure_model, and "
            "Trainer(strategy=ModelParallelStrategy()). SAM is exact there."
        )


def _loss_of(output: Any) -> Tensor:
    loss = loss_in(output)
    if loss is None or not loss.requires_grad:
        raise MisconfigurationException(
            "With SAMMixin, training_step must return the loss (a tensor that requires grad, or a dict with "
            f"'loss'), got {type(output).__name__} in the second pass. SAM needs it for both of its backward passes."
        )
    return loss
