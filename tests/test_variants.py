"""The SAM variants against references written plainly from their papers (float64), and through SAMMixin."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import pytorch_optimizer
import torch
from helpers import Net, batches, flat_params, loader, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from test_optimizer import BASES, flat, loss_at, make_batches, make_mlp, param_groups
from test_transactions import METHODS as FAULT_METHODS
from test_transactions import make_net
from torch import nn

from lightning_sam import GSAM, MSAM, SAM, FriendlySAM, LookSAM, SAMMixin, SAMStep

Batch = tuple[torch.Tensor, torch.Tensor]


def fp16_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


STEPS = 12


# The references: one function per paper, on a list of parameter groups (each with its rho), global norms ----------


def grads_at(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_at(model, batch), list(model.parameters())))


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def rhos(groups: list[dict[str, Any]]) -> list[float]:
    """Each parameter's rho, in model.parameters() order."""
    return [group["rho"] for group in groups for _ in group["params"]]


def grads_at_perturbed(
    model: nn.Module, batch: Batch, direction: list[torch.Tensor], radii: list[float]
) -> list[torch.Tensor]:
    """The gradient at w + rho · d / ‖d‖ (global norm, each parameter its group's rho); w put back."""
    params = list(model.parameters())
    norm = global_dot(direction, direction).sqrt()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d, rho in zip(params, direction, radii, strict=True):
            p.add_(rho * d / (norm + 1e-12))
    g = grads_at(model, batch)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return g


def base_step(base: torch.optim.Optimizer, model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    base.step()


def sam_reference(model: nn.Module, base: torch.optim.Optimizer, radii: list[float], batch: Batch) -> None:
    base_step(base, model, grads_at_perturbed(model, batch, grads_at(model, batch), radii))


def run_interval_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], interval: int, start: int
) -> None:
    for t, batch in enumerate(make_batches(STEPS)):
        if t >= start and (t - start) % interval == 0:
            sam_reference(model, base, radii, batch)
        else:
            base_step(base, model, grads_at(model, batch))


def due(t: int, interval: int = 1, start: int = 0) -> bool:
    return t >= start and (t - start) % interval == 0


def run_looksam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], k: int, alpha: float, start: int = 0
) -> None:
    """Liu et al. 2022, Algorithm 1: g_v from every k-th SAM step, reused in between (before start: the base)."""
    g_v: list[torch.Tensor] = []
    for t, batch in enumerate(make_batches(STEPS)):
        g = grads_at(model, batch)
        if due(t, k, start):
            g_s = grads_at_perturbed(model, batch, g, radii)
            c = global_dot(g_s, g) / global_dot(g, g)
            g_v = [s - c * x for s, x in zip(g_s, g, strict=True)]
            base_step(base, model, g_s)
        elif g_v:
            scale = alpha * global_dot(g, g).sqrt() / global_dot(g_v, g_v).sqrt()
            base_step(base, model, [x + scale * v for x, v in zip(g, g_v, strict=True)])
        else:
            base_step(base, model, g)


def run_gsam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], alpha: float, interval: int = 1
) -> None:
    """Zhuang et al. 2022, Algorithm 1: descend ∇f_p and the surrogate gap (∇f's part orthogonal to ∇f_p)."""
    for t, batch in enumerate(make_batches(STEPS)):
        g = grads_at(model, batch)
        if not due(t, interval):
            base_step(base, model, g)
            continue
        g_p = grads_at_perturbed(model, batch, g, radii)
        c = global_dot(g, g_p) / global_dot(g_p, g_p)
        base_step(base, model, [p - alpha * (x - c * p) for p, x in zip(g_p, g, strict=True)])


def run_fsam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], sigma: float, lmbda: float, interval: int = 1
) -> None:
    """Li et al. 2024: ascend along g − sigma · m, m the moving average of the gradients (updated after its use)."""
    m: list[torch.Tensor] | None = None
    for t, batch in enumerate(make_batches(STEPS)):
        g = grads_at(model, batch)
        if not due(t, interval):  # m moves on the steps that ascend
            base_step(base, model, g)
            continue
        if m is None:
            direction, m = g, [x.clone() for x in g]
        else:
            direction = [x - sigma * mi for x, mi in zip(g, m, strict=True)]
            m = [lmbda * mi + (1 - lmbda) * x for mi, x in zip(m, g, strict=True)]
        base_step(base, model, grads_at_perturbed(model, batch, direction, radii))


def run_msam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], interval: int = 1, start: int = 0
) -> None:
    """Becker et al. 2024: the gradient at w − rho · v / ‖v‖, v the base optimizer's momentum; one pass per step."""
    params = list(model.parameters())
    for t, batch in enumerate(make_batches(STEPS)):
        v = [base.state[p].get("momentum_buffer", base.state[p].get("exp_avg")) for p in params]
        if v[0] is None or not due(t, interval, start):
            base_step(base, model, grads_at(model, batch))
        else:
            base_step(base, model, grads_at_perturbed(model, batch, [-x for x in v], radii))


# Ours, driven by SAMStep ------------------------------------------------------------------------------------------


def run_ours(opt: SAM, model: nn.Module) -> list[int]:
    """Every step through SAMStep; returns how many forward passes each took."""
    step = SAMStep(opt, model)
    passes = []
    for batch in make_batches(STEPS):
        calls: list[int] = []

        def loss_fn(batch: Batch = batch, calls: list[int] = calls) -> torch.Tensor:
            calls.append(1)
            return loss_at(model, batch)

        step.run(loss_fn)
        opt.step()
        opt.zero_grad()
        passes.append(len(calls))
    return passes


VariantCase = tuple[Callable[..., SAM], dict[str, Any], Callable[..., None], dict[str, Any]]
CASES: dict[str, VariantCase] = {
    "interval_3": (SAM, {"interval": 3}, run_interval_reference, {"interval": 3, "start": 0}),
    "late_phase": (SAM, {"start": 7}, run_interval_reference, {"interval": 1, "start": 7}),
    "late_phase_fraction": (
        SAM,
        {"start": 0.5, "total_steps": STEPS},
        run_interval_reference,
        {"interval": 1, "start": 6},
    ),
    "looksam": (LookSAM, {"k": 4, "alpha": 0.7}, run_looksam_reference, {"k": 4, "alpha": 0.7}),
    "gsam": (GSAM, {"alpha": 0.2}, run_gsam_reference, {"alpha": 0.2}),
    "friendly_sam": (FriendlySAM, {"sigma": 1.0, "lmbda": 0.6}, run_fsam_reference, {"sigma": 1.0, "lmbda": 0.6}),
    "msam": (MSAM, {}, run_msam_reference, {}),
    # Every variant honours the shared schedule, or refuses it (LookSAM's interval is k):
    "looksam_late": (LookSAM, {"k": 3, "start": 4}, run_looksam_reference, {"k": 3, "alpha": 0.7, "start": 4}),
    "gsam_interval": (GSAM, {"alpha": 0.2, "interval": 2}, run_gsam_reference, {"alpha": 0.2, "interval": 2}),
    "friendly_sam_interval": (
        FriendlySAM,
        {"sigma": 1.0, "lmbda": 0.6, "interval": 3},
        run_fsam_reference,
        {"sigma": 1.0, "lmbda": 0.6, "interval": 3},
    ),
    "msam_interval": (MSAM, {"interval": 2}, run_msam_reference, {"interval": 2}),
    "msam_late": (MSAM, {"start": 5}, run_msam_reference, {"start": 5}),
}


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_equals_its_paper(case: str, base_name: str) -> None:
    cls, kwargs, reference, reference_kwargs = CASES[case]
    base_cls, base_kwargs = BASES[base_name]
    if cls is MSAM and base_cls is torch.optim.SGD:  # MSAM needs a momentum
        base_kwargs = {**base_kwargs, "momentum": 0.9}

    model = make_mlp()
    groups = param_groups(model, adaptive=False)
    opt = cls(groups, base_cls, **kwargs, **base_kwargs)
    passes = run_ours(opt, model)

    expected = make_mlp()
    expected_groups = param_groups(expected, adaptive=False)
    reference(expected, base_cls(expected_groups, **base_kwargs), rhos(expected_groups), **reference_kwargs)

    assert not torch.equal(flat(model), flat(make_mlp())), "training moved the weights"
    torch.testing.assert_close(flat(model), flat(expected), rtol=0, atol=1e-10)  # float64; eps=1e-12 in our norms
    assert opt.steps_taken == STEPS
    expected_passes = {
        "interval_3": [2, 1, 1] * 4,
        "late_phase": [1] * 7 + [2] * 5,
        "late_phase_fraction": [1] * 6 + [2] * 6,
        "looksam": [2, 1, 1, 1] * 3,
        "gsam": [2] * STEPS,
        "friendly_sam": [2] * STEPS,
        "msam": [1] * STEPS,
        "looksam_late": [1] * 4 + [2, 1, 1] * 2 + [2, 1],
        "gsam_interval": [2, 1] * 6,
        "friendly_sam_interval": [2, 1, 1] * 4,
        "msam_interval": [1] * STEPS,
        "msam_late": [1] * STEPS,
    }[case]
    assert passes == expected_passes, "as many forward passes as the step needs, never more"


def test_the_variants_are_not_sam() -> None:
    """Each reference is its own update: the tests above check something."""
    base_cls, base_kwargs = BASES["sgd"]
    finals = {}
    for name, (_, _, reference, reference_kwargs) in CASES.items():
        model = make_mlp()
        groups = param_groups(model, adaptive=False)
        kwargs = {**base_kwargs, "momentum": 0.9} if name.startswith("msam") else base_kwargs
        reference(model, base_cls(groups, **kwargs), rhos(groups), **reference_kwargs)
        finals[name] = flat(model)
    sam = make_mlp()
    groups = param_groups(sam, adaptive=False)
    run_interval_reference(sam, base_cls(groups, **base_kwargs), rhos(groups), interval=1, start=0)
    for name, final in finals.items():
        assert not torch.allclose(final, flat(sam), rtol=0, atol=1e-6), name


def test_davda54_step_with_a_closure_skips_the_second_pass_on_one_pass_steps() -> None:
    model = make_mlp()
    opt = SAM(param_groups(model, adaptive=False), torch.optim.SGD, interval=3, lr=0.05, momentum=0.9)
    calls = []
    for batch in make_batches(STEPS):

        def closure(batch: Batch = batch) -> torch.Tensor:
            calls.append(1)
            opt.zero_grad()
            loss = loss_at(model, batch)
            loss.backward()
            return loss

        closure()
        opt.step(closure)
    expected = make_mlp()
    groups = param_groups(expected, adaptive=False)
    run_interval_reference(expected, torch.optim.SGD(groups, lr=0.05, momentum=0.9), rhos(groups), 3, 0)
    torch.testing.assert_close(flat(model), flat(expected), rtol=0, atol=1e-12)
    assert len(calls) == STEPS + STEPS // 3


def test_gsam_rho_follows_the_learning_rate() -> None:
    model = make_mlp()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.4)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    radii = []
    for _ in range(3):
        radii.append(opt.policy.radius(opt.param_groups[0]))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(lambda: None)
        schedule.step()
    assert radii == pytest.approx([0.1, 0.02 + 0.08 * 0.5, 0.02 + 0.08 * 0.25])


# Against pytorch_optimizer ----------------------------------------------------------------------------------------


def run_pytorch_optimizer(opt: Any, model: nn.Module) -> None:
    for batch in make_batches(STEPS):
        opt.zero_grad()
        loss_at(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_at(model, batch).backward()
        opt.second_step(zero_grad=True)


def test_friendly_sam_equals_pytorch_optimizer() -> None:
    ours, theirs = make_mlp(), make_mlp()
    run_ours(FriendlySAM(ours.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9), ours)
    opt = pytorch_optimizer.FriendlySAM(theirs.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    run_pytorch_optimizer(opt, theirs)
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=0, atol=1e-9)


def test_pytorch_optimizers_looksam_projects_each_tensor_apart_not_the_whole_gradient() -> None:
    """The paper decomposes the whole gradient; pytorch_optimizer does it per tensor. One tensor: the same update."""

    def run_both(make: Callable[[], nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        ours, theirs = make(), make()
        run_ours(LookSAM(ours.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, lr=0.05), ours)
        opt = pytorch_optimizer.LookSAM(theirs.parameters(), torch.optim.SGD, rho=0.05, k=3, alpha=0.7, lr=0.05)
        run_pytorch_optimizer(opt, theirs)
        return flat(ours), flat(theirs)

    class OneTensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.weight = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ self.weight.T)

    ours, theirs = run_both(OneTensor)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # their 1e-8 in a norm aside
    ours, theirs = run_both(make_mlp)
    assert not torch.allclose(ours, theirs, rtol=0, atol=1e-6)


# Checkpoints, bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["looksam", "friendly_sam", "msam", "late_phase", "gsam"])
def test_state_dict_resumes_each_variant_bitwise(case: str) -> None:
    cls, kwargs, _, _ = CASES[case]
    base = {"lr": 0.05, "momentum": 0.9}
    batches = make_batches(STEPS)

    def train(opt: SAM, model: nn.Module, some: list[Batch]) -> None:
        step = SAMStep(opt, model)
        for batch in some:
            step.run(lambda batch=batch: loss_at(model, batch))
            opt.step()
            opt.zero_grad()

    uninterrupted = make_mlp()
    train(cls(uninterrupted.parameters(), torch.optim.SGD, **kwargs, **base), uninterrupted, batches)

    first = make_mlp()
    opt = cls(first.parameters(), torch.optim.SGD, **kwargs, **base)
    train(opt, first, batches[:5])
    checkpoint = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict()})
    resumed = make_mlp(seed=3)
    resumed.load_state_dict(checkpoint["model"])
    opt = cls(resumed.parameters(), torch.optim.SGD, **kwargs, **base)
    opt.load_state_dict(checkpoint["opt"])
    train(opt, resumed, batches[5:])
    assert torch.equal(flat(resumed), flat(uninterrupted))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda p: SAM(p, torch.optim.SGD, interval=0, lr=0.1), "interval"),
        (lambda p: SAM(p, torch.optim.SGD, start=1.5, lr=0.1), "start"),
        (lambda p: SAM(p, torch.optim.SGD, start=-1, lr=0.1), "start"),
        (lambda p: SAM(p, torch.optim.SGD, total_steps=0, lr=0.1), "total_steps"),
        (lambda p: LookSAM(p, torch.optim.SGD, k=0, lr=0.1), "k"),
        (lambda p: LookSAM(p, torch.optim.SGD, alpha=-1.0, lr=0.1), "alpha"),
        (lambda p: GSAM(p, torch.optim.SGD, rho=0.05, rho_min=0.1, lr=0.1), "rho_min"),
        (lambda p: FriendlySAM(p, torch.optim.SGD, lmbda=1.5, lr=0.1), "lmbda"),
        (lambda p: FriendlySAM(p, torch.optim.SGD, sigma=True, lr=0.1), "sigma"),
        (lambda p: MSAM(p, torch.optim.SGD, lr=0.1), "momentum > 0"),
        (lambda p: MSAM(p, functools.partial(torch.optim.SGD, lr=0.1)), "momentum > 0"),
    ],
)
def test_bad_arguments_raise_value_error(build: Callable[[Any], SAM], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build([nn.Parameter(torch.ones(2))])


def test_a_fractional_start_needs_the_length_of_the_training() -> None:
    opt = SAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, start=0.5, lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        opt.protocol.begin()


# Through SAMMixin ---------------------------------------------------------------------------------------------------

FACTORIES: dict[str, Callable[[Any], SAM]] = {
    "looksam": lambda p: LookSAM(p, torch.optim.SGD, rho=0.05, k=4, lr=0.1, momentum=0.9),
    "gsam": lambda p: GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.2, lr=0.1, momentum=0.9),
    "friendly_sam": lambda p: FriendlySAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "msam": lambda p: MSAM(p, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9),
    "interval_3": lambda p: SAM(p, torch.optim.SGD, rho=0.05, interval=3, lr=0.1, momentum=0.9),
    "late_phase": lambda p: SAM(p, torch.optim.SGD, rho=0.05, start=0.5, lr=0.1, momentum=0.9),
}


class VariantNet(SAMMixin, Net):
    def __init__(self, variant: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.variant = variant
        self.passes: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.passes.append(self.sam_second_pass)
        return super().training_step(batch, batch_idx)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return FACTORIES[self.variant](self.parameters())


def plain_loop(variant: str, accumulate: int = 1, epochs: int = 1) -> torch.Tensor:
    """The same variant in a hand-written loop with SAMStep, over the same batches."""
    torch.manual_seed(0)
    model = Net()
    opt = FACTORIES[variant](model.parameters())
    if variant == "late_phase":
        opt.total_steps = 8 * epochs // accumulate
    step = SAMStep(opt, model)
    data = batches()
    for _ in range(epochs):
        for start in range(0, len(data), accumulate):
            for x, y in data[start : start + accumulate]:
                step.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y) / accumulate)
            opt.step()
            opt.zero_grad()
    return flat_params(model)


@pytest.mark.parametrize("variant", sorted(FACTORIES))
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sammixin_runs_each_variant_like_the_plain_loop(variant: str, accumulate: int) -> None:
    torch.manual_seed(0)
    module = VariantNet(variant)
    trainer(max_epochs=2, accumulate_grad_batches=accumulate).fit(module, loader())
    torch.testing.assert_close(flat_params(module), plain_loop(variant, accumulate, epochs=2), rtol=0, atol=1e-6)
    first_passes = module.passes.count(False)
    assert first_passes == 16, "one first pass per batch"
    steps = 16 // accumulate
    ascending = {
        "looksam": -(-steps // 4),
        "gsam": steps,
        "friendly_sam": steps,
        "msam": steps - 1,  # from the second step (momentum): the moved pass runs inside backward
        "interval_3": -(-steps // 3),
        "late_phase": steps - steps // 2,
    }[variant]
    assert module.passes.count(True) == ascending * accumulate, "a second pass only on the steps that ascend"


@pytest.mark.parametrize("variant", sorted(FACTORIES))
@pytest.mark.parametrize("precision", [{"precision": "bf16-mixed"}, {"plugins": [fp16_plugin()]}])
def test_each_variant_trains_finite_under_mixed_precision(variant: str, precision: dict[str, Any]) -> None:
    torch.manual_seed(0)
    module = VariantNet(variant)
    fit = trainer(max_epochs=2, **precision)
    fit.fit(module, loader())
    assert fit.global_step == 16
    assert torch.isfinite(flat_params(module)).all()
    torch.testing.assert_close(flat_params(module), plain_loop(variant, epochs=2), rtol=0, atol=0.1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize("variant", sorted(FACTORIES))
def test_each_variant_resumes_bitwise_from_a_lightning_checkpoint(variant: str, tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt: Any = None) -> VariantNet:
        torch.manual_seed(0)
        module = VariantNet(variant)
        every_epoch = [] if ckpt else [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)]
        trainer(max_epochs=2, callbacks=every_epoch, enable_checkpointing=not ckpt).fit(
            module, loader(), ckpt_path=ckpt
        )
        return module

    uninterrupted = fit()
    resumed = fit(ckpt=tmp_path / "epoch=0-step=8.ckpt")  # from the same run, after its first epoch
    assert torch.equal(flat_params(resumed), flat_params(uninterrupted))


@pytest.mark.parametrize(("variant", "expected"), [("looksam", list(range(8))), ("msam", [])])
def test_the_monitor_reports_first_order_on_every_step_that_has_sams_ascent(
    variant: str, expected: list[int], tmp_path: Any
) -> None:
    """LookSAM (k=4) perturbs at steps 0 and 4, and between them the plain gradient gives it; MSAM's move is not it."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_sam import SharpnessMonitor

    monitor = SharpnessMonitor(measures=["first_order", "grad_norm"])
    torch.manual_seed(0)
    trainer(logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[monitor]).fit(VariantNet(variant), loader())
    steps_with_first_order = [step for step, values in monitor.history if "sharpness/first_order" in values]
    assert steps_with_first_order == expected
    assert len(monitor.history) == 8, "grad_norm on every logging step"


def plain_loop_clipped(variant: str, clip: float, fp16: bool) -> torch.Tensor:
    """A loop that clips the direction the variant steps with: finalize_gradient, (unscale,) clip, step."""
    torch.manual_seed(0)
    model = Net()
    opt = FACTORIES[variant](model.parameters())
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    step = SAMStep(opt, model, scaler=scaler)
    for _ in range(2):
        for x, y in batches():

            def loss_fn(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                    return nn.functional.cross_entropy(model(x), y)

            step.run(loss_fn)
            opt.finalize_gradient(scaler.get_scale() if scaler is not None else 1.0)
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    return flat_params(model)


@pytest.mark.parametrize("variant", ["looksam", "gsam"])
@pytest.mark.parametrize("fp16", [False, True])
def test_lightning_clips_the_direction_the_variant_steps_with(variant: str, fp16: bool) -> None:
    torch.manual_seed(0)
    module = VariantNet(variant)
    precision = {"plugins": [fp16_plugin()]} if fp16 else {}
    trainer(max_epochs=2, gradient_clip_val=0.05, **precision).fit(module, loader())
    expected = plain_loop_clipped(variant, clip=0.05, fp16=fp16)
    torch.testing.assert_close(flat_params(module), expected, rtol=0, atol=1e-6 if not fp16 else 1e-3)
    unclipped = plain_loop(variant, epochs=2)
    assert not torch.allclose(flat_params(module), unclipped, rtol=0, atol=1e-3), "the clipping bit"


# The schedule, MSAM on every path ------------------------------------------------------------------------------------


def test_looksam_refuses_an_interval_it_has_as_k() -> None:
    with pytest.raises(ValueError, match="k is its interval"):
        LookSAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, interval=3, lr=0.1)


def test_msam_through_step_with_a_closure_is_msam() -> None:
    """davda54's loop (the gradient at w first, then opt.step(closure)) runs MSAM, not plain SGD."""
    model = make_mlp()
    opt = MSAM(param_groups(model, adaptive=False), torch.optim.SGD, lr=0.05, momentum=0.9)
    for batch in make_batches(STEPS):

        def closure(batch: Batch = batch) -> torch.Tensor:
            loss = loss_at(model, batch)
            loss.backward()
            return loss

        opt.zero_grad()
        closure()
        opt.step(closure)
    expected = make_mlp()
    groups = param_groups(expected, adaptive=False)
    run_msam_reference(expected, torch.optim.SGD(groups, lr=0.05, momentum=0.9), rhos(groups))
    torch.testing.assert_close(flat(model), flat(expected), rtol=0, atol=1e-10)
    sgd = make_mlp()
    base = torch.optim.SGD(param_groups(sgd, adaptive=False), lr=0.05, momentum=0.9)
    for batch in make_batches(STEPS):
        base_step(base, sgd, grads_at(sgd, batch))
    assert not torch.allclose(flat(model), flat(sgd), rtol=0, atol=1e-6), "not plain SGD"


def test_msam_refuses_first_step_and_second_step() -> None:
    model = make_mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    loss_at(model, make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"MSAM.step\(closure\)"):
        opt.first_step()
    with pytest.raises(ValueError, match=r"MSAM.step\(closure\)"):
        opt.second_step()
    with pytest.raises(ValueError, match=r"MSAM.step\(\) needs a closure"):
        opt.step()


# Scale invariance ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(FAULT_METHODS))
def test_the_scale_of_the_loss_does_not_change_the_run(method: str) -> None:
    """Loss x s with lr / s is the same SGD run: no absolute epsilon may dominate a norm, for any s."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    finals = {}
    for s in (1e-6, 1.0, 1e6):
        model = make_net()
        opt = FAULT_METHODS[method](model.parameters(), lr=0.1 / s)
        step = SAMStep(opt, model)
        for x, y in data:
            step.run(lambda x=x, y=y, s=s, model=model: nn.functional.mse_loss(model(x), y) * s)
            opt.step()
            opt.zero_grad()
        finals[s] = flat(model)
    assert not torch.equal(finals[1.0], flat(make_net())), "it trained"
    for s in (1e-6, 1e6):
        assert (finals[s] - finals[1.0]).norm() <= 1e-5 * finals[1.0].norm(), s


# LookSAM: the whole gradient, in float32 -----------------------------------------------------------------------------


class Branchy(nn.Module):
    """A head used on every batch, a branch on odd batches only (a task head, an expert)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head, self.branch = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.double()
        self.use_branch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.head(h) + self.branch(h) if self.use_branch else self.head(h)


def grads_or_none(model: nn.Module, batch: Batch) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss_at(model, batch), list(model.parameters()), allow_unused=True))


def whole(grads: list[torch.Tensor | None], model: nn.Module) -> list[torch.Tensor]:
    """The paper's whole vectors: a parameter the loss did not reach counts as 0."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.parameters(), strict=True)]


def test_looksam_with_a_branch_used_on_odd_batches_is_the_papers_formula() -> None:
    k, alpha, rho, batches = 3, 0.7, 0.05, make_batches(STEPS)
    ours = Branchy()
    opt = LookSAM(ours.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=0.05, momentum=0.9)
    step = SAMStep(opt, ours)
    for t, batch in enumerate(batches):
        ours.use_branch = t % 2 == 1
        step.run(lambda batch=batch: loss_at(ours, batch))
        opt.step()
        opt.zero_grad()

    reference = Branchy()
    params = list(reference.parameters())
    base = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    g_v: list[torch.Tensor] = []
    for t, batch in enumerate(batches):
        reference.use_branch = t % 2 == 1
        raw = grads_or_none(reference, batch)
        g = whole(raw, reference)
        if t % k == 0:  # SAM at w + rho·g/‖g‖ (the whole g), then g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g over every parameter
            g_s_raw = grads_at_perturbed_or_none(reference, batch, g, rho)
            g_s = whole(g_s_raw, reference)
            c = global_dot(g_s, g) / global_dot(g, g)
            g_v = [s - c * x for s, x in zip(g_s, g, strict=True)]
            step_with = g_s_raw
        else:  # g + alpha·‖g‖/‖g_v‖·g_v on the parameters that have a gradient
            scale = alpha * global_dot(g, g).sqrt() / global_dot(g_v, g_v).sqrt()
            step_with = [None if r is None else r + scale * v for r, v in zip(raw, g_v, strict=True)]
        for p, d in zip(params, step_with, strict=True):
            p.grad = d
        base.step()
    torch.testing.assert_close(flat(ours), flat(reference), rtol=0, atol=1e-10)
    assert not torch.equal(flat(reference.branch), flat(Branchy().branch)), "the branch trained"


def grads_at_perturbed_or_none(
    model: nn.Module, batch: Batch, direction: list[torch.Tensor], rho: float
) -> list[torch.Tensor | None]:
    params = list(model.parameters())
    norm = global_dot(direction, direction).sqrt()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(rho * d / norm)
    g = grads_or_none(model, batch)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return g


def test_looksam_keeps_g_v_in_float32_for_bfloat16_weights() -> None:
    """g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g from the bf16 gradients, computed in float32 (not rounded to bf16 on the way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.bfloat16)
    params = list(model.parameters())
    x, y = torch.randn(12, 5, dtype=torch.bfloat16), torch.randn(12, 3, dtype=torch.bfloat16)
    opt = LookSAM(params, torch.optim.SGD, rho=0.05, k=5, lr=0.0)  # lr 0: the weights stay, the gradients are known
    firsts = [g.double() for g in torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)]
    SAMStep(opt, model).run(lambda: nn.functional.mse_loss(model(x), y))
    g_s = [p.grad.double() for p in params]  # type: ignore[union-attr]
    opt.step()
    c = global_dot(g_s, firsts) / global_dot(firsts, firsts)
    expected = [s - c * g for s, g in zip(g_s, firsts, strict=True)]
    kept = [opt.sam_state[p]["looksam_gv"] for p in params]
    assert all(v.dtype == torch.float32 for v in kept)
    got = torch.cat([v.double().flatten() for v in kept])
    want = torch.cat([e.flatten() for e in expected])
    assert (got - want).norm() <= 1e-5 * want.norm(), "as exact as float32"


# FriendlySAM's average under accumulation ----------------------------------------------------------------------------


def test_friendly_sam_under_accumulation_moves_its_average_once_per_step() -> None:
    """m ← lmbda·m + (1 − lmbda)·(the mean of the window's first gradients), once per optimizer step."""
    sigma, lmbda, rho, accumulate = 1.0, 0.6, 0.05, 3
    batches = make_batches(STEPS)
    model = make_mlp()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, lr=0.05, momentum=0.9)
    step = SAMStep(opt, model)
    for start in range(0, STEPS, accumulate):
        for batch in batches[start : start + accumulate]:
            step.run(lambda batch=batch: loss_at(model, batch) / accumulate)
        opt.step()
        opt.zero_grad()
    assert opt.param_groups[0]["fsam_updates"] == STEPS // accumulate

    reference = make_mlp()
    params = list(reference.parameters())
    base = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    m: list[torch.Tensor] | None = None
    for start in range(0, STEPS, accumulate):
        total = [torch.zeros_like(p) for p in params]
        firsts = [torch.zeros_like(p) for p in params]
        for batch in batches[start : start + accumulate]:
            g = list(torch.autograd.grad(loss_at(reference, batch) / accumulate, params))
            direction = g if m is None else [x - sigma * mi for x, mi in zip(g, m, strict=True)]
            norm = global_dot(direction, direction).sqrt()
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.add_(rho * d / norm)
            g_p = torch.autograd.grad(loss_at(reference, batch) / accumulate, params)
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
            total = [a + b for a, b in zip(total, g_p, strict=True)]
            firsts = [a + b for a, b in zip(firsts, g, strict=True)]
        mean = [f / accumulate for f in firsts]
        m = (
            [x.clone() for x in mean]
            if m is None
            else [lmbda * a + (1 - lmbda) * b for a, b in zip(m, mean, strict=True)]
        )
        for p, d in zip(params, total, strict=True):
            p.grad = d
        base.step()
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-10)


# GSAM's rho schedule with groups that come and go --------------------------------------------------------------------


def test_gsam_rho_min_follows_a_group_added_later() -> None:
    model = make_mlp()
    params = list(model.parameters())
    opt = GSAM(params[:2], torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.4)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batches = iter(make_batches(STEPS))
    step = SAMStep(opt, model)

    def one_step() -> None:
        batch = next(batches)
        step.run(lambda: loss_at(model, batch))
        opt.step()
        opt.zero_grad()
        schedule.step()

    one_step()
    opt.add_param_group({"params": params[2:], "lr": 0.1})  # what BackboneFinetuning does
    radii = []
    for _ in range(3):
        radii.append([opt.policy.radius(group) for group in opt.param_groups])
        one_step()
    assert opt.param_groups[1]["gsam_lr_max"] == 0.1, "recorded at the group's first step"
    assert radii[0] == pytest.approx([0.02 + 0.08 * 0.5, 0.1]), "a new group starts at its lr_max"
    assert radii[1] == pytest.approx([0.02 + 0.08 * 0.25, 0.02 + 0.08 * 0.5]), "then follows its own schedule"


@pytest.mark.parametrize("source", ["sgd", "sam", "looksam", "friendlysam", "msam", "interval", "gsam_plain"])
def test_gsam_rho_min_takes_a_state_dict_of_any_other_method(source: str) -> None:
    def build(params: Any) -> torch.optim.Optimizer:
        if source == "sgd":
            return torch.optim.SGD(params, lr=0.4, momentum=0.9)
        if source == "gsam_plain":
            return GSAM(params, torch.optim.SGD, rho=0.1, lr=0.4, momentum=0.9)
        return FAULT_METHODS[source](params)

    model = make_mlp()
    other = build(model.parameters())
    if isinstance(other, SAM):
        run_ours(other, model)
    else:
        for batch in make_batches(3):
            base_step(other, model, grads_at(model, batch))
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.4, momentum=0.9)
    opt.load_state_dict(other.state_dict())
    lr_max = other.param_groups[0].get("initial_lr", other.param_groups[0]["lr"])
    assert opt.policy.radius(opt.param_groups[0]) == pytest.approx(opt.param_groups[0]["rho"]), "lr at lr_max"
    run_ours(opt, model)
    assert opt.param_groups[0]["gsam_lr_max"] == lr_max
    assert torch.isfinite(flat(model)).all()


class Finetuned(SAMMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        opt = GSAM(self.head.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


@pytest.mark.filterwarnings("ignore:.*BackboneFinetuning.*")
def test_gsam_rho_min_with_backbone_finetuning() -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    module = Finetuned()
    fit = trainer(max_epochs=3, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    fit.fit(module, loader())
    opt = fit.optimizers[0]
    assert len(opt.param_groups) == 2, "the backbone's group was added"
    assert opt.param_groups[1]["gsam_lr_max"] == pytest.approx(0.1 * 0.5 / 10), "its lr when it was added"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert opt.steps_taken == 24


# MSAM under SAMMixin: no hook, callback or checkpoint ever sees moved weights ---------------------------------------


class WeightsSeen(Callback):
    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    def _record(self, name: str, module: pl.LightningModule) -> None:
        self.seen.setdefault(name, []).append(flat_params(module).clone())

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self._record("batch_start", module)

    def on_before_zero_grad(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self._record("before_zero_grad", module)

    def on_before_backward(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self._record("before_backward", module)

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record("after_backward", module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self._record("before_optimizer_step", module)


def test_msam_under_sammixin_every_hook_sees_the_unmoved_weights() -> None:
    torch.manual_seed(0)
    module = VariantNet("msam")
    seen = WeightsSeen()
    trainer(callbacks=[seen]).fit(module, loader())
    starts = seen.seen["batch_start"]
    for hook in ("before_zero_grad", "before_backward", "after_backward", "before_optimizer_step"):
        assert all(torch.equal(a, b) for a, b in zip(starts, seen.seen[hook], strict=True)), hook
    assert module.passes.count(True) == 7, "MSAM moved the weights for 7 of 8 steps (not the first)"


class FailsWhileMoved(VariantNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.sam_second_pass and batch_idx == 3:
            raise RuntimeError("out of memory (simulated)")
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:.*ckpt_path")
def test_msam_under_sammixin_an_exception_leaves_the_weights_and_the_checkpoint_unmoved(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    torch.manual_seed(0)
    module = FailsWhileMoved("msam")
    seen = WeightsSeen()
    fit = trainer(callbacks=[seen, OnExceptionCheckpoint(tmp_path)], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="simulated"):
        fit.fit(module, loader())
    w = seen.seen["batch_start"][3]
    assert torch.equal(flat_params(module), w), "back at w"
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(torch.cat([v.flatten() for v in saved.values()]), w), "the checkpoint holds w"


@pytest.mark.parametrize("variant", sorted(FAULT_METHODS))
def test_torchs_checkpoint_state_dict_round_trips_each_variant(variant: str) -> None:
    """torch.distributed.checkpoint's state dicts name parameters by their path, and build on a fresh optimizer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_net()
    opt = FAULT_METHODS[variant](model.parameters())
    run_ours_on(opt, model, 5)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    fresh = FAULT_METHODS[variant](model.parameters())
    set_optimizer_state_dict(model, fresh, saved)
    assert fresh.steps_taken == opt.steps_taken == 5
    assert fresh.sam_state.keys() == opt.sam_state.keys()
    for p, entries in opt.sam_state.items():
        assert entries.keys() == fresh.sam_state[p].keys()
        assert all(torch.equal(v, fresh.sam_state[p][k]) for k, v in entries.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in fresh.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]


def run_ours_on(opt: SAM, model: nn.Module, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    step = SAMStep(opt, model)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        step.run(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
