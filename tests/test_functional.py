"""The pure SAM math in `lightning_sam.functional`, against formulas written out."""

from __future__ import annotations

import pytest
import torch

from lightning_sam.functional import grad_norm_squared, perturb_, restore_


def tensors(dtypes: tuple[torch.dtype, ...] = (torch.float64,) * 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (2, 2, 2), (1,)]
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    grads = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    return params, grads


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_grad_norm_squared_is_the_formula(foreach: bool, adaptive: bool, eta: float) -> None:
    params, grads = tensors()
    t = [(p.abs() + eta) if adaptive else torch.ones_like(p) for p in params]
    expected = sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads, strict=True))
    got = grad_norm_squared(params, grads, adaptive=adaptive, eta=eta, foreach=foreach)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_grad_norm_squared_mixes_dtypes_and_accumulates_low_precision_in_float32(foreach: bool) -> None:
    params, grads = tensors((torch.float32, torch.float64, torch.bfloat16, torch.float16))
    got = grad_norm_squared(params, grads, foreach=foreach)
    expected = sum((g.double() ** 2).sum() for g in grads)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)

    low = [g for g in grads if g.dtype in (torch.bfloat16, torch.float16)]
    low_norm = grad_norm_squared(low, low, foreach=foreach)
    assert low_norm.dtype == torch.float32
    torch.testing.assert_close(low_norm, sum((g.float() ** 2).sum() for g in low), rtol=1e-6, atol=0)


def test_grad_norm_squared_of_nothing_is_zero() -> None:
    assert grad_norm_squared([], []).item() == 0.0


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_perturb_moves_by_the_formula_and_restore_is_bitwise(foreach: bool, adaptive: bool, eta: float) -> None:
    params, grads = tensors()
    originals = [p.clone() for p in params]
    scale = torch.tensor(0.37, dtype=torch.float64)
    backup = perturb_(params, grads, scale, adaptive=adaptive, eta=eta, foreach=foreach)
    for p, w, g, saved in zip(params, originals, grads, backup, strict=True):
        t_squared = (w.abs() + eta) ** 2 if adaptive else 1.0
        torch.testing.assert_close(p, w + t_squared * g * 0.37, rtol=1e-15, atol=1e-15)
        assert torch.equal(saved, w) and saved.data_ptr() != p.data_ptr()
    restore_(params, backup, foreach=foreach)
    assert all(torch.equal(p, w) for p, w in zip(params, originals, strict=True))


def test_perturb_keeps_the_order_across_dtype_buckets() -> None:
    params, grads = tensors((torch.float32, torch.float64, torch.float32, torch.float64))
    originals = [p.clone() for p in params]
    backup = perturb_(params, grads, 0.5, foreach=True)
    assert all(torch.equal(b, w) for b, w in zip(backup, originals, strict=True))


def test_misaligned_lists_raise() -> None:
    params, grads = tensors()
    with pytest.raises(ValueError, match="aligned"):
        grad_norm_squared(params, grads[:2])
    with pytest.raises(ValueError, match="aligned"):
        perturb_(params, grads[:2], 1.0)
    with pytest.raises(ValueError, match="aligned"):
        restore_(params, grads[:2])
