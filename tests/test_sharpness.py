"""Sharpness estimators against exact Hessians of tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_sam.sharpness import (
    CriticalSharpness,
    adaptive_sharpness_avg,
    adaptive_sharpness_worst,
    critical_sharpness,
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


# ---- critical sharpness (Kalra et al. 2026): λ_c = 2 / η_c, η_c the smallest step along −u that raises the loss ----

LossFn = Callable[[], torch.Tensor]


class Counted:
    """A loss closure that counts its calls (and can fail at one of them)."""

    def __init__(self, loss_fn: LossFn, fail_at: int | None = None) -> None:
        self.loss_fn, self.fail_at, self.calls = loss_fn, fail_at, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("loss_fn failed")
        return self.loss_fn()


def quadratic(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LossFn]:
    """``L = ½ wᵀHw − bᵀw``, H symmetric positive definite with eigenvalues in (0.5, 9.5)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = q @ torch.diag(0.5 + 9 * torch.rand(n, generator=gen, dtype=torch.float64)) @ q.T
    hessian = 0.5 * (hessian + hessian.T)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()

    def loss_fn() -> torch.Tensor:
        return 0.5 * w @ hessian @ w - b @ w

    return hessian, b, w, loss_fn


def mlp_with_adam_direction(seed: int, lr: float = 0.05) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """A 3-5-1 tanh MLP (26 weights) on random data after 3 Adam steps, and the 4th step's direction ``u``.

    ``u = (w_before − w_after) / lr`` of that step; the weights are put back to ``w_before``.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    model.data = (x, y)  # type: ignore[assignment]
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(4):
        before = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    direction = [(w - p.detach()) / lr for w, p in zip(before, params, strict=True)]
    with torch.no_grad():
        for p, w in zip(params, before, strict=True):
            p.copy_(w)
    return model, params, direction


def mlp_loss(model: nn.Module) -> LossFn:
    x, y = model.data  # type: ignore[misc]
    return lambda: nn.functional.mse_loss(model(x), y)


def dense_first_crossing(model: nn.Module, direction: list[torch.Tensor], hi: float, n: int = 20000) -> float:
    """The oracle: the first of ``n`` steps in ``(0, hi]`` where ``L(w − ηu) > L(w)``, by its own batched forward."""
    x, y = model.data  # type: ignore[misc]
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    u1, c1, u2, c2 = direction
    etas = torch.linspace(0, hi, n + 1, dtype=torch.float64)
    e = etas.view(-1, 1, 1)
    hidden = torch.tanh(torch.einsum("ni,kji->knj", x, w1 - e * u1) + (b1 - etas.view(-1, 1) * c1)[:, None, :])
    out = torch.einsum("knj,koj->kno", hidden, w2 - e * u2) + (b2 - etas.view(-1, 1) * c2)[:, None, :]
    losses = ((out - y) ** 2).mean(dim=(1, 2))
    raised = losses[1:] > losses[0]
    assert raised.any(), "the grid must reach the crossing"
    return float(etas[1:][raised][0])


def check_bracket(result: CriticalSharpness, eta_c: float, rtol: float, slack: float = 0.0) -> None:
    """``eta_c`` in ``(lower, upper]`` (each side widened by ``slack``), ``value`` within ``rtol`` of ``2/eta_c``."""
    assert result.lower - slack < eta_c <= result.upper + slack
    assert (result.upper - result.lower) <= rtol * (result.upper + result.lower)
    exact = 2 / eta_c
    assert abs(result.value.item() - exact) <= (rtol + slack / eta_c) * exact
    assert result.eta.item() == pytest.approx((result.lower + result.upper) / 2, rel=1e-6)
    assert result.value.item() == pytest.approx(2 / result.eta.item(), rel=1e-6)


@pytest.mark.parametrize("rtol", [0.05, 1e-3, 1e-6])
@pytest.mark.parametrize("seed", range(4))
def test_critical_sharpness_is_the_directional_sharpness_on_a_quadratic(seed: int, rtol: float) -> None:
    """``L(w − ηu) − L(w) = −η gᵀu + ½η² uᵀHu``: the loss rises past ``η_c = 2 gᵀu / uᵀHu`` exactly."""
    hessian, b, w, loss_fn = quadratic(seed)
    g = hessian @ w.detach() - b
    eta_c = (2 * (g @ g) / (g @ hessian @ g)).item()
    counted = Counted(loss_fn)
    result = critical_sharpness(counted, [w], [g], eta0=0.01, rtol=rtol, max_evals=80)
    check_bracket(result, eta_c, rtol)
    assert result.evaluations == counted.calls
    # a weighted mean of the eigenvalues (paper, result 2.1): below the largest
    assert result.value.item() <= torch.linalg.eigvalsh(hessian).max().item() * (1 + rtol)


@pytest.mark.parametrize("seed", range(4))
def test_critical_sharpness_is_the_top_eigenvalue_along_the_top_eigenvector(seed: int) -> None:
    hessian, _, w, _ = quadratic(seed)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    top = eigenvalues[-1].item()
    b = hessian @ w.detach() - 1.5 * eigenvectors[:, -1]  # so that g = Hw − b = 1.5 v_max

    def loss_fn() -> torch.Tensor:
        return 0.5 * w @ hessian @ w - b @ w

    g = hessian @ w.detach() - b
    for rtol in (0.05, 1e-6):
        result = critical_sharpness(loss_fn, [w], [g], eta0=0.01, rtol=rtol, max_evals=60)
        check_bracket(result, 2 / top, rtol)  # λ_c = gᵀHg / gᵀg = λ_max


@pytest.mark.parametrize("seed", range(3))
def test_critical_sharpness_of_an_mlp_along_an_adam_step_matches_a_dense_line_search(seed: int) -> None:
    model, params, direction = mlp_with_adam_direction(seed)
    counted = Counted(mlp_loss(model))
    result = critical_sharpness(counted, params, direction, eta0=0.05)  # eta0: the learning rate
    hi, n = 2.0, 20000
    eta_c = dense_first_crossing(model, direction, hi, n)
    check_bracket(result, eta_c, 0.05, slack=hi / n)  # the grid knows the crossing to one of its steps
    assert result.evaluations == counted.calls <= 10


def test_critical_sharpness_warm_started_costs_few_evaluations() -> None:
    """The paper's use: ``eta0`` the previous call's ``eta``; 1–2 exponential steps and 3–4 bisections."""
    model, params, direction = mlp_with_adam_direction(0)
    cold = critical_sharpness(mlp_loss(model), params, direction, eta0=1e-4)
    assert cold.upper / 1e-4 > 2**11  # η_c ≈ 0.32: a dozen doublings from a poor guess
    assert cold.evaluations >= 1 + 1 + 11 + 3
    for nudge in (1.0, 0.8, 1.25):
        warm = critical_sharpness(mlp_loss(model), params, direction, eta0=nudge * cold.eta.item())
        assert warm.evaluations <= 1 + 2 + 4
        assert warm.value.item() == pytest.approx(cold.value.item(), rel=0.1)


def test_critical_sharpness_restores_the_weights_bitwise_and_leaves_grad_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))  # float32: w − ηu + ηu is not w
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    params = list(model.parameters())
    nn.functional.mse_loss(model(x), y).backward()
    direction = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    grads = [p.grad for p in params]
    grad_copies = [g.clone() for g in grads]  # type: ignore[union-attr]
    bits = [p.detach().clone().view(torch.int32) for p in params]
    seen: list[list[torch.Tensor]] = []

    def loss_fn() -> torch.Tensor:
        seen.append([p.detach().clone() for p in params])
        return nn.functional.mse_loss(model(x), y)

    counted = Counted(loss_fn)
    result = critical_sharpness(counted, params, direction, eta0=0.3)
    assert result.evaluations == counted.calls == len(seen) >= 5
    assert any(not torch.equal(s[0], seen[0][0]) for s in seen[1:]), "the search moved the weights"
    for p, b, g, g0 in zip(params, bits, grads, grad_copies, strict=True):
        assert torch.equal(p.detach().view(torch.int32), b)
        assert p.grad is g and torch.equal(p.grad, g0)  # type: ignore[arg-type]
    # every evaluation at w − ηu from the saved copy: the last one at exactly w − upper·u or w − lower·u
    saved = [b.view(torch.float32) for b in bits]
    assert any(
        all(torch.equal(s, torch.sub(w, u, alpha=eta)) for s, w, u in zip(seen[-1], saved, direction, strict=True))
        for eta in (result.lower, result.upper)
    )

    failing = Counted(loss_fn, fail_at=4)  # a failure in the middle of the search puts them back too
    with pytest.raises(RuntimeError, match="loss_fn failed"):
        critical_sharpness(failing, params, direction, eta0=0.3)
    assert all(torch.equal(p.detach().view(torch.int32), b) for p, b in zip(params, bits, strict=True))


def test_critical_sharpness_in_bfloat16_is_finite_and_close_to_float64() -> None:
    model, params, direction = mlp_with_adam_direction(0)
    reference = critical_sharpness(mlp_loss(model), params, direction, eta0=0.05)
    x, y = model.data  # type: ignore[misc]
    model.to(torch.bfloat16)
    model.data = (x.bfloat16(), y.bfloat16())  # type: ignore[assignment]
    params = list(model.parameters())
    counted = Counted(mlp_loss(model))
    result = critical_sharpness(counted, params, [u.bfloat16() for u in direction], eta0=0.05)
    assert result.value.dtype == torch.float32 and result.evaluations == counted.calls
    assert 0 < result.value.item() < math.inf
    # bfloat16 rounds the loss to 2^-8: near the crossing that, not the curvature, decides some comparisons
    assert result.value.item() == pytest.approx(reference.value.item(), rel=0.35)


def test_critical_sharpness_when_the_loss_never_rises() -> None:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    slope = torch.tensor([3.0, 1.0], dtype=torch.float64)
    counted = Counted(lambda: slope @ w)  # descends along u = slope forever
    result = critical_sharpness(counted, [w], [slope], eta0=0.1, max_evals=12)
    assert (result.value.item(), result.eta.item(), result.upper) == (0.0, math.inf, math.inf)
    assert result.lower == 0.1 * 2**10  # 1 evaluation at w, 11 steps from 0.1 doubling
    assert result.evaluations == counted.calls == 12


def test_critical_sharpness_along_an_ascent_direction() -> None:
    hessian, b, w, loss_fn = quadratic(0)
    g = hessian @ w.detach() - b
    counted = Counted(loss_fn)
    result = critical_sharpness(counted, [w], [-g], eta0=0.1, max_evals=12)  # uphill at every step
    assert (result.value.item(), result.eta.item(), result.lower) == (math.inf, 0.0, 0.0)
    assert result.upper == 0.1 / 2**10
    assert result.evaluations == counted.calls == 12


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_critical_sharpness_counts_a_non_finite_loss_as_raised(bad: float) -> None:
    """Descending until the step reaches 3, not finite beyond: ``η_c = 3``."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def loss_fn() -> torch.Tensor:
        step = w[0]  # w − η·(−1) = η
        return torch.where(step < 3, -step, torch.tensor(bad, dtype=torch.float64))

    result = critical_sharpness(loss_fn, [w], [-torch.ones(1, dtype=torch.float64)], eta0=0.1, rtol=1e-4)
    check_bracket(result, 3.0, 1e-4)


def test_critical_sharpness_of_a_non_finite_loss_is_nan_after_one_evaluation() -> None:
    w = torch.ones(2, requires_grad=True)
    counted = Counted(lambda: (w * math.nan).sum())
    result = critical_sharpness(counted, [w], [torch.ones(2)], eta0=0.1)
    assert math.isnan(result.value.item()) and math.isnan(result.eta.item())
    assert math.isnan(result.lower) and math.isnan(result.upper)
    assert result.evaluations == counted.calls == 1


def test_critical_sharpness_takes_a_tensor_learning_rate() -> None:
    hessian, b, w, loss_fn = quadratic(1)
    g = hessian @ w.detach() - b
    as_float = critical_sharpness(loss_fn, [w], [g], eta0=0.01)
    as_tensor = critical_sharpness(loss_fn, [w], [g], eta0=torch.tensor(0.01, dtype=torch.float64))  # type: ignore[arg-type]
    assert (as_tensor.lower, as_tensor.upper) == (as_float.lower, as_float.upper)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta0": 0.0}, "eta0 must be a positive, finite step size"),
        ({"eta0": -0.1}, "eta0 must be a positive, finite step size"),
        ({"eta0": math.nan}, "eta0 must be a positive, finite step size"),
        ({"eta0": math.inf}, "eta0 must be a positive, finite step size"),
        ({"eta0": 0.1, "rtol": 0.0}, r"rtol must lie in \(0, 1\)"),
        ({"eta0": 0.1, "rtol": 1.0}, r"rtol must lie in \(0, 1\)"),
        ({"eta0": 0.1, "max_evals": 1}, "max_evals must be an integer >= 2"),
        ({"eta0": 0.1, "direction": []}, "one tensor per parameter, got 0 for 2 parameters"),
        ({"eta0": 0.1, "direction": [torch.ones(3)] * 3}, "one tensor per parameter, got 3 for 2 parameters"),
        ({"eta0": 0.1, "direction": [torch.ones(3), torch.ones(3)]}, r"direction\[1\] has shape \(3,\)"),
        ({"eta0": 0.1, "direction": [torch.zeros(3), torch.zeros(2)]}, "nonzero, finite update direction"),
        ({"eta0": 0.1, "direction": [torch.ones(3), torch.tensor([1.0, math.nan])]}, "nonzero, finite"),
        ({"eta0": 0.1, "params": []}, "params is empty"),
    ],
)
def test_critical_sharpness_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    counted = Counted(lambda: sum((p * p).sum() for p in params))  # type: ignore[arg-type, return-value]
    arguments: dict[str, object] = {"params": params, "direction": [torch.ones(3), torch.ones(2)], **kwargs}
    with pytest.raises(ValueError, match=message):
        critical_sharpness(counted, **arguments)  # type: ignore[arg-type]
    assert counted.calls == 0


def test_critical_sharpness_wants_a_scalar_loss() -> None:
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="loss_fn must return a scalar loss, got shape"):
        critical_sharpness(lambda: w * w, [w], [torch.ones(3)], eta0=0.1)
    assert torch.equal(w, torch.ones(3))


def test_critical_sharpness_on_dtensors_matches_plain_tensors() -> None:
    """DTensor parameters (one rank: the local arithmetic, and a loss that is a DTensor itself)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of another test")
    model, params, direction = mlp_with_adam_direction(1)
    plain = critical_sharpness(mlp_loss(model), params, direction, eta0=0.05, rtol=1e-3)
    x, y = model.data  # type: ignore[misc]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        placements = [[Shard(0)], [Shard(0)], [Shard(1)], [Replicate()]]
        pairs = list(zip(params, direction, placements, strict=True))
        sharded = [nn.Parameter(distribute_tensor(p.detach(), mesh, pl)) for p, _, pl in pairs]
        sharded_direction = [distribute_tensor(u, mesh, pl) for _, u, pl in pairs]
        w1, b1, w2, b2 = sharded
        xd, yd = distribute_tensor(x, mesh, [Replicate()]), distribute_tensor(y, mesh, [Replicate()])

        def loss_fn() -> torch.Tensor:  # a DTensor scalar
            return ((torch.tanh(xd @ w1.T + b1) @ w2.T + b2 - yd) ** 2).mean()

        before = [p.to_local().clone() for p in sharded]
        result = critical_sharpness(loss_fn, sharded, sharded_direction, eta0=0.05, rtol=1e-3)
        assert (result.lower, result.upper, result.evaluations) == (plain.lower, plain.upper, plain.evaluations)
        assert all(torch.equal(p.to_local(), b) for p, b in zip(sharded, before, strict=True))
        with pytest.raises(ValueError, match=r"direction\[0\] must be placed like its parameter"):
            critical_sharpness(loss_fn, sharded, [u.full_tensor() for u in sharded_direction], eta0=0.05)
    finally:
        dist.destroy_process_group()
