"""What a SAM step, the monitor and the estimators put back bitwise: random state, BatchNorm statistics, weights.

One copy of each mechanism, and the pool of buffers a step reuses; no Lightning import.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sam._compat import batchnorm_types
from lightning_sam.functional import _locals, restore_

__all__ = [
    "BatchNormSnapshot",
    "BufferPool",
    "RngState",
    "batchnorm_statistics_kept",
    "generators_of",
    "rng_state",
    "set_rng_state",
    "weights_kept",
]


@dataclass(frozen=True)
class RngState:
    """Every stream a training step draws random numbers from, as it stood: what a second pass replays."""

    torch_cpu: Tensor
    cuda: list[Tensor] | None  # every CUDA device's, once CUDA is in use
    python: Any  # random.getstate()
    numpy: Any  # numpy.random.get_state(), when numpy is imported
    generators: tuple[tuple[torch.Generator, Tensor], ...]  # generators of the model's own


def rng_state(generators: Sequence[torch.Generator] = ()) -> RngState:
    """Torch's CPU generator, every CUDA device's, Python's ``random``, numpy's global one, and ``generators``.

    ``generators`` are the model's own ([`generators_of`][lightning_sam._restore.generators_of]
    finds them; looking for them walks every submodule, too slow for every step of a large model).
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    numpy = sys.modules.get("numpy")  # a loop that never imported numpy draws nothing from it
    return RngState(
        torch.get_rng_state(),
        cuda,
        random.getstate(),
        numpy.random.get_state() if numpy is not None else None,
        tuple((g, g.get_state()) for g in generators),
    )


def set_rng_state(state: RngState) -> None:
    """Put back a state from [`rng_state`][lightning_sam._restore.rng_state]."""
    torch.set_rng_state(state.torch_cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)
    random.setstate(state.python)
    numpy = sys.modules.get("numpy")
    if state.numpy is not None and numpy is not None:
        numpy.random.set_state(state.numpy)
    for generator, saved in state.generators:
        generator.set_state(saved)


def generators_of(module: nn.Module | None) -> list[torch.Generator]:
    """The ``torch.Generator`` attributes of a module and its submodules (each once)."""
    if module is None:
        return []
    found: dict[int, torch.Generator] = {}
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Generator):
                found.setdefault(id(value), value)
    return list(found.values())


class BatchNormSnapshot:
    """Copies of the running statistics that a forward pass in training mode updates (``SyncBatchNorm`` too)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.buffers = [] if module is None else _batchnorm_buffers(module)
        self.saved = [b.clone() for b in self.buffers]

    def restore(self) -> None:
        """Put the statistics back bitwise."""
        with torch.no_grad():
            for buffer, value in zip(self.buffers, self.saved, strict=True):
                buffer.copy_(value)


@contextmanager
def batchnorm_statistics_kept(module: nn.Module | None) -> Iterator[None]:
    """Put every BatchNorm's running statistics back bitwise after the block."""
    saved = BatchNormSnapshot(module)
    try:
        yield
    finally:
        saved.restore()


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    return [
        buffer
        for m in module.modules()
        if isinstance(m, batchnorm_types()) and m.training and getattr(m, "track_running_stats", False)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if isinstance(buffer, Tensor)
    ]


@contextmanager
def weights_kept(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Yield a copy of the parameters and give them back bitwise from it, whatever happens inside."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in _locals(params)]
    try:
        yield saved
    finally:
        with torch.no_grad():
            restore_(list(params), saved)


class BufferPool:
    """Tensors that live within a step, allocated once and reused from step to step.

    One buffer per parameter and role (``"backup"``: the saved weights; ``"kept"``,
    ``"pending"``: first gradients...), shaped like the parameter's local shard, in the
    parameter's dtype or a wider one. A step that allocates nothing costs less than the
    arithmetic on a CPU, and a GPU allocator does not fragment.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Tensor, str], Tensor] = {}

    def get(self, params: Sequence[Tensor], role: str, *, wide: bool = False) -> list[Tensor]:
        """Each parameter's buffer for ``role`` (its contents are whatever the last step left).

        ``wide``: in at least float32 (gradients kept across passes lose nothing in bfloat16).
        """
        out = []
        for p, local in zip(params, _locals(params), strict=True):
            dtype = torch.promote_types(local.dtype, torch.float32) if wide else local.dtype
            wanted = (local.shape, dtype, local.device)
            buffer = self._buffers.get((p, role))
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != wanted:
                buffer = torch.empty(local.shape, dtype=wanted[1], device=local.device)
                self._buffers[(p, role)] = buffer
            out.append(buffer)
        return out

    def holds(self, p: Tensor, role: str, tensor: Tensor) -> bool:
        """Whether ``tensor`` is ``p``'s ``role`` buffer."""
        return self._buffers.get((p, role)) is tensor

    def replace(self, p: Tensor, role: str, tensor: Tensor | None) -> None:
        """The caller keeps ``p``'s ``role`` buffer; ``tensor`` (a local tensor, or None: a new one) takes its place."""
        if tensor is None:
            self._buffers.pop((p, role), None)
        else:
            self._buffers[(p, role)] = tensor

    def tensors(self, role: str | None = None) -> list[Tensor]:
        """The pooled buffers (of one role, or all)."""
        return [b for (_, r), b in self._buffers.items() if role is None or r == role]

    def numel(self, role: str | None = None) -> int:
        """How many elements the pool holds (of one role, or all)."""
        return sum(b.numel() for b in self.tensors(role))
