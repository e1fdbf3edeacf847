"""`SAMMixin` inside real Trainer fits (CPU), against plain-loop references."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import pytorch_optimizer
import torch
import torchmetrics
from helpers import Net, SAMNet, batches, flat_params, loader, trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sam import SAM, SAMMixin, SAMStep


def seeded(cls: type[pl.LightningModule], **kwargs: Any) -> Any:
    torch.manual_seed(0)
    return cls(**kwargs)


def fp16_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def reference_sam(
    epochs: int = 1,
    batch_size: int = 8,
    accumulate: int = 1,
    clip: tuple[str, float] | None = None,
    n: int = 64,
) -> nn.Module:
    """A plain loop with pytorch_optimizer.SAM (its first/second_step) over the same batches."""
    model = seeded(Net)
    opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    params = list(model.parameters())
    for _ in range(epochs):
        data = batches(n, batch_size)
        for start in range(0, len(data), accumulate):
            group = data[start : start + accumulate]
            total = [torch.zeros_like(p) for p in params]
            for x, y in group:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
                total = [t + p.grad for t, p in zip(total, params, strict=True)]
                for p in params:  # restore w exactly (second_step without its base step)
                    p.data = opt.state[p].pop("old_p")
            for p, t in zip(params, total, strict=True):
                p.grad = t
            if clip is not None:
                algorithm, value = clip
                if algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(params, value)
                else:
                    torch.nn.utils.clip_grad_value_(params, value)
            opt.base_optimizer.step()
    return model


# 1. Same update as the reference --------------------------------------------------------------------------


def test_fit_matches_pytorch_optimizer_sam_in_a_plain_loop() -> None:
    model = seeded(SAMNet)
    fit = trainer(max_epochs=2)
    fit.fit(model, loader())
    assert fit.global_step == 16
    torch.testing.assert_close(flat_params(model), flat_params(reference_sam(epochs=2)), rtol=0, atol=1e-5)


class OwnStep(SAMMixin, pl.LightningModule):
    """The usual form: the mixin first, the module's own training_step returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net().net

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.net(x), y), "extra": batch_idx}

    def configure_optimizers(self) -> Any:
        opt = SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=100)]


def test_own_training_step_returning_a_dict_and_list_form_optimizers() -> None:
    model = OwnStep()
    trainer().fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference_sam()), rtol=0, atol=1e-5)


class SubclassCallsSuper(OwnStep):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls = getattr(self, "calls", 0) + 1
        return super().training_step(batch, batch_idx)


def test_subclass_calling_super_training_step_runs_sam_once() -> None:
    model = SubclassCallsSuper()
    fit = trainer()
    fit.fit(model, loader())
    assert model.calls == 16, "two passes per batch, not four"
    assert fit.global_step == 8
    torch.testing.assert_close(flat_params(model), flat_params(reference_sam()), rtol=0, atol=1e-5)


# 2. Side effects once per batch ------------------------------------------------------------------------------


class Observed(SAMNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean_loss = torchmetrics.MeanMetric()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.log_calls: list[str] = []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.log_calls.append(name)
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.mean_loss.update(loss)
        self.log("acc", self.accuracy(logits, y), on_step=True)
        self.log_dict({"train_loss": loss}, on_step=True)
        return loss


class RecordAfterBatch(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.rows.append({"metrics": dict(trainer.callback_metrics), "stats": dict(pl_module.sam_stats)})


def test_logging_and_metrics_come_from_the_unperturbed_pass_only() -> None:
    model, record = seeded(Observed), RecordAfterBatch()
    trainer(callbacks=[record]).fit(model, loader())
    assert model.log_calls == ["acc", "train_loss"] * 8, "self.log (and log_dict) run once per batch"
    assert model.mean_loss.update_count == 8
    assert model.accuracy.update_count == 8
    losses = torch.stack([row["stats"]["loss"] for row in record.rows])
    torch.testing.assert_close(model.mean_loss.compute(), losses.mean())
    for row in record.rows:
        stats = row["stats"]
        assert torch.equal(row["metrics"]["train_loss"], stats["loss"])
        assert not torch.equal(stats["perturbed_loss"], stats["loss"])
        torch.testing.assert_close(stats["first_order_sharpness"], stats["perturbed_loss"] - stats["loss"])
        assert stats["grad_norm"] > 0


# 3. Same randomness in both passes ----------------------------------------------------------------------------


class MaskRecorder(SAMNet):
    def __init__(self, same_randomness: bool) -> None:
        super().__init__(dropout=0.5)
        self.sam_same_randomness = same_randomness
        self.masks: list[tuple[bool, torch.Tensor]] = []
        self.net[-2].register_forward_hook(lambda _m, _i, out: self.masks.append((self.sam_second_pass, out == 0)))


class DropoutNet(Net):
    def __init__(self) -> None:
        super().__init__(dropout=0.5)


class RngAfterBatch(Callback):
    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.states.append(torch.get_rng_state())


def test_both_passes_see_the_same_dropout_masks_and_rng_advances_once() -> None:
    torch.manual_seed(0)
    model, rng = MaskRecorder(same_randomness=True), RngAfterBatch()
    trainer(callbacks=[rng]).fit(model, loader())
    assert [second for second, _ in model.masks] == [False, True] * 8
    for (_, first), (_, second) in zip(model.masks[::2], model.masks[1::2], strict=True):
        assert torch.equal(first, second)

    plain_rng = RngAfterBatch()
    torch.manual_seed(0)
    trainer(callbacks=[plain_rng]).fit(DropoutNet(), loader())
    assert all(torch.equal(a, b) for a, b in zip(rng.states, plain_rng.states, strict=True))


def test_independent_randomness_when_turned_off() -> None:
    model = MaskRecorder(same_randomness=False)
    trainer().fit(model, loader())
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(model.masks[::2], model.masks[1::2], strict=True))


# 4. BatchNorm ---------------------------------------------------------------------------------------------------


def test_batchnorm_keeps_the_statistics_of_the_first_pass_bitwise() -> None:
    model = seeded(SAMNet, batchnorm=True)
    bn = model.net[1]
    after_first_pass: list[list[torch.Tensor]] = []
    bn.register_forward_hook(
        lambda m, _i, _o: (
            None
            if model.sam_second_pass
            else after_first_pass.append([m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()])
        )
    )

    class Check(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            expected = after_first_pass[-1]
            assert torch.equal(bn.running_mean, expected[0])
            assert torch.equal(bn.running_var, expected[1])
            assert torch.equal(bn.num_batches_tracked, expected[2])

    trainer(callbacks=[Check()]).fit(model, loader())
    assert len(after_first_pass) == 8
    assert int(bn.num_batches_tracked) == 8


def test_sync_batchnorm_is_handled_like_batchnorm() -> None:
    model = seeded(SAMNet, batchnorm=True)
    model.net[1] = nn.SyncBatchNorm.convert_sync_batchnorm(model.net[1])  # falls back to BN on one process
    trainer(max_steps=3).fit(model, loader())
    assert int(model.net[1].num_batches_tracked) == 3


# 5. Mixed precision -------------------------------------------------------------------------------------------


class Poisoned(SAMNet):
    """Makes one pass of one batch non-finite."""

    def __init__(self, bad_batch: int, bad_pass: str) -> None:
        super().__init__()
        self.bad_batch, self.bad_pass = bad_batch, bad_pass

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        bad = self.sam_second_pass == (self.bad_pass == "second")
        if batch_idx == self.bad_batch and bad:
            loss = loss * math.inf
        return loss


class Snapshots(Callback):
    def __init__(self) -> None:
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    @staticmethod
    def state(trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return (
            flat_params(module).clone(),
            copy.deepcopy(trainer.optimizers[0].state_dict()),
            scaler.get_scale() if scaler is not None else None,
        )

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.before[idx] = self.state(trainer, module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, out: Any, b: Any, idx: int) -> None:
        self.after[idx] = self.state(trainer, module)


def assert_same_state(a: Any, b: Any) -> None:
    assert torch.equal(a[0], b[0])
    for (ka, va), (kb, vb) in zip(a[1]["state"].items(), b[1]["state"].items(), strict=True):
        assert ka == kb
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])


@pytest.mark.parametrize("bad_pass", ["first", "second"])
def test_fp16_non_finite_gradient_skips_the_whole_step_and_backs_off(bad_pass: str) -> None:
    model, snaps = Poisoned(bad_batch=3, bad_pass=bad_pass), Snapshots()
    fit = trainer(plugins=[fp16_plugin()], callbacks=[snaps])
    fit.fit(model, loader())
    before, after = snaps.before[3], snaps.after[3]
    assert_same_state(before, after)
    assert after[2] == before[2] * 0.5, "the GradScaler backs off"
    assert not torch.equal(snaps.before[4][0], snaps.after[4][0]), "training goes on"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_and_bf16_train_to_finite_weights_close_to_fp32() -> None:
    reference = flat_params(reference_sam())
    for precision in ({"plugins": [fp16_plugin()]}, {"precision": "bf16-mixed"}):
        model = seeded(SAMNet)
        trainer(**precision).fit(model, loader())
        assert torch.isfinite(flat_params(model)).all()
        torch.testing.assert_close(flat_params(model), reference, rtol=0, atol=0.05)


def test_plain_16_mixed_on_cpu_is_not_what_we_test() -> None:
    """A reminder with teeth: on CPU `precision='16-mixed'` has no GradScaler, so fp16 tests use the plugin."""
    fit = trainer(plugins=[fp16_plugin()])
    assert fit.precision_plugin.scaler is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad_pass", ["first", "second"])
def test_fp32_non_finite_loss_skips_with_a_warning(bad_pass: str) -> None:
    model, snaps = Poisoned(bad_batch=2, bad_pass=bad_pass), Snapshots()
    fit = trainer(callbacks=[snaps])
    with pytest.warns(RuntimeWarning, match="gradient is not finite.*skipped"):
        fit.fit(model, loader())
    assert_same_state(snaps.before[2], snaps.after[2])
    assert fit.global_step == 8, "a skipped step counts, as Lightning counts a GradScaler's skipped step"


def test_fp32_non_finite_loss_raises_when_configured() -> None:
    model = Poisoned(bad_batch=2, bad_pass="first")
    model.sam_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="gradient is not finite"):
        trainer().fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


class NaNGradientFiniteLoss(SAMNet):
    """At w + e of batch 2 the loss is finite but its gradient is not (sqrt at 0)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 2 and self.sam_second_pass:
            loss = loss + torch.sqrt(self.net[0].weight.sum() * 0.0)
        return loss


def test_fp32_finite_loss_with_a_non_finite_gradient_is_skipped_not_stepped() -> None:
    model, snaps = seeded(NaNGradientFiniteLoss), Snapshots()
    with pytest.warns(RuntimeWarning, match="gradient is not finite"):
        trainer(callbacks=[snaps]).fit(model, loader())
    assert_same_state(snaps.before[2], snaps.after[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())


class WatchSecondPassWeights(SAMNet):
    """Records whether the weights were finite whenever the second pass ran."""

    def __init__(self) -> None:
        super().__init__()
        self.second_pass_finite: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.sam_second_pass:
            self.second_pass_finite.append(all(bool(torch.isfinite(p).all()) for p in self.parameters()))
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 3 and not self.sam_second_pass:
            loss = loss * 1e30  # the fp16 scaler's scale times this overflows: an inf norm in the first pass
        return loss


def test_fp16_inf_first_pass_never_writes_nan_into_the_weights() -> None:
    model, snaps = seeded(WatchSecondPassWeights), Snapshots()
    trainer(plugins=[fp16_plugin()], callbacks=[snaps]).fit(model, loader())
    assert model.second_pass_finite == [True] * 8, "the weights were finite in every second pass"
    assert_same_state(snaps.before[3], snaps.after[3])
    assert snaps.after[3][2] == snaps.before[3][2] * 0.5, "the GradScaler backs off"


# 7. Gradient accumulation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected_steps"), [(64, 4), (48, 3), (56, 4)])
def test_accumulation_perturbs_each_micro_batch_and_steps_once_per_k(n: int, expected_steps: int) -> None:
    model = seeded(SAMNet)
    fit = trainer(accumulate_grad_batches=2)
    fit.fit(model, loader(n))
    assert fit.global_step == expected_steps  # the incomplete last group (n=56: 7 batches) steps at the epoch end
    torch.testing.assert_close(flat_params(model), flat_params(reference_sam(accumulate=2, n=n)), rtol=0, atol=1e-5)


# 8. Gradient clipping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 0.1), ("value", 0.01)])
def test_clipping_of_the_final_unscaled_gradient(algorithm: str, value: float) -> None:
    model = seeded(SAMNet)
    trainer(gradient_clip_val=value, gradient_clip_algorithm=algorithm).fit(model, loader())
    expected = reference_sam(clip=(algorithm, value))
    torch.testing.assert_close(flat_params(model), flat_params(expected), rtol=0, atol=1e-5)
    assert not torch.allclose(flat_params(model), flat_params(reference_sam()), rtol=0, atol=1e-4), "clipping bit"


def test_clipping_under_fp16_sees_unscaled_gradients() -> None:
    norms: list[float] = []

    class Spy(SAMNet):
        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])))
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    model = seeded(Spy)
    trainer(plugins=[fp16_plugin()], max_steps=3, gradient_clip_val=0.1).fit(model, loader())
    assert len(norms) == 3
    assert all(0 < n < 10 for n in norms), f"unscaled gradient norms are O(1), got {norms}"


def test_accumulation_and_clipping_together_match_the_reference() -> None:
    model = seeded(SAMNet)
    trainer(accumulate_grad_batches=2, gradient_clip_val=0.1).fit(model, loader())
    expected = reference_sam(accumulate=2, clip=("norm", 0.1))
    torch.testing.assert_close(flat_params(model), flat_params(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting", ["sam_accumulate_grad_batches", "sam_gradient_clip_val"])
def test_the_removed_settings_point_to_the_trainer_flags(setting: str) -> None:
    model = SAMNet()
    setattr(model, setting, 2)
    with pytest.raises(MisconfigurationException, match=f"`{setting}` is gone.*Trainer"):
        trainer().fit(model, loader())


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


# 11. Bad input ------------------------------------------------------------------------------------------------------


class TwoOptimizers(SAMNet):
    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        return [
            SAM(params[:2], torch.optim.SGD, lr=0.1),
            SAM(params[2:], torch.optim.SGD, lr=0.1),
        ]


class PlainOptimizer(SAMNet):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoLossInTheSecondPass(SAMNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return None if self.sam_second_pass else loss


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (TwoOptimizers(), MisconfigurationException, "exactly one optimizer.*returned 2"),
        (PlainOptimizer(), MisconfigurationException, "lightning_sam.SAM, got SGD"),
        (NoLossInTheSecondPass(), MisconfigurationException, "must return the loss"),
        (SAMNet(rho=-1.0), ValueError, "Invalid rho"),
    ],
)
def test_bad_configurations_raise_clear_errors(model: pl.LightningModule, error: type[Exception], match: str) -> None:
    start = flat_params(model).clone()
    with pytest.raises(error, match=match):
        trainer().fit(model, loader())
    assert torch.equal(flat_params(model), start), "the weights are not left perturbed"


@pytest.mark.parametrize(
    ("setting", "value"),
    [("sam_nonfinite", "ignore"), ("sam_sync_ascent", "yes"), ("sam_same_randomness", 1)],
)
def test_bad_settings_raise_before_training(setting: str, value: Any) -> None:
    model = SAMNet()
    setattr(model, setting, value)
    with pytest.raises(MisconfigurationException, match=setting):
        trainer().fit(model, loader())


class PlainReturnsNoneOnBatchTwo(Net):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx == 2 else super().training_step(batch, batch_idx)


class ReturnsNoneOnBatchTwo(SAMMixin, PlainReturnsNoneOnBatchTwo):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return SAMNet.make_optimizer(self)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_training_step_returning_none_skips_the_batch_as_lightning_does() -> None:
    finals = []
    for rho in (0.0, 0.05):
        model = seeded(ReturnsNoneOnBatchTwo, rho=rho)
        trainer().fit(model, loader())
        finals.append(flat_params(model))
    plain = seeded(PlainReturnsNoneOnBatchTwo)
    trainer().fit(plain, loader())
    assert torch.equal(finals[0], flat_params(plain))
    assert not torch.equal(finals[1], flat_params(plain))


class ManualSAM(pl.LightningModule):
    """Manual optimization: no SAMMixin, SAMStep in the module's own training_step (the refusal's recipe)."""

    def __init__(self, mixin: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = Net().net

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        step = SAMStep(opt.optimizer, self, backward=self.manual_backward)
        step.run(lambda: nn.functional.cross_entropy(self.net(x), y))
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self) -> Any:
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


class ManualWithMixin(SAMMixin, ManualSAM):
    pass


def test_manual_optimization_uses_sam_step_and_the_mixin_refuses_it_with_that_recipe() -> None:
    model = ManualSAM()
    trainer().fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference_sam()), rtol=0, atol=1e-5)
    with pytest.raises(MisconfigurationException, match=r"automatic_optimization = False.*SAMStep\(opt, self"):
        trainer().fit(ManualWithMixin(), loader())


# 12. Interop ------------------------------------------------------------------------------------------------------


class WithValidation(SAMNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), prog_bar=True)


def test_callbacks_validation_and_progress_bar(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    fit = trainer(
        max_epochs=3,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=True,
        enable_progress_bar=True,
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", patience=5), LearningRateMonitor("step")],
        log_every_n_steps=1,
    )
    model = seeded(WithValidation, scheduler=step_lr)
    fit.fit(model, loader(), loader(16))
    assert fit.global_step == 24
    assert checkpoint.best_model_path
    restored = WithValidation.load_from_checkpoint(checkpoint.best_model_path)
    assert isinstance(restored, SAMMixin)
    metrics = (Path(fit.logger.log_dir) / "metrics.csv").read_text()  # type: ignore[union-attr]
    assert "lr-SAM" in metrics
    assert "val_loss" in metrics


def test_lightning_cli_fits_a_sam_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli.py"])

    class DataModule(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            return loader()

    cli = LightningCLI(
        SAMNet,
        DataModule,
        run=False,
        seed_everything_default=False,
        args=[
            "--model.rho=0.1",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.rho == 0.1
    assert cli.trainer.global_step == 8
    assert cli.trainer.optimizers[0].param_groups[0]["rho"] == 0.1


class FailsInSecondPass(SAMNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == 2 and self.sam_second_pass:
            raise RuntimeError("boom in the second pass")
        return super().training_step(batch, batch_idx)


def test_an_error_in_the_second_pass_leaves_the_weights_at_w() -> None:
    model, snaps = seeded(FailsInSecondPass), Snapshots()
    with pytest.raises(RuntimeError, match="boom in the second pass"):
        trainer(callbacks=[snaps]).fit(model, loader())
    assert torch.equal(flat_params(model), snaps.before[2][0])
    assert not model.trainer.optimizers[0].is_perturbed


@pytest.mark.parametrize("precision", [{}, {"plugins": [fp16_plugin()]}])
def test_sam_stats_grad_norm_is_of_the_loss_with_accumulation(precision: dict[str, Any]) -> None:
    norms = {}
    for k in (1, 2):
        model, record = seeded(SAMNet), RecordAfterBatch()
        trainer(max_steps=1, callbacks=[record], accumulate_grad_batches=k, **precision).fit(model, loader())
        norms[k] = record.rows[0]["stats"]["grad_norm"]
    torch.testing.assert_close(norms[2], norms[1])  # the same first batch, the same weights
