"""Memory per rank of SAM on an FSDP2-sharded model, against the base optimizer alone.

Spawns ``--world`` processes (gloo on the CPU, NCCL on CUDA; default: 2 on the CPU, every GPU on CUDA), shards an
MLP with ``fully_shard`` and trains a few steps with SGD and with ``SAM(SGD)`` driven by ``SAMStep``. Printed per
rank: the parameter bytes it holds, the bytes of SAM's saved copy of the weights (the target: the same, 1/N of
the model), and on CUDA the peak memory of a step (``torch.cuda.max_memory_allocated``) with each optimizer.

    python benchmarks/bench_fsdp.py [--device cpu|cuda] [--world 2] [--width 4096] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_sam import SAM, SAMStep


def model(width: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def run(rank: int, world: int, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    row = {}
    for name in ("SGD", "SAM(SGD)"):
        torch.manual_seed(0)
        net = model(args.width, args.layers).to(device)
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
        x = torch.randn(args.batch, args.width, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if name == "SGD":
            opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            for _ in range(args.steps):
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
        else:
            sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
            step = SAMStep(sam, net)
            for _ in range(args.steps):
                step.run(lambda net=net, x=x, y=y: nn.functional.cross_entropy(net(x), y))
                sam.step()
                sam.zero_grad()
            copy = sum(b.numel() * b.element_size() for b in sam.protocol.buffers.tensors())
            row["copy"] = copy
        local = sum(p.to_local().numel() * p.element_size() for p in net.parameters())
        row["local"] = local
        row[name] = torch.cuda.max_memory_allocated(device) if cuda else None
    results[rank] = row
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    results = mp.Manager().dict()
    mp.spawn(run, args=(world, args, results), nprocs=world, join=True)
    total = sum(p.numel() * p.element_size() for p in model(args.width, args.layers).parameters())
    mib = 2**20
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"device: {args.device} ({name}), world {world}, MLP {args.layers}x{args.width} ({total / mib:.1f} MiB of "
        f"parameters), torch {torch.__version__}"
    )
    print()
    print("| rank | parameters held (MiB) | SAM's saved copy (MiB) | copy / model | peak MiB SGD / SAM(SGD) |")
    print("|---:|---:|---:|---:|---:|")
    for rank in range(world):
        row = results[rank]
        peaks = f"{row['SGD'] / mib:.0f} / {row['SAM(SGD)'] / mib:.0f}" if row["SGD"] is not None else "n/a on CPU"
        print(f"| {rank} | {row['local'] / mib:.2f} | {row['copy'] / mib:.2f} | {row['copy'] / total:.3f} | {peaks} |")


if __name__ == "__main__":
    main()
