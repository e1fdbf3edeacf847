"""The main job: `lightning-sam demo` with tiny limits, its outputs, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sam.demo import main, noisy_digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_label_noise_flips_the_asked_fraction_to_other_classes() -> None:
    clean, _ = noisy_digits(0.0, seed=0)
    noisy, test = noisy_digits(0.4, seed=0)
    flipped = (clean.tensors[1] != noisy.tensors[1]).float().mean().item()
    assert flipped == pytest.approx(0.4, abs=0.04)
    assert len(test) == 540
    assert noisy.tensors[0].shape == (1257, 64)


def test_demo_prints_the_table_and_writes_the_figure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["--epochs", "2", "--seeds", "0", "1", "--logger", "csv", "--quiet", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| SGD | 0 |" in out
    assert "| SAM | 1 |" in out
    assert "**SAM mean** | 2 seeds" in out
    for column in ("clean test acc", "final train loss", "first_order", "hessian_max_eig", "wall time"):
        assert column in out
    figure = tmp_path / "sgd_vs_sam.png"
    assert f"Figure: {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_logs_to_wandb_offline_without_a_login_and_prints_the_sync_line(tmp_path: Path) -> None:
    """A fresh process with no W&B login and no WANDB_MODE: the demo must go offline by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HOME": str(tmp_path), "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    env.update({"WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")})
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sam", "demo", "--epochs", "1", "--seeds", "0", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wandb sync" in done.stdout
    runs = list((tmp_path / "lightning_sam_demo" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one W&B run for SGD, one for SAM, in one project"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--noise", "1.0"], "--noise must be in [0, 1)"),
        (["--noise", "-0.1"], "--noise must be in [0, 1)"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--logger", "mlflow"], "--logger must be one of wandb, csv, tensorboard, none"),
        (["--measures", "curvature"], "unknown --measures"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sam", "demo", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""


def test_entry_point_without_a_subcommand_explains_itself() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sam"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "usage: lightning-sam demo" in done.stderr


@pytest.mark.slow
def test_demo_runs_under_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "lightning_sam", "demo", "--epochs", "1", "--seeds", "0", "--devices", "2",
            "--strategy", "ddp", "--logger", "csv", "--quiet", "--out-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| SAM | 0 |") == 1, "the table is printed once, by rank zero"
