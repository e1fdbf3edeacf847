"""The monitor's epoch-end plots as callbacks: the Hessian's eigenvalue density and 1-D slices of the loss landscape.

[`SharpnessMonitor`][lightning_sam.SharpnessMonitor] makes them from its ``spectrum_epochs``
and ``landscape_epochs`` and runs them on its own fixed batch; each also works alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_sam import sharpness
from lightning_sam._compat import lightning_logging_step
from lightning_sam._measuring import LINALG_ERROR, FixedBatchProbe, LossFn, MeasureFailed, log_round, warn_once
from lightning_sam.figures import density_curve, save_spectrum_figure
from lightning_sam.hessian import Spectrum
from lightning_sam.measures import Setting
from lightning_sam.wandb_integration import find_wandb_logger, log_line_plot

__all__ = ["LandscapePlot", "SpectrumPlot"]


def _check_epochs(name: str, epochs: Sequence[int]) -> tuple[int, ...]:
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
        raise MisconfigurationException(f"{name} must be epoch numbers >= 0, got {epochs!r}.")
    return tuple(epochs)


def _checked(name: str, value: Any, kind: Literal["count", "hvp"]) -> Any:
    """``value`` if it is a valid setting of its kind (the monitor's own rules), else one clear error."""
    if (why := Setting(value, kind).check(name, value)) is not None:
        raise MisconfigurationException(why)
    return value


class _EpochEndPlot(Callback):
    """A plot at the end of some epochs, on a fixed batch: its own, or the SharpnessMonitor's that made it."""

    def __init__(self, epochs: Sequence[int], loss_fn: LossFn | None, seed: int, probe: FixedBatchProbe | None) -> None:
        self.epochs = epochs
        self.owns_probe = probe is None
        self.probe = FixedBatchProbe(loss_fn, seed) if probe is None else probe
        self._warned: set[str] = set()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.probe.state_dict() if self.owns_probe else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.owns_probe and state_dict:
            self.probe.load_state_dict(state_dict)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.owns_probe:
            self.probe.restore_to(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.owns_probe:
            self.probe.capture(trainer, batch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe.fixed_batch is not None and trainer.current_epoch in self.epochs:
            self.plot(trainer, pl_module)

    def plot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Measure and log; returns the scalars logged."""
        raise NotImplementedError


class SpectrumPlot(_EpochEndPlot):
    """The Hessian's eigenvalue density at the end of ``epochs`` (stochastic Lanczos quadrature, Ghorbani et al. 2019).

    Logs ``sharpness/negative_fraction`` to every logger, a W&B line plot
    ``sharpness/spectrum`` (log10 density against eigenvalue), and a figure file
    ``<log_dir>/sharpness/spectrum_epochNNN.png`` (``spectrum_<run>_epochNNN.png`` where runs share
    the folder: a ``WandbLogger``'s, or none), titled with its run and step; keeps ``(epoch, Spectrum)``
    in ``spectra`` and the step each was logged at in ``spectrum_at``.
    On DDP every rank's runs (on its own batch) go into one density; on sharded
    parameters (FSDP2, tensor parallelism) the density is of the global Hessian, the same
    on every rank.

    Args:
        epochs: Epochs at whose end the density is estimated.
        iters: Lanczos steps (Hessian-vector products) per run.
        runs: Random start vectors per rank.
        hvp: The Hessian-vector product backend (``"auto"``, ``"autograd"``, ``"finite_difference"``).
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` to use instead of ``training_step``.
        seed: Seed of its own random numbers.
        probe: The fixed batch to measure on (a SharpnessMonitor's); by default its own
            (the run's first training batch).

    Examples:
        >>> from lightning_sam import SpectrumPlot
        >>> SpectrumPlot(epochs=[0, 9], iters=40).iters
        40
    """

    def __init__(
        self,
        epochs: Sequence[int],
        iters: int = 80,
        runs: int = 1,
        hvp: str = "auto",
        loss_fn: LossFn | None = None,
        seed: int = 0,
        probe: FixedBatchProbe | None = None,
    ) -> None:
        super().__init__(_check_epochs("spectrum_epochs", epochs), loss_fn, seed, probe)
        self.iters, self.runs = _checked("spectrum_iters", iters, "count"), _checked("spectrum_runs", runs, "count")
        self.hvp = _checked("hvp", hvp, "hvp")
        self.spectra: list[tuple[int, Spectrum]] = []
        self.spectrum_at: list[int] = []  # the logged step of each of spectra

    def plot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Estimate the density on the fixed batch, then log it; every rank runs this at the same epoch end."""
        spectrum, error, sharded = None, None, False
        with self.probe.measuring(pl_module) as (loss_fn, params, generator):
            sharded = any(isinstance(p, DTensor) for p in params)
            if not params:
                return {}
            try:
                spectrum = sharpness.hessian_spectrum(
                    loss_fn, params, iters=self.iters, runs=self.runs, hvp=self.hvp, generator=generator
                )
            except (LINALG_ERROR, ValueError) as why:
                warn_once(self._warned, "spectrum", f"SharpnessMonitor: the spectrum failed here: {why}")
            except Exception as raised:  # raised below, once every rank knows
                error = raised
        if trainer.world_size > 1 and not sharded:  # every rank's runs, fixed shapes: a failed rank sends NaN
            shape = (self.runs, self.iters)
            nodes, weights = (
                (torch.full(shape, torch.nan, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))
                if spectrum is None
                else [
                    torch.nn.functional.pad(t.double(), (0, self.iters - t.shape[-1]))
                    for t in (spectrum.nodes, spectrum.weights)
                ]
            )
            gathered = [
                trainer.strategy.all_gather(t.to(trainer.strategy.root_device)).reshape(-1, self.iters).cpu()
                for t in (nodes, weights)
            ]
            spectrum = None if bool(gathered[0].isnan().any()) else Spectrum(*gathered)
        fraction = {} if spectrum is None else {"negative_fraction": spectrum.negative_fraction()}
        logged = log_round(trainer, {"negative_fraction": "mean"}, fraction, error)
        if spectrum is None:
            return logged
        epoch, step = trainer.current_epoch, lightning_logging_step(trainer)
        self.spectrum_at.append(step)
        self.spectra.append((epoch, spectrum))
        log_dir = trainer.log_dir  # a collective on DDP (a broadcast of rank zero's): every rank asks
        if not trainer.is_global_zero:
            return logged
        wandb_logger = find_wandb_logger(trainer.loggers)
        run, shared = run_name(trainer, log_dir, wandb_logger)
        title = f"Hessian eigenvalue density{f', {run}' if run else ''}, epoch {epoch} (step {step})"
        if wandb_logger is not None:
            grid, density = density_curve(spectrum)
            curves = {"log10 density": density.clamp_min(1e-12).log10()}
            log_line_plot(wandb_logger, "sharpness/spectrum", grid, curves, step, title, xname="Hessian eigenvalue")
        name = f"spectrum_{run}_epoch{epoch:03d}.png" if shared and run else f"spectrum_epoch{epoch:03d}.png"
        path = Path(log_dir or trainer.default_root_dir) / "sharpness" / name
        try:
            save_spectrum_figure({"density": spectrum}, path, title)
        except ImportError:
            warn_once(
                self._warned,
                "matplotlib",
                "SharpnessMonitor: the spectrum figure needs matplotlib: pip install matplotlib.",
            )
        return logged


def run_name(trainer: pl.Trainer, log_dir: str | None, wandb_logger: Any | None) -> tuple[str, bool]:
    """The run a figure belongs to, and whether runs share the folder it goes to.

    A ``WandbLogger``'s runs (``wandb_logger``, the Trainer's if it has one) share its ``save_dir``:
    its run's name and id tell them apart. A ``CSVLogger`` or ``TensorBoardLogger`` writes each run
    to a folder of its own (``version_N``). Without a logger the runs share ``default_root_dir``,
    with nothing to name them by but the time.
    """
    logger = trainer.logger
    if logger is None:
        return time.strftime("%Y%m%d-%H%M%S"), True
    if wandb_logger is not None:
        experiment: Any = wandb_logger.experiment
        name = "-".join(str(part) for part in dict.fromkeys((experiment.name, experiment.id)) if part)
        return name.replace("/", "_"), True
    version = logger.version
    run = version if isinstance(version, str) else f"version_{version}"
    return run, Path(log_dir or "") == Path(logger.save_dir or "")  # log_dir: trainer.log_dir, asked on every rank


class LandscapePlot(_EpochEndPlot):
    """W&B line plots of the loss along the gradient and a random direction, filter-normalized (Li et al. 2018).

    At the end of ``epochs``, ``sharpness/landscape`` shows ``L(w + α d)`` for ``α`` in
    ``[-radius, radius]``, averaged over ranks; it needs a ``WandbLogger`` (other loggers
    get nothing) and whole parameters (on FSDP2 or tensor parallelism it is skipped, with one warning).

    Args:
        epochs: Epochs at whose end the curves are logged.
        points: Points per curve.
        radius: The curves span ``[-radius, radius]`` filter-normalized steps.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` to use instead of ``training_step``.
        seed: Seed of its own random numbers.
        probe: The fixed batch to measure on (a SharpnessMonitor's); by default its own.

    Examples:
        >>> from lightning_sam import LandscapePlot
        >>> LandscapePlot(epochs=[9], points=11).points
        11
    """

    def __init__(
        self,
        epochs: Sequence[int],
        points: int = 21,
        radius: float = 1.0,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        probe: FixedBatchProbe | None = None,
    ) -> None:
        super().__init__(_check_epochs("landscape_epochs", epochs), loss_fn, seed, probe)
        self.points, self.radius = _checked("landscape_points", points, "count"), radius

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.epochs and find_wandb_logger(trainer.loggers) is None:
            rank_zero_warn(
                "SharpnessMonitor(landscape_epochs=...) logs W&B line plots; without a WandbLogger it skips them."
            )

    def plot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The two curves on the fixed batch, averaged over ranks, as one W&B line plot."""
        wandb_logger = find_wandb_logger(trainer.loggers)
        if wandb_logger is None:
            return {}
        with self.probe.measuring(pl_module) as (loss_fn, params, generator):
            if any(isinstance(p, DTensor) for p in params):
                warn_once(
                    self._warned,
                    "sharded",
                    "SharpnessMonitor: landscape_epochs is skipped: the parameters are sharded (FSDP2, tensor "
                    "parallelism) and its filter-normalized random directions need whole ones.",
                )
                return {}
            if not params:
                return {}
            alphas = torch.linspace(-self.radius, self.radius, self.points)
            curves, error = torch.zeros(2, self.points), None
            try:
                grads = sharpness.gradients(loss_fn(), params)
                randoms = [torch.randn(p.shape, generator=generator).to(p) for p in params]
                curves = torch.stack(
                    [
                        sharpness.loss_along(loss_fn, params, sharpness.filter_normalized(d, params), alphas)
                        for d in (grads, randoms)
                    ]
                )
            except Exception as raised:  # raised below, once every rank knows
                error = raised
        # One reduce carries the curves and whether some rank failed: a failure raises on every rank, none waits.
        failed = torch.tensor([float(error is not None)])
        device = trainer.strategy.root_device
        summed = trainer.strategy.reduce(
            torch.cat([curves.float().flatten().cpu(), failed]).to(device), reduce_op="sum"
        )
        if float(summed[-1]) > 0:
            raise error or MeasureFailed("SharpnessMonitor: the landscape failed on another rank (see its log).")
        curves = (summed[:-1] / trainer.world_size).view(2, self.points)
        if trainer.is_global_zero:
            log_line_plot(
                wandb_logger,
                "sharpness/landscape",
                alphas,
                {"gradient direction": curves[0].cpu(), "random direction": curves[1].cpu()},
                step=lightning_logging_step(trainer),
                title=f"Loss along filter-normalized directions, epoch {trainer.current_epoch}",
                xname="step along the filter-normalized direction",
            )
        return {}
