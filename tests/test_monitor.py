"""`SharpnessMonitor` in real fits: accuracy, observing only, loggers (W&B offline), AMP, checkpoints, errors."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from helpers import Net, SAMNet, flat_params, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sam import SharpnessMonitor
from lightning_sam.measures import MEASURES

ALL = [m for m in MEASURES if m not in ("preconditioned_max_eig", "sam_eos_ratio", "sam_fraction")]  # an SGD run's
ERROR_BARS = {
    "hessian_max_eig": ["hessian_max_eig", "hessian_max_eig_residual"],
    "hessian_top_eigs": [f"hessian_eig_{i}{end}" for i in (1, 2, 3) for end in ("", "_residual")],
    "preconditioned_max_eig": ["preconditioned_max_eig", "preconditioned_max_eig_residual"],
    "hessian_trace": ["hessian_trace", "hessian_trace_stderr"],
}


def logged_keys(measures: list[str]) -> set[str]:
    """What the measures log with the default top_k=3: each its value, and its error bar where it has one."""
    return {f"sharpness/{key}" for m in measures for key in ERROR_BARS.get(m, [m])}


class Recording(SharpnessMonitor):
    """Keeps every logged row, and what went into the cross-rank reduction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.reduced_inputs: list[torch.Tensor] = []

    def _log(
        self, trainer: pl.Trainer, keys: dict[str, Any], values: dict[str, torch.Tensor], error: Any = None
    ) -> None:
        if values:
            self.reduced_inputs.append(torch.stack([v.reshape(()) for v in values.values()]))
        super()._log(trainer, keys, values, error)
        if values:
            self.rows.append((trainer.global_step, {k: self.last_values[f"sharpness/{k}"] for k in values}))


def csv_logger(tmp_path: Path) -> CSVLogger:
    return CSVLogger(tmp_path, name="csv")


# 1. Accuracy -------------------------------------------------------------------------------------------------------


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def exact_hessian(module: Tiny, batch: Any) -> torch.Tensor:
    x, y = batch
    params = dict(module.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        out = torch.func.functional_call(module, dict(zip(names, tensors, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([p.detach().flatten() for p in params.values()])
    return torch.autograd.functional.hessian(loss_of, flat)


def test_logged_hessian_measures_match_the_exact_hessian(tmp_path: Path) -> None:
    module = Tiny().double()
    monitor = SharpnessMonitor(measures=["hessian_max_eig", "hessian_trace", "eos_ratio"], every_n_steps=3)
    fit = trainer(max_epochs=2, precision="64-true", logger=csv_logger(tmp_path), callbacks=[monitor])
    fit.fit(module, loader())
    hessian = exact_hessian(module, monitor.fixed_batch)  # the monitor's last point is at the final weights
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()].item()
    assert monitor.last_values["sharpness/hessian_max_eig"] == pytest.approx(top, rel=0.01)
    assert monitor.last_values["sharpness/hessian_trace"] == pytest.approx(torch.trace(hessian).item(), rel=0.1)
    assert monitor.last_values["sharpness/eos_ratio"] == pytest.approx(top * 0.1 / 2, rel=0.01)


class TinyAdam(Tiny):
    """Two parameter groups (learning rates 1e-2 and 5e-3): the step S = diag(lr_g) P⁻¹ differs per group."""

    def configure_optimizers(self) -> Any:
        first, second = self.net[0], self.net[2]
        return torch.optim.AdamW(
            [{"params": first.parameters()}, {"params": second.parameters(), "lr": 5e-3}], lr=1e-2, betas=(0.9, 0.99)
        )


def test_adam_preconditioned_sharpness_and_its_edge_of_stability_match_the_exact_hessian(tmp_path: Path) -> None:
    module = TinyAdam().double()
    measures = ["hessian_top_eigs", "preconditioned_max_eig", "eos_ratio"]
    monitor = SharpnessMonitor(measures=measures, every_n_steps=3, top_k=2)
    fit = trainer(max_epochs=3, precision="64-true", logger=csv_logger(tmp_path), callbacks=[monitor])
    fit.fit(module, loader())
    hessian = exact_hessian(module, monitor.fixed_batch)
    optimizer = fit.optimizers[0]
    p_diag, lrs = [], []
    for group in optimizer.param_groups:  # P = (1 - β1^t)(sqrt(v / (1 - β2^t)) + ε), by hand
        (beta1, beta2), eps = group["betas"], group["eps"]
        for p in group["params"]:
            state, t = optimizer.state[p], float(optimizer.state[p]["step"])
            p_diag.append(((1 - beta1**t) * ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)).flatten())
            lrs.append(torch.full((p.numel(),), group["lr"], dtype=torch.float64))
    p_inv, step = 1 / torch.cat(p_diag), torch.cat(lrs) / torch.cat(p_diag)
    preconditioned = torch.linalg.eigvals(torch.diag(p_inv) @ hessian).real.max().item()
    at_the_edge = torch.linalg.eigvals(torch.diag(step) @ hessian).real.max().item() / ((2 + 2 * 0.9) / (1 - 0.9))
    values = monitor.last_values
    assert values["sharpness/preconditioned_max_eig"] == pytest.approx(preconditioned, rel=0.01)
    assert values["sharpness/eos_ratio"] == pytest.approx(at_the_edge, rel=0.01)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    assert [values["sharpness/hessian_eig_1"], values["sharpness/hessian_eig_2"]] == pytest.approx(
        exact[:2].tolist(), rel=0.01
    )
    assert 0 < values["sharpness/hessian_eig_1_residual"] <= 0.01


class TwoBlocks(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.net(x)))  # type: ignore[no-any-return]


def test_per_module_measures_each_top_level_block_of_the_hessian(tmp_path: Path) -> None:
    module = TwoBlocks().double()
    monitor = SharpnessMonitor(measures=["hessian_max_eig", "hessian_trace"], every_n_steps=3, per_module=True)
    fit = trainer(max_epochs=1, precision="64-true", logger=csv_logger(tmp_path), callbacks=[monitor])
    fit.fit(module, loader())
    hessian = exact_hessian(module, monitor.fixed_batch)
    sizes = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    start = 0
    for name in ("net", "head"):  # the parameters' order in named_parameters
        block = hessian[start : start + sizes[name], start : start + sizes[name]]
        start += sizes[name]
        assert monitor.last_values[f"sharpness/{name}/hessian_max_eig"] == pytest.approx(
            torch.linalg.eigvalsh(block).max().item(), rel=0.01
        )
        trace = monitor.last_values[f"sharpness/{name}/hessian_trace"]
        stderr = monitor.last_values[f"sharpness/{name}/hessian_trace_stderr"]
        assert abs(trace - torch.trace(block).item()) <= 4 * stderr + 1e-6 * abs(trace)  # logged in float32
    assert monitor.last_values["sharpness/hessian_max_eig"] == pytest.approx(
        torch.linalg.eigvalsh(hessian).max().item(), rel=0.01
    )


def test_spectrum_epochs_log_the_density_figure_and_the_negative_fraction(tmp_path: Path) -> None:
    module = Tiny().double()
    monitor = SharpnessMonitor(measures=["grad_norm"], spectrum_epochs=[0, 2], spectrum_iters=40, spectrum_runs=4)
    logger = csv_logger(tmp_path)
    fit = trainer(max_epochs=3, precision="64-true", logger=logger, callbacks=[monitor])
    fit.fit(module, loader())
    assert [epoch for epoch, _ in monitor.spectra] == [0, 2]
    spectrum = monitor.spectra[-1][1]
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(module, monitor.fixed_batch))
    assert spectrum.nodes.max().item() == pytest.approx(eigenvalues.max().item(), rel=1e-4), "Lanczos' extreme node"
    assert spectrum.nodes.min().item() == pytest.approx(eigenvalues.min().item(), rel=1e-3), "and the other extreme"
    figures = sorted(p.name for p in (Path(logger.log_dir) / "sharpness").glob("*.png"))
    assert figures == ["spectrum_epoch000.png", "spectrum_epoch002.png"]
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [
            float(row["sharpness/negative_fraction"])
            for row in csv.DictReader(f)
            if row.get("sharpness/negative_fraction")
        ]
    assert logged == pytest.approx([s.negative_fraction().item() for _, s in monitor.spectra])


class TinyLogging(Tiny):
    """Logs the step it sees on every batch and a metric at each epoch's end, as Lightning records them."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("steps_before", float(self.global_step), on_step=True, on_epoch=False)
        self.log("epoch_metric", 1.0, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_scheduled_epoch_end_and_end_of_fit_measurements_share_lightnings_step_axis(tmp_path: Path) -> None:
    """A measurement after k updates is logged where Lightning logs that batch's metrics (k - 1), at the end too."""
    monitor = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=3, spectrum_epochs=[0], spectrum_iters=10)
    logger = csv_logger(tmp_path)
    trainer(max_epochs=1, logger=logger, log_every_n_steps=1, callbacks=[monitor]).fit(TinyLogging(), loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def steps(key: str) -> list[int]:
        return [int(row["step"]) for row in rows if row.get(key)]

    # 8 batches: measured after 3 and 6 updates (the batches Lightning logs at 2 and 5) and after all 8 (at 7)
    assert steps("sharpness/hessian_max_eig") == [2, 5, 7]
    assert [int(float(r["steps_before"])) for r in rows if r.get("steps_before")] == list(range(8))
    assert steps("epoch_metric") == [7] == steps("sharpness/negative_fraction"), "epoch end: the last batch's step"
    assert [s for s, row in monitor.history if "sharpness/hessian_max_eig" in row] == [2, 5, 7]
    assert monitor.spectrum.spectrum_at == [7]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_spectrum_figures_of_runs_sharing_a_folder_are_named_per_run_and_titled(
    wandb_offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from lightning_sam import plots

    titles: list[str] = []
    real = plots.save_spectrum_figure

    def recording(spectra: Any, path: Path, title: str) -> Path:
        titles.append(title)
        return real(spectra, path, title)

    monkeypatch.setattr(plots, "save_spectrum_figure", recording)
    names = []
    for name in ("sgd-seed0", "sam-seed0"):
        monitor = SharpnessMonitor(measures=["grad_norm"], spectrum_epochs=[0], spectrum_iters=10)
        logger = WandbLogger(project="p", name=name, save_dir=str(wandb_offline), offline=True)
        trainer(max_epochs=1, logger=logger, callbacks=[monitor]).fit(Tiny(), loader())
        names.append(f"{name}-{logger.experiment.id}")
        wandb.finish()
    files = sorted(p.name for p in (wandb_offline / "sharpness").glob("*.png"))
    assert files == sorted(f"spectrum_{n}_epoch000.png" for n in names), "one figure per run, none overwritten"
    assert titles == [f"Hessian eigenvalue density, {n}, epoch 0 (step 7)" for n in names]

    csv_run = csv_logger(wandb_offline)  # a folder of its own per run: the name stays short
    monitor = SharpnessMonitor(measures=["grad_norm"], spectrum_epochs=[0])
    trainer(max_epochs=1, logger=csv_run, callbacks=[monitor]).fit(Tiny(), loader())
    assert [p.name for p in (Path(csv_run.log_dir) / "sharpness").glob("*.png")] == ["spectrum_epoch000.png"]
    assert titles[-1] == "Hessian eigenvalue density, version_0, epoch 0 (step 7)"


class NoDoubleBackward(Tiny):
    """A custom autograd function without double backward (as fused attention kernels are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from test_hessian import NoDoubleBackwardTanh

        return self.net[2](NoDoubleBackwardTanh.apply(self.net[0](x)))  # type: ignore[no-any-return]


def test_models_without_double_backward_fall_back_to_finite_differences_with_one_warning(tmp_path: Path) -> None:
    module = NoDoubleBackward().double()
    monitor = SharpnessMonitor(measures=["hessian_max_eig", "hessian_trace"], every_n_steps=2, spectrum_epochs=[0])
    fit = trainer(max_epochs=1, precision="64-true", logger=csv_logger(tmp_path), callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match="fall back to finite differences") as record:
        fit.fit(module, loader())
    assert len([w for w in record if "finite differences" in str(w.message)]) == 1
    assert monitor.hvp == "finite_difference"
    reference = Tiny().double()
    reference.load_state_dict(module.state_dict())  # the same function, with double backward
    top = torch.linalg.eigvalsh(exact_hessian(reference, monitor.fixed_batch)).max().item()
    assert monitor.last_values["sharpness/hessian_max_eig"] == pytest.approx(top, rel=0.01)
    with pytest.raises(
        MisconfigurationException, match=r"hvp must be one of \['auto', 'autograd', 'finite_difference'\]"
    ):
        SharpnessMonitor(hvp="double")


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_a_resumed_fit_keeps_the_finite_difference_fallback_without_trying_again(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=2)
    logger = csv_logger(tmp_path)
    fit = trainer(max_epochs=1, precision="64-true", logger=logger, callbacks=[first, ckpt], enable_checkpointing=True)
    with pytest.warns(RuntimeWarning, match="fall back to finite differences"):
        fit.fit(NoDoubleBackward().double(), loader())
    second = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=2)
    resumed = trainer(max_epochs=2, precision="64-true", logger=csv_logger(tmp_path), callbacks=[second])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(NoDoubleBackward().double(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.hvp == "finite_difference"
    assert not [w for w in caught if "finite differences" in str(w.message)], "not tried (and warned) again"
    assert "sharpness/hessian_max_eig" in second.last_values


# 2. It only observes ------------------------------------------------------------------------------------------------


class Busy(Net):
    """Dropout, BatchNorm and a torchmetric: everything the monitor must leave as it found it."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3, batchnorm=True)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.accuracy.update(logits, y)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss


class BusySAM(Busy, SAMNet):
    """The mixin is not first here: its training_step wrapper must still take Busy's step."""


@pytest.mark.parametrize("module_cls", [Busy, BusySAM])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_monitor_only_observes(module_cls: type[Busy], precision: str, tmp_path: Path) -> None:
    results = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        module = module_cls()
        callbacks = [SharpnessMonitor(measures=ALL, every_n_steps=2)] if with_monitor else []
        fit = trainer(
            max_epochs=2, precision=precision, logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=callbacks
        )
        fit.fit(module, loader())
        bn = module.net[1]
        results.append(
            (
                flat_params(module).clone(),
                torch.cat([p.grad.flatten() for p in module.parameters()]),  # type: ignore[union-attr]
                [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()],
                module.accuracy.update_count,
                torch.get_rng_state(),
                module.training,
            )
        )
    (p0, g0, bn0, n0, rng0, t0), (p1, g1, bn1, n1, rng1, t1) = results
    assert torch.equal(p0, p1)
    assert torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(bn0, bn1, strict=True))
    assert n0 == n1 == 16
    assert torch.equal(rng0, rng1)
    assert t0 == t1


# 4. Loggers: W&B (offline, real), CSV, TensorBoard ------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "wandb_root"
    root.mkdir()
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return root


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_wandb_offline_run_logs_the_curves_summaries_and_landscape(wandb_offline: Path) -> None:
    import wandb

    monitor = SharpnessMonitor(
        measures=ALL, every_n_steps=4, landscape_epochs=[1], landscape_points=5, spectrum_epochs=[1], spectrum_iters=20
    )
    logger = WandbLogger(project="lightning-sam-test", save_dir=str(wandb_offline), offline=True)
    fit = trainer(max_epochs=2, logger=logger, log_every_n_steps=2, callbacks=[monitor])
    torch.manual_seed(0)
    fit.fit(SAMNet(), loader())
    wandb.finish()

    run_dir = next((wandb_offline / "wandb").glob("offline-run-*"))
    records = wandb_records(run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    rows = [h for h in history if any(k.startswith("sharpness/") for k in h)]
    for key in sorted(logged_keys(ALL)):
        points = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
        assert points, f"{key} was not logged"
        assert all(math.isfinite(v) for _, v in points), (key, points)
    cheap_steps = [row["trainer/global_step"] for row in rows if "sharpness/grad_norm" in row]
    assert cheap_steps == sorted(cheap_steps)
    assert len(cheap_steps) == 8, "every logging step (log_every_n_steps=2, 16 batches)"
    hessian_steps = [row["trainer/global_step"] for row in rows if "sharpness/hessian_max_eig" in row]
    # every 4 optimizer steps, at Lightning's logging step for that batch (the end of training is step 16, done)
    assert hessian_steps == [3, 7, 11, 15]
    landscape = [h for h in history if h.get("sharpness/landscape_table._type") == "table-file"]
    assert len(landscape) == 1, "one landscape plot, at the end of epoch 1"
    assert landscape[0]["sharpness/landscape_table.nrows"] == 2 * 5, "two directions, five points each"
    table = json.loads((run_dir / "files" / landscape[0]["sharpness/landscape_table.path"]).read_text())
    assert all(math.isfinite(row[2]) for row in table["data"])
    assert {row[1] for row in table["data"]} == {"gradient direction", "random direction"}
    spectrum = [h for h in history if h.get("sharpness/spectrum_table._type") == "table-file"]
    assert len(spectrum) == 1, "one density plot, at the end of epoch 1"
    table = json.loads((run_dir / "files" / spectrum[0]["sharpness/spectrum_table.path"]).read_text())
    assert {row[1] for row in table["data"]} == {"log10 density"} and len(table["data"]) == 400
    # at the end of epoch 1: the last batch's step, where Lightning logs its own epoch metrics
    assert [row["trainer/global_step"] for row in rows if "sharpness/negative_fraction" in row] == [15]
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    sharp = next(m for m in metrics if m.get("glob_name") == "sharpness/*")
    assert sharp["step_metric"] == "trainer/global_step"
    config = [r for r in records if r["type"] == "config" and "base optimizer's edge" in json.dumps(r)]
    assert config, "what each curve measures, eos_ratio's edge too, in the run's config"
    assert sharp["summary"] == {"min": True, "max": True, "last": True}


def test_csv_and_tensorboard_log_the_same_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Recording(measures=ALL, every_n_steps=4)
    csv_log, tb_log = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    fit = trainer(max_epochs=1, logger=[csv_log, tb_log], log_every_n_steps=2, callbacks=[monitor])
    torch.manual_seed(0)
    fit.fit(Net(), loader())

    with open(Path(csv_log.log_dir) / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    events = EventAccumulator(tb_log.log_dir)
    events.Reload()
    for key in sorted(logged_keys(ALL)):
        from_csv = [(int(r["step"]), float(r[key])) for r in csv_rows if r.get(key)]
        from_tb = [(e.step, e.value) for e in events.Scalars(key)]
        assert from_csv, key
        assert [s for s, _ in from_csv] == [s for s, _ in from_tb]
        assert [v for _, v in from_csv] == pytest.approx([v for _, v in from_tb], rel=1e-6)


def test_plain_sgd_first_order_is_the_sam_formula_on_the_batch(tmp_path: Path) -> None:
    """Without SAMMixin the monitor perturbs by itself; with it, it reports the optimizer's own pass."""
    monitor = Recording(measures=["first_order", "grad_norm"], rho=0.05)
    fit = trainer(max_steps=1, logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[monitor])
    torch.manual_seed(0)
    module = Net(momentum=0.0)
    start = Net(momentum=0.0)
    start.load_state_dict(module.state_dict())
    fit.fit(module, loader())
    x, y = next(iter(loader()))
    loss = nn.functional.cross_entropy(start(x), y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(start.parameters(), grads, strict=True):
            p.add_(0.05 * g / norm)
        expected = nn.functional.cross_entropy(start(x), y) - loss
    assert monitor.last_values["sharpness/first_order"] == pytest.approx(expected.item(), rel=1e-4)
    assert monitor.last_values["sharpness/grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


# 5. Mixed precision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision",
    [{"precision": "bf16-mixed"}, {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}],
)
@pytest.mark.parametrize("module_cls", [Net, SAMNet])
def test_estimates_under_amp_are_float32_and_finite(
    precision: dict[str, Any], module_cls: type[Net], tmp_path: Path
) -> None:
    monitor = Recording(measures=ALL, every_n_steps=4)
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), log_every_n_steps=2, callbacks=[monitor], **precision)
    torch.manual_seed(0)
    fit.fit(module_cls(), loader())
    assert monitor.reduced_inputs
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in monitor.reduced_inputs)
    assert set(monitor.last_values) == logged_keys(ALL)


# 6. Checkpoints ----------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_state_survives_resume_and_monitors_coexist(tmp_path: Path) -> None:
    def monitors() -> list[SharpnessMonitor]:
        return [
            SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=3),
            SharpnessMonitor(measures=["hessian_trace", "grad_norm"], every_n_steps=5, rho=0.1),
        ]

    first = monitors()
    assert first[0].state_key != first[1].state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[*first, ckpt], enable_checkpointing=True)
    torch.manual_seed(0)
    fit.fit(Net(), loader())
    assert first[0].last_step == {"hessian_max_eig": 8} and first[1].last_step == {"hessian_trace": 8}

    second = monitors()
    fit = trainer(max_epochs=2, logger=csv_logger(tmp_path), callbacks=second)
    torch.manual_seed(0)
    fit.fit(Net(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved = checkpoint["callbacks"]
    assert saved[first[0].state_key]["estimator_state"]["eigenvectors"] is not None
    assert saved[first[1].state_key]["estimator_state"] == {}
    x0, x1 = saved[first[0].state_key]["fixed_batches"][0][0], second[0].fixed_batch[0]
    assert torch.equal(x0, x1), "the resumed run measures on the same fixed batch"
    assert second[0].last_step == {"hessian_max_eig": 16}
    assert second[1].last_step == {"hessian_trace": 16}


def test_warm_start_vector_is_restored(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=4)
    state_before = monitor.state_dict()
    assert state_before["estimator_state"] == {}
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[monitor])
    torch.manual_seed(0)
    fit.fit(Net(), loader())
    restored = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=4)
    restored.load_state_dict(monitor.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.eigenvector, monitor.eigenvector, strict=True))  # type: ignore[arg-type]
    assert torch.equal(restored.rng_state, monitor.rng_state)


# 7. Bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"measures": ["hessian_max_eig", "sharpest"]}, r"Unknown.*'sharpest'.*Valid measures: \['first_order'"),
        ({"measures": []}, "Valid measures"),
        ({"every_n_steps": 0}, "positive integer"),
        ({"every_n_steps": {"hessian_trace": -5}}, "positive integer"),
        ({"every_n_steps": {"grad_norm": 5}}, "log_every_n_steps"),
        ({"rho": 0.0}, "rho must be a number > 0"),
        ({"landscape_epochs": [-1]}, "landscape_epochs"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        SharpnessMonitor(**kwargs)


def test_no_logger_is_refused_before_training() -> None:
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer(logger=False, callbacks=[SharpnessMonitor()]).fit(Net(), loader())


class NAdamNet(Net):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.NAdam(self.parameters(), lr=1e-3)


def test_eos_ratio_of_an_optimizer_without_a_rule_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(measures=["eos_ratio"], every_n_steps=2)
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[monitor])
    with pytest.warns(
        RuntimeWarning, match="eos_ratio is skipped: the edge of stability is defined here for SGD"
    ) as record:
        fit.fit(NAdamNet(), loader())
    assert len([w for w in record if "eos_ratio" in str(w.message)]) == 1
    assert fit.global_step == 8


def test_no_batch_seen_warns_instead_of_crashing(tmp_path: Path) -> None:
    monitor = SharpnessMonitor()
    module = Net()
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[monitor], limit_train_batches=0)
    fit.fit(module, loader())  # Lightning skips training: nothing to measure, nothing logged
    assert monitor.last_values == {}
    with pytest.warns(RuntimeWarning, match="no training batch was seen"):
        monitor.on_train_end(fit, module)
    assert monitor.last_values == {}


def test_landscape_without_wandb_warns(tmp_path: Path) -> None:
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[SharpnessMonitor(landscape_epochs=[0])])
    with pytest.warns(UserWarning, match="without a WandbLogger"):
        fit.fit(Net(), loader())


# 8. Modules the monitor used to crash on -----------------------------------------------------------------------------


class WithUnusedAndLinear(Tiny):
    """One parameter no loss uses, one the loss is linear in: their Hessian rows are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(2))
        self.offset = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.offset


def test_unused_and_linear_parameters_are_measured_like_the_exact_hessian(tmp_path: Path) -> None:
    module = WithUnusedAndLinear().double()
    monitor = SharpnessMonitor(measures=ALL, every_n_steps=3)
    fit = trainer(max_epochs=1, precision="64-true", logger=csv_logger(tmp_path), callbacks=[monitor])
    fit.fit(module, loader())
    assert all(math.isfinite(v) for v in monitor.last_values.values())
    hessian = exact_hessian(module, monitor.fixed_batch)  # the unused and linear rows are zero
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()].item()
    assert monitor.last_values["sharpness/hessian_max_eig"] == pytest.approx(top, rel=0.01)


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()  # type: ignore[union-attr]
        opt.zero_grad()  # type: ignore[union-attr]


def plain_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def test_manual_optimization_needs_a_loss_fn_and_works_with_one(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*loss_fn=lambda module, batch"):
        trainer(logger=csv_logger(tmp_path), callbacks=[SharpnessMonitor()]).fit(Manual(), loader())
    grad_only = SharpnessMonitor(measures="grad_norm")
    trainer(logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[grad_only]).fit(Manual(), loader())
    assert set(grad_only.last_values) == {"sharpness/grad_norm"}
    monitor = SharpnessMonitor(measures=ALL, every_n_steps=4, loss_fn=plain_loss)
    torch.manual_seed(0)
    module = Manual()
    fit = trainer(logger=csv_logger(tmp_path), log_every_n_steps=2, callbacks=[monitor])
    fit.fit(module, loader())
    assert fit.global_step == 8, "the monitor did not step the optimizer"
    assert set(monitor.last_values) == logged_keys(ALL)


def test_a_measure_name_alone_is_one_measure() -> None:
    assert SharpnessMonitor(measures="grad_norm").measures == ("grad_norm",)


class ParametersOutsideTheModule(Net):
    """The module's own weights are frozen; what trains lives outside it."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.requires_grad_(False)
        self.outside = [nn.Parameter(torch.zeros(3))]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x) + self.outside[0], y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.outside, lr=0.1)


def test_no_trainable_parameter_in_the_module_warns_once_instead_of_crashing(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(measures=ALL, every_n_steps=2)
    fit = trainer(logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match="no trainable parameter") as record:
        fit.fit(ParametersOutsideTheModule(), loader())
    assert len([w for w in record if "no trainable parameter" in str(w.message)]) == 1
    assert set(monitor.last_values) == {"sharpness/first_order", "sharpness/grad_norm"}


def test_restored_state_moves_to_the_modules_device(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=4)
    trainer(logger=csv_logger(tmp_path), callbacks=[monitor]).fit(Net(), loader())
    restored = SharpnessMonitor(measures=["hessian_max_eig"], every_n_steps=4)
    restored.load_state_dict(monitor.state_dict())
    module = Net()
    module._device = torch.device("meta")  # a device other than the checkpoint's CPU, without a GPU
    restored.on_train_start(SimpleNamespace(global_rank=0), module)  # type: ignore[arg-type]
    assert all(t.device.type == "meta" for t in restored.fixed_batch)
    assert all(v.device.type == "meta" for v in restored.eigenvector)  # type: ignore[union-attr]


def test_a_new_measure_is_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_sam import measures

    def loss_at_fixed_batch(batch: measures.FixedBatch) -> dict[str, torch.Tensor]:
        return {"fixed_batch_loss": batch.loss_fn()}

    entry = measures.Measure(
        loss_at_fixed_batch,
        per_step=False,
        keys=lambda _: {"fixed_batch_loss": "mean"},
        summary="the fixed batch's loss",
    )
    monkeypatch.setitem(measures.MEASURES, "fixed_batch_loss", entry)
    monitor = SharpnessMonitor(measures=["fixed_batch_loss"], every_n_steps=4)
    trainer(logger=csv_logger(tmp_path), callbacks=[monitor]).fit(Net(), loader())
    assert math.isfinite(monitor.last_values["sharpness/fixed_batch_loss"])


def test_each_rank_resumes_on_its_own_fixed_batch() -> None:
    monitor = SharpnessMonitor()
    batches = [(torch.zeros(2), torch.zeros(2)), (torch.ones(2), torch.ones(2))]
    monitor.load_state_dict({"last_step": {}, "eigenvector": None, "fixed_batches": batches, "rng_state": None})
    monitor.on_train_start(SimpleNamespace(global_rank=1), Net())  # type: ignore[arg-type]
    assert torch.equal(monitor.fixed_batch[0], torch.ones(2))


def test_wandb_is_needed_only_with_a_wandb_logger(tmp_path: Path) -> None:
    code = f"""
import sys
sys.modules["wandb"] = None  # importing wandb now fails, as if it were not installed
import torch
from lightning.pytorch.loggers import CSVLogger
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import Net, loader, trainer
from lightning_sam import SharpnessMonitor
monitor = SharpnessMonitor(every_n_steps=4)
trainer(logger=CSVLogger({str(tmp_path)!r}), callbacks=[monitor], log_every_n_steps=2).fit(Net(), loader())
print(sorted(monitor.last_values))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sharpness/hessian_max_eig" in done.stdout


# 8. Issue 18: scheduling, SAM's edge, LookSAM's first_order, critical sharpness -----------------------------------


class StepsMeasured(Recording):
    """Which optimizer step each scheduled measure ran at (its own key in the logged rows)."""

    def steps_of(self, key: str) -> list[int]:
        return [step for step, values in self.rows if key in values]


def test_each_interval_measures_on_exactly_its_own_multiples(tmp_path: Path) -> None:
    monitor = StepsMeasured(
        measures=["hessian_max_eig", "hessian_trace"], every_n_steps={"hessian_max_eig": 4, "hessian_trace": 6}
    )
    monitor.rows.clear()
    trainer(max_steps=25, max_epochs=-1, logger=csv_logger(tmp_path), log_every_n_steps=50, callbacks=[monitor]).fit(
        Net(), loader()
    )
    assert monitor.steps_of("hessian_max_eig") == [4, 8, 12, 16, 20, 24, 25], "its multiples, then the end"
    assert monitor.steps_of("hessian_trace") == [6, 12, 18, 24, 25]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_intervals_after_a_resume_go_on_from_the_last_measured_step(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = StepsMeasured(measures=["hessian_max_eig"], every_n_steps=6)
    fit = trainer(max_epochs=1, logger=csv_logger(tmp_path), callbacks=[first, ckpt], enable_checkpointing=True)
    fit.fit(Net(), loader())
    assert first.steps_of("hessian_max_eig") == [6, 8], "its multiple, then the end"
    second = StepsMeasured(measures=["hessian_max_eig"], every_n_steps=6)
    resumed = trainer(max_epochs=3, logger=csv_logger(tmp_path), callbacks=[second])
    resumed.fit(Net(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.steps_of("hessian_max_eig") == [12, 18, 24]


class QuadraticSAM(SAMNet):
    """SAM over plain SGD (no momentum), for its edge of stability."""

    def __init__(self) -> None:
        super().__init__(lr=0.5, momentum=0.0, rho=0.1)


def test_sam_eos_ratio_is_the_top_eigenvalue_over_sams_edge(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(
        measures=["hessian_max_eig", "eos_ratio", "sam_eos_ratio"], every_n_steps=4, eig_tol=1e-6
    )
    torch.manual_seed(0)
    module = QuadraticSAM()
    trainer(max_steps=4, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[monitor]).fit(module, loader())
    x, y = monitor.fixed_batch
    params = list(module.parameters())
    module.eval()
    loss = nn.functional.cross_entropy(module(x), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((t**2).sum() for t in g)).item()
    top = monitor.last_values["sharpness/hessian_max_eig"]
    # Long & Bartlett 2024: the SAM step along the top eigenvector is stable while lr·λ·(1 + rho·λ/‖g‖) < 2.
    edge = norm / (2 * 0.1) * (math.sqrt(1 + 8 * 0.1 / (0.5 * norm)) - 1)
    assert 0.5 * edge * (1 + 0.1 * edge / norm) == pytest.approx(2.0)
    assert monitor.last_values["sharpness/sam_eos_ratio"] == pytest.approx(top / edge, rel=1e-5)
    assert monitor.last_values["sharpness/eos_ratio"] == pytest.approx(top * 0.5 / 2, rel=1e-5), "the base's edge"
    assert edge < 2 / 0.5, "SAM's edge lies below gradient descent's"


def test_edge_ratios_with_inexact_products_past_the_bound_drop_their_residual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_sam.measures

    monkeypatch.setattr(lightning_sam.measures, "FD_TRUSTED_BOUND", 0.0)  # every finite-difference bound is past it
    monitor = SharpnessMonitor(measures=["eos_ratio", "sam_eos_ratio"], every_n_steps=4, hvp="finite_difference")
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[monitor]).fit(
            QuadraticSAM(), loader()
        )
    messages = [str(w.message) for w in caught]
    for key in ("eos_ratio", "sam_eos_ratio"):
        assert f"sharpness/{key}" in monitor.last_values, key
        assert f"sharpness/{key}_residual" not in monitor.last_values, key
        assert any(key in m and "without its residual" in m for m in messages), (key, messages)


def test_sam_eos_ratio_at_a_stationary_point_logs_nothing(tmp_path: Path) -> None:
    class Stationary(QuadraticSAM):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return 0.0 * super().training_step(batch, batch_idx)  # every gradient is zero

    monitor = SharpnessMonitor(measures=["sam_eos_ratio"], every_n_steps=2, eig_iters=5)
    trainer(max_steps=2, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[monitor]).fit(Stationary(), loader())
    assert "sharpness/sam_eos_ratio" not in monitor.last_values
    assert all(math.isfinite(v) for v in monitor.last_values.values()), monitor.last_values


def test_sam_eos_ratio_of_a_plain_optimizer_is_skipped_with_a_reason(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(measures=["sam_eos_ratio", "eos_ratio"], every_n_steps=2)
    with pytest.warns(RuntimeWarning, match="sam_eos_ratio is skipped: the optimizer is not a SAM"):
        trainer(max_steps=4, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[monitor]).fit(Net(), loader())
    assert "sharpness/eos_ratio" in monitor.last_values and "sharpness/sam_eos_ratio" not in monitor.last_values


class LookSAMNet(SAMNet):
    def make_optimizer(self) -> torch.optim.Optimizer:
        from lightning_sam import LookSAM

        return LookSAM(self.parameters(), torch.optim.SGD, rho=self.rho, k=3, lr=self.lr, momentum=self.momentum)


class PlainFirstOrder(pl.Callback):
    """The oracle: L(w + rho·g/‖g‖) − L(w) with the plain gradient g of the batch, at each batch start."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        x, y = batch
        params = list(pl_module.parameters())
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(pl_module(x), y)
            g = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p.add_(0.05 * t / (norm + 1e-12))
            self.values.append((nn.functional.cross_entropy(pl_module(x), y) - loss).item())
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def test_looksam_logs_first_order_on_every_logged_step_from_the_plain_gradient(tmp_path: Path) -> None:
    monitor = Recording(measures=["first_order"])
    oracle = PlainFirstOrder()
    torch.manual_seed(0)
    fit = trainer(
        max_steps=6, max_epochs=-1, logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[oracle, monitor]
    )
    fit.fit(LookSAMNet(), loader())
    logged = [values["first_order"] for _, values in monitor.rows]
    assert len(logged) == 6, "every logged step, SAM steps and the steps between"
    assert logged == pytest.approx(oracle.values, rel=1e-4)


class RSTNet(SAMNet):
    def make_optimizer(self) -> torch.optim.Optimizer:
        from lightning_sam import RST

        return RST(self.parameters(), torch.optim.SGD, rho=self.rho, p=0.5, seed=1, lr=self.lr)


class PassesPerBatch(pl.Callback):
    """The oracle: the forward passes of each batch (2 on a SAM step, 1 on a one-pass step)."""

    def __init__(self) -> None:
        self.passes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.passes.append(0)
        if len(self.passes) == 1:
            pl_module.register_forward_hook(lambda *_: self.passes.__setitem__(-1, self.passes[-1] + 1))


@pytest.mark.parametrize("module_cls", [LookSAMNet, RSTNet, SAMNet])
def test_sam_fraction_is_the_share_of_sam_steps_before_each_logged_step(
    module_cls: type[SAMNet], tmp_path: Path
) -> None:
    monitor = Recording(measures=["sam_fraction"])
    passes = PassesPerBatch()
    torch.manual_seed(0)
    fit = trainer(
        max_steps=8, max_epochs=-1, logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[passes, monitor]
    )
    fit.fit(module_cls(), loader())
    logged = [values["sam_fraction"] for _, values in monitor.rows]
    sam_steps = [p == 2 for p in passes.passes]
    assert set(passes.passes) <= {1, 2} and len(logged) == 8
    expected = [sum(sam_steps[:n]) / n if n else 0.0 for n in range(8)]  # the steps taken before this one's
    assert logged == pytest.approx(expected)
    if module_cls is not SAMNet:
        assert 0 < sum(sam_steps) < 8, "both kinds of step were taken"


def test_sam_fraction_of_a_plain_optimizer_logs_nothing_and_warns_nothing(tmp_path: Path) -> None:
    monitor = Recording(measures=["sam_fraction", "grad_norm"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, max_epochs=-1, logger=csv_logger(tmp_path), log_every_n_steps=1, callbacks=[monitor]).fit(
            Net(), loader()
        )
    assert "sharpness/grad_norm" in monitor.last_values and "sharpness/sam_fraction" not in monitor.last_values
    assert not [w for w in caught if "sam_fraction" in str(w.message)]


class BeforeAndBatch(pl.Callback):
    """The weights, the batch and the random state before each batch, for an independent line search."""

    def __init__(self) -> None:
        self.rows: list[tuple[list[torch.Tensor], Any, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.rows.append(([p.detach().clone() for p in pl_module.parameters()], batch, torch.get_rng_state()))


def dense_critical_sharpness(
    probe: nn.Module, before: list[torch.Tensor], after: list[torch.Tensor], lr: float, batch: Any, rng: torch.Tensor
) -> float:
    """The oracle: 2/η for the first η that raises L(w_before − η u), u = (w_before − w_after)/lr, on a fine grid;
    each loss with the batch's random state (dropout), in the probe's mode."""
    x, y = batch
    u = [(b - a) / lr for b, a in zip(before, after, strict=True)]

    def loss_at(eta: float) -> torch.Tensor:
        for p, b, d in zip(probe.parameters(), before, u, strict=True):
            p.copy_(b - eta * d)
        torch.set_rng_state(rng)
        return nn.functional.cross_entropy(probe(x), y)

    with torch.no_grad():
        base = loss_at(0.0)
        coarse = torch.logspace(-4, 3, 1600).tolist()  # steps of 1%, then 1000 points between the last two
        first = next((i for i, eta in enumerate(coarse) if loss_at(eta) > base), None)
        assert first is not None and first > 0
        fine = torch.linspace(coarse[first - 1], coarse[first], 1000).tolist()
        return 2 / next(eta for eta in fine if loss_at(eta) > base)


def halving_every_step(optimizer: torch.optim.Optimizer) -> Any:
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5), "interval": "step"}


@pytest.mark.parametrize(
    ("module_cls", "scheduler"), [(Net, None), (SAMNet, None), (Net, halving_every_step), (SAMNet, halving_every_step)]
)
def test_critical_sharpness_is_the_first_rise_along_the_update_found_by_a_dense_line_search(
    module_cls: type[Net], scheduler: Any, tmp_path: Path
) -> None:
    monitor = StepsMeasured(measures=["critical_sharpness"], every_n_steps=3)
    seen = BeforeAndBatch()
    torch.manual_seed(0)
    module = module_cls(momentum=0.0, scheduler=scheduler)
    lr = 0.1 if scheduler is None else 0.1 * 0.5**5  # step 6's: the scheduler has stepped once more by its end
    fit = trainer(max_steps=6, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[seen, monitor])
    fit.fit(module, loader())
    assert monitor.steps_of("critical_sharpness") == [3, 6], "its own steps; none at the end (no update to follow)"
    logged = [values["critical_sharpness"] for _, values in monitor.rows]
    before, batch, rng = seen.rows[5]
    after = [p.detach().clone() for p in module.parameters()]
    expected = dense_critical_sharpness(Net(momentum=0.0), before, after, lr, batch, rng)
    assert logged[-1] == pytest.approx(expected, rel=0.05 + 1e-4 * 2), "within the search's rtol"
    assert flat_params(module).equal(torch.cat([a.flatten() for a in after])), "weights back at w_after"


class TwoOptimizers(Net):
    """Manual optimization, two optimizers each stepped once per batch (the global step rises by 2), with dropout."""

    def __init__(self) -> None:
        super().__init__(momentum=0.0, dropout=0.5)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        for optimizer in self.optimizers():  # type: ignore[union-attr]
            optimizer.step()
            optimizer.zero_grad()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.2), torch.optim.SGD(self.net[-1].parameters(), lr=0.2)]


def test_critical_sharpness_when_a_batch_takes_two_optimizer_steps_replays_its_dropout(tmp_path: Path) -> None:
    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    monitor = StepsMeasured(measures=["critical_sharpness"], every_n_steps=4, loss_fn=loss_fn)
    seen = BeforeAndBatch()
    torch.manual_seed(0)
    module = TwoOptimizers()
    trainer(max_steps=4, max_epochs=-1, logger=csv_logger(tmp_path), callbacks=[seen, monitor]).fit(module, loader())
    assert monitor.steps_of("critical_sharpness") == [4]
    # Step 4 is the second optimizer's step of batch 2: along the last layer's update, in train mode, batch 2's mask.
    before_first, batch, rng = seen.rows[1]
    after = [p.detach().clone() for p in module.parameters()]
    before = after[:2] + before_first[2:]  # the first optimizer had stepped: only the last layer moved since
    probe = Net(momentum=0.0, dropout=0.5).train()
    expected = dense_critical_sharpness(probe, before, after, 0.2, batch, rng)
    assert monitor.rows[-1][1]["critical_sharpness"] == pytest.approx(expected, rel=0.05 + 1e-4 * 2)


class TinyTransformer(pl.LightningModule):
    """A 1-layer nn.TransformerEncoder classifier (~700 parameters), AdamW: its CPU attention kernel has no double
    backward, so exact products need the math kernel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader() -> torch.utils.data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (96, 6), generator=generator)
    labels = tokens[:, 0] % 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=32)


def dense_preconditioned(module: TinyTransformer, optimizer: torch.optim.Optimizer, batch: Any) -> tuple[float, float]:
    """λ_max(H) and λ_max(diag(1/P) H), P = (1 − β1ᵗ)(√(v/(1 − β2ᵗ)) + ε) by hand from AdamW's state (float64)."""
    module = module.double()
    tokens, labels = batch
    params = dict(module.named_parameters())
    names, shapes, sizes = list(params), [p.shape for p in params.values()], [p.numel() for p in params.values()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        out = torch.func.functional_call(module, dict(zip(names, tensors, strict=True)), (tokens,))
        return nn.functional.cross_entropy(out, labels)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().flatten() for p in params.values()]))
    (beta1, beta2), eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
    p_diag = []
    for p in params.values():
        state = optimizer.state[p]
        t = float(state["step"])
        p_diag.append(((1 - beta1**t) * ((state["exp_avg_sq"].double() / (1 - beta2**t)).sqrt() + eps)).flatten())
    preconditioned = torch.linalg.eigvals(torch.diag(1 / torch.cat(p_diag)) @ hessian).real.max().item()
    module.float()
    return torch.linalg.eigvalsh(hessian).max().item(), preconditioned


@pytest.mark.parametrize("hvp", ["auto", "finite_difference"])
def test_transformer_sharpness_is_exact_with_the_math_kernel_and_honest_with_finite_differences(
    hvp: str, tmp_path: Path
) -> None:
    measures = ["hessian_max_eig", "preconditioned_max_eig"]
    monitor = SharpnessMonitor(measures=measures, every_n_steps=9, hvp=hvp, eig_tol=1e-4)
    module = TinyTransformer()
    fit = trainer(max_epochs=3, logger=csv_logger(tmp_path), callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module, token_loader())
    messages = [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]
    top, preconditioned = dense_preconditioned(module, fit.optimizers[0], monitor.fixed_batch)
    values = monitor.last_values
    if hvp == "auto":
        assert not messages, "exact products: no fallback, no warning"
        assert values["sharpness/hessian_max_eig"] == pytest.approx(top, rel=0.02)
        assert values["sharpness/preconditioned_max_eig"] == pytest.approx(preconditioned, rel=0.02)
        assert values["sharpness/preconditioned_max_eig_residual"] <= 1e-4
        return
    for key, exact in (("hessian_max_eig", top), ("preconditioned_max_eig", preconditioned)):
        error = abs(values[f"sharpness/{key}"] - exact) / abs(exact)
        residual = values.get(f"sharpness/{key}_residual")
        if residual is None:  # no error bar: said so
            assert any(key in m and "without its residual" in m for m in messages), messages
        else:  # an error bar that bounds the error, and says within 5%
            assert error <= residual <= 0.05, (key, error, residual)
