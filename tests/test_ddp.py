"""`SAMMixin` under `strategy="ddp"` with 2 CPU processes (gloo), against single-process references."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_worker import SAM_MODES
from helpers import Net, dataset, flat_params, run_worker
from torch import nn

from lightning_sam import LookSAM, SAMStep

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
RHO, WORLD = 0.05, 2
ALL_MODES = [
    *SAM_MODES,
    "unused_parameters",
    "first_pass_only_parameter",
    "nan_on_rank_one",
    "automatic",
    "rho_zero",
    "monitor",
    "looksam",
    "aliased_training_step",
    "decorated_training_step",
    "partial_training_step",
    "named_training_step",
    "monitor_fails_on_rank_one",
    "plain_loop",  # it runs in the process group that the fits made
    "landscape_fails_on_rank_one_raises",  # fits that end in an error: both ranks raise at the same point
    "monitor_fails_on_rank_one_raises",
]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every mode, one after the other in one 2-process group (one start-up for all of them)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    run_worker(HERE / "ddp_worker.py", str(out_dir), *ALL_MODES)
    return out_dir


def ranks_of(ddp_runs: Path, mode: str) -> list[dict[str, Any]]:
    return [torch.load(ddp_runs / mode / f"rank{r}.pt") for r in range(WORLD)]


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


@pytest.mark.parametrize("mode", sorted(SAM_MODES))
def test_ddp_matches_the_single_process_reference(mode: str, ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, mode)
    sync_ascent, accumulate = SAM_MODES[mode]
    expected = reference(sync_ascent, accumulate)
    assert ranks[0]["global_step"] == 4 // accumulate
    trajectories = [r["trajectory"] for r in ranks]
    assert len(trajectories[0]) == len(expected) == 4
    for step, (p0, p1, ref) in enumerate(zip(*trajectories, expected, strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5, msg=f"after batch {step}")


def test_unused_parameters_keep_the_reducer_correct(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "unused_parameters")
    expected = reference(sync_ascent=False, accumulate=1)
    n = expected[0].numel()
    for p0, p1, ref in zip(ranks[0]["trajectory"], ranks[1]["trajectory"], expected, strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0[:n], ref, rtol=0, atol=1e-5)
        assert torch.equal(p0[n:], ranks[0]["trajectory"][0][n:]), "the unused parameter never moves"
    assert ranks[0]["global_step"] == 4


def test_a_parameter_only_the_first_pass_uses_steers_the_ascent_and_is_not_stepped(ddp_runs: Path) -> None:
    """find_unused_parameters=True, and a gate used at w only: the first pass must not leave DDP expecting it."""
    ranks = ranks_of(ddp_runs, "first_pass_only_parameter")
    torch.manual_seed(0)
    model = Net()
    gate = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = [*model.parameters(), gate]
    expected = []
    for micro in range(4):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(WORLD):
            x, y = rank_batches(r)[micro]
            g1 = torch.autograd.grad(nn.functional.cross_entropy(model(x) * gate, y), params)
            norm = torch.sqrt(sum((g**2).sum() for g in g1))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, g1, strict=True):
                    p.add_(RHO * g / (norm + 1e-12))
            g2 = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
            total = [t + g / WORLD for t, g in zip(total, g2, strict=True)]
        for p, t in zip(model.parameters(), total, strict=True):
            p.grad = t
        opt.step()
        expected.append(torch.cat([gate.detach().reshape(1), flat_params(model)]))  # own parameters first
    for step, (p0, p1, ref) in enumerate(zip(ranks[0]["trajectory"], ranks[1]["trajectory"], expected, strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5, msg=f"after batch {step}")
    assert ranks[0]["trajectory"][-1][0] == 1.0, "the gate gets no gradient at w + e and never moves"


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_bitwise(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "nan_on_rank_one")
    for rank in ranks:
        assert torch.equal(rank["trajectory"][2], rank["trajectory"][1]), "weights unchanged by the skipped step"
        for k, momentum in rank["momentum"][2].items():
            assert torch.equal(momentum, rank["momentum"][1][k]), "optimizer state unchanged too"
        assert not torch.equal(rank["trajectory"][3], rank["trajectory"][2]), "training goes on"
        assert all(torch.isfinite(p).all() for p in rank["trajectory"])
    for p0, p1 in zip(ranks[0]["trajectory"], ranks[1]["trajectory"], strict=True):
        assert torch.equal(p0, p1)


@pytest.mark.parametrize("mode", ["aliased_training_step", "decorated_training_step", "partial_training_step"])
def test_an_aliased_training_step_trains_like_a_named_one_and_the_ranks_agree(ddp_runs: Path, mode: str) -> None:
    """``training_step = _step``: the second pass must not re-enter SAM (on DDP its gradient was never all-reduced)."""
    aliased, named = ranks_of(ddp_runs, mode), ranks_of(ddp_runs, "named_training_step")
    for rank_aliased, rank_named in zip(aliased, named, strict=True):
        assert len(rank_aliased["trajectory"]) == 4
        for a, b in zip(rank_aliased["trajectory"], rank_named["trajectory"], strict=True):
            assert torch.equal(a, b)
    for p0, p1 in zip(aliased[0]["trajectory"], aliased[1]["trajectory"], strict=True):
        assert torch.equal(p0, p1), "the ranks agree"


def test_rho_zero_is_the_automatic_ddp_fit_bitwise(ddp_runs: Path) -> None:
    """SAM with rho=0 takes the base optimizer's steps: under DDP, exactly Lightning's own automatic fit."""
    sam, plain = ranks_of(ddp_runs, "rho_zero"), ranks_of(ddp_runs, "automatic")
    for rank_sam, rank_plain in zip(sam, plain, strict=True):
        assert rank_sam["global_step"] == rank_plain["global_step"] == 4
        for a, b in zip(rank_sam["trajectory"], rank_plain["trajectory"], strict=True):
            assert torch.equal(a, b)


def test_sam_step_in_a_plain_ddp_loop_ascends_per_device(ddp_runs: Path) -> None:
    """No Lightning and no no_sync: the first pass's gradient stays local by construction."""
    ranks = ranks_of(ddp_runs, "plain_loop")
    for step, (p0, p1, ref) in enumerate(zip(*(r["trajectory"] for r in ranks), reference(False, 1), strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5, msg=f"after batch {step}")


def test_looksam_ascends_globally_and_equals_one_process_on_the_concatenated_batch(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "looksam")
    torch.manual_seed(0)
    model = Net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=2, lr=0.1, momentum=0.9)
    step = SAMStep(opt, model)
    per_rank = [rank_batches(r) for r in range(WORLD)]
    expected = []
    for (x0, y0), (x1, y1) in zip(*per_rank, strict=True):
        x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
        step.run(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
        expected.append(flat_params(model).clone())
    for i, (p0, p1, ref) in enumerate(zip(ranks[0]["trajectory"], ranks[1]["trajectory"], expected, strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {i}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5, msg=f"after batch {i}")


def test_per_device_and_synced_ascent_differ() -> None:
    """The two references are not the same update, so each test above checks its own mode."""
    a, b = reference(False, 1)[-1], reference(True, 1)[-1]
    assert not torch.allclose(a, b, rtol=0, atol=1e-5)


def test_monitor_averages_each_ranks_estimate_and_logs_from_rank_zero(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "monitor")
    assert len(ranks[0]["local"]) == len(ranks[1]["local"]) == 4, "4 steps, each logged"
    assert len(ranks[0]["history"]) == 5 and "sharpness/negative_fraction" in ranks[0]["history"][-1][1], "the spectrum"
    assert ranks[0]["history"] == ranks[1]["history"], "every rank has the same values"
    assert any(a != b for a, b in zip(ranks[0]["local"], ranks[1]["local"], strict=True)), "each rank's own batch"
    checkpointed = ranks[0]["checkpointed_batches"]
    assert len(checkpointed) == WORLD, "the checkpoint keeps every rank's fixed batch"
    for rank in range(WORLD):
        x, y = rank_batches(rank)[0]
        assert torch.equal(checkpointed[rank][0], x) and torch.equal(checkpointed[rank][1], y)
    logged = list((ddp_runs / "monitor" / "csv").glob("version_*/metrics.csv"))
    assert len(logged) == 1, "one logger, on rank zero"
    header = logged[0].read_text().splitlines()[0]
    assert all(f"sharpness/{m}" in header for m in ("first_order", "hessian_max_eig", "adaptive_worst"))
    rounds = list(zip(ranks[0]["local"], ranks[1]["local"], [v for _, v in ranks[0]["history"][:4]], strict=True))
    for local0, local1, logged0 in rounds:
        assert sorted(local0) == sorted(local1)
        assert sorted(logged0) == sorted(f"sharpness/{k}" for k in local0)
        for key in local0:
            if key.endswith("_stderr"):  # the standard error of the mean: sqrt(Σσ²)/R
                expected = math.sqrt(local0[key] ** 2 + local1[key] ** 2) / WORLD
            elif key.endswith("_residual"):  # a bound: the worst rank's
                expected = max(local0[key], local1[key])
            else:
                expected = (local0[key] + local1[key]) / WORLD
            assert logged0[f"sharpness/{key}"] == pytest.approx(expected, rel=1e-5), key
    assert any(k.endswith("_stderr") for local, *_ in rounds for k in local)
    assert any(k.endswith("_residual") for local, *_ in rounds for k in local)
    (epoch0, nodes0, weights0), (epoch1, nodes1, weights1) = ranks[0]["spectra"][0], ranks[1]["spectra"][0]
    assert epoch0 == epoch1 == 0 and nodes0.shape == (WORLD * 2, 10), "both ranks' runs, 2 each"
    assert torch.equal(nodes0, nodes1) and torch.equal(weights0, weights1)
    assert not torch.allclose(nodes0[:2], nodes0[2:]), "each rank's own batch"


def test_a_measure_missing_on_one_rank_is_missing_on_all_and_nobody_waits(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "monitor_fails_on_rank_one")
    assert ranks[0]["error"] is None and ranks[1]["error"] is None and ranks[0]["global_step"] == 4
    assert ranks[0]["history"] == ranks[1]["history"], "both ranks log the same keys and values"
    keys = {k for _, values in ranks[0]["history"] for k in values}
    assert {"sharpness/grad_norm", "sharpness/hessian_max_eig"} <= keys
    assert "sharpness/rank_one_only" not in keys, "unavailable on rank 1: missing on both"
    assert "sharpness/negative_fraction" not in keys, "the spectrum failed on rank 1: missing on both"


def test_a_measure_raising_on_one_rank_raises_on_every_rank_instead_of_a_hang(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "monitor_fails_on_rank_one_raises")
    assert ranks[1]["error"] == "MisconfigurationException: rank 1's measure broke"
    assert ranks[0]["error"] is not None and ranks[0]["error"].startswith("MeasureFailed"), ranks[0]["error"]


def test_a_landscape_failing_on_one_rank_raises_on_every_rank_instead_of_a_hang(ddp_runs: Path) -> None:
    ranks = ranks_of(ddp_runs, "landscape_fails_on_rank_one_raises")
    assert ranks[1]["error"] == "RuntimeError: rank 1's landscape broke"
    assert ranks[0]["error"] is not None and ranks[0]["error"].startswith("MeasureFailed"), ranks[0]["error"]
