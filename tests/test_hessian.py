"""The Hessian machinery against dense Hessians of tiny models, the optimizers' own dynamics, and PyHessian."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sam import SAM
from lightning_sam.hessian import (
    HessianOperator,
    HVPFallbackWarning,
    TopEigenpairs,
    hessian_spectrum,
    hessian_top_eigs,
    hessian_trace,
    hessian_vector_product,
)
from lightning_sam.stability import NoStateYet, step_rule


def tiny(seed: int, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    return model, torch.randn(32, 3, dtype=dtype), torch.randint(0, 2, (32,))


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vectorize: bool = False) -> torch.Tensor:
    """The exact Hessian by torch.autograd.functional.hessian of the loss as a function of the flat weights."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, tensors, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    weights = torch.cat([p.detach().flatten() for p in params])
    return torch.autograd.functional.hessian(loss_of_flat, weights, vectorize=vectorize)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: nn.functional.cross_entropy(model(x), y)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


# Top-k eigenvalues and their residuals --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_top_k_eigenvalues_within_one_percent_and_residuals_are_the_true_ones(seed: int) -> None:
    model, x, y = tiny(seed)
    hessian = dense_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(hessian).flip(0)[:3]
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    top = hessian_top_eigs(loss_of(model, x, y), params, k=3, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), "weights bitwise as they were"
    torch.testing.assert_close(top.eigenvalues, exact, rtol=0.01, atol=0)
    for value, vector, residual in zip(top.eigenvalues, top.eigenvectors, top.residuals, strict=True):
        v = flat(vector)
        assert v.norm().item() == pytest.approx(1.0, rel=1e-9)
        true_residual = (hessian @ v - value * v).norm() / value.abs()
        assert residual.item() == pytest.approx(true_residual.item(), rel=1e-4, abs=1e-9)
        assert residual.item() <= 0.01, "the iteration ran until every residual was within tol"
    assert top.products <= 100


def test_lanczos_is_exact_once_it_spans_the_space_and_finds_eigenvalues_of_either_sign() -> None:
    model, x, y = tiny(0)
    n = sum(p.numel() for p in model.parameters())
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    top = hessian_top_eigs(loss_of(model, x, y), list(model.parameters()), k=n, max_iters=n, tol=1e-12)
    torch.testing.assert_close(top.eigenvalues, exact.flip(0), rtol=1e-7, atol=1e-9)


def test_warm_start_from_the_last_eigenvectors_needs_fewer_products() -> None:
    model, x, y = tiny(1)
    params = list(model.parameters())
    cold = hessian_top_eigs(loss_of(model, x, y), params, k=2, tol=1e-6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in params:
            p.mul_(1.001)  # a training step later
    warm = hessian_top_eigs(
        loss_of(model, x, y), params, k=2, tol=1e-6, init=cold.eigenvectors, generator=torch.Generator().manual_seed(0)
    )
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:2]
    torch.testing.assert_close(warm.eigenvalues, exact, rtol=1e-5, atol=0)
    assert warm.products < cold.products


@pytest.mark.parametrize(("k", "max_iters", "match"), [(0, 10, "positive integer"), (5, 3, "at least k")])
def test_bad_arguments_are_one_clear_error(k: int, max_iters: int, match: str) -> None:
    model, x, y = tiny(0)
    with pytest.raises(ValueError, match=match):
        hessian_top_eigs(loss_of(model, x, y), list(model.parameters()), k=k, max_iters=max_iters)
    with pytest.raises(ValueError, match="Unknown Hessian-vector product backend 'magic'"):
        hessian_vector_product(loss_of(model, x, y), list(model.parameters()), [], hvp="magic")


# Preconditioned sharpness and the edge of stability -------------------------------------------------------------


def adam_trained(
    seed: int, wrap_in_sam: bool, steps: int = 300
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    model, x, y = tiny(seed)
    if wrap_in_sam:
        optimizer: torch.optim.Optimizer = SAM(
            model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, betas=(0.9, 0.99)
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()
        optimizer.step(closure) if wrap_in_sam else optimizer.step()
    return model, x, y, optimizer


def adam_p_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """P = (1 - β1^t) · diag(sqrt(v_t / (1 - β2^t)) + ε), written from the formula."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    group = base.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    parts = []
    for p in model.parameters():
        state = base.state[p]
        t = float(state["step"])
        parts.append((1 - beta1**t) * (torch.sqrt(state["exp_avg_sq"] / (1 - beta2**t)) + eps))
    return flat(parts)


@pytest.mark.parametrize("wrap_in_sam", [False, True], ids=["Adam", "SAM-AdamW"])
def test_preconditioned_sharpness_of_adam_after_300_steps_is_within_one_percent(wrap_in_sam: bool) -> None:
    model, x, y, optimizer = adam_trained(0, wrap_in_sam)
    params = list(model.parameters())
    rule = step_rule(optimizer, params)
    assert rule.preconditioner is not None
    p_diag = adam_p_by_hand(model, optimizer)
    torch.testing.assert_close(flat(rule.preconditioner).double(), p_diag, rtol=1e-6, atol=0)
    # λ(P⁻¹H) of the non-symmetric product, by a general eigensolver
    exact = torch.linalg.eigvals(torch.diag(1 / p_diag) @ dense_hessian(model, x, y)).real.max()
    top = hessian_top_eigs(loss_of(model, x, y), params, preconditioner=rule.preconditioner)
    assert top.eigenvalues[0].item() == pytest.approx(exact.item(), rel=0.01)
    group = (optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer).param_groups[0]
    beta1, lr = group["betas"][0], group["lr"]
    assert rule.edge == pytest.approx((2 + 2 * beta1) / (1 - beta1)) and rule.lr == lr  # Cohen et al. 2022


def simulate(optimizer_cls: type[torch.optim.Optimizer], curvature: float, steps: int = 400, **kwargs: float) -> float:
    """|w| after ``steps`` of the optimizer on L = ½ curvature·w² from w = 1."""
    w = nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = optimizer_cls([w], **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * w**2).backward()
        optimizer.step()
    return abs(w.item())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "nesterov": True},
    ],
)
def test_sgd_edge_of_stability_is_where_sgd_starts_to_diverge(kwargs: dict[str, float]) -> None:
    """The oracle is SGD itself on a quadratic: below eos_ratio = 1 it converges, above it diverges."""
    w = nn.Parameter(torch.ones(()))
    rule = step_rule(torch.optim.SGD([w], **kwargs), [w])
    edge_curvature = rule.edge / (rule.lr or math.nan)  # λ·lr_eff = c
    assert simulate(torch.optim.SGD, 0.97 * edge_curvature, **kwargs) < 1e-2
    assert simulate(torch.optim.SGD, 1.03 * edge_curvature, **kwargs) > 1e2


def test_groups_with_different_learning_rates_enter_the_step_and_different_momenta_are_refused() -> None:
    model, x, y = tiny(2)
    first, second = model[0], model[2]
    optimizer = torch.optim.SGD(
        [{"params": first.parameters(), "lr": 0.1}, {"params": second.parameters(), "lr": 0.02}], momentum=0.9
    )
    params = list(model.parameters())
    rule = step_rule(optimizer, params)
    assert rule.lr is None and rule.edge == pytest.approx(3.8)
    step_sizes = flat([torch.full_like(p, 0.1 if i < 2 else 0.02) for i, p in enumerate(params)])
    exact = torch.linalg.eigvals(torch.diag(step_sizes) @ dense_hessian(model, x, y)).real.max()
    top = hessian_top_eigs(loss_of(model, x, y), params, preconditioner=rule.step_preconditioner)
    assert top.eigenvalues[0].item() == pytest.approx(exact.item(), rel=0.01)
    mixed = torch.optim.SGD([{"params": first.parameters(), "momentum": 0.9}, {"params": second.parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=r"different momenta.*use one momentum for all groups"):
        step_rule(mixed, params)
    with pytest.raises(NoStateYet, match="Adam has not stepped yet"):
        step_rule(torch.optim.Adam(model.parameters()), params)
    with pytest.raises(ValueError, match=r"defined here for SGD, Adam, AdamW, RMSprop and Adagrad.*not for NAdam"):
        step_rule(torch.optim.NAdam(model.parameters()), params)


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs", "p_of", "edge"),
    [
        (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5}, lambda s, g: s["square_avg"].sqrt() + g["eps"], 3.0),
        (
            torch.optim.RMSprop,
            {"lr": 1e-2, "centered": True},
            lambda s, g: (s["square_avg"] - s["grad_avg"] ** 2).sqrt() + g["eps"],
            2.0,
        ),
        (torch.optim.Adagrad, {"lr": 1e-1, "lr_decay": 0.01}, lambda s, g: s["sum"].sqrt() + g["eps"], 2.0),
    ],
)
def test_rmsprop_and_adagrad_preconditioners_are_their_denominators(
    optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, float], p_of: Callable[..., torch.Tensor], edge: float
) -> None:
    model, x, y = tiny(3)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    params = list(model.parameters())
    rule = step_rule(optimizer, params)
    group = optimizer.param_groups[0]
    expected = [p_of(optimizer.state[p], group) for p in params]
    torch.testing.assert_close(flat(rule.preconditioner or []).double(), flat(expected), rtol=1e-6, atol=0)
    assert rule.edge == pytest.approx(edge)
    lr = group["lr"] / (1 + 19 * group.get("lr_decay", 0.0))  # Adagrad's lr at its 20th step
    assert rule.lr == pytest.approx(lr)


# Trace and its standard error -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_standard_error_matches_the_spread_over_seeds(method: str) -> None:
    model, x, y = tiny(4)
    exact = torch.trace(dense_hessian(model, x, y)).item()
    params = list(model.parameters())
    estimates, stderrs = [], []
    for seed in range(150):
        trace, stderr = hessian_trace(
            loss_of(model, x, y), params, samples=9, method=method, generator=torch.Generator().manual_seed(seed)
        )
        estimates.append(trace.item())
        stderrs.append(stderr.item())
    errors = torch.tensor(estimates) - exact
    assert abs(errors.mean().item()) < 3 * errors.std().item() / math.sqrt(150), "unbiased"
    rms_error, rms_stderr = errors.square().mean().sqrt().item(), torch.tensor(stderrs).square().mean().sqrt().item()
    assert 0.75 < rms_stderr / rms_error < 1.33, "the reported standard error is the actual one"


# Spectrum (stochastic Lanczos quadrature) -------------------------------------------------------------------------


def test_spectrum_quadrature_is_exact_for_its_start_vector_and_its_moments_average_to_the_spectrums() -> None:
    model, x, y = tiny(5)
    hessian = dense_hessian(model, x, y)
    n = hessian.shape[0]
    eigenvalues = torch.linalg.eigvalsh(hessian)
    params = list(model.parameters())
    spectrum = hessian_spectrum(
        loss_of(model, x, y), params, iters=8, runs=400, generator=torch.Generator().manual_seed(0)
    )
    assert spectrum.nodes.shape == (400, 8)
    torch.testing.assert_close(spectrum.weights.sum(dim=1), torch.ones(400, dtype=torch.float64))
    for power in (1, 2, 3, 4):
        exact = eigenvalues.pow(power).mean().item()  # (1/n) tr H^p
        assert spectrum.moment(power).item() == pytest.approx(exact, rel=0.1), power
    # One run, the same start vector by hand: Gauss quadrature is exact below degree 2·iters.
    generator = torch.Generator().manual_seed(7)
    one = hessian_spectrum(loss_of(model, x, y), params, iters=8, generator=generator)
    v = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    v = v.sign() / math.sqrt(n)
    for power in range(16):
        exact = (v @ torch.linalg.matrix_power(hessian, power) @ v).item()
        assert one.moment(power).item() == pytest.approx(exact, rel=1e-6, abs=1e-9), power
    full = hessian_spectrum(loss_of(model, x, y), params, iters=n, runs=200, generator=torch.Generator().manual_seed(1))
    expected_negative = (eigenvalues < -1e-2 * eigenvalues.abs().max()).double().mean().item()
    assert full.negative_fraction().item() == pytest.approx(expected_negative, abs=0.03)
    grid = torch.linspace(-5, 5, 4001, dtype=torch.float64)
    assert torch.trapezoid(full.density(grid, sigma=0.05), grid).item() == pytest.approx(1.0, abs=0.02)


# Hessian-vector products without double backward -----------------------------------------------------------------


class NoDoubleBackwardTanh(torch.autograd.Function):
    """tanh whose backward is a kernel without a derivative of its own, like fused attention's."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return TanhBackwardKernel.apply(out, grad)


class TanhBackwardKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad * (1 - out * out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("derivative for tanh_backward_kernel is not implemented")


class Fused(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[2](NoDoubleBackwardTanh.apply(self.model[0](x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_products_match_the_exact_ones(dtype: torch.dtype) -> None:
    model, x, y = tiny(6, dtype)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    v = [torch.randn_like(p) for p in params]
    exact = dense_hessian(model.double(), x.double(), y) @ flat(v).double()
    model.to(dtype)
    approx = flat(hessian_vector_product(loss_of(model, x, y), params, v, hvp="finite_difference")).double()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), "weights restored bitwise"
    assert ((approx - exact).norm() / exact.norm()).item() < (1e-7 if dtype == torch.float64 else 1e-3)


def test_auto_falls_back_to_finite_differences_with_one_warning_where_double_backward_raises() -> None:
    model, x, y = tiny(7)
    fused = Fused(model)
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y)).max()
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="tanh_backward_kernel"):
        hessian_top_eigs(loss_of(fused, x, y), params, hvp="autograd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top = hessian_top_eigs(loss_of(fused, x, y), params, hvp="auto")
    fallbacks = [w for w in caught if issubclass(w.category, HVPFallbackWarning)]
    assert len(fallbacks) == 1 and "tanh_backward_kernel" in str(fallbacks[0].message)
    assert top.eigenvalues[0].item() == pytest.approx(exact.item(), rel=0.01)


def test_bf16_parameters_accumulate_in_float32() -> None:
    model, x, y = tiny(8, torch.float32)
    exact = torch.linalg.eigvalsh(dense_hessian(model.double(), x.double(), y)).max().item()
    model.to(torch.bfloat16)
    params = list(model.parameters())
    top = hessian_top_eigs(lambda: nn.functional.cross_entropy(model(x.bfloat16()).float(), y), params)
    assert top.eigenvalues.dtype == torch.float32
    assert top.eigenvalues[0].item() == pytest.approx(exact, rel=0.05)  # bf16 weights and products: ~3 digits
    trace = hessian_trace(lambda: nn.functional.cross_entropy(model(x.bfloat16()).float(), y), params)
    assert trace.trace.dtype == torch.float32 and math.isfinite(trace.trace.item())


def test_operator_scale_gives_the_symmetric_preconditioned_hessian() -> None:
    model, x, y = tiny(9)
    params = list(model.parameters())
    scale = [torch.rand_like(p) + 0.5 for p in params]
    v = [torch.randn_like(p) for p in params]
    d = flat(scale)
    expected = d * (dense_hessian(model, x, y) @ (d * flat(v)))
    torch.testing.assert_close(flat(HessianOperator(loss_of(model, x, y), params, scale=scale)(v)), expected)


# Parity with PyHessian ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_parity_with_pyhessian_on_the_same_model_and_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyhessian import hessian as PyHessian

    def eig(matrix: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.eig (removed in torch 1.9), which PyHessian 0.1's density calls, for its symmetric matrix."""
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    monkeypatch.setattr(torch, "eig", eig, raising=False)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    params = list(model.parameters())
    ours = hessian_top_eigs(loss_of(model, x, y), params, k=3, tol=1e-4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = PyHessian(model, nn.functional.cross_entropy, data=(x, y), cuda=False)
    their_top, _ = theirs.eigenvalues(top_n=3, maxIter=500, tol=1e-6)
    torch.testing.assert_close(ours.eigenvalues, torch.tensor(their_top), rtol=0.01, atol=0)
    their_trace = torch.tensor(theirs.trace(maxIter=500, tol=1e-9))
    trace, stderr = hessian_trace(loss_of(model, x, y), params, samples=150, generator=torch.Generator().manual_seed(0))
    their_stderr = their_trace.std() / math.sqrt(len(their_trace))
    assert abs(trace.item() - their_trace.mean().item()) < 4 * math.hypot(stderr.item(), their_stderr.item())
    eigen_list, weight_list = theirs.density(iter=40, n_v=20)
    their_nodes, their_weights = torch.tensor(eigen_list), torch.tensor(weight_list)
    spectrum = hessian_spectrum(
        loss_of(model, x, y), params, iters=40, runs=20, generator=torch.Generator().manual_seed(0)
    )
    for power in (1, 2):
        theirs_moment = (their_weights * their_nodes.pow(power)).sum(dim=1).mean().item()
        assert spectrum.moment(power).item() == pytest.approx(theirs_moment, rel=0.15), power
    for p in params:
        p.grad = None  # PyHessian leaves create_graph gradients behind


# What review found ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs", "moved_by"),
    [
        (torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.9)}, lambda state, grad: state["exp_avg"]),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.0}, lambda state, grad: state["exp_avg"]),
        (torch.optim.RMSprop, {"lr": 1e-2, "centered": True}, lambda state, grad: grad),
        (torch.optim.Adagrad, {"lr": 1e-1, "lr_decay": 0.05}, lambda state, grad: grad),
    ],
)
def test_preconditioner_and_lr_are_what_the_optimizers_own_step_divides_by(
    optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, float], moved_by: Callable[..., torch.Tensor]
) -> None:
    """The oracle is the optimizer's step: w_new − w = −lr · m / P, with m its average (Adam) or the gradient."""
    model, x, y = tiny(10)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    params = list(model.parameters())
    for _ in range(7):
        before = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    rule = step_rule(optimizer, params)
    assert rule.preconditioner is not None and rule.lr is not None
    for p, w, p_diag in zip(params, before, rule.preconditioner, strict=True):
        moved = (p.detach() - w) * p_diag
        torch.testing.assert_close(moved, -rule.lr * moved_by(optimizer.state[p], p.grad), rtol=1e-6, atol=1e-12)


def test_parameters_without_optimizer_state_do_not_move_and_do_not_silence_the_measure() -> None:
    model, x, y = tiny(11)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.Adam([*model.parameters(), unused], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    params = [*model.parameters(), unused]
    rule = step_rule(optimizer, params)  # used to raise NoStateYet for ever
    assert rule.preconditioner is not None and torch.isinf(rule.preconditioner[-1]).all()
    assert rule.lr is None, "S is zero on the unused parameter: no single lr"
    p_inv = torch.cat([1 / flat(rule.preconditioner[:-1]), torch.zeros(3, dtype=torch.float64)])
    hessian = torch.block_diag(dense_hessian(model, x, y), torch.zeros(3, 3, dtype=torch.float64))
    exact = torch.linalg.eigvals(torch.diag(p_inv) @ hessian).real.max()
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y) + 0 * unused.sum()  # noqa: E731
    top = hessian_top_eigs(loss_fn, params, preconditioner=rule.preconditioner)
    assert top.eigenvalues[0].item() == pytest.approx(exact.item(), rel=0.01)


def test_a_warm_start_of_another_parameter_set_starts_afresh() -> None:
    model, x, y = tiny(12)
    params = list(model.parameters())
    stale = [[torch.randn(10, dtype=torch.float64)]]  # e.g. saved before layers were unfrozen
    top = hessian_top_eigs(loss_of(model, x, y), params, init=stale, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y)).max()
    assert top.eigenvalues[0].item() == pytest.approx(exact.item(), rel=0.01)


def test_finite_differences_on_bf16_weights_step_beyond_bf16_rounding() -> None:
    model, x, y = tiny(13, torch.float32)
    v = [torch.randn_like(p) for p in model.parameters()]
    exact = dense_hessian(model.double(), x.double(), y) @ flat(v).double()
    model.to(torch.bfloat16)
    params = list(model.parameters())
    loss_fn = lambda: nn.functional.cross_entropy(model(x.bfloat16()).float(), y)  # noqa: E731
    approx = flat(hessian_vector_product(loss_fn, params, [t.bfloat16() for t in v], hvp="finite_difference"))
    assert ((approx.double() - exact).norm() / exact.norm()).item() < 0.15  # was 0.43 with float32's step


class OutOfMemoryInDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return Exhausting.apply(x, grad)


class Exhausting(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return 2 * x * grad

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise torch.OutOfMemoryError("out of memory in double backward")


def test_out_of_memory_is_raised_not_taken_for_a_missing_double_backward() -> None:
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(torch.OutOfMemoryError):
        hessian_vector_product(lambda: OutOfMemoryInDoubleBackward.apply(w).sum(), [w], [torch.ones(2)], hvp="auto")


# Transformers: exact products under the math attention kernel; honest error bars from finite differences ----------


class TinyTransformer(nn.Module):
    """One encoder layer (d_model 8, 2 heads), mean-pooled into a linear head: 627 parameters."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))  # type: ignore[no-any-return]


class Trained(NamedTuple):
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    preconditioner: list[torch.Tensor]  # P per parameter, from AdamW's state by hand
    hessian: torch.Tensor  # dense, float64
    scaled: torch.Tensor  # P^{-1/2} H P^{-1/2}, whose eigenvalues are those of P⁻¹H


def math_attention_dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of a float64 copy (double backward through attention needs its math kernel)."""
    with sdpa_kernel(SDPBackend.MATH):
        return dense_hessian(copy.deepcopy(model).double(), x.double(), y, vectorize=True)


@pytest.fixture(scope="module")
def transformer() -> Trained:
    """The reported case, smaller: a TransformerEncoder trained 30 steps with AdamW."""
    torch.manual_seed(0)
    model = TinyTransformer()
    x, y = torch.randn(16, 6, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    p_flat = adam_p_by_hand(model, optimizer).double()  # P = (1 - β1^t)(sqrt(v/(1 - β2^t)) + ε), as stability._adam_p
    sizes = [p.numel() for p in model.parameters()]
    preconditioner = [t.view(p.shape).float() for t, p in zip(p_flat.split(sizes), model.parameters(), strict=True)]
    hessian = math_attention_dense_hessian(model, x, y)
    d = p_flat.rsqrt()
    return Trained(model, x, y, preconditioner, hessian, d[:, None] * hessian * d[None, :])


def test_transformer_products_are_exact_with_auto_under_the_math_attention_kernel(transformer: Trained) -> None:
    model, x, y = transformer.model, transformer.x, transformer.y
    params = list(model.parameters())
    loss_fn = loss_of(model, x, y)
    # The premise: CPU attention's fused (flash) kernel has no double backward, so products used to fall back.
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for .*scaled_dot_product"):
        torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)
        top = hessian_top_eigs(loss_fn, params, k=3, tol=1e-4, generator=torch.Generator().manual_seed(0))
        preconditioned = hessian_top_eigs(
            loss_fn, params, preconditioner=transformer.preconditioner, generator=torch.Generator().manual_seed(0)
        )
    assert top.exact and preconditioned.exact
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(params, before, strict=True))
    exact = torch.linalg.eigvalsh(transformer.hessian).flip(0)[:3]
    torch.testing.assert_close(top.eigenvalues.double(), exact, rtol=0.02, atol=0)
    # λ_max(P⁻¹H) of the non-symmetric product, by a general eigensolver
    p_flat = flat(transformer.preconditioner).double()
    exact_preconditioned = torch.linalg.eigvals(torch.diag(1 / p_flat) @ transformer.hessian).real.max()
    assert preconditioned.eigenvalues[0].item() == pytest.approx(exact_preconditioned.item(), rel=0.02)
    for value, vector, residual in zip(top.eigenvalues, top.eigenvectors, top.residuals, strict=True):
        v = flat(vector).double()
        true_residual = (transformer.hessian @ v - value.double() * v).norm() / value.abs()
        assert residual.item() == pytest.approx(true_residual.item(), rel=0.05, abs=1e-4), "exact: the true residual"


def assert_honest(top: TopEigenpairs, operator: torch.Tensor) -> tuple[float, float]:
    """Each value within its residual of an eigenvalue of ``operator``, the top one of the largest; (error, bound)."""
    eigenvalues = torch.linalg.eigvalsh(operator)
    for value, residual in zip(top.eigenvalues.double(), top.residuals.double(), strict=True):
        nearest = (eigenvalues - value).abs().min()
        assert nearest <= residual * value.abs(), f"{value.item()} is {nearest.item()} off, bound {residual.item()}"
    value, bound = top.eigenvalues[0].item(), top.residuals[0].item()
    error = abs(value - eigenvalues[-1].item()) / abs(value)
    assert error <= bound, f"λ_max {eigenvalues[-1].item()}, got {value}: relative error {error}, bound {bound}"
    return error, bound


@pytest.mark.parametrize("preconditioned", [False, True], ids=["H", "P^-1 H"])
def test_transformer_finite_differences_are_close_or_say_they_are_not(
    transformer: Trained, preconditioned: bool
) -> None:
    model, x, y = transformer.model, transformer.x, transformer.y
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    top = hessian_top_eigs(
        loss_of(model, x, y),
        params,
        k=3,
        preconditioner=transformer.preconditioner if preconditioned else None,
        hvp="finite_difference",
        generator=torch.Generator().manual_seed(0),
    )
    assert not top.exact
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(params, before, strict=True))
    error, bound = assert_honest(top, transformer.scaled if preconditioned else transformer.hessian)
    assert error <= 0.05 or bound > 0.05, "within 5%, or a residual that says it may not be"
    if preconditioned:  # the step is chosen for the scaled vector D v: 4% off with the step of ‖w‖/‖D v‖ it replaced
        assert error <= 0.02


class ShiftedLogits(nn.Module):
    """Logits plus one shared scalar: the loss does not depend on it (softmax), its gradient is rounding only."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1))
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.shift  # type: ignore[no-any-return]


def bad_for_finite_differences(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    if case == "relu kinks":  # every hidden unit exactly at its kink for one sample (dyadic: exact in float32 and 64)
        model: nn.Module = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
        x = (x * 8).round() / 8
        with torch.no_grad():
            model[0].weight.copy_((model[0].weight * 64).round() / 64)
            model[0].bias.copy_(-(x[:8] @ model[0].weight.T).diagonal())
        return model, x, y, None
    model = ShiftedLogits()  # an adaptive optimizer's P is tiny where the gradient always was: D = P^{-1/2} huge
    # 1e-8: D² = 1e8 makes the gradient's rounding (~1e-8 here) dominate on any CPU's kernels (1e-7 left it at 0.4%
    # on an AVX-512 machine); the test checks exact products against the dense oracle in float64.
    return model, x, y, [torch.full((1,), 1e-8), *(torch.ones_like(p) for p in model.net.parameters())]


@pytest.mark.parametrize("case", ["relu kinks", "tiny preconditioner on a flat direction"])
def test_finite_difference_error_bars_hold_where_finite_differences_fail(case: str) -> None:
    model, x, y, preconditioner = bad_for_finite_differences(case)
    params = list(model.parameters())
    operator = dense_hessian(copy.deepcopy(model).double(), x.double(), y)
    if preconditioner is not None:
        d = flat(preconditioner).double().rsqrt()
        operator = d[:, None] * operator * d[None, :]
    exact_max = torch.linalg.eigvalsh(operator)[-1].item()
    # Exact products agree with the dense oracle, in float64: in float32 the rounding of the flat direction's exact
    # product, times D² = 1e8, is machine-dependent too (10% on an AMD EPYC, 0.2% on an Intel Xeon).
    model64 = copy.deepcopy(model).double()
    precond64 = None if preconditioner is None else [p.double() for p in preconditioner]
    kwargs = {"preconditioner": precond64, "generator": torch.Generator().manual_seed(0)}
    exact = hessian_top_eigs(loss_of(model64, x.double(), y), list(model64.parameters()), **kwargs)  # type: ignore[arg-type]
    assert exact.exact and exact.eigenvalues[0].item() == pytest.approx(exact_max, rel=0.01), "the oracle agrees"
    kwargs = {"preconditioner": preconditioner, "generator": torch.Generator().manual_seed(0)}
    top = hessian_top_eigs(loss_of(model, x, y), params, k=3, hvp="finite_difference", **kwargs)  # type: ignore[arg-type]
    error, bound = assert_honest(top, operator)
    assert error > 0.05, "the case is bad for finite differences (else this test shows nothing)"
    assert bound > 0.05


def test_finite_difference_trace_stderr_covers_the_products_error() -> None:
    model, x, y, _ = bad_for_finite_differences("relu kinks")
    params = list(model.parameters())
    exact_trace = torch.trace(dense_hessian(copy.deepcopy(model).double(), x.double(), y)).item()
    for seed in range(3):
        exact = hessian_trace(loss_of(model, x, y), params, generator=torch.Generator().manual_seed(seed))
        trace, stderr = hessian_trace(
            loss_of(model, x, y), params, hvp="finite_difference", generator=torch.Generator().manual_seed(seed)
        )
        error = abs(trace.item() - exact_trace)
        assert error > 10 * exact.stderr.item(), "the products' error, not the sampling, is what is off"
        assert error <= 2 * stderr.item(), (trace.item(), stderr.item(), exact_trace)
