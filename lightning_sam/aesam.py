r"""`AESAM` and `AELookSAM` (Jiang et al. 2023): SAM only on the steps whose gradient norm is unusually large."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_sam.functional import grad_norm_squared
from lightning_sam.looksam import LookSAMPolicy
from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import Policy, StepContext, check_number, groups_with_grads

__all__ = ["AESAM", "AELookSAM", "AELookSAMPolicy", "AESAMPolicy"]

_STATE = ("aesam_mu", "aesam_sigma")


class AESAMPolicy(Policy):
    r"""AE-SAM's choice: a SAM step when ``‖g_t‖² ≥ mu_t + c_t · sigma_t``, else a one-pass (ERM) step.

    ``mu_t = delta · mu_{t-1} + (1 − delta) · ‖g_t‖²`` and
    ``sigma_t² = delta · sigma_{t-1}² + (1 − delta) · (‖g_t‖² − mu_t)²``, both from 0, updated
    on every step taken (in ``commit``) with the first pass's gradient ``g_t`` (unscaled,
    all-reduced under DDP: every rank decides alike); ``c_t = (t/T) · lambda1 + (1 − t/T) ·
    lambda2`` over the training's ``T`` steps. ``sigma`` is kept as a standard deviation
    (``hypot``), so that a finite ``‖g‖²`` never makes it overflow. Saved: ``aesam_mu`` and
    ``aesam_sigma`` per parameter (one 0-dim tensor that every entry shares).
    """

    decides_after_first_pass = True
    chooses_passes = True
    needs_global_ascent = True  # the decision needs the global ‖g‖²

    def __init__(self, delta: float, lambda1: float, lambda2: float) -> None:
        super().__init__()
        self.delta, self.lambda1, self.lambda2 = delta, lambda1, lambda2

    def state_names(self) -> tuple[str, ...]:  # noqa: D102
        return (*super().state_names(), *_STATE)

    def length_needed(self, optimizer: SAM) -> str | None:  # noqa: D102
        if self.lambda1 == self.lambda2:
            return None
        return (
            f"{type(optimizer).__name__}'s threshold schedule (from lambda2={self.lambda2} at the first step to "
            f"lambda1={self.lambda1} at the last)"
        )

    def ascends(self, step: int, optimizer: SAM) -> bool:
        """Every step may: ``decision`` decides after its first pass (the training's length must be known)."""
        needed = self.length_needed(optimizer)
        if needed is not None and optimizer.total_steps is None:
            raise ValueError(
                f"{needed} runs over the training: pass total_steps=<optimizer steps> to the optimizer (SAMMixin "
                "sets it from the Trainer), or lambda1 == lambda2 for a constant threshold."
            )
        return True

    def threshold(self, step: int, total_steps: int | None) -> float:
        """``c_t``: ``lambda2`` at the first step, ``lambda1`` at the last (and after it)."""
        fraction = min(step / total_steps, 1.0) if total_steps else 0.0
        return fraction * self.lambda1 + (1.0 - fraction) * self.lambda2

    @torch.no_grad()
    def decision(self, ctx: StepContext, optimizer: SAM) -> tuple[Tensor, Tensor]:  # noqa: D102
        squares = [
            grad_norm_squared(g.params, g.grads, foreach=g.foreach) for g in groups_with_grads(optimizer.param_groups)
        ]
        device = squares[0].device if squares else _device_of(optimizer)
        g2 = torch.stack([s.to(device) for s in squares]).sum() if squares else torch.zeros((), device=device)
        g2 = _agreed(optimizer.sum_over_shards(g2))  # every rank joins, with or without gradients
        if ctx.grad_scale is not None:
            g2 = g2 / (ctx.grad_scale * ctx.grad_scale)
        mu, sigma = self._statistics(g2)
        mu = self.delta * mu + (1 - self.delta) * g2
        sigma = torch.hypot(math.sqrt(self.delta) * sigma, math.sqrt(1 - self.delta) * (g2 - mu))
        ctx.outcome["aesam"] = (mu, sigma)
        return torch.isfinite(g2), g2 >= mu + self.threshold(ctx.step, optimizer.total_steps) * sigma

    def _statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The committed ``mu`` and ``sigma`` (0 before the first step)."""
        for entries in self.state.values():
            if _STATE[0] in entries:
                return entries[_STATE[0]], entries[_STATE[1]]
        # Two tensors: a distributed checkpoint loads in place, and one tensor for both would end up holding sigma
        return torch.zeros((), dtype=like.dtype, device=like.device), torch.zeros(
            (), dtype=like.dtype, device=like.device
        )

    @torch.no_grad()
    def commit(self, ctx: StepContext, optimizer: SAM) -> None:  # noqa: D102
        super().commit(ctx, optimizer)
        self.ensure_state([p for group in groups_with_grads(optimizer.param_groups) for p in group.params])
        outcome = ctx.outcome.get("aesam")
        if outcome is not None:
            for entries in self.state.values():
                entries[_STATE[0]], entries[_STATE[1]] = outcome

    def ensure_state(self, params: list[Tensor]) -> None:  # noqa: D102
        super().ensure_state(params)
        missing = [p for p in params if _STATE[0] not in self.state.get(p, {})]
        if missing:
            mu, sigma = self._statistics(torch.zeros((), device=missing[0].device))
            for p in missing:
                self.state.setdefault(p, {}).update({_STATE[0]: mu, _STATE[1]: sigma})


def _device_of(optimizer: SAM) -> torch.device:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return params[0].device if params else torch.device("cpu")


def _agreed(g2: Tensor) -> Tensor:
    """``‖g‖²`` the same on every rank: the largest rank's.

    DDP's synced first pass makes them equal already; a plain loop's ``no_sync`` micro-batch
    does not, and ranks that decided apart would wait for each other's passes.
    """
    if isinstance(g2, DTensor):  # sharded parameters: the global sum, the same on every rank
        return g2.full_tensor()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        g2 = g2.clone()
        dist.all_reduce(g2, op=dist.ReduceOp.MAX)
    return g2


class AELookSAMPolicy(AESAMPolicy, LookSAMPolicy):
    """AE-SAM's decision with LookSAM's reuse: a SAM step keeps ``g_v``, a one-pass step adds it to ``g``."""

    def __init__(self, alpha: float, delta: float, lambda1: float, lambda2: float) -> None:
        LookSAMPolicy.__init__(self, alpha)
        self.delta, self.lambda1, self.lambda2 = delta, lambda1, lambda2


def _check(delta: float, lambda1: float, lambda2: float, kwargs: dict[str, Any], name: str) -> None:
    check_number("delta", delta, 0.0, 1.0, hint="The moving averages' decay: a number in (0, 1) (the paper's 0.9).")
    if delta in (0.0, 1.0):
        why = "never move" if delta == 1.0 else "be the last step's alone, and the trigger always fire"
        raise ValueError(f"Invalid delta: {delta}. The moving averages would {why}: pass a number in (0, 1) (0.9).")
    for key, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        check_number(key, value, -math.inf, hint="A threshold, in standard deviations: a number (the paper's -1, 1).")
    for key in ("interval", "start"):
        if key in kwargs:
            raise ValueError(
                f"{name} takes no {key}: its trigger decides at every step whether to ascend. Remove {key}=..."
            )


class AESAM(SAM):
    r"""AE-SAM (Jiang, Yang, Zhang, Kwok, ICLR 2023, "An Adaptive Policy to Employ Sharpness-Aware Minimization").

    Each step takes its first pass at ``w``; when the squared norm of that gradient is
    large against its recent history, ``‖g_t‖² ≥ mu_t + c_t · sigma_t``, the step is a SAM
    step (the ascent along ``g_t`` and a second pass at ``w + e``), otherwise the base
    optimizer steps with ``g_t`` (one pass). ``mu_t`` and ``sigma_t²`` are exponential
    moving averages (factor ``delta``) of ``‖g‖²`` and of its squared deviation, taken on
    every step including this one; ``c_t = (t/T) · lambda1 + (1 − t/T) · lambda2`` moves
    linearly from ``lambda2`` at the first step to ``lambda1`` at the last of the ``T =
    total_steps`` steps. With ``‖g‖²`` roughly normal, ``c = 0`` is SAM on about half the
    steps, and the defaults run from about 16% at the start to about 84% at the end.

    The decision is read on the host once per step, with the first pass's finiteness in the
    same read; a one-pass step then needs no other (a SAM step reads its verdict too,
    unless a GradScaler judges). Every rank takes the same decision (the first pass is
    all-reduced under DDP). With gradient accumulation the decision is the window's first
    micro-batch's, from its own gradient, and the window's other micro-batches follow it:
    the window's whole gradient exists only after every first pass, and a second pass
    cannot wait for it. [`SAM.sam_fraction`][lightning_sam.SAM.sam_fraction] says how often
    SAM ran.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        delta: The moving averages' decay, in ``[0, 1)``.
        lambda1: The threshold ``c_t`` at the end of the training, in standard deviations.
        lambda2: The threshold ``c_t`` at its start (``lambda1 == lambda2``: a constant
            threshold, and no ``total_steps`` needed).
        **kwargs: The other arguments of `SAM` (``total_steps``: ``T``, which ``SAMMixin``
            sets from the Trainer; not ``interval`` nor ``start``) and those of the base.

    The rule follows the paper's Algorithm 1 (checked against a third-party transcription
    of it); the defaults ``delta=0.9, lambda1=-1, lambda2=1`` are our reading of the
    paper's experiments, which could not be checked here (on the demo's task they give
    about 47% SAM steps), so treat them as a starting point. On a one-pass step the
    gradient's finiteness is judged with the decision, before ``on_before_optimizer_step``
    and clipping (which keep finite gradients finite); and the first pass's backward is
    SAM's own, as on SAM steps, not a ``LightningModule.backward`` override. The paper starts ``sigma²`` at a tiny
    positive number; here it starts at 0, which keeps the run independent of the loss's
    scale.

    Examples:
        >>> import torch
        >>> from lightning_sam import AESAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AESAM(model.parameters(), torch.optim.SGD, rho=0.05, total_steps=6, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> passes = []
        >>> for _ in range(6):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     passes.append(2 if step.ascending else 1)
        ...     opt.step()
        ...     opt.zero_grad()
        >>> passes[0], opt.ascents_taken == passes.count(2), opt.steps_taken
        (2, True, 6)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        **kwargs: Any,
    ) -> None:
        _check(delta, lambda1, lambda2, kwargs, "AESAM")
        super().__init__(params, base_optimizer, rho=rho, policy=AESAMPolicy(delta, lambda1, lambda2), **kwargs)


class AELookSAM(SAM):
    r"""AE-LookSAM (Jiang et al. 2023): AE-SAM's decision, with LookSAM's reuse on the one-pass steps.

    A step that the trigger makes a SAM step also keeps ``g_v``, the part of the SAM
    gradient orthogonal to ``g``; a one-pass step steps with
    ``g + alpha · (‖g‖ / ‖g_v‖) · g_v`` (Liu et al. 2022; see
    [`LookSAM`][lightning_sam.LookSAM]), or with ``g`` before the first SAM step.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        alpha: The weight of the kept direction (LookSAM's 0.7).
        delta: As for [`AESAM`][lightning_sam.AESAM].
        lambda1: As for `AESAM`.
        lambda2: As for `AESAM`.
        **kwargs: As for `AESAM`.

    Examples:
        >>> import torch
        >>> from lightning_sam import AELookSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AELookSAM(model.parameters(), torch.optim.SGD, rho=0.05, total_steps=4, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(4):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     opt.step()
        ...     opt.zero_grad()
        >>> sorted(opt.sam_state[model.weight])
        ['aesam_mu', 'aesam_sigma', 'looksam_gv', 'looksam_gv_norm']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        alpha: float = 0.7,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        **kwargs: Any,
    ) -> None:
        _check(delta, lambda1, lambda2, kwargs, "AELookSAM")
        check_number("alpha", alpha, 0.0, hint="The weight of the kept direction: a number >= 0 (LookSAM's 0.7).")
        policy = AELookSAMPolicy(alpha, delta, lambda1, lambda2)
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
