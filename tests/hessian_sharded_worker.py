"""The Hessian estimators on sharded parameters, 2 gloo processes: FSDP2 (fully_shard) and tensor parallelism.

Run as ``python hessian_sharded_worker.py OUT_DIR``: it spawns the two ranks itself (no Lightning, so it starts fast),
runs every case on each, and each rank saves what the tests compare to OUT_DIR/rank{R}.pt: the eigenvalues and
residuals, the eigenvectors gathered whole, the trace, the spectrum, and whether ``.grad`` and the weights were left
as they were. The models and batches are defined here, so that the tests build the single-process oracle from the
very same ones (float64, so that FSDP2's finite differences agree with exact products to ~1e-7).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import leave_process_group
from torch import nn

WORLD = 2
N_IN, N_HIDDEN, N_OUT, N_SAMPLES = 3, 4, 3, 16
TOL, MAX_ITERS = 1e-4, 40


def mlp() -> nn.Sequential:
    """The model both runs measure: float64, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch: FSDP2's ranks take every other sample each, tensor parallelism's both take all of it."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N_SAMPLES, N_IN, generator=gen, dtype=torch.float64), torch.randint(
        0, N_OUT, (N_SAMPLES,), generator=gen
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch()
    return x[rank::WORLD], y[rank::WORLD]


def preconditioner_whole(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A positive diagonal P, one whole tensor per parameter (the same on every rank)."""
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.2 for p in params]


def probe_whole(params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def measure(mode: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_sam.functional import like_param
    from lightning_sam.hessian import (
        HVPFallbackWarning,
        hessian_spectrum,
        hessian_top_eigs,
        hessian_trace,
        hessian_vector_product,
    )

    rank = dist.get_rank()
    mesh = dist.device_mesh.init_device_mesh("cpu", (WORLD,))
    model = mlp()
    if mode == "fsdp2":
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = rank_batch(rank)
    else:
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        x, y = batch()
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    # .grad set to something that must survive every call, as the object it is, bitwise
    grads = [
        like_param(p, torch.randn(p.to_local().shape, dtype=p.dtype, generator=gen(10 + i)))
        for i, p in enumerate(params)
    ]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    grad_values = [g.to_local().clone() for g in grads]
    weights = [p.to_local().clone() for p in params]
    placements = [tuple(p.placements) for p in params]

    out: dict[str, Any] = {"placements": [str(p) for p in placements]}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top1 = hessian_top_eigs(loss_fn, params, 1, tol=TOL, max_iters=MAX_ITERS, generator=gen(0))
        top3 = hessian_top_eigs(loss_fn, params, 3, tol=TOL, max_iters=MAX_ITERS, generator=gen(0))
        warm = hessian_top_eigs(
            loss_fn, params, 3, tol=TOL, max_iters=MAX_ITERS, init=top3.eigenvectors, generator=gen(0)
        )
        p_dtensors = [
            distribute_tensor(t, mesh, p.placements, src_data_rank=None)
            for t, p in zip(preconditioner_whole(params), params, strict=True)
        ]
        preconditioned = hessian_top_eigs(
            loss_fn, params, 3, tol=TOL, max_iters=MAX_ITERS, preconditioner=p_dtensors, generator=gen(0)
        )
        trace = hessian_trace(loss_fn, params, samples=9, generator=gen(4))
        hutchinson = hessian_trace(loss_fn, params, samples=3, method="hutchinson", generator=gen(5))
        spectrum = hessian_spectrum(loss_fn, params, iters=6, runs=2, generator=gen(6))
        probe = [
            distribute_tensor(t, mesh, p.placements, src_data_rank=None)
            for t, p in zip(probe_whole(params), params, strict=True)
        ]
        # finite differences from the start: the first gradient finds FSDP2 out (tensor parallel: autograd.grad)
        product = hessian_vector_product(loss_fn, params, probe, hvp="finite_difference")
        block = hessian_top_eigs(loss_fn, params[:2], 1, tol=TOL, max_iters=MAX_ITERS, generator=gen(7))
    out["seconds"] = time.perf_counter() - started
    out["warnings"] = [
        (w.category.__name__, str(w.message)) for w in caught if issubclass(w.category, HVPFallbackWarning)
    ]
    if mode == "fsdp2":
        try:
            hessian_top_eigs(loss_fn, params, 1, hvp="autograd", generator=gen(0))
            out["autograd_error"] = None
        except ValueError as error:
            out["autograd_error"] = str(error)

    for name, top in (
        ("top1", top1),
        ("top3", top3),
        ("warm", warm),
        ("preconditioned", preconditioned),
        ("block", block),
    ):
        out[name] = {
            "eigenvalues": top.eigenvalues,
            "residuals": top.residuals,
            "products": top.products,
            "exact": top.exact,
            "eigenvectors": [torch.cat([whole(t).flatten() for t in v]) for v in top.eigenvectors],
            "dtensors": all(
                isinstance(t, DTensor) and tuple(t.placements) == tuple(p.placements) and t.device_mesh == p.device_mesh
                for v in top.eigenvectors
                for t, p in zip(v, params, strict=False)
            ),
        }
    out["trace"] = (trace.trace, trace.stderr)
    out["hutchinson"] = (hutchinson.trace, hutchinson.stderr)
    out["spectrum"] = (spectrum.nodes, spectrum.weights)
    out["product"] = torch.cat([whole(t).flatten() for t in product])
    out["product_dtensors"] = all(isinstance(t, DTensor) for t in product)
    out["grad_objects_kept"] = all(p.grad is g for p, g in zip(params, grads, strict=True))
    out["grad_values_kept"] = all(
        torch.equal(p.grad.to_local(), v) for p, v in zip(params, grad_values, strict=True) if p.grad is not None
    )
    out["weights_kept"] = all(torch.equal(p.to_local(), w) for p, w in zip(params, weights, strict=True))
    return out


def run(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    results = {mode: measure(mode) for mode in ("fsdp2", "tensor_parallel")}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    leave_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=WORLD)
