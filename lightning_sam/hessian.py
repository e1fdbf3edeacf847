"""The Hessian as an operator: Hessian-vector products, Lanczos, and what is built on them.

Pure functions of a loss closure and the parameters (no Lightning import), re-exported by
[`lightning_sam.sharpness`][lightning_sam.sharpness]:

- ``hessian_vector_product``: ``H v`` by double backward (Pearlmutter 1994) or, where
  double backward does not exist (fused attention kernels, custom autograd functions), by a
  central difference of two gradients; ``hvp="auto"`` falls back to the latter with one
  ``HVPFallbackWarning``.
- ``hessian_top_eigs``: the top-k eigenvalues by Lanczos with full re-orthogonalization, each
  with its residual ``‖Hv − λv‖/|λ|``, optionally of the preconditioned Hessian ``P⁻¹H``.
- ``hessian_trace``: Hutch++ or Hutchinson, with the standard error of the estimate.
- ``hessian_spectrum``: the eigenvalue density by stochastic Lanczos quadrature.

Every function leaves the parameters bitwise as it found them (restored from a copy),
never touches ``.grad``, draws random numbers only from the ``generator`` it is given, and
accumulates in float32 (float64 for float64 parameters) whatever the parameters' dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_sam._restore import weights_kept

__all__ = [
    "HVP_BACKENDS",
    "HVPFallbackWarning",
    "HessianOperator",
    "Spectrum",
    "TopEigenpairs",
    "TraceEstimate",
    "hessian_spectrum",
    "hessian_top_eigs",
    "hessian_trace",
    "hessian_vector_product",
]

LossFn = Callable[[], Tensor]
HVP_BACKENDS = ("auto", "autograd", "finite_difference")


class HVPFallbackWarning(RuntimeWarning):
    """Double backward failed and Hessian-vector products fell back to finite differences."""


class _Flat:
    """One vector for a list of tensors, and back: float32, or float64 for float64 parameters."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.numel = sum(self.sizes)
        self.device = params[0].device
        self.dtype = torch.float64 if torch.float64 in self.dtypes else torch.float32

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        parts = torch.split(flat, self.sizes)
        return [t.view(s).to(d) for t, s, d in zip(parts, self.shapes, self.dtypes, strict=True)]


def _gradients(loss_fn: LossFn, params: Sequence[Tensor], create_graph: bool) -> tuple[Tensor, list[Tensor]]:
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


class HessianOperator:
    """``v ↦ D H D v`` for the Hessian ``H`` of ``loss_fn`` at the current parameters (``D = I`` by default).

    ``backend="autograd"``: one forward and one backward with ``create_graph=True`` build the
    gradient's graph once; each product is one more backward through it (Pearlmutter's trick).
    ``backend="finite_difference"``: ``(∇L(w + h v) − ∇L(w − h v)) / 2h``, two forwards and
    backwards per product, exact for quadratics and otherwise off by ``O(h²)``, with
    ``h = ∛ε · (1 + ‖w‖)/‖v‖`` (``ε`` the machine epsilon of the coarsest parameter dtype, so
    that the step survives rounding into bf16 weights; bf16 products are then good to a few
    percent only); the weights are restored bitwise from a copy after each product.
    ``backend="auto"``: autograd, falling back to finite differences (with one
    ``HVPFallbackWarning``) when double backward raises.

    ``scale`` (a positive diagonal ``D``, one tensor per parameter) makes the operator the
    symmetric ``D H D``, whose eigenvalues are those of ``D² H``: with ``D² = P⁻¹`` the
    preconditioned Hessian of an adaptive optimizer.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters (leaf tensors that require grad).
        backend: One of ``HVP_BACKENDS``.
        scale: The diagonal ``D``, or None.

    Examples:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> H = HessianOperator(lambda: 3.0 * w[0] ** 2 + w[0] * w[1], [w])
        >>> H([torch.tensor([1.0, 0.0])])[0].tolist()
        [6.0, 1.0]
    """

    def __init__(
        self, loss_fn: LossFn, params: Sequence[Tensor], backend: str = "auto", scale: Sequence[Tensor] | None = None
    ) -> None:
        if backend not in HVP_BACKENDS:
            raise ValueError(f"Unknown Hessian-vector product backend {backend!r}: use one of {list(HVP_BACKENDS)}.")
        self.loss_fn, self.params, self.backend = loss_fn, list(params), backend
        self.scale = None if scale is None else [s.detach() for s in scale]
        self.products = 0
        self._grads: list[Tensor] | None = None
        if backend != "finite_difference":
            _, self._grads = _gradients(loss_fn, self.params, create_graph=True)

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """``D H D v``, one tensor per parameter."""
        self.products += 1
        if self.scale is not None:
            vectors = [v * s for v, s in zip(vectors, self.scale, strict=True)]
        products = self._product(vectors)
        if self.scale is not None:
            products = [h * s for h, s in zip(products, self.scale, strict=True)]
        return products

    def _product(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        if self.backend == "finite_difference":
            return self._finite_difference(vectors)
        try:
            return self._double_backward(vectors)
        except (RuntimeError, NotImplementedError) as error:
            if self.backend != "auto" or isinstance(error, torch.OutOfMemoryError):
                raise
            warnings.warn(
                "Hessian-vector products fall back to finite differences of two gradients, because double "
                f"backward failed ({str(error).splitlines()[0]}); pass hvp='finite_difference' to choose it "
                "upfront, or hvp='autograd' to make this an error.",
                HVPFallbackWarning,
                stacklevel=4,
            )
            self.backend, self._grads = "finite_difference", None
            return self._finite_difference(vectors)

    def _double_backward(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        grads = self._grads if self._grads is not None else []
        # Gradients that do not depend on the parameters (unused ones, or ones the loss is linear in) add nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[i] for i in live],
                self.params,
                grad_outputs=[vectors[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, products, strict=True)]

    def _finite_difference(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        params = self.params
        with torch.no_grad():
            w_norm = math.sqrt(sum(float(p.float().square().sum()) for p in params))
            v_norm = math.sqrt(sum(float(v.float().square().sum()) for v in vectors))
            if v_norm == 0:
                return [torch.zeros_like(p) for p in params]
            # The step must survive rounding into the coarsest parameter dtype (bf16's ε is 2^-7).
            eps = max(torch.finfo(p.dtype).eps for p in params)
            h = eps ** (1 / 3) * (1 + w_norm) / v_norm
        sides = []
        with weights_kept(params) as saved:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, w, v in zip(params, saved, vectors, strict=True):
                        p.copy_(w).add_(v, alpha=sign * h)
                sides.append(_gradients(self.loss_fn, params, create_graph=False)[1])
        return [
            (plus.to(wide) - minus.to(wide)).div_(2 * h).to(p.dtype)
            for p, plus, minus in zip(params, *sides, strict=True)
            for wide in [torch.promote_types(p.dtype, torch.float32)]
        ]


def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor], *, hvp: str = "auto"
) -> list[Tensor]:
    """Return ``H v``, the Hessian of ``loss_fn`` at ``params`` times ``vectors``.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters (leaf tensors that require grad).
        vectors: One tensor per parameter, of its shape.
        hvp: The backend, one of ``HVP_BACKENDS`` (see ``HessianOperator``).

    Returns:
        One tensor per parameter.
    """
    return HessianOperator(loss_fn, params, hvp)(vectors)


def _random_flat(flat: _Flat, generator: torch.Generator | None, rademacher: bool) -> Tensor:
    z = torch.randn(flat.numel, generator=generator, dtype=torch.float32).to(flat.device, flat.dtype)
    return z.sign().add_(z == 0) if rademacher else z


@dataclass
class _Lanczos:
    """The Lanczos decomposition ``H V = V T + β v eᵀ`` built so far (full re-orthogonalization)."""

    alphas: list[float]
    betas: list[float]  # betas[j] couples basis vectors j and j+1; the last one is the residual's
    basis: Tensor  # rows: the orthonormal basis vectors

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors of the tridiagonal ``T`` (float64, on the CPU)."""
        m = len(self.alphas)
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        return values, vectors


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    iters: int,
    generator: torch.Generator | None,
    done: Callable[[_Lanczos], bool] | None = None,
) -> _Lanczos:
    """Up to ``iters`` Lanczos steps from ``start``, stopping early once ``done`` says so."""
    n = start.numel()
    iters = min(iters, n)
    basis = torch.empty(min(iters, 16), n, dtype=start.dtype, device=start.device)
    state = _Lanczos([], [], basis[:0])
    v = start / start.norm()
    for j in range(iters):
        if j == basis.shape[0]:  # grow the storage geometrically: memory is the iterations actually taken
            grown = torch.empty(min(2 * j, iters), n, dtype=start.dtype, device=start.device)
            grown[:j] = basis[:j]
            basis = grown
        basis[j] = v
        w = matvec(v)
        alpha = float(torch.dot(w, v))
        done_rows = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough"): full re-orthogonalization
            w -= done_rows.T @ (done_rows @ w)
        beta = float(w.norm())
        state = _Lanczos([*state.alphas, alpha], [*state.betas, beta], done_rows)
        if j + 1 == iters or (done is not None and done(state)):
            break
        if beta <= 1e-10 * max(abs(a) for a in state.alphas):  # an invariant subspace: go on in a fresh direction
            state.betas[-1] = 0.0
            w = torch.randn(n, generator=generator, dtype=torch.float32).to(w)
            for _ in range(2):
                w -= done_rows.T @ (done_rows @ w)
            beta = float(w.norm())
            if beta == 0:
                break
        v = w / beta
    return state


class TopEigenpairs(NamedTuple):
    """The top eigenvalues (descending), their unit eigenvectors (one tensor per parameter each) and residuals.

    ``residuals[i] = ‖A v_i − λ_i v_i‖ / |λ_i|`` for the operator ``A`` the eigenvalues are of;
    some eigenvalue of ``A`` lies within ``residuals[i]·|λ_i|`` of ``λ_i`` (for a symmetric
    ``A``), so it is an error bar that needs no reference. ``products`` counts the
    Hessian-vector products spent.
    """

    eigenvalues: Tensor
    eigenvectors: list[list[Tensor]]
    residuals: Tensor
    products: int


def hessian_top_eigs(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    *,
    max_iters: int = 100,
    tol: float = 1e-2,
    init: Sequence[Sequence[Tensor]] | None = None,
    preconditioner: Sequence[Tensor] | None = None,
    hvp: str = "auto",
    generator: torch.Generator | None = None,
) -> TopEigenpairs:
    r"""The ``k`` largest Hessian eigenvalues by Lanczos with full re-orthogonalization.

    Lanczos (1950) builds an orthonormal basis of the Krylov space ``{v, Hv, H²v, …}`` from
    one Hessian-vector product per step; the eigenvalues of the small tridiagonal matrix it
    produces (Ritz values) converge to the extreme eigenvalues far faster than power
    iteration does (PyHessian, Yao et al. 2020: power iteration, plus deflation for
    ``top_n``). The iteration stops when each of the top ``k`` has a relative residual
    ``‖Hv − λv‖/|λ| ≤ tol``, read from the recurrence without extra products. The basis is
    kept and every new vector re-orthogonalized against it (twice), so there are no ghost
    eigenvalues; it costs one float32 parameter-sized vector per step.

    With ``preconditioner`` (the diagonal ``P`` of an adaptive optimizer, one positive tensor
    per parameter), the eigenvalues are those of ``P⁻¹H``, the preconditioned sharpness of
    Cohen et al. 2022, computed on the symmetric ``P^{-1/2} H P^{-1/2}``; the eigenvectors
    returned are that operator's.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        k: How many of the top (largest, algebraically) eigenvalues.
        max_iters: At most this many Hessian-vector products.
        tol: Relative residual that ends the iteration.
        init: Starting vectors (e.g. the eigenvectors of the previous call, which makes the
            next call cheap); random otherwise. A small random part is always mixed in.
        preconditioner: The diagonal ``P``, or None for ``H`` itself.
        hvp: The Hessian-vector product backend (see ``HessianOperator``).
        generator: For the random start.

    Returns:
        A ``TopEigenpairs``.

    Examples:
        >>> w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> loss_fn = lambda: 3.0 * w[0] ** 2 + 0.5 * w[1] ** 2 - w[2] ** 2  # Hessian diag(6, 1, -2)
        >>> top = hessian_top_eigs(loss_fn, [w], k=2)
        >>> [round(x, 4) for x in top.eigenvalues.tolist()]
        [6.0, 1.0]
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer (how many eigenvalues), got {k!r}.")
    if max_iters < k:
        raise ValueError(f"max_iters ({max_iters}) must be at least k ({k}).")
    params = list(params)
    flat = _Flat(params)
    scale = None if preconditioner is None else [p.to(flat.dtype).reciprocal().sqrt() for p in preconditioner]
    operator = HessianOperator(loss_fn, params, hvp, scale)
    k = min(k, flat.numel)
    start = _random_flat(flat, generator, rademacher=False)
    if init and all([t.shape for t in v] == flat.shapes for v in init):  # a changed parameter set starts afresh
        warm = sum(flat.flatten(v) for v in init)
        if isinstance(warm, Tensor) and bool(warm.norm() > 0):
            start = warm / warm.norm() + 0.1 * start / start.norm()

    def residuals(state: _Lanczos) -> tuple[Tensor, Tensor, Tensor]:
        values, vectors = state.ritz()
        top = values[-k:].flip(0)
        s = vectors[:, -k:].flip(1)
        residual = state.betas[-1] * s[-1].abs()  # ‖H y − θ y‖ for the Ritz vector y, without a product
        return top, s, residual / top.abs().clamp_min(1e-30)

    def converged(state: _Lanczos) -> bool:
        return len(state.alphas) >= k and bool((residuals(state)[2] <= tol).all())

    state = _lanczos(lambda x: flat.flatten(operator(flat.unflatten(x))), start, max_iters, generator, converged)
    top, s, residual = residuals(state)
    vectors = s.to(state.basis).T @ state.basis  # k x n
    return TopEigenpairs(
        top.to(flat.device, flat.dtype),
        [flat.unflatten(row) for row in vectors],
        residual.to(flat.device, flat.dtype),
        operator.products,
    )


class TraceEstimate(NamedTuple):
    """A trace estimate and its standard error (the spread of the random part over its samples)."""

    trace: Tensor
    stderr: Tensor


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    samples: int = 48,
    method: str = "hutch++",
    hvp: str = "auto",
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    r"""Randomized estimate of the Hessian trace from ``samples`` Hessian-vector products, with its standard error.

    ``method="hutchinson"``: the mean of ``zᵀ H z`` over Rademacher vectors ``z``
    (Hutchinson 1990; PyHessian, Yao et al. 2020), unbiased with variance
    ``2(‖H‖_F² − Σ H_ii²)/samples``. ``method="hutch++"`` (the default; Meyer, Musco,
    Musco & Woodruff 2021): a third of the products sketch the top of the spectrum,
    ``Q = orth(H S)``, whose trace ``tr(QᵀHQ)`` is taken exactly, and Hutchinson's
    estimator handles the rest, ``(I − QQᵀ) H (I − QQᵀ)``. Also unbiased, with far less
    variance when the spectrum decays, as Hessians of networks do; it keeps
    ``2·samples/3`` flat parameter-sized vectors during the call. The standard error is the
    sample standard deviation of the Hutchinson terms over ``√samples`` (for Hutch++: of
    the residual part, given the sketch, which is exact); zero when the estimate is exact.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        samples: Number of Hessian-vector products (at least 2).
        method: ``"hutch++"`` or ``"hutchinson"``.
        hvp: The Hessian-vector product backend (see ``HessianOperator``).
        generator: For the random vectors.

    Returns:
        A ``TraceEstimate`` of 0-dim tensors.

    Examples:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_trace(lambda: 3.0 * w[0] ** 2 + 0.5 * w[1] ** 2, [w]).trace.item()
        7.0
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"Unknown trace method {method!r}: use 'hutch++' or 'hutchinson'.")
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (a mean and its spread), got {samples!r}.")
    params = list(params)
    operator = HessianOperator(loss_fn, params, hvp)
    flat = _Flat(params)

    def matvec(x: Tensor) -> Tensor:
        return flat.flatten(operator(flat.unflatten(x)))

    def mean_and_stderr(terms: list[Tensor]) -> tuple[Tensor, Tensor]:
        stacked = torch.stack(terms)
        return stacked.mean(), stacked.std() / math.sqrt(len(terms))

    if method == "hutchinson" or samples < 6:
        terms = [torch.dot(z, matvec(z)) for z in (_random_flat(flat, generator, True) for _ in range(samples))]
        return TraceEstimate(*mean_and_stderr(terms))
    k = samples // 3
    sketch = torch.stack([matvec(_random_flat(flat, generator, True)) for _ in range(k)], dim=1)  # n x k
    q, _ = torch.linalg.qr(sketch)
    del sketch
    top = torch.stack([torch.dot(q[:, i], matvec(q[:, i])) for i in range(q.shape[1])]).sum()
    rest = []
    for _ in range(samples - 2 * k):
        g = _random_flat(flat, generator, True)
        g = g - q @ (q.T @ g)
        rest.append(torch.dot(g, matvec(g)))
    mean, stderr = mean_and_stderr(rest)
    return TraceEstimate(top + mean, stderr)


@dataclass
class Spectrum:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature, as nodes and weights.

    Each run ``r`` gives a Gauss quadrature rule ``Σ_i weights[r, i] f(nodes[r, i]) ≈
    (1/n) tr f(H)``: exact, for its start vector, for polynomials ``f`` of degree below
    ``2·iters``, and the start vectors' average is unbiased for the spectrum's moments.

    Attributes:
        nodes: Ritz values, ``runs x iters``.
        weights: Their weights (each run's sum to 1), ``runs x iters``.
    """

    nodes: Tensor
    weights: Tensor

    def moment(self, power: int) -> Tensor:
        """``(1/n) tr Hᵖ``, estimated."""
        return (self.weights * self.nodes.pow(power)).sum(dim=1).mean()

    def negative_fraction(self, rtol: float = 1e-2) -> Tensor:
        """The estimated fraction of eigenvalues below ``−rtol·max|λ|``.

        A network's Hessian has a bulk of eigenvalues near zero of both signs that a few dozen
        quadrature nodes cannot resolve: one node near zero carries much of the weight, and its
        sign would flip the count from run to run. The default counts the negative mass beyond
        1% of the largest magnitude (the density's default smoothing width), which they resolve.
        """
        threshold = -rtol * self.nodes.abs().max()
        return (self.weights * (self.nodes < threshold)).sum(dim=1).mean()

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """The density on ``grid``: each node a Gaussian of width ``sigma`` (Ghorbani et al. 2019).

        Args:
            grid: Points (1-D).
            sigma: The width; default: 1% of the nodes' range.

        Returns:
            The density at each point (integrates to 1).
        """
        if sigma is None:
            sigma = max(float(self.nodes.max() - self.nodes.min()) / 100, 1e-12)
        x = grid.to(self.nodes).reshape(-1, 1, 1)
        bumps = torch.exp(-0.5 * ((x - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (bumps * self.weights).sum(dim=2).mean(dim=1)


def hessian_spectrum(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    iters: int = 80,
    runs: int = 1,
    hvp: str = "auto",
    generator: torch.Generator | None = None,
) -> Spectrum:
    r"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019).

    Each run starts Lanczos from a normalized Rademacher vector ``v`` and takes ``iters``
    steps; the eigenvalues ``θ_i`` of the tridiagonal matrix are the nodes and the squared
    first components ``τ_i²`` of its eigenvectors the weights, so that
    ``Σ τ_i² f(θ_i) = vᵀ f(H) v`` for polynomials of degree below ``2·iters``. The extreme
    nodes converge to the extreme eigenvalues; the inner ones describe where the mass is.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        iters: Lanczos steps (Hessian-vector products) per run.
        runs: Independent start vectors.
        hvp: The Hessian-vector product backend (see ``HessianOperator``).
        generator: For the start vectors.

    Returns:
        A ``Spectrum`` (float64 nodes and weights, on the CPU).

    Examples:
        >>> w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> spectrum = hessian_spectrum(lambda: w[0] ** 2 + w[1] ** 2 - 2 * w[2] ** 2, [w], iters=3)
        >>> round(spectrum.negative_fraction().item(), 6), round(spectrum.moment(2).item(), 6)  # eigenvalues 2, 2, -4
        (0.333333, 8.0)
    """
    if iters < 1 or runs < 1:
        raise ValueError(f"iters and runs must be positive integers, got iters={iters!r}, runs={runs!r}.")
    params = list(params)
    operator = HessianOperator(loss_fn, params, hvp)
    flat = _Flat(params)
    nodes, weights = [], []
    for _ in range(runs):
        start = _random_flat(flat, generator, rademacher=True)
        state = _lanczos(lambda x: flat.flatten(operator(flat.unflatten(x))), start, iters, generator)
        values, vectors = state.ritz()
        nodes.append(values)
        weights.append(vectors[0].square())
    width = max(len(n) for n in nodes)
    return Spectrum(
        torch.stack([torch.nn.functional.pad(n, (0, width - len(n))) for n in nodes]),
        torch.stack([torch.nn.functional.pad(w, (0, width - len(w))) for w in weights]),
    )
