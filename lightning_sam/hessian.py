"""The Hessian as an operator: Hessian-vector products, Lanczos, and what is built on them.

Pure functions of a loss closure and the parameters (no Lightning import), re-exported by
[`lightning_sam.sharpness`][lightning_sam.sharpness]:

- ``hessian_vector_product``: ``H v`` by double backward (Pearlmutter 1994) or, where
  double backward does not exist (custom autograd functions, FSDP2), by a central
  difference of two gradients; ``hvp="auto"`` falls back to the latter with one
  ``HVPFallbackWarning``. The graph that double backward runs through is built with
  attention in its math kernel (``torch.nn.attention.SDPBackend.MATH``), since the fused
  ones (flash attention, also on the CPU) have no double backward.
- ``hessian_top_eigs``: the top-k eigenvalues by Lanczos with full re-orthogonalization, each
  with its residual ``‖Hv − λv‖/|λ|`` (with finite differences: plus their estimated error),
  optionally of the preconditioned Hessian ``P⁻¹H``.
- ``hessian_trace``: Hutch++ or Hutchinson, with the standard error of the estimate.
- ``hessian_spectrum``: the eigenvalue density by stochastic Lanczos quadrature.

Every function leaves the parameters bitwise as it found them (restored from a copy),
leaves ``.grad`` as it was, draws random numbers only from the ``generator`` it is given, and
accumulates in float32 (float64 for float64 parameters) whatever the parameters' dtype.

Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism, both on a 2-D
mesh) are measured where they lie: each rank holds its shards of every vector, and each
inner product is its local part all-reduced over the parameters' mesh (entries a mesh
dimension replicates counted once), so every rank takes the same decisions and returns the
same numbers; random vectors are drawn whole from the generator and each rank keeps its
shards, so that a sharded run draws the numbers one process would. Eigenvectors come back
as DTensors placed like the parameters. Tensor-parallel parameters are leaves of the loss,
so their products are by double backward; FSDP2 all-gathers its parameters outside
autograd, so their gradients come from ``loss.backward()`` (reduce-scattered: of the loss
averaged over the ranks, i.e. of one process on the concatenated batch) and their products
are finite differences.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sam._compat import fsdp2_sharded_params
from lightning_sam._restore import weights_kept
from lightning_sam.functional import _locals, like_param

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
    "loss_gradient",
]

LossFn = Callable[[], Tensor]
HVP_BACKENDS = ("auto", "autograd", "finite_difference")
# (4/3)‖A_h v − A_{h/2} v‖ estimates the error of the central difference A_h v: Richardson's estimate of its O(h²)
# truncation error, and at least the error of the parts that grow as h shrinks (rounding, kinks such as ReLU's).
_RICHARDSON = 4 / 3


class HVPFallbackWarning(RuntimeWarning):
    """Double backward failed and Hessian-vector products fell back to finite differences."""


class _NoGradientGraph(Exception):
    """The backward with ``create_graph=True`` raised ``error`` (a gradient without a graph to differentiate)."""

    def __init__(self, error: RuntimeError | NotImplementedError) -> None:
        super().__init__(str(error))
        self.error = error


def _placements(p: Tensor, ndim: int) -> tuple[Any, ...]:
    """A DTensor's placements; a plain tensor among DTensors is whole on every rank (replicated)."""
    return tuple(p.placements) if isinstance(p, DTensor) else (Replicate(),) * ndim


class _Flat:
    """One vector for a list of tensors, and back; and the inner products of such vectors.

    Float32, or float64 for float64 parameters. For sharded parameters (DTensors) a vector
    is this rank's part of it: the local shards, flattened; an inner product is the local
    partial sum all-reduced over the parameters' mesh, with the entries that a mesh dimension
    replicates counted on its coordinate 0 only. Plain tensors among DTensors count as
    replicated. Unsharded parameters take the plain tensor operations, without a collective.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        local = _locals(self.params)
        self.shapes = [p.shape for p in self.params]  # whole (a DTensor's shape is its global one)
        self.local_shapes = [t.shape for t in local]
        self.sizes = [t.numel() for t in local]
        self.dtypes = [p.dtype for p in self.params]
        self.numel = sum(self.sizes)  # this rank's
        self.global_numel = sum(p.numel() for p in self.params)
        self.device = local[0].device if local else torch.device("cpu")
        self.dtype = torch.float64 if torch.float64 in self.dtypes else torch.float32
        self.mesh = _mesh_of(self.params)
        self.counted = [True] * len(self.params)
        self._mask: Tensor | None = None
        self._groups: list[Any] = []
        if self.mesh is not None:
            coordinate = self.mesh.get_coordinate()
            if coordinate is None:
                raise ValueError(
                    "this rank is not in the parameters' device mesh: call the Hessian estimators on the ranks that "
                    "hold the parameters."
                )
            ndim = self.mesh.ndim
            self.counted = [
                all(c == 0 for c, pl in zip(coordinate, _placements(p, ndim), strict=True) if pl.is_replicate())
                for p in self.params
            ]
            if not all(self.counted):
                self._mask = torch.cat(
                    [
                        torch.full((n,), float(c), dtype=self.dtype, device=self.device)
                        for n, c in zip(self.sizes, self.counted, strict=True)
                    ]
                )
            whole_world = self.mesh.size() == dist.get_world_size()
            self._groups = [None] if whole_world else [self.mesh.get_group(d) for d in range(ndim)]

    @property
    def sharded(self) -> bool:
        """Whether the parameters are DTensors (vectors are local parts, inner products collectives)."""
        return self.mesh is not None

    # Between per-parameter tensors and flat vectors -----------------------------------------------------------------

    def locals_of(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's part on this rank, for tensors shaped like the parameters.

        A DTensor is redistributed to its parameter's placements (no communication when they
        already match); a whole plain tensor (the same on every rank) is cut into this
        rank's shard; a tensor of the local shard's shape is taken as it is.
        """
        if self.mesh is None:
            return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]
        return [_local_like(p, t, s) for p, t, s in zip(self.params, tensors, self.local_shapes, strict=True)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """One flat vector (this rank's part) of tensors shaped like the parameters."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in self.locals_of(tensors)])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Back to one tensor per parameter: local shards for DTensors (see ``wrap``), in the parameters' dtypes."""
        parts = torch.split(flat, self.sizes)
        return [t.view(s).to(d) for t, s, d in zip(parts, self.local_shapes, self.dtypes, strict=True)]

    def wrap(self, local: Sequence[Tensor]) -> list[Tensor]:
        """Local parts as the parameters are held: DTensors placed like them (no communication), plain tensors as is."""
        if self.mesh is None:
            return list(local)
        return [like_param(p, t) for p, t in zip(self.params, local, strict=True)]

    def random(self, generator: torch.Generator | None, rademacher: bool) -> Tensor:
        """A standard normal (or Rademacher) vector drawn whole from ``generator``: this rank's part of it."""
        z = torch.randn(self.global_numel, generator=generator, dtype=torch.float32)
        if self.mesh is not None:
            wholes = torch.split(z, [p.numel() for p in self.params])
            z = torch.cat(
                [
                    _shard_of(p, w.view(p.shape).to(self.device)).reshape(-1)
                    for p, w in zip(self.params, wholes, strict=True)
                ]
            )
        z = z.to(self.device, self.dtype)
        return z.sign().add_(z == 0) if rademacher else z

    # Reductions -----------------------------------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        for group in self._groups:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
        return t

    def _counted(self, x: Tensor) -> Tensor:
        return x if self._mask is None else x * self._mask

    def dot(self, x: Tensor, y: Tensor) -> Tensor:
        """``xᵀy`` (0-dim), the same on every rank."""
        if self.mesh is None:
            return torch.dot(x, y)
        return self._all_reduce(torch.dot(self._counted(x), y))

    def gram(self, rows: Tensor, w: Tensor) -> Tensor:
        """``rows @ w``: every row's inner product with ``w``, in one all-reduce."""
        if self.mesh is None:
            return rows @ w
        return self._all_reduce(rows @ self._counted(w))

    def norm(self, x: Tensor) -> Tensor:
        """``‖x‖`` (0-dim), the same on every rank."""
        if self.mesh is None:
            norm: Tensor = x.norm()
            return norm
        return self.dot(x, x).clamp_min(0).sqrt()

    def sum_of_squares(self, local: Sequence[Tensor]) -> float:
        """``Σ‖t‖²`` of per-parameter local tensors, in float32 or wider."""
        total = sum(
            (
                t.to(torch.promote_types(t.dtype, torch.float32)).square().sum()
                for t, c in zip(local, self.counted, strict=True)
                if c
            ),
            torch.zeros((), dtype=self.dtype, device=self.device),
        )
        return float(self._all_reduce(total.to(self.dtype)))

    def max(self, value: Tensor) -> Tensor:
        """The largest of every rank's ``value`` (0-dim)."""
        return self._all_reduce(value, dist.ReduceOp.MAX) if self.mesh is not None else value


def _mesh_of(params: Sequence[Tensor]) -> Any:
    """The one device mesh of the DTensors among ``params`` (None when there is none)."""
    meshes: list[Any] = []
    for p in params:
        if isinstance(p, DTensor):
            if any(pl.is_partial() for pl in p.placements):
                raise ValueError(
                    f"a parameter is a DTensor with a Partial placement ({p.placements}): parameters must be Shard "
                    "or Replicate on every mesh dimension; redistribute it first."
                )
            if not any(p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
    if len(meshes) > 1:
        raise ValueError(
            f"the parameters are DTensors on {len(meshes)} different device meshes; the Hessian estimators measure "
            "parameters on one mesh: pass each mesh's parameters in a call of their own."
        )
    return meshes[0] if meshes else None


def _shard_of(p: Tensor, whole: Tensor) -> Tensor:
    """This rank's shard of ``whole`` (the same on every rank) as ``p`` is placed, without communication."""
    if not isinstance(p, DTensor):
        return whole
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _local_like(p: Tensor, t: Tensor, local_shape: torch.Size) -> Tensor:
    """``t``'s part on this rank as ``p`` is placed (see ``_Flat.locals_of``)."""
    if isinstance(t, DTensor):
        if isinstance(p, DTensor) and (t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements)):
            t = t.redistribute(p.device_mesh, p.placements)
        return t.to_local() if isinstance(p, DTensor) else t.full_tensor()
    if t.shape == p.shape:
        return _shard_of(p, t)
    if t.shape == local_shape:
        return t
    raise ValueError(
        f"a vector of shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)} (local shard "
        f"{tuple(local_shape)}): pass DTensors placed like the parameters, or whole tensors of their shapes."
    )


def _placed_like(p: Tensor, g: Tensor) -> Tensor:
    """A gradient (or product) DTensor redistributed to its parameter's placements, where they differ."""
    if isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
        return g.redistribute(p.device_mesh, p.placements)
    return g


def _grad_holders(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``params`` and every other tensor whose ``.grad`` ``loss.backward()`` may write (each once).

    The leaves of the loss's graph, and the sharded parameters of the FSDP2 trees ``params`` are in.
    """
    found: dict[int, Tensor] = {id(p): p for p in params}
    for t in fsdp2_sharded_params(params):
        found.setdefault(id(t), t)
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if isinstance(variable, Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


class HessianOperator:
    """``v ↦ D H D v`` for the Hessian ``H`` of ``loss_fn`` at the current parameters (``D = I`` by default).

    ``backend="autograd"``: one forward and one backward with ``create_graph=True`` (attention
    in its math kernel, which has a double backward) build the gradient's graph once; each
    product is one more backward through it (Pearlmutter's trick).
    ``backend="finite_difference"``: ``(∇L(w + h u) − ∇L(w − h u)) / 2h`` for the vector
    ``u = D v`` that the gradient is taken along, two forwards and backwards per product,
    exact for quadratics and otherwise off by ``O(h²)`` (and by more across a kink, such as
    ReLU's). The step moves the coordinate that moves most by ``∛ε`` of its own size:
    ``h = ∛ε / maxᵢ(|uᵢ| / (|wᵢ| + ρ))`` with ``ρ = (1 + ‖w‖)/√n`` (the weights' RMS, at
    least ``1/√n``) and ``ε`` the machine epsilon of the coarsest parameter dtype, so that
    the step survives rounding into bf16 weights (bf16 products are then good to a few
    percent only), and coordinates that ``D`` blows up (where an adaptive optimizer's
    second moment is tiny) are not moved far past the point. The weights are restored
    bitwise from a copy after each product.
    ``backend="auto"``: autograd, falling back to finite differences (with one
    ``HVPFallbackWarning``) when double backward raises, or when the parameters are FSDP2's.

    ``scale`` (a positive diagonal ``D``, one tensor per parameter) makes the operator the
    symmetric ``D H D``, whose eigenvalues are those of ``D² H``: with ``D² = P⁻¹`` the
    preconditioned Hessian of an adaptive optimizer.

    Sharded parameters (DTensors): vectors are DTensors placed like the parameters (or whole
    tensors, the same on every rank), and so are the products. With FSDP2's ``fully_shard``
    the gradients come from ``loss.backward()`` (``.grad`` is put back as it was), and are
    of the loss averaged over the ranks; ``backend="autograd"`` is then an error.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters (leaf tensors that require grad, or DTensors).
        backend: One of ``HVP_BACKENDS``.
        scale: The diagonal ``D``, or None.

    Raises:
        ValueError: An unknown backend, or ``"autograd"`` for FSDP2's parameters.

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
        self.flat = _Flat(self.params)
        self.scale = None if scale is None else [s.detach() for s in self.flat.locals_of(scale)]
        self.products = 0
        self._grads: list[Tensor] | None = None
        # Whether gradients come from loss.backward() (FSDP2); None: not known yet (found out on the first gradient).
        self._by_backward: bool | None = None if self.flat.sharded else False
        self._holders: list[Tensor] | None = None
        self._rho: float | None = None
        if backend != "finite_difference":
            try:
                grads = self._gradient(create_graph=True)
            except _NoGradientGraph as failed:
                self._fall_back(failed.error, stacklevel=4)
                return
            if not self._by_backward:
                self._grads = grads
            elif backend == "autograd":
                raise ValueError(
                    "hvp='autograd' needs double backward, which FSDP2 (fully_shard) parameters do not have: FSDP2 "
                    "gathers them outside autograd, so their gradients come from loss.backward(). Use "
                    "hvp='finite_difference' (or hvp='auto', which falls back to it)."
                )
            else:
                warnings.warn(
                    "Hessian-vector products are finite differences of two gradients: the parameters are FSDP2's "
                    "(fully_shard), whose gradients come from loss.backward() without double backward; pass "
                    "hvp='finite_difference' to choose it upfront.",
                    HVPFallbackWarning,
                    stacklevel=3,
                )
                self.backend = "finite_difference"

    @property
    def exact(self) -> bool:
        """Whether the products are exact (double backward), not finite differences (``auto`` may fall back)."""
        return self.backend != "finite_difference"

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """``D H D v``, one tensor per parameter (DTensors placed like the parameters, for DTensors)."""
        return self.flat.wrap(self.local(self.flat.locals_of(vectors)))

    def local(self, vectors: Sequence[Tensor], step: float = 1.0) -> list[Tensor]:
        """``D H D v`` on this rank's parts: local shards in, local shards out.

        Args:
            vectors: One tensor per parameter, its local shard (the whole tensor when unsharded).
            step: A factor on the finite-difference step (``with_error`` takes half of it).

        Returns:
            One local tensor per parameter.
        """
        self.products += 1
        if self.scale is not None:
            vectors = [v * s for v, s in zip(vectors, self.scale, strict=True)]
        products = self._product(vectors, step)
        if self.scale is not None:
            products = [h * s for h, s in zip(products, self.scale, strict=True)]
        return products

    def flat_product(self, x: Tensor, step: float = 1.0) -> Tensor:
        """``D H D x`` of a flat vector (this rank's part, as ``_Flat`` lays it out)."""
        return self.flat.flatten(self.local(self.flat.unflatten(x), step))

    def with_error(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``D H D x`` of a flat vector, and the estimated error of that product (zero when exact).

        With finite differences the product ``A_h x`` is taken twice, at the step and at half
        of it, and the error is estimated as ``(4/3)(A_h x − A_{h/2} x)``: Richardson's
        estimate of the ``O(h²)`` truncation error, and at least the error of what grows as
        the step shrinks (rounding, a kink crossed). Two products; one when exact.
        """
        product = self.flat_product(x)
        if self.exact:
            return product, torch.zeros_like(product)
        return product, (product - self.flat_product(x, 0.5)).mul_(_RICHARDSON)

    def _product(self, vectors: Sequence[Tensor], step: float) -> list[Tensor]:
        if self.backend == "finite_difference":
            return self._finite_difference(vectors, step)
        try:
            return self._double_backward(vectors)
        except (RuntimeError, NotImplementedError) as error:
            self._fall_back(error, stacklevel=6)
            return self._finite_difference(vectors, step)

    def _fall_back(self, error: BaseException, stacklevel: int) -> None:
        """Double backward raised ``error``: finite differences from now on (one warning), or re-raise it."""
        if self.backend != "auto" or isinstance(error, torch.OutOfMemoryError):
            raise error from None
        # The error's first sentence: its advice (aot_autograd's to turn off buffer donation) would not help here.
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            "Hessian-vector products fall back to finite differences of two gradients, because double "
            f"backward failed ({reason}); pass hvp='finite_difference' to choose it "
            "upfront, or hvp='autograd' to make this an error.",
            HVPFallbackWarning,
            stacklevel=stacklevel,
        )
        self.backend, self._grads = "finite_difference", None

    def _gradient(self, create_graph: bool) -> list[Tensor]:
        """``∇L`` at the current weights, one tensor per parameter (placed like it; zeros where the loss ignores it)."""
        detect = self._by_backward is None
        math_attention = sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()
        with torch.enable_grad(), math_attention:
            loss = self.loss_fn()
            if self._by_backward:
                return self._backward_gradient(loss)
            try:
                grads = torch.autograd.grad(
                    loss,
                    self.params,
                    create_graph=create_graph,
                    allow_unused=True,
                    retain_graph=True if detect else None,
                )
            except (RuntimeError, NotImplementedError) as error:
                if not create_graph or isinstance(error, torch.OutOfMemoryError):
                    raise
                # A backward that cannot build its own graph: a torch.compile'd module's, compiled before by a
                # training step (aot_autograd donated buffers to it, and raises under create_graph=True).
                raise _NoGradientGraph(error) from error
            if detect:
                # FSDP2's parameters are not in the loss's graph (gathered outside autograd): no gradient for any.
                self._by_backward = loss.requires_grad and all(g is None for g in grads)
                if self._by_backward:
                    return self._backward_gradient(loss)
        return [
            torch.zeros_like(p) if g is None else _placed_like(p, g) for p, g in zip(self.params, grads, strict=True)
        ]

    def _backward_gradient(self, loss: Tensor) -> list[Tensor]:
        """The gradients ``loss.backward()`` leaves in ``.grad`` (FSDP2: reduce-scattered), ``.grad`` put back after."""
        if self._holders is None:
            self._holders = _grad_holders(loss, self.params)
        saved = [t.grad for t in self._holders]
        try:
            for t in self._holders:
                t.grad = None
            loss.backward()  # type: ignore[no-untyped-call]
            grads = [p.grad for p in self.params]
        finally:
            for t, g in zip(self._holders, saved, strict=True):
                t.grad = g
        if all(g is None for g in grads):
            raise ValueError(
                "loss.backward() left no gradient on any of the parameters: they are not in the loss's graph, and no "
                "backward hook (as FSDP2's reduce-scatter) wrote one. With FSDP2, keep gradient synchronization on "
                "(set_requires_gradient_sync(True)) while measuring."
            )
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads, strict=True)]

    def _double_backward(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        grads = self._grads if self._grads is not None else []
        # Gradients that do not depend on the parameters (unused ones, or ones the loss is linear in) add nothing.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(t) for t in _locals(self.params)]
        outputs = self.flat.wrap(vectors)
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[i] for i in live],
                self.params,
                grad_outputs=[outputs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
        if not self.flat.sharded:
            return [
                torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, products, strict=True)
            ]
        return [
            torch.zeros_like(t) if h is None else _local_like(p, h.detach(), t.shape)
            for p, t, h in zip(self.params, _locals(self.params), products, strict=True)
        ]

    def _step(self, vectors: Sequence[Tensor]) -> float:
        """The finite-difference step ``h`` along ``vectors`` (local parts): see the class docstring."""
        local_params = _locals(self.params)
        with torch.no_grad():
            if self._rho is None:
                w_norm = math.sqrt(self.flat.sum_of_squares(local_params))
                self._rho = (1 + w_norm) / math.sqrt(max(self.flat.global_numel, 1))
            rho = self._rho
            ratios = [
                (v.to(wide).abs() / w.to(wide).abs().add_(rho)).amax()
                for v, w in zip(vectors, local_params, strict=True)
                if v.numel() > 0
                for wide in [torch.promote_types(w.dtype, torch.float32)]
            ]
            local_max = torch.stack([r.to(self.flat.dtype) for r in ratios]).amax() if ratios else None
            if local_max is None:
                local_max = torch.zeros((), dtype=self.flat.dtype, device=self.flat.device)
            ratio = float(self.flat.max(local_max))
        if ratio == 0:
            return 0.0
        # The step must survive rounding into the coarsest parameter dtype (bf16's ε is 2^-7).
        eps = max(torch.finfo(p.dtype).eps for p in self.params)
        return float(eps ** (1 / 3) / ratio)

    def _finite_difference(self, vectors: Sequence[Tensor], step: float = 1.0) -> list[Tensor]:
        params = self.params
        h = self._step(vectors) * step
        local_params = _locals(params)
        if h == 0:
            return [torch.zeros_like(p) for p in local_params]
        sides = []
        with weights_kept(params) as saved:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, w, v in zip(local_params, saved, vectors, strict=True):
                        p.copy_(w).add_(v, alpha=sign * h)
                sides.append(self.flat.locals_of(self._gradient(create_graph=False)))
        return [
            (plus.to(wide) - minus.to(wide)).div_(2 * h).to(p.dtype)
            for p, plus, minus in zip(local_params, *sides, strict=True)
            for wide in [torch.promote_types(p.dtype, torch.float32)]
        ]


def loss_gradient(loss_fn: LossFn, params: Sequence[Tensor]) -> list[Tensor]:
    """``∇L`` at the current parameters, one tensor per parameter (zeros where the loss ignores one).

    By ``torch.autograd.grad``; for FSDP2's parameters, which are not in the loss's graph,
    from ``loss.backward()`` (reduce-scattered: the gradient of the mean over ranks), with
    every ``.grad`` put back as it was.

    Examples:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss_gradient(lambda: (w**2).sum(), [w])[0].tolist()
        [2.0, 4.0]
    """
    return HessianOperator(loss_fn, params, "finite_difference")._gradient(create_graph=False)


def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor], *, hvp: str = "auto"
) -> list[Tensor]:
    """Return ``H v``, the Hessian of ``loss_fn`` at ``params`` times ``vectors``.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters (leaf tensors that require grad, or DTensors).
        vectors: One tensor per parameter, of its shape (DTensors placed like DTensor parameters).
        hvp: The backend, one of ``HVP_BACKENDS`` (see ``HessianOperator``).

    Returns:
        One tensor per parameter (DTensors for DTensor parameters).
    """
    return HessianOperator(loss_fn, params, hvp)(vectors)


@dataclass
class _Lanczos:
    """The Lanczos decomposition ``H V = V T + β v eᵀ`` built so far (full re-orthogonalization)."""

    alphas: list[float]
    betas: list[float]  # betas[j] couples basis vectors j and j+1; the last one is the residual's
    basis: Tensor  # rows: the orthonormal basis vectors (this rank's parts)

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
    flat: _Flat,
    done: Callable[[_Lanczos], bool] | None = None,
) -> _Lanczos:
    """Up to ``iters`` Lanczos steps from ``start``, stopping early once ``done`` says so.

    Every decision (a stop, a restart) is taken on reduced scalars, so sharded ranks stay in step.
    """
    n = start.numel()
    iters = min(iters, flat.global_numel)
    basis = torch.empty(min(iters, 16), n, dtype=start.dtype, device=start.device)
    state = _Lanczos([], [], basis[:0])
    v = start / flat.norm(start)
    for j in range(iters):
        if j == basis.shape[0]:  # grow the storage geometrically: memory is the iterations actually taken
            grown = torch.empty(min(2 * j, iters), n, dtype=start.dtype, device=start.device)
            grown[:j] = basis[:j]
            basis = grown
        basis[j] = v
        w = matvec(v)
        alpha = float(flat.dot(w, v))
        done_rows = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough"): full re-orthogonalization
            w -= done_rows.T @ flat.gram(done_rows, w)
        beta = float(flat.norm(w))
        state = _Lanczos([*state.alphas, alpha], [*state.betas, beta], done_rows)
        if j + 1 == iters or (done is not None and done(state)):
            break
        if beta <= 1e-10 * max(abs(a) for a in state.alphas):  # an invariant subspace: go on in a fresh direction
            state.betas[-1] = 0.0
            w = flat.random(generator, rademacher=False).to(w)
            for _ in range(2):
                w -= done_rows.T @ flat.gram(done_rows, w)
            beta = float(flat.norm(w))
            if beta == 0:
                break
        v = w / beta
    return state


class TopEigenpairs(NamedTuple):
    """The top eigenvalues (descending), their unit eigenvectors (one tensor per parameter each) and residuals.

    ``residuals[i]`` is an error bar that needs no reference: some eigenvalue of the operator
    ``A`` the eigenvalues are of (``H``, or ``P^{-1/2} H P^{-1/2}``) lies within
    ``residuals[i]·|λ_i|`` of ``λ_i``. With exact products (``exact``) it is
    ``‖A v_i − λ_i v_i‖ / |λ_i|``, read from the Lanczos recurrence (for a symmetric ``A``
    that is the bound). With finite differences the recurrence only knows the
    finite-difference operator ``A_h``, whose residual says nothing of how far ``A_h`` is
    from ``A``; each residual is then ``(‖A_h v − λ v‖ + (4/3)‖A_h v − A_{h/2} v‖)/|λ|``
    from two fresh products per eigenpair, the second term the estimated error of the
    product (``HessianOperator.with_error``): a bound as good as that estimate, which grows
    with what makes finite differences wrong (a step too long for the curvature, rounding
    that the preconditioner amplifies, kinks such as ReLU's). ``products`` counts the
    Hessian-vector products spent (those included). ``exact``: whether the products were
    exact (double backward); when False a caller may warn, and read the residual as the
    estimate it is. Eigenvectors of DTensor parameters are DTensors placed like them.
    """

    eigenvalues: Tensor
    eigenvectors: list[list[Tensor]]
    residuals: Tensor
    products: int
    exact: bool = True


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
    eigenvalues; it costs one float32 parameter-sized vector per step. With finite-difference
    products, two more products per eigenpair give the returned residuals their estimated
    product error (see ``TopEigenpairs``).

    With ``preconditioner`` (the diagonal ``P`` of an adaptive optimizer, one positive tensor
    per parameter), the eigenvalues are those of ``P⁻¹H``, the preconditioned sharpness of
    Cohen et al. 2022, computed on the symmetric ``P^{-1/2} H P^{-1/2}``; the eigenvectors
    returned are that operator's.

    Sharded parameters (DTensors): ``init`` and ``preconditioner`` are DTensors placed like
    them (or whole tensors), the eigenvectors returned DTensors placed like them, the rest
    ordinary tensors, the same on every rank.

    Args:
        loss_fn: Computes the loss at the current parameters.
        params: The parameters.
        k: How many of the top (largest, algebraically) eigenvalues.
        max_iters: At most this many Hessian-vector products (in the Lanczos iteration).
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
        >>> [round(x, 4) for x in top.eigenvalues.tolist()], top.exact
        ([6.0, 1.0], True)
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer (how many eigenvalues), got {k!r}.")
    if max_iters < k:
        raise ValueError(f"max_iters ({max_iters}) must be at least k ({k}).")
    params = list(params)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    scale = None if preconditioner is None else [p.to(dtype).reciprocal().sqrt() for p in preconditioner]
    operator = HessianOperator(loss_fn, params, hvp, scale)
    flat = operator.flat
    k = min(k, flat.global_numel)
    start = flat.random(generator, rademacher=False)
    if init and all([t.shape for t in v] == flat.shapes for v in init):  # a changed parameter set starts afresh
        warm = sum(flat.flatten(v) for v in init)
        if isinstance(warm, Tensor):
            warm_norm = flat.norm(warm)
            if bool(warm_norm > 0):
                start = warm / warm_norm + 0.1 * start / flat.norm(start)

    def residuals(state: _Lanczos) -> tuple[Tensor, Tensor, Tensor]:
        values, vectors = state.ritz()
        top = values[-k:].flip(0)
        s = vectors[:, -k:].flip(1)
        residual = state.betas[-1] * s[-1].abs()  # ‖H y − θ y‖ for the Ritz vector y, without a product
        return top, s, residual / top.abs().clamp_min(1e-30)

    def converged(state: _Lanczos) -> bool:
        return len(state.alphas) >= k and bool((residuals(state)[2] <= tol).all())

    state = _lanczos(operator.flat_product, start, max_iters, generator, flat, converged)
    top, s, residual = residuals(state)
    vectors = s.to(state.basis).T @ state.basis  # k x n
    if not operator.exact:
        # The recurrence's residual is the finite-difference operator's: add what its products are estimated to be off.
        bounds = []
        for value, y in zip(top.tolist(), vectors, strict=True):
            product, error = operator.with_error(y)
            off = float(flat.norm(product - value * y)) + float(flat.norm(error))
            bounds.append(off / max(abs(value), 1e-30))
        residual = torch.tensor(bounds, dtype=torch.float64)
    return TopEigenpairs(
        top.to(flat.device, flat.dtype),
        [flat.wrap(flat.unflatten(row)) for row in vectors],
        residual.to(flat.device, flat.dtype),
        operator.products,
        operator.exact,
    )


class TraceEstimate(NamedTuple):
    """A trace estimate and its standard error (the spread of the random part; with finite differences, and more)."""

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

    With finite-difference products the terms are off by the products' error, which no
    spread shows: it is estimated and added in quadrature, ``stderr = √(s² + e²)``, with
    ``e = k·|q̂ᵀE q̂| + |gᵀE g|`` for ``E`` the estimated error of a product (see
    ``HessianOperator.with_error``), ``q̂`` a random unit combination of the sketch's ``k``
    columns (so that ``k·q̂ᵀEq̂`` is an unbiased one-sample estimate of ``tr(QᵀEQ)``) and
    ``g`` the first Hutchinson probe (three more products; one for ``"hutchinson"``).

    Sharded parameters (DTensors) give the same estimate on every rank, from the random
    vectors one process would draw; Hutch++'s ``Q`` is then orthonormalized by Gram-Schmidt
    twice over the ranks rather than Householder QR (the same span, so the same estimate to
    rounding).

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
    operator = HessianOperator(loss_fn, params, hvp)
    flat, matvec = operator.flat, operator.flat_product

    def mean_and_stderr(terms: list[Tensor]) -> tuple[Tensor, Tensor]:
        stacked = torch.stack(terms)
        return stacked.mean(), stacked.std() / math.sqrt(len(terms))

    def quadratic_error(z: Tensor, product: Tensor) -> float:
        """``|zᵀ E z|``: the estimated error of ``zᵀ A_h z``, from one more product at half the step."""
        return _RICHARDSON * abs(float(flat.dot(z, product - operator.flat_product(z, 0.5))))

    def with_error(mean: Tensor, stderr: Tensor, error: float) -> TraceEstimate:
        return TraceEstimate(mean, torch.sqrt(stderr.square() + error**2).to(stderr.dtype))

    first: tuple[Tensor, Tensor] | None = None  # a probe and its product, for the finite-difference error

    def term(z: Tensor) -> Tensor:
        nonlocal first
        product = matvec(z)
        first = (z, product) if first is None else first
        return flat.dot(z, product)

    if method == "hutchinson" or samples < 6:
        mean, stderr = mean_and_stderr([term(flat.random(generator, True)) for _ in range(samples)])
        if operator.exact or first is None:
            return TraceEstimate(mean, stderr)
        return with_error(mean, stderr, quadratic_error(*first))
    k = samples // 3
    sketch = torch.stack([matvec(flat.random(generator, True)) for _ in range(k)], dim=1)  # n x k
    q = _orthonormal_columns(flat, sketch)
    del sketch
    top = torch.stack([flat.dot(q[:, i], matvec(q[:, i])) for i in range(q.shape[1])]).sum()
    rest = []
    for _ in range(samples - 2 * k):
        g = flat.random(generator, True)
        rest.append(term(g - q @ flat.gram(q.T, g)))
    mean, stderr = mean_and_stderr(rest)
    if operator.exact or first is None or q.shape[1] == 0:
        return TraceEstimate(top + mean, stderr)
    signs = torch.randint(0, 2, (q.shape[1],), generator=generator).mul_(2).sub_(1).to(q)
    mixed = q @ signs / math.sqrt(q.shape[1])
    error = q.shape[1] * quadratic_error(mixed, matvec(mixed)) + quadratic_error(*first)
    return with_error(top + mean, stderr, error)


def _orthonormal_columns(flat: _Flat, sketch: Tensor) -> Tensor:
    """An orthonormal basis of the columns' span: Householder QR, or (sharded) Gram-Schmidt twice over the ranks."""
    if not flat.sharded:
        q: Tensor = torch.linalg.qr(sketch)[0]
        return q
    columns: list[Tensor] = []
    for i in range(sketch.shape[1]):
        c = sketch[:, i].clone()
        size = float(flat.norm(c))
        for _ in range(2):
            if columns:
                done = torch.stack(columns)
                c -= done.T @ flat.gram(done, c)
        norm = float(flat.norm(c))
        if norm > 1e-6 * size:  # a column in the span of the others adds nothing (decided on reduced numbers)
            columns.append(c / norm)
    return torch.stack(columns, dim=1) if columns else sketch[:, :0]


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
    Sharded parameters (DTensors) give the same nodes and weights on every rank.

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
    flat = operator.flat
    nodes, weights = [], []
    for _ in range(runs):
        start = flat.random(generator, rademacher=True)
        state = _lanczos(operator.flat_product, start, iters, generator, flat)
        values, vectors = state.ritz()
        nodes.append(values)
        weights.append(vectors[0].square())
    width = max(len(n) for n in nodes)
    return Spectrum(
        torch.stack([torch.nn.functional.pad(n, (0, width - len(n))) for n in nodes]),
        torch.stack([torch.nn.functional.pad(w, (0, width - len(w))) for w in weights]),
    )
