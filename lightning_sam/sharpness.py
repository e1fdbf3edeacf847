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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sam._restore import weights_kept
from lightning_sam.functional import grad_norm_squared, perturb_, restore_
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
    "HVPFallbackWarning",
    "HessianOperator",
    "Spectrum",
    "TopEigenpairs",
    "TraceEstimate",
    "adaptive_sharpness_avg",
    "adaptive_sharpness_worst",
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
