"""`FriendlySAM` (Li et al. 2024): SAM's ascent without the full-gradient component (a moving average)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_sam.functional import add_scaled_, copy_scaled_, lerp_, like_param, mul_, sub_into_
from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import Ascent, Policy, StepContext, check_number, groups_with_grads, zeros_like_param

__all__ = ["FriendlySAM", "FriendlySAMPolicy"]


class FriendlySAMPolicy(Policy):
    r"""FriendlySAM's choices: ascend along ``g − sigma · m``; commit ``m ← lmbda · m + (1 − lmbda) · g``.

    ``m`` is the moving average of the first passes' gradients, updated once per step that
    ascends, from the window's gradient (with accumulation: the mean of its micro-batches'
    first gradients, in the units each micro-batch's gradient has). A group's first update
    sets ``m = g`` (a parameter that the group's earlier steps did not reach starts from 0).
    Saved: ``fsam_m`` per parameter and each group's ``fsam_updates``.
    """

    needs_global_ascent = True
    keeps_first_gradient = True

    def __init__(self, sigma: float, lmbda: float) -> None:
        super().__init__()
        self.sigma, self.lmbda = sigma, lmbda

    def state_names(self) -> tuple[str, ...]:  # noqa: D102
        return ("fsam_m",)

    @torch.no_grad()
    def ascent(self, ctx: StepContext, optimizer: SAM) -> list[Ascent]:  # noqa: D102
        unscale = None if ctx.grad_scale is None else ctx.grad_scale.reciprocal()  # m is of unscaled gradients
        ascents = []
        for group in groups_with_grads(optimizer.param_groups):
            d = optimizer.protocol.buffers.get(group.params, "direction", wide=True)
            with_m = [i for i, p in enumerate(group.params) if p in self.state]
            m = [self.state[group.params[i]]["fsam_m"] for i in with_m]
            if unscale is None:  # d = g − sigma·m, one pass
                sub_into_([d[i] for i in with_m], [group.grads[i] for i in with_m], m, self.sigma)
                rest = sorted(set(range(len(d))) - set(with_m))
                copy_scaled_([d[i] for i in rest], [group.grads[i] for i in rest], None)
            else:
                copy_scaled_(d, group.grads, unscale, foreach=group.foreach)
                add_scaled_([d[i] for i in with_m], m, -self.sigma, foreach=group.foreach)
            directions = [like_param(p, x) for p, x in zip(group.params, d, strict=True)]  # summed over shards
            ascents.append(Ascent(group, group.params, directions, self.radius(group.options), scratch=True))
        return ascents

    @torch.no_grad()
    def commit(self, ctx: StepContext, optimizer: SAM) -> None:  # noqa: D102
        self.ensure_state([p for group in groups_with_grads(optimizer.param_groups) for p in group.params])
        if not (ctx.ascending and ctx.kept):
            return
        self.ensure_state(list(ctx.kept))
        for options in optimizer.param_groups:
            params = [p for p in options["params"] if p in ctx.kept]
            if not params:
                continue
            kept = [ctx.kept[p] for p in params]
            if ctx.micro_batches > 1:  # the mean of the window's first gradients (the context's own tensors)
                mul_(kept, 1.0 / ctx.micro_batches)
            weight = 1.0 - self.lmbda if options["fsam_updates"] else 1.0  # the group's first update sets m = g
            lerp_([self.state[p]["fsam_m"] for p in params], kept, weight)
            options["fsam_updates"] += 1

    def ensure_state(self, params: list[Tensor]) -> None:  # noqa: D102
        for p in params:
            if p not in self.state:
                self.state[p] = {"fsam_m": zeros_like_param(p)}

    def setup_group(self, options: dict[str, Any]) -> None:  # noqa: D102
        options.setdefault("fsam_updates", 0)


class FriendlySAM(SAM):
    r"""Friendly SAM (Li et al. 2024, "Friendly Sharpness-Aware Minimization").

    The ascent follows ``g − sigma · m`` instead of ``g``, where ``m`` is an exponential
    moving average of past gradients (``m ← lmbda · m + (1 − lmbda) · g``, after its use):
    the batch-specific part of the gradient, which is what SAM's generalization comes
    from, with the full-gradient part that hurts it taken out. With ``interval`` or
    ``start``, ``m`` moves on the steps that ascend.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        sigma: How much of the moving average to take out (the paper's 1).
        lmbda: The moving average's decay (the authors' code: 0.9; the paper's CIFAR runs
            0.6 to 0.95).
        **kwargs: The other arguments of `SAM` and those of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import FriendlySAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(2):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     opt.step()
        ...     opt.zero_grad()
        >>> "fsam_m" in opt.sam_state[model.weight]  # the moving average, saved in state_dict
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs: Any,
    ) -> None:
        check_number("sigma", sigma, 0.0, hint="How much of the moving average to take out: a number >= 0 (try 1.0).")
        check_number("lmbda", lmbda, 0.0, 1.0, hint="The moving average's decay: a number in [0, 1] (try 0.9).")
        super().__init__(params, base_optimizer, rho=rho, policy=FriendlySAMPolicy(sigma, lmbda), **kwargs)
