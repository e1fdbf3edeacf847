"""Sharpness estimators as functions of a loss closure and the parameters.

Each estimator takes ``loss_fn`` (computes the loss at the parameters' current values,
with grad enabled) and ``params`` (the leaf tensors to measure over). Every function
leaves the parameters bitwise as it found them (they are restored from a copy, never
by subtracting), never touches ``.grad`` (gradients come from ``torch.autograd.grad``),
and draws random numbers only from the ``generator`` it is given. No Lightning import:
[`SharpnessMonitor`][lightning_sam.SharpnessMonitor] is the Lightning front end.

Examples:
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> loss_fn = lambda: 3.0 * w[0] ** 2 + 0.5 * w[1] ** 2  # Hessian diag(6, 1)
    >>> eigenvalue, _ = hessian_max_eig(loss_fn, [w])
    >>> round(eigenvalue.item(), 4)
    6.0
    >>> hessian_trace(loss_fn, [w]).trace.item()
    7.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_sam._restore import weights_kept
from lightning_sam.functional import dot, grad_norm_squared, perturb_, restore_, sub_into_
from lightning_sam.hessian import (
    HVP_BACKENDS,
    HessianOperator,
    HVPFallbackWarning,
    Spectrum,
    TopEigenpairs,
    TraceEstimate,
    hessian_spectrum,
    hessian_top_eigs,
    hessian_trace,
    hessian_vector_product,
)

__all__ = [
    "HVP_BACKENDS",
    "CriticalSharpness",
    "HVPFallbackWarning",
    "HessianOperator",
    "Spectrum",
    "TopEigenpairs",
    "TraceEstimate",
    "adaptive_sharpness_avg",
    "adaptive_sharpness_worst",
    "critical_sharpness",
    "filter_normalized",
    "first_order_sharpness",
    "gradients",
    "hessian_max_eig",
    "hessian_spectrum",
    "hessian_top_eigs",
    "hessian_trace",
    "hessian_vector_product",
    "loss_along",
]

LossFn = Callable[[], Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def _norm(vectors: Sequence[Tensor]) -> Tensor:
    return _dot(vectors, vectors).sqrt()


def gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``∂loss/∂params``, zeros for parameters the loss does not use."""
    with torch.enable_grad():
        return list(torch.autograd.grad(loss, list(params), allow_unused=True, materialize_grads=True))


def _random_like(params: Sequence[Tensor], generator: torch.Generator | None, rademacher: bool) -> list[Tensor]:
    out = []
    for p in params:
        z = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        out.append(z.sign().add_(z == 0) if rademacher else z)
    return out


def hessian_max_eig(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    max_iters: int = 100,
    tol: float = 1e-2,
    init: Sequence[Tensor] | None = None,
    hvp: str = "auto",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    r"""The top Hessian eigenvalue and its eigenvector: ``hessian_top_eigs`` with ``k=1``.

    The measure of Cohen et al. 2021 ("Gradient descent on neural networks typically occurs
    at the edge of stability"), by Lanczos; warm-started from the last eigenvector it usually
    needs a few products.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        max_iters: At most this many Hessian-vector products.
        tol: Relative residual ``‖Hv − λv‖/|λ|`` that ends the iteration.
        init: Starting vector (e.g. the eigenvector of the previous call); random otherwise.
        hvp: The Hessian-vector product backend (see ``HessianOperator``).
        generator: For the random start.

    Returns:
        ``λ`` (a 0-dim float tensor) and its unit eigenvector (one tensor per parameter).
    """
    top = hessian_top_eigs(
        loss_fn,
        params,
        1,
        max_iters=max_iters,
        tol=tol,
        init=None if init is None else [init],
        hvp=hvp,
        generator=generator,
    )
    return top.eigenvalues[0], top.eigenvectors[0]


def first_order_sharpness(loss_fn: LossFn, params: Sequence[Tensor], rho: float = 0.05) -> Tensor:
    r"""SAM's sharpness: ``L(w + e) − L(w)`` with ``e = rho · g / ‖g‖`` (Foret et al. 2021, eq. 1).

    The first-order solution of ``max_{‖e‖≤rho} L(w + e) − L(w)``; one forward+backward
    and one more forward.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        rho: The radius.

    Returns:
        The difference of the two losses (0-dim tensor).
    """
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
    grads = gradients(loss, params)
    with torch.no_grad():
        norm = grad_norm_squared(params, grads).sqrt()
        backup = perturb_(params, grads, rho / (norm + 1e-12))
        try:
            return (loss_fn() - loss).detach()
        finally:
            restore_(params, backup)


def adaptive_sharpness_avg(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    rho: float = 0.1,
    samples: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Average-case adaptive sharpness: ``E[L(w + δ)] − L(w)``, ``δ ~ N(0, rho² diag(w²))``.

    Andriushchenko et al. 2023, "A modern look at the relationship between sharpness and
    generalization", eq. 2 with ``c = |w|`` (invariant to rescaling the weights). The
    noise is drawn in antithetic pairs ``±δ``, which cancels the first-order term
    ``gᵀδ`` exactly and leaves the curvature ``½ rho² Σ H_ii w_i²`` that the measure is about.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        rho: Relative scale of the noise.
        samples: Forward passes (``samples // 2`` antithetic pairs, at least one).
        generator: For the noise.

    Returns:
        The estimate (0-dim tensor).
    """
    params = list(params)
    with torch.no_grad(), weights_kept(params) as saved:
        base = loss_fn()
        losses = []
        for _ in range(max(samples // 2, 1)):
            noise = _random_like(params, generator, rademacher=False)
            for sign in (1.0, -1.0):
                for p, w, z in zip(params, saved, noise, strict=True):
                    p.copy_(w).addcmul_(w.abs(), z, value=sign * rho)
                losses.append(loss_fn())
        return torch.stack(losses).mean() - base


def adaptive_sharpness_worst(loss_fn: LossFn, params: Sequence[Tensor], *, rho: float = 0.05, steps: int = 5) -> Tensor:
    r"""Worst-case adaptive sharpness: ``max_{‖δ/|w|‖₂ ≤ rho} L(w + δ) − L(w)``.

    Andriushchenko et al. 2023, eq. 1 with ``c = |w|`` and the ℓ2 ball, by projected
    normalized-gradient ascent in the scaled variable ``z = δ/|w|``: ``z ← Π(z + rho·∇_z/‖∇_z‖)``
    with ``∇_z = |w| ⊙ ∇L(w + |w| ⊙ z)``. The first step is ASAM's perturbation (``eta=0``),
    and the largest loss seen is kept, so the result is at least that one's.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        rho: Radius in the scaled variable.
        steps: Ascent steps (forward+backward each).

    Returns:
        The estimate (0-dim tensor, ``>= 0``).
    """
    params = list(params)
    with weights_kept(params) as saved:
        scale = [w.abs() for w in saved]
        z = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            base = loss_fn()
        grads = gradients(base, params)
        worst = torch.zeros((), device=base.device, dtype=base.dtype)
        for _ in range(steps):
            with torch.no_grad():
                gz = [c * g for c, g in zip(scale, grads, strict=True)]
                step = rho / (_norm(gz) + 1e-12)
                z = [zi + step * gi for zi, gi in zip(z, gz, strict=True)]
                z_norm = _norm(z)
                shrink = torch.clamp(rho / (z_norm + 1e-12), max=1.0)
                z = [zi * shrink for zi in z]
                for p, w, c, zi in zip(params, saved, scale, z, strict=True):
                    p.copy_(w).addcmul_(c, zi)
            with torch.enable_grad():
                loss = loss_fn()
            grads = gradients(loss, params)
            worst = torch.maximum(worst, (loss - base).detach())
        return worst


def filter_normalized(direction: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """Scale each filter of ``direction`` to the norm of the matching filter of ``params``.

    Li et al. 2018, "Visualizing the loss landscape of neural nets": a filter is a slice
    along the first dimension (an output unit of a linear or convolution layer); 1-D
    parameters (biases, normalization) get a zero direction.

    Args:
        direction: One tensor per parameter.
        params: The parameters.

    Returns:
        The normalized direction.
    """
    out = []
    for d, p in zip(direction, params, strict=True):
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        p_norm = p.detach().flatten(1).norm(dim=1)
        out.append(d * (p_norm / d_norm).view(-1, *([1] * (d.dim() - 1))))
    return out


def loss_along(loss_fn: LossFn, params: Sequence[Tensor], direction: Sequence[Tensor], alphas: Tensor) -> Tensor:
    """``L(w + α d)`` for each ``α`` in ``alphas`` (a 1-D slice of the loss landscape).

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        direction: One tensor per parameter.
        alphas: Step sizes (1-D tensor).

    Returns:
        The losses (1-D tensor, on the loss's device).
    """
    params = list(params)
    with torch.no_grad(), weights_kept(params) as saved:
        losses = []
        for alpha in alphas.tolist():
            for p, w, d in zip(params, saved, direction, strict=True):
                p.copy_(w).add_(d, alpha=alpha)
            losses.append(loss_fn().detach())
        return torch.stack(losses)


class CriticalSharpness(NamedTuple):
    """The result of [`critical_sharpness`][lightning_sam.sharpness.critical_sharpness].

    The critical step lies in ``(lower, upper]``: ``L(w − lower·u) ≤ L(w)`` was seen (or
    ``lower == 0``) and ``L(w − upper·u) > L(w)`` (or ``upper == inf``).
    """

    value: Tensor
    """``λ_c = 2 / eta`` (0-dim): ``inf`` when the loss rose at every step tried, ``0`` when at none."""
    eta: Tensor
    """``η_c``, the middle of ``(lower, upper]`` (0-dim): ``0`` or ``inf`` in those two cases."""
    lower: float
    """The largest step seen not to raise the loss, below ``upper`` (``0.0``: none was seen)."""
    upper: float
    """The smallest step seen to raise it (``inf``: none was seen)."""
    evaluations: int
    """How many times ``loss_fn`` was called, the one at ``w`` included."""


def critical_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    direction: Sequence[Tensor],
    *,
    eta0: float,
    rtol: float = 0.05,
    max_evals: int = 20,
) -> CriticalSharpness:
    r"""Critical sharpness ``λ_c = 2 / η_c``: ``η_c`` the smallest step along ``−u`` that raises the loss.

    Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for Analyzing the
    Training Dynamics of LLMs" (arXiv 2601.16979, definition 2.1 and appendix A; code:
    github.com/facebookresearch/scalable-curvature, ``utils/measure_critical_lr.py``):
    ``η_c = min{η > 0 : L(w − η u) > L(w)}`` with ``u`` the optimizer's update direction,
    found by forward passes only. On a quadratic with gradient ``g``,
    ``η_c = 2 gᵀu / uᵀHu``, so ``λ_c = uᵀHu / gᵀu``, the directional sharpness; for
    gradient descent (``u = g``) a weighted mean of the Hessian's eigenvalues, equal to
    the largest one when ``g`` is along its eigenvector.

    The search is the paper's. An exponential phase doubles ``η`` from ``eta0`` while the
    loss does not rise (halves it while it does), which brackets the crossing by a factor
    of 2; bisection at the midpoint then shrinks the bracket ``(lower, upper]`` until
    ``(upper − lower) / (upper + lower) ≤ rtol``, and ``eta`` is its midpoint. That
    stopping rule bounds the relative error of ``value`` by ``rtol`` (for the crossing in
    the bracket), where the paper stops at ``1 − lower/upper ≤ ε = 1/16``, which is
    ``rtol = ε/(2 − ε) ≈ 0.032``: the default 0.05 costs 3 or 4 bisections, the paper 4.
    Warm-started (``eta0`` the previous call's ``eta``, as the paper does), a call
    typically costs 1 + 1-2 + 3-4 forward passes; from a poor guess, one more per factor
    of 2. A loss that is not finite counts as raised (the step diverged). Losses are
    taken under ``torch.no_grad()``, each read on the host once; the weights are set to
    ``w − η u`` from a saved copy for every evaluation and put back bitwise at the end.

    The bracket holds *a* crossing; it is the first one when ``L(w − ηu) − L(w)``
    changes sign once on ``(0, upper]``, as on a quadratic or close to one. Two edge
    cases, returned rather than raised (a monitor should not stop training):

    - The loss never rose up to ``eta0 · 2^(max_evals − 2)``: ``upper = eta = inf``,
      ``value = 0`` (flat or still descending as far as the search looked).
    - The loss rose at every step tried, down to ``eta0 · 2^−(max_evals − 2)``:
      ``lower = eta = 0``, ``value = inf``: ``u`` does not decrease this loss
      (``gᵀu ≤ 0``, e.g. a momentum step pointing uphill, or a loss on another batch than
      the one ``u`` came from). If the rise at small steps falls below the loss's rounding,
      the halving stops where rounding decides and ``value`` is merely huge; a ``value``
      far above ``2 / eta0`` reads the same way.

    A non-finite loss at ``w`` itself gives ``nan`` for everything after one evaluation.

    Sharded parameters (DTensors) work: the weights are written shard by shard, the
    direction's norm is summed over every shard, and every decision is taken on the
    (replicated) loss, the same on every rank.

    Args:
        loss_fn: Computes the loss (a scalar) at the parameters' current values; called
            under ``torch.no_grad()``.
        params: The parameters.
        direction: ``u``, one tensor per parameter, shaped (and, for DTensors, placed)
            like it; a step of size ``η`` is ``w − η u``. From the optimizer's last update
            ``w_after = w_before − lr·u``: ``u = (w_before − w_after) / lr``.
        eta0: The first step tried: the learning rate ``u`` was taken with, or the
            previous call's ``eta``.
        rtol: Relative accuracy of ``value``, in ``(0, 1)``.
        max_evals: At most this many calls of ``loss_fn``, the one at ``w`` included
            (at least 2). A bisection cut short by it leaves a wider bracket.

    Returns:
        ``value``, ``eta`` (0-dim, on the loss's device, at least float32), the bracket
        ``lower``, ``upper`` and the number of ``evaluations``.

    Raises:
        ValueError: ``eta0``, ``rtol`` or ``max_evals`` out of range, no parameters,
            ``direction`` not aligned with ``params``, zero or not finite, or a loss that is
            not a scalar.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> h = torch.tensor([3.0, 1.0])  # L = ½ wᵀ diag(h) w
        >>> loss_fn = lambda: 0.5 * (h * w * w).sum()
        >>> g = h * w.detach()  # u = g: λ_c = gᵀHg / gᵀg = 28 / 10
        >>> result = critical_sharpness(loss_fn, [w], [g], eta0=0.1)
        >>> result.lower < 2 / 2.8 <= result.upper
        True
        >>> abs(result.value.item() - 2.8) <= 0.05 * 2.8
        True
        >>> result.evaluations
        8
    """
    params, direction = list(params), list(direction)
    eta0 = _positive_step(eta0)
    _check_critical_arguments(params, direction, rtol, max_evals)
    squared = dot(direction, direction).item()  # replicated: the same on every rank
    if not (math.isfinite(squared) and squared > 0):
        raise ValueError(
            f"direction has squared norm {squared}: pass a nonzero, finite update direction "
            "(e.g. (w_before − w_after) / lr of a step that moved the weights)."
        )
    with torch.no_grad(), weights_kept(params) as saved:
        probe = _Probe(loss_fn, params, saved, direction)
        if not math.isfinite(probe.base):
            lower = upper = eta = math.nan
        else:
            lower, upper = _bracket(probe, eta0, max_evals)
            while lower > 0 and upper < math.inf and upper - lower > rtol * (upper + lower):
                middle = 0.5 * (lower + upper)
                if probe.evaluations >= max_evals or not lower < middle < upper:  # out of calls, or of float resolution
                    break
                if probe.raised(middle):
                    upper = middle
                else:
                    lower = middle
            eta = 0.0 if lower == 0 else math.inf if upper == math.inf else 0.5 * (lower + upper)
    value = math.inf if eta == 0 else 2.0 / eta  # 2 / inf = 0, 2 / nan = nan
    dtype, device = torch.promote_types(probe.loss_dtype, torch.float32), probe.device
    return CriticalSharpness(
        torch.tensor(value, dtype=dtype, device=device),
        torch.tensor(eta, dtype=dtype, device=device),
        lower,
        upper,
        probe.evaluations,
    )


class _Probe:
    """The loss at ``w`` and at ``w − η u`` (set from the saved copy each time), with the calls counted."""

    def __init__(self, loss_fn: LossFn, params: list[Tensor], saved: list[Tensor], direction: list[Tensor]) -> None:
        self.loss_fn, self.params, self.saved, self.direction = loss_fn, params, saved, direction
        loss = self._loss()
        self.loss_dtype, self.device = loss.dtype, loss.device
        self.base = float(loss.item())  # each evaluation's one host read
        self.evaluations = 1

    def _loss(self) -> Tensor:
        loss = self.loss_fn()
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}.")
        loss = loss.detach()
        return loss.full_tensor() if isinstance(loss, DTensor) else loss  # replicated: the same on every rank

    def raised(self, eta: float) -> bool:
        """Whether ``L(w − η u) > L(w)``, a loss that is not finite included."""
        sub_into_(self.params, self.saved, self.direction, eta)
        loss = float(self._loss().item())
        self.evaluations += 1
        return not math.isfinite(loss) or loss > self.base


def _bracket(probe: _Probe, eta0: float, max_evals: int) -> tuple[float, float]:
    """The exponential phase: ``(lower, upper]`` a factor 2 apart, or open on one side (``0`` or ``inf``)."""
    if probe.raised(eta0):
        upper = eta0
        while probe.evaluations < max_evals:
            if not probe.raised(upper / 2):
                return upper / 2, upper
            upper /= 2
        return 0.0, upper
    lower = eta0
    while probe.evaluations < max_evals:
        if probe.raised(lower * 2):
            return lower, lower * 2
        lower *= 2
    return lower, math.inf


def _positive_step(eta0: float) -> float:
    try:
        step = float(eta0)  # a learning rate held in a 0-dim tensor too
    except (TypeError, ValueError, RuntimeError):
        step = math.nan
    if not (math.isfinite(step) and step > 0):
        raise ValueError(
            f"eta0 must be a positive, finite step size (the learning rate u was taken with, or the "
            f"previous call's eta), got {eta0!r}."
        )
    return step


def _check_critical_arguments(params: list[Tensor], direction: list[Tensor], rtol: float, max_evals: int) -> None:
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1) (e.g. 0.05 for 5%), got {rtol!r}.")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 2:
        raise ValueError(f"max_evals must be an integer >= 2 (the loss at w and one step), got {max_evals!r}.")
    if not params:
        raise ValueError("params is empty: pass the parameters the update direction moves.")
    if len(direction) != len(params):
        raise ValueError(
            f"direction must hold one tensor per parameter, got {len(direction)} for {len(params)} parameters."
        )
    for i, (p, u) in enumerate(zip(params, direction, strict=True)):
        if u.shape != p.shape:
            raise ValueError(f"direction[{i}] has shape {tuple(u.shape)}, its parameter {tuple(p.shape)}: align them.")
        if isinstance(p, DTensor) != isinstance(u, DTensor) or (
            isinstance(p, DTensor)
            and isinstance(u, DTensor)
            and (p.device_mesh != u.device_mesh or p.placements != u.placements)
        ):
            raise ValueError(
                f"direction[{i}] must be placed like its parameter (a DTensor on the same mesh with the same "
                "placements when the parameter is one, a plain tensor otherwise)."
            )
