"""`SAMStep`: SAM's two passes in any training loop, driven by a few callables. No Lightning import."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_sam._compat import batchnorm_types
from lightning_sam.optimizer import SAM

__all__ = ["SAMStep", "batchnorm_statistics_kept", "rng_state", "set_rng_state"]

T = TypeVar("T")
RngState = tuple[Tensor, list[Tensor] | None]


def rng_state() -> RngState:
    """Torch's CPU generator and, once CUDA is in use, every CUDA device's (what dropout draws from)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]


def set_rng_state(state: RngState) -> None:
    """Put back a state from [`rng_state`][lightning_sam.step.rng_state]."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@contextmanager
def batchnorm_statistics_kept(module: nn.Module | None) -> Iterator[None]:
    """Put every BatchNorm's running statistics (``SyncBatchNorm`` too) back bitwise after the block."""
    saved = _BatchNormSnapshot(module)
    try:
        yield
    finally:
        saved.restore()


class _BatchNormSnapshot:
    """Copies of the running statistics that a forward pass in training mode updates."""

    def __init__(self, module: nn.Module | None) -> None:
        self.buffers = [] if module is None else _batchnorm_buffers(module)
        self.saved = [b.clone() for b in self.buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, value in zip(self.buffers, self.saved, strict=True):
                buffer.copy_(value)


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    """Running statistics that a forward pass in training mode updates."""
    return [
        buffer
        for m in module.modules()
        if isinstance(m, batchnorm_types()) and m.training and getattr(m, "track_running_stats", False)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if isinstance(buffer, Tensor)
    ]


class SAMStep:
    """Run SAM's two passes around a [`SAM`][lightning_sam.SAM] optimizer, in any loop.

    One call of [`run`][lightning_sam.SAMStep.run] per (micro-)batch does the whole
    protocol: the gradient of the loss at ``w`` is taken on its own (the gradients
    accumulated so far stay aside; on DDP each device ascends with its own gradient),
    ``first_step`` moves to ``w + e``, the loss at ``w + e`` is computed with the random
    state of the first pass (same dropout masks) and BatchNorm statistics left as the
    first pass made them, and back-propagated (accumulating); the weights go back to ``w``
    bitwise whatever happens. Then call
    ``optimizer.step()`` (or ``scaler.step(optimizer)``): it steps the base optimizer, or
    skips a step whose gradient is not finite and leaves weights and optimizer state
    unchanged. A non-finite first pass (loss, or gradient norm) never moves the weights;
    its second pass is made NaN, so that the step is skipped on every rank (DDP's
    all-reduce carries the NaN) and a GradScaler backs off.

    The phases are public for loops that split them across hooks (``SAMMixin`` does):
    [`begin`][lightning_sam.SAMStep.begin] before the first forward,
    [`ascend`][lightning_sam.SAMStep.ascend] with its loss,
    [`second_forward`][lightning_sam.SAMStep.second_forward],
    [`second_backward`][lightning_sam.SAMStep.second_backward]. A step may also take one
    pass: when the optimizer's ``ascent_due()`` is False, ``run`` back-propagates the
    loss at ``w`` alone (or, for MSAM, at a point the optimizer chose before the forward).

    All state between batches lives in the gradients and the optimizer's ``state_dict``;
    a step keeps its own (random state, the gradients set aside) only until it ends.

    Args:
        optimizer: The SAM optimizer; from now on its ``step()`` is the descent of a step
            driven by this object.
        module: The model, to keep its BatchNorm statistics from the second pass.
        backward: Back-propagates the second pass's loss into ``.grad`` (default
            ``loss.backward()``); e.g. ``fabric.backward`` or
            ``lambda loss: scaler.scale(loss).backward()``.
        scaler: A ``torch.amp.GradScaler`` for fp16: both passes' losses are scaled by it
            (pass the plain ``backward``), and the optimizer learns the scale (the variants
            that keep the gradient divide it out); then ``scaler.step(optimizer)`` and
            ``scaler.update()``.
        ascent_backward: How the first pass's loss becomes the ascent direction. None
            (the default): ``torch.autograd.grad``, which leaves ``.grad`` and every
            hook alone, so that on DDP each device ascends with its own gradient, with no
            ``no_sync`` needed and no all-reduce. A callable, e.g. ``Tensor.backward``:
            back-propagated into ``.grad`` (the gradients accumulated so far are set aside
            meanwhile); this all-reduces on DDP (one shared ascent), and is what
            reentrant gradient checkpointing (``use_reentrant=True``) and FSDP1 need.
            Sharded (DTensor) parameters, as FSDP2 and tensor parallelism make them, always
            take the first pass through ``backward`` (FSDP2 reduce-scatters it): under
            sharding the ascent is global. So do the variants whose state uses the first
            pass's gradient (``ascent_must_be_global``: LookSAM, GSAM, FriendlySAM).
        same_randomness: Replay the first pass's random state in the second.
        nonfinite: What ``optimizer.step()`` does with a non-finite gradient: ``"skip"``
            with a ``RuntimeWarning``, or ``"raise"`` ``FloatingPointError``.

    Examples:
        >>> import torch
        >>> from lightning_sam import SAM, SAMStep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> sam = SAMStep(opt, model)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> for _ in range(3):
        ...     loss = sam.run(lambda: torch.nn.functional.mse_loss(model(x), y))  # both passes
        ...     opt.step()  # restore is done: the SGD step with the gradient at w + e
        ...     opt.zero_grad()
        >>> sorted(sam.stats)
        ['first_order_sharpness', 'grad_norm', 'loss', 'perturbed_loss']
    """

    def __init__(
        self,
        optimizer: SAM,
        module: nn.Module | None = None,
        *,
        backward: Callable[[Tensor], Any] | None = None,
        ascent_backward: Callable[[Tensor], Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        same_randomness: bool = True,
        nonfinite: Literal["skip", "raise"] = "skip",
    ) -> None:
        if not isinstance(optimizer, SAM):
            raise ValueError(
                f"SAMStep drives a lightning_sam.SAM optimizer, got {type(optimizer).__name__}: "
                "build it as SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)."
            )
        if module is not None and not isinstance(module, nn.Module):
            raise ValueError(f"module must be the torch.nn.Module being trained, got {type(module).__name__}.")
        if not isinstance(same_randomness, bool):
            raise ValueError(f"same_randomness must be True or False, got {same_randomness!r}.")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}.")
        self.optimizer = optimizer
        self.module = module
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.backward = backward if backward is not None else Tensor.backward
        self.ascent_backward = ascent_backward
        self.sharded = any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
        self.global_ascent = self.sharded or optimizer.ascent_must_be_global
        self.same_randomness = same_randomness
        optimizer._runtime.driven = True
        optimizer._runtime.nonfinite = nonfinite
        self.stats: dict[str, Tensor] = {}
        self.ascending = True
        self.pre_perturbed = False
        self._rng_before: RngState | None = None
        self._finite = True
        self._batchnorm: _BatchNormSnapshot | None = None

    def run(self, loss_fn: Callable[[], Tensor]) -> Tensor:
        """One micro-batch: both passes (or one), the gradient added to ``.grad``.

        Fills [`stats`][lightning_sam.SAMStep]: ``loss`` (at ``w``), ``perturbed_loss``
        (at ``w + e``), ``first_order_sharpness`` (their difference) and ``grad_norm``
        (the norm that scaled ``e``, of the gradient as ``backward`` made it).

        Returns:
            The loss at ``w`` (detached).
        """
        self.begin()
        if not self.ascending:
            try:
                loss = loss_fn()
                self.backward(self._scaled(loss))
            finally:
                self.end_one_pass()
            self.stats = {"loss": loss.detach()}
            return loss.detach()
        loss = loss_fn()
        norm = self.ascend(loss)
        perturbed_loss = self.second_forward(loss_fn)
        self.second_backward(perturbed_loss)
        loss, perturbed_loss = loss.detach(), perturbed_loss.detach()
        self.stats = {
            "loss": loss,
            "perturbed_loss": perturbed_loss,
            "first_order_sharpness": perturbed_loss - loss,
            "grad_norm": norm / (self.scaler.get_scale() if self.scaler is not None else 1.0),
        }
        return loss

    def begin(self) -> None:
        """Start a micro-batch, before its first forward: decide one pass or two, note the random state.

        On a one-pass step a variant that perturbs without a gradient (MSAM) moves the
        weights now; [`end_one_pass`][lightning_sam.SAMStep.end_one_pass] puts them back.
        """
        self.ascending = self.optimizer.ascent_due()
        self._rng_before = rng_state() if self.ascending and self.same_randomness else None
        self.pre_perturbed = not self.ascending and self.optimizer.perturb_before_forward()

    def end_one_pass(self) -> None:
        """After a one-pass step's backward: the weights back at ``w`` (bitwise), if they were moved."""
        if self.pre_perturbed:
            self.optimizer.restore()
            self.pre_perturbed = False

    def ascend(self, loss: Tensor, *, scaled: bool = False) -> Tensor:
        """Take the gradient of the loss at ``w`` on its own and move to ``w + e``; returns the norm that scaled ``e``.

        Args:
            loss: The first pass's loss (divided by the accumulation steps is fine: the
                direction is the same).
            scaled: The loss is already multiplied by the scaler's scale (Lightning's
                precision plugin does that).

        Returns:
            The norm of the gradient that set ``e``, in the scaler's units when there is one.
        """
        sam = self.optimizer
        loss = loss if scaled else self._scaled(loss)
        params = [p for group in sam.param_groups for p in group["params"]]
        aside = [p.grad for p in params]  # the gradients accumulated so far wait outside the first pass
        try:
            for p in params:
                p.grad = None
            if self.ascent_backward is None and not self.global_ascent:
                trainable = [p for p in params if p.requires_grad]
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
                if trainable and all(g is None for g in grads):
                    raise ValueError(
                        "The first pass's gradient did not reach any of the optimizer's parameters through "
                        "torch.autograd.grad: a wrapper such as FSDP (FullyShardedDataParallel) sets .grad itself. "
                        "Pass SAMStep(..., ascent_backward=torch.Tensor.backward)."
                    )
                for p, g in zip(trainable, grads, strict=True):
                    p.grad = g
            else:
                (self.ascent_backward or self.backward)(loss)
            norm = sam.first_step(grad_scale=self.scaler.get_scale() if self.scaler is not None else 1.0)
        finally:
            for p, g in zip(params, aside, strict=True):
                p.grad = g
        self._finite = sam._runtime.finite and bool(torch.isfinite(loss.detach()))
        return norm

    def second_forward(self, forward: Callable[[], T]) -> T:
        """Run ``forward`` at ``w + e`` with the first pass's random state.

        The BatchNorm statistics it updates are put back by ``second_backward`` (the
        backward pass still needs them as they are).
        """
        rng_after = rng_state() if self._rng_before is not None else None
        self._batchnorm = _BatchNormSnapshot(self.module)
        try:
            if self._rng_before is not None:
                set_rng_state(self._rng_before)
            return forward()
        except BaseException:
            self._end()
            raise
        finally:
            if rng_after is not None:
                set_rng_state(rng_after)

    def second_backward(self, loss: Tensor, backward: Callable[[Tensor], Any] | None = None) -> None:
        """Back-propagate the loss at ``w + e`` (accumulating into ``.grad``), then put ``w`` back bitwise."""
        try:
            if not self._finite:  # the step must be skipped: a NaN gradient says so to every rank and to a scaler
                loss = loss * math.nan
            (backward or self.backward)(self._scaled(loss))
        finally:
            self._end()

    def _scaled(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _end(self) -> None:
        """Weights back to ``w`` and BatchNorm statistics as the first pass left them."""
        self.optimizer.restore()
        if self._batchnorm is not None:
            self._batchnorm.restore()
            self._batchnorm = None
