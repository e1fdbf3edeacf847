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
from lightning_sam.optimizer import SAM

__all__ = ["MEASURES", "FixedBatch", "Measure", "NotThisStep", "TrainingStep", "Unavailable"]

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
    settings: Any  # the SharpnessMonitor: power_iters, power_tol, trace_samples, adaptive_rho, ...
    state: dict[str, Any]  # kept across calls and checkpoints (the warm-start eigenvector)
    values: dict[str, Tensor] = field(default_factory=dict)  # measures computed earlier in this round


@dataclass(frozen=True)
class Measure:
    """One measure: how to compute it, and when.

    Attributes:
        estimate: Computes the value from a ``TrainingStep`` (per step) or a
            ``FixedBatch`` (scheduled); raises ``Unavailable`` when it cannot.
        per_step: Per step (True) or scheduled (False).
        needs: Scheduled measures computed first in the same round (``eos_ratio`` needs
            ``hessian_max_eig``).
        summary: One line for the docs and error messages.
        sharded: Whether it works on sharded (DTensor) parameters, as FSDP2 and tensor
            parallelism make them; the others are skipped there, with one warning.
    """

    estimate: Callable[[Any], Tensor]
    per_step: bool
    needs: tuple[str, ...] = ()
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


def _hessian_max_eig(batch: FixedBatch) -> Tensor:
    s = batch.settings
    value, batch.state["eigenvector"] = sharpness.hessian_max_eig(
        batch.loss_fn,
        batch.params,
        max_iters=s.power_iters,
        tol=s.power_tol,
        init=batch.state.get("eigenvector"),
        generator=batch.generator,
    )
    return value


def _eos_ratio(batch: FixedBatch) -> Tensor:
    threshold = stability_threshold(batch.optimizer)
    if threshold is None:
        raise Unavailable(
            "eos_ratio needs an SGD (or SAM over SGD) optimizer, whose stability threshold is (2 + 2·momentum)/lr; "
            "it is not logged for this optimizer."
        )
    return batch.values["hessian_max_eig"] / threshold


def _hessian_trace(batch: FixedBatch) -> Tensor:
    return sharpness.hessian_trace(
        batch.loss_fn, batch.params, samples=batch.settings.trace_samples, generator=batch.generator
    )


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
        _hessian_max_eig, per_step=False, summary="top Hessian eigenvalue, warm-started power iteration"
    ),
    "eos_ratio": Measure(
        _eos_ratio, per_step=False, needs=("hessian_max_eig",), summary="λ_max over SGD's threshold (2+2β)/lr"
    ),
    "hessian_trace": Measure(_hessian_trace, per_step=False, summary="Hutch++ estimate of the Hessian trace"),
    "adaptive_avg": Measure(_adaptive_avg, per_step=False, summary="E[L(w+δ)] − L(w), δ ~ N(0, rho² w²)"),
    "adaptive_worst": Measure(_adaptive_worst, per_step=False, summary="max over ‖δ/|w|‖ ≤ rho of L(w+δ) − L(w)"),
}


def stability_threshold(optimizer: torch.optim.Optimizer | None) -> float | None:
    """``(2 + 2β)/lr`` for (heavy-ball) SGD, the edge of stability (Cohen et al. 2021); None otherwise."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if not isinstance(base, torch.optim.SGD):
        return None
    group = base.param_groups[0]
    return float((2 + 2 * group.get("momentum", 0.0)) / group["lr"])
