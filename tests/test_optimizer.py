"""`lightning_sam.SAM` against a readable float64 reference and `pytorch_optimizer.SAM`."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import torch
from torch import nn

from lightning_sam import SAM

STEPS = 20
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
}


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def make_batches(n: int = STEPS, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(12, 5, generator=gen, dtype=dtype), torch.randn(12, 3, generator=gen, dtype=dtype))
        for _ in range(n)
    ]


def param_groups(model: nn.Module, adaptive: bool) -> list[dict[str, Any]]:
    """Two groups with different rho: the first layer, and the rest."""
    params = list(model.parameters())
    return [
        {"params": params[:2], "rho": 0.1, "adaptive": adaptive},
        {"params": params[2:], "rho": 0.03, "adaptive": adaptive},
    ]


def loss_at(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def reference_sam_step(
    model: nn.Module, base: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], eta: float = 0.0
) -> None:
    """The davda54/sam rule, written out plainly (with ASAM's eta; eta=0 is davda54's adaptive rule)."""
    base.zero_grad()
    loss_at(model, batch).backward()
    with torch.no_grad():
        scaled = [
            ((p.abs() + eta) if group["adaptive"] else 1.0) * p.grad
            for group in base.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
        saved = {}
        for group in base.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                saved[p] = p.clone()
                t_squared = (p.abs() + eta) ** 2 if group["adaptive"] else 1.0
                p.add_(t_squared * p.grad * group["rho"] / (norm + 1e-12))
    base.zero_grad()
    loss_at(model, batch).backward()
    with torch.no_grad():
        for p, w in saved.items():
            p.copy_(w)
    base.step()


def sam_step(opt: torch.optim.Optimizer, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_at(model, batch)
        loss.backward()
        return loss

    closure()
    return opt.step(closure)  # type: ignore[no-any-return]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_sam(base_name: str, adaptive: bool, eta: float = 0.0, foreach: bool | None = None) -> nn.Module:
    model = make_mlp()
    base_cls, kwargs = BASES[base_name]
    opt = SAM(param_groups(model, adaptive), base_cls, eta=eta, foreach=foreach, **kwargs)
    for batch in make_batches():
        sam_step(opt, model, batch)
    return model


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_and_pytorch_optimizer(base_name: str, adaptive: bool, foreach: bool) -> None:
    ours = run_sam(base_name, adaptive, foreach=foreach)

    reference = make_mlp()
    base_cls, kwargs = BASES[base_name]
    base = base_cls(param_groups(reference, adaptive), **kwargs)
    for batch in make_batches():
        reference_sam_step(reference, base, batch)

    oracle = make_mlp()
    opt = pytorch_optimizer.SAM(param_groups(oracle, adaptive), base_cls, foreach=foreach, **kwargs)
    for batch in make_batches():
        sam_step(opt, oracle, batch)

    assert not torch.equal(flat(ours), flat(make_mlp())), "training did not move the weights"
    torch.testing.assert_close(flat(ours), flat(reference), rtol=0, atol=1e-12)
    torch.testing.assert_close(flat(ours), flat(oracle), rtol=0, atol=1e-7)


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_asam_eta_matches_reference(base_name: str) -> None:
    ours = run_sam(base_name, adaptive=True, eta=0.01)
    reference = make_mlp()
    base_cls, kwargs = BASES[base_name]
    base = base_cls(param_groups(reference, True), **kwargs)
    for batch in make_batches():
        reference_sam_step(reference, base, batch, eta=0.01)
    torch.testing.assert_close(flat(ours), flat(reference), rtol=0, atol=1e-12)
    # eta matters: it is not the eta=0 rule.
    assert not torch.allclose(flat(ours), flat(run_sam(base_name, adaptive=True, eta=0.0)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
def test_foreach_and_per_tensor_paths_agree(base_name: str, adaptive: bool) -> None:
    torch.testing.assert_close(
        flat(run_sam(base_name, adaptive, eta=0.01, foreach=True)),
        flat(run_sam(base_name, adaptive, eta=0.01, foreach=False)),
        rtol=0,
        atol=1e-14,
    )


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_rho_zero_is_the_base_optimizer_bitwise(base_name: str) -> None:
    base_cls, kwargs = BASES[base_name]
    sam_model, base_model = make_mlp(dtype=torch.float32), make_mlp(dtype=torch.float32)
    sam = SAM(sam_model.parameters(), base_cls, rho=0.0, **kwargs)
    base = base_cls(base_model.parameters(), **kwargs)
    for batch in make_batches(dtype=torch.float32):
        sam_step(sam, sam_model, batch)
        base.zero_grad()
        loss_at(base_model, batch).backward()
        base.step()
    assert torch.equal(flat(sam_model), flat(base_model))


class TwoBranches(nn.Module):
    """``a`` only takes part in the first pass and ``b`` only in the second."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.a = nn.Parameter(torch.tensor([0.5, 0.25]))
        self.b = nn.Parameter(torch.tensor([-1.0, 3.0]))
        self.first_pass = True

    def forward(self) -> torch.Tensor:
        other = self.a if self.first_pass else self.b
        self.first_pass = not self.first_pass
        return ((self.shared * other) ** 2).sum()


@pytest.mark.parametrize("foreach", [False, True])
def test_parameters_without_grad_are_never_left_perturbed(foreach: bool) -> None:
    model = TwoBranches()
    frozen = nn.Parameter(torch.tensor([7.0]))  # never receives a gradient
    opt = SAM([*model.parameters(), frozen], torch.optim.SGD, rho=0.5, lr=0.1, foreach=foreach)
    a0, b0, f0 = model.a.detach().clone(), model.b.detach().clone(), frozen.detach().clone()

    model().backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(model.b, b0), "b had no gradient in the first pass and must not move"
    assert not torch.equal(model.a, a0), "a had a gradient and must be perturbed"
    model().backward()
    b_grad = model.b.grad.clone()  # type: ignore[union-attr]
    opt.second_step(zero_grad=True)

    assert torch.equal(model.a, a0), "a has no gradient in the second pass: restored and not stepped"
    assert torch.equal(model.b, b0.add(b_grad, alpha=-0.1)), "b is stepped with its second-pass gradient"
    assert torch.equal(frozen, f0)
    assert not opt.is_perturbed


def test_state_dict_carries_base_state_and_resumes_bitwise() -> None:
    base_cls, kwargs = BASES["adamw"]
    batches = make_batches(dtype=torch.float32)

    def build(model: nn.Module) -> SAM:
        return SAM(param_groups(model, adaptive=True), base_cls, eta=0.01, **kwargs)

    uninterrupted = make_mlp(dtype=torch.float32)
    opt = build(uninterrupted)
    for batch in batches:
        sam_step(opt, uninterrupted, batch)

    first_half = make_mlp(dtype=torch.float32)
    opt = build(first_half)
    for batch in batches[:10]:
        sam_step(opt, first_half, batch)
    checkpoint = copy.deepcopy({"model": first_half.state_dict(), "opt": opt.state_dict()})

    assert [g["rho"] for g in checkpoint["opt"]["param_groups"]] == [0.1, 0.03]
    assert all(g["adaptive"] and g["eta"] == 0.01 for g in checkpoint["opt"]["param_groups"])
    for state in checkpoint["opt"]["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, "only the base optimizer's state, no weight copy"

    resumed = make_mlp(seed=123, dtype=torch.float32)
    resumed.load_state_dict(checkpoint["model"])
    params = list(resumed.parameters())
    opt = SAM([{"params": params[:2]}, {"params": params[2:]}], base_cls, **kwargs)
    opt.load_state_dict(checkpoint["opt"])  # rho, adaptive and eta come from the checkpoint
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.03]
    assert opt.base_optimizer.state is opt.state and opt.base_optimizer.param_groups is opt.param_groups
    for batch in batches[10:]:
        sam_step(opt, resumed, batch)

    assert torch.equal(flat(resumed), flat(uninterrupted))


def test_momentum_survives_checkpoint() -> None:
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_step(opt, model, make_batches(1, dtype=torch.float32)[0])
    state = opt.state_dict()["state"]
    assert len(state) == 6 and all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in state.values())


def test_lr_scheduler_drives_the_base_optimizer() -> None:
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batch = make_batches(1, dtype=torch.float32)[0]
    for expected in (0.05, 0.025):
        loss_at(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_at(model, batch).backward()
        opt.second_step(zero_grad=True)
        scheduler.step()  # warnings are errors: no "lr_scheduler.step() before optimizer.step()"
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_memory_one_buffer_allocated_once_and_reused(foreach: bool, adaptive: bool) -> None:
    model = make_mlp(dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=adaptive, foreach=foreach)
    batch = make_batches(1, dtype=torch.float32)[0]
    sam_step(opt, model, batch)  # momentum buffers and SAM's copy of the weights exist from here on
    buffers = [b.data_ptr() for b in opt.protocol.buffers.tensors()]
    assert sum(b.numel() for b in opt.protocol.buffers.tensors()) == n_params, "one parameter-sized copy"

    for _ in range(3):
        sam_step(opt, model, batch)
    assert [b.data_ptr() for b in opt.protocol.buffers.tensors()] == buffers, "the same buffers, every step"


def test_step_restores_weights_when_the_closure_fails() -> None:
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    batch = make_batches(1, dtype=torch.float32)[0]
    loss_at(model, batch).backward()
    w0 = flat(model).clone()

    def failing_closure() -> torch.Tensor:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing_closure)
    assert torch.equal(flat(model), w0) and not opt.is_perturbed


def test_add_param_group_reaches_the_base_optimizer() -> None:
    model = make_mlp(dtype=torch.float32)
    params = list(model.parameters())
    opt = SAM(params[:2], torch.optim.SGD, rho=0.2, lr=0.1)
    opt.add_param_group({"params": params[2:], "lr": 0.01})
    assert opt.base_optimizer.param_groups is opt.param_groups and len(opt.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["lr"] == 0.01
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rho": -1.0})


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SAM(_params(), torch.optim.SGD, rho=-0.1, lr=0.1), "rho.*>= 0"),
        (lambda: SAM(_params(), torch.optim.SGD, rho=float("nan"), lr=0.1), "rho"),
        (lambda: SAM(_params(), torch.optim.SGD, eta=-0.01, lr=0.1), "eta.*>= 0"),
        (lambda: SAM(_params(), torch.optim.SGD, perturb_eps=-1e-12, lr=0.1), "perturb_eps.*>= 0"),
        (lambda: SAM(_params(), torch.optim.SGD, adaptive=1, lr=0.1), "adaptive"),  # type: ignore[arg-type]
        (lambda: SAM([{"params": _params(), "rho": -1}], torch.optim.SGD, lr=0.1), "rho"),
        (lambda: SAM(_params(), torch.optim.SGD(_params(), lr=0.1), lr=0.1), "optimizer class"),  # type: ignore[arg-type]
        (lambda: SAM(_params(), "sgd", lr=0.1), "optimizer class"),  # type: ignore[arg-type]
        (lambda: SAM(_params(), nn.Linear, lr=0.1), "must build a torch.optim.Optimizer"),
        (lambda: SAM(_params(), lambda groups: None), "must build a torch.optim.Optimizer, got a NoneType"),
        (lambda: SAM(_params(), functools.partial(torch.optim.LBFGS, lr=0.1)), r"LBFGS\.step needs a closure"),
        (lambda: SAM(_params(), functools.partial(SAM, base_optimizer=torch.optim.SGD)), "itself a SAM"),
    ],
)
def test_bad_arguments_raise_value_error(build: Callable[[], SAM], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_misuse_raises_with_instructions() -> None:
    params = _params()
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    params[0].grad = torch.ones(2)
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="call second_step"):
        opt.load_state_dict(opt.state_dict())
    opt.second_step()


def manual_sam_steps(
    opt: Any, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], backward: Any
) -> None:
    for batch in batches:
        opt.zero_grad()
        backward(loss_at(model, batch))
        opt.first_step(zero_grad=True)
        backward(loss_at(model, batch))
        opt.step()  # no closure after first_step: finishes the step


def test_wrappers_that_copy_the_optimizer_dict_share_the_perturbation() -> None:
    """Fabric's (and Lightning's) optimizer wrappers copy __dict__: first_step on the wrapper, step on the original."""
    import lightning as L

    batches = make_batches(5, dtype=torch.float32)
    reference = make_mlp(dtype=torch.float32)
    manual_sam_steps(
        SAM(reference.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), reference, batches, torch.Tensor.backward
    )

    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = make_mlp(dtype=torch.float32)
    wrapped_model, wrapped_opt = fabric.setup(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9))
    manual_sam_steps(wrapped_opt, wrapped_model, batches, fabric.backward)
    assert torch.equal(flat(model), flat(reference))


def test_grad_scaler_step_finishes_the_sam_step_and_skips_on_inf() -> None:
    batches = make_batches(4, dtype=torch.float32)
    reference = make_mlp(dtype=torch.float32)
    manual_sam_steps(SAM(reference.parameters(), torch.optim.SGD, lr=0.1), reference, batches, torch.Tensor.backward)

    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for batch in [*batches[:2], None, *batches[2:]]:
        poisoned = batch is None
        batch = batch or batches[0]
        start = flat(model).clone()
        opt.zero_grad()
        scaler.scale(loss_at(model, batch)).backward()
        opt.first_step(zero_grad=True)  # scaled gradients: the direction is the same, no unscale needed
        loss = loss_at(model, batch) * (math.inf if poisoned else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales, then SAM.step() unless inf/nan was found
        scaler.update()
        if poisoned:
            assert opt.is_perturbed, "the scaler skipped SAM.step()"
            opt.restore()
            assert torch.equal(flat(model), start)
            assert scaler.get_scale() == 512.0
        else:
            assert not opt.is_perturbed
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=1e-6)


# Copies, pickles, foreign state dicts ----------------------------------------------------------------------------


def trained(steps: int = 3) -> tuple[nn.Module, SAM]:
    model = make_mlp(dtype=torch.float32)
    opt = SAM(param_groups(model, adaptive=False), torch.optim.SGD, lr=0.05, momentum=0.9)
    for batch in make_batches(steps, dtype=torch.float32):
        sam_step(opt, model, batch)
    return model, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_optimizer_keep_training_like_the_original(how: str, tmp_path: Any) -> None:
    import pickle

    model, opt = trained()
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    elif how == "pickle":
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        model_copy, opt_copy = torch.load(tmp_path / "both.pt", weights_only=False)
    assert opt_copy.base_optimizer.param_groups is opt_copy.param_groups
    assert opt_copy.base_optimizer.state is opt_copy.state
    for batch in make_batches(4, dtype=torch.float32)[1:]:
        sam_step(opt, model, batch)
        sam_step(opt_copy, model_copy, batch)
    assert torch.equal(flat(model_copy), flat(model))


def test_a_plain_base_optimizer_state_dict_loads_and_keeps_sams_settings() -> None:
    model = make_mlp(dtype=torch.float32)
    sgd = torch.optim.SGD(param_groups(model, adaptive=False), lr=0.05, momentum=0.9)
    for batch in make_batches(3, dtype=torch.float32):
        sgd.zero_grad()
        loss_at(model, batch).backward()
        sgd.step()
    plain_state = sgd.state_dict()
    for group in plain_state["param_groups"]:  # what a plain optimizer saves: no SAM keys at all
        for key in ("rho", "adaptive"):
            group.pop(key, None)

    opt = SAM(param_groups(model, adaptive=False), torch.optim.SGD, lr=0.05, momentum=0.9)
    opt.load_state_dict(plain_state)
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.03], "SAM's own settings stay"
    assert all(g["eta"] == 0.0 and g["perturb_eps"] == 0.0 for g in opt.param_groups)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[p]["momentum_buffer"])
    sam_step(opt, model, make_batches(1, dtype=torch.float32)[0])  # and it steps


def test_davda54_and_pytorch_optimizer_state_dicts_load_without_their_weight_copies() -> None:
    model = make_mlp(dtype=torch.float32)
    theirs = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.08, lr=0.05, momentum=0.9)
    for batch in make_batches(3, dtype=torch.float32):
        sam_step(theirs, model, batch)
    state = theirs.state_dict()
    for param_state in state["state"].values():  # davda54/sam never deletes its copies: they stay in state
        param_state["old_p"] = torch.zeros(1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["rho"] == 0.08 and opt.param_groups[0]["eta"] == 0.0
    assert all(set(s) == {"momentum_buffer"} for s in opt.state.values())
    sam_step(opt, model, make_batches(1, dtype=torch.float32)[0])


@pytest.mark.parametrize(("key", "value"), [("rho", -1.0), ("adaptive", "yes"), ("perturb_eps", -1.0)])
def test_loaded_settings_are_validated(key: str, value: Any) -> None:
    _, opt = trained(1)
    state = opt.state_dict()
    state["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(state)


def test_a_state_dict_with_other_groups_is_refused_clearly() -> None:
    _, opt = trained(1)
    model = make_mlp(dtype=torch.float32)
    one_group = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="2 parameter groups, this SAM has 1"):
        one_group.load_state_dict(opt.state_dict())


# Inputs SAM cannot take, refused where they come in ---------------------------------------------------------------


def test_sparse_gradients_are_refused_with_the_fix() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = SAM(embedding.parameters(), torch.optim.SGD, lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse gradient.*sparse=False"):
        opt.first_step()
    assert not opt.is_perturbed


def test_complex_parameters_work_with_sam_and_are_refused_by_asam() -> None:
    w = nn.Parameter(torch.tensor([1.0 + 2.0j, -0.5j]))
    with pytest.raises(ValueError, match="complex parameters"):
        SAM([w], torch.optim.SGD, adaptive=True, lr=0.1)
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1)
    (w.abs() ** 2).sum().backward()
    g = w.grad.clone()  # type: ignore[union-attr]
    w0 = w.detach().clone()
    opt.first_step()
    torch.testing.assert_close(w.detach(), w0 + 0.1 * g / torch.linalg.vector_norm(g))
    opt.restore()
    assert torch.equal(w.detach(), w0)


def test_a_base_optimizer_factory_trains_bitwise_like_the_class_with_its_keywords() -> None:
    """``functools.partial(SGD, lr=...)``: what LightningCLI passes for ``--optimizer.base_optimizer.lr``."""
    runs = []
    for base, kwargs in [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                         (functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), {})]:  # fmt: skip
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = SAM(model.parameters(), base, rho=0.05, **kwargs)
        x, y = torch.randn(8, 4), torch.randn(8, 2)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.second_step()
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.param_groups[0]["lr"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 0.1


def test_sam_with_an_lr_scheduler_pickles_as_torchs_optimizers_do() -> None:
    """The scheduler wraps ``optimizer.step`` on the instance (Lightning pickles trainers and callbacks)."""
    import pickle

    opt = SAM(_params(), torch.optim.SGD, lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    copy_ = pickle.loads(pickle.dumps(opt))
    assert copy_.param_groups[0]["lr"] == 0.1 and type(copy_.base_optimizer) is torch.optim.SGD


def test_optimizers_that_need_a_closure_are_refused() -> None:
    with pytest.raises(ValueError, match=r"LBFGS\.step needs a closure"):
        SAM(_params(), torch.optim.LBFGS, lr=0.1)


@pytest.mark.parametrize("key", ["rho", "eta", "perturb_eps"])
def test_booleans_are_not_numbers(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SAM(_params(), torch.optim.SGD, lr=0.1, **{key: True})


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_get_the_float32_perturbation(foreach: bool, adaptive: bool, dtype: torch.dtype) -> None:
    """A large gradient makes rho/‖g‖ tiny: in half precision the scale alone rounds to 0."""
    rho = 1.0 if adaptive else 0.05
    w = nn.Parameter(torch.full((1000,), 0.01, dtype=dtype))
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, foreach=foreach)
    w.grad = torch.full((1000,), 6.0e4, dtype=dtype)  # norm ~1.9e6: rho / norm ~ 2.6e-8, below float16's range
    opt.first_step()
    w32, g32 = torch.full((1000,), 0.01, dtype=dtype).float(), w.grad.float()
    t = w32.abs() if adaptive else torch.ones(1000)
    expected = w32 + rho * t**2 * g32 / torch.linalg.vector_norm(t * g32)
    assert torch.equal(w.detach(), expected.to(dtype)), "computed in float32, rounded once"
    assert not torch.equal(w.detach(), torch.full((1000,), 0.01, dtype=dtype)), "the weights moved"


def test_a_non_finite_gradient_never_moves_the_weights() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    w.grad = torch.tensor([math.inf, 1.0])
    norm = opt.first_step()
    assert not torch.isfinite(norm)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    opt.restore()
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
