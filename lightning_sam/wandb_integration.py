"""Everything W&B-specific: metric definitions and the loss-landscape line plot.

Only [`SharpnessMonitor`][lightning_sam.SharpnessMonitor] calls these, on rank zero, when
the Trainer has a ``WandbLogger``; other loggers get the plain scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from torch import Tensor

__all__ = ["define_sharpness_metrics", "find_wandb_logger", "log_landscape"]


def find_wandb_logger(loggers: Sequence[Logger]) -> WandbLogger | None:
    """The Trainer's first ``WandbLogger``, if it has one."""
    return next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)


def define_sharpness_metrics(logger: WandbLogger, prefix: str = "sharpness") -> None:
    """Plot ``prefix/*`` against ``trainer/global_step`` and keep its min, max and last value in the summary."""
    experiment: Any = logger.experiment
    experiment.define_metric("trainer/global_step")
    experiment.define_metric(f"{prefix}/*", step_metric="trainer/global_step", summary="min,max,last")


def log_landscape(
    logger: WandbLogger, key: str, alphas: Tensor, curves: Mapping[str, Tensor], step: int, title: str
) -> None:
    """Log 1-D loss-landscape slices as one W&B line plot (``wandb.plot.line_series``).

    Args:
        logger: The Trainer's ``WandbLogger``.
        key: The panel's key, e.g. ``"sharpness/landscape"``.
        alphas: The step sizes along each direction (x axis).
        curves: One loss curve per direction name, each of ``len(alphas)`` values.
        step: The ``trainer/global_step`` to log it at.
        title: The plot's title.
    """
    import wandb

    plot = wandb.plot.line_series(
        xs=alphas.tolist(),
        ys=[curve.tolist() for curve in curves.values()],
        keys=list(curves),
        title=title,
        xname="step along the filter-normalized direction",
    )
    logger.experiment.log({key: plot, "trainer/global_step": step})
