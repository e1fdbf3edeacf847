"""What an optimizer's step does to sharpness: its preconditioner and its edge of stability.

Near a minimum, with the loss close to quadratic with Hessian ``H``, an optimizer's update
is ``w ← w − S·m`` with ``m`` a momentum (or plain) average of the gradients and ``S`` a
positive diagonal: ``lr`` for SGD, ``lr·P⁻¹`` for the adaptive methods, whose
preconditioner ``P`` is read from their state. The iteration is stable exactly while
``λ_max(S H)`` stays below a constant ``c`` set by the momentum. ``eos_ratio`` is
``λ_max(S H)/c``: training at the edge of stability (Cohen et al. 2021, 2022) hovers at 1.

| optimizer | ``S`` | ``c`` |
|---|---|---|
| SGD, momentum ``β``, dampening ``τ`` | ``lr·(1 − τ)`` (``lr`` without momentum) | ``2 + 2β`` |
| SGD with Nesterov momentum ``β`` | ``lr`` | ``(2 + 2β)/(1 + 2β)`` |
| Adam, AdamW (``β1``, ``β2``, step ``t``)| ``lr·P⁻¹``, ``P = (1 − β1ᵗ)(√(v/(1 − β2ᵗ)) + ε)`` | ``(2 + 2β1)/(1 − β1)`` |
| RMSprop, momentum ``μ`` | ``lr·P⁻¹``, ``P = √v + ε`` (``√(v − ḡ²) + ε`` centered) | ``2 + 2μ`` |
| Adagrad | ``lr_t·P⁻¹``, ``P = √(Σg²) + ε``, ``lr_t = lr/(1 + (t − 1)·lr_decay)`` | ``2`` |

For one learning rate this is the threshold of Cohen et al.: ``λ_max(H) < (2 + 2β)/lr``
for SGD, ``λ_max(P⁻¹H) < (2 + 2β1)/((1 − β1)·lr)`` for Adam. Parameter groups with
different learning rates enter ``S`` each with its own; groups with different momenta have
no common ``c`` and are refused. Weight decay is not part of ``H`` (the Hessian is the
loss's). SAM and its variants step with their base optimizer's rule. No Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sam.optimizer import SAM

__all__ = ["NoStateYet", "StepRule", "base_of", "step_rule"]


class NoStateYet(ValueError):
    """The optimizer has not stepped yet, so its preconditioner does not exist."""


@dataclass(frozen=True)
class StepRule:
    """An optimizer's step near a minimum: ``w ← w − S·m``, stable while ``λ_max(S H) < edge``.

    Attributes:
        preconditioner: ``P`` per parameter (None for SGD, whose ``P`` is the identity);
            ``inf`` for parameters the optimizer does not hold or has no state for (they do not move).
        step_preconditioner: ``S⁻¹`` per parameter (``P/lr``), what ``hessian_top_eigs``
            takes to return the eigenvalues of ``S H``.
        edge: The constant ``c``.
        lr: The one (effective) learning rate when every measured parameter moves with it (``S = lr·P⁻¹``),
            else None.
    """

    preconditioner: list[Tensor] | None
    step_preconditioner: list[Tensor]
    edge: float
    lr: float | None


def base_of(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps: a SAM's base optimizer, else the optimizer itself."""
    return optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer


def _uniform(name: str, values: list[float], what: str) -> float:
    if len(set(values)) > 1:
        raise ValueError(
            f"the parameter groups have different {what} ({sorted(set(values))}), so there is no single edge of "
            f"stability; use one {name} for all groups to get eos_ratio."
        )
    return values[0]


def _step_count(state: dict[str, Any]) -> float:
    return float(state["step"])


def _adam_p(group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    beta1, beta2 = group["betas"]
    t = _step_count(state)
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    p: Tensor = (1 - beta1**t) * ((v.to(_wide(v)) / (1 - beta2**t)).sqrt() + group["eps"])
    return p


def _rmsprop_p(group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    v = state["square_avg"].to(_wide(state["square_avg"]))
    if group.get("centered"):
        v = v - state["grad_avg"].to(v.dtype).square()
    p: Tensor = v.sqrt() + group["eps"]
    return p


def _adagrad_p(group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    p: Tensor = state["sum"].to(_wide(state["sum"])).sqrt() + group["eps"]
    return p


_PRECONDITIONED = {
    torch.optim.Adam: _adam_p,
    torch.optim.AdamW: _adam_p,
    torch.optim.RMSprop: _rmsprop_p,
    torch.optim.Adagrad: _adagrad_p,
}


def _edge_and_lr(base: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[float, float]:
    """The group's ``c`` and effective learning rate."""
    lr = float(group["lr"])
    if isinstance(base, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        if group.get("nesterov"):
            return (2 + 2 * beta) / (1 + 2 * beta), lr
        return 2 + 2 * beta, lr * (1 - float(group.get("dampening", 0.0))) if beta else lr
    if isinstance(base, torch.optim.Adam | torch.optim.AdamW):
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / (1 - beta1), lr
    if isinstance(base, torch.optim.RMSprop):
        return 2 + 2 * float(group.get("momentum", 0.0)), lr
    if isinstance(base, torch.optim.Adagrad):
        steps = [_step_count(base.state[p]) for p in group["params"] if p in base.state]
        t = max(steps, default=1.0)
        return 2.0, lr / (1 + (t - 1) * float(group.get("lr_decay", 0.0)))
    raise ValueError(
        f"the edge of stability is defined here for SGD, Adam, AdamW, RMSprop and Adagrad (and SAM over them), "
        f"not for {type(base).__name__}."
    )


def step_rule(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> StepRule:
    """Read ``P``, ``S`` and ``c`` for ``params`` from ``optimizer`` (a SAM's from its base optimizer).

    Args:
        optimizer: The training's optimizer.
        params: The parameters to measure over (those the optimizer does not hold get ``S = 0``).

    Returns:
        The ``StepRule``.

    Raises:
        NoStateYet: An adaptive optimizer with no state for any of ``params`` (before its first step).
        ValueError: An optimizer without a rule here, or groups with different momenta.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> rule = step_rule(torch.optim.SGD([w], lr=0.1, momentum=0.9), [w])
        >>> round(rule.edge, 6), rule.lr, rule.preconditioner is None
        (3.8, 0.1, True)
    """
    base = base_of(optimizer)
    groups = [g for g in base.param_groups if g["params"]]
    edges_lrs = [_edge_and_lr(base, g) for g in groups]
    edge = _uniform("momentum", [round(e, 12) for e, _ in edges_lrs], "momenta (so different edges)")
    lr_of = {p: lr for g, (_, lr) in zip(groups, edges_lrs, strict=True) for p in g["params"]}
    group_of = {p: g for g in groups for p in g["params"]}
    p_of = _PRECONDITIONED.get(type(base))
    if p_of is None and not isinstance(base, torch.optim.SGD):
        p_of = next((f for cls, f in _PRECONDITIONED.items() if isinstance(base, cls)), None)
    # Parameters the optimizer does not hold, or holds without state (no gradient yet: unused ones), do not move.
    moving = [p in group_of and bool(base.state.get(p)) for p in params] if p_of else [p in group_of for p in params]
    if p_of is not None and not any(moving):
        raise NoStateYet(f"{type(base).__name__} has not stepped yet: its preconditioner is not there.")

    def still(p: Tensor) -> Tensor:
        return torch.full_like(p, torch.inf, dtype=_wide(p))

    preconditioner = (
        None
        if p_of is None
        else [p_of(group_of[p], base.state[p]) if m else still(p) for p, m in zip(params, moving, strict=True)]
    )
    step_preconditioner = [
        (torch.ones_like(p, dtype=_wide(p)) if preconditioner is None else preconditioner[i]) / lr_of[p]
        if m
        else still(p)
        for i, (p, m) in enumerate(zip(params, moving, strict=True))
    ]
    lrs = {lr_of[p] for p, m in zip(params, moving, strict=True) if m}
    # One lr for S = lr·P⁻¹ only when every measured parameter moves with it (else S has zeros the Hessian lacks).
    uniform = lrs.pop() if len(lrs) == 1 and all(moving) else None
    return StepRule(preconditioner, step_preconditioner, float(edge), uniform)


def _wide(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors: what P and S are computed in."""
    return torch.promote_types(t.dtype, torch.float32)
