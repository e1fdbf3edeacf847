"""The SAM variants against references written plainly from their papers (float64), and through SAMMixin."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import torch
from helpers import Net, batches, flat_params, loader, trainer
from lightning.pytorch.plugins import MixedPrecision
from test_optimizer import BASES, flat, loss_at, make_batches, make_mlp, param_groups
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


def run_looksam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], k: int, alpha: float
) -> None:
    """Liu et al. 2022, Algorithm 1: g_v from every k-th SAM step, reused in between."""
    g_v: list[torch.Tensor] = []
    for t, batch in enumerate(make_batches(STEPS)):
        g = grads_at(model, batch)
        if t % k == 0:
            g_s = grads_at_perturbed(model, batch, g, radii)
            c = global_dot(g_s, g) / global_dot(g, g)
            g_v = [s - c * x for s, x in zip(g_s, g, strict=True)]
            base_step(base, model, g_s)
        else:
            scale = alpha * global_dot(g, g).sqrt() / global_dot(g_v, g_v).sqrt()
            base_step(base, model, [x + scale * v for x, v in zip(g, g_v, strict=True)])


def run_gsam_reference(model: nn.Module, base: torch.optim.Optimizer, radii: list[float], alpha: float) -> None:
    """Zhuang et al. 2022, Algorithm 1: descend ∇f_p and the surrogate gap (∇f's part orthogonal to ∇f_p)."""
    for batch in make_batches(STEPS):
        g = grads_at(model, batch)
        g_p = grads_at_perturbed(model, batch, g, radii)
        c = global_dot(g, g_p) / global_dot(g_p, g_p)
        base_step(base, model, [p - alpha * (x - c * p) for p, x in zip(g_p, g, strict=True)])


def run_fsam_reference(
    model: nn.Module, base: torch.optim.Optimizer, radii: list[float], sigma: float, lmbda: float
) -> None:
    """Li et al. 2024: ascend along g − sigma · m, m the moving average of the gradients (updated after its use)."""
    m: list[torch.Tensor] | None = None
    for batch in make_batches(STEPS):
        g = grads_at(model, batch)
        if m is None:
            direction, m = g, [x.clone() for x in g]
        else:
            direction = [x - sigma * mi for x, mi in zip(g, m, strict=True)]
            m = [lmbda * mi + (1 - lmbda) * x for mi, x in zip(m, g, strict=True)]
        base_step(base, model, grads_at_perturbed(model, batch, direction, radii))


def run_msam_reference(model: nn.Module, base: torch.optim.Optimizer, radii: list[float]) -> None:
    """Becker et al. 2024: the gradient at w − rho · v / ‖v‖, v the base optimizer's momentum; one pass per step."""
    params = list(model.parameters())
    for batch in make_batches(STEPS):
        v = [base.state[p].get("momentum_buffer", base.state[p].get("exp_avg")) for p in params]
        if v[0] is None:
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
}


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_equals_its_paper(case: str, base_name: str) -> None:
    cls, kwargs, reference, reference_kwargs = CASES[case]
    base_cls, base_kwargs = BASES[base_name]
    if cls is MSAM and base_cls is torch.optim.SGD:
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
    }[case]
    assert passes == expected_passes, "as many forward passes as the step needs, never more"


def test_the_variants_are_not_sam() -> None:
    """Each reference is its own update: the tests above check something."""
    base_cls, base_kwargs = BASES["sgd"]
    finals = {}
    for name, (_, _, reference, reference_kwargs) in CASES.items():
        model = make_mlp()
        groups = param_groups(model, adaptive=False)
        kwargs = {**base_kwargs, "momentum": 0.9} if name == "msam" else base_kwargs
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
        radii.append(opt._radius(opt.param_groups[0]))
        opt._advance()
        opt._base_step()
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
    ],
)
def test_bad_arguments_raise_value_error(build: Callable[[Any], SAM], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build([nn.Parameter(torch.ones(2))])


def test_a_fractional_start_needs_the_length_of_the_training() -> None:
    opt = SAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, start=0.5, lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        opt.ascent_due()


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
        "msam": 0,
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


def test_the_monitor_reports_first_order_on_the_steps_that_perturb_only(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_sam import SharpnessMonitor

    monitor = SharpnessMonitor(measures=["first_order", "grad_norm"])
    torch.manual_seed(0)
    trainer(logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[monitor]).fit(VariantNet("looksam"), loader())
    steps_with_first_order = [step for step, values in monitor.history if "sharpness/first_order" in values]
    assert steps_with_first_order == [0, 4], "LookSAM (k=4) perturbs at steps 0 and 4"
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
