"""`GSAM` (Zhuang et al. 2022): SAM whose update also descends the surrogate gap."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_sam.functional import add_scaled_, dot, like_param, mul_
from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import Policy, StepContext, check_number, first_and_second, guarded_ratio, present

__all__ = ["GSAM", "GSAMPolicy"]


class GSAMPolicy(Policy):
    r"""GSAM's choices: descend ``∇f_p − alpha · ∇f_⊥``; optionally ``rho`` tied to the learning rate.

    ``∇f_⊥ = ∇f − (⟨∇f, ∇f_p⟩ / ‖∇f_p‖²) ∇f_p`` over the whole gradient (a parameter that a
    pass did not reach counts as 0 there). Saved: each group's ``gsam_lr_max``.
    """

    needs_global_ascent = True
    keeps_first_gradient = True

    def __init__(self, alpha: float, rho_min: float | None, lr_min: float) -> None:
        super().__init__()
        self.alpha, self.rho_min, self.lr_min = alpha, rho_min, lr_min

    def radius(self, options: dict[str, Any]) -> float:  # noqa: D102
        if self.rho_min is None:
            return float(options["rho"])
        span = _lr_max(options) - self.lr_min
        fraction = (float(options["lr"]) - self.lr_min) / span if span > 0 else 1.0
        return float(self.rho_min + (options["rho"] - self.rho_min) * min(max(fraction, 0.0), 1.0))

    @torch.no_grad()
    def descent(self, ctx: StepContext, optimizer: SAM, grad_scale: Tensor | None) -> Tensor | None:  # noqa: D102
        if not (ctx.ascending and ctx.kept):
            return None
        params, firsts, seconds = first_and_second(ctx, optimizer)
        first = [i for i, g in enumerate(firsts) if g is not None]
        second = [i for i, s in enumerate(seconds) if s is not None]
        both = [i for i in first if seconds[i] is not None]
        g_gp = optimizer.sum_over_shards(dot(present(firsts, both), present(seconds, both), like=present(params, both)))
        gp_gp = optimizer.sum_over_shards(
            dot(present(seconds, second), present(seconds, second), like=present(params, second))
        )
        c = guarded_ratio(g_gp, gp_gp)  # ∇f_p carries grad_scale, the kept ∇f does not
        scale = grad_scale if grad_scale is not None else torch.ones((), device=c.device)
        # ∇f_p − alpha·scale·(∇f − c·∇f_p) = (1 + alpha·scale·c)·∇f_p − alpha·scale·∇f, in two passes
        mul_(present(seconds, second), 1 + self.alpha * scale * c)
        for i in sorted(set(first) - set(both)):  # no ∇f_p there: the direction is −alpha·scale·∇f
            p, g = params[i], firsts[i]
            p.grad = like_param(p, torch.zeros(g.shape, dtype=p.dtype, device=g.device))  # type: ignore[union-attr]
        add_scaled_(present([p.grad for p in params], first), present(firsts, first), -self.alpha * scale)
        return torch.isfinite(g_gp) & torch.isfinite(gp_gp) if len(both) == len(params) else None

    def setup_group(self, options: dict[str, Any]) -> None:  # noqa: D102
        options.setdefault("gsam_lr_max", _lr_max(options))


def _lr_max(options: dict[str, Any]) -> float:
    return float(options.get("gsam_lr_max", options.get("initial_lr", options["lr"])))


class GSAM(SAM):
    r"""GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

    A SAM step whose update also descends the surrogate gap: with ``∇f`` the gradient at
    ``w`` and ``∇f_p`` the one at ``w + e``, the base optimizer steps with
    ``∇f_p − alpha · ∇f_⊥``, where ``∇f_⊥ = ∇f − (⟨∇f, ∇f_p⟩ / ‖∇f_p‖²) ∇f_p`` is the
    part of ``∇f`` orthogonal to ``∇f_p``. Optionally ``rho`` follows the learning rate,
    as in the paper: ``rho_t = rho_min + (rho − rho_min)(lr_t − lr_min)/(lr_max − lr_min)``
    with ``lr_max`` each group's learning rate when it joined the optimizer (for a state
    dict of another method: its ``initial_lr``, which a scheduler sets, else its ``lr``).

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM` (the largest ``rho`` when ``rho_min`` is set).
        alpha: The weight of the surrogate gap's descent (the paper's range 0.01-0.3).
        rho_min: Tie ``rho`` to the learning rate, down to ``rho_min`` at ``lr_min``.
        lr_min: The learning rate at which ``rho`` reaches ``rho_min``.
        **kwargs: The other arguments of `SAM` (``interval`` and ``start`` too: the other
            steps are the base optimizer's) and those of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import GSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> loss = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> opt.step()
        >>> sorted(step.stats)
        ['first_order_sharpness', 'grad_norm', 'loss', 'perturbed_loss']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_number("alpha", alpha, 0.0, hint="The weight of the surrogate gap's descent: a number >= 0 (try 0.1).")
        if rho_min is not None:
            check_number("rho_min", rho_min, 0.0, rho, hint="The smallest rho: a number in [0, rho].")
        check_number("lr_min", lr_min, 0.0, hint="The learning rate at which rho reaches rho_min: a number >= 0.")
        super().__init__(params, base_optimizer, rho=rho, policy=GSAMPolicy(alpha, rho_min, lr_min), **kwargs)
