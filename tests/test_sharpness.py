"""Sharpness estimators against exact Hessians of tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sam.sharpness import (
    adaptive_sharpness_avg,
    adaptive_sharpness_worst,
    filter_normalized,
    first_order_sharpness,
    hessian_max_eig,
    hessian_trace,
    hessian_vector_product,
    loss_along,
)


def hessian_of(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, tensors, strict=True)), (x,))
        return nn.functional.mse_loss(out, y)

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    hessian = torch.autograd.functional.hessian(loss_of_flat, torch.cat([p.detach().flatten() for p in params]))
    return hessian, params, loss_fn


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_vector_product_is_exact(seed: int) -> None:
    hessian, params, loss_fn = hessian_of(seed)
    v = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(flat(hessian_vector_product(loss_fn, params, v)), hessian @ flat(v))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_eig_within_one_percent_of_exact(seed: int) -> None:
    hessian, params, loss_fn = hessian_of(seed)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()]
    estimate, vector = hessian_max_eig(loss_fn, params, generator=torch.Generator().manual_seed(seed))
    assert abs(estimate.item() - top.item()) <= 0.01 * abs(top.item())
    residual = hessian @ flat(vector) - estimate * flat(vector)
    assert residual.norm() < 0.1 * abs(top.item())


def test_max_eig_warm_start_converges_at_once() -> None:
    _, params, loss_fn = hessian_of(0)
    first, vector = hessian_max_eig(loss_fn, params, generator=torch.Generator().manual_seed(0))
    calls = 0

    def counting() -> torch.Tensor:
        nonlocal calls
        calls += 1
        return loss_fn()  # type: ignore[operator, no-any-return]

    again, _ = hessian_max_eig(counting, params, init=vector, max_iters=3)
    assert calls == 1, "one graph, reused by every product"
    torch.testing.assert_close(again, first, rtol=1e-3, atol=0)


@pytest.mark.parametrize("seed", range(8))
def test_trace_within_ten_percent_with_default_samples(seed: int) -> None:
    hessian, params, loss_fn = hessian_of(seed)
    exact = torch.trace(hessian).item()
    estimate = hessian_trace(loss_fn, params, generator=torch.Generator().manual_seed(seed)).trace.item()
    assert abs(estimate - exact) <= 0.1 * abs(exact)


def test_hutchinson_is_unbiased() -> None:
    hessian, params, loss_fn = hessian_of(0)
    exact = torch.trace(hessian).item()
    gen = torch.Generator().manual_seed(0)
    estimate = hessian_trace(loss_fn, params, samples=4000, method="hutchinson", generator=gen).trace.item()
    assert abs(estimate - exact) <= 0.03 * abs(exact)


def test_exact_on_a_quadratic_with_known_hessian() -> None:
    diagonal = torch.tensor([5.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss_fn() -> torch.Tensor:
        return 0.5 * (diagonal * w * w).sum()

    eigenvalue, _ = hessian_max_eig(loss_fn, [w], generator=torch.Generator().manual_seed(0), tol=1e-12)
    assert eigenvalue.item() == pytest.approx(5.0, rel=1e-9)
    assert hessian_trace(loss_fn, [w], samples=3, method="hutchinson").trace.item() == pytest.approx(6.5, rel=1e-12)
    assert hessian_trace(loss_fn, [w], samples=12).trace.item() == pytest.approx(6.5, rel=1e-12)  # sketch spans all 4

    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    u = torch.randn(2, dtype=torch.float64, requires_grad=True)
    eigenvalue, _ = hessian_max_eig(lambda: 0.5 * u @ a @ u, [u], tol=1e-12)
    assert eigenvalue.item() == pytest.approx(torch.linalg.eigvalsh(a).max().item(), rel=1e-9)


def test_first_order_sharpness_is_the_sam_formula() -> None:
    _, params, loss_fn = hessian_of(0)
    w0 = [p.detach().clone() for p in params]
    loss = loss_fn()  # type: ignore[operator]
    grads = torch.autograd.grad(loss, params)
    norm = flat(list(grads)).norm()
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.1 * g / norm)
        expected = loss_fn() - loss  # type: ignore[operator]
        for p, w in zip(params, w0, strict=True):
            p.copy_(w)
    got = first_order_sharpness(loss_fn, params, rho=0.1)
    torch.testing.assert_close(got, expected.detach())
    assert all(torch.equal(p, w) for p, w in zip(params, w0, strict=True))
    assert all(p.grad is None for p in params)


def test_adaptive_sharpness_avg_is_the_curvature_term_on_a_quadratic() -> None:
    """For a quadratic, E[L(w+δ)] − L(w) = ½ rho² Σ H_ii w_i² exactly (δ ~ N(0, rho² w²))."""
    diagonal = torch.tensor([5.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.3, 0.1, -0.2, 1.0], dtype=torch.float64)

    def loss_fn() -> torch.Tensor:
        return 0.5 * (diagonal * (w - target) ** 2).sum()

    expected = 0.5 * 0.1**2 * (diagonal * w.detach() ** 2).sum()
    gen = torch.Generator().manual_seed(0)
    got = adaptive_sharpness_avg(loss_fn, [w], rho=0.1, samples=4000, generator=gen)
    assert got.item() == pytest.approx(expected.item(), rel=0.05)


def test_adaptive_sharpness_avg_matches_a_second_order_expansion() -> None:
    hessian, params, loss_fn = hessian_of(0)
    w = flat([p.detach() for p in params])
    rho = 1e-2
    expected = 0.5 * rho**2 * (torch.diagonal(hessian) * w**2).sum()
    gen = torch.Generator().manual_seed(0)
    got = adaptive_sharpness_avg(loss_fn, params, rho=rho, samples=4000, generator=gen)
    assert got.item() == pytest.approx(expected.item(), rel=0.1)


def test_adaptive_sharpness_worst_bounds() -> None:
    _, params, loss_fn = hessian_of(0)
    w0 = [p.detach().clone() for p in params]
    rho = 0.05
    worst = adaptive_sharpness_worst(loss_fn, params, rho=rho, steps=10)
    one_step = adaptive_sharpness_worst(loss_fn, params, rho=rho, steps=1)
    assert worst >= one_step > 0
    assert all(torch.equal(p, w) for p, w in zip(params, w0, strict=True))
    # the worst case beats random directions in the same scaled ball
    w = flat(w0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        z *= rho / z.norm()
        delta = w.abs() * z
        sizes = [p.numel() for p in params]
        with torch.no_grad():
            for p, d, p0 in zip(params, delta.split(sizes), w0, strict=True):
                p.copy_(p0 + d.view_as(p))
            random_loss = loss_fn()  # type: ignore[operator]
            for p, p0 in zip(params, w0, strict=True):
                p.copy_(p0)
        assert worst >= random_loss - loss_fn()  # type: ignore[operator]


def test_filter_normalized_direction_and_loss_slice() -> None:
    _, params, loss_fn = hessian_of(0)
    direction = filter_normalized([torch.randn_like(p) for p in params], params)
    for d, p in zip(direction, params, strict=True):
        if p.dim() > 1:
            torch.testing.assert_close(d.norm(dim=1), p.detach().norm(dim=1))
        else:
            assert not d.any()
    alphas = torch.linspace(-1, 1, 5)
    losses = loss_along(loss_fn, params, direction, alphas)
    assert losses.shape == (5,)
    torch.testing.assert_close(losses[2], loss_fn().detach())  # type: ignore[operator]
