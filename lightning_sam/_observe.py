"""What the mixin and the monitor share: running a LightningModule's ``training_step`` for its loss alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torchmetrics import Metric

from lightning_sam._compat import metric_bookkeeping
from lightning_sam._restore import batchnorm_statistics_kept

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["INSIDE_TRAINING_STEP", "loss_in", "observing"]

# Set in the module's __dict__ while its own training_step runs, so that SAMMixin's wrapper steps aside.
INSIDE_TRAINING_STEP = "_sam_inside_training_step"


def loss_in(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, or ``"loss"`` of a dict), else None."""
    loss = output.get("loss") if isinstance(output, dict) else output
    return loss if isinstance(loss, Tensor) else None


@contextmanager
def observing(module: pl.LightningModule, batchnorm: bool = True) -> Iterator[None]:
    """Run ``training_step`` for its loss alone: no side effect survives the block.

    ``self.log``/``self.log_dict`` do nothing, every torchmetrics ``Metric`` is put back
    as it was, BatchNorm running statistics too (unless ``batchnorm=False``: the caller
    keeps them), and a SAMMixin module's ``training_step`` runs as written (not as a whole
    SAM step). The random state is the caller's business.
    """
    metrics = [(m, _metric_snapshot(m)) for m in module.modules() if isinstance(m, Metric)]
    patched = {"log": _ignore, "log_dict": _ignore, INSIDE_TRAINING_STEP: True}
    previous = {name: module.__dict__[name] for name in patched if name in module.__dict__}
    module.__dict__.update(patched)
    try:
        with batchnorm_statistics_kept(module if batchnorm else None):
            yield
    finally:
        for name in patched:
            del module.__dict__[name]
        module.__dict__.update(previous)
        for metric, snapshot in metrics:
            metric.__dict__.update(snapshot)


def _metric_snapshot(metric: Metric) -> dict[str, Any]:
    """What ``update``/``forward`` change: the states (copied) and the bookkeeping."""
    snapshot: dict[str, Any] = {
        name: value.clone() if isinstance(value, Tensor) else list(value) for name, value in metric.metric_state.items()
    }
    snapshot.update(metric_bookkeeping(metric))
    return snapshot


def _ignore(*_: Any, **__: Any) -> None:
    """Stands in for ``self.log`` and ``self.log_dict`` while the loss alone is wanted."""
