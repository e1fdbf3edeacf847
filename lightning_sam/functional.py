"""The SAM update as pure functions over lists of tensors.

This module is the one copy of the SAM math. It imports nothing from Lightning, so
it serves any training loop. Every function has two paths that give the same result:
a ``torch._foreach_*`` path that batches the tensors of each (device, dtype) bucket
into few kernel launches, and a plain per-tensor path (the ``torch/optim/sgd.py``
and ``torch/nn/utils/clip_grad.py`` pattern). Neither path ever synchronizes the host
with the device: norms and scales stay tensors.

With ``T = I`` (SAM, Foret et al. 2021) or ``T = diag(|w| + eta)`` (ASAM, Kwon et al.
2021) the perturbation is ``e = rho * T² g / (‖T g‖ + eps)``.

Sharded parameters (DTensors: FSDP2, tensor parallel) work on their local shards; a norm
(or a finiteness check) over them is summed over the shards with one all-reduce of a
scalar through DTensor's own ``Partial`` placement, so every rank gets the norm of the
full gradient. Half-precision weights
get their perturbation computed in float32 (a scale such as ``rho / ‖g‖ = 1e-8`` is 0
in float16).

Examples:
    >>> import torch
    >>> w = [torch.tensor([3.0, 4.0])]
    >>> g = [torch.tensor([3.0, 4.0])]
    >>> norm = grad_norm_squared(w, g).sqrt()
    >>> norm
    tensor(5.)
    >>> backup = perturb_(w, g, 0.5 / norm)
    >>> w[0]
    tensor([3.3000, 4.4000])
    >>> restore_(w, backup)
    >>> w[0]
    tensor([3., 4.])
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate

from lightning_sam._compat import default_foreach, group_by_device_and_dtype

__all__ = ["all_finite", "dot", "grad_norm_squared", "perturb_", "restore_"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _resolve_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Torch's own default: foreach on devices with fused foreach kernels (CUDA...).

    On the CPU the per-tensor path is as fast or faster for large tensors, since
    torch's per-tensor kernels use every core (``benchmarks/bench_optimizer.py``).
    """
    if foreach is not None:
        return foreach
    return default_foreach(list(tensors))


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate norms in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _squared_norm(t: Tensor) -> Tensor:
    """``‖t‖²`` of one tensor: a BLAS dot product where it can be (about twice as fast as ``vector_norm`` on CPUs)."""
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.view(-1)
        dot: Tensor = torch.dot(flat, flat)
        return dot
    norm: Tensor = torch.linalg.vector_norm(t, 2, dtype=_norm_dtype(t.dtype))
    return norm.square()


def _check_aligned(params: Sequence[Tensor], others: Sequence[Tensor], what: str) -> None:
    if len(params) != len(others):
        raise ValueError(f"params and {what} must be aligned, got {len(params)} params and {len(others)} {what}.")


def grad_norm_squared(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    foreach: bool | None = None,
) -> Tensor:
    """Return ``‖T g‖²`` summed over the tensors, as a 0-dim tensor.

    ``T = I`` when ``adaptive`` is False, else ``T = diag(|w| + eta)``. The sum is taken
    in at least float32 on the device of the first gradient (the dtype of every norm is
    promoted to a common one), so the squared norms of several parameter groups can be
    added before the square root. Nothing waits for the device.

    Args:
        params: The weights ``w``, aligned with ``grads``.
        grads: Their gradients ``g``.
        adaptive: Use ASAM's ``T = diag(|w| + eta)``.
        eta: ASAM's offset; ``eta=0`` is the rule of davda54/sam and pytorch_optimizer.
        foreach: Force (True) or forbid (False) the ``torch._foreach_*`` path; None picks
            torch's default for the device (foreach on CUDA, per-tensor on the CPU).

    Returns:
        The squared norm; ``tensor(0.)`` when ``grads`` is empty.

    Examples:
        >>> import torch
        >>> grad_norm_squared([torch.ones(2)], [torch.tensor([1.0, 2.0])], adaptive=True, eta=1.0)
        tensor(20.)
    """
    _check_aligned(params, grads, "grads")
    if not grads:
        return torch.zeros(())
    local_params, local_grads = _locals(params), _locals(_without_partial(grads))
    squares: list[Tensor] = [torch.empty(0)] * len(grads)
    if _resolve_foreach(local_grads, foreach):
        for (bucket_params, bucket_grads), indices in group_by_device_and_dtype([local_params, local_grads]):
            dtype = _norm_dtype(bucket_grads[0].dtype)
            if adaptive:
                scaled = torch._foreach_abs(bucket_params)
                torch._foreach_add_(scaled, eta)
                torch._foreach_mul_(scaled, bucket_grads)
                norms = torch._foreach_norm(scaled, 2, dtype=dtype)
            else:
                norms = torch._foreach_norm(bucket_grads, 2, dtype=dtype)
            for i, norm in zip(indices, norms, strict=True):
                squares[i] = norm.square()
    else:
        squares = [
            _squared_norm(p.abs().add_(eta).mul_(g) if adaptive else g)
            for p, g in zip(local_params, local_grads, strict=True)
        ]
    return _global_sum(squares, grads)


def all_finite(tensors: Sequence[Tensor], *, foreach: bool | None = None) -> Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool tensor (one read, no sync).

    A sum (per-tensor path) or a norm (foreach path) is non-finite exactly when an element
    is, or when it overflows; an overflow (a sum beyond 3e38, elements beyond 1e19) also
    counts as non-finite. Sharded tensors (DTensors) give the same answer on every rank.

    Examples:
        >>> import torch
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor(False)
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    local = _locals(tensors)
    if _resolve_foreach(local, foreach):
        sums: list[Tensor] = [torch.empty(0)] * len(local)
        for (bucket,), indices in group_by_device_and_dtype([local]):
            for i, norm in zip(indices, torch._foreach_norm(bucket), strict=True):
                sums[i] = norm
    else:
        sums = [t.sum(dtype=_norm_dtype(t.dtype)) for t in local]
    return _global_sum(sums, tensors).isfinite()


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], *, like: Sequence[Tensor] | None = None) -> Tensor:
    """``Σ ⟨x, y⟩`` over aligned tensor lists, as a 0-dim tensor (sharded tensors: over every shard, on every rank).

    ``like``: when the lists hold local shards (plain tensors), the sharded tensors they are
    shards of, so that the sum runs over every shard.

    Examples:
        >>> import torch
        >>> dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
    """
    _check_aligned(xs, ys, "ys")
    if not xs:
        return torch.zeros(())
    local_xs, local_ys = _locals(_without_partial(xs)), _locals(_without_partial(ys))
    products = []
    for x, y in zip(local_xs, local_ys, strict=True):
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        products.append(torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)).real)
    return _global_sum(products, xs if like is None else like)


def _locals(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's local part: a DTensor's shard on this rank (a view: writing to it writes the DTensor)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _without_partial(tensors: Sequence[Tensor]) -> list[Tensor]:
    """DTensors whose local parts are partial sums, reduced first (a norm of partial sums is not the norm)."""
    out = []
    for t in tensors:
        if isinstance(t, DTensor) and any(p.is_partial() for p in t.placements):
            t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
        out.append(t)
    return out


def _global_sum(values: Sequence[Tensor], tensors: Sequence[Tensor]) -> Tensor:
    """The sum of 0-dim per-tensor values (aligned with ``tensors``) over every tensor, on every rank.

    A DTensor's value is of its local shard: summed over the mesh dimensions it is sharded
    along (not the ones it is replicated along), with one all-reduce of a scalar per mesh
    and placement pattern, through DTensor's own ``Partial`` placement.
    """
    device = values[0].device
    dtype = reduce(torch.promote_types, (v.dtype for v in values))
    plain: list[Tensor] = []
    sharded: dict[tuple[Any, ...], list[Tensor]] = {}
    for value, tensor in zip(values, tensors, strict=True):
        value = value.to(device=device, dtype=dtype)
        if isinstance(tensor, DTensor):
            reduced = tuple(Replicate() if p.is_replicate() else Partial() for p in tensor.placements)
            sharded.setdefault((tensor.device_mesh, reduced), []).append(value)
        else:
            plain.append(value)
    total = torch.stack(plain).sum() if plain else torch.zeros((), device=device, dtype=dtype)
    for (mesh, placements), local_values in sharded.items():
        partial = DTensor.from_local(torch.stack(local_values).sum(), mesh, placements, run_check=False)
        total = total + partial.full_tensor().to(device)
    return total


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: Tensor | float,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    foreach: bool | None = None,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Save an exact copy of ``params``, then move them in place by ``e = scale * T² g``.

    For SAM's ascent step pass ``scale = rho / (‖T g‖ + eps)`` with the global norm of
    [`grad_norm_squared`][lightning_sam.functional.grad_norm_squared].

    Args:
        params: The weights, changed in place.
        grads: Their gradients, aligned with ``params``.
        scale: A Python number or a 0-dim tensor (on any device: it is moved, never read
            on the host).
        adaptive: Use ASAM's ``T = diag(|w| + eta)``.
        eta: ASAM's offset.
        foreach: As in [`grad_norm_squared`][lightning_sam.functional.grad_norm_squared].
        out: Tensors shaped like ``params`` (like their local shards, for DTensors) to
            save the copy into (reused from step to step, they spare an allocation); new
            ones are allocated when None.

    Returns:
        The saved weights, aligned with ``params`` (``out`` when given): hand them to
        [`restore_`][lightning_sam.functional.restore_]. For sharded parameters (DTensors)
        they are the local shards: the copy costs ``1/N`` of the parameters per rank.
    """
    _check_aligned(params, grads, "grads")
    params, grads = _locals(params), _locals(_without_partial(grads))
    backup = [torch.empty_like(p) for p in params] if out is None else list(out)
    _check_aligned(params, backup, "out")
    if not params:
        return backup
    if _resolve_foreach(params, foreach):
        for (bucket_params, bucket_grads, bucket_backup), _ in group_by_device_and_dtype(
            [list(params), list(grads), backup]
        ):
            torch._foreach_copy_(bucket_backup, bucket_params)
            bucket_scale = scale.to(bucket_params[0].device) if isinstance(scale, Tensor) else scale
            low = bucket_params[0].dtype in _LOW_PRECISION
            if low:  # in float32: the scale alone may be 0 in half precision
                bucket_grads = [g.float() for g in bucket_grads]
            if adaptive:
                e = torch._foreach_abs([p.float() for p in bucket_params] if low else bucket_params)
                torch._foreach_add_(e, eta)
                torch._foreach_mul_(e, e)
                torch._foreach_mul_(e, bucket_grads)
                torch._foreach_mul_(e, bucket_scale)
            else:
                e = torch._foreach_mul(bucket_grads, bucket_scale)
            torch._foreach_add_(bucket_params, e)
    else:
        for p, g, saved in zip(params, grads, backup, strict=True):
            saved.copy_(p)
            p_scale = scale.to(p.device) if isinstance(scale, Tensor) else torch.tensor(scale, device=p.device)
            if p.dtype in _LOW_PRECISION:  # in float32: the scale alone may be 0 in half precision
                g32 = g.float()
                p.add_((p.float().abs_().add_(eta).square_().mul_(g32) if adaptive else g32).mul_(p_scale))
            else:
                p.addcmul_(p.abs().add_(eta).square_().mul_(g) if adaptive else g, p_scale)  # no temporary for SAM
    return backup


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor], *, foreach: bool | None = None) -> None:
    """Copy the saved weights back into ``params``, bitwise (never ``w -= e``).

    Args:
        params: The weights to restore in place.
        backup: The copies returned by [`perturb_`][lightning_sam.functional.perturb_].
        foreach: As in [`grad_norm_squared`][lightning_sam.functional.grad_norm_squared].
    """
    _check_aligned(params, backup, "copies")
    if not params:
        return
    params = _locals(params)
    if _resolve_foreach(params, foreach):
        for (bucket_params, bucket_backup), _ in group_by_device_and_dtype([list(params), list(backup)]):
            torch._foreach_copy_(bucket_params, bucket_backup)
    else:
        for p, saved in zip(params, backup, strict=True):
            p.copy_(saved)
