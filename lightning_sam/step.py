"""`SAMStep`: SAM's two passes in any training loop, driven by a few callables. No Lightning import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_sam._restore import BatchNormSnapshot, RngState, generators_of, rng_state, set_rng_state
from lightning_sam.optimizer import SAM
from lightning_sam.policy import StepContext

__all__ = ["SAMStep"]

T = TypeVar("T")


class SAMStep:
    """Run SAM's two passes around a [`SAM`][lightning_sam.SAM] optimizer, in any loop.

    One call of [`run`][lightning_sam.SAMStep.run] per (micro-)batch does the whole
    protocol: the gradient of the loss at ``w`` is taken on its own (the gradients
    accumulated so far stay aside; on DDP each device ascends with its own gradient),
    the optimizer moves to ``w + e``, the loss at ``w + e`` is computed with the random
    state of the first pass (same dropout masks) and BatchNorm statistics left as the
    first pass made them, and back-propagated (accumulating); the weights go back to ``w``
    bitwise whatever happens. Then call
    ``optimizer.step()`` (or ``scaler.step(optimizer)``): it steps the base optimizer, or
    skips a step whose gradient is not finite and leaves weights, optimizer state and the
    variant's state unchanged. A non-finite first pass (loss, or gradient norm) never
    moves the weights; its second pass is made NaN, so that the step is skipped on every
    rank (DDP's all-reduce carries the NaN) and a GradScaler backs off. A step costs one
    host synchronization (the optimizer's verdict), none with a GradScaler (whose own
    check decides); AE-SAM's SAM steps one more (its decision after the first pass, which
    is the verdict of its one-pass steps).

    The phases are public for loops that split them across hooks (``SAMMixin`` does):
    [`begin`][lightning_sam.SAMStep.begin] before the first forward,
    [`ascend`][lightning_sam.SAMStep.ascend] with its loss,
    [`second_forward`][lightning_sam.SAMStep.second_forward],
    [`second_backward`][lightning_sam.SAMStep.second_backward]. A step may also take one
    pass: when the step does not ascend (the policy's schedule), ``run`` back-propagates
    the loss at ``w`` alone (MSAM: at the point it moves to before the forward).

    All state between batches lives in the gradients, the optimizer's ``state_dict`` and
    the open step's [`StepContext`][lightning_sam.policy.StepContext]: the micro-batches
    of one optimizer step share it, and a micro-batch abandoned by an exception adds
    nothing to it, so that running the batch again is as if it had run once. A step starts
    afresh when the gradients have changed since its last micro-batch (a GradScaler
    unscaled them, ``zero_grad`` cleared them): one that never reached ``step()`` leaves
    no trace.

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
            pass's gradient (``needs_global_ascent``: LookSAM, GSAM, FriendlySAM).
        same_randomness: Replay the first pass's random state in the second: torch's,
            Python's ``random``, numpy's global generator and every ``torch.Generator``
            attribute of ``module`` and its submodules (``self.generators``, looked up when
            this object is made; ``SAMMixin`` looks again at each epoch's first batch); each
            advances once per micro-batch, as without SAM.
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
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.sharded = any(isinstance(p, DTensor) for p in params)
        self.global_ascent = self.sharded or optimizer.policy.needs_global_ascent
        self.same_randomness = same_randomness
        self.nonfinite = nonfinite
        self._device = params[0].device if params else torch.device("cpu")
        optimizer.protocol.driven = True
        self.stats: dict[str, Tensor] = {}
        self._ascending = False
        self._rng_before: RngState | None = None
        self.generators = generators_of(module)  # the model's own, replayed with torch's, Python's and numpy's
        self._batchnorm: BatchNormSnapshot | None = None

    @property
    def ctx(self) -> StepContext | None:
        """The optimizer's open step (its context), or None between steps."""
        return self.optimizer.protocol.ctx

    @property
    def ascending(self) -> bool:
        """Whether the last micro-batch begun perturbs the weights ([`begin`][lightning_sam.SAMStep.begin] decides)."""
        return self._ascending

    def run(self, loss_fn: Callable[[], Tensor]) -> Tensor:
        """One micro-batch: both passes (or one), the gradient added to ``.grad``.

        Fills [`stats`][lightning_sam.SAMStep]: ``loss`` (at ``w``), ``perturbed_loss``
        (at ``w + e``), ``first_order_sharpness`` (their difference) and ``grad_norm``
        (the norm that scaled ``e``, unscaled); a one-pass step has ``loss`` alone (MSAM's:
        ``perturbed_loss``, at the point it moved to).

        Returns:
            The loss at ``w`` (MSAM: at the point it moved to), detached.
        """
        self.begin()
        protocol = self.optimizer.protocol
        if not self.ascending or self.optimizer.policy.pre_forward:
            if self.ascending:  # MSAM: to the point it steps from, before the only forward
                protocol.perturb()
            try:
                loss = loss_fn()
                self.backward(self._scaled(loss))
            finally:
                protocol.restore()
            protocol.end_micro_batch()
            self.stats = {"perturbed_loss" if self.ascending else "loss": loss.detach()}
            return loss.detach()
        loss = loss_fn()
        try:
            norm = self.ascend(loss)
            if not self.ascending:  # the first pass decided (AE-SAM): it was the step's only one
                self.stats = {"loss": loss.detach()}
                return loss.detach()
            perturbed_loss = self.second_forward(loss_fn)
            self.second_backward(perturbed_loss)
        except BaseException:
            self.abandon()
            raise
        loss, perturbed_loss = loss.detach(), perturbed_loss.detach()
        scale = self.grad_scale()
        self.stats = {
            "loss": loss,
            "perturbed_loss": perturbed_loss,
            "first_order_sharpness": perturbed_loss - loss,
            "grad_norm": norm if scale is None else norm / scale,
        }
        return loss

    def begin(self) -> None:
        """Start a micro-batch, before its first forward: the optimizer step it belongs to, one pass or two.

        The open step continues while the gradients are as its last micro-batch left them;
        otherwise a fresh one begins.
        """
        self._ascending = self.optimizer.protocol.open(grad_scale=self.grad_scale(), nonfinite=self.nonfinite).ascending
        may_ascend = self._ascending or self.optimizer.policy.decides_after_first_pass
        self._rng_before = rng_state(self.generators) if may_ascend and self.same_randomness else None

    def end_one_pass(self) -> None:
        """After a one-pass micro-batch's backward: it joins the step."""
        if self.optimizer.protocol.ctx is not None:
            self.optimizer.protocol.end_micro_batch()

    def ascend(self, loss: Tensor, *, scaled: bool = False) -> Tensor:
        """Take the gradient of the loss at ``w`` on its own and move to ``w + e``; returns the norm that scaled ``e``.

        For MSAM the move needs no gradient: ``loss`` is not back-propagated. For a policy
        that decides after the first pass (AE-SAM), the decision comes first: a step that does
        not ascend adds the gradient to ``.grad`` as a one-pass micro-batch does, ends the
        micro-batch, and ``ascending`` turns False (nothing moves; no second pass follows).

        Args:
            loss: The first pass's loss (divided by the accumulation steps is fine: the
                direction is the same).
            scaled: The loss is already multiplied by the scaler's scale (Lightning's
                precision plugin does that).

        Returns:
            The norm of the direction that set ``e``, in the scaler's units when there is one
            (0 when the first pass decided against the ascent).
        """
        sam = self.optimizer
        if sam.policy.pre_forward:
            return sam.protocol.perturb()
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
            if sam.protocol.decide():
                self._ascending = True
                return sam.protocol.perturb(loss.detach(), owned=True)  # the first pass's gradients are ours
            aside = [_joined(g, p.grad) for p, g in zip(params, aside, strict=True)]  # a one-pass micro-batch
        finally:
            for p, g in zip(params, aside, strict=True):
                p.grad = g
        self._ascending, self._rng_before = False, None
        sam.protocol.end_micro_batch()
        return torch.zeros((), device=self._device)

    def second_forward(self, forward: Callable[[], T]) -> T:
        """Run ``forward`` at ``w + e`` with the first pass's random state.

        The BatchNorm statistics it updates are put back by ``second_backward`` (the
        backward pass still needs them as they are).
        """
        rng_after = None
        try:
            rng_after = rng_state(self.generators) if self._rng_before is not None else None
            self._batchnorm = BatchNormSnapshot(self.module)
            if self._rng_before is not None:
                set_rng_state(self._rng_before)
            return forward()
        except BaseException:
            self.abandon()
            raise
        finally:
            if rng_after is not None:
                set_rng_state(rng_after)

    def second_backward(self, loss: Tensor, backward: Callable[[Tensor], Any] | None = None) -> None:
        """Back-propagate the loss at ``w + e`` (accumulating into ``.grad``), then put ``w`` back bitwise."""
        try:
            (backward or self.backward)(self._scaled(self.ctx.carry(loss) if self.ctx is not None else loss))
        finally:
            self.abandon()  # the weights back to w, BatchNorm statistics as the first pass left them
        self.optimizer.protocol.end_micro_batch()

    def grad_scale(self) -> Tensor | None:
        """The GradScaler's scale as a tensor (never read on the host), or None without a scaler."""
        return None if self.scaler is None else self.scaler.scale(torch.ones((), device=self._device))

    def _scaled(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def abandon(self) -> None:
        """Weights back to ``w`` (bitwise) and BatchNorm statistics as the first pass left them; a no-op after.

        Call it when a micro-batch's passes stop half-way (an exception between them); the
        phases call it themselves on their own failures. The micro-batch adds nothing to its
        optimizer step, so that running it again is as if it had run once.
        """
        self.optimizer.restore()
        if self._batchnorm is not None:
            self._batchnorm.restore()
            self._batchnorm = None


def _joined(accumulated: Tensor | None, grad: Tensor | None) -> Tensor | None:
    """``grad`` added to the gradient accumulated so far, as a backward into ``.grad`` adds it."""
    if accumulated is None or grad is None:
        return grad if accumulated is None else accumulated
    return accumulated.add_(grad)
