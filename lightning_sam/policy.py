r"""How one SAM step runs, and the rule every variant follows.

A SAM step is a transaction. Everything that lives within one optimizer step (the first
passes' gradients, the saved weights, the finiteness of each pass, the GradScaler's scale,
what the variant computed for its state) is in the step's `StepContext`; the optimizer
makes a fresh one for every step and drops it when the step ends, however it ends. A
`Policy` makes a method's three choices on top of SAM's protocol: which steps ascend
(``ascends``), along what and how far (``ascent``), and what the base optimizer steps with
(``descent``); what it keeps across steps changes in ``commit`` alone.

**The rule for whoever adds a variant** (LookSAM, GSAM, FriendlySAM and MSAM follow it):

1. ``ascends``, ``ascent`` and ``descent`` may write the context, and ``descent`` the
   gradients (``.grad``), nothing else: no entry of ``state``, no key of a parameter group.
2. ``commit`` is the only place where persistent state changes. It runs after the base
   optimizer has stepped, and only then: a step that is skipped (a non-finite gradient, or
   by the GradScaler) or abandoned by an exception never reaches it, so it leaves weights,
   optimizer state and the policy's state bitwise as they were, and the step count too
   (steps count when they are taken).
3. No host synchronization: the optimizer reads one boolean per step (its verdict), and
   nothing else does: keep norms and coefficients as tensors (no ``float()``, ``bool()``,
   ``.item()``). A policy that chooses after the first pass whether the step takes a second
   (``decides_after_first_pass``: AE-SAM) returns its choice as a tensor from ``decision``;
   the optimizer reads it together with the first pass's finiteness, in one read that is
   also the verdict of a step that takes no second pass.
4. No absolute epsilon: a ratio of norms is guarded with ``torch.where`` (0 where it is
   not finite), so that a run scaled by ``s`` (loss x s, lr / s) is the same run.
5. From finite gradients, finite results: a GradScaler decides on the gradients it sees,
   and what ``descent`` and ``commit`` compute from them must then be finite too.
6. State that lives in checkpoints goes in ``self.state[p]`` (saved as ``"sam.<name>"``
   entries of each parameter's state; shaped like the parameter, a DTensor for a DTensor
   parameter, so that sharded checkpoints hold each rank's shard), created by
   ``ensure_state`` for every parameter a step sees, and in parameter groups' keys, set by
   ``setup_group``, so that a checkpoint's layout does not depend on how far the training
   got. Read ``self.state`` with ``in`` and ``.get``: only ``commit`` and ``ensure_state``
   add to it.

A new variant is a ``Policy`` subclass and a small ``SAM`` subclass that passes it as
``policy=``; see ``lightning_sam/looksam.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_sam.functional import _locals, _resolve_foreach, like_param

if TYPE_CHECKING:
    from lightning_sam.optimizer import SAM

__all__ = [
    "Ascent",
    "Group",
    "Policy",
    "Schedule",
    "StepContext",
    "check_number",
    "first_and_second",
    "groups_with_grads",
    "guarded_ratio",
    "is_number",
    "present",
    "zeros_like_param",
]

NonFinite = Literal["skip", "raise"]


class Schedule:
    """Which optimizer steps ascend: every ``interval``-th from ``start``, shared by every method.

    Args:
        interval: An ascent on every ``interval``-th step (``>= 1``).
        start: The first step that ascends: a step number, or a fraction in ``[0, 1)`` of
            ``total_steps`` (late-phase SAM).
        total_steps: The training's length in optimizer steps, for a fractional ``start``.

    Examples:
        >>> schedule = Schedule(interval=2, start=0.5, total_steps=8)
        >>> [schedule.due(n) for n in range(8)]
        [False, False, False, False, True, False, True, False]
    """

    def __init__(self, interval: int = 1, start: int | float = 0, total_steps: int | None = None) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval: {interval!r}. SAM runs on every interval-th step: an integer >= 1.")
        valid_start = (isinstance(start, int) and not isinstance(start, bool) and start >= 0) or (
            isinstance(start, float) and 0.0 <= start < 1.0
        )
        if not valid_start:
            raise ValueError(
                f"Invalid start: {start!r}. The first step with SAM: a step number >= 0, or a fraction in [0, 1) of "
                "total_steps (0.7: SAM for the last 30% of the training)."
            )
        self.interval, self.start = interval, start
        self.total_steps = total_steps

    @property
    def total_steps(self) -> int | None:
        """The training's length in optimizer steps (``SAMMixin`` sets it from the Trainer for a fractional start)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"Invalid total_steps: {value!r}. The training's length in optimizer steps, >= 1.")
        self._total_steps = value

    def first(self) -> int:
        """The first step that ascends."""
        if isinstance(self.start, int):
            return self.start
        if self.total_steps is None:
            raise ValueError(
                f"start={self.start} is a fraction of the training's length: pass total_steps=... to SAM (SAMMixin "
                "sets it from the Trainer), or give start as a step number."
            )
        return int(self.start * self.total_steps)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 0, steps taken) ascends."""
        first = self.first()
        return step >= first and (step - first) % self.interval == 0


@dataclass(eq=False)
class Group:
    """One parameter group's parameters that have a gradient, those gradients, and its foreach choice."""

    options: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    foreach: bool


@dataclass(eq=False)
class Ascent:
    """What one group ascends along: ``w += radius · T² d / ‖T d‖`` (the norm over every group's ``d``).

    ``scratch``: the directions are the policy's own buffers for this step (their NaN and
    infinite entries may be zeroed in place); ``finite``: they are known to be finite
    (committed state, e.g. a momentum). The gradients themselves are zeroed in place only
    when the driver hands them over.
    """

    group: Group
    params: list[Tensor]
    directions: list[Tensor]
    radius: float
    scratch: bool = False
    finite: bool = False


@dataclass(eq=False)
class StepContext:
    """Everything that lives within one optimizer step; a new step starts from a fresh one.

    Written by the optimizer (and by ``descent``); what ``commit`` reads. Tensors are never
    read on the host except by the optimizer's one verdict.
    """

    step: int  # the optimizer steps taken before this one
    ascending: bool  # whether the step perturbs the weights (two passes, or MSAM's one)
    grad_scale: Tensor | None = None  # the GradScaler's scale (the factor .grad carries until unscaled); None: none
    nonfinite: NonFinite = "skip"  # without a GradScaler: skip a non-finite step with a warning, or raise
    micro_batches: int = 0  # the micro-batches (passes) completed so far
    finite: Tensor | None = None  # whether every completed micro-batch's first pass was finite (None: none had one)
    carried: bool = False  # the first passes' finiteness is in the gradients too (their second loss made NaN)
    pass_finite: Tensor | None = None  # this micro-batch's first pass
    perturbed: list[tuple[list[Tensor], list[Tensor], bool]] | None = None  # (params, saved weights, foreach)
    kept: dict[Tensor, Tensor] = field(default_factory=dict)  # first gradients, summed over completed micro-batches
    pending: dict[Tensor, Tensor] = field(default_factory=dict)  # this micro-batch's first gradients
    descended: bool = False  # descent has run (finalize_gradient, before clipping)
    descent_finite: Tensor | None = None  # what descent knows of the direction's finiteness
    outcome: dict[str, Any] = field(default_factory=dict)  # what descent computed for commit
    grads_seen: list[tuple[Any, int] | None] | None = None  # the gradients as the last micro-batch left them
    verdict: bool | None = None  # a one-pass step's verdict, read with its decision (decides_after_first_pass)

    def carry(self, loss: Tensor) -> Tensor:
        """The second pass's loss, made NaN when this micro-batch's first pass was not finite (no host sync).

        The NaN reaches every rank through DDP's all-reduce and a GradScaler's check, so
        that they skip the step together.
        """
        if self.pass_finite is None:
            return loss
        self.carried = True
        return loss * torch.where(self.pass_finite.to(loss.device), 1.0, torch.nan).to(loss.dtype)


def groups_with_grads(param_groups: Iterable[dict[str, Any]]) -> list[Group]:
    """Each group that has gradients: its parameters that have one, those gradients, and foreach or not."""
    groups = []
    for options in param_groups:
        params = [p for p in options["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise ValueError(
                "SAM got a sparse gradient (e.g. from nn.Embedding(sparse=True)); its norm and perturbation need "
                "dense gradients. Build the layer with sparse=False."
            )
        if params:
            groups.append(Group(options, params, grads, _resolve_foreach(params, options.get("foreach"))))
    return groups


class Policy:
    """SAM's own choices (Foret et al. 2021; ASAM where a group sets ``adaptive``): the interface of every variant.

    Attributes:
        needs_global_ascent: The policy's state or update uses the first pass's gradient, so
            it must be the same on every rank: under DDP the first pass is all-reduced.
        keeps_first_gradient: The optimizer keeps the first passes' gradient (summed over
            micro-batches, unscaled, in at least float32) in ``StepContext.kept``.
        pre_forward: The ascent needs no gradient (MSAM): a one-pass loop perturbs before
            its forward.
        decides_after_first_pass: Whether a step ascends depends on its first pass's
            gradient (AE-SAM): ``ascends`` says it may, and ``decision`` decides, once per
            optimizer step (at its first micro-batch), before any weight moves.
        chooses_passes: The policy picks per step whether it takes a second pass (AE-SAM,
            RST), which ``first_step``/``second_step`` (always two passes) cannot follow.
        state: Per parameter, what the policy keeps across steps (``commit`` writes it; a
            plain dict: reading an entry never creates one).

    Examples:
        >>> import torch
        >>> from lightning_sam import SAM
        >>> opt = SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, interval=2)
        >>> [opt.policy.ascends(n, opt) for n in range(4)]
        [True, False, True, False]
    """

    needs_global_ascent: ClassVar[bool] = False
    keeps_first_gradient: ClassVar[bool] = False
    pre_forward: ClassVar[bool] = False
    decides_after_first_pass: ClassVar[bool] = False
    chooses_passes: ClassVar[bool] = False

    def __init__(self) -> None:
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def ascends(self, step: int, optimizer: SAM) -> bool:
        """Whether step ``step`` perturbs the weights; decided before its first forward."""
        return optimizer.schedule.due(step)

    def decision(self, ctx: StepContext, optimizer: SAM) -> tuple[Tensor, Tensor]:
        """After the first pass (its gradient in ``.grad``): whether it is finite, and whether the step ascends.

        Both are 0-dim bool tensors, the same on every rank (computed from what every rank
        shares); called by ``decides_after_first_pass`` policies only, and may write ``ctx``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not decide after the first pass.")

    def length_needed(self, optimizer: SAM) -> str | None:
        """What needs the training's length (``total_steps``), as the error asking for it names it; None: nothing."""
        return "SAM(start=<fraction>)" if isinstance(optimizer.schedule.start, float) else None

    def radius(self, options: dict[str, Any]) -> float:
        """A group's radius for this step."""
        return float(options["rho"])

    def ascent(self, ctx: StepContext, optimizer: SAM) -> list[Ascent]:
        """What each group ascends along: SAM's gradient at ``w``."""
        return [Ascent(g, g.params, g.grads, self.radius(g.options)) for g in groups_with_grads(optimizer.param_groups)]

    def descent(self, ctx: StepContext, optimizer: SAM, grad_scale: Tensor | None) -> Tensor | None:
        """Turn ``.grad`` (carrying the factor ``grad_scale``; None: 1) into the step's direction.

        Returns:
            None, or a 0-dim bool tensor: whether every gradient the base optimizer will
            step with is finite, when the policy knows it from what it computed (the verdict
            then spares a read of the gradients).
        """
        return None

    def commit(self, ctx: StepContext, optimizer: SAM) -> None:
        """After the base optimizer stepped: change the persistent state (and nothing before this)."""

    def ensure_state(self, params: list[Tensor]) -> None:
        """Create the per-parameter entries a checkpoint holds, where missing, as "nothing yet" (commit calls it).

        torch's distributed checkpoint builds a fresh optimizer's state the same way, with a
        step of zero gradients at learning rate 0 that ``SAM.step`` turns into this call.
        """

    def setup_group(self, options: dict[str, Any]) -> None:
        """A parameter group's keys of the policy, where missing (a new group, a state dict of another method)."""

    def state_names(self) -> tuple[str, ...]:
        """The names of the per-parameter entries of ``state``."""
        return ()


def first_and_second(ctx: StepContext, optimizer: SAM) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """Every parameter with a kept first gradient or a second one (``.grad``), with both (None: that one is 0).

    The whole vectors of the papers: a parameter that one pass did not reach (a branch, a
    task head) counts with a zero gradient there.
    """
    params = list(ctx.kept)
    seen = set(params)
    params += [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None and p not in seen]
    return params, [ctx.kept.get(p) for p in params], [p.grad for p in params]


def present(values: Sequence[Tensor | None], where: Iterable[int]) -> list[Tensor]:
    """The values at the indices ``where`` (chosen where they are not None)."""
    return [v for v in (values[i] for i in where) if v is not None]


def guarded_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 0 where that is not finite (a zero denominator): no epsilon, no host sync."""
    ratio = numerator / denominator
    return torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))


def is_number(value: Any, *, integer: bool = False) -> bool:
    """A finite int or float (an int alone with ``integer``), not a bool."""
    kind = int if integer else (int, float)
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


def check_number(
    name: str, value: Any, low: float, high: float = math.inf, *, integer: bool = False, hint: str
) -> None:
    """Raise ``ValueError`` naming ``name`` and the fix unless ``value`` is a finite number in ``[low, high]``."""
    if not (is_number(value, integer=integer) and low <= value <= high):
        raise ValueError(f"Invalid {name}: {value!r}. {hint}")


def zeros_like_param(p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A zero tensor shaped like ``p`` (a DTensor sharded like it, for a DTensor), in at least float32."""
    (local,) = _locals([p])
    return like_param(p, torch.zeros_like(local, dtype=dtype or torch.promote_types(local.dtype, torch.float32)))
