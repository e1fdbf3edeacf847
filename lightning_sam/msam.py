"""`MSAM` (Becker et al. 2024): one pass per step, at a point along the base optimizer's momentum."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_sam.functional import _resolve_foreach
from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import Ascent, Group, Policy, StepContext

__all__ = ["MSAM", "MSAMPolicy"]


class MSAMPolicy(Policy):
    """MSAM's choices: the ascent needs no gradient (``pre_forward``): ``w − rho · v / ‖v‖``, ``v`` the momentum.

    A step ascends once the base optimizer has a momentum (SGD's ``momentum_buffer``,
    Adam's ``exp_avg``) and the schedule says so; the first step is the base optimizer's.
    """

    pre_forward = True

    def ascends(self, step: int, optimizer: SAM) -> bool:  # noqa: D102
        return super().ascends(step, optimizer) and any(
            _momentum(optimizer.state.get(p, {})) is not None
            for group in optimizer.param_groups
            for p in group["params"]
        )

    def ascent(self, ctx: StepContext, optimizer: SAM) -> list[Ascent]:  # noqa: D102
        ascents = []
        for options in optimizer.param_groups:
            params = [p for p in options["params"] if _momentum(optimizer.state.get(p, {})) is not None]
            if params:
                group = Group(options, params, [], _resolve_foreach(params, options.get("foreach")))
                momenta = [_momentum(optimizer.state.get(p, {})) for p in params]
                ascents.append(Ascent(group, params, momenta, -self.radius(options), finite=True))  # type: ignore[arg-type]
        return ascents


def _momentum(state: dict[str, Any]) -> Tensor | None:
    momentum: Tensor | None = state.get("momentum_buffer", state.get("exp_avg"))
    return momentum


class MSAM(SAM):
    r"""Momentum-SAM (Becker et al. 2024, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead").

    Before the forward the weights move to ``w − rho · v / ‖v‖``, where ``v`` is the base
    optimizer's momentum (SGD's momentum buffer, Adam's first moment); the gradient is
    taken there, the weights go back to ``w`` (bitwise, from a copy) and the base
    optimizer steps with that gradient. The first step, with no momentum yet, is the base
    optimizer's. It is the same method on every path: ``step(closure)`` runs it with the
    closure's pass, [`SAMStep.run`][lightning_sam.SAMStep.run] with one pass; under
    ``SAMMixin`` the pass at the moved point runs inside ``backward`` (one extra forward,
    so that no hook, callback or checkpoint ever sees moved weights); ``first_step`` and
    ``second_step`` (an ascent along a gradient) refuse it.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: SGD with ``momentum > 0``, or an optimizer that keeps ``exp_avg``
            (Adam, AdamW, NAdam, RAdam...).
        rho: The radius (the authors' default for SGD, 0.3).
        **kwargs: The other arguments of `SAM` (``interval`` and ``start`` too) and those
            of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import MSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))  # one pass
        ...     opt.step()
        ...     opt.zero_grad()
        >>> step.ascending, opt.steps_taken
        (True, 3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.3,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, policy=MSAMPolicy(), **kwargs)
        if isinstance(self.base_optimizer, torch.optim.SGD) and not all(g["momentum"] for g in self.param_groups):
            raise ValueError("MSAM perturbs along SGD's momentum: pass momentum > 0 (e.g. momentum=0.9).")
