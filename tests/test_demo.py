"""The main job: `lightning-sam demo` with tiny limits, its table, figure, logged configs and output."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_sam import AESAM, GSAM, MSAM, RST, SAM, AELookSAM, FriendlySAM, LookSAM
from lightning_sam._demo_cli import MEASURE_NAMES, METHODS, parse_demo
from lightning_sam._demo_plot import figure, y_label
from lightning_sam.demo import RunResult, build_module, main, noisy_digits, results_table, run_config, train_loader
from lightning_sam.measures import MEASURES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_label_noise_flips_the_asked_fraction_to_other_classes() -> None:
    clean, _ = noisy_digits(0.0, seed=0)
    noisy, test = noisy_digits(0.4, seed=0)
    flipped = (clean.tensors[1] != noisy.tensors[1]).float().mean().item()
    assert flipped == pytest.approx(0.4, abs=0.04)
    assert len(test) == 540
    assert noisy.tensors[0].shape == (1257, 64)


def test_every_training_batch_is_full() -> None:
    """1257 samples in batches of 32 leave a 9-sample batch, whose noisier gradient spiked the logged curves."""
    train, _ = noisy_digits(0.4, seed=0)
    sizes = [len(x) for x, _ in train_loader(train, 32)]
    assert sizes == [32] * 39


def test_the_command_line_knows_every_measure() -> None:
    assert tuple(MEASURES) == MEASURE_NAMES, "lightning_sam._demo_cli.MEASURE_NAMES must list MEASURES"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_its_documented_optimizer(method: str) -> None:
    args = parse_demo(["--logger", "csv", "--rho", "0.15", "--asam-rho", "0.8", "--msam-rho", "0.25"])
    opt = build_module(method, args).configure_optimizers()
    expected = {"sgd": torch.optim.SGD, "sam": SAM, "asam": SAM, "looksam": LookSAM, "gsam": GSAM,
                "friendlysam": FriendlySAM, "msam": MSAM, "aesam": AESAM, "aelooksam": AELookSAM,
                "rst": RST}[method]  # fmt: skip
    assert type(opt) is expected
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    if method == "sgd":
        return
    assert group["rho"] == {"asam": 0.8, "msam": 0.25}.get(method, 0.15)
    assert group["adaptive"] is (method == "asam")
    for name, value in METHODS[method].settings.items():
        assert group.get(name, getattr(opt.policy, name, getattr(opt, name, None))) == value, name


def test_adaptive_runs_asam_and_says_so() -> None:
    """`--adaptive` used to leave the header at "SAM rho=0.2"; now the run is ASAM, named with its own settings."""
    args = parse_demo(["--adaptive", "--logger", "csv"])
    assert args.methods == ["sgd", "asam", "looksam"]
    config = run_config(args, "asam", seed=0)
    assert config["method_settings"] == "rho=1.0, eta=0.01"
    assert (config["optimizer"], config["adaptive"], config["rho"]) == ("SAM", True, 1.0)
    row = results_table([RunResult("ASAM", 0, 0.9, 1.0, 5.0, {}, settings=config["method_settings"])], [])
    assert "| ASAM | rho=1.0, eta=0.01 | 1 | 90.0% |" in row


def test_demo_prints_one_row_per_method_and_writes_the_figure_the_csv_and_the_configs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_sam import _demo_plot

    notes: list[str] = []
    real_draw = _demo_plot.draw

    def recording_draw(*args: Any, **kwargs: Any) -> Path:
        notes.append(kwargs["cost_note"])
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(_demo_plot, "draw", recording_draw)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the demo sets it: undone after
    threads = torch.get_num_threads()
    argv = ["--epochs", "2", "--seeds", "0", "1", "--methods", "sgd", "sam", "looksam", "--logger", "csv"]
    try:
        code = main([*argv, "--progress", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "Epoch 1" in out, "--progress shows the bars although stdout is not a terminal"
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[:5] == ["| method", "settings", "seeds", "clean test acc", "final train loss"]
    for column in (
        "first_order",
        "grad_norm",
        "hessian_max_eig",
        "eos_ratio",
        "negative_fraction",
        "wall time per run",
    ):
        assert column in table[0]
    rows = table[1:]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| SGD", "momentum 0.9", "2"],
        ["| SAM", "rho=0.2", "2"],
        ["| LookSAM", "rho=0.2, k=5, alpha=0.7", "2"],
    ]
    assert all(row.count(" ± ") >= 5 for row in rows), "mean ± sd of accuracy, loss, sharpness and wall time"
    assert "6 runs in" in out and "CPU cores" in out and f"torch {torch.__version__}" in out
    assert (tmp_path / "sgd_vs_sam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(notes) == 1 and re.fullmatch(r"torch on 1 thread, load \d+\.\d → \d+\.\d", notes[0]), notes
    with (tmp_path / "results.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in "01" for m in ("sgd", "sam", "looksam")]
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["test_acc"]) <= 1 for r in runs)
    hparams = (tmp_path / "looksam-seed1" / "version_0" / "hparams.yaml").read_text()
    for entry in ("method: looksam", "seed: 1", "noise: 0.4", "k: 5", "epochs: 2", "precision: 32-true"):
        assert entry in hparams


def test_the_output_is_quiet_when_piped(tmp_path: Path) -> None:
    """No progress bars when stdout is not a terminal, no tips about other products: a few hundred bytes."""
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sam", "demo", "--epochs", "1", "--seeds", "0", "--methods", "sgd",
         "--logger", "csv", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    both = done.stdout + done.stderr
    for noise in ("Tip", "litlogger", "litmodels", "it/s", "Epoch 0"):
        assert noise not in both
    assert "| SGD | momentum 0.9 | 1 |" in done.stdout
    assert len(both) < 2000, both


def test_a_piped_demo_reports_each_run_as_it_ends_and_runs_torch_on_the_threads_asked(tmp_path: Path) -> None:
    """A pipe is block-buffered: without a flush nothing would arrive before the process exits."""
    command = [sys.executable, "-m", "lightning_sam", "demo", "--epochs", "3", "--seeds", "0", "--methods", "sgd",
               "sam", "--logger", "csv", "--threads", "2", "--out-dir", str(tmp_path)]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as demo:
        assert demo.stdout is not None
        first = [demo.stdout.readline() for _ in range(2)]
        running = demo.poll() is None  # the SAM run, the table and the figure are still to come
        rest = demo.stdout.read()
    assert demo.returncode == 0
    assert first[0] == "2 runs, torch on 2 threads per process; a line as each one ends\n"
    assert re.fullmatch(r"\[1/2\] SGD \(momentum 0\.9\), seed 0: clean test accuracy \d+\.\d%, \d+\.\d s\n", first[1])
    assert running, "the first run's line arrived while the demo was still running"
    assert re.search(r"^\[2/2\] SAM \(rho=0\.2\), seed 0: ", rest, re.M)
    assert rest.index("[2/2]") < rest.index("| method |"), "each run's line comes before the table"
    assert re.search(r"2 runs in \d+ s \(load average \d+\.\d before, \d+\.\d after\)", rest)
    assert "torch on 2 threads" in rest
    for run in ("sgd-seed0", "sam-seed0"):
        assert "torch_threads: 2" in (tmp_path / run / "version_0" / "hparams.yaml").read_text()


def test_demo_logs_each_run_s_config_to_wandb_offline_without_a_login(tmp_path: Path) -> None:
    """A fresh process with no W&B login and no WANDB_MODE: the demo goes offline by itself, one run per fit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HOME": str(tmp_path), "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    env.update({"WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")})
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sam", "demo", "--epochs", "1", "--seeds", "3", "--methods", "sgd", "asam",
         "--noise", "0.3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wandb sync" in done.stdout
    runs = sorted((tmp_path / "lightning_sam_demo" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one W&B run per method, in one project"
    configs = {}
    for run_dir in runs:
        records = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        config: dict[str, object] = {}
        for line in records.splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("type") == "config":
                config.update(record["config"]["update"])
        configs[config["method"]] = config
    assert set(configs) == {"sgd", "asam"}
    for config in configs.values():
        assert (config["seed"], config["noise"], config["epochs"], config["batch_size"]) == (3, 0.3, 1, 32)
        assert (config["lr"], config["precision"], config["devices"]) == (0.05, "32-true", 1)
    assert (configs["asam"]["rho"], configs["asam"]["adaptive"], configs["asam"]["eta"]) == (1.0, True, 0.01)
    assert configs["asam"]["method_settings"] == "rho=1.0, eta=0.01"


def synthetic_runs(measures: list[str], seeds: int = 3) -> list[RunResult]:
    runs = []
    for m, name in enumerate(["SGD", "SAM", "LookSAM"]):
        for seed in range(seeds):
            history = [(step, {f"sharpness/{k}": 1.0 + m + seed + step / 100 for k in measures}) for step in (25, 50)]
            runs.append(RunResult(name, seed, 0.7 + m / 10, 1.0, 5.0 + m + seed, {}, [(1, 0.5), (2, 0.7 + m / 10)],
                                  history, settings="rho=0.2"))  # fmt: skip
    return runs


@pytest.mark.parametrize("measures", [["first_order", "grad_norm", "hessian_max_eig", "eos_ratio"], ["grad_norm"],
                                      ["grad_norm", "hessian_trace", "eos_ratio"]])  # fmt: skip
def test_the_figure_has_one_legend_entry_per_method_labelled_axes_and_no_empty_panel(measures: list[str]) -> None:
    import matplotlib.pyplot as plt

    keys = [f"sharpness/{m}" for m in measures]
    fig = figure(synthetic_runs(measures), keys, title="digits; 9 runs in 60 s, on 2 CPU cores")
    try:
        assert len(fig.legends) == 1
        assert [t.get_text().split(" (")[0] for t in fig.legends[0].get_texts()] == ["SGD", "SAM", "LookSAM"]
        assert len(fig.axes) == 2 + len(measures), "accuracy, one panel per measure, accuracy against wall time"
        for ax in fig.axes:
            assert ax.get_visible() and ax.get_ylabel() and ax.get_xlabel()
            assert ax.lines or ax.collections, f"{ax.get_title()} is empty"
            assert ax.get_yscale() == "linear"
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[0] == "clean test accuracy" and "against cost" in titles[-1]
        assert fig.axes[-1].get_xlabel() == "wall time per run (s)"
        assert [ax.get_ylabel() for ax in fig.axes[1:-1]] == [y_label(k) for k in keys]
        assert all(not label.startswith("sharpness/") for label in map(y_label, keys)), "a label says what it is"
        width = sum(ax.get_position().width for ax in fig.axes[: min(3, len(fig.axes))])
        last_row = [ax for ax in fig.axes if abs(ax.get_position().y0 - fig.axes[-1].get_position().y0) < 1e-3]
        assert sum(ax.get_position().width for ax in last_row) == pytest.approx(width, rel=0.1), "no empty slot"
        assert "2 CPU cores" in fig.get_supxlabel()
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_demo_runs_under_ddp_on_two_cpu_processes_and_reports_the_slowest_rank(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "lightning_sam", "demo", "--epochs", "1", "--seeds", "0", "--methods", "sgd", "sam",
            "--devices", "2", "--strategy", "ddp", "--logger", "csv", "--threads", "2", "--out-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| SAM | rho=0.2 | 1 |") == 1, "the table is printed once, by rank zero"
    assert done.stdout.count("2 runs, torch on 2 threads per process") == 1
    assert re.search(r"CPU cores, torch on 2 threads;", done.stdout), "Lightning's launcher kept --threads"
    assert done.stdout.count("[1/2] SGD") == done.stdout.count("[2/2] SAM") == 1, "one line per run, from rank zero"
    with (tmp_path / "results.csv").open() as f:
        runs = list(csv.DictReader(f))
    for run in runs:
        ranks = [float(s) for s in run["rank_seconds"].split()]
        assert len(ranks) == 2
        assert float(run["seconds"]) == pytest.approx(max(ranks), abs=1e-3)


def test_the_figure_shows_each_methods_spectrum_at_the_end_of_training() -> None:
    import matplotlib.pyplot as plt

    from lightning_sam.hessian import Spectrum

    runs = synthetic_runs(["grad_norm"], seeds=2)
    for i, run in enumerate(runs):  # SGD: an outlier at 40 and a negative node; SAM, LookSAM: a narrow bulk
        nodes = torch.tensor([[-0.5, 0.1, 1.0, 40.0]] if run.name == "SGD" else [[0.05, 0.1, 0.5, 2.0 + i / 10]])
        run.spectrum = Spectrum(nodes.double(), torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64))
    fig = figure(runs, ["sharpness/grad_norm", "sharpness/negative_fraction"])
    try:
        spectrum = [ax for ax in fig.axes if "Hessian spectrum" in ax.get_title()]
        assert len(spectrum) == 1 and len(fig.axes) == 4, "accuracy, grad_norm, spectrum, cost: no one-point panel"
        ax = spectrum[0]
        assert ax.get_yscale() == "log" and ax.get_xlabel() == "Hessian eigenvalue"
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["SGD (10.0% negative)", "SAM (0.0% negative)", "LookSAM (0.0% negative)"]
        assert max(ax.lines[0].get_xdata()) > 40 > max(ax.lines[1].get_xdata()), "SGD's outlier, SAM without"
    finally:
        plt.close(fig)


def test_the_cli_knows_the_size_of_the_training_split() -> None:
    from lightning_sam._demo_cli import TRAIN_SAMPLES
    from lightning_sam.demo import noisy_digits

    assert len(noisy_digits(0.4, seed=0)[0]) == TRAIN_SAMPLES


def test_the_largest_batch_each_process_can_fill_is_accepted() -> None:
    """1257 samples over two processes: Lightning's DistributedSampler pads each rank's share to 629."""
    assert parse_demo(["--batch-size", "1257"]).batch_size == 1257
    assert parse_demo(["--batch-size", "629", "--strategy", "ddp", "--devices", "2"]).batch_size == 629
