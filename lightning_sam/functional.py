"""The SAM update as pure functions over lists of tensors.

This module is the one copy of the SAM math. It imports nothing from Lightning, so
it serves any training loop. Every function has two paths that give the same result:
a ``torch._foreach_*`` path that batches the tensors of each (device, dtype) bucket
into few kernel launches, and a plain per-tensor path, each in a function of its own
(``_multi_tensor_*`` and ``_single_tensor_*``, the ``torch/optim/sgd.py`` pattern); the
public function checks its arguments and picks one. Neither path ever synchronizes the
host with the device: norms and scales stay tensors.

With ``T = I`` (SAM, Foret et al. 2021) or ``T = diag(|w| + eta)`` (ASAM, Kwon et al.
2021) the perturbation is ``e = rho * T² g / (‖T g‖ + eps)``; ``perturb_`` never moves a
weight by a non-finite amount (a NaN gradient, a zero norm), without asking the host.

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

import math
from collections.abc import Sequence
from functools import reduce
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate

from lightning_sam._compat import default_foreach, group_by_device_and_dtype

__all__ = [
    "add_scaled_",
    "all_finite",
    "copy_scaled_",
    "dot",
    "grad_norm_squared",
    "lerp_",
    "like_param",
    "mul_",
    "perturb_",
    "restore_",
    "sub_into_",
]

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
    if _resolve_foreach(local_grads, foreach):
        squares = _multi_tensor_norms_squared(local_params, local_grads, adaptive, eta)
    else:
        squares = _single_tensor_norms_squared(local_params, local_grads, adaptive, eta)
    return _global_sum(squares, grads)


def _single_tensor_norms_squared(params: list[Tensor], grads: list[Tensor], adaptive: bool, eta: float) -> list[Tensor]:
    return [_squared_norm(p.abs().add_(eta).mul_(g) if adaptive else g) for p, g in zip(params, grads, strict=True)]


def _multi_tensor_norms_squared(params: list[Tensor], grads: list[Tensor], adaptive: bool, eta: float) -> list[Tensor]:
    squares: list[Tensor] = [torch.empty(0)] * len(grads)
    for (bucket_params, bucket_grads), indices in group_by_device_and_dtype([params, grads]):
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
    return squares


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
    sums = _multi_tensor_sums(local) if _resolve_foreach(local, foreach) else _single_tensor_sums(local)
    return _global_sum(sums, tensors).isfinite()


def _single_tensor_sums(tensors: list[Tensor]) -> list[Tensor]:
    return [t.sum(dtype=_norm_dtype(t.dtype)) for t in tensors]


def _multi_tensor_sums(tensors: list[Tensor]) -> list[Tensor]:
    """Norms rather than sums: foreach has no sum, and a norm is non-finite exactly when a sum is (or overflows)."""
    sums: list[Tensor] = [torch.empty(0)] * len(tensors)
    for (bucket,), indices in group_by_device_and_dtype([tensors]):
        for i, norm in zip(indices, torch._foreach_norm(bucket), strict=True):
            sums[i] = norm
    return sums


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


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: Tensor | float,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    foreach: bool | None = None,
    out: Sequence[Tensor] | None = None,
    finite: Literal["mask", "mask_in_place", "known"] = "mask",
) -> list[Tensor]:
    """Save an exact copy of ``params``, then move them in place by ``e = scale * T² g``.

    For SAM's ascent step pass ``scale = rho / (‖T g‖ + eps)`` with the global norm of
    [`grad_norm_squared`][lightning_sam.functional.grad_norm_squared].

    Args:
        params: The weights, changed in place.
        grads: Their gradients, aligned with ``params``.
        scale: A Python number or a 0-dim tensor (on any device: it is moved, never read
            on the host). Where ``scale * T² g`` is not finite (a NaN or infinite
            gradient, a norm of 0 with no ``eps``), that weight does not move.
        adaptive: Use ASAM's ``T = diag(|w| + eta)``.
        eta: ASAM's offset.
        foreach: As in [`grad_norm_squared`][lightning_sam.functional.grad_norm_squared].
        out: Tensors shaped like ``params`` (like their local shards, for DTensors) to
            save the copy into (reused from step to step, they spare an allocation); new
            ones are allocated when None.
        finite: How the non-finite entries of ``g`` are kept out of the weights: ``"mask"``
            (a temporary per tensor), ``"mask_in_place"`` (``g``'s own NaN and infinite
            entries become 0: for gradients the caller no longer needs, no allocation) or
            ``"known"`` (``g`` is finite, e.g. an optimizer's momentum: no mask).

    Returns:
        The saved weights, aligned with ``params`` (``out`` when given): hand them to
        [`restore_`][lightning_sam.functional.restore_]. For sharded parameters (DTensors)
        they are the local shards: the copy costs ``1/N`` of the parameters per rank.
    """
    _check_aligned(params, grads, "grads")
    params, grads = _locals(params), _locals(_without_partial(grads))
    backup = [torch.empty_like(p) for p in params] if out is None else list(out)
    _check_aligned(params, backup, "out")
    if isinstance(scale, Tensor):  # a non-finite scale (a norm of 0) moves nothing
        scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    elif not math.isfinite(scale):
        scale = 0.0
    if params:
        use_foreach = _resolve_foreach(params, foreach)
        if use_foreach:
            for (bucket_params, bucket_backup), _ in group_by_device_and_dtype([list(params), backup]):
                torch._foreach_copy_(bucket_backup, bucket_params)
        else:
            for p, saved in zip(params, backup, strict=True):
                saved.copy_(p)
        if finite == "mask_in_place":
            for g in grads:
                g.nan_to_num_(0.0, 0.0, 0.0)
        try:  # every copy is made before any weight moves: a failure half-way (out of memory) puts all back
            perturb = _multi_tensor_perturb_ if use_foreach else _single_tensor_perturb_
            perturb(list(params), list(grads), scale, adaptive, eta, finite == "mask")
        except BaseException:
            restore_(params, backup, foreach=foreach)
            raise
    return backup


def _single_tensor_perturb_(
    params: list[Tensor], grads: list[Tensor], scale: Tensor | float, adaptive: bool, eta: float, mask: bool
) -> None:
    for p, g in zip(params, grads, strict=True):
        p_scale = scale.to(p.device) if isinstance(scale, Tensor) else torch.tensor(scale, device=p.device)
        low = p.dtype in _LOW_PRECISION  # in float32: the scale alone may be 0 in half precision
        if adaptive:
            e = (p.float() if low else p).abs().add_(eta).square_().mul_(g).mul_(p_scale)
            p.add_(e.nan_to_num_(0.0, 0.0, 0.0) if mask else e)
        elif low:
            g32 = g.float()
            p.add_((g32.nan_to_num_(0.0, 0.0, 0.0) if mask else g32).mul_(p_scale))
        else:  # no temporary unless the mask needs one
            p.addcmul_(torch.nan_to_num(g, 0.0, 0.0, 0.0) if mask else g, p_scale)


def _multi_tensor_perturb_(
    params: list[Tensor], grads: list[Tensor], scale: Tensor | float, adaptive: bool, eta: float, mask: bool
) -> None:
    for (bucket_params, bucket_grads), _ in group_by_device_and_dtype([params, grads]):
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
        if mask:
            for t in e:  # foreach has no nan_to_num
                t.nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_add_(bucket_params, e)


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


def add_scaled_(
    xs: Sequence[Tensor], ys: Sequence[Tensor], scale: Tensor | float, *, foreach: bool | None = None
) -> None:
    """``x += scale · y`` for aligned lists, in place; ``scale`` a number or a 0-dim tensor (never read on the host).

    The sum is taken in the wider of the two dtypes and rounded once into ``x`` (a float32
    ``y`` added to a bfloat16 gradient loses nothing before that rounding), as torch's
    in-place ops do. DTensors work on their local shards.

    Examples:
        >>> import torch
        >>> x = [torch.ones(2)]
        >>> add_scaled_(x, [torch.tensor([1.0, 2.0])], torch.tensor(0.5))
        >>> x[0]
        tensor([1.5000, 2.0000])
    """
    _check_aligned(xs, ys, "ys")
    if xs:
        local_xs, local_ys = _locals(xs), _locals(ys)
        add = _multi_tensor_add_scaled_ if _resolve_foreach(local_xs, foreach) else _single_tensor_add_scaled_
        add(local_xs, local_ys, scale)


def _single_tensor_add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Tensor | float) -> None:
    for x, y in zip(xs, ys, strict=True):  # in-place ops compute in the wider dtype and round once
        if isinstance(scale, Tensor):
            x.addcmul_(y, scale.to(x.device))
        else:
            x.add_(y, alpha=scale)


def _multi_tensor_add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Tensor | float) -> None:
    for (bucket_xs, bucket_ys), _ in group_by_device_and_dtype([xs, ys]):
        if isinstance(scale, Tensor):
            torch._foreach_add_(bucket_xs, torch._foreach_mul(bucket_ys, scale.to(bucket_xs[0].device)))
        else:
            torch._foreach_add_(bucket_xs, bucket_ys, alpha=scale)


def lerp_(xs: Sequence[Tensor], ys: Sequence[Tensor], weight: float, *, foreach: bool | None = None) -> None:
    """``x ← x + weight · (y − x)`` in place, one read of each (a moving average; ``weight=1`` copies ``y`` exactly).

    Examples:
        >>> import torch
        >>> m = [torch.zeros(2)]
        >>> lerp_(m, [torch.tensor([1.0, 2.0])], 0.25)
        >>> m[0]
        tensor([0.2500, 0.5000])
    """
    _check_aligned(xs, ys, "ys")
    if xs:
        local_xs, local_ys = _locals(xs), _locals(ys)
        if _resolve_foreach(local_xs, foreach):
            for (bucket_xs, bucket_ys), _ in group_by_device_and_dtype([local_xs, local_ys]):
                torch._foreach_lerp_(bucket_xs, bucket_ys, weight)
        else:
            for x, y in zip(local_xs, local_ys, strict=True):
                x.lerp_(y, weight)


def mul_(xs: Sequence[Tensor], scale: Tensor | float, *, foreach: bool | None = None) -> None:
    """``x *= scale`` for every tensor of the list, in place (DTensors: their local shards).

    Examples:
        >>> import torch
        >>> x = [torch.ones(2)]
        >>> mul_(x, torch.tensor(-2.0))
        >>> x[0]
        tensor([-2., -2.])
    """
    if xs:
        local = _locals(xs)
        (_multi_tensor_mul_ if _resolve_foreach(local, foreach) else _single_tensor_mul_)(local, scale)


def _single_tensor_mul_(xs: list[Tensor], scale: Tensor | float) -> None:
    for x in xs:
        x.mul_(scale.to(x.device) if isinstance(scale, Tensor) else scale)


def _multi_tensor_mul_(xs: list[Tensor], scale: Tensor | float) -> None:
    for (bucket,), _ in group_by_device_and_dtype([xs]):
        torch._foreach_mul_(bucket, scale.to(bucket[0].device) if isinstance(scale, Tensor) else scale)


def sub_into_(
    out: Sequence[Tensor], xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float, *, foreach: bool | None = None
) -> None:
    """``out = x − alpha · y`` for aligned lists, one pass (DTensors: their local shards).

    Examples:
        >>> import torch
        >>> out = [torch.empty(2)]
        >>> sub_into_(out, [torch.tensor([1.0, 2.0])], [torch.ones(2)], 0.5)
        >>> out[0]
        tensor([0.5000, 1.5000])
    """
    _check_aligned(out, xs, "xs")
    _check_aligned(out, ys, "ys")
    if out:
        local_out, local_xs, local_ys = _locals(out), _locals(xs), _locals(ys)
        if _resolve_foreach(local_out, foreach):
            for (bucket_out, bucket_xs, bucket_ys), _ in group_by_device_and_dtype([local_out, local_xs, local_ys]):
                torch._foreach_copy_(bucket_out, bucket_xs)
                torch._foreach_add_(bucket_out, bucket_ys, alpha=-alpha)
        else:
            for o, x, y in zip(local_out, local_xs, local_ys, strict=True):
                torch.sub(x, y, alpha=alpha, out=o)


def copy_scaled_(
    out: Sequence[Tensor], xs: Sequence[Tensor], scale: Tensor | float | None = None, *, foreach: bool | None = None
) -> None:
    """``out = scale · x`` for aligned lists, computed in ``out``'s dtype (no scale: a copy).

    Examples:
        >>> import torch
        >>> out = [torch.empty(2)]
        >>> copy_scaled_(out, [torch.tensor([1.0, 2.0], dtype=torch.bfloat16)], torch.tensor(0.25))
        >>> out[0]
        tensor([0.2500, 0.5000])
    """
    _check_aligned(out, xs, "xs")
    if out:
        local_out, local_xs = _locals(out), _locals(xs)
        copy = _multi_tensor_copy_scaled_ if _resolve_foreach(local_out, foreach) else _single_tensor_copy_scaled_
        copy(local_out, local_xs, scale)


def _single_tensor_copy_scaled_(out: list[Tensor], xs: list[Tensor], scale: Tensor | float | None) -> None:
    for o, x in zip(out, xs, strict=True):
        o.copy_(x)
        if scale is not None:
            o.mul_(scale.to(o.device) if isinstance(scale, Tensor) else scale)


def _multi_tensor_copy_scaled_(out: list[Tensor], xs: list[Tensor], scale: Tensor | float | None) -> None:
    for (bucket_out, bucket_xs), _ in group_by_device_and_dtype([out, xs]):
        torch._foreach_copy_(bucket_out, bucket_xs)
        if scale is not None:
            torch._foreach_mul_(bucket_out, scale.to(bucket_out[0].device) if isinstance(scale, Tensor) else scale)


def like_param(p: Tensor, local: Tensor) -> Tensor:
    """``local`` held as ``p`` is: a DTensor sharded like ``p`` (no communication) when ``p`` is one, else itself."""
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return local


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
