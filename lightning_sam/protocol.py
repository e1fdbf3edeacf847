"""`StepProtocol`: one SAM step as a transaction over an optimizer's parameter groups. No Lightning import.

The phases, in order: ``open`` (or ``begin``) a step, ``perturb`` to ``w + e`` after a
first pass, ``restore`` after the pass at ``w + e``, ``end_micro_batch``; then, once per
optimizer step, ``finalize`` (optional: the variant's direction before clipping) and
``finish``: one verdict, the base optimizer's step and the policy's commit, or a skip that
leaves everything as it was. [`SAMStep`][lightning_sam.SAMStep] drives them; the
davda54/sam methods of [`SAM`][lightning_sam.SAM] are made of them.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sam._compat import is_view, mark_stepped, tensor_version
from lightning_sam._restore import BufferPool
from lightning_sam.functional import all_finite, copy_scaled_, grad_norm_squared, mul_, perturb_, restore_
from lightning_sam.policy import Ascent, NonFinite, StepContext, groups_with_grads

if TYPE_CHECKING:
    from lightning_sam.optimizer import SAM

__all__ = ["StepProtocol"]


class StepProtocol:
    """SAM's step protocol for one optimizer: the open step, its buffers, and the verdict.

    Shared by reference by every copy of the optimizer's ``__dict__`` (Lightning's and
    Fabric's optimizer wrappers make one); never saved.

    Attributes:
        ctx: The open step's context, or None between steps.
        driven: A driver (``SAMStep``) runs the passes: ``SAM.step(closure)`` then runs the
            closure and finishes the step.
        buffers: The tensors that live within a step, allocated once and reused.
        skipped_steps: The steps skipped as non-finite by the verdict (a GradScaler's skips
            are the scaler's).

    Examples:
        >>> import torch
        >>> from lightning_sam import SAM
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.5)
        >>> protocol = opt.protocol
        >>> ctx = protocol.begin()
        >>> (w * w).sum().backward()  # the first pass: g = 2w
        >>> norm = protocol.perturb()
        >>> opt.zero_grad()
        >>> (w * w).sum().backward()  # the second pass, at w + e
        >>> protocol.restore()
        >>> protocol.end_micro_batch()
        >>> protocol.finish(), opt.steps_taken
        (True, 1)
    """

    def __init__(self, optimizer: SAM) -> None:
        self.optimizer = optimizer
        self.ctx: StepContext | None = None
        self.driven = False
        self.buffers = BufferPool()
        self.skipped_steps = 0
        self._warned: set[str] = set()

    def begin(self, *, grad_scale: Tensor | None = None, nonfinite: NonFinite = "skip") -> StepContext:
        """Open a fresh step, dropping any earlier one (its weights put back first)."""
        self.restore()
        opt = self.optimizer
        step = opt.steps_taken
        self.ctx = StepContext(step, opt.policy.ascends(step, opt), grad_scale=grad_scale, nonfinite=nonfinite)
        self.ctx.grads_seen = self._grads_signature()
        return self.ctx

    def open(self, *, grad_scale: Tensor | None = None, nonfinite: NonFinite = "skip") -> StepContext:
        """The open step if the gradients are as its last micro-batch left them (accumulation), else a fresh one.

        A step that never reached ``finish`` (a GradScaler skipped it: it unscaled the
        gradients in place, and they were cleared) is dropped here, with all it kept.
        """
        ctx = self.ctx
        if ctx is not None and ctx.perturbed is None and self._grads_as_seen(ctx):
            return ctx
        return self.begin(grad_scale=grad_scale, nonfinite=nonfinite)

    @torch.no_grad()
    def perturb(self, loss: Tensor | None = None, *, owned: bool = False) -> Tensor:
        """Save ``w`` and move to ``w + e`` along the policy's ascent (SAM's: the gradient in ``.grad``).

        Args:
            loss: The first pass's loss, if any: a non-finite one makes the step non-finite.
            owned: The caller hands the gradients in ``.grad`` over (nothing else holds them:
                ``SAMStep`` sets them aside and back): a policy that keeps them keeps these
                tensors rather than copies.

        Returns:
            The global norm that scaled ``e`` (a 0-dim tensor; where it is not finite,
            nothing moved).
        """
        ctx, opt = self._open("perturb"), self.optimizer
        if ctx.perturbed is not None:
            raise RuntimeError(
                "SAM: the weights are already perturbed. Call second_step() (or restore()) after the backward pass "
                "at the perturbed point before the next ascent."
            )
        ascents = opt.policy.ascent(ctx, opt)
        if not ascents and not opt.policy.pre_forward:
            self._warn_once(
                "no_grads",
                "SAM found no parameter with a gradient, so the weights are not perturbed and the step is the base "
                "optimizer's. Run the backward pass first; under DeepSpeed ZeRO the gradients live in its own "
                "buffers, where SAM cannot see them (use DDP or FSDP2).",
            )
        norm = self.global_norm(ascents)
        if not opt.policy.pre_forward:  # a first pass: its gradient (and loss) must be finite for the step to be
            ctx.pass_finite = torch.isfinite(norm) if loss is None else torch.isfinite(norm) & torch.isfinite(loss)
        moved: list[tuple[list[Tensor], list[Tensor], bool]] = []
        ctx.perturbed = moved
        try:
            self._move(moved, ascents, norm, owned)
            if opt.policy.keeps_first_gradient:
                self._keep_first_gradient(ctx, owned)
        except BaseException:  # out of memory half-way: nothing stays moved
            self.restore()
            raise
        return norm

    def _move(
        self, moved: list[tuple[list[Tensor], list[Tensor], bool]], ascents: list[Ascent], norm: Tensor, owned: bool
    ) -> None:
        """``w += radius · T² d / ‖T d‖`` for every group, each copy registered (in ``moved``) as soon as it is made."""
        for a in ascents:
            options, eps = a.group.options, a.group.options["perturb_eps"]
            scale = a.radius / (norm + eps if eps else norm)  # not finite where the norm is 0: nothing moves
            gradients = bool(a.group.grads) and all(d is g for d, g in zip(a.directions, a.group.grads, strict=False))
            backup = perturb_(
                a.params,
                a.directions,
                scale,
                adaptive=options["adaptive"],
                eta=options["eta"],
                foreach=a.group.foreach,
                out=self.buffers.get(a.params, "backup"),
                finite="known" if a.finite else "mask_in_place" if a.scratch or (owned and gradients) else "mask",
            )
            moved.append((a.params, backup, a.group.foreach))

    @torch.no_grad()
    def decide(self) -> bool:
        """After the first pass (its gradient in ``.grad``): whether the step ascends; one host read, if any.

        For a ``decides_after_first_pass`` policy (AE-SAM) the read carries the policy's
        decision and the first pass's finiteness: a step that takes no second pass then
        knows its verdict, and ``finish`` reads nothing more. The decision is the step's
        first micro-batch's; the later ones follow it. Other policies decided at ``begin``.
        """
        ctx, opt = self._open("decide"), self.optimizer
        if not opt.policy.decides_after_first_pass or ctx.micro_batches > 0 or not ctx.ascending:
            return ctx.ascending
        finite, ascends = opt.policy.decision(ctx, opt)
        finite_now, ascends_now = torch.stack([finite, finite & ascends]).tolist()  # the step's one read
        ctx.ascending = bool(ascends_now)
        ctx.verdict = None if ctx.ascending else bool(finite_now)
        return ctx.ascending

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (bitwise); a no-op when not perturbed."""
        ctx = self.ctx
        if ctx is not None and ctx.perturbed is not None:
            for params, backup, foreach in ctx.perturbed:
                restore_(params, backup, foreach=foreach)
            ctx.perturbed = None

    def end_micro_batch(self) -> None:
        """A micro-batch's passes are done: what its first pass kept joins the step (an abandoned one's never does)."""
        ctx = self._open("end_micro_batch")
        for p, g in ctx.pending.items():
            if ctx.micro_batches == 0:
                ctx.kept[p] = g
            elif p in ctx.kept:
                ctx.kept[p].add_(g)
            else:  # a parameter the earlier micro-batches did not reach: its buffer (if the pool's) leaves the pool
                ctx.kept[p] = g
                if self.buffers.holds(p, "pending", g):
                    self.buffers.replace(p, "pending", None)
        if ctx.pass_finite is not None:
            ctx.finite = ctx.pass_finite if ctx.finite is None else ctx.finite & ctx.pass_finite
        ctx.pending, ctx.pass_finite = {}, None
        ctx.micro_batches += 1
        ctx.grads_seen = self._grads_signature()

    @torch.no_grad()
    def finalize(self, grad_scale: Tensor | None = None) -> None:
        """The policy's descent now (``.grad`` carries ``grad_scale``), for what reads ``.grad`` before ``finish``."""
        ctx, opt = self.ctx, self.optimizer
        if ctx is not None and not ctx.descended:  # hooks and clipping come between: the verdict reads .grad again
            opt.policy.descent(ctx, opt, grad_scale)
            ctx.descended = True

    @torch.no_grad()
    def finish(self) -> bool:
        """End the step: the verdict, then the base optimizer's step and the policy's commit; False if skipped."""
        ctx, opt = self.ctx, self.optimizer
        if ctx is None:  # no pass ran through the protocol: a one-pass step with the gradients as they are
            ctx = self.begin()
            ctx.ascending = False
        self.restore()
        self.ctx = None  # the step ends here, however it ends
        if not groups_with_grads(opt.param_groups):  # nothing to step with (training_step returned None)
            return False
        if not ctx.descended:  # the direction now, and what the policy knows of its finiteness
            ctx.descent_finite = opt.policy.descent(ctx, opt, None)
        if self._skips(ctx):
            return False
        opt.base_optimizer.step()
        mark_stepped(opt)
        ascents = opt.ascents_taken + ctx.ascending
        for group in opt.param_groups:
            group["sam_steps"], group["sam_ascents"] = ctx.step + 1, ascents
        opt.policy.commit(ctx, opt)
        return True

    def global_norm(self, ascents: list[Ascent]) -> Tensor:
        """``‖T d‖`` over every group's direction (SAM's: the gradient), summed over every shard."""
        squares = [
            grad_norm_squared(
                a.params,
                a.directions,
                adaptive=a.group.options["adaptive"],
                eta=a.group.options["eta"],
                foreach=a.group.foreach,
            )
            for a in ascents
        ]
        total = torch.stack([s.to(squares[0].device) for s in squares]).sum() if squares else torch.zeros(())
        return self.optimizer.sum_over_shards(total).sqrt()  # every rank joins, with or without gradients

    def _skips(self, ctx: StepContext) -> bool:
        """The verdict, the step's one host sync; none when a GradScaler judged gradients that carry it all."""
        if ctx.grad_scale is not None and (ctx.carried or ctx.finite is None):
            return False
        if ctx.verdict is not None and ctx.micro_batches <= 1:  # read with the decision: the pass is the step's
            if ctx.verdict:
                return False
        elif self._finite(ctx):
            return False
        self.skipped_steps += 1
        message = (
            "SAM: the gradient is not finite (a NaN/inf loss or gradient in one of the passes); the step was skipped "
            "and the weights, the optimizer's state and the variant's are unchanged."
        )
        if ctx.nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=5)
        return True

    def _finite(self, ctx: StepContext) -> bool:
        """Whether every gradient the base optimizer would step with, and every first pass, is finite (one read)."""
        opt = self.optimizer
        grads = [g for group in groups_with_grads(opt.param_groups) for g in group.grads]
        checks = [ctx.descent_finite if ctx.descent_finite is not None else all_finite(grads)]
        if ctx.finite is not None:
            checks.append(ctx.finite)
        not_finite = (~torch.stack([c.to(checks[0].device) for c in checks]).all()).float()
        return bool(opt.sum_over_shards(not_finite) == 0)

    def _keep_first_gradient(self, ctx: StepContext, owned: bool) -> None:
        """This micro-batch's first gradient, unscaled, in at least float32.

        The gradient tensors themselves when they are the caller's to give and no views (of
        DDP's buckets, say); else copies in the pool's buffers.
        """
        params = [p for group in groups_with_grads(self.optimizer.param_groups) for p in group.params]
        unscale = None if ctx.grad_scale is None else ctx.grad_scale.reciprocal()
        adopt, storages = [], set()
        for p in params:  # a tensor autograd gave to two parameters is adopted once, copied for the other
            if owned and _adoptable(p.grad) and (ptr := p.grad.untyped_storage().data_ptr()) not in storages:  # type: ignore[arg-type, union-attr]
                adopt.append(p)
                storages.add(ptr)
        taken = set(adopt)
        copied = [p for p in params if p not in taken]
        buffers = self.buffers.get(copied, "kept" if ctx.micro_batches == 0 else "pending", wide=True)
        copy_scaled_(buffers, [p.grad for p in copied if p.grad is not None], unscale)
        own = [p.grad for p in adopt if p.grad is not None]
        if unscale is not None:
            mul_(own, unscale)
        kept = {**dict(zip(adopt, own, strict=True)), **dict(zip(copied, buffers, strict=True))}
        ctx.pending = {p: kept[p] for p in params}

    def _open(self, what: str) -> StepContext:
        if self.ctx is None:
            raise RuntimeError(f"SAM: {what}() needs an open step. Begin one first (protocol.begin() or first_step()).")
        return self.ctx

    def _grads_signature(self) -> list[tuple[Any, int] | None]:
        """Each gradient's identity and version: a step's micro-batches leave them as the next one finds them."""
        return [
            None if p.grad is None else (weakref.ref(p.grad), tensor_version(p.grad))
            for group in self.optimizer.param_groups
            for p in group["params"]
        ]

    def _grads_as_seen(self, ctx: StepContext) -> bool:
        """Whether every gradient is the very tensor, unchanged, that the step last saw (identity, never ``==``)."""
        seen = ctx.grads_seen or []
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if len(seen) != len(params):
            return False
        for p, mark in zip(params, seen, strict=True):
            if (p.grad is None) != (mark is None):
                return False
            if mark is not None and (mark[0]() is not p.grad or mark[1] != tensor_version(p.grad)):
                return False
        return True

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _adoptable(grad: Tensor) -> bool:
    """A plain, contiguous, non-view tensor of at least float32: kept as it is."""
    return (
        type(grad) is Tensor
        and not is_view(grad)
        and grad.is_contiguous()
        and grad.dtype == torch.promote_types(grad.dtype, torch.float32)
    )
