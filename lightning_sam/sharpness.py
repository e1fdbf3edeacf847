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
    >>> hessian_trace(loss_fn, [w]).item()
    7.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_sam.functional import grad_norm_squared, perturb_, restore_

__all__ = [
    "adaptive_sharpness_avg",
    "adaptive_sharpness_worst",
    "filter_normalized",
    "first_order_sharpness",
    "gradients",
    "hessian_max_eig",
    "hessian_trace",
    "hessian_vector_product",
    "loss_along",
]

LossFn = Callable[[], Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()


def _norm(vectors: Sequence[Tensor]) -> Tensor:
    return _dot(vectors, vectors).sqrt()


@contextmanager
def _restored(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Yield a copy of the parameters and give them back bitwise from it, whatever happens inside."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            restore_(list(params), saved)


class _HessianOperator:
    """``v -> H v`` for the Hessian of ``loss_fn`` at the current parameters.

    One forward and one backward with ``create_graph=True`` build the graph of the
    gradient once; each product is then one more backward through it (Pearlmutter's
    trick), with ``retain_graph`` so that power iteration can reuse it.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        with torch.enable_grad():
            self.loss = loss_fn()
            grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        # Gradients that do not depend on the parameters (unused ones, or ones the loss is linear in) add nothing.
        live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            products = torch.autograd.grad(
                [self.grads[i] for i in live],
                self.params,
                grad_outputs=[vectors[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, products, strict=True)]


def hessian_vector_product(loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """Return ``H v``, the Hessian of ``loss_fn`` at ``params`` times ``vectors``.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters (leaf tensors that require grad).
        vectors: One tensor per parameter, of its shape.

    Returns:
        One tensor per parameter.
    """
    return _HessianOperator(loss_fn, params)(vectors)


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
    tol: float = 1e-4,
    init: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    r"""Top (largest-magnitude) Hessian eigenvalue by power iteration on Hessian-vector products.

    ``v ← H v / ‖H v‖`` until the Rayleigh quotient ``λ = vᵀ H v`` changes by less than
    ``tol·|λ|`` (Yao et al. 2020, PyHessian; the measure of Cohen et al. 2021, "Gradient
    descent on neural networks typically occurs at the edge of stability"). Warm-started
    from the last eigenvector, it usually needs a few products.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        max_iters: At most this many Hessian-vector products.
        tol: Relative change of ``λ`` that stops the iteration.
        init: Starting vector (e.g. the eigenvector of the previous call); random otherwise.
        generator: For the random start.

    Returns:
        ``λ`` (a 0-dim float tensor) and its unit eigenvector (one tensor per parameter).
    """
    operator = _HessianOperator(loss_fn, params)
    v = [t.detach().clone() for t in init] if init is not None else _random_like(params, generator, rademacher=False)
    norm = _norm(v)
    v = [t / norm for t in v]
    eigenvalue = torch.zeros((), device=params[0].device)
    for i in range(max_iters):
        hv = operator(v)
        new = _dot(hv, v)
        norm = _norm(hv)
        if norm == 0:
            return norm, v
        v = [t / norm for t in hv]
        if i > 0 and (new - eigenvalue).abs() <= tol * new.abs():
            return new, v
        eigenvalue = new
    return eigenvalue, v


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    samples: int = 48,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Randomized estimate of the Hessian trace from ``samples`` Hessian-vector products.

    ``method="hutchinson"``: the mean of ``zᵀ H z`` over Rademacher vectors ``z``
    (Hutchinson 1990; PyHessian, Yao et al. 2020), unbiased with variance
    ``2(‖H‖_F² − Σ H_ii²)/samples``. ``method="hutch++"`` (the default; Meyer, Musco,
    Musco & Woodruff 2021): a third of the products sketch the top of the spectrum,
    ``Q = orth(H S)``, whose trace ``tr(QᵀHQ)`` is taken exactly, and Hutchinson's
    estimator with Rademacher vectors handles the rest, ``(I − QQᵀ) H (I − QQᵀ)``.
    Also unbiased, with far less variance when the spectrum decays, as Hessians of
    networks do; it keeps ``2·samples/3`` flat parameter-sized vectors during the call.
    Hutchinson's is exact for a diagonal Hessian, Hutch++ once ``samples/3`` reaches the
    Hessian's rank.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        samples: Number of Hessian-vector products.
        method: ``"hutch++"`` or ``"hutchinson"``.
        generator: For the random vectors.

    Returns:
        The estimate (0-dim tensor).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"Unknown trace method {method!r}: use 'hutch++' or 'hutchinson'.")
    operator = _HessianOperator(loss_fn, params)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def matvec(flat: Tensor) -> Tensor:
        vectors = [t.view(shape) for t, shape in zip(torch.split(flat, sizes), shapes, strict=True)]
        return torch.cat([h.flatten() for h in operator(vectors)])

    def rademacher() -> Tensor:
        return torch.cat([z.flatten() for z in _random_like(params, generator, rademacher=True)])

    if method == "hutchinson" or samples < 3:
        return torch.stack([torch.dot(z, matvec(z)) for z in (rademacher() for _ in range(samples))]).mean()
    k = samples // 3
    sketch = torch.stack([matvec(rademacher()) for _ in range(k)], dim=1)  # n x k
    q, _ = torch.linalg.qr(sketch)
    del sketch
    top = torch.stack([torch.dot(q[:, i], matvec(q[:, i])) for i in range(q.shape[1])]).sum()
    rest = []
    for _ in range(samples - 2 * k):
        g = rademacher()
        g = g - q @ (q.T @ g)
        rest.append(torch.dot(g, matvec(g)))
    return top + torch.stack(rest).mean()


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
    with torch.no_grad(), _restored(params) as saved:
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
    with _restored(params) as saved:
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
    with torch.no_grad(), _restored(params) as saved:
        losses = []
        for alpha in alphas.tolist():
            for p, w, d in zip(params, saved, direction, strict=True):
                p.copy_(w).add_(d, alpha=alpha)
            losses.append(loss_fn().detach())
        return torch.stack(losses)
