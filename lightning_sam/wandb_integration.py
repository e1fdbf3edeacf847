"""Everything W&B-specific: metric definitions and line plots (loss landscape, eigenvalue density).

Only [`SharpnessMonitor`][lightning_sam.SharpnessMonitor] calls these, on rank zero, when
the Trainer has a ``WandbLogger``; other loggers get the plain scalars.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from torch import Tensor

__all__ = ["define_sharpness_metrics", "find_wandb_logger", "log_line_plot", "offline_unless_logged_in"]


def find_wandb_logger(loggers: Sequence[Logger]) -> WandbLogger | None:
    """The Trainer's first ``WandbLogger``, if it has one."""
    return next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)


def define_sharpness_metrics(logger: WandbLogger, labels: Mapping[str, str], prefix: str = "sharpness") -> None:
    """Plot ``prefix/*`` against ``trainer/global_step``, keep its min, max and last value in the summary.

    ``labels`` (measure → what it is) go into the run's config under ``prefix``: what each
    curve measures, e.g. that ``eos_ratio`` is over the base optimizer's edge.
    """
    experiment: Any = logger.experiment
    experiment.define_metric("trainer/global_step")
    experiment.define_metric(f"{prefix}/*", step_metric="trainer/global_step", summary="min,max,last")
    experiment.config.update({prefix: dict(labels)}, allow_val_change=True)


def log_line_plot(
    logger: WandbLogger, key: str, xs: Tensor, curves: Mapping[str, Tensor], step: int, title: str, xname: str
) -> None:
    """Log curves over a common x axis as one W&B line plot (``wandb.plot.line_series``).

    Args:
        logger: The Trainer's ``WandbLogger``.
        key: The panel's key, e.g. ``"sharpness/landscape"``.
        xs: The x values.
        curves: One curve per name, each of ``len(xs)`` values.
        step: The ``trainer/global_step`` to log it at.
        title: The plot's title.
        xname: The x axis' label.
    """
    import wandb

    plot = wandb.plot.line_series(
        xs=xs.tolist(),
        ys=[curve.tolist() for curve in curves.values()],
        keys=list(curves),
        title=title,
        xname=xname,
    )
    logger.experiment.log({key: plot, "trainer/global_step": step})


def offline_unless_logged_in() -> str | None:
    """The ``mode`` for ``WandbLogger``: ``"offline"`` without W&B credentials, else None (W&B's own choice).

    ``WANDB_MODE`` set in the environment wins (None). Asked without a prompt or a network call, so
    that a run started without a login logs offline instead of stopping to ask for one.

    Examples:
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"WANDB_MODE": "disabled"}):  # the caller's own setting is kept
        ...     offline_unless_logged_in() is None
        True
    """
    if "WANDB_MODE" in os.environ:
        return None
    import wandb

    try:
        logged_in = bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # a wandb without login(prompt=...)
        logged_in = bool(os.environ.get("WANDB_API_KEY"))
    return None if logged_in else "offline"
