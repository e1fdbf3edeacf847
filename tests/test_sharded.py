"""SAM on sharded models (FSDP2 through Lightning, Fabric and plain loops; tensor parallelism; FSDP1), 2 gloo processes.

The oracle: one process on the concatenated batch (for tensor parallelism, on the same batch), written out from the
paper below. Under sharding the ascent is global, so the sharded run must equal it to float precision.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Net, SAMNet, dataset, flat_params, loader, run_worker, trainer, worker_env
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sharded_worker import MONITOR_SETTINGS, MONITORED, AdamNet, AdamSAMNet
from torch import nn

from lightning_sam import SAM, SharpnessMonitor

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
RHO, WORLD = 0.05, 2
MODES = [
    "lightning_dp",  # first: a Lightning fit starts the process group
    "lightning_accumulate_clip",
    "lightning_bf16",
    "lightning_tp",
    "lightning_checkpoint",
    "lightning_resume",
    "lightning_two_epochs",
    "lightning_monitor_sam",
    "lightning_monitor_plain",
    "lightning_monitor_adamw",
    "lightning_monitor_tp",
    "lightning_monitor_resume",
    "lightning_sync_false",
    "plain_fsdp2_foreach",
    "plain_fsdp2_per_tensor",
    "plain_fsdp1",
    "fabric_fsdp2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("sharded")
    run_worker(HERE / "sharded_worker.py", str(out_dir), *MODES)
    return out_dir


def ranks_of(runs: Path, mode: str) -> list[dict[str, Any]]:
    return [torch.load(runs / mode / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def global_batches(same_on_every_rank: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What one process sees: both ranks' batches concatenated (tensor parallel: the batch both ranks see)."""
    x, y = dataset().tensors
    if same_on_every_rank:
        return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    per_rank = [(x[r::WORLD], y[r::WORLD]) for r in range(WORLD)]
    return [
        (torch.cat([xr[i : i + 8] for xr, _ in per_rank]), torch.cat([yr[i : i + 8] for _, yr in per_rank]))
        for i in range(0, 32, 8)
    ]


def reference(
    accumulate: int = 1, clip: float | None = None, bf16: bool = False, same_on_every_rank: bool = False
) -> list[torch.Tensor]:
    """SAM (SGD with momentum) in one process, from the paper: the parameters after every batch."""
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def loss_at(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return nn.functional.cross_entropy(model(x), y)

    trajectory = []
    batches = global_batches(same_on_every_rank)
    for start in range(0, len(batches), accumulate):
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches[start : start + accumulate]:
            g = torch.autograd.grad(loss_at(x, y), params)
            norm = torch.sqrt(sum((t.float() ** 2).sum() for t in g))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, g, strict=True):
                    p.add_(RHO * t / (norm + 1e-12))
            g2 = torch.autograd.grad(loss_at(x, y) / accumulate, params)
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
            total = [a + b for a, b in zip(total, g2, strict=True)]
            if len(trajectory) < start + accumulate - 1:
                trajectory.append(flat_params(model).clone())
        for p, t in zip(params, total, strict=True):
            p.grad = t
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        trajectory.append(flat_params(model).clone())
    return trajectory


def assert_trajectory(ranks: list[dict[str, Any]], expected: list[torch.Tensor], atol: float = 1e-6) -> None:
    trajectories = [r["trajectory"] for r in ranks]
    assert len(trajectories[0]) == len(expected) == 4
    for step, (p0, p1, ref) in enumerate(zip(*trajectories, expected, strict=True)):
        assert torch.equal(p0, p1), f"ranks differ after batch {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=atol, msg=f"after batch {step}")


@pytest.mark.parametrize(
    ("mode", "kwargs", "atol"),
    [
        ("lightning_dp", {}, 1e-6),
        ("lightning_accumulate_clip", {"accumulate": 2, "clip": 0.1}, 1e-6),
        ("lightning_bf16", {"bf16": True}, 2e-3),
        ("lightning_tp", {"same_on_every_rank": True}, 1e-6),
        ("plain_fsdp2_foreach", {}, 1e-6),
        ("plain_fsdp2_per_tensor", {}, 1e-6),
        ("plain_fsdp1", {}, 1e-6),
        ("fabric_fsdp2", {}, 1e-6),
    ],
)
def test_sharded_sam_equals_one_process_on_the_global_batch(
    mode: str, kwargs: dict[str, Any], atol: float, runs: Path
) -> None:
    assert_trajectory(ranks_of(runs, mode), reference(**kwargs), atol=atol)


def test_the_references_differ_from_each_other() -> None:
    """Accumulation with clipping, bf16 and tensor parallelism are each a different update: each test checks its own."""
    finals = [reference()[-1], reference(accumulate=2, clip=0.1)[-1], reference(same_on_every_rank=True)[-1]]
    assert not torch.allclose(finals[0], finals[1], rtol=0, atol=1e-4)
    assert not torch.allclose(finals[0], finals[2], rtol=0, atol=1e-4)
    assert not torch.allclose(reference(bf16=True)[-1], finals[0], rtol=0, atol=1e-6)


def test_the_saved_copy_holds_each_ranks_shard_only(runs: Path) -> None:
    for mode in ("lightning_dp", "plain_fsdp2_foreach"):
        ranks = ranks_of(runs, mode)
        full = flat_params(Net()).numel()
        assert sum(r["buffer_numel"] for r in ranks) == full, "the shards add up to one copy of the parameters"
        assert all(r["buffer_numel"] < 0.6 * full for r in ranks), "each rank holds about 1/2"
    dp = ranks_of(runs, "lightning_dp")
    assert all(r["buffer_numel"] == r["local_numel"] for r in dp)


def test_resume_from_a_distributed_checkpoint_equals_the_uninterrupted_run(runs: Path) -> None:
    resumed, uninterrupted = ranks_of(runs, "lightning_resume"), ranks_of(runs, "lightning_two_epochs")
    assert (runs / "lightning_checkpoint" / "ckpt" / "last.ckpt").is_dir(), "a distributed checkpoint: a folder"
    for rank_resumed, rank_full in zip(resumed, uninterrupted, strict=True):
        assert rank_resumed["global_step"] == rank_full["global_step"] == 8
        assert torch.equal(rank_resumed["final"], rank_full["trajectory"][-1])


# Every variant through a distributed checkpoint ----------------------------------------------------------------------
# A 2-epoch fit (4 optimizer steps an epoch) that saves a distributed checkpoint after each epoch, and a fit resumed
# from the first one (from other weights, which the checkpoint must overwrite) that trains the second epoch; see
# VARIANTS in sharded_worker.py. Simplest first: a variant whose resume crashes (which ends the worker) leaves the
# results of the ones before it.
VARIANTS = ["sam_interval", "sam_start", "gsam", "msam", "friendly_sam", "looksam", "aesam", "rst"]
VARIANT_MODES = [mode for v in VARIANTS for mode in (f"variant_{v}", f"variant_{v}_resume")]
STATE_NAMES = {
    "looksam": {"looksam_gv", "looksam_gv_norm"},
    "friendly_sam": {"fsam_m"},
    "aesam": {"aesam_mu", "aesam_sigma"},
}  # the others: none
SCALARS = {"looksam_gv_norm", "aesam_mu", "aesam_sigma"}  # 0-dim, the same on every rank: plain tensors
# besides every method's sam_steps and sam_ascents
GROUP_KEYS = {"gsam": {"gsam_lr_max"}, "friendly_sam": {"fsam_updates"}, "rst": {"rst_generator"}}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One worker for every variant's modes, apart from `runs`: a crash here fails the variant tests only."""
    out_dir = tmp_path_factory.mktemp("sharded_variants")
    done = subprocess.run(
        [sys.executable, str(HERE / "sharded_worker.py"), str(out_dir), *VARIANT_MODES],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    why = "" if done.returncode == 0 else f"the worker failed (exit {done.returncode}):\n{done.stderr[-5000:]}"
    return out_dir, why


def variant_ranks(variant_runs: tuple[Path, str], mode: str) -> list[dict[str, Any]]:
    out_dir, why = variant_runs
    if not all((out_dir / mode / f"rank{r}.pt").exists() for r in range(WORLD)):
        pytest.fail(f"{mode} left no results; {why or 'the worker did not run it'}")
    return ranks_of(out_dir, mode)


def assert_same_values(got: Any, expected: Any, where: str) -> None:
    """Equal nested dicts and lists, tensors bitwise (dtype and shape too), each key present on both sides."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is not a dict"
        assert set(got) == set(expected), f"{where}: keys {sorted(got)} != {sorted(expected)}"
        for key in expected:
            assert_same_values(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: {got!r} != {expected!r}"
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_values(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {got!r} is not a tensor"
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{where}: {got} != {expected}"
        assert torch.equal(got, expected), f"{where}: {got} != {expected}"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_state_at_the_checkpoint_is_the_variants_and_not_trivial(
    variant: str, variant_runs: tuple[Path, str]
) -> None:
    for rank, run in enumerate(variant_ranks(variant_runs, f"variant_{variant}")):
        saved = run["after_first_epoch"]
        for group in saved["groups"]:
            assert group["sam_steps"] == 4, f"rank {rank}: the checkpoint holds 4 steps"
            assert 0 <= group["sam_ascents"] <= 4
            assert GROUP_KEYS.get(variant, set()) <= set(group), f"rank {rank}: {sorted(group)}"
        assert len(saved["base_state"]) == 4 and all("momentum_buffer" in s for s in saved["base_state"].values())
        names = STATE_NAMES.get(variant, set())
        assert set(saved["sam_state"]) == (set(saved["base_state"]) if names else set()), f"rank {rank}"
        for name, entries in saved["sam_state"].items():
            assert set(entries) == names, f"rank {rank}, {name}: {sorted(entries)}"
            momentum = saved["base_state"][name]["momentum_buffer"]
            for key, value in entries.items():
                if key in SCALARS:
                    assert value.dim() == 0 and value > 0, f"rank {rank}, {name}.{key}: moved by the first steps"
                    assert not saved["sam_state_dtensor"][name][key]
                else:  # like the parameter: a DTensor, this rank's shard of it
                    assert saved["sam_state_dtensor"][name][key], f"rank {rank}, {name}.{key} is no DTensor"
                    assert value.shape == momentum.shape, f"rank {rank}, {name}.{key}: {value.shape}"
        if variant == "looksam":
            assert any(bool(e["looksam_gv"].abs().sum() > 0) for e in saved["sam_state"].values() if e)
        if variant == "friendly_sam":
            assert all(g["fsam_updates"] == 4 for g in saved["groups"]), "the moving average moved on every step"
            assert any(bool(e["fsam_m"].abs().sum() > 0) for e in saved["sam_state"].values())
        if variant == "gsam":
            assert all(g["gsam_lr_max"] == 0.1 for g in saved["groups"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_state_after_loading_a_distributed_checkpoint_is_each_ranks_shard_of_it(
    variant: str, variant_runs: tuple[Path, str]
) -> None:
    """Directly: what the resumed fit starts from (on_train_start) is what the uninterrupted run had after epoch 1."""
    resumed = variant_ranks(variant_runs, f"variant_{variant}_resume")
    uninterrupted = variant_ranks(variant_runs, f"variant_{variant}")
    for rank, (rank_resumed, rank_full) in enumerate(zip(resumed, uninterrupted, strict=True)):
        loaded, saved = rank_resumed["at_start"], rank_full["after_first_epoch"]
        for key in ("sam_state", "sam_state_dtensor", "base_state", "groups"):
            assert_same_values(loaded[key], saved[key], f"rank {rank}, {key}")
        assert torch.equal(loaded["params"], rank_full["trajectory"][3]), f"rank {rank}: the checkpoint's weights"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_resumed_from_a_distributed_checkpoint_equals_the_uninterrupted_run(
    variant: str, variant_runs: tuple[Path, str]
) -> None:
    resumed = variant_ranks(variant_runs, f"variant_{variant}_resume")
    uninterrupted = variant_ranks(variant_runs, f"variant_{variant}")
    assert (variant_runs[0] / f"variant_{variant}" / "ckpt" / "epoch=0-step=4.ckpt").is_dir(), "a distributed one"
    for run in (resumed, uninterrupted):
        assert all(torch.equal(a, b) for a, b in zip(run[0]["trajectory"], run[1]["trajectory"], strict=True))
    for rank, (rank_resumed, rank_full) in enumerate(zip(resumed, uninterrupted, strict=True)):
        assert rank_resumed["global_step"] == rank_full["global_step"] == 8
        assert len(rank_full["trajectory"]) == 8 and len(rank_resumed["trajectory"]) == 4
        for step, (a, b) in enumerate(zip(rank_resumed["trajectory"], rank_full["trajectory"][4:], strict=True)):
            assert torch.equal(a, b), f"rank {rank}: after step {4 + step}, max diff {(a - b).abs().max()}"
        assert_same_values(rank_resumed["final_state"], rank_full["final_state"], f"rank {rank}, after step 7")


def test_per_device_ascent_cannot_apply_and_says_so_once(runs: Path) -> None:
    ranks, dp = ranks_of(runs, "lightning_sync_false"), ranks_of(runs, "lightning_dp")
    assert len(ranks[0]["warnings"]) == 1 and "the parameters are sharded" in ranks[0]["warnings"][0]
    for a, b in zip(ranks[0]["trajectory"], dp[0]["trajectory"], strict=True):
        assert torch.equal(a, b), "the global ascent, as by default"


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy refuses the CPU by name; a subclass gets through to the point SAM refuses it."""


def test_fsdp1_strategy_is_refused_at_fit_start_with_the_way_to_fsdp2() -> None:
    module = SAMNet()
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*ModelParallelStrategy.*fully_shard"):
        trainer(strategy=CPUFSDPStrategy(), devices=1).fit(module, loader())
    assert module.trainer.optimizers == [], "refused before anything was set up"


ONE_PROCESS = {
    "lightning_monitor_sam": SAMNet,
    "lightning_monitor_plain": Net,
    "lightning_monitor_adamw": AdamNet,
    "lightning_monitor_tp": AdamSAMNet,
}


def one_process_monitor(mode: str, tmp_path: Path, hvp: str = "auto") -> tuple[SharpnessMonitor, Any]:
    """The same monitor on one process, the full model, and what both ranks see (concatenated, or the same batch)."""
    tensor_parallel = MONITORED[mode][1]
    x, y = (torch.cat(t) for t in zip(*global_batches(same_on_every_rank=tensor_parallel), strict=True))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8 if tensor_parallel else 16, shuffle=False
    )
    torch.manual_seed(0)
    monitor = SharpnessMonitor(**MONITOR_SETTINGS, per_module=mode == "lightning_monitor_sam", hvp=hvp)
    fit = trainer(callbacks=[monitor], logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.fit(ONE_PROCESS[mode](), data)
    return monitor, fit


@pytest.mark.parametrize("mode", list(MONITORED))
def test_monitor_on_sharded_parameters_equals_one_process_on_the_full_model(
    mode: str, runs: Path, tmp_path: Path
) -> None:
    """FSDP2 and tensor parallelism: the Hessian measures over DTensors, each within 1% of one process."""
    ranks = ranks_of(runs, mode)
    assert ranks[0]["history"] == ranks[1]["history"], "every rank logs the same"
    # FSDP2 has no double backward: its products are finite differences, as the first reference's. Same products,
    # same random numbers: every value within 1%, the trace within its standard error. The second reference has
    # exact products: the eigenvalues within 1% of it too.
    fsdp2 = not MONITORED[mode][1]
    reference, _ = one_process_monitor(mode, tmp_path / "same", hvp="finite_difference" if fsdp2 else "auto")
    exact, _ = one_process_monitor(mode, tmp_path / "exact") if fsdp2 else (reference, None)
    ours, theirs, exacts = dict(ranks[0]["history"]), dict(reference.history), dict(exact.history)
    assert sorted(ours) == sorted(theirs) == sorted(exacts), "the same logging steps"
    hessian = ["hessian_max_eig", "hessian_eig_1", "hessian_eig_2", "eos_ratio", "critical_sharpness"]
    if "adamw" in mode or "tp" in mode:
        hessian.append("preconditioned_max_eig")
    if mode == "lightning_monitor_sam":
        hessian += ["sam_eos_ratio", "net/hessian_max_eig", "negative_fraction"]
    for step, expected in theirs.items():
        assert sorted(ours[step]) == sorted(expected), f"the same keys at step {step}"
        for key, value in expected.items():
            name = key.removeprefix("sharpness/")
            if name.endswith(("_residual", "_stderr")):
                continue
            if name.endswith("hessian_trace"):
                stderr = expected[key + "_stderr"]
                assert abs(ours[step][key] - value) <= max(stderr, 1e-4 * abs(value)), (step, key)
            else:
                assert ours[step][key] == pytest.approx(value, rel=1e-2, abs=1e-6), (step, key)
            if name in hessian and name != "negative_fraction":
                assert ours[step][key] == pytest.approx(exacts[step][key], rel=1e-2, abs=1e-6), ("exact", step, key)
    logged = {k.removeprefix("sharpness/") for values in theirs.values() for k in values}
    assert set(hessian) <= logged, sorted(logged)
    assert ranks[0]["eigenvector_is_sharded"], "the warm start is sharded like the parameters"
    skipped = [w for w in ranks[0]["warnings"] if "sharded" in w]
    assert all("adaptive" in w or "landscape" in w for w in skipped), skipped


def test_monitor_on_fsdp2_resumes_as_it_would_have_gone_on(runs: Path) -> None:
    ranks = ranks_of(runs, "lightning_monitor_resume")
    assert ranks[0]["saved_whole"] and all(ranks[0]["saved_whole"]), "sharded warm starts go whole into checkpoints"
    whole, resumed = dict(ranks[0]["whole"]), dict(ranks[0]["resumed"])
    assert sorted(resumed) == [s for s in sorted(whole) if s >= 4], "the second epoch's steps"
    for step, values in resumed.items():
        assert values == pytest.approx(whole[step], rel=1e-3), step
    assert ranks[1]["resumed"] == ranks[0]["resumed"]


# Refusals that need no second process ------------------------------------------------------------------------------


def test_deepspeed_strategy_is_refused_at_fit_start() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_sam.mixin import _check_strategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed here
    with pytest.raises(MisconfigurationException, match=r"DeepSpeedStrategy.*gradients in its own buffers"):
        _check_strategy(strategy)
    _check_strategy(trainer().strategy)  # the single-device strategy passes


def test_a_plain_loop_without_any_gradient_warns_once_about_deepspeed() -> None:
    """ZeRO keeps gradients in its own buffers: every .grad is None after the backward, SAM must not stay silent."""
    model = nn.Linear(3, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.first_step()
            opt.second_step()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "no parameter with a gradient" in messages[0] and "DeepSpeed" in messages[0]
