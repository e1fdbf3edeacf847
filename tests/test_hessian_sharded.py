"""The Hessian estimators on sharded parameters (FSDP2, tensor parallelism), 2 gloo processes, against one process.

The oracles: the dense Hessian of the whole model on the concatenated batch (tensor parallelism: on the batch both
ranks see), and the same estimators in one process with the same generators, which a sharded run must reproduce (its
random vectors are the ones one process draws, cut into shards). One worker launch runs every case
(hessian_sharded_worker.py); FSDP2's products are finite differences (it has no double backward), in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_worker
from hessian_sharded_worker import (
    MAX_ITERS,
    TOL,
    WORLD,
    batch,
    mlp,
    preconditioner_whole,
    probe_whole,
    rank_batch,
)
from torch import nn

from lightning_sam.hessian import hessian_spectrum, hessian_top_eigs, hessian_trace, hessian_vector_product

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
MODES = ["fsdp2", "tensor_parallel"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("hessian_sharded")
    run_worker(HERE / "hessian_sharded_worker.py", str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def dense_hessian(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(p.shape) for t, p in zip(flat.split(sizes), params, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, tensors, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    weights = torch.cat([p.detach().flatten() for p in params])
    return torch.autograd.functional.hessian(loss_of_flat, weights, vectorize=True)


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """The same calls in one process, on the whole model and the concatenated batch."""
    model = mlp()
    params = list(model.parameters())
    x, y = batch()

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    kwargs: dict[str, Any] = {"tol": TOL, "max_iters": MAX_ITERS}
    top1 = hessian_top_eigs(loss_fn, params, 1, generator=gen(0), **kwargs)
    top3 = hessian_top_eigs(loss_fn, params, 3, generator=gen(0), **kwargs)
    p_whole = preconditioner_whole(params)
    preconditioned = hessian_top_eigs(loss_fn, params, 3, preconditioner=p_whole, generator=gen(0), **kwargs)
    block = hessian_top_eigs(loss_fn, params[:2], 1, generator=gen(7), **kwargs)
    hessian = dense_hessian(x, y)
    d = torch.cat([p.flatten() for p in p_whole]).rsqrt()
    n_block = sum(p.numel() for p in params[:2])
    return {
        "top1": top1,
        "top3": top3,
        "preconditioned": preconditioned,
        "block": block,
        "trace": hessian_trace(loss_fn, params, samples=9, generator=gen(4)),
        "hutchinson": hessian_trace(loss_fn, params, samples=3, method="hutchinson", generator=gen(5)),
        "spectrum": hessian_spectrum(loss_fn, params, iters=6, runs=2, generator=gen(6)),
        "product": torch.cat([t.flatten() for t in hessian_vector_product(loss_fn, params, probe_whole(params))]),
        "hessian": hessian,
        "operators": {
            "top1": hessian,
            "top3": hessian,
            "warm": hessian,
            "preconditioned": d[:, None] * hessian * d[None, :],
            "block": hessian[:n_block, :n_block],
        },
    }


def test_the_oracle_tells_the_global_batch_from_one_ranks_half() -> None:
    """FSDP2's ranks each see half of the batch: a run on one half would fail the comparisons below."""
    top = torch.linalg.eigvalsh(dense_hessian(*batch()))[-1]
    for rank in range(WORLD):
        half = torch.linalg.eigvalsh(dense_hessian(*rank_batch(rank)))[-1]
        assert abs(half - top) > 1e-2 * top


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_returns_the_same_numbers(mode: str, ranks: list[dict[str, Any]]) -> None:
    first, second = (r[mode] for r in ranks)
    for name in ("top1", "top3", "warm", "preconditioned", "block"):
        for key in ("eigenvalues", "residuals"):
            assert torch.equal(first[name][key], second[name][key]), (name, key)
        assert first[name]["products"] == second[name]["products"]
        for a, b in zip(first[name]["eigenvectors"], second[name]["eigenvectors"], strict=True):
            assert torch.equal(a, b), name
    for name in ("trace", "hutchinson", "spectrum"):
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name], strict=True)), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["top1", "top3", "warm", "preconditioned", "block"])
def test_top_eigenpairs_equal_one_process_and_the_dense_hessian(
    mode: str, name: str, ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    got = ranks[0][mode][name]
    operator = one_process["operators"][name]
    reference = one_process["top3" if name == "warm" else name]
    exact = torch.linalg.eigvalsh(operator).flip(0)[: len(got["eigenvalues"])]
    torch.testing.assert_close(got["eigenvalues"], exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(got["eigenvalues"], reference.eigenvalues, rtol=1e-6, atol=0)
    assert got["exact"] is (mode == "tensor_parallel"), "FSDP2: finite differences; tensor parallel: double backward"
    assert got["dtensors"], "eigenvectors are DTensors placed like the parameters"
    for value, vector, residual, ref in zip(
        got["eigenvalues"], got["eigenvectors"], got["residuals"], reference.eigenvectors, strict=True
    ):
        assert vector.norm().item() == pytest.approx(1.0, rel=1e-9)
        true_residual = ((operator @ vector - value * vector).norm() / value.abs()).item()
        assert true_residual <= TOL * 1.01 + (0 if got["exact"] else 1e-6)
        assert residual.item() == pytest.approx(true_residual, rel=1e-3, abs=1e-7 if got["exact"] else 1e-5)
        ref_vector = torch.cat([t.flatten() for t in ref])
        assert abs(torch.dot(vector, ref_vector).item()) == pytest.approx(1.0, abs=1e-6), "one process's eigenvector"


@pytest.mark.parametrize("mode", MODES)
def test_eigenvectors_warm_start_the_next_call(mode: str, ranks: list[dict[str, Any]]) -> None:
    result = ranks[0][mode]
    assert result["warm"]["dtensors"]
    assert result["warm"]["products"] < result["top3"]["products"]


@pytest.mark.parametrize("mode", MODES)
def test_trace_equals_one_process_and_the_dense_trace_within_its_stderr(
    mode: str, ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    exact = torch.trace(one_process["hessian"]).item()
    for name in ("trace", "hutchinson"):
        trace, stderr = ranks[0][mode][name]
        reference = one_process[name]
        assert trace.item() == pytest.approx(reference.trace.item(), rel=1e-6), name
        assert stderr.item() == pytest.approx(reference.stderr.item(), rel=1e-4), name
        assert abs(trace.item() - exact) <= 3 * stderr.item(), name


@pytest.mark.parametrize("mode", MODES)
def test_spectrum_and_products_equal_one_process(
    mode: str, ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    nodes, weights = ranks[0][mode]["spectrum"]
    torch.testing.assert_close(nodes, one_process["spectrum"].nodes, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weights, one_process["spectrum"].weights, rtol=1e-5, atol=1e-9)
    assert ranks[0][mode]["product_dtensors"]
    expected = one_process["hessian"] @ torch.cat([t.flatten() for t in probe_whole(list(mlp().parameters()))])
    torch.testing.assert_close(ranks[0][mode]["product"], expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ranks[0][mode]["product"], one_process["product"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_grads_and_weights_are_left_as_they_were(mode: str, ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        result = rank[mode]
        assert result["grad_objects_kept"], ".grad: the same tensors (FSDP2's backward wrote and gave them back)"
        assert result["grad_values_kept"], ".grad: bitwise the values they had"
        assert result["weights_kept"], "weights: bitwise"


def test_fsdp2_products_are_finite_differences_with_a_warning_and_autograd_is_a_clear_error(
    ranks: list[dict[str, Any]],
) -> None:
    fsdp2, tensor_parallel = ranks[0]["fsdp2"], ranks[0]["tensor_parallel"]
    assert fsdp2["warnings"] and all("FSDP2" in message for _, message in fsdp2["warnings"])
    assert fsdp2["autograd_error"] is not None and "hvp='finite_difference'" in fsdp2["autograd_error"]
    assert tensor_parallel["warnings"] == [], "tensor parallelism: exact products, no fallback"
    assert "Replicate()" in " ".join(tensor_parallel["placements"]), "a replicated parameter is counted once"
