"""Every Trainer flag and built-in callback on a SAMMixin module, against Lightning's own automatic optimization.

The oracle: SAM with ``rho=0`` takes exactly the base optimizer's steps, so a SAMMixin module with ``rho=0``
must reproduce the plain module's fit bit for bit (weights, optimizer state, learning rates, the hooks called and
in which order, what the loggers got, when training stopped) under every feature. Each test here backs one row of
docs/trainer-features.md. Features whose result SAM changes are also checked with ``rho > 0`` against a reference.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import Net, ResumableLoader, SAMNet, flat_params, loader, trainer
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch import nn

CALLBACK_HOOKS = sorted(name for name in vars(Callback) if name.startswith("on_"))
MODULE_HOOKS = (
    "on_before_zero_grad",
    "optimizer_zero_grad",
    "on_before_backward",
    "backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "optimizer_step",
    "lr_scheduler_step",
)


class HookLog(Callback):
    """Every callback hook, in order, with the step, the learning rate and the weights it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lrs: list[float] = []
        self.weights: list[tuple[str, torch.Tensor]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in CALLBACK_HOOKS:

            def record(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
                self.calls.append((name, trainer.global_step))
                self.weights.append((name, flat_params(trainer.lightning_module).clone()))
                if name == "on_train_batch_start":
                    self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

            return record
        return super().__getattribute__(name)


def logging_module(base: type[Net]) -> type[Net]:
    """``base`` with validation, and every optimization hook of the module recorded (``Net`` or ``SAMNet``).

    The hooks are in the class body, as a user would write them (so SAMMixin wraps them as it wraps theirs).
    """

    def init(self: Any, **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        self.module_calls = []

    def validation_step(self: Any, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def recording(hook: str) -> Callable[..., Any]:
        def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.module_calls.append(hook)
            return getattr(super(logged, self), hook)(*args, **kwargs)

        return recorded

    namespace = {"__init__": init, "validation_step": validation_step}
    namespace.update({hook: recording(hook) for hook in MODULE_HOOKS})
    logged: type[Net] = type(f"Logged{base.__name__}", (base,), namespace)
    return logged


LoggedNet, LoggedSAMNet = logging_module(Net), logging_module(SAMNet)


def fit(
    sam: bool,
    tmp_path: Path,
    trainer_kwargs: dict[str, Any] | None = None,
    module_kwargs: dict[str, Any] | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    module_cls: type[Net] | None = None,
    tune: Callable[[pl.Trainer, pl.LightningModule], Any] | None = None,
) -> dict[str, Any]:
    """One fit of the plain module (``sam=False``) or of its SAM twin with rho=0; everything observable."""
    torch.manual_seed(0)
    cls = module_cls or (LoggedSAMNet if sam else LoggedNet)
    module = cls(**{**({"rho": 0.0} if sam else {}), **(module_kwargs or {})})
    log = HookLog()
    kwargs = {"max_epochs": 2, **(trainer_kwargs or {})}
    root = tmp_path / ("sam" if sam else "plain")
    fit_trainer = trainer(
        default_root_dir=root,
        logger=CSVLogger(root, name="csv"),
        log_every_n_steps=1,
        **{**kwargs, "callbacks": [log, *kwargs.get("callbacks", [])]},
    )
    tuned = tune(fit_trainer, module) if tune is not None else None
    fit_trainer.fit(module, **{"train_dataloaders": loader(), "val_dataloaders": loader(16), **(fit_kwargs or {})})
    optimizer_state = fit_trainer.optimizers[0].state_dict() if fit_trainer.optimizers else {"state": {}}
    logged = []
    if fit_trainer.logger is not None and fit_trainer.logger.log_dir is not None:  # fast_dev_run has no log dir
        with open(Path(fit_trainer.logger.log_dir) / "metrics.csv") as f:
            logged = [{k.replace("lr-SAM", "lr-SGD"): v for k, v in row.items()} for row in csv.DictReader(f)]
    return {
        "params": flat_params(module),
        "momentum": [s["momentum_buffer"] for s in optimizer_state["state"].values()],
        "global_step": fit_trainer.global_step,
        "epoch": fit_trainer.current_epoch,
        "lrs": log.lrs,
        "callback_calls": log.calls,
        "module_calls": getattr(module, "module_calls", None),
        "logged": logged,
        "tuned": tuned,
        "weights": log.weights,
    }


def assert_same_fit(plain: dict[str, Any], sam: dict[str, Any]) -> None:
    assert sam["global_step"] == plain["global_step"]
    assert sam["epoch"] == plain["epoch"]
    assert sam["callback_calls"] == plain["callback_calls"], "the same callback hooks, in the same order"
    assert sam["module_calls"] == plain["module_calls"], "the same module hooks, in the same order"
    assert sam["lrs"] == plain["lrs"], "the same learning rate at every batch"
    assert sam["logged"] == plain["logged"], "the loggers got the same rows, at the same steps"
    assert torch.equal(sam["params"], plain["params"])
    assert len(sam["momentum"]) == len(plain["momentum"])
    assert all(torch.equal(a, b) for a, b in zip(sam["momentum"], plain["momentum"], strict=True))
    assert sam["tuned"] == plain["tuned"]


def fp16() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step_lr_epoch": step_lr,
    "lambda_step_every_2": lambda opt: {
        "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s),
        "interval": "step",
        "frequency": 2,
    },
    "plateau_epoch": lambda opt: {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        "monitor": "val_loss",
    },
    "plateau_step": lambda opt: {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
        "monitor": "val_loss",
        "interval": "step",
        "frequency": 4,
    },
}

# name -> (trainer kwargs, module kwargs). Validation runs every 5 batches: inside accumulation windows too.
FEATURES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {}),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 3, "val_check_interval": 5}, {}),
    "gradient_clip_norm": ({"gradient_clip_val": 0.05}, {}),
    "gradient_clip_value": ({"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}, {}),
    "clip_and_accumulate": ({"gradient_clip_val": 0.05, "accumulate_grad_batches": 2}, {}),
    "gradient_accumulation_scheduler": ({"callbacks": [GradientAccumulationScheduler({0: 1, 1: 3})]}, {}),
    "early_stopping": ({"max_epochs": 6, "callbacks": [EarlyStopping("val_loss", patience=0, min_delta=1.0)]}, {}),
    "learning_rate_monitor": ({"callbacks": [LearningRateMonitor("step")]}, {"scheduler": step_lr}),
    "fast_dev_run": ({"fast_dev_run": True}, {}),
    "overfit_batches": ({"overfit_batches": 2}, {}),
    "limit_and_max_steps": ({"limit_train_batches": 5, "max_steps": 7, "max_epochs": -1}, {}),
    "bf16_mixed": ({"precision": "bf16-mixed"}, {}),
    "fp16_grad_scaler": ({"plugins": [fp16()]}, {}),
    "fp16_accumulate_clip": ({"plugins": [fp16()], "accumulate_grad_batches": 2, "gradient_clip_val": 0.05}, {}),
    "batchnorm_and_dropout": ({}, {"batchnorm": True, "dropout": 0.3}),
    "double_precision": ({"precision": "64-true"}, {}),
    "detect_anomaly": ({"detect_anomaly": True, "max_epochs": 1}, {}),
    "deterministic": ({"deterministic": True}, {}),
    "check_val_every_n_epoch": ({"check_val_every_n_epoch": 2, "max_epochs": 3}, {}),
    **{f"scheduler_{name}": ({"val_check_interval": 4}, {"scheduler": make}) for name, make in SCHEDULERS.items()},
}


# Lightning's own advice when accumulating with an overridden optimizer_step (the recorded hooks override it).
@pytest.mark.filterwarnings("ignore:When using `Trainer.accumulate_grad_batches != 1.` and overriding:UserWarning")
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_rho_zero_fit_equals_automatic_optimization_bitwise(feature: str, tmp_path: Path) -> None:
    trainer_kwargs, module_kwargs = FEATURES[feature]
    # fp16 plugins hold a GradScaler: each fit gets its own.
    plain = fit(False, tmp_path, copy.deepcopy(trainer_kwargs), module_kwargs)
    sam = fit(True, tmp_path, copy.deepcopy(trainer_kwargs), module_kwargs)
    assert plain["global_step"] > 0
    assert_same_fit(plain, sam)


# Tuner, SWA and the module's own optimization hooks ----------------------------------------------------------------


def lr_find(fit_trainer: pl.Trainer, module: pl.LightningModule) -> Any:
    finder = Tuner(fit_trainer).lr_find(
        module,
        train_dataloaders=loader(256),
        val_dataloaders=loader(16),
        min_lr=1e-4,
        max_lr=1.0,
        num_training=20,
        update_attr=True,
    )
    assert finder is not None
    return finder.results, finder.suggestion(), module.lr


def scale_batch_size(fit_trainer: pl.Trainer, module: pl.LightningModule) -> Any:
    return Tuner(fit_trainer).scale_batch_size(module, mode="power", init_val=2, max_trials=3)


def batch_size_module(base: type[Net]) -> type[Net]:
    class WithBatchSize(base):  # type: ignore[valid-type,misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.batch_size = 2

        def train_dataloader(self) -> Any:
            return loader(batch_size=self.batch_size)

        def val_dataloader(self) -> Any:
            return loader(16)

    return WithBatchSize


def test_lr_find_and_its_suggestion_equal_automatic_optimization(tmp_path: Path) -> None:
    plain = fit(False, tmp_path, tune=lr_find)
    sam = fit(True, tmp_path, tune=lr_find)
    assert_same_fit(plain, sam)


def test_lr_find_sweeps_the_learning_rate_with_sam(tmp_path: Path) -> None:
    """Lightning installs its own scheduler for the sweep; a SAM module must follow it (it stayed at min_lr)."""
    torch.manual_seed(0)
    module = SAMNet(rho=0.05)
    finder = Tuner(trainer(default_root_dir=tmp_path)).lr_find(
        module, train_dataloaders=loader(256), min_lr=1e-4, max_lr=1.0, num_training=20
    )
    assert finder is not None
    lrs = finder.results["lr"]
    assert len(lrs) == 20 and lrs == sorted(lrs) and lrs[-1] > 100 * lrs[0], "the sweep raised the lr"
    assert finder.suggestion() not in (None, lrs[0])


def test_batch_size_finder_equals_automatic_optimization(tmp_path: Path) -> None:
    kwargs = {"fit_kwargs": {"train_dataloaders": None, "val_dataloaders": None}, "tune": scale_batch_size}
    plain = fit(False, tmp_path, module_cls=batch_size_module(LoggedNet), **kwargs)  # type: ignore[arg-type]
    sam = fit(True, tmp_path, module_cls=batch_size_module(LoggedSAMNet), **kwargs)  # type: ignore[arg-type]
    assert plain["tuned"] >= 8, "the finder doubled the batch size from 2"
    assert_same_fit(plain, sam)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_stochastic_weight_averaging_applies_its_schedule_and_batchnorm_epoch(rho: float, tmp_path: Path) -> None:
    def swa() -> dict[str, Any]:
        swa_callback = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
        return {"max_epochs": 3, "callbacks": [swa_callback]}

    plain = fit(False, tmp_path, swa(), {"batchnorm": True})
    sam = fit(True, tmp_path, swa(), {"batchnorm": True, "rho": rho})
    assert 0.05 in plain["lrs"], "SWA's schedule reached its lr"
    assert sam["lrs"] == plain["lrs"], "the same SWA learning rates with SAM"
    if rho == 0.0:
        assert_same_fit(plain, sam)
    else:
        assert not torch.equal(sam["params"], plain["params"])


def warm_up(base: type[Net]) -> type[Net]:
    """The LR warm-up recipe of Lightning's docs: an overridden optimizer_step."""

    class WarmUp(base):  # type: ignore[valid-type,misc]
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            optimizer.step(closure=optimizer_closure)
            if self.trainer.global_step < 5:
                scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
                for group in optimizer.param_groups:
                    group["lr"] = scale * self.lr

    return WarmUp


def zero_grad_to_zeros(base: type[Net]) -> type[Net]:
    class ZeroToZeros(base):  # type: ignore[valid-type,misc]
        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad(set_to_none=False)

    return ZeroToZeros


@pytest.mark.parametrize("override", [warm_up, zero_grad_to_zeros])
def test_overridden_optimizer_step_and_zero_grad_run_as_lightning_documents(
    override: Callable[[type[Net]], type[Net]], tmp_path: Path
) -> None:
    plain = fit(False, tmp_path, {"accumulate_grad_batches": 2}, module_cls=override(LoggedNet))
    sam = fit(True, tmp_path, {"accumulate_grad_batches": 2}, module_cls=override(LoggedSAMNet))
    assert_same_fit(plain, sam)
    if override is warm_up:
        assert plain["lrs"][:4] == pytest.approx([0.1, 0.1, 0.02, 0.02]), (
            "the warm-up's learning rates (accumulating 2)"
        )
        sam_rho = fit(
            True,
            tmp_path / "rho",
            {"accumulate_grad_batches": 2},
            {"rho": 0.05},
            module_cls=override(LoggedSAMNet),
        )
        assert sam_rho["lrs"] == plain["lrs"]


def iterating(base: type[Net]) -> type[Net]:
    """``training_step(self, dataloader_iter)``: the step pulls its batch itself."""

    class Iterating(base):  # type: ignore[valid-type,misc]
        def training_step(self, dataloader_iter: Any) -> Any:  # type: ignore[override]
            (x, y), _, _ = next(dataloader_iter)
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, batch_size=len(x))
            return loss

    return Iterating


@pytest.mark.filterwarnings("ignore:You are using the `dataloader_iter` step flavor")
@pytest.mark.filterwarnings("ignore:Found `dataloader_iter` argument in the `training_step`")
def test_dataloader_iter_steps_see_one_batch_in_both_passes(tmp_path: Path) -> None:
    plain = fit(False, tmp_path, module_cls=iterating(LoggedNet))
    sam = fit(True, tmp_path, module_cls=iterating(LoggedSAMNet))
    assert plain["global_step"] == 16
    assert_same_fit(plain, sam)
    with_batches = fit(True, tmp_path / "batches", module_kwargs={"rho": 0.05}, module_cls=LoggedSAMNet)
    with_iterator = fit(True, tmp_path / "iter", module_kwargs={"rho": 0.05}, module_cls=iterating(LoggedSAMNet))
    assert with_iterator["global_step"] == 16, "no batch is lost to the second pass"
    assert torch.equal(with_iterator["params"], with_batches["params"])


# What the hooks see with rho > 0 ------------------------------------------------------------------------------------


def test_hooks_see_the_weights_w_and_the_gradient_the_optimizer_steps_with(tmp_path: Path) -> None:
    grads_at_step: list[torch.Tensor] = []

    class Watch(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
            grads_at_step.append(torch.cat([p.grad.flatten() for p in module.parameters()]))

    sam = fit(True, tmp_path, {"callbacks": [Watch()], "max_epochs": 1}, {"rho": 0.05})
    batch_start = [w for name, w in sam["weights"] if name == "on_train_batch_start"]
    for hook in ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step"):
        at_hook = [w for name, w in sam["weights"] if name == hook]
        assert len(at_hook) == len(batch_start) == 8, hook
        assert all(torch.equal(a, b) for a, b in zip(at_hook, batch_start, strict=True)), f"{hook} sees w"
    assert sam["module_calls"].count("backward") == 8, "the backward hook runs once per batch (the second pass)"

    # The gradient that on_before_optimizer_step sees is the one at w + e, for each batch.
    for w, seen, (x, y) in zip(batch_start, grads_at_step, loader(), strict=True):
        model = Net()
        torch.nn.utils.vector_to_parameters(w, model.parameters())
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(model.parameters(), g, strict=True):
                p.add_(0.05 * t / (norm + 1e-12))
        expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        torch.testing.assert_close(seen, torch.cat([t.flatten() for t in expected]), rtol=0, atol=1e-6)


# Checkpoints -------------------------------------------------------------------------------------------------------


def full_state(fit_trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    scaler = getattr(fit_trainer.precision_plugin, "scaler", None)
    return {
        "params": flat_params(module).clone(),
        "optimizer": copy.deepcopy(fit_trainer.optimizers[0].state_dict()),
        "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in fit_trainer.lr_scheduler_configs],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "global_step": fit_trainer.global_step,
    }


def assert_states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"]
    assert torch.equal(a["params"], b["params"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["schedulers"] == b["schedulers"]
    assert a["scaler"] == b["scaler"]


def two_schedulers(opt: torch.optim.Optimizer) -> Any:
    step = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.95**s)
    return {"scheduler": step, "interval": "step"}


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize("module_cls", [Net, SAMNet])
@pytest.mark.parametrize("precision", ["32", "fp16"])
def test_resume_on_an_optimizer_step_boundary_mid_epoch_is_bitwise_exact(
    module_cls: type[Net], precision: str, tmp_path: Path
) -> None:
    def run(max_steps: int, callbacks: list[Callback], ckpt_path: Path | None = None) -> dict[str, Any]:
        torch.manual_seed(0)
        module = module_cls(scheduler=two_schedulers)
        fit_trainer = trainer(
            max_steps=max_steps,
            max_epochs=-1,
            accumulate_grad_batches=2,
            plugins=[fp16()] if precision == "fp16" else [],
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
        )
        fit_trainer.fit(module, ResumableLoader(), ckpt_path=ckpt_path)
        return full_state(fit_trainer, module)

    uninterrupted = run(7, [])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    run(3, [checkpoint])  # optimizer step 3 ends at batch 6 of 8: mid-epoch
    resumed = run(7, [], ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert_states_equal(resumed, uninterrupted)


class SaveInsideTheWindow(Callback):
    """Saves a checkpoint after batch 2 with accumulate_grad_batches=2: one micro-batch of a window is in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == 2:
            trainer.save_checkpoint(self.path)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.filterwarnings("ignore:When using `Trainer.accumulate_grad_batches != 1.` and overriding:UserWarning")
def test_a_checkpoint_inside_an_accumulation_window_resumes_as_lightning_does(tmp_path: Path) -> None:
    runs = {}
    for sam in (False, True):
        path = tmp_path / f"window-{sam}.ckpt"
        fit(sam, tmp_path / f"first-{sam}", {"callbacks": [SaveInsideTheWindow(path)], "accumulate_grad_batches": 2})
        runs[sam] = fit(
            sam,
            tmp_path / f"resumed-{sam}",
            {"accumulate_grad_batches": 2},
            fit_kwargs={"train_dataloaders": ResumableLoader(), "ckpt_path": path},
        )
    assert runs[False]["global_step"] == 8
    assert_same_fit(runs[False], runs[True])


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resume_with_a_plateau_scheduler_waits_for_its_metric_like_lightning(tmp_path: Path) -> None:
    runs = {}
    plateau = SCHEDULERS["plateau_epoch"]
    for sam in (False, True):
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{sam}", every_n_train_steps=5, save_top_k=-1)
        first = {"callbacks": [ckpt], "enable_checkpointing": True, "max_epochs": 2}
        fit(sam, tmp_path / f"first-{sam}", first, {"scheduler": plateau})
        runs[sam] = fit(
            sam,
            tmp_path / f"resumed-{sam}",
            {"max_epochs": 4},
            {"scheduler": plateau},
            fit_kwargs={
                "train_dataloaders": ResumableLoader(),
                "ckpt_path": tmp_path / f"ckpt-{sam}" / "epoch=0-step=5.ckpt",
            },
        )
    assert len(set(runs[False]["lrs"])) > 1, "the plateau scheduler cut the lr after the resume"
    assert_same_fit(runs[False], runs[True])
