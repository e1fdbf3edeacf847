"""`SAMStep` in plain loops: against a readable reference written from the paper, and its guards."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from test_optimizer import BASES, flat, loss_at, make_batches, make_mlp, param_groups, reference_sam_step
from torch import nn

from lightning_sam import SAM, SAMStep
from lightning_sam.policy import Policy


def run_steps(opt: SAM, model: nn.Module, batches: list[Any], accumulate: int = 1, **step_kwargs: Any) -> SAMStep:
    step = SAMStep(opt, model, **step_kwargs)
    for start in range(0, len(batches), accumulate):
        for batch in batches[start : start + accumulate]:
            step.run(lambda batch=batch: loss_at(model, batch) / accumulate)
        opt.step()
        opt.zero_grad()
    return step


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("ascent_backward", [None, torch.Tensor.backward])
def test_run_then_step_is_the_paper_update(base_name: str, adaptive: bool, ascent_backward: Any) -> None:
    base_cls, kwargs = BASES[base_name]
    model = make_mlp()
    opt = SAM(param_groups(model, adaptive), base_cls, **kwargs)
    run_steps(opt, model, make_batches(), ascent_backward=ascent_backward)

    reference = make_mlp()
    base = base_cls(param_groups(reference, adaptive), **kwargs)
    for batch in make_batches():
        reference_sam_step(reference, base, batch)
    assert not torch.equal(flat(model), flat(make_mlp()))
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-12)


def test_accumulation_sums_the_perturbed_gradients_of_each_micro_batch() -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    run_steps(opt, model, make_batches(12), accumulate=3)

    reference = make_mlp()
    base = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    batches = make_batches(12)
    for start in range(0, 12, 3):
        total = [torch.zeros_like(p) for p in reference.parameters()]
        for batch in batches[start : start + 3]:
            g = torch.autograd.grad(loss_at(reference, batch), list(reference.parameters()))
            norm = torch.sqrt(sum((t**2).sum() for t in g))
            saved = [p.detach().clone() for p in reference.parameters()]
            with torch.no_grad():
                for p, t in zip(reference.parameters(), g, strict=True):
                    p.add_(0.05 * t / (norm + 1e-12))
            g2 = torch.autograd.grad(loss_at(reference, batch) / 3, list(reference.parameters()))
            with torch.no_grad():
                for p, w in zip(reference.parameters(), saved, strict=True):
                    p.copy_(w)
            total = [a + b for a, b in zip(total, g2, strict=True)]
        for p, t in zip(reference.parameters(), total, strict=True):
            p.grad = t
        base.step()
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-12)


def test_stats_are_the_two_losses_and_the_norm() -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
    batch = make_batches(1)[0]
    step = SAMStep(opt, model)
    loss = step.run(lambda: loss_at(model, batch))
    g = torch.autograd.grad(loss_at(model, batch), list(model.parameters()))
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    assert torch.equal(step.stats["loss"], loss)
    torch.testing.assert_close(step.stats["grad_norm"], norm, rtol=1e-12, atol=0)
    assert step.stats["first_order_sharpness"] == step.stats["perturbed_loss"] - loss
    assert step.stats["first_order_sharpness"] > 0


class BatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))
        self.masks: list[torch.Tensor] = []
        self.net[3].register_forward_hook(lambda _m, _i, out: self.masks.append(out == 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def test_both_passes_share_dropout_masks_and_batchnorm_keeps_the_first_pass_statistics() -> None:
    torch.manual_seed(0)
    model = BatchNormDropout().double()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
    step = SAMStep(opt, model)
    x, y = make_batches(1)[0]
    bn = model.net[1]
    step.run(lambda: nn.functional.mse_loss(model(x), y))
    first, second = model.masks
    assert torch.equal(first, second), "the same dropout mask at w and at w + e"
    torch.manual_seed(0)
    reference = BatchNormDropout().double()
    reference(x)
    assert torch.equal(bn.running_mean, reference.net[1].running_mean)
    assert torch.equal(bn.running_var, reference.net[1].running_var)
    assert int(bn.num_batches_tracked) == 1


def test_rng_advances_as_if_one_pass_had_run() -> None:
    torch.manual_seed(0)
    model = BatchNormDropout()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    x = torch.randn(8, 5)
    torch.manual_seed(1)
    SAMStep(opt, model).run(lambda: model(x).sum())
    after_sam = torch.get_rng_state()
    torch.manual_seed(1)
    model(x)
    assert torch.equal(after_sam, torch.get_rng_state())


class EveryOtherStep(Policy):
    """A variant that ascends on even steps only (how a cheaper variant plugs in)."""

    def ascends(self, step: int, optimizer: SAM) -> bool:
        return step % 2 == 0


class NeverAscends(Policy):
    def ascends(self, step: int, optimizer: SAM) -> bool:
        return False


def test_a_step_without_ascent_is_one_pass_and_the_base_optimizers_step() -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, policy=EveryOtherStep())
    step = SAMStep(opt, model)
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for i, batch in enumerate(make_batches(4)):
        forwards.clear()
        step.run(lambda batch=batch: loss_at(model, batch))
        opt.step()
        opt.zero_grad()
        assert len(forwards) == (2 if i % 2 == 0 else 1)
    assert set(step.stats) == {"loss"}, "a one-pass step reports the loss only"


def test_a_one_pass_step_equals_the_base_optimizer() -> None:
    model, plain_model = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, policy=NeverAscends())
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.05)
    for batch in make_batches(3):
        SAMStep(opt, model).run(lambda batch=batch: loss_at(model, batch))
        opt.step()
        opt.zero_grad()
        plain.zero_grad()
        loss_at(plain_model, batch).backward()
        plain.step()
    assert torch.equal(flat(model), flat(plain_model))


# Non-finite values ---------------------------------------------------------------------------------------------------


def poisoned(model: nn.Module, batch: Any, which: str) -> Any:
    calls = {"n": 0}

    def loss_fn() -> torch.Tensor:
        calls["n"] += 1
        loss = loss_at(model, batch)
        return loss * math.inf if (calls["n"] == 1) == (which == "first") else loss

    return loss_fn


@pytest.mark.parametrize("which", ["first", "second"])
def test_a_non_finite_pass_skips_the_step_with_weights_and_state_untouched(which: str) -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    run_steps(opt, model, make_batches(2))
    weights, momentum = flat(model).clone(), [s["momentum_buffer"].clone() for s in opt.state.values()]
    step = SAMStep(opt, model)
    step.run(poisoned(model, make_batches(1)[0], which))
    assert torch.isfinite(flat(model)).all(), "never perturbed by a non-finite e"
    with pytest.warns(RuntimeWarning, match="not finite.*skipped"):
        opt.step()
    assert torch.equal(flat(model), weights)
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, opt.state.values(), strict=True))
    assert opt.skipped_steps == 1


def test_raise_instead_of_skip() -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    SAMStep(opt, model, nonfinite="raise").run(poisoned(model, make_batches(1)[0], "second"))
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step()


def test_a_grad_scaler_skips_and_backs_off_without_nan_in_the_weights() -> None:
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = SAMStep(opt, model, scaler=scaler)
    batches = make_batches(3, dtype=torch.float32)
    for i, batch in enumerate(batches):
        start = flat(model).clone()
        step.run(poisoned(model, batch, "first") if i == 1 else lambda batch=batch: loss_at(model, batch))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert torch.isfinite(flat(model)).all()
        if i == 1:
            assert torch.equal(flat(model), start), "the scaler skipped the step"
            assert scaler.get_scale() == 512.0
        else:
            assert not torch.equal(flat(model), start)


def test_weights_go_back_when_the_second_forward_fails() -> None:
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    w0 = flat(model).clone()
    calls = {"n": 0}
    batch = make_batches(1)[0]

    def fails_second() -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return loss_at(model, batch)

    with pytest.raises(KeyboardInterrupt):
        SAMStep(opt, model).run(fails_second)
    assert torch.equal(flat(model), w0) and not opt.is_perturbed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)}, "drives a lightning_sam.SAM"),
        ({"module": "model"}, "torch.nn.Module"),
        ({"nonfinite": "ignore"}, "nonfinite must be"),
        ({"same_randomness": 1}, "same_randomness"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"optimizer": SAM([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1), **kwargs}
    with pytest.raises(ValueError, match=match):
        SAMStep(**arguments)


def test_fabric_with_bf16_and_its_backward() -> None:
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    wrapped_model, wrapped_opt = fabric.setup(model, opt)
    # Fabric's precision plugins want every backward to go through fabric.backward: so does the ascent's.
    step = SAMStep(wrapped_opt.optimizer, wrapped_model, backward=fabric.backward, ascent_backward=fabric.backward)
    start = flat(model).clone()
    for batch in make_batches(3, dtype=torch.float32):
        step.run(lambda batch=batch: loss_at(wrapped_model, batch))
        wrapped_opt.step()
        wrapped_opt.zero_grad()
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), start)
    assert step.stats["perturbed_loss"].dtype == torch.float32
