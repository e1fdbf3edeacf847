"""Everyday Lightning patterns under SAMMixin, each as the same module does without SAM (or refused clearly).

Aliased, decorated and ``partialmethod`` training steps; hooks assigned on the instance; LightningCLI's
``--optimizer``; late-phase SAM's length (a mid-epoch resume, iterable data, ``max_time``, an accumulation schedule);
every source of randomness a training step draws from; TorchScript; ``configure_optimizers`` returning ``None``.
"""

from __future__ import annotations

import functools
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import pytorch_optimizer
import torch
from helpers import Net, ResumableLoader, SAMNet, batches, flat_params, loader, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from torch import nn

import lightning_sam
from lightning_sam import SAM, SAMMixin
from lightning_sam.mixin import planned_steps

HERE = Path(__file__).resolve().parent


def reference_sam(n_batches: int = 8) -> torch.Tensor:
    """pytorch_optimizer.SAM in a plain loop over the same batches (the weights after it)."""
    torch.manual_seed(0)
    model = Net()
    opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches()[:n_batches]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return flat_params(model)


class Counted(SAMNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def step(self, batch: Any, batch_idx: int, stage: str = "train") -> Any:
        self.calls += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class Named(Counted):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch, batch_idx)


class Aliased(Counted):
    training_step = Counted.step
    validation_step = Counted.step


def undecorated(method: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:  # no functools.wraps: its name is "wrapper"
        return method(self, *args, **kwargs)

    return wrapper


class Decorated(Counted):
    @undecorated
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.step(batch, batch_idx)


class PartialMethod(Counted):
    training_step = functools.partialmethod(Counted.step, stage="train")


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("cls", [Aliased, Decorated, PartialMethod])
def test_an_aliased_decorated_or_partial_training_step_trains_bitwise_like_a_named_one(cls: type[Counted]) -> None:
    results = {}
    for module_cls in (Named, cls):
        torch.manual_seed(0)
        module = module_cls()
        trainer().fit(module, loader())
        results[module_cls] = (flat_params(module), module.calls)
    assert results[cls][1] == results[Named][1] == 16, "two passes per batch, never more"
    assert torch.equal(results[cls][0], results[Named][0])
    torch.testing.assert_close(results[cls][0], reference_sam(), rtol=0, atol=1e-5)


# Hooks assigned on the instance --------------------------------------------------------------------------------------


def recording_instance_step(module: SAMNet) -> list[bool]:
    """Assign a training step on the instance that records, per call, whether it is the second pass."""
    passes: list[bool] = []

    def training_step(batch: Any, batch_idx: int) -> Any:
        passes.append(module.sam_second_pass)
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    module.training_step = training_step  # type: ignore[method-assign]
    return passes


def test_a_training_step_assigned_on_the_instance_is_driven_like_a_method() -> None:
    torch.manual_seed(0)
    module = SAMNet()
    passes = recording_instance_step(module)
    trainer().fit(module, loader())
    assert passes == [False, True] * 8
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)


def test_configure_optimizers_assigned_on_the_instance_is_checked_and_driven() -> None:
    class Plain(SAMMixin, Net):
        pass

    torch.manual_seed(0)
    module = Plain()
    module.configure_optimizers = lambda: SAM(module.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)  # type: ignore[method-assign]
    trainer().fit(module, loader())
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)

    torch.manual_seed(0)
    refused = Plain()
    refused.configure_optimizers = lambda: torch.optim.SGD(refused.parameters(), lr=0.1)  # type: ignore[method-assign]
    with pytest.raises(MisconfigurationException, match="LightningCLI's --optimizer"):
        trainer().fit(refused, loader())


def test_a_backward_assigned_on_the_instance_is_driven_like_a_method() -> None:
    torch.manual_seed(0)
    module = SAMNet()
    at_w: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        seen.append(flat_params(module).clone())
        loss.backward(*args, **kwargs)

    module.backward = backward  # type: ignore[method-assign]
    module.on_train_batch_start = lambda *args: at_w.append(flat_params(module).clone())  # type: ignore[method-assign]
    trainer().fit(module, loader())
    assert len(seen) == len(at_w) == 8, "once per batch: for the loss at w + e"
    assert all(not torch.equal(w, w_e) for w, w_e in zip(at_w, seen, strict=True)), "at w + e, as documented"
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)


def step_of(module: nn.Module, batch: Any, batch_idx: int) -> Any:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def test_a_module_with_an_instance_hook_pickles_and_copies_after_a_fit_as_the_plain_module_does(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    module = SAMNet()
    module.training_step = functools.partial(step_of, module)  # type: ignore[method-assign]
    trainer().fit(module, loader())
    torch.save(module, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    assert torch.equal(flat_params(loaded), flat_params(module))

    copy, before = __import__("copy").deepcopy(module), flat_params(module).clone()
    trainer().fit(copy, loader())  # the copy trains its own weights, through its own hook
    assert torch.equal(flat_params(module), before) and not torch.equal(flat_params(copy), before)


def test_an_instance_hook_keeps_its_own_signature() -> None:
    """Lightning passes ``batch_idx`` only to a step that takes it."""
    torch.manual_seed(0)
    module = SAMNet()
    calls: list[bool] = []

    def training_step(batch: Any) -> Any:
        calls.append(module.sam_second_pass)
        return step_of(module, batch, 0)

    module.training_step = training_step  # type: ignore[method-assign]
    trainer().fit(module, loader())
    assert calls == [False, True] * 8


@pytest.mark.filterwarnings("ignore:SAM found no parameter with a gradient")  # Lightning's step(closure) comes first
def test_an_instance_configure_callbacks_does_not_turn_sam_off() -> None:
    torch.manual_seed(0)
    module = SAMNet()
    calls = recording_instance_step(module)
    module.configure_callbacks = lambda: []  # type: ignore[method-assign]
    trainer().fit(module, loader())
    assert calls == [False, True] * 8
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)

    both = SAMNet()
    both.configure_callbacks = lambda: []  # type: ignore[method-assign]
    both.configure_optimizers = lambda: SAM(both.parameters(), torch.optim.SGD, lr=0.1)  # type: ignore[method-assign]
    with pytest.raises(MisconfigurationException, match="both set on the instance"):
        trainer().fit(both, loader())


def test_configure_optimizers_returning_none_fits_without_an_optimizer_as_lightning_does() -> None:
    class NoOptimizer(SAMNet):
        def configure_optimizers(self) -> Any:
            return None

    torch.manual_seed(0)
    module = NoOptimizer()
    before = flat_params(module).clone()
    with pytest.warns(UserWarning, match="no optimizer"):
        trainer().fit(module, loader())
    assert torch.equal(flat_params(module), before)

    torch.manual_seed(0)
    again = Named()  # a SAM fit first, then one without an optimizer: nothing of the first fit drives the second
    trainer().fit(again, loader())
    again.configure_optimizers = lambda: None  # type: ignore[method-assign]
    again.calls, before = 0, flat_params(again).clone()
    with pytest.warns(UserWarning, match="no optimizer"):
        trainer().fit(again, loader())
    assert again.calls == 8 and torch.equal(flat_params(again), before)


@pytest.mark.filterwarnings("ignore:.*(to_torchscript|torch.jit.script).* deprecated")
def test_a_sammixin_module_scripts_with_torchscript_as_the_plain_module_does() -> None:
    torch.manual_seed(0)
    module = SAMNet()
    scripted = module.to_torchscript()  # deprecated by Lightning and torch alike, for any module
    x = torch.randn(4, 6)
    assert torch.equal(scripted(x), module(x))
    trainer().fit(module, loader())  # after a fit too (sam_stats and the driver are attributes then)
    assert torch.equal(module.to_torchscript()(x), module(x))


# LightningCLI's --optimizer ------------------------------------------------------------------------------------------

CLI_SCRIPT = """
import sys

sys.path.insert(0, {here!r})
import torch
from helpers import SAMNet, loader
from lightning.pytorch.cli import LightningCLI


class Model(SAMNet):  # its own configure_optimizers: SAM(SGD, rho=0.05, lr=0.1, momentum=0.9)
    def __init__(self) -> None:
        super().__init__()
        self.passes = 0

    def training_step(self, batch, batch_idx):
        self.passes += 1
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        weights = torch.cat([p.detach().flatten() for p in self.parameters()])
        print("passes", self.passes, "optimizer", type(self.trainer.optimizers[0]).__name__)
        print("weights", weights.tolist())


class Data(__import__("lightning.pytorch", fromlist=["x"]).LightningDataModule):
    def train_dataloader(self):
        return loader()


LightningCLI(Model, Data, save_config_kwargs={{"overwrite": True}})
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_lightning_clis_optimizer_trains_sam_like_the_modules_own_or_is_refused_with_the_recipe(
    tmp_path: Path,
) -> None:
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(CLI_SCRIPT.format(here=str(HERE))))
    common = ["fit", "--seed_everything=0", "--trainer.max_epochs=1", "--trainer.logger=false",
              "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *common, *args], capture_output=True, text=True, timeout=300
        )

    def weights(run: subprocess.CompletedProcess[str]) -> str:
        assert run.returncode == 0, run.stderr[-3000:]
        return next(line for line in run.stdout.splitlines() if line.startswith("weights"))

    own = cli()
    plain = cli("--optimizer=torch.optim.SGD", "--optimizer.lr=0.1")
    assert plain.returncode != 0
    assert "LightningCLI's --optimizer" in plain.stderr and "class_path: lightning_sam.SAM" in plain.stderr
    recipe = plain.stderr[plain.stderr.index("--optimizer=lightning_sam.SAM") :].split(" (YAML")[0].split()
    assert recipe == ["--optimizer=lightning_sam.SAM", "--optimizer.base_optimizer=torch.optim.SGD",
                      "--optimizer.base_optimizer.lr=0.1", "--optimizer.rho=0.05"]  # fmt: skip
    sam = cli(*recipe, "--optimizer.base_optimizer.momentum=0.9")  # the recipe, with the module's momentum
    assert "passes 16 optimizer SAM" in sam.stdout, "two passes per batch: SAM through the mixin"
    assert weights(sam) == weights(own), "the base optimizer's arguments reach it: the same fit, bitwise"
    looksam = cli("--optimizer=lightning_sam.LookSAM", "--optimizer.base_optimizer=torch.optim.SGD",
                  "--optimizer.base_optimizer.lr=0.1", "--optimizer.k=2")  # fmt: skip
    assert "passes 12 optimizer LookSAM" in looksam.stdout, looksam.stderr[-3000:]  # 8 batches, every 2nd ascends


# Late-phase SAM's length ---------------------------------------------------------------------------------------------


class LatePhase(SAMNet):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, start=0.5, lr=0.1, momentum=0.9)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_late_phase_sam_resumes_mid_epoch_bitwise(tmp_path: Path) -> None:
    """Reading the fit's length in configure_optimizers made Lightning set up the data before a mid-epoch resume
    restored it: the epoch restarted from batch 0."""

    def run(max_steps: int, callbacks: list[Any], ckpt_path: Path | None = None) -> Any:
        torch.manual_seed(0)
        module = LatePhase()
        fit = trainer(max_steps=max_steps, max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(callbacks))
        fit.fit(module, ResumableLoader(), ckpt_path=ckpt_path)
        return flat_params(module), fit.optimizers[0].state_dict()

    uninterrupted = run(12, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)])
    resumed = run(12, [], ckpt_path=tmp_path / "epoch=0-step=5.ckpt")  # mid-epoch: after batch 5 of 8
    assert torch.equal(resumed[0], uninterrupted[0])
    assert resumed[1]["param_groups"][0]["sam_steps"] == uninterrupted[1]["param_groups"][0]["sam_steps"] == 12


class Endless(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        yield from batches()


@pytest.mark.parametrize(
    ("fit_kwargs", "data", "why"),
    [
        ({}, lambda: torch.utils.data.DataLoader(Endless(), batch_size=None), "its data has no length"),
        ({"max_time": "00:00:00:30", "max_epochs": None}, loader, "max_time"),
    ],
)
def test_late_phase_sam_asks_for_the_length_it_cannot_know(fit_kwargs: dict[str, Any], data: Any, why: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(MisconfigurationException, match=f"{why}.*total_steps"):
        trainer(**fit_kwargs).fit(LatePhase(), data())


def test_late_phase_sam_follows_the_real_length_under_an_accumulation_schedule() -> None:
    torch.manual_seed(0)
    module = LatePhase()
    schedule = GradientAccumulationScheduler({0: 1, 1: 4})  # 8 steps, then 2: 10, where the estimate says 32
    fit = trainer(max_epochs=3, callbacks=[schedule])
    fit.fit(module, loader())
    opt = fit.optimizers[0]
    assert opt.total_steps == planned_steps(fit) == 8 + 2 + 2
    assert opt.steps_taken == 12
    assert opt.schedule.first() == 6, "SAM from the 7th of the 12 steps really taken"


class TunedLatePhase(LatePhase):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8

    def train_dataloader(self) -> Any:
        return loader(batch_size=self.batch_size)


@pytest.mark.filterwarnings("ignore")
def test_late_phase_sam_plans_the_real_fit_not_a_tuners_trial() -> None:
    """BatchSizeFinder's trials run inside the fit, on the same SAM, with their own max_steps."""
    from lightning.pytorch.callbacks import BatchSizeFinder

    torch.manual_seed(0)
    module = TunedLatePhase()
    fit = trainer(max_epochs=4, callbacks=[BatchSizeFinder(steps_per_trial=2, max_trials=2, init_val=4)])
    fit.fit(module)
    opt = fit.optimizers[0]
    assert opt.total_steps == planned_steps(fit) == 4 * len(loader(batch_size=module.batch_size))


def test_the_planned_length_is_lightnings_estimate_without_a_schedule() -> None:
    torch.manual_seed(0)
    fit = trainer(max_epochs=3, accumulate_grad_batches=3)
    fit.fit(LatePhase(), loader())
    assert fit.optimizers[0].total_steps == fit.estimated_stepping_batches == 9


# Every source of randomness ------------------------------------------------------------------------------------------


class Mixup(SAMNet):
    """Mixup with lambda from numpy, a permutation from torch, a coin from Python's random, noise from its own
    generator: both passes must draw the same, and each stream advance once per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = torch.Generator().manual_seed(7)
        self.draws: list[tuple[bool, float, list[int], float, float, float]] = []

    def on_train_start(self) -> None:  # one made late, on a submodule
        self.net[0].late = torch.Generator().manual_seed(3)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))  # noqa: NPY002 (numpy's global generator, as mixup recipes use)
        perm = torch.randperm(len(x))
        coin = random.random()
        jitter = float(torch.randn((), generator=self.noise))
        late = float(torch.rand((), generator=self.net[0].late))
        self.draws.append((self.sam_second_pass, lam, perm.tolist(), coin, jitter, late))
        mixed = lam * x + (1 - lam) * x[perm] + 0.01 * jitter
        out = self(mixed)
        return lam * nn.functional.cross_entropy(out, y) + (1 - lam) * nn.functional.cross_entropy(out, y[perm])


def seed_all() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)


def test_both_passes_draw_the_same_numbers_from_every_source_and_each_advances_once_per_batch() -> None:
    seed_all()
    module = Mixup()
    fit = trainer()
    fit.fit(module, loader())
    firsts = [d[1:] for d in module.draws if not d[0]]
    seconds = [d[1:] for d in module.draws if d[0]]
    assert len(firsts) == len(seconds) == 8
    assert firsts == seconds, "the second pass replays every stream"
    assert len({d[0] for d in firsts}) == 8, "and each batch draws anew"
    after = (
        np.random.get_state()[1].copy(),  # noqa: NPY002
        random.getstate(),
        module.noise.get_state(),
        module.net[0].late.get_state(),
    )

    seed_all()  # the same draws, once per batch, without SAM
    plain = Mixup()
    plain.make_optimizer = lambda: torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)  # type: ignore[method-assign]
    fit = trainer()
    fit.fit(_WithoutMixin(plain), loader())
    assert np.array_equal(after[0], np.random.get_state()[1])  # noqa: NPY002
    assert after[1] == random.getstate()
    assert torch.equal(after[2], plain.noise.get_state())
    assert torch.equal(after[3], plain.net[0].late.get_state())
    assert [d[1:] for d in plain.draws] == firsts, "the first pass draws what the same run without SAM draws"


class _WithoutMixin(pl.LightningModule):
    """The Mixup module's training step under plain automatic optimization (no SAMMixin)."""

    def __init__(self, inner: Mixup) -> None:
        super().__init__()
        self.inner = inner

    def on_train_start(self) -> None:
        self.inner.on_train_start()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return Mixup.training_step.__wrapped__(self.inner, batch, batch_idx)  # type: ignore[attr-defined]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.inner.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_the_sharpness_monitor_leaves_every_random_stream_as_it_found_it(tmp_path: Path) -> None:
    """Its measures run the training step on a fixed batch: no stream the training draws from may move."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_sam import SharpnessMonitor

    runs = []
    for monitored in (False, True):
        seed_all()
        module = Mixup()
        measures = ["first_order", "hessian_max_eig"]
        callbacks = [SharpnessMonitor(measures=measures, every_n_steps=2)] if monitored else []
        trainer(callbacks=callbacks, logger=CSVLogger(tmp_path), log_every_n_steps=2).fit(module, loader())
        assert not monitored or callbacks[0].last_values, "it measured"
        streams = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())  # noqa: NPY002
        runs.append((*streams, module.noise.get_state(), module.net[0].late.get_state(), flat_params(module)))
    (numpy, python, *tensors), (numpy_m, python_m, *tensors_m) = runs
    assert np.array_equal(numpy, numpy_m) and python == python_m
    assert all(torch.equal(a, b) for a, b in zip(tensors, tensors_m, strict=True)), "torch's, the module's, weights"


# A SAM without SAMMixin ---------------------------------------------------------------------------------------------


class WithoutMixin(Net):
    """A plain LightningModule returning a SAM (or a variant): the mixin forgotten."""

    def __init__(self, kind: type[SAM], **kwargs: Any) -> None:
        super().__init__()
        self.kind, self.kwargs = kind, kwargs

    def make_optimizer(self) -> torch.optim.Optimizer:
        return self.kind(self.parameters(), torch.optim.SGD, lr=0.1, **self.kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [(SAM, {}), (SAM, {"adaptive": True}), (lightning_sam.LookSAM, {"k": 2}), (lightning_sam.AESAM, {})],
    ids=["sam", "asam", "looksam", "aesam"],
)
def test_a_sam_without_sammixin_is_refused_at_its_first_step_naming_the_fix(kind: type[SAM], kwargs: Any) -> None:
    """Without the mixin the forward runs inside step(closure): SAM would silently train the base optimizer alone."""
    torch.manual_seed(0)
    module = WithoutMixin(kind, **kwargs)
    before = flat_params(module).clone()
    with pytest.raises(MisconfigurationException, match=r"does not use SAMMixin.*class Model\(SAMMixin, pl\.Light"):
        trainer().fit(module, loader())
    assert torch.equal(flat_params(module), before)  # refused before anything moved

    torch.manual_seed(0)
    fixed = type("Fixed", (SAMMixin, WithoutMixin), {})(kind, **kwargs)  # the fix the message names
    trainer().fit(fixed, loader())
    assert fixed.trainer.optimizers[0].steps_taken == 8


def test_an_optimizer_step_that_runs_the_closure_first_is_davda54s_recipe_and_not_refused() -> None:
    """Without the mixin, an optimizer_step override may take the gradient at w itself, then step with the closure."""

    class CustomStep(Net):
        def make_optimizer(self) -> torch.optim.Optimizer:
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            optimizer_closure()  # the gradient at w
            optimizer.step(closure=optimizer_closure)  # SAM runs it again at w + e

    torch.manual_seed(0)
    module = CustomStep()
    trainer().fit(module, loader())
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*GradScaler.*:UserWarning")
def test_without_sammixin_an_fp16_grad_scaler_step_names_sammixin_too() -> None:
    """Lightning's fp16 plugin (and DeepSpeed) runs the closure itself and steps through the scaler without one."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = WithoutMixin(SAM)
    before = flat_params(module).clone()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"needs a closure.*put SAMMixin first.*class Model\(SAMMixin, pl\.Light"):
        trainer(plugins=[plugin]).fit(module, loader())
    assert torch.equal(flat_params(module), before)


def test_manual_optimization_with_a_sam_closure_is_not_mistaken_for_a_missing_mixin() -> None:
    """davda54's closure loop under manual optimization: Lightning wraps the user's closure, not its own."""

    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def make_optimizer(self) -> torch.optim.Optimizer:
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch

            def closure() -> torch.Tensor:
                loss = nn.functional.cross_entropy(self(x), y)
                self.manual_backward(loss)
                return loss

            opt.zero_grad()
            closure()
            opt.step(closure)

    torch.manual_seed(0)
    module = Manual()
    trainer().fit(module, loader())
    torch.testing.assert_close(flat_params(module), reference_sam(), rtol=0, atol=1e-5)
