"""AE-SAM, AE-LookSAM and RST: the methods that choose per step whether to take SAM's second pass.

The oracles are written from the papers' pseudo-code in plain PyTorch (no lightning_sam code): Jiang et al. 2023,
Algorithm 1 (AE-SAM; AE-LookSAM with Liu et al. 2022's reuse), and Zhao et al. 2022 (a Bernoulli(p_t) trial per step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import ResumableLoader, flat_params, run_worker, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from test_variants import base_step
from test_variants import global_dot as dot
from torch import nn

from lightning_sam import AESAM, RST, SAM, AELookSAM, SAMMixin, SAMStep
from lightning_sam._registry import METHODS as REGISTRY

HERE = Path(__file__).resolve().parent
Batch = tuple[torch.Tensor, torch.Tensor]

STEPS, RHO = 16, 0.05
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.01}),
}
AE = {"delta": 0.5, "lambda1": -0.5, "lambda2": 0.5}  # a mix of both kinds of step within 16 steps


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def make_batches(n: int = STEPS, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen).double(), torch.randn(8, 3, generator=gen).double()) for _ in range(n)]


def loss_at(model: nn.Module, batch: Batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


# The oracles ---------------------------------------------------------------------------------------------------------


def grads_at(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_at(model, batch), list(model.parameters())))


def grads_at_perturbed(model: nn.Module, batch: Batch, g: list[torch.Tensor]) -> list[torch.Tensor]:
    params, norm = list(model.parameters()), dot(g, g).sqrt()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, g, strict=True):
            p.add_(RHO * d / norm)
    result = grads_at(model, batch)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return result


def ae_reference(
    model: nn.Module, base: torch.optim.Optimizer, batches: list[Batch], reuse_alpha: float | None = None
) -> list[bool]:
    """Jiang et al. 2023, Algorithm 1 (mu_{-1} = sigma^2_{-1} = 0); with ``reuse_alpha``, AE-LookSAM."""
    delta, lambda1, lambda2 = AE["delta"], AE["lambda1"], AE["lambda2"]
    mu, var, decisions, g_v = 0.0, 0.0, [], None
    for t, batch in enumerate(batches):
        g = grads_at(model, batch)
        g2 = float(dot(g, g))
        mu = delta * mu + (1 - delta) * g2
        var = delta * var + (1 - delta) * (g2 - mu) ** 2
        c = t / len(batches) * lambda1 + (1 - t / len(batches)) * lambda2
        decisions.append(g2 >= mu + c * math.sqrt(var))
        if decisions[-1]:
            g_s = grads_at_perturbed(model, batch, g)
            if reuse_alpha is not None:
                g_v = [s - dot(g_s, g) / dot(g, g) * x for s, x in zip(g_s, g, strict=True)]
            base_step(base, model, g_s)
        elif reuse_alpha is not None and g_v is not None:
            scale = reuse_alpha * dot(g, g).sqrt() / dot(g_v, g_v).sqrt()
            base_step(base, model, [x + scale * v for x, v in zip(g, g_v, strict=True)])
        else:
            base_step(base, model, g)
    return decisions


def p_of(t: int, total: int, p: float, p_end: float, schedule: str) -> float:
    """Zhao et al. 2022's scheduling functions, from p at t = 0 to p_end at t = T."""
    x = t / total
    return {
        "constant": p,
        "linear": p + (p_end - p) * x,
        "cosine": p + (p_end - p) * (1 - math.cos(math.pi * x)) / 2,
        "step": p if x < 0.5 else p_end,
    }[schedule]


def bernoulli(seed: int, n: int, probability: Callable[[int], float]) -> list[bool]:
    """An independent Bernoulli sequence: u_t ~ U[0, 1) from a generator seeded with ``seed``, SAM when u_t < p_t."""
    draws = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    return [u < probability(t) for t, u in enumerate(draws)]


def rst_reference(
    model: nn.Module, base: torch.optim.Optimizer, batches: list[Batch], decisions: list[bool]
) -> list[bool]:
    for batch, sam in zip(batches, decisions, strict=True):
        g = grads_at(model, batch)
        base_step(base, model, grads_at_perturbed(model, batch, g) if sam else g)
    return decisions


def run_ours(opt: SAM, model: nn.Module, batches: list[Batch]) -> list[bool]:
    step, decisions = SAMStep(opt, model), []
    for batch in batches:
        step.run(lambda batch=batch: loss_at(model, batch))
        decisions.append(step.ascending)
        opt.step()
        opt.zero_grad()
    return decisions


def build(method: str, params: Any, base: str, **kwargs: Any) -> SAM:
    base_cls, base_kwargs = BASES[base]
    common = {"rho": RHO, "total_steps": STEPS, **base_kwargs, **kwargs}
    if method == "aesam":
        return AESAM(params, base_cls, **{**AE, **common})
    if method == "aelooksam":
        return AELookSAM(params, base_cls, alpha=0.7, **{**AE, **common})
    return RST(params, base_cls, **{"p": 0.3, "p_end": 0.8, "schedule": "cosine", "seed": 3, **common})


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", ["aesam", "aelooksam", "rst"])
def test_the_decisions_and_the_weights_are_the_papers(method: str, base: str) -> None:
    batches = make_batches()
    model, reference = make_model(), make_model()
    ours = run_ours(build(method, model.parameters(), base), model, batches)
    base_cls, base_kwargs = BASES[base]
    oracle = base_cls(reference.parameters(), **base_kwargs)
    if method == "rst":
        expected = bernoulli(3, STEPS, lambda t: p_of(t, STEPS, 0.3, 0.8, "cosine"))
        rst_reference(reference, oracle, batches, expected)
    else:
        expected = ae_reference(reference, oracle, batches, reuse_alpha=0.7 if method == "aelooksam" else None)
    assert ours == expected
    assert 0 < sum(ours) < STEPS, "both kinds of step"
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-10, atol=1e-12)


def test_the_trigger_fires_on_the_steps_worked_out_by_hand() -> None:
    """A linear loss <s_t, w>: the gradient is s_t whatever w, ‖g_t‖² = 4, 1, 1, 1, 4, 1. With delta = 0.5 and
    c = 0 the rule is ‖g_t‖² >= mu_t, mu_t = (mu_{t-1} + ‖g_t‖²) / 2 from 0: mu = 2, 1.5, 1.25, 1.125, 2.5625,
    1.78125: SAM at steps 0 and 4 only. A NaN step between (skipped) changes nothing."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AESAM([w], torch.optim.SGD, rho=0.1, delta=0.5, lambda1=0.0, lambda2=0.0, lr=0.1)
    step, decisions = SAMStep(opt), []
    for norm_squared in (4.0, 1.0, 1.0, math.nan, 1.0, 4.0, 1.0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step.run(lambda n=norm_squared: (math.sqrt(n) * w).sum())
            opt.step()
        assert len(caught) == math.isnan(norm_squared), "the NaN step is skipped, with a warning"
        if not math.isnan(norm_squared):
            decisions.append(step.ascending)
        opt.zero_grad()
    assert decisions == [True, False, False, False, True, False]
    assert (opt.steps_taken, opt.ascents_taken, opt.sam_fraction) == (6, 2, 2 / 6)
    assert opt.sam_state[w]["aesam_mu"].item() == 1.78125
    assert w.item() == pytest.approx(-0.1 * (2 + 1 + 1 + 1 + 2 + 1)), "a linear loss: SAM's step is SGD's"


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "step"])
def test_rsts_draws_are_an_independent_bernoulli_sequence(schedule: str) -> None:
    p_end = None if schedule == "constant" else 0.9
    w = nn.Parameter(torch.ones(3))
    opt = RST([w], torch.optim.SGD, p=0.2, p_end=p_end, schedule=schedule, seed=7, total_steps=40, lr=0.1)
    step, ours = SAMStep(opt), []
    for _ in range(40):
        step.run(lambda: ((w - 2) ** 2).sum())
        ours.append(step.ascending)
        opt.step()
        opt.zero_grad()
    assert ours == bernoulli(7, 40, lambda t: p_of(t, 40, 0.2, p_end or 0.2, schedule))


# Resume, accumulation, precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["aesam", "aelooksam", "rst"])
def test_a_resumed_run_equals_the_uninterrupted_one_bitwise(method: str) -> None:
    batches = make_batches()
    model = make_model()
    opt = build(method, model.parameters(), "sgd_momentum")
    whole = run_ours(opt, model, batches)
    first, second = make_model(), make_model()
    opt_first = build(method, first.parameters(), "sgd_momentum")
    head = run_ours(opt_first, first, batches[:7])
    saved = torch.load(_round_trip(opt_first.state_dict()), weights_only=True)
    second.load_state_dict(first.state_dict())
    other_seed = {"seed": 99} if method == "rst" else {}
    opt_second = build(method, second.parameters(), "sgd_momentum", **other_seed)
    opt_second.load_state_dict(saved)  # RST: the saved generator, not the new seed's
    tail = run_ours(opt_second, second, batches[7:])
    assert head + tail == whole
    assert torch.equal(flat_params(second), flat_params(model))
    assert opt_second.ascents_taken == opt.ascents_taken == sum(whole)


def _round_trip(state: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("method", ["aesam", "rst"])
def test_accumulation_decides_once_per_optimizer_step(method: str) -> None:
    """The window's first micro-batch decides, the others follow; the statistics move once per optimizer step."""
    model = make_model()
    opt = build(method, model.parameters(), "sgd_momentum", total_steps=STEPS // 2)
    step, windows = SAMStep(opt, model), []
    batches = make_batches()
    for start in range(0, STEPS, 2):
        kinds = []
        for batch in batches[start : start + 2]:
            step.run(lambda batch=batch: loss_at(model, batch) / 2)
            kinds.append(step.ascending)
        windows.append(kinds)
        opt.step()
        opt.zero_grad()
    assert all(len(set(kinds)) == 1 for kinds in windows), windows
    assert opt.steps_taken == STEPS // 2 and opt.ascents_taken == sum(kinds[0] for kinds in windows)
    assert 0 < opt.ascents_taken < STEPS // 2


def test_aesam_decides_on_the_unscaled_gradient_under_a_grad_scaler() -> None:
    """A GradScaler whose scale doubles at every step: the same decisions and averages as without it (‖g‖² is divided
    by the scale², which a constant scale would not show: the averages would carry it too)."""
    runs, averages = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = AESAM(model.parameters(), torch.optim.SGD, rho=RHO, **AE, total_steps=STEPS, lr=0.1, momentum=0.9)
        step, decisions = SAMStep(opt, model, scaler=scaler), []
        for x, y in make_batches():
            step.run(lambda x=x, y=y, model=model: nn.functional.mse_loss(model(x.float()), y.float()))
            decisions.append(step.ascending)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        runs.append(decisions)
        averages.append([float(v) for v in next(iter(opt.policy.state.values())).values()])
    assert scaler is not None and scaler.get_scale() == 2.0 ** (4 + STEPS), "the scale moved at every step"
    assert runs[0] == runs[1]
    assert 0 < sum(runs[0]) < STEPS
    assert averages[1] == pytest.approx(averages[0], rel=1e-5), "mu and sigma of the unscaled ‖g‖²"


# Under SAMMixin ------------------------------------------------------------------------------------------------------


class Switching(SAMMixin, pl.LightningModule):
    def __init__(self, method: str, **kwargs: Any) -> None:
        super().__init__()
        self.net = make_model().float()
        self.method, self.kwargs = method, kwargs
        self.forwards: list[bool] = []  # per forward: at the moved weights?

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.forwards.append(self.sam_second_pass)
        x, y = batch
        if not y.is_floating_point():  # helpers' class labels
            return nn.functional.cross_entropy(self.net(x), y)
        return nn.functional.mse_loss(self.net(x.float()), y.float())

    def configure_optimizers(self) -> Any:
        base_cls, base_kwargs = BASES["sgd_momentum"]
        if self.method == "aesam":
            return AESAM(self.parameters(), base_cls, rho=RHO, **{**AE, **base_kwargs, **self.kwargs})
        return RST(self.parameters(), base_cls, rho=RHO, p=0.5, seed=3, **base_kwargs, **self.kwargs)


class Decisions(Callback):
    def __init__(self) -> None:
        self.fractions: list[float] = []
        self.ascents: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.fractions.append(float(pl_module.sam_stats["sam_fraction"]))
        self.ascents.append(trainer.optimizers[0].ascents_taken)


@pytest.mark.parametrize("precision", [{}, {"precision": "bf16-mixed"}, {"fp16": True}])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("method", ["aesam", "rst"])
def test_sammixin_takes_one_forward_on_a_one_pass_step(method: str, accumulate: int, precision: dict[str, Any]) -> None:
    if precision.get("fp16"):
        precision = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    module, record = Switching(method), Decisions()
    fit = trainer(callbacks=[record], accumulate_grad_batches=accumulate, gradient_clip_val=1.0, **precision)
    fit.fit(module, torch.utils.data.DataLoader(make_batches(), batch_size=None))
    opt = fit.optimizers[0]
    assert opt.total_steps == (STEPS // accumulate if method == "aesam" else None), "T from the Trainer, if needed"
    assert opt.steps_taken == STEPS // accumulate
    sam_batches = sum(module.forwards)  # one second forward per micro-batch of a SAM step
    assert len(module.forwards) == STEPS + sam_batches, "one forward per batch, two on a SAM step's"
    assert sam_batches == accumulate * opt.ascents_taken
    assert 0 < opt.ascents_taken < opt.steps_taken, "both kinds of step"
    steps_before = [b // accumulate for b in range(STEPS)]
    ascents_before = [0, *record.ascents][:-1]
    expected = [a / s if s else 0.0 for a, s in zip(ascents_before, steps_before, strict=True)]
    assert record.fractions == pytest.approx(expected, abs=1e-6)


class Resumable(Switching):
    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.decisions: list[int] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.decisions.append(self.trainer.optimizers[0].ascents_taken)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize("method", ["aesam", "rst"])
def test_sammixin_resumes_mid_fit_bitwise(method: str, tmp_path: Path) -> None:
    def run(callbacks: list[Any], ckpt_path: Path | None = None) -> Any:
        torch.manual_seed(0)
        module = Resumable(method)
        if method == "rst":
            module.kwargs = {"p_end": 0.9, "schedule": "linear"}  # T from the Trainer, as AE-SAM's
        fit = trainer(max_steps=12, max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(callbacks))
        fit.fit(module, ResumableLoader(), ckpt_path=ckpt_path)
        return flat_params(module), fit.optimizers[0].state_dict(), module.decisions

    uninterrupted = run([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)])
    resumed = run([], ckpt_path=tmp_path / "epoch=0-step=5.ckpt")
    assert torch.equal(resumed[0], uninterrupted[0])
    assert resumed[2] == uninterrupted[2][5:], "the same decisions after the checkpoint"
    for key in ("sam_steps", "sam_ascents"):
        assert resumed[1]["param_groups"][0][key] == uninterrupted[1]["param_groups"][0][key]
    assert 0 < uninterrupted[1]["param_groups"][0]["sam_ascents"] < 12


class Endless(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        yield from make_batches()


@pytest.mark.parametrize(
    ("method", "kwargs", "what"),
    [("aesam", {}, "AESAM's threshold schedule"), ("rst", {"p_end": 0.9, "schedule": "cosine"}, "RST's cosine")],
)
def test_the_length_they_cannot_know_is_asked_for(method: str, kwargs: dict[str, Any], what: str) -> None:
    module = Switching(method, **kwargs)
    with pytest.raises(MisconfigurationException, match=f"{what}.*its data has no length.*total_steps"):
        trainer().fit(module, torch.utils.data.DataLoader(Endless(), batch_size=None))
    module = Switching(method, **kwargs)
    with pytest.raises(MisconfigurationException, match=f"{what}.*max_time.*total_steps"):
        trainer(max_time="00:00:00:30", max_epochs=None).fit(
            module, torch.utils.data.DataLoader(make_batches(), batch_size=None)
        )
    constant = Switching(method, **({"lambda1": 0.5, "lambda2": 0.5} if method == "aesam" else {}))
    trainer(max_steps=3).fit(constant, torch.utils.data.DataLoader(Endless(), batch_size=None))  # needs no length


def test_a_plain_loop_without_the_length_is_told_what_to_pass() -> None:
    w = nn.Parameter(torch.ones(2))
    for opt in (AESAM([w], torch.optim.SGD, lr=0.1), RST([w], torch.optim.SGD, p=0.1, p_end=0.5, schedule="linear")):
        with pytest.raises(ValueError, match="total_steps"):
            SAMStep(opt).run(lambda: (w * w).sum())


# Arguments -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: AESAM(p, torch.optim.SGD, delta=1.0, lr=0.1), "delta"),
        (lambda p: AESAM(p, torch.optim.SGD, delta=-0.1, lr=0.1), "delta"),
        (lambda p: AESAM(p, torch.optim.SGD, lambda1=math.inf, lr=0.1), "lambda1"),
        (lambda p: AESAM(p, torch.optim.SGD, lambda2="1", lr=0.1), "lambda2"),
        (lambda p: AESAM(p, torch.optim.SGD, interval=2, lr=0.1), "takes no interval"),
        (lambda p: AELookSAM(p, torch.optim.SGD, alpha=-1, lr=0.1), "alpha"),
        (lambda p: AELookSAM(p, torch.optim.SGD, start=3, lr=0.1), "takes no start"),
        (lambda p: RST(p, torch.optim.SGD, p=1.5, lr=0.1), "Invalid p:"),
        (lambda p: RST(p, torch.optim.SGD, p_end=0.5, lr=0.1), "needs a schedule"),
        (lambda p: RST(p, torch.optim.SGD, schedule="linear", lr=0.1), "pass p_end"),
        (lambda p: RST(p, torch.optim.SGD, schedule="exp", p_end=0.1, lr=0.1), "Invalid schedule"),
        (lambda p: RST(p, torch.optim.SGD, seed=-1, lr=0.1), "seed"),
        (lambda p: RST(p, torch.optim.SGD, interval=2, lr=0.1), "takes no interval"),
    ],
)
def test_bad_arguments_say_what_to_pass(make: Callable[[Any], SAM], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make([nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize("cls", [AESAM, AELookSAM, RST])
def test_first_step_and_second_step_refuse_a_method_that_may_skip_the_second_pass(cls: type[SAM]) -> None:
    w = nn.Parameter(torch.ones(2))
    opt = cls([w], torch.optim.SGD, lr=0.1, total_steps=4)
    (w * w).sum().backward()
    with pytest.raises(ValueError, match=rf"{cls.__name__}.step\(closure\)"):
        opt.first_step()
    with pytest.raises(ValueError, match="second pass"):
        opt.second_step()


@pytest.mark.parametrize("cls", [AESAM, RST])
def test_davda54s_closure_loop_runs_the_closure_only_on_sam_steps(cls: type[SAM]) -> None:
    model = make_model()
    opt = cls(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=0.1,
        total_steps=STEPS,
        **({"delta": 0.5} if cls is AESAM else {}),
    )
    closures = 0
    for batch in make_batches():
        opt.zero_grad()
        loss_at(model, batch).backward()

        def closure(batch: Batch = batch) -> torch.Tensor:
            nonlocal closures
            closures += 1
            opt.zero_grad()
            loss = loss_at(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
    assert closures == opt.ascents_taken and 0 < closures < STEPS


def test_the_registry_builds_them_for_the_demo() -> None:
    for name, cls in (("aesam", AESAM), ("aelooksam", AELookSAM), ("rst", RST)):
        method = REGISTRY[name]
        opt = getattr(__import__("lightning_sam"), method.optimizer)(  # type: ignore[arg-type]
            [nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.05, momentum=0.9, **method.kwargs(rho=0.2)
        )
        assert type(opt) is cls
        for key, value in method.settings.items():
            assert getattr(opt.policy, key) == value, (name, key)


# Two processes -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_ranks_with_different_data_take_the_same_decisions(tmp_path: Path) -> None:
    run_worker(HERE / "switching_worker.py", str(tmp_path))
    for method in ("aesam", "aelooksam", "rst", "aesam_accumulate_2"):
        ranks = [torch.load(tmp_path / method / f"rank{r}.pt") for r in range(2)]
        assert ranks[0]["losses"] != ranks[1]["losses"], "the ranks' data differ"
        assert ranks[0]["ascents"] == ranks[1]["ascents"], method
        steps = len(ranks[0]["ascents"]) // (2 if method.endswith("accumulate_2") else 1)
        assert 0 < ranks[0]["ascents"][-1] < steps, f"{method}: both kinds of step"
        assert torch.equal(ranks[0]["weights"], ranks[1]["weights"]), method
    ranks = [torch.load(tmp_path / "plain_no_sync" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["ascents"] == ranks[1]["ascents"], "a plain loop under no_sync: the same decisions"
    assert 0 < ranks[0]["ascents"][-1] < 8
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
