"""Every step is a transaction: every method against every fault, in a plain SAMStep loop and under SAMMixin.

The oracle is the same run without the bad event. A NaN batch (fp32, bf16) or an fp16 overflow is a skipped step:
the run equals the run on the other batches, bitwise (weights, the base optimizer's state, the variant's state and
every setting in the state dict). An exception in the batch's last pass (the one at the perturbed point, if the
step perturbs) followed by a retry of the batch equals the run where it never happened, bitwise. Steps are counted
as the base optimizer takes them (a step hook on it), never by ``global_step``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_sam import AESAM, GSAM, MSAM, RST, SAM, AELookSAM, FriendlySAM, LookSAM, SAMMixin, SAMStep
from lightning_sam.policy import Policy

Batch = tuple[torch.Tensor, torch.Tensor]
SGD: dict[str, Any] = {"lr": 0.1, "momentum": 0.9}
METHODS: dict[str, Callable[..., SAM]] = {  # (params, **base optimizer overrides)
    "sam": lambda p, **kw: SAM(p, torch.optim.SGD, rho=0.05, **{**SGD, **kw}),
    "asam": lambda p, **kw: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **{**SGD, **kw}),
    "looksam": lambda p, **kw: LookSAM(p, torch.optim.SGD, rho=0.05, k=2, alpha=0.7, **{**SGD, **kw}),
    "gsam": lambda p, **kw: GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.2, **{**SGD, **kw}),
    "friendlysam": lambda p, **kw: FriendlySAM(p, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.6, **{**SGD, **kw}),
    "msam": lambda p, **kw: MSAM(p, torch.optim.SGD, rho=0.3, **{**SGD, **kw}),
    "interval": lambda p, **kw: SAM(p, torch.optim.SGD, rho=0.05, interval=2, **{**SGD, **kw}),
    "late_phase": lambda p, **kw: SAM(p, torch.optim.SGD, rho=0.05, start=3, **{**SGD, **kw}),
    # the switching methods: on this data, a one-pass step 4 and a SAM step 5 (AE-SAM's trigger, RST's seed 1)
    "aesam": lambda p, **kw: AESAM(p, torch.optim.SGD, rho=0.05, delta=0.5, lambda1=0.8, lambda2=0.8, **{**SGD, **kw}),
    "aelooksam": lambda p, **kw: AELookSAM(
        p, torch.optim.SGD, rho=0.05, alpha=0.7, delta=0.5, lambda1=0.8, lambda2=0.8, **{**SGD, **kw}
    ),
    "rst": lambda p, **kw: RST(p, torch.optim.SGD, rho=0.05, p=0.5, seed=1, **{**SGD, **kw}),
}
EVENTS = ("nan_fp32", "nan_bf16", "fp16_overflow", "inf_at_w", "exception_retry")
N = 8
# Step 4 perturbs for most methods (LookSAM's SAM step, interval's, late phase's); step 5 is a one-pass step for
# LookSAM (a reuse step) and interval, and the other way round for AE-SAM, AE-LookSAM and RST: both kinds of step
# meet every fault.
BAD = (4, 5)


class SimulatedOOM(RuntimeError):
    """What an out-of-memory error in the pass would raise; the loop retries the batch."""


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_batches(event: str, bad: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(N)]
    x, y = batches[bad]
    if event.startswith("nan"):
        batches[bad] = (torch.full_like(x, float("nan")), y)
    elif event == "inf_at_w":  # the pass at w alone is not finite (finite_at_the_moved_weights)
        batches[bad] = (x, y.clone().fill_(float("inf")))
    elif event == "fp16_overflow":  # finite in fp32; its gradient times the scaler's 2**16 overflows fp16
        batches[bad] = (x, y * 1e4)
    return batches


def without(batches: list[Batch], bad: int) -> list[Batch]:
    return batches[:bad] + batches[bad + 1 :]


@dataclass
class Run:
    weights: torch.Tensor
    state: dict[str, Any]
    taken: int  # base optimizer steps
    raised: int  # simulated OOMs
    skip_warnings: int


def count_steps(opt: SAM) -> list[int]:
    taken = [0]
    opt.base_optimizer.register_step_post_hook(lambda *_: taken.__setitem__(0, taken[0] + 1))
    return taken


def flat_state(opt: SAM) -> dict[str, Any]:
    """Every entry of the state dict: tensors (base state, the variant's sam.*) and every group setting."""
    assert all(opt.sam_state.values()), "no empty entries (a read must never create one)"
    packed = opt.state_dict()
    out: dict[str, Any] = {}
    for index, entries in packed["state"].items():
        for key, value in entries.items():
            out[f"state.{index}.{key}"] = value
    for index, group in enumerate(packed["param_groups"]):
        for key, value in group.items():
            out[f"group.{index}.{key}"] = value
    return out


def assert_same(run: Run, reference: Run) -> None:
    assert torch.equal(run.weights, reference.weights), (run.weights - reference.weights).abs().max()
    assert run.state.keys() == reference.state.keys()
    for key, value in run.state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, reference.state[key]), key
        else:
            assert value == reference.state[key], key
    assert run.taken == reference.taken


@contextlib.contextmanager
def skip_warnings_counted(into: list[int]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into.append(sum("the step was skipped" in str(w.message) for w in caught))
    others = [str(w.message) for w in caught if "the step was skipped" not in str(w.message)]
    assert not [m for m in others if "lightning_sam" in m or "SAM" in m], others


def autocast(event: str) -> Any:
    dtype = {"nan_bf16": torch.bfloat16, "fp16_overflow": torch.float16}.get(event)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


# The plain loop ------------------------------------------------------------------------------------------------------


class FailOnce(torch.autograd.Function):
    """The identity, whose backward raises once when armed (an out-of-memory error in a backward pass)."""

    armed: ClassVar[list[bool]] = [False]

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if FailOnce.armed[0]:
            FailOnce.armed[0] = False
            raise SimulatedOOM("out of memory (simulated), in a backward pass")
        return grad


def finite_at_the_moved_weights(y: torch.Tensor) -> torch.Tensor:
    """The ``inf_at_w`` batch's targets are inf in the pass at w only: a finite second pass must not hide it."""
    return torch.where(torch.isinf(y), torch.zeros_like(y), y)


def loss_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, event: str, at_w: bool) -> torch.Tensor:
    if not at_w:
        y = finite_at_the_moved_weights(y)
    with autocast(event):
        return nn.functional.mse_loss(model(x), y)


def plain_run(
    method: str, event: str, batches: list[Batch], fail: tuple[int, str] | None = None, accumulate: int = 1
) -> Run:
    """``fail``: (batch, site), the site one of ``forward_at_w``, ``backward_at_w``, ``forward_moved``,
    ``backward_moved`` (the pass at the weights SAM moved to); the loop catches the error and runs the batch again."""
    model = make_net()
    opt = METHODS[method](model.parameters())
    taken = count_steps(opt)
    scaler = torch.amp.GradScaler("cpu") if event == "fp16_overflow" else None
    step = SAMStep(opt, model, scaler=scaler)
    raised, warned = [0], []
    with skip_warnings_counted(warned):
        for start in range(0, len(batches), accumulate):
            for i in range(start, min(start + accumulate, len(batches))):
                x, y = batches[i]

                def loss_fn(i: int = i, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    where = "moved" if opt.is_perturbed else "at_w"
                    armed = fail is not None and i == fail[0] and fail[1].endswith(where) and not raised[0]
                    if armed and fail is not None and fail[1].startswith("forward"):
                        raised[0] += 1
                        raise SimulatedOOM("out of memory (simulated), in a forward pass")
                    loss = loss_at(model, x, y, event, at_w=where == "at_w")
                    if armed:
                        raised[0] += 1
                        FailOnce.armed[0] = True
                        loss = FailOnce.apply(loss)
                    return loss / accumulate

                before = torch.cat([p.detach().flatten() for p in model.parameters()])
                try:
                    step.run(loss_fn)
                except SimulatedOOM:
                    assert not opt.is_perturbed, "back at w when the exception leaves run()"
                    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), before)
                    step.run(loss_fn)  # the retry: nothing of the failed attempt may remain
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return Run(weights, flat_state(opt), taken[0], raised[0], warned[0])


# MSAM has no pass at w to be bad (under SAMMixin its pass at w is Lightning's, and not back-propagated)
MATRIX = [(m, e) for m in sorted(METHODS) for e in EVENTS if not (m == "msam" and e == "inf_at_w")]


@functools.cache
def ascents(method: str) -> tuple[bool, ...]:
    """Which steps of the clean run ascend (perturb the weights): the switching methods' choices, as they fall."""
    model = make_net()
    opt = METHODS[method](model.parameters())
    step, out = SAMStep(opt, model), []
    for x, y in make_batches("none", 0):
        step.run(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        out.append(step.ascending)
        opt.step()
        opt.zero_grad()
    return tuple(out)


def last_forward(method: str, bad: int) -> str:
    """The step's last forward pass: at the weights SAM moved to, unless the step takes one pass at w."""
    return "forward_moved" if ascents(method)[bad] else "forward_at_w"


def test_both_kinds_of_step_meet_the_faults() -> None:
    for method in ("looksam", "interval", "aesam", "aelooksam", "rst"):
        assert {ascents(method)[bad] for bad in BAD} == {True, False}, method


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(("method", "event"), MATRIX)
def test_a_plain_loop_runs_as_if_the_bad_event_never_happened(method: str, event: str, bad: int) -> None:
    batches = make_batches(event, bad)
    if event == "exception_retry":
        fail = (bad, last_forward(method, bad))
        run, reference = plain_run(method, event, batches, fail=fail), plain_run(method, event, batches)
        assert run.raised == 1, "the fault happened"
        assert run.taken == N
    else:
        run, reference = plain_run(method, event, batches), plain_run(method, event, without(batches, bad))
        assert run.taken == N - 1, "the bad step was skipped, and only it"
        assert run.skip_warnings == (0 if event == "fp16_overflow" else 1)
    assert_same(run, reference)


SITES = [
    (method, site)
    for method in sorted(METHODS)
    for site in ("forward_at_w", "backward_at_w", "forward_moved", "backward_moved")
    if not (method == "msam" and site.endswith("at_w"))  # MSAM's one pass is at the moved weights
]


@pytest.mark.parametrize(("method", "site"), SITES)
def test_a_plain_loop_retries_a_batch_after_an_exception_in_any_pass(method: str, site: str) -> None:
    """An out-of-memory error in either forward or backward pass of a step that moves the weights: back at w at
    once, and the batch run again is as if it had run once."""
    bad = next(bad for bad in BAD if ascents(method)[bad])
    batches = make_batches("exception_retry", bad)
    run = plain_run(method, "nan_fp32", batches, fail=(bad, site))
    reference = plain_run(method, "nan_fp32", batches)
    assert run.raised == 1, "the fault happened"
    assert_same(run, reference)


@pytest.mark.parametrize(
    ("method", "event"), [(m, e) for m, e in MATRIX if e in ("nan_fp32", "fp16_overflow", "inf_at_w")]
)
def test_a_plain_loop_skips_a_window_whose_second_micro_batch_is_bad(method: str, event: str) -> None:
    """Accumulating 2 micro-batches a step, a bad one after a good one (5, after 4) spoils the window (4, 5):
    nothing the good micro-batch kept may reach the next step."""
    batches = make_batches(event, 5)
    run = plain_run(method, event, batches, accumulate=2)
    reference = plain_run(method, event, batches[:4] + batches[6:], accumulate=2)
    assert run.taken == reference.taken == N // 2 - 1
    assert_same(run, reference)


# Under SAMMixin ------------------------------------------------------------------------------------------------------


class FaultNet(SAMMixin, pl.LightningModule):
    """Regression with every method; an optimizer_step that retries a batch after an out-of-memory error."""

    def __init__(self, method: str, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = make_net()
        self.method, self.fail_at, self.raised = method, fail_at, 0
        self.taken: list[int] = [0]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        last_pass = self.sam_second_pass or not ascents(self.method)[batch_idx]  # no step skipped: batch = step
        if batch_idx == self.fail_at and last_pass and not self.raised:
            self.raised += 1
            raise SimulatedOOM("out of memory (simulated)")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), finite_at_the_moved_weights(y) if self.sam_second_pass else y)

    def configure_optimizers(self) -> Any:
        opt = METHODS[self.method](self.parameters())
        self.taken = count_steps(opt)
        return opt

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        try:
            optimizer.step(closure=optimizer_closure)
        except SimulatedOOM:
            optimizer.step(closure=optimizer_closure)


def precision(event: str) -> dict[str, Any]:
    if event == "nan_bf16":
        return {"precision": "bf16-mixed"}
    if event == "fp16_overflow":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {}


def lightning_run(method: str, event: str, batches: list[Batch], fail_at: int | None = None) -> Run:
    module = FaultNet(method, fail_at)
    fit = trainer(**precision(event))
    warned: list[int] = []
    with skip_warnings_counted(warned):
        fit.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    return Run(weights, flat_state(fit.optimizers[0]), module.taken[0], module.raised, warned[0])


@pytest.mark.slow
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(("method", "event"), MATRIX)
def test_sammixin_runs_as_if_the_bad_event_never_happened(method: str, event: str, bad: int) -> None:
    batches = make_batches(event, bad)
    if event == "exception_retry":
        run, reference = lightning_run(method, event, batches, fail_at=bad), lightning_run(method, event, batches)
        assert run.raised == 1, "the fault happened"
        assert run.taken == N
    else:
        run, reference = lightning_run(method, event, batches), lightning_run(method, event, without(batches, bad))
        assert run.taken == N - 1, "the bad step was skipped, and only it"
        assert run.skip_warnings == (0 if event == "fp16_overflow" else 1)
    assert_same(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("event", ["nan_fp32", "fp16_overflow"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sammixin_skips_a_whole_accumulation_window_with_a_bad_micro_batch(method: str, event: str) -> None:
    """Accumulating 2 batches a step, a bad first micro-batch (4) spoils its window (4, 5): the run equals the one
    on the other batches, and nothing of the window (its first gradients) reaches the next step."""
    batches = make_batches(event, 4)

    def fit(data: list[Batch]) -> Run:
        module = FaultNet(method)
        warned: list[int] = []
        with skip_warnings_counted(warned):
            fit = trainer(accumulate_grad_batches=2, **precision(event))
            fit.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        return Run(weights, flat_state(fit.optimizers[0]), module.taken[0], 0, warned[0])

    run, reference = fit(batches), fit(batches[:4] + batches[6:])
    assert run.taken == reference.taken == N // 2 - 1
    assert_same(run, reference)


# What the matrix cannot reach ----------------------------------------------------------------------------------------


def test_looksam_survives_a_skipped_step_that_first_reached_a_branch() -> None:
    """A branch first reached on a skipped reuse step, then absent from a SAM step: nothing of the skipped step
    stays (no empty state entry), every entry shares one norm of g_v, and the run is the one without the NaN."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.branch = nn.Linear(6, 3), nn.Linear(6, 3)
            self.use_branch = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk(x) + self.branch(x) if self.use_branch else self.trunk(x)

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(5)]
    # (branch used, the batch): a SAM step without the branch; a NaN reuse step with it (skipped); then without it
    # a reuse step, a SAM step and a reuse step
    plan = [(False, data[0]), (True, (data[1][0] * math.nan, data[1][1])), (False, data[2]), (False, data[3])]
    plan.append((False, data[4]))

    def run(steps: list[tuple[bool, Batch]]) -> tuple[torch.Tensor, dict[str, Any], int]:
        model = Branchy()
        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1, momentum=0.9)
        step = SAMStep(opt, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's
            for use_branch, (x, y) in steps:
                model.use_branch = use_branch
                step.run(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
        norms = {id(entries["looksam_gv_norm"]) for entries in opt.sam_state.values()}
        assert len(norms) == 1, "one norm of g_v, shared by every entry"
        return torch.cat([p.detach().flatten() for p in model.parameters()]), flat_state(opt), opt.steps_taken

    weights, state, taken = run(plan)
    clean_weights, clean_state, clean_taken = run(plan[:1] + plan[2:])
    assert taken == clean_taken == 4
    assert torch.equal(weights, clean_weights)
    assert state.keys() == clean_state.keys()
    assert all(
        torch.equal(v, clean_state[k]) if isinstance(v, torch.Tensor) else v == clean_state[k] for k, v in state.items()
    )


class KeepsFirstGradient(Policy):
    keeps_first_gradient = True


def test_a_gradient_tensor_that_autograd_gives_to_two_parameters_is_kept_once_each() -> None:
    """``autograd.grad(((p + q)**2).sum(), [p, q])`` returns one tensor for both: each keeps its own sum."""
    p, q = nn.Parameter(torch.tensor([1.0])), nn.Parameter(torch.tensor([2.0]))
    opt = SAM([p, q], torch.optim.SGD, rho=0.0, lr=0.0, policy=KeepsFirstGradient())
    step = SAMStep(opt, scaler=None)
    for _ in range(2):  # two micro-batches of one step
        step.run(lambda: ((p + q) ** 2).sum())
    kept = opt.protocol.ctx.kept  # type: ignore[union-attr]
    assert kept[p] is not kept[q]
    assert kept[p].tolist() == kept[q].tolist() == [12.0], "2·(p + q) = 6, twice"
    opt.step()


def test_a_failure_half_way_through_the_move_leaves_no_weight_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error while moving the second tensor: the first one goes back too."""
    model = make_net()
    opt = METHODS["sam"](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)).backward()
    calls, real = [0], torch.nan_to_num

    def fails_on_the_second(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 2:
            raise SimulatedOOM("out of memory (simulated), in the move")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "nan_to_num", fails_on_the_second)
    with pytest.raises(SimulatedOOM):
        opt.first_step()
    assert calls[0] == 2, "the fault happened on the second tensor"
    assert not opt.is_perturbed
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))


def test_a_failure_while_keeping_the_first_gradient_leaves_the_weights_at_w(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_net()
    opt = METHODS["gsam"](model.parameters())
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    step = SAMStep(opt, model)

    def fails(*args: Any, **kwargs: Any) -> None:
        raise SimulatedOOM("out of memory (simulated), keeping the gradient")

    monkeypatch.setattr(opt.protocol, "_keep_first_gradient", fails)
    with pytest.raises(SimulatedOOM):
        step.run(lambda: nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)))
    assert not opt.is_perturbed
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), before)


@pytest.mark.parametrize("method", ["gsam", "looksam", "friendlysam", "sam"])
def test_torchs_checkpoint_state_dict_of_a_live_optimizer_takes_no_step(method: str) -> None:
    """get_optimizer_state_dict on an optimizer without base state (plain SGD, before its first step) initializes it
    with a zero-lr step of zero gradients: no step is counted, GSAM's lr_max is not 0, the variant's entries exist."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_net()
    opt = METHODS[method](model.parameters(), lr=0.4, momentum=0.0)
    saved = get_optimizer_state_dict(model, opt)
    assert opt.steps_taken == 0
    assert all(p.grad is None for p in model.parameters()), "torch clears them again"
    if method == "gsam":
        assert all(g["gsam_lr_max"] == 0.4 for g in saved["param_groups"])
    names = {"looksam": {"sam.looksam_gv", "sam.looksam_gv_norm"}, "friendlysam": {"sam.fsam_m"}}.get(method, set())
    ours = [{k for k in entries if k.startswith("sam.")} for entries in saved["state"].values()]
    assert ours == [names] * len(ours), "the variant's entries for every parameter: the template a resume loads into"
    assert len(ours) == (4 if names else len(ours)), "all four parameters"
