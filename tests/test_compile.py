"""torch.compile with SAMMixin: a compiled module trains as the eager one does, and the monitor measures it.

The eager module is the oracle. The backend is ``aot_eager`` (dynamo's capture and AOTAutograd's joint forward and
backward graph, run by the same ATen kernels as eager): every SAM-relevant piece of a real compile, in about a second
on these two cores; inductor, the default, is the one slow test (about 10 s to compile the tiny model cold).

Tolerances: ``aot_eager`` runs the ops eager runs, but the graph it captures is functionalized and decomposed (the
backward of ``cross_entropy`` and of ``Linear`` in other orders of the same sums), so its float32 results differ from
eager's by rounding, a few ulps per op, which a handful of steps with momentum carries on: ``rtol=1e-5, atol=1e-6``
(about a hundred float32 ulps of the weights, ~0.3, and a thousand times below what SAM changes, which is checked).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import loader, trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_sam import SAM, SAMMixin, SharpnessMonitor
from lightning_sam.sharpness import HVPFallbackWarning, hessian_max_eig

BACKEND = "aot_eager"
RTOL, ATOL = 1e-5, 1e-6
WHERE = ["submodule_in_init", "submodule_in_configure_model", "function_in_training_step", "whole_module"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    """Every test compiles from scratch: no graph, guard or counter of an earlier test is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def cross_entropy_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


class Classifier(SAMMixin, pl.LightningModule):
    """A small MLP trained with SAM(SGD), compiled where ``where`` says (``None``: eager, the oracle)."""

    def __init__(self, where: str | None = None, backend: Any = BACKEND, rho: float = 0.2, log: bool = True) -> None:
        super().__init__()
        self.where, self.backend, self.rho = where, backend, rho
        # self.log inside a training_step that dynamo compiles whole fails on torch 2.13 with or without SAM
        # (test_logging_inside_a_whole_compiled_training_step_fails_or_works_as_without_sam)
        self.logs = log and where != "whole_module"
        torch.manual_seed(0)
        self.net: nn.Module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        if where == "submodule_in_init":
            self.net = torch.compile(self.net, backend=backend)
        self.loss_of = cross_entropy_of
        if where == "function_in_training_step":
            self.loss_of = torch.compile(cross_entropy_of, backend=backend)

    def configure_model(self) -> None:
        if self.where == "submodule_in_configure_model" and not hasattr(self.net, "_orig_mod"):  # once per fit
            self.net = torch.compile(self.net, backend=self.backend)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_of(self.net, x, y)
        if self.logs:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=0.1, momentum=0.9)


class Plain(pl.LightningModule):
    """The same network and step without SAM: plain SGD under Lightning's automatic optimization."""

    def __init__(self, where: str | None = None, log: bool = True) -> None:
        super().__init__()
        self.where, self.backend, self.logs = where, BACKEND, log
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = cross_entropy_of(self.net, x, y)
        if self.logs:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(module: Classifier | Plain, **kwargs: Any) -> pl.Trainer:
    """A handful of optimizer steps (4) on the shared data; the whole module compiled if the module says so."""
    run = trainer(max_steps=4, **kwargs)
    run.fit(torch.compile(module, backend=module.backend) if module.where == "whole_module" else module, loader())
    return run


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]  # OptimizedModule: its _orig_mod's, in the same order


CONFIGS = {
    "plain": {},
    "accumulate_and_clip": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.1},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("where", WHERE)
def test_a_compiled_module_trains_with_sam_like_the_eager_module(where: str, config: str) -> None:
    eager, compiled = Classifier(), Classifier(where)
    fit(eager, **CONFIGS[config])
    run = fit(compiled, **CONFIGS[config])
    torch.testing.assert_close(weights(compiled), weights(eager), rtol=RTOL, atol=ATOL)
    optimizer = run.optimizers[0]
    assert isinstance(optimizer, SAM)
    assert optimizer.steps_taken == optimizer.ascents_taken == 4, "every step took SAM's second pass"
    assert compiled.sam_stats["perturbed_loss"] > compiled.sam_stats["loss"]
    sgd = Classifier(rho=0.0)  # SAM at rho=0 steps as its base optimizer: plain SGD on the same data
    fit(sgd, **CONFIGS[config])
    assert max((w - s).abs().max().item() for w, s in zip(weights(compiled), weights(sgd), strict=True)) > 1e3 * ATOL


def test_sam_does_not_recompile_per_pass_or_per_step() -> None:
    """SAM's two passes run the same graph at w and at w + e: dynamo compiles once, not at every pass or step."""
    counter = CompileCounterWithBackend(BACKEND)
    module = Classifier("submodule_in_init", backend=counter)
    run = fit(module)
    optimizer = run.optimizers[0]
    assert optimizer.steps_taken == 4 and counter.frame_count == 1, "one graph for 8 forwards (4 steps, 2 passes)"
    eager = Classifier()
    fit(eager)
    torch.testing.assert_close(weights(module), weights(eager), rtol=RTOL, atol=ATOL)


def test_logging_inside_a_whole_compiled_training_step_fails_or_works_as_without_sam() -> None:
    """Lightning compiles a compiled LightningModule's whole training_step; self.log in it trips dynamo on torch 2.13.

    Change nothing else: with SAMMixin the outcome is the one without it, an error of the same type, or success.
    """

    def outcome(module: Classifier | Plain) -> str:
        torch._dynamo.reset()
        try:
            fit(module)
        except Exception as error:  # the outcome compared is the error's type
            return type(error).__name__
        return "trained"

    plain = Plain(log=True)
    plain.where = "whole_module"
    with_sam = Classifier("whole_module")
    with_sam.logs = True
    assert outcome(with_sam) == outcome(plain)


def test_the_monitor_measures_a_compiled_module_by_finite_differences_with_one_warning(tmp_path: Path) -> None:
    """A compiled backward cannot be differentiated again: one HVPFallbackWarning, then finite differences.

    The oracle: the eager module's exact (double backward) Lanczos estimate at the same weights and batch.
    """
    monitor = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=2)
    module = Classifier("submodule_in_init")
    with pytest.warns(RuntimeWarning, match="fall back to finite differences") as record:
        fit(module, callbacks=[monitor], logger=CSVLogger(tmp_path))
    assert len([w for w in record if "fall back to finite differences" in str(w.message)]) == 1
    assert monitor.hvp == "finite_difference"
    logged = monitor.last_values["sharpness/hessian_max_eig"]

    eager = Classifier()
    eager.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in module.state_dict().items()})
    x, y = monitor.fixed_batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)  # the eager oracle is exact: no fallback
        exact, _ = hessian_max_eig(lambda: cross_entropy_of(eager.net, x, y), list(eager.parameters()), tol=1e-6)
    assert logged == pytest.approx(exact.item(), rel=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own
def test_inductor_the_default_backend_trains_like_eager() -> None:
    """The one slow test (~15 s cold on two cores): inductor fuses the ops, so its rounding differs more."""
    eager, compiled = Classifier(), Classifier("submodule_in_init", backend="inductor")
    fit(eager)
    run = fit(compiled)
    torch.testing.assert_close(weights(compiled), weights(eager), rtol=1e-4, atol=1e-5)
    assert run.optimizers[0].steps_taken == 4
