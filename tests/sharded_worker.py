"""Run by tests/test_sharded.py as `python tests/sharded_worker.py OUT_DIR MODE [MODE ...]`: 2 CPU processes (gloo).

Lightning's ModelParallelStrategy (FSDP2 in ``configure_model``, data parallel or tensor parallel), Fabric, plain
``fully_shard`` and FSDP1 loops, each a fit or loop of its own in one process group; each rank saves what the test
needs to OUT_DIR/MODE/rank{R}.pt. The first mode must be a Lightning fit (it starts the process group).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import lightning.pytorch as pl
import torch
from helpers import Net, SAMNet, dataset, leave_process_group, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_sam import AESAM, GSAM, MSAM, RST, SAM, FriendlySAM, LookSAM, SAMStep, SharpnessMonitor
from lightning_sam.measures import MEASURES


def full_params(module: nn.Module) -> torch.Tensor:
    """Every parameter gathered whole (DTensors: all shards), flattened, in order."""
    return torch.cat(
        [(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten() for p in module.parameters()]
    )


def shard_data_parallel(net: nn.Module, mesh: Any) -> None:
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def data_parallel() -> ModelParallelStrategy:
    """FSDP2 over both processes ("auto" would make them one tensor-parallel group)."""
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


class ShardedSAMNet(SAMNet):
    """FSDP2 in configure_model, as Lightning's docs have it."""

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        else:
            shard_data_parallel(self.net, mesh["data_parallel"])


class ShardedNet(Net):
    def configure_model(self) -> None:
        shard_data_parallel(self.net, self.device_mesh["data_parallel"])


class Trajectory(Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.params.append(full_params(pl_module))


class RankData(pl.LightningDataModule):
    """Data parallel: every WORLD-th sample for each rank; tensor parallel: the same first half on both."""

    def __init__(self, same_on_every_rank: bool = False) -> None:
        super().__init__()
        self.same = same_on_every_rank

    def train_dataloader(self) -> Any:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        indices = range(0, 32) if self.same else range(rank, 64, world)
        return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset(), indices), batch_size=8, shuffle=False)


def lightning_fit(mode: str, out_dir: Path) -> dict[str, Any]:
    tensor_parallel = mode == "lightning_tp"
    strategy = data_parallel() if not tensor_parallel else ModelParallelStrategy(1, 2)
    kwargs: dict[str, Any] = {
        "lightning_accumulate_clip": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.1},
        "lightning_bf16": {"precision": "bf16-mixed"},
    }.get(mode, {})
    torch.manual_seed(0)
    module = ShardedSAMNet()
    trajectory = Trajectory()
    callbacks: list[Callback] = [trajectory]
    if mode == "lightning_checkpoint":
        callbacks.append(ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True))
    fit = trainer(
        strategy=strategy,
        devices=2,
        use_distributed_sampler=False,
        callbacks=callbacks,
        enable_checkpointing=mode == "lightning_checkpoint",
        max_epochs=2 if mode == "lightning_two_epochs" else 1,
        **kwargs,
    )
    fit.fit(module, datamodule=RankData(same_on_every_rank=tensor_parallel))
    opt = fit.optimizers[0]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())
    return {
        "trajectory": trajectory.params,
        "global_step": fit.global_step,
        "buffer_numel": sum(b.numel() for b in opt.protocol.buffers.tensors()),
        "local_numel": local,
        "full_numel": full_params(module).numel(),
    }


def lightning_resume(out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    module = ShardedSAMNet()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # the checkpoint must overwrite everything
    trajectory = Trajectory()
    fit = trainer(
        strategy=data_parallel(), devices=2, use_distributed_sampler=False, callbacks=[trajectory], max_epochs=2
    )
    ckpt = out_dir.parent / "lightning_checkpoint" / "ckpt" / "last.ckpt"
    fit.fit(module, datamodule=RankData(), ckpt_path=ckpt)
    return {"final": full_params(module), "global_step": fit.global_step}


# Every variant through a distributed checkpoint: a 2-epoch fit saving after each epoch, and a resume from epoch 1.
# 4 optimizer steps an epoch (32 samples per rank, batches of 8); the checkpoint holds steps 0-3. LookSAM's k=3: SAM
# steps 0, 3 and 6, so the checkpoint's g_v is step 3's and the resumed epoch's first step (a reuse) steps with it.
# FriendlySAM's moving average has had 4 updates; SAM(start=3) ascends from step 3, SAM(interval=2) on even steps.
SGD = torch.optim.SGD
VARIANTS: dict[str, Any] = {
    "looksam": lambda params: LookSAM(params, SGD, rho=0.05, k=3, alpha=0.7, lr=0.1, momentum=0.9),
    "gsam": lambda params: GSAM(params, SGD, rho=0.05, alpha=0.2, lr=0.1, momentum=0.9),
    "friendly_sam": lambda params: FriendlySAM(params, SGD, rho=0.05, lmbda=0.6, lr=0.1, momentum=0.9),
    "msam": lambda params: MSAM(params, SGD, rho=0.3, lr=0.1, momentum=0.9),
    "sam_interval": lambda params: SAM(params, SGD, rho=0.05, interval=2, lr=0.1, momentum=0.9),
    "sam_start": lambda params: SAM(params, SGD, rho=0.05, start=3, lr=0.1, momentum=0.9),
    "aesam": lambda params: AESAM(params, SGD, rho=0.05, delta=0.5, lambda1=-0.5, lambda2=0.5, lr=0.1, momentum=0.9),
    "rst": lambda params: RST(params, SGD, rho=0.05, p=0.3, p_end=0.8, schedule="linear", seed=5, lr=0.1, momentum=0.9),
}


class ShardedVariantNet(ShardedSAMNet):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant

    def make_optimizer(self) -> torch.optim.Optimizer:
        return VARIANTS[self.variant](self.parameters())  # type: ignore[no-any-return]


def local(value: Any) -> Any:
    """This rank's shard of a tensor (a copy), or the value as it is."""
    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def optimizer_snapshot(module: nn.Module, opt: SAM) -> dict[str, Any]:
    """This rank's view of the optimizer: the variant's state, the base optimizer's and the groups' keys, by name."""
    names = {p: name for name, p in module.named_parameters()}
    return {
        "sam_state": {
            names[p]: {k: local(v) for k, v in entries.items()} for p, entries in opt.sam_state.items() if entries
        },
        "sam_state_dtensor": {
            names[p]: {k: isinstance(v, DTensor) for k, v in entries.items()}
            for p, entries in opt.sam_state.items()
            if entries
        },
        "base_state": {names[p]: {k: local(v) for k, v in entries.items()} for p, entries in opt.state.items()},
        "groups": [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups],
    }


class Snapshots(Callback):
    """The optimizer at the end of the first epoch (what the checkpoint holds), and at the start of the fit."""

    def __init__(self) -> None:
        self.at_start: dict[str, Any] | None = None
        self.after_first_epoch: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = {**optimizer_snapshot(pl_module, trainer.optimizers[0]), "params": full_params(pl_module)}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.after_first_epoch = optimizer_snapshot(pl_module, trainer.optimizers[0])


def variant_fit(out_dir: Path, variant: str, resume: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    module = ShardedVariantNet(variant)
    if resume:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)  # the checkpoint must overwrite everything
    trajectory, snapshots = Trajectory(), Snapshots()
    callbacks: list[Callback] = [trajectory, snapshots]
    if not resume:
        callbacks.append(ModelCheckpoint(dirpath=out_dir / "ckpt", save_top_k=-1))  # after each epoch
    fit = trainer(
        strategy=data_parallel(),
        devices=2,
        use_distributed_sampler=False,
        callbacks=callbacks,
        enable_checkpointing=not resume,
        max_epochs=2,
    )
    ckpt = out_dir.parent / f"variant_{variant}" / "ckpt" / "epoch=0-step=4.ckpt" if resume else None
    fit.fit(module, datamodule=RankData(), ckpt_path=ckpt)
    return {
        "trajectory": trajectory.params,
        "global_step": fit.global_step,
        "at_start": snapshots.at_start,
        "after_first_epoch": snapshots.after_first_epoch,
        "final_state": optimizer_snapshot(module, fit.optimizers[0]),
    }


class AdamNet(Net):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class AdamSAMNet(SAMNet):
    def make_optimizer(self) -> torch.optim.Optimizer:
        return SAM(self.parameters(), torch.optim.AdamW, rho=self.rho, lr=0.01)


class ShardedAdamNet(AdamNet):
    def configure_model(self) -> None:
        shard_data_parallel(self.net, self.device_mesh["data_parallel"])


class ShardedAdamSAMNet(ShardedSAMNet, AdamSAMNet):
    """SAM over AdamW, FSDP2 or tensor parallel as ShardedSAMNet."""


# What the sharded monitor is compared on (test_sharded.py runs the same on one process).
MONITOR_SETTINGS: dict[str, Any] = {
    "measures": [m for m in MEASURES if m not in ("adaptive_avg", "adaptive_worst")],
    "every_n_steps": 2,
    "eig_tol": 1e-4,
    "top_k": 2,
    "trace_samples": 12,
    "spectrum_epochs": [0],
    "spectrum_iters": 8,
}
MONITORED = {
    "lightning_monitor_sam": (ShardedSAMNet, False),
    "lightning_monitor_plain": (ShardedNet, False),
    "lightning_monitor_adamw": (ShardedAdamNet, False),
    "lightning_monitor_tp": (ShardedAdamSAMNet, True),
}


def lightning_monitor(out_dir: Path, mode: str) -> dict[str, Any]:
    module_cls, tensor_parallel = MONITORED[mode]
    torch.manual_seed(0)
    monitor = SharpnessMonitor(**MONITOR_SETTINGS, per_module=mode == "lightning_monitor_sam")
    fit = trainer(
        strategy=ModelParallelStrategy(1, 2) if tensor_parallel else data_parallel(),
        devices=2,
        use_distributed_sampler=False,
        callbacks=[monitor],
        logger=CSVLogger(out_dir, name="csv"),
        log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module_cls(), datamodule=RankData(same_on_every_rank=tensor_parallel))
    eigenvector = monitor.eigenvector
    return {
        "history": monitor.history,
        "spectra": [(epoch, s.nodes, s.weights) for epoch, s in monitor.spectra],
        "warnings": [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)],
        "eigenvector_is_sharded": eigenvector is not None and all(isinstance(v, DTensor) for v in eigenvector),
    }


def lightning_monitor_resume(out_dir: Path) -> dict[str, Any]:
    """FSDP2 with the monitor: 2 epochs in one fit; 1 epoch, a checkpoint (sharded warm starts whole), a resume."""
    settings: dict[str, Any] = {"measures": ["hessian_max_eig", "hessian_top_eigs"], "every_n_steps": 2, "top_k": 2}
    histories = []
    for part in ("whole", "first", "resumed"):
        torch.manual_seed(0)
        monitor = SharpnessMonitor(**settings)
        callbacks: list[Callback] = [monitor]
        if part == "first":
            callbacks.append(ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True))
        fit = trainer(
            strategy=data_parallel(),
            devices=2,
            use_distributed_sampler=False,
            callbacks=callbacks,
            logger=CSVLogger(out_dir, name=part),
            log_every_n_steps=1,
            max_epochs=1 if part == "first" else 2,
            enable_checkpointing=part == "first",
        )
        ckpt = out_dir / "ckpt" / "last.ckpt" if part == "resumed" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit.fit(ShardedSAMNet(), datamodule=RankData(), ckpt_path=ckpt)
        histories.append(monitor.history)
        if part == "first":
            state = monitor.state_dict()
            whole = [
                isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
                for v in state["estimator_state"]["eigenvectors"][0]
            ]
    return {"whole": histories[0], "first": histories[1], "resumed": histories[2], "saved_whole": whole}


def lightning_sync_false(out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    module = ShardedSAMNet()
    module.sam_sync_ascent = False
    trajectory = Trajectory()
    fit = trainer(strategy=data_parallel(), devices=2, use_distributed_sampler=False, callbacks=[trajectory])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module, datamodule=RankData())
    return {
        "trajectory": trajectory.params,
        "warnings": [str(w.message) for w in caught if "sam_sync_ascent" in str(w.message)],
    }


def rank_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    subset = torch.utils.data.Subset(dataset(), range(rank, 64, world))
    return list(torch.utils.data.DataLoader(subset, batch_size=8, shuffle=False))


def plain_fsdp2(foreach: bool) -> dict[str, Any]:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    model = Net().net
    shard_data_parallel(model, mesh)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, foreach=foreach)
    step = SAMStep(opt, model)
    trajectory = []
    for x, y in rank_batches():
        step.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
        trajectory.append(full_params(model))
    return {"trajectory": trajectory, "buffer_numel": sum(b.numel() for b in opt.protocol.buffers.tensors())}


def plain_fsdp1() -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = FullyShardedDataParallel(Net().net, device_id=torch.device("cpu"), use_orig_params=True)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, process_group=model.process_group)
    step = SAMStep(opt, model, ascent_backward=torch.Tensor.backward)
    trajectory = []
    for x, y in rank_batches():
        step.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
        with FullyShardedDataParallel.summon_full_params(model):
            trajectory.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return {"trajectory": trajectory}


def fabric_fsdp2() -> dict[str, Any]:
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

    def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
        shard_data_parallel(model, mesh["data_parallel"])
        return model

    strategy = FabricModelParallel(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup(Net().net)
    opt = fabric.setup_optimizers(SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9))
    step = SAMStep(opt.optimizer, model, backward=fabric.backward)
    trajectory = []
    for x, y in rank_batches():
        step.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
        trajectory.append(full_params(model))
    return {"trajectory": trajectory}


def run(mode: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode.startswith("lightning_") and mode not in SPECIAL:
        result = lightning_fit(mode, out_dir)
    else:
        result = SPECIAL[mode](out_dir)
    torch.save(result, out_dir / f"rank{torch.distributed.get_rank()}.pt")


SPECIAL = {
    "lightning_resume": lightning_resume,
    **{mode: (lambda out, mode=mode: lightning_monitor(out, mode)) for mode in MONITORED},
    "lightning_monitor_resume": lightning_monitor_resume,
    "lightning_sync_false": lightning_sync_false,
    "plain_fsdp2_foreach": lambda out: plain_fsdp2(foreach=True),
    "plain_fsdp2_per_tensor": lambda out: plain_fsdp2(foreach=False),
    "plain_fsdp1": lambda out: plain_fsdp1(),
    "fabric_fsdp2": lambda out: fabric_fsdp2(),
    **{f"variant_{v}": (lambda out, v=v: variant_fit(out, v, resume=False)) for v in VARIANTS},
    **{f"variant_{v}_resume": (lambda out, v=v: variant_fit(out, v, resume=True)) for v in VARIANTS},
}


def main(out_dir: Path, modes: list[str]) -> None:
    for mode in modes:
        run(mode, out_dir / mode)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    main(Path(sys.argv[1]), sys.argv[2:])
    leave_process_group()
