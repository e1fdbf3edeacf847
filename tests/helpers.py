"""Small Lightning modules and data shared by the tests and the DDP worker script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAM, SAMMixin

N_FEATURES, N_CLASSES = 6, 3


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=gen)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=False)


def batches(n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader(n, batch_size))


SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Net(pl.LightningModule):
    """A plain LightningModule under automatic optimization."""

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.9,
        rho: float = 0.05,
        dropout: float = 0.0,
        batchnorm: bool = False,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.momentum, self.rho, self.scheduler = lr, momentum, rho, scheduler
        layers: list[nn.Module] = [nn.Linear(N_FEATURES, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(16, N_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}


class SAMNet(SAMMixin, Net):
    """The SAM variant of `Net`: its training_step is inherited, only the optimizer changes."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=self.momentum)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class ResumableLoader:
    """A sized loader with ``state_dict``: Lightning resumes it mid-epoch exactly where the checkpoint was saved."""

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        self.batches = batches(n, batch_size)
        self.start = self.position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        for index in range(start, len(self.batches)):
            self.position = index + 1  # what a checkpoint taken after this batch resumes from
            yield self.batches[index]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["position"]


def worker_env() -> dict[str, str]:
    """The environment for a multi-process worker: the tests folder on the path, and a fresh process group.

    An in-process fit that initialized torch.distributed (FSDP on one device) leaves ``LOCAL_RANK`` and
    ``MASTER_PORT`` behind; a worker that inherits ``LOCAL_RANK`` has Lightning believe its ranks were launched
    for it, and waits for a rank 1 that never starts.
    """
    import os

    launched = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    return env


def leave_process_group() -> NoReturn:
    """End a worker process: a barrier, the process group torn down, then exit without the interpreter's teardown.

    The barrier: no rank tears down while the other still sends. The exit: FSDP2 and DTensor keep their gloo
    groups alive after ``destroy_process_group`` (DTensor's caches hold the device mesh, and the mesh its groups),
    so they would be destroyed while the interpreter shuts down, which can abort a finished worker ("terminate
    called without an active exception", exit code -6, after its results were saved; pytorch/pytorch#190489).
    Call it last: what the worker saved is closed, and nothing after it runs.
    """
    import os
    import sys

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker(script: Path, *args: str) -> None:
    """Run ``python script args`` with the tests folder on the path; fail with its stderr's tail if it fails."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(script), *args], env=worker_env(), capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise AssertionError(done.stderr[-5000:])
