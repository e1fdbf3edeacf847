"""The measures of [`SharpnessMonitor`][lightning_sam.SharpnessMonitor]: one registry from name to estimator.

Adding a measure is one entry in ``MEASURES``: how to compute it, which of the monitor's
settings it reads, and the keys it logs, each with its reduction over ranks (as
torchmetrics' ``dist_reduce_fx``). A measure is either *per step* (computed on the
Trainer's logging steps from the batch just trained on, right before the optimizer
steps) or *scheduled* (every ``every_n_steps`` optimizer steps and at the end of
training, on the monitor's fixed batch, in eval mode). The estimators are the pure
functions of [`lightning_sam.sharpness`][lightning_sam.sharpness]; nothing here imports
Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_sam import sharpness
from lightning_sam._restore import weights_kept
from lightning_sam.functional import grad_norm_squared, perturb_, restore_
from lightning_sam.hessian import HVP_BACKENDS, TopEigenpairs, loss_gradient
from lightning_sam.optimizer import SAM
from lightning_sam.policy import Policy
from lightning_sam.stability import NoStateYet, StepRule, step_rule

__all__ = [
    "MEASURES",
    "PER_MODULE_MEASURES",
    "SETTINGS",
    "FixedBatch",
    "Measure",
    "NotThisStep",
    "Reduction",
    "Setting",
    "TrainingStep",
    "Unavailable",
    "check_settings",
    "chosen",
    "intervals",
]

LossFn = Callable[[], Tensor]
# How a key's per-rank values become one: their mean; the worst (an error bound); the standard error of their mean.
Reduction = Literal["mean", "max", "stderr"]
# Beyond this relative error bound, products by finite differences are too noisy for an eigenvalue's error bar.
FD_TRUSTED_BOUND = 0.05


class Unavailable(Exception):
    """A measure that cannot be computed for this run (the message says why); it is skipped with one warning."""


class NotThisStep(Exception):
    """A measure that this step does not have (a one-pass step has no first_order); skipped without a word."""


class Untrusted(Exception):
    """An estimate whose error bar cannot be trusted: its value is logged, its error bar is not (one warning)."""

    def __init__(self, message: str, values: dict[str, Tensor]) -> None:
        super().__init__(message)
        self.values = values


@dataclass(frozen=True)
class Setting:
    """One of the monitor's settings: its default and what it must be."""

    default: Any
    kind: Literal["count", "positive", "hvp"]

    def check(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not a valid ``name``, or None."""
        if self.kind == "count":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"SharpnessMonitor {name} must be a positive integer, got {value!r}."
        elif self.kind == "positive":
            if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                return f"SharpnessMonitor {name} must be a number > 0, got {value!r}."
        elif value not in HVP_BACKENDS:
            return f"SharpnessMonitor hvp must be one of {list(HVP_BACKENDS)}, got {value!r}."
        return None


SETTINGS: dict[str, Setting] = {
    "rho": Setting(0.05, "positive"),
    "adaptive_rho": Setting(0.1, "positive"),
    "eig_iters": Setting(100, "count"),
    "eig_tol": Setting(1e-2, "positive"),
    "top_k": Setting(3, "count"),
    "hvp": Setting("auto", "hvp"),
    "trace_samples": Setting(48, "count"),
    "adaptive_samples": Setting(16, "count"),
    "adaptive_steps": Setting(5, "count"),
}


def check_settings(values: Mapping[str, Any]) -> str | None:
    """The first reason why one of ``values`` (name → value, names of ``SETTINGS``) is invalid, or None."""
    return next((why for name, v in values.items() if (why := SETTINGS[name].check(name, v)) is not None), None)


def chosen(names: str | Sequence[str]) -> tuple[str, ...]:
    """The measures asked for (a name alone is one measure), checked against ``MEASURES``.

    Raises:
        ValueError: An unknown name, or none.
    """
    measures = (names,) if isinstance(names, str) else tuple(names)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(
            f"Unknown SharpnessMonitor measure(s) {unknown or '(none given)'}. Valid measures: {list(MEASURES)}."
        )
    return measures


def intervals(every_n_steps: int | Mapping[str, int], default: int = 250) -> dict[str, int]:
    """Each scheduled measure's interval, in optimizer steps: one for all, or per measure (``default`` for the rest).

    Raises:
        ValueError: An interval of a per-step measure, or one that is not a positive integer.
    """
    scheduled = [name for name, m in MEASURES.items() if not m.per_step]
    given = every_n_steps if isinstance(every_n_steps, Mapping) else dict.fromkeys(scheduled, every_n_steps)
    bad_keys = [k for k in given if k not in scheduled]
    if bad_keys:
        per_step = [name for name, m in MEASURES.items() if m.per_step]
        raise ValueError(
            f"every_n_steps sets intervals of {bad_keys}, which have none: only {scheduled} do "
            f"({', '.join(per_step)} follow the Trainer's log_every_n_steps)."
        )
    for m, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SharpnessMonitor every_n_steps[{m!r}] must be a positive integer, got {value!r}.")
    return {m: given.get(m, default) for m in scheduled}


@dataclass
class TrainingStep:
    """What a per-step measure gets: the batch just trained on, before the optimizer steps."""

    params: list[Tensor]
    grads: list[Tensor]
    loss_fn: LossFn  # the batch's loss at the current weights, with the training step's random state
    sam_stats: dict[str, Tensor] | None  # a SAMMixin module's own numbers for this step, else None
    optimizer: torch.optim.Optimizer | None
    settings: Any  # the SharpnessMonitor: rho
    before: list[Tensor] | None = None  # after the step (``needs_update``): the weights before it; params are after
    lrs: list[float] | None = None  # with ``before``: the base optimizer's group learning rates the step used
    state: dict[str, Any] = field(default_factory=dict)  # kept across calls and checkpoints


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
    """One measure: how to compute it, when, what it reads and what it logs.

    Attributes:
        estimate: Computes the values from a ``TrainingStep`` (per step, and
            ``needs_update``) or a ``FixedBatch`` (scheduled): a dict of the measure's keys
            (a subset of ``keys``); raises ``Unavailable`` when it cannot, ``NotThisStep``
            when it has nothing this time.
        per_step: Per step (True) or scheduled (False).
        keys: The keys it logs, each with its reduction over ranks, given the monitor
            (``hessian_top_eigs`` logs ``top_k`` of them). Every rank logs these keys;
            one that some rank lacks is missing on all.
        settings: The monitor's settings it reads (names of ``SETTINGS``).
        summary: One line for the docs and error messages.
        needs_update: Scheduled, but on the batch just trained on, after the optimizer
            stepped: a ``TrainingStep`` with the weights before the step in ``before``.
        sharded: Works on sharded (DTensor) parameters, as FSDP2 and tensor parallelism
            make them; the others are skipped there, with one warning.
    """

    estimate: Callable[[Any], dict[str, Tensor]]
    per_step: bool
    keys: Callable[[Any], dict[str, Reduction]]
    settings: tuple[str, ...] = ()
    summary: str = ""
    needs_update: bool = False
    sharded: bool = True


def _sam(optimizer: torch.optim.Optimizer | None) -> SAM | None:
    return optimizer if isinstance(optimizer, SAM) else None


def _one(optimizer: SAM, name: str) -> Any:
    values = {group[name] for group in optimizer.param_groups if group["params"]}
    if len(values) != 1:
        raise Unavailable(f"the parameter groups have different {name} ({sorted(values)}); use one for all groups.")
    return values.pop()


def _first_order(step: TrainingStep) -> dict[str, Tensor]:
    """``L(w + e) − L(w)`` with ``e = rho·g/‖g‖`` on the training batch; free from a SAM module's own step."""
    if step.sam_stats is not None:
        if "first_order_sharpness" in step.sam_stats:
            return {"first_order": step.sam_stats["first_order_sharpness"]}
        sam = _sam(step.optimizer)
        if sam is None or sam.policy.pre_forward:  # MSAM moves before the forward: its step is not SAM's ascent
            raise NotThisStep
        # A step without ascent (LookSAM's, between its SAM steps): the plain gradient's, at the optimizer's rho.
        with torch.enable_grad():
            value = sharpness.first_order_sharpness(step.loss_fn, step.params, rho=_one(sam, "rho"))
        return {"first_order": value}
    if not step.params:
        raise Unavailable("no parameter has a gradient.")
    with torch.no_grad():
        before = step.loss_fn()
        norm = grad_norm_squared(step.params, step.grads).sqrt()
        backup = perturb_(step.params, step.grads, step.settings.rho / (norm + 1e-12))
        try:
            after = step.loss_fn()
        finally:
            restore_(step.params, backup)
    return {"first_order": after - before}


def _sam_fraction(step: TrainingStep) -> dict[str, Tensor]:
    """The fraction of the optimizer steps taken so far that were SAM steps (nothing for a plain optimizer)."""
    if step.sam_stats is not None and "sam_fraction" in step.sam_stats:
        return {"sam_fraction": step.sam_stats["sam_fraction"]}
    sam = _sam(step.optimizer)
    if sam is None:
        raise NotThisStep  # every step of a plain optimizer is one pass: nothing to report
    return {"sam_fraction": torch.tensor(sam.sam_fraction)}


def _grad_norm(step: TrainingStep) -> dict[str, Tensor]:
    """``‖g‖`` of the gradient the optimizer steps with."""
    return {"grad_norm": grad_norm_squared(step.params, step.grads).sqrt()}


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


def _with_residuals(top: TopEigenpairs, values: dict[str, Tensor], residuals: dict[str, Tensor]) -> dict[str, Tensor]:
    """The values with their residuals; without them (``Untrusted``) where inexact products make them no error bar."""
    if getattr(top, "exact", True) or all(float(r) <= FD_TRUSTED_BOUND for r in residuals.values()):
        return {**values, **residuals}
    worst = max(float(r) for r in residuals.values())
    raise Untrusted(
        f"its Hessian-vector products are finite differences, too noisy here for an error bar (the estimated error "
        f"is {worst:.3g} of the value, over {FD_TRUSTED_BOUND}): the value is logged without its residual. Exact "
        "products need double backward: FSDP2's parameters have none; attention gets one under hvp='auto' (its math "
        "kernel).",
        values,
    )


def _hessian_max_eig(batch: FixedBatch) -> dict[str, Tensor]:
    top = _top_eigs(batch, 1, "eigenvectors")
    return _with_residuals(top, {"hessian_max_eig": top.eigenvalues[0]}, {"hessian_max_eig_residual": top.residuals[0]})


def _hessian_top_eigs(batch: FixedBatch) -> dict[str, Tensor]:
    top = _top_eigs(batch, batch.settings.top_k, "top_eigenvectors")
    values = {f"hessian_eig_{i + 1}": v for i, v in enumerate(top.eigenvalues)}
    return _with_residuals(top, values, {f"hessian_eig_{i + 1}_residual": r for i, r in enumerate(top.residuals)})


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
    return _with_residuals(
        top, {"preconditioned_max_eig": top.eigenvalues[0]}, {"preconditioned_max_eig_residual": top.residuals[0]}
    )


def _step_sharpness(batch: FixedBatch, rule: StepRule) -> tuple[Tensor, TopEigenpairs | None]:
    """``λ_max(S H)``, reusing this round's ``λ_max(H)`` (SGD) or ``λ_max(P⁻¹H)`` when there is one learning rate.

    Returns the value and its eigenpair estimate (None when reused: the eigenvalue logs its own residual).
    """
    measured = "hessian_max_eig" if rule.preconditioner is None else "preconditioned_max_eig"
    if rule.lr is not None and measured in batch.values:
        return batch.values[measured] * rule.lr, None
    top = _top_eigs(batch, 1, "eos_eigenvectors", rule.step_preconditioner)
    return top.eigenvalues[0], top


def _ratio(name: str, value: Tensor, top: TopEigenpairs | None) -> dict[str, Tensor]:
    """``{name: value}`` with its own residual when it was estimated here (``Untrusted`` where that is no error bar)."""
    if top is None:
        return {name: value}
    return _with_residuals(top, {name: value}, {f"{name}_residual": top.residuals[0]})


def _eos_ratio(batch: FixedBatch) -> dict[str, Tensor]:
    """``λ_max(S H)/c``: the sharpness of the base optimizer's step over its edge of stability."""
    rule = _rule(batch)
    value, top = _step_sharpness(batch, rule)
    return _ratio("eos_ratio", value / rule.edge, top)


def _sam_eos_ratio(batch: FixedBatch) -> dict[str, Tensor]:
    r"""``λ_max(H)`` over SAM's edge of stability (Long & Bartlett 2024), for SAM over SGD.

    On a quadratic, SAM's gradient along the top eigenvector is ``(1 + rho·λ/‖g‖)`` times
    the plain one, so the step is stable while ``lr·(1 + rho·λ/‖g‖)·λ < c`` (``c = 2`` for
    gradient descent, the base optimizer's ``c`` with momentum): the edge is
    ``λ* = ‖g‖/(2 rho) · (√(1 + 4c·rho/(lr·‖g‖)) − 1)``, below the base optimizer's ``c/lr``.
    At ``‖g‖ = 0`` (a stationary point) SAM's step does not move and the edge is undefined:
    nothing is logged then.
    """
    sam = _sam(batch.optimizer)
    if sam is None:
        raise Unavailable("the optimizer is not a SAM: its edge of stability is eos_ratio's.")
    if type(sam.policy) is not Policy or _one(sam, "adaptive") or not isinstance(sam.base_optimizer, torch.optim.SGD):
        raise Unavailable(
            "SAM's edge of stability (Long & Bartlett 2024) is derived for SAM (not ASAM or a variant) over SGD; "
            "eos_ratio gives the base optimizer's."
        )
    rule = _rule(batch)
    if rule.lr is None:
        raise Unavailable("the parameter groups have different learning rates: SAM's edge needs one.")
    rho = float(_one(sam, "rho"))
    value, top = _step_sharpness(batch, rule)
    sharp = value / rule.lr
    if rho == 0:
        edge = torch.as_tensor(rule.edge / rule.lr, dtype=sharp.dtype, device=sharp.device)
    else:
        norm = _whole(grad_norm_squared(batch.params, loss_gradient(batch.loss_fn, batch.params))).sqrt()
        if not bool(norm > 0):
            raise NotThisStep  # a stationary point of the fixed batch: SAM's edge is undefined there
        edge = norm / (2 * rho) * ((1 + 4 * rule.edge * rho / (rule.lr * norm)).sqrt() - 1)
    return _ratio("sam_eos_ratio", sharp / edge, top)


def _hessian_trace(batch: FixedBatch) -> dict[str, Tensor]:
    s = batch.settings
    trace, stderr = sharpness.hessian_trace(
        batch.loss_fn, batch.params, samples=s.trace_samples, hvp=s.hvp, generator=batch.generator
    )
    return {"hessian_trace": trace, "hessian_trace_stderr": stderr}


def _adaptive_avg(batch: FixedBatch) -> dict[str, Tensor]:
    s = batch.settings
    value = sharpness.adaptive_sharpness_avg(
        batch.loss_fn, batch.params, rho=s.adaptive_rho, samples=s.adaptive_samples, generator=batch.generator
    )
    return {"adaptive_avg": value}


def _adaptive_worst(batch: FixedBatch) -> dict[str, Tensor]:
    s = batch.settings
    value = sharpness.adaptive_sharpness_worst(batch.loss_fn, batch.params, rho=s.adaptive_rho, steps=s.adaptive_steps)
    return {"adaptive_worst": value}


def _critical_sharpness(step: TrainingStep) -> dict[str, Tensor]:
    """``2/η_c`` along the optimizer's last update, on the batch it came from: ``η_c`` the smallest step that raises it.

    The update is ``w_after − w_before = −lr·u``; the line search runs from ``w_before``
    (the weights are back at ``w_after`` afterwards, bitwise), warm-started from the last
    call's ``η_c`` as Kalra et al. do.
    """
    if step.before is None or step.lrs is None:
        raise NotThisStep  # at the end of training: no update to look along
    lrs = set(step.lrs)  # as the step used them: a per-step LR scheduler has stepped since
    if len(lrs) != 1:
        raise Unavailable(f"the parameter groups have different learning rates ({sorted(lrs)}): it needs one.")
    lr = lrs.pop()
    direction = [(before - after.detach()) / lr for before, after in zip(step.before, step.params, strict=True)]
    if not bool(_whole(grad_norm_squared(step.params, direction)) > 0):
        raise NotThisStep  # the optimizer did not move (a skipped step)
    with torch.no_grad(), weights_kept(step.params):
        for p, before in zip(step.params, step.before, strict=True):
            p.copy_(before)
        found = sharpness.critical_sharpness(
            step.loss_fn, step.params, direction, eta0=float(step.state.get("critical_eta", lr))
        )
    if not bool(torch.isfinite(found.value)):
        raise NotThisStep  # the update did not lower this loss at any step tried (or the search found no rise)
    if 0 < float(found.eta) < math.inf:  # the next call starts from it (the loss never rose: from lr again)
        step.state["critical_eta"] = float(found.eta)
    return {"critical_sharpness": found.value}


def _whole(value: Tensor) -> Tensor:
    """A sum over sharded tensors (a DTensor) as one plain tensor, the same on every rank."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _keys(*keys: str, **reductions: Reduction) -> Callable[[Any], dict[str, Reduction]]:
    """Fixed keys, reduced by their mean unless given: ``_keys("x", x_residual="max")``."""
    table: dict[str, Reduction] = {**dict.fromkeys(keys, "mean"), **reductions}
    return lambda _: table


def _top_eigs_keys(settings: Any) -> dict[str, Reduction]:
    keys: dict[str, Reduction] = {}
    for i in range(1, settings.top_k + 1):
        keys[f"hessian_eig_{i}"], keys[f"hessian_eig_{i}_residual"] = "mean", "max"
    return keys


_LANCZOS = ("eig_iters", "eig_tol", "hvp")

MEASURES: dict[str, Measure] = {
    "first_order": Measure(
        _first_order,
        per_step=True,
        keys=_keys("first_order"),
        settings=("rho",),
        summary="L(w+e) − L(w), e = rho·g/‖g‖ (Foret et al. 2021)",
    ),
    "grad_norm": Measure(
        _grad_norm, per_step=True, keys=_keys("grad_norm"), summary="‖g‖ of the gradient the optimizer steps with"
    ),
    "sam_fraction": Measure(
        _sam_fraction,
        per_step=True,
        keys=_keys("sam_fraction"),
        summary="the fraction of the optimizer steps so far that were SAM steps (AE-SAM, RST, LookSAM... choose)",
    ),
    "hessian_max_eig": Measure(
        _hessian_max_eig,
        per_step=False,
        keys=_keys("hessian_max_eig", hessian_max_eig_residual="max"),
        settings=_LANCZOS,
        summary="top Hessian eigenvalue (Lanczos, warm-started) and its residual",
    ),
    "hessian_top_eigs": Measure(
        _hessian_top_eigs,
        per_step=False,
        keys=_top_eigs_keys,
        settings=(*_LANCZOS, "top_k"),
        summary="the top_k Hessian eigenvalues (Lanczos) and their residuals",
    ),
    "preconditioned_max_eig": Measure(
        _preconditioned_max_eig,
        per_step=False,
        keys=_keys("preconditioned_max_eig", preconditioned_max_eig_residual="max"),
        settings=_LANCZOS,
        summary="λ_max(P⁻¹H), P an adaptive optimizer's (Cohen et al. 2022)",
    ),
    "eos_ratio": Measure(
        _eos_ratio,
        per_step=False,
        keys=_keys("eos_ratio", eos_ratio_residual="max"),
        settings=_LANCZOS,
        summary="λ_max(S H) over the base optimizer's edge of stability (1 = at the edge)",
    ),
    "sam_eos_ratio": Measure(
        _sam_eos_ratio,
        per_step=False,
        keys=_keys("sam_eos_ratio", sam_eos_ratio_residual="max"),
        settings=_LANCZOS,
        summary="λ_max(H) over SAM's edge of stability, SAM over SGD (Long & Bartlett 2024)",
    ),
    "hessian_trace": Measure(
        _hessian_trace,
        per_step=False,
        keys=_keys("hessian_trace", hessian_trace_stderr="stderr"),
        settings=("trace_samples", "hvp"),
        summary="Hutch++ estimate of the Hessian trace and its standard error",
    ),
    "adaptive_avg": Measure(
        _adaptive_avg,
        per_step=False,
        keys=_keys("adaptive_avg"),
        settings=("adaptive_rho", "adaptive_samples"),
        summary="E[L(w+δ)] − L(w), δ ~ N(0, rho² w²)",
        sharded=False,
    ),
    "adaptive_worst": Measure(
        _adaptive_worst,
        per_step=False,
        keys=_keys("adaptive_worst"),
        settings=("adaptive_rho", "adaptive_steps"),
        summary="max over ‖δ/|w|‖ ≤ rho of L(w+δ) − L(w)",
        sharded=False,
    ),
    "critical_sharpness": Measure(
        _critical_sharpness,
        per_step=False,
        keys=_keys("critical_sharpness"),
        summary="2/η_c, η_c the smallest step along the last update that raises the loss (Kalra et al. 2026)",
        needs_update=True,
    ),
}

# What ``SharpnessMonitor(per_module=True)`` also measures on each top-level submodule's block of the Hessian.
PER_MODULE_MEASURES = ("hessian_max_eig", "hessian_trace")
