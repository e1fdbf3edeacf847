"""At most one host synchronization per optimizer step, for every method, with and without a GradScaler.

The exception is AE-SAM's (and AE-LookSAM's) decision, which is data-dependent and must reach the host before the
second pass can be skipped: one read a step, which carries the first pass's finiteness too, so that a one-pass step
reads nothing else; a SAM step then reads its verdict as the others do (``expected_reads`` has the counts). RST's draw
reads a CPU generator's number, host memory, which no device has to finish: counted apart.

A ``TorchFunctionMode`` sees every call that reads a tensor's value on the host (``bool()``, ``float()``,
``.item()``...): on a GPU each one waits for the device to finish. The CPU has nothing to wait for, but the same calls
are made. Without a GradScaler the one read is SAM's verdict; with one it is the scaler's own check, and SAM (through
``SAMStep`` or ``SAMMixin``) adds none. What a CPU cannot show: copies between host and device (``.to``, a tensor made
from a Python number on the GPU), which block on a GPU too; the code keeps scales as tensors on the parameters' device.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer
from lightning.pytorch.plugins import MixedPrecision
from test_transactions import METHODS, make_net
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_sam
from lightning_sam import SAMMixin, SAMStep, rst

READS = {"__bool__", "__float__", "__int__", "__index__", "__complex__", "item", "tolist", "numpy", "equal"}
READS |= {"allclose", "is_nonzero", "nonzero", "argwhere", "unique", "masked_select"}
OURS = str(Path(lightning_sam.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
STEPS = 8
RST_HOME = rst.__file__


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor on the host: all of them, and those made from lightning_sam's code."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ours: list[str] = []
        self.host_memory = 0  # RST's draws: a CPU generator's numbers, which no device has to finish

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):  # torch's own calls: whose?
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None and frame.f_code.co_filename == RST_HOME:  # its generator is the host's
                self.host_memory += 1
            else:
                self.total += 1
                if frame is not None and frame.f_code.co_filename.startswith(OURS):
                    self.ours.append("".join(traceback.format_stack(frame, limit=1)))
        return func(*args, **(kwargs or {}))


def expected_reads(method: str, opt: lightning_sam.SAM, scaler: bool, accumulate: int = 1) -> int:
    """Our reads in the run: each step's verdict (none where a GradScaler judges), and AE-SAM's decision.

    AE-SAM reads its decision with the first pass's finiteness: on a one-pass step that read is the verdict too
    (one read), a SAM step reads its verdict after the second pass (two; one under a GradScaler). With accumulation
    the window's later micro-batches are judged by the verdict (two reads per optimizer step).
    """
    steps = opt.steps_taken
    if method in ("aesam", "aelooksam"):
        return steps if scaler else 2 * steps if accumulate > 1 else steps + opt.ascents_taken
    return 0 if scaler else steps


def check_draws(method: str, reads: HostReads, built: int = 0) -> None:
    """RST reads host memory three times a step: its decision's draw, the same draw taken at its commit, and the
    generator's state, saved (and once when the optimizer is ``built`` under the reads' eyes, its seed's state)."""
    assert reads.host_memory == (3 * STEPS + built if method == "rst" else 0)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_plain_loop_reads_the_device_at_most_once_per_step(method: str, fp16: bool) -> None:
    model = make_net()
    opt = METHODS[method](model.parameters())
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    step = SAMStep(opt, model, scaler=scaler)
    reads = HostReads()
    with reads:
        for x, y in batches():

            def loss_fn(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                    return nn.functional.mse_loss(model(x), y)

            step.run(loss_fn)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    assert opt.steps_taken == STEPS, "every step was taken"
    ours = expected_reads(method, opt, scaler=fp16)
    allowed = max(ours, STEPS)  # the scaler's check (once a step) or our verdict; AE-SAM's decisions besides
    assert reads.total <= allowed + (ours if fp16 else 0), f"{reads.total} host reads; ours:\n" + "\n".join(reads.ours)
    assert len(reads.ours) == ours, "\n".join(reads.ours)
    check_draws(method, reads)


class Regression(SAMMixin, pl.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.net, self.method = make_net(), method

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return METHODS[self.method](self.parameters())


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sammixin_reads_the_device_at_most_once_per_step(method: str, fp16: bool) -> None:
    precision = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]} if fp16 else {}
    fit = trainer(**precision)
    module = Regression(method)
    reads = HostReads()
    with reads:
        fit.fit(module, torch.utils.data.DataLoader(batches(), batch_size=None))
    assert fit.optimizers[0].steps_taken == STEPS
    assert len(reads.ours) == expected_reads(method, fit.optimizers[0], scaler=fp16), "\n".join(reads.ours)
    check_draws(method, reads, built=1)  # configure_optimizers runs in the fit


@pytest.mark.parametrize("method", sorted(METHODS))
def test_accumulation_reads_the_device_once_per_optimizer_step(method: str) -> None:
    model = make_net()
    opt = METHODS[method](model.parameters())
    step = SAMStep(opt, model)
    reads = HostReads()
    with reads:
        data = batches()
        for start in range(0, STEPS, 2):
            for x, y in data[start : start + 2]:
                step.run(lambda x=x, y=y: nn.functional.mse_loss(model(x), y) / 2)
            opt.step()
            opt.zero_grad()
    assert opt.steps_taken == STEPS // 2
    assert len(reads.ours) == expected_reads(method, opt, scaler=False, accumulate=2), "\n".join(reads.ours)


def test_davda54s_loop_with_a_grad_scaler_reads_once_more_than_samstep() -> None:
    """first_step/second_step cannot carry a non-finite first pass into the gradient: the verdict reads it."""
    model = make_net()
    opt = METHODS["sam"](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    reads = HostReads()
    with reads:
        for x, y in batches():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            opt.first_step(zero_grad=True, grad_scale=scaler.scale(torch.ones(())))  # the scale, unread
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert opt.steps_taken == STEPS
    assert len(reads.ours) == STEPS, "one verdict of ours per step, beside the scaler's own check"
