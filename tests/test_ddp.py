"""`SAMMixin` under `strategy="ddp"` with 2 CPU processes (gloo), against single-process references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import MODES
from helpers import Net, dataset, flat_params
from torch import nn

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
RHO, WORLD = 0.05, 2


def run_ddp(mode: str, out_dir: Path) -> list[dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), mode, str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def rank_batches(rank: int, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What `ddp_worker.RankData` gives each rank: every WORLD-th sample, in order."""
    x, y = dataset().tensors
    x, y = x[rank::WORLD], y[rank::WORLD]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def grads_at_perturbed(
    model: nn.Module, ascent: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """The gradient at w + rho * g / ||g|| for the ascent direction g."""
    params = list(model.parameters())
    norm = torch.sqrt(sum((g**2).sum() for g in ascent))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, ascent, strict=True):
            p.add_(RHO * g / (norm + 1e-12))
    result = grads(model, x, y)
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return result


def reference(sync_ascent: bool, accumulate: int) -> list[torch.Tensor]:
    """Parameters after every batch, computed by hand in one process."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_rank = [rank_batches(r) for r in range(WORLD)]
    trajectory = []
    for start in range(0, len(per_rank[0]), accumulate):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for micro in range(start, start + accumulate):
            local = [grads(model, *per_rank[r][micro]) for r in range(WORLD)]
            synced = [torch.stack(gs).mean(0) for gs in zip(*local, strict=True)]
            for r in range(WORLD):
                ascent = synced if sync_ascent else local[r]
                g2 = grads_at_perturbed(model, ascent, *per_rank[r][micro])
                total = [t + g / (accumulate * WORLD) for t, g in zip(total, g2, strict=True)]
            trajectory.append(flat_params(model).clone() if micro < start + accumulate - 1 else None)
        for p, t in zip(model.parameters(), total, strict=True):
            p.grad = t
        opt.step()
        trajectory[-1] = flat_params(model).clone()
    return trajectory  # type: ignore[return-value]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_ddp_matches_the_single_process_reference(mode: str, tmp_path: Path) -> None:
    ranks = run_ddp(mode, tmp_path)
    settings = MODES[mode]
    expected = reference(settings["sam_sync_ascent"], settings["sam_accumulate_grad_batches"])
    assert ranks[0]["global_step"] == 4 // settings["sam_accumulate_grad_batches"]
    trajectories = [r["trajectory"] for r in ranks]
    assert len(trajectories[0]) == len(expected) == 4
    for step, (p0, p1, ref) in enumerate(zip(*trajectories, expected, strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5, msg=f"after batch {step}")


def test_unused_parameters_keep_the_reducer_correct(tmp_path: Path) -> None:
    ranks = run_ddp("unused_parameters", tmp_path)
    expected = reference(sync_ascent=False, accumulate=1)
    n = expected[0].numel()
    for p0, p1, ref in zip(ranks[0]["trajectory"], ranks[1]["trajectory"], expected, strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0[:n], ref, rtol=0, atol=1e-5)
        assert torch.equal(p0[n:], ranks[0]["trajectory"][0][n:]), "the unused parameter never moves"
    assert ranks[0]["global_step"] == 4


def test_per_device_and_synced_ascent_differ() -> None:
    """The two references are not the same update, so each test above checks its own mode."""
    a, b = reference(False, 1)[-1], reference(True, 1)[-1]
    assert not torch.allclose(a, b, rtol=0, atol=1e-5)


def test_monitor_averages_each_ranks_estimate_and_logs_from_rank_zero(tmp_path: Path) -> None:
    ranks = run_ddp("monitor", tmp_path)
    assert len(ranks[0]["local"]) == len(ranks[1]["local"]) == 4, "4 steps, each logged"
    for local0, local1, reduced0, reduced1 in zip(
        ranks[0]["local"], ranks[1]["local"], ranks[0]["reduced"], ranks[1]["reduced"], strict=True
    ):
        assert torch.equal(reduced0, reduced1)
        torch.testing.assert_close(reduced0, (local0 + local1) / 2)
        assert torch.isfinite(reduced0).all()
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["local"], ranks[1]["local"], strict=True)), (
        "each rank measures on its own batch"
    )
    logged = list((tmp_path / "csv").glob("version_*/metrics.csv"))
    assert len(logged) == 1, "one logger, on rank zero"
    header = logged[0].read_text().splitlines()[0]
    assert all(f"sharpness/{m}" in header for m in ("first_order", "hessian_max_eig", "adaptive_worst"))
