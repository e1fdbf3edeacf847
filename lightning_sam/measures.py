"""The measures of [`SharpnessMonitor`][lightning_sam.SharpnessMonitor]: one registry from name to estimator.

Adding a measure is one entry in ``MEASURES``. A measure is either *per step* (computed
on the Trainer's logging steps from the batch just trained on, right before the optimizer
steps) or *scheduled* (every ``every_n_steps`` optimizer steps and at the end of
training, on the monitor's fixed batch, in eval mode). The estimators are the pure
functions of [`lightning_sam.sharpness`][lightning_sam.sharpness]; nothing here imports
Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sam import sharpness
from lightning_sam.functional import grad_norm_squared, perturb_, restore_
from lightning_sam.hessian import TopEigenpairs
from lightning_sam.stability import NoStateYet, StepRule, step_rule

__all__ = ["MEASURES", "PER_MODULE_MEASURES", "FixedBatch", "Measure", "NotThisStep", "TrainingStep", "Unavailable"]

LossFn = Callable[[], Tensor]


class Unavailable(Exception):
    """A measure that cannot be computed for this run (the message says why); it is skipped with one warning."""


class NotThisStep(Exception):
    """A measure that this step does not have (a one-pass step has no first_order); skipped without a word."""


@dataclass
class TrainingStep:
    """What a per-step measure gets: the batch just trained on, before the optimizer steps."""

    params: list[Tensor]
    grads: list[Tensor]
    loss_fn: LossFn  # the batch's loss at the current weights, with the training step's random state
    sam_stats: dict[str, Tensor] | None  # a SAMMixin module's own numbers for this step, else None
    rho: float


@dataclass
class FixedBatch:
    """What a scheduled measure gets: the loss on the fixed batch (eval mode, float32) and the run's settings."""

    loss_fn: LossFn
    params: list[Tensor]
    generator: torch.Generator
    optimizer: torch.optim.Optimizer | None
    settings: Any  # the SharpnessMonitor: eig_iters, eig_tol, top_k, hvp, trace_samples, adaptive_rho, ...
    state: dict[str, Any]  # kept across calls and checkpoints (the warm-start eigenvectors)
    values: dict[str, Tensor] = field(default_factory=dict)  # measures computed earlier in this round


@dataclass(frozen=True)
class Measure:
    """One measure: how to compute it, and when.

    Attributes:
        estimate: Computes the value from a ``TrainingStep`` (per step) or a
            ``FixedBatch`` (scheduled): a tensor, or a dict of the measure's own key and
            more (its error bar); raises ``Unavailable`` when it cannot, ``NotThisStep``
            when it has nothing this time.
        per_step: Per step (True) or scheduled (False).
        summary: One line for the docs and error messages.
        sharded: Whether it works on sharded (DTensor) parameters, as FSDP2 and tensor
            parallelism make them; the others are skipped there, with one warning.
    """

    estimate: Callable[[Any], Tensor | dict[str, Tensor]]
    per_step: bool
    summary: str = ""
    sharded: bool = False


def _first_order(step: TrainingStep) -> Tensor:
    """``L(w + e) − L(w)`` with ``e = rho·g/‖g‖`` on the training batch; free from a SAM module's own step."""
    if step.sam_stats is not None:
        if "first_order_sharpness" not in step.sam_stats:
            raise NotThisStep  # a one-pass step of a variant: nothing to report, nothing to invent
        return step.sam_stats["first_order_sharpness"]
    if not step.params:
        raise Unavailable("no parameter has a gradient.")
    with torch.no_grad():
        before = step.loss_fn()
        norm = grad_norm_squared(step.params, step.grads).sqrt()
        backup = perturb_(step.params, step.grads, step.rho / (norm + 1e-12))
        try:
            after = step.loss_fn()
        finally:
            restore_(step.params, backup)
    return after - before


def _grad_norm(step: TrainingStep) -> Tensor:
    """``‖g‖`` of the gradient the optimizer steps with."""
    return grad_norm_squared(step.params, step.grads).sqrt()


def _top_eigs(batch: FixedBatch, k: int, key: str, preconditioner: list[Tensor] | None = None) -> TopEigenpairs:
    """Lanczos on the fixed batch, warm-started from (and saving) ``batch.state[key]``."""
    s = batch.settings
    top = sharpness.hessian_top_eigs(
        batch.loss_fn,
        batch.params,
        k,
        max_iters=max(s.eig_iters, k),
        tol=s.eig_tol,
        init=batch.state.get(key),
        preconditioner=preconditioner,
        hvp=s.hvp,
        generator=batch.generator,
    )
    batch.state[key] = top.eigenvectors
    return top


def _hessian_max_eig(batch: FixedBatch) -> dict[str, Tensor]:
    top = _top_eigs(batch, 1, "eigenvectors")
    return {"hessian_max_eig": top.eigenvalues[0], "hessian_max_eig_residual": top.residuals[0]}


def _hessian_top_eigs(batch: FixedBatch) -> dict[str, Tensor]:
    top = _top_eigs(batch, batch.settings.top_k, "top_eigenvectors")
    values = {f"hessian_eig_{i + 1}": v for i, v in enumerate(top.eigenvalues)}
    values.update({f"hessian_eig_{i + 1}_residual": r for i, r in enumerate(top.residuals)})
    return values


def _rule(batch: FixedBatch) -> StepRule:
    if batch.optimizer is None:
        raise Unavailable("the Trainer has no optimizer.")
    try:
        return step_rule(batch.optimizer, batch.params)
    except NoStateYet as why:
        raise NotThisStep from why
    except ValueError as why:
        raise Unavailable(str(why)) from why


def _preconditioned_max_eig(batch: FixedBatch) -> dict[str, Tensor]:
    rule = _rule(batch)
    if rule.preconditioner is None:
        raise Unavailable(
            "SGD has no preconditioner (it is the identity): its sharpness is hessian_max_eig. "
            "preconditioned_max_eig is for Adam, AdamW, RMSprop and Adagrad."
        )
    top = _top_eigs(batch, 1, "preconditioned_eigenvectors", rule.preconditioner)
    return {"preconditioned_max_eig": top.eigenvalues[0], "preconditioned_max_eig_residual": top.residuals[0]}


def _eos_ratio(batch: FixedBatch) -> Tensor | dict[str, Tensor]:
    """``λ_max(S H)/c``, reusing this round's ``λ_max(H)`` (SGD) or ``λ_max(P⁻¹H)`` when there is one learning rate."""
    rule = _rule(batch)
    measured = "hessian_max_eig" if rule.preconditioner is None else "preconditioned_max_eig"
    if rule.lr is not None and measured in batch.values:
        return batch.values[measured] * rule.lr / rule.edge  # its error bar is the eigenvalue's
    top = _top_eigs(batch, 1, "eos_eigenvectors", rule.step_preconditioner)
    return {"eos_ratio": top.eigenvalues[0] / rule.edge, "eos_ratio_residual": top.residuals[0]}


def _hessian_trace(batch: FixedBatch) -> dict[str, Tensor]:
    s = batch.settings
    trace, stderr = sharpness.hessian_trace(
        batch.loss_fn, batch.params, samples=s.trace_samples, hvp=s.hvp, generator=batch.generator
    )
    return {"hessian_trace": trace, "hessian_trace_stderr": stderr}


def _adaptive_avg(batch: FixedBatch) -> Tensor:
    s = batch.settings
    return sharpness.adaptive_sharpness_avg(
        batch.loss_fn, batch.params, rho=s.adaptive_rho, samples=s.adaptive_samples, generator=batch.generator
    )


def _adaptive_worst(batch: FixedBatch) -> Tensor:
    s = batch.settings
    return sharpness.adaptive_sharpness_worst(batch.loss_fn, batch.params, rho=s.adaptive_rho, steps=s.adaptive_steps)


MEASURES: dict[str, Measure] = {
    "first_order": Measure(_first_order, per_step=True, summary="L(w+e) − L(w), e = rho·g/‖g‖ (Foret et al. 2021)"),
    "grad_norm": Measure(_grad_norm, per_step=True, summary="‖g‖ of the gradient the optimizer steps with"),
    "hessian_max_eig": Measure(
        _hessian_max_eig, per_step=False, summary="top Hessian eigenvalue (Lanczos, warm-started) and its residual"
    ),
    "hessian_top_eigs": Measure(
        _hessian_top_eigs, per_step=False, summary="the top_k Hessian eigenvalues (Lanczos) and their residuals"
    ),
    "preconditioned_max_eig": Measure(
        _preconditioned_max_eig, per_step=False, summary="λ_max(P⁻¹H), P an adaptive optimizer's (Cohen et al. 2022)"
    ),
    "eos_ratio": Measure(
        _eos_ratio, per_step=False, summary="λ_max(S H) over the optimizer's edge of stability (1 = at the edge)"
    ),
    "hessian_trace": Measure(
        _hessian_trace, per_step=False, summary="Hutch++ estimate of the Hessian trace and its standard error"
    ),
    "adaptive_avg": Measure(_adaptive_avg, per_step=False, summary="E[L(w+δ)] − L(w), δ ~ N(0, rho² w²)"),
    "adaptive_worst": Measure(_adaptive_worst, per_step=False, summary="max over ‖δ/|w|‖ ≤ rho of L(w+δ) − L(w)"),
}

# What ``SharpnessMonitor(per_module=True)`` also measures on each top-level submodule's block of the Hessian.
PER_MODULE_MEASURES = ("hessian_max_eig", "hessian_trace")
