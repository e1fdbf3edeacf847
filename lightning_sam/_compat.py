"""Every private (``_``-prefixed) name of another package that lightning_sam uses, in one place.

Each is checked against the versions named beside it: for Lightning and torchmetrics the
declared floor and the newest release (CI runs the test suite on both), for torch the 2.13
that CI installs (and is the declared floor). When one of them moves, this
is the only module to change.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torchmetrics import Metric

__all__ = [
    "attached_trainer",
    "batchnorm_types",
    "default_foreach",
    "fsdp2_sharded_params",
    "group_by_device_and_dtype",
    "is_view",
    "lightning_logging_step",
    "lightning_logs_this_batch",
    "lightning_steps_after_this_batch",
    "lightning_unrun_closure",
    "mark_stepped",
    "metric_bookkeeping",
    "optimizers_in",
    "tensor_version",
]


def default_foreach(tensors: list[Tensor]) -> bool:
    """Torch's own choice of the ``_foreach_*`` path for these tensors (foreach on CUDA, not on the CPU).

    ``torch.optim.optimizer._default_to_fused_or_foreach``: torch 2.13.
    """
    from torch.optim.optimizer import _default_to_fused_or_foreach

    return bool(_default_to_fused_or_foreach(tensors, differentiable=False, use_fused=False)[1])


def group_by_device_and_dtype(
    tensorlists: list[list[Tensor]],
) -> list[tuple[list[list[Tensor]], list[int]]]:
    """Aligned tensor lists grouped by the (device, dtype) of the first, with each group's original indices.

    ``torch.utils._foreach_utils._group_tensors_by_device_and_dtype``: torch 2.13.
    """
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    grouped = _group_tensors_by_device_and_dtype(tensorlists, with_indices=True)  # type: ignore[arg-type]
    return [(lists, indices) for lists, indices in grouped.values()]  # type: ignore[misc]


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell torch's LR schedulers that ``optimizer`` stepped (they watch ``step`` being called, and warn otherwise).

    ``Optimizer._opt_called``: torch 2.13.
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


def tensor_version(tensor: Tensor) -> int:
    """How many times ``tensor`` was changed in place (autograd's version counter; views share it).

    ``Tensor._version``: torch 2.13.
    """
    return int(tensor._version)


def is_view(tensor: Tensor) -> bool:
    """Whether ``tensor`` shares another tensor's storage as a view of it (a DDP bucket view, a slice).

    ``Tensor._base``: torch 2.13.
    """
    return tensor._base is not None


def batchnorm_types() -> tuple[type[torch.nn.Module], ...]:
    """The base class of every BatchNorm (1d/2d/3d, lazy and ``SyncBatchNorm``).

    ``torch.nn.modules.batchnorm._BatchNorm``: torch 2.13.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    return (_BatchNorm,)


def metric_bookkeeping(metric: Metric) -> dict[str, Any]:
    """What a torchmetrics ``Metric`` changes on ``update``/``forward`` besides its states.

    ``Metric._update_count``, ``_computed``, ``_forward_cache``: torchmetrics 1.1 - 1.9.
    """
    return {name: metric.__dict__.get(name) for name in ("_update_count", "_computed", "_forward_cache")}


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer the module is attached to, or None (outside a fit), without the property's error.

    ``LightningModule._trainer``: Lightning 2.5 - 2.6.
    """
    trainer: pl.Trainer | None = module._trainer
    return trainer


def lightning_logs_this_batch(trainer: pl.Trainer) -> bool:
    """The Trainer's own decision for ``self.log`` on this batch (``log_every_n_steps``).

    ``Trainer._logger_connector.should_update_logs``: Lightning 2.5 - 2.6.
    """
    return bool(trainer._logger_connector.should_update_logs)


def lightning_steps_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the optimizer steps after this batch (the last batch of an accumulation window).

    ``_FitLoop._should_accumulate``: Lightning 2.5 - 2.6.
    """
    return not trainer.fit_loop._should_accumulate()


def lightning_logging_step(trainer: pl.Trainer) -> int:
    """The step that Lightning's own loggers would record a metric logged now at.

    While a batch's hooks run, the optimizer steps counted once per batch before it (the step of
    that batch's metrics); after an epoch's batch loop (epoch-end and train-end hooks), the last
    batch's step, where Lightning logs its epoch metrics. ``_TrainingEpochLoop._batches_that_stepped``
    (one more after the batch loop; ``_FitLoop.on_advance_end`` takes one off around the epoch
    metrics) and ``batch_progress`` (a batch ready but not completed): Lightning 2.5 - 2.6.
    """
    loop = trainer.fit_loop.epoch_loop
    stepped = int(loop._batches_that_stepped)
    current = loop.batch_progress.current
    return stepped if current.ready > current.completed else max(stepped - 1, 0)


def lightning_unrun_closure(closure: Any) -> Any | None:
    """The LightningModule whose automatic optimization handed ``closure`` to ``optimizer.step`` unrun, if any.

    Lightning's ``Closure`` (``lightning.pytorch.loops.optimization.automatic``) runs the training step
    and the backward pass; the precision plugin's ``optimizer_step`` wraps it in a ``functools.partial``
    of its ``_wrap_closure`` with the arguments ``(module, optimizer, closure)``, and the closure keeps
    its output in ``_result`` (None until it runs; a fresh closure per batch): Lightning 2.5 - 2.6.
    None for any other closure, for one that already ran (an ``optimizer_step`` override that called it
    first, davda54's recipe), and when Lightning was never imported.
    """
    automatic = sys.modules.get("lightning.pytorch.loops.optimization.automatic")
    if automatic is None or not isinstance(closure, functools.partial) or len(closure.args) != 3:
        return None
    module, _, inner = closure.args
    return module if isinstance(inner, automatic.Closure) and inner._result is None else None


def optimizers_in(configured: Any) -> list[Any]:
    """The optimizers in any of the forms ``configure_optimizers`` may return.

    ``lightning.pytorch.core.optimizer._configure_optimizers``: Lightning 2.5 - 2.6.
    """
    from lightning.pytorch.core.optimizer import _configure_optimizers

    return list(_configure_optimizers(configured)[0])


def fsdp2_sharded_params(params: Sequence[Tensor]) -> list[Tensor]:
    """Every sharded parameter of each FSDP2 tree that holds one of ``params``.

    FSDP2 reduce-scatters gradients into its sharded parameters in backward hooks, so a
    backward writes the ``.grad`` of parameters that are not in the graph, nor among
    ``params``: those of every FSDP2 state of the tree (torch 2.13: the states in
    ``torch.distributed._composable_state._module_state_mapping``, each with its
    ``_fsdp_param_group.fsdp_params[i].sharded_param``, the tree's in ``_state_ctx.all_states``).
    Found by attribute; nothing where the structure differs.

    ``torch.distributed._composable_state._module_state_mapping``, ``FSDPState._fsdp_param_group``,
    ``FSDPParam.sharded_param``, ``FSDPState._state_ctx.all_states``: torch 2.13.
    """
    from torch.distributed import _composable_state

    mapping = getattr(_composable_state, "_module_state_mapping", None)
    if mapping is None:
        return []

    def sharded_of(state: Any) -> list[Tensor]:
        group = getattr(state, "_fsdp_param_group", None)
        return [
            t
            for fsdp_param in getattr(group, "fsdp_params", ())
            if isinstance(t := getattr(fsdp_param, "sharded_param", None), Tensor)
        ]

    ours = {id(p) for p in params}
    found: dict[int, Tensor] = {}
    for ref in list(mapping.values()):
        state = ref() if callable(ref) else None
        if not any(id(t) in ours for t in sharded_of(state)):
            continue
        tree = getattr(getattr(state, "_state_ctx", None), "all_states", None) or [state]
        for other in tree:
            for t in sharded_of(other):
                found.setdefault(id(t), t)
    return list(found.values())
