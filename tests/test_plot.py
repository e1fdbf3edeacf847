"""`lightning-sam plot`: runs read back from W&B, CSV and TensorBoard logs, one figure, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import Net, loader, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_sam import SharpnessMonitor
from lightning_sam._demo_cli import install_extra
from lightning_sam._demo_plot import figure, runs_figure, y_label
from lightning_sam._plot_cli import main as plot_main
from lightning_sam.runs import (
    SPECTRUM,
    RunsError,
    drawable,
    find_runs,
    panel_keys,
    read_csv,
    read_runs,
    read_tensorboard,
    read_wandb,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")

ROOT = Path(__file__).resolve().parents[1]
SHARPNESS = ["sharpness/first_order", "sharpness/grad_norm"]


@dataclass
class Fit:
    """One fit logged to W&B (offline), a CSVLogger and a TensorBoardLogger at once, and what its monitor saw."""

    root: Path
    monitor: SharpnessMonitor
    wandb_dir: Path
    csv_dir: Path
    tb_dir: Path
    bare_csv: Path  # a CSVLogger run of a fit without the monitor

    def expected(self, key: str) -> list[tuple[int, float]]:
        """The monitor's own record of a key: an oracle independent of every logger."""
        return [(step, row[key]) for step, row in self.monitor.history if key in row]


@pytest.fixture(scope="module")
def fit(tmp_path_factory: pytest.TempPathFactory) -> Fit:
    import wandb

    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as env:
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(var, str(root / ".wandb_home"))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        monitor = SharpnessMonitor(
            measures=["grad_norm", "first_order"], every_n_steps=2, spectrum_epochs=[0], spectrum_iters=10
        )
        loggers = [
            WandbLogger(project="lightning-sam-test", name="sgd-run", save_dir=str(root), offline=True),
            CSVLogger(root, name="lightning_logs"),
            TensorBoardLogger(root, name="tb"),
        ]
        torch.manual_seed(0)
        trainer(max_epochs=1, logger=loggers, log_every_n_steps=2, callbacks=[monitor]).fit(Net(), loader())
        wandb.finish()
        bare = CSVLogger(root / "bare", name="no_monitor")
        trainer(max_steps=2, logger=bare, log_every_n_steps=1).fit(Net(), loader())
    return Fit(
        root,
        monitor,
        next((root / "wandb").glob("offline-run-*")),
        Path(loggers[1].log_dir),
        Path(loggers[2].log_dir),
        Path(bare.log_dir),
    )


# The readers ------------------------------------------------------------------------------------------------------


def test_each_reader_returns_exactly_what_the_monitor_logged(fit: Fit) -> None:
    logged = {key for _, row in fit.monitor.history for key in row}
    assert set(SHARPNESS) | {"sharpness/negative_fraction"} == logged
    for run in (read_wandb(fit.wandb_dir), read_csv(fit.csv_dir), read_tensorboard(fit.tb_dir)):
        for key in sorted(logged):
            assert run.points(key) == fit.expected(key), (run.format, key)
        assert {k for k in run.scalars if k.startswith("sharpness/")} == logged, run.format
    assert [s for s, _ in fit.expected("sharpness/grad_norm")] == [1, 3, 5, 7], "every 2 steps, of 8"


def test_the_three_loggers_of_one_fit_agree_on_steps_and_values(fit: Fit) -> None:
    """W&B's trainer/global_step and the CSV and TensorBoard step are the same x for the same fit."""
    wandb_run, csv_run, tb_run = read_wandb(fit.wandb_dir), read_csv(fit.csv_dir), read_tensorboard(fit.tb_dir)
    shared = set(wandb_run.scalars) & set(csv_run.scalars) & set(tb_run.scalars)
    assert {*SHARPNESS, "train_loss", "epoch"} <= shared
    for key in sorted(shared):
        assert wandb_run.points(key) == csv_run.points(key) == tb_run.points(key), key


def test_the_spectrum_comes_from_the_wandb_table_with_its_negative_fraction(fit: Fit) -> None:
    from lightning_sam.figures import density_curve

    spectrum = read_wandb(fit.wandb_dir).spectrum
    assert spectrum is not None
    (epoch, logged), step = fit.monitor.spectra[-1], fit.monitor.spectrum.spectrum_at[-1]
    assert (epoch, spectrum.step) == (0, step)
    grid, density = density_curve(logged)
    assert spectrum.eigenvalues == grid.tolist()
    assert spectrum.density == pytest.approx(density.clamp_min(1e-12).tolist(), rel=1e-9)
    assert spectrum.negative_fraction == fit.expected("sharpness/negative_fraction")[-1][1]
    assert read_csv(fit.csv_dir).spectrum is None and read_tensorboard(fit.tb_dir).spectrum is None


def test_every_way_of_naming_a_run_finds_it_once(fit: Fit) -> None:
    events = next(fit.tb_dir.glob("events.out.tfevents.*"))
    wandb_run = ("wandb", fit.wandb_dir.resolve())
    csv_run, tb_dir = ("csv", fit.csv_dir.resolve()), ("tensorboard", fit.tb_dir.resolve())
    named = {
        fit.wandb_dir: [wandb_run],
        fit.root / "wandb" / "latest-run": [wandb_run],  # W&B's link to the last run
        next(fit.wandb_dir.glob("*.wandb")): [wandb_run],
        fit.root / "wandb": [wandb_run],
        fit.csv_dir: [csv_run],
        fit.csv_dir / "metrics.csv": [csv_run],
        fit.csv_dir.parent: [csv_run],
        fit.tb_dir: [tb_dir],
        events: [("tensorboard", events.resolve())],
    }
    for path, runs in named.items():
        assert find_runs([path]) == runs, path
    assert find_runs([fit.root / "bare", fit.root]) == [
        ("csv", fit.bare_csv.resolve()),
        ("csv", fit.csv_dir.resolve()),
        ("tensorboard", fit.tb_dir.resolve()),
        wandb_run,
    ], "a parent: every run below it, in the order found; a run named twice is read once"


def test_a_run_is_labelled_by_its_wandb_name_else_its_folder(fit: Fit) -> None:
    runs = read_runs([fit.csv_dir, fit.tb_dir, fit.wandb_dir])
    assert [r.label for r in runs] == ["lightning_logs/version_0", "tb/version_0", "sgd-run"]
    assert [r.label for r in read_runs([fit.csv_dir])] == ["lightning_logs/version_0"]


# The figure -------------------------------------------------------------------------------------------------------


def test_the_figure_has_one_panel_per_key_and_one_colour_per_run(fit: Fit) -> None:
    runs = read_runs([fit.root])
    runs = [r for r in runs if r.path != fit.bare_csv.resolve()]
    keys = panel_keys(runs, metrics=["train_loss"])
    assert keys == [*SHARPNESS, SPECTRUM, "train_loss"]
    fig = runs_figure(runs, keys, title="one fit, three loggers")
    assert [ax.get_title() for ax in fig.axes] == [*SHARPNESS, "Hessian spectrum, last logged", "train_loss"]
    assert [ax.get_ylabel() for ax in fig.axes] == [y_label(SHARPNESS[0]), y_label(SHARPNESS[1]),
                                                    "density (log scale)", "train_loss"]  # fmt: skip
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["lightning_logs/version_0", "tb/version_0", "sgd-run"]
    for ax in fig.axes[:2] + fig.axes[3:]:
        assert ax.get_xlabel() == "optimizer step"
        assert len(ax.lines) == 3 and len({line.get_color() for line in ax.lines}) == 3, ax.get_title()
        assert [list(line.get_xdata()) for line in ax.lines] == [[1, 3, 5, 7]] * 3
    spectrum = fig.axes[2]
    assert spectrum.get_yscale() == "log" and spectrum.get_xlabel() == "Hessian eigenvalue"
    fraction = fit.expected("sharpness/negative_fraction")[-1][1]
    assert [t.get_text() for t in spectrum.get_legend().get_texts()] == [f"sgd-run (step 7, {fraction:.1%} negative)"]
    assert fig.get_suptitle() == "one fit, three loggers" and "demo" not in fig.get_suptitle()


def test_without_a_wandb_run_there_is_no_spectrum_panel_and_keys_can_be_chosen(fit: Fit) -> None:
    runs = read_runs([fit.csv_dir, fit.tb_dir])
    assert panel_keys(runs) == SHARPNESS
    assert panel_keys(runs, ["grad_norm", "sharpness/negative_fraction"]) == [
        "sharpness/grad_norm",
        "sharpness/negative_fraction",
    ]
    with pytest.raises(RunsError, match="available: sharpness/first_order, sharpness/grad_norm, sharpness/negative"):
        panel_keys(runs, ["spectrum"])
    assert len(runs_figure(runs, panel_keys(runs)).axes) == 2


def test_the_demo_figure_puts_the_cost_note_in_the_cost_panel_s_x_label() -> None:
    import matplotlib.pyplot as plt

    from lightning_sam.demo import RunResult

    runs = [RunResult(name, 0, 0.8, 1.0, 5.0, {}, [(1, 0.5), (2, 0.8)], [(10, {"sharpness/grad_norm": 1.0}),
            (20, {"sharpness/grad_norm": 0.5})], settings="rho=0.2") for name in ("SGD", "SAM")]  # fmt: skip
    for note, label in [
        ("", "wall time per run (s)"),
        ("2 vCPUs, load 1.9", "wall time per run (s), 2 vCPUs, load 1.9"),
    ]:
        fig = figure(runs, ["sharpness/grad_norm"], cost_note=note) if note else figure(runs, ["sharpness/grad_norm"])
        try:
            assert fig.axes[-1].get_xlabel() == label
        finally:
            plt.close(fig)


# The command line -------------------------------------------------------------------------------------------------


def plot_cli(*argv: str, code: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_sam plot ARGV``, or ``python -c CODE plot ARGV`` (CODE runs ``main`` itself)."""
    command = [sys.executable, "-c", code] if code else [sys.executable, "-X", "importtime", "-m", "lightning_sam"]
    return subprocess.run([*command, "plot", *argv], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def heavy_imports(done: subprocess.CompletedProcess[str]) -> list[str]:
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import")}
    return sorted(m for m in imported if m.split(".")[0] in ("torch", "lightning", "matplotlib", "numpy"))


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line (``-X importtime`` lines aside)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("lightning-sam plot: error: ")
    return lines[0]


def test_help_answers_at_once_without_torch_or_matplotlib() -> None:
    done = plot_cli("--help")
    assert done.returncode == 0, done.stderr[-3000:]
    for fragment in ("RUN", "--out", "--keys", "--metric", "--title", "offline-run-", "metrics.csv", "tfevents"):
        assert fragment in done.stdout, fragment
    assert "demo" not in done.stdout
    assert heavy_imports(done) == []


def test_the_command_writes_one_png_and_says_so(fit: Fit, tmp_path: Path) -> None:
    runs = [str(fit.csv_dir), str(fit.tb_dir), str(fit.wandb_dir)]
    done = plot_cli(*runs, "--metric", "train_loss", "--title", "mine", "--out", "figs/sharp.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["wrote figs/sharp.png: 3 runs, 4 panels, 36 points"]  # 3 runs x 3 keys x 4
    assert (tmp_path / "figs" / "sharp.png").read_bytes().startswith(b"\x89PNG")
    assert not [m for m in heavy_imports(done) if not m.startswith(("matplotlib", "numpy"))], "no torch to draw"
    default = plot_cli(str(fit.csv_dir), cwd=tmp_path)
    assert default.returncode == 0, default.stderr[-3000:]
    assert default.stdout.strip() == "wrote sharpness.png: 1 run, 2 panels, 8 points"
    assert (tmp_path / "sharpness.png").is_file()


def test_the_command_runs_in_process_through_the_package_s_main(fit: Fit, tmp_path: Path) -> None:
    from lightning_sam.__main__ import main

    assert main(["plot", str(fit.root / "wandb"), "--keys", "spectrum", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert plot_main(["--help"]) == 0


def test_every_error_is_one_line_with_exit_code_2(fit: Fit, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    cases = [
        (["missing"], ["RUN got 'missing', which does not exist"]),
        ([str(tmp_path / "empty")], ["no run found in", "W&B run folders", "metrics.csv", "TensorBoard"]),
        ([str(tmp_path / "notes.txt")], ["is a file of no run"]),
        ([str(tmp_path / "odd")], ["has no step column"]),
        ([str(fit.bare_csv)], ["no_monitor/version_0 (csv", "logged no sharpness/* scalar", "--metric", "train_loss"]),
        ([str(fit.csv_dir), "--keys", "hessian_trace"], ["--keys got 'sharpness/hessian_trace'",
                                                         "available: sharpness/first_order, sharpness/grad_norm"]),
        ([str(fit.csv_dir), "--metric", "val_acc"], ["--metric got 'val_acc'", "available: epoch, train_loss"]),
        ([str(fit.csv_dir), "--out", "figure.jpg"], ["--out got 'figure.jpg'; give a .png file"]),
        ([str(fit.csv_dir), "--out", "taken.png"], ["--out got 'taken.png', a directory"]),
        ([], ["needs at least one RUN"]),
        (["--keys", "grad_norm", str(fit.csv_dir)], ["needs at least one RUN", "give the runs first"]),
        ([str(fit.csv_dir), "--kyes", "x"], ["did you mean --keys?"]),
    ]  # fmt: skip
    for argv, fragments in cases:
        line = one_line(plot_cli(*argv, cwd=tmp_path))
        for fragment in fragments:
            assert fragment in line, (argv, line)


@pytest.mark.parametrize(
    ("package", "run", "install"),
    [
        ("matplotlib", "csv_dir", install_extra("plot")),
        ("wandb", "wandb_dir", install_extra("wandb")),
        ("tensorboard", "tb_dir", "pip install tensorboard"),
    ],
)
def test_a_missing_package_names_how_to_install_it(fit: Fit, package: str, run: str, install: str) -> None:
    code = f"import sys; sys.modules[{package!r}] = None; from lightning_sam.__main__ import main; sys.exit(main())"
    line = one_line(plot_cli(str(getattr(fit, run)), code=code))
    assert f"needs the {package} package" in line and install in line


def test_a_run_without_the_monitor_found_in_a_folder_is_skipped_and_named_but_a_named_one_is_an_error(
    fit: Fit, tmp_path: Path
) -> None:
    """A save_dir also holding a run that logged no sharpness (a validate or lr_find run): the others are drawn."""
    kept, skipped = drawable(read_runs([fit.root]), ["sharpness/grad_norm"])
    assert [run.label for run in skipped] == ["bare/no_monitor/version_0"]
    assert {run.format for run in kept} == {"wandb", "csv", "tensorboard"}
    done = plot_cli(str(fit.root), "--out", str(tmp_path / "f.png"))
    assert done.returncode == 0, done.stderr
    assert "skipped 1 run with nothing to draw in them: bare/no_monitor/version_0" in done.stdout
    with pytest.raises(RunsError, match=r"no_monitor/version_0 \(csv.*logged no sharpness"):
        drawable(read_runs([fit.root / "bare" / "no_monitor" / "version_0" / "metrics.csv"]), ["sharpness/grad_norm"])
    assert panel_keys(read_runs([fit.root]), metrics=["train_loss"])[-1] == "train_loss"


def test_rows_a_csv_logger_left_unfinished_are_skipped_and_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    """A run still writing (or killed) leaves a row cut short; a step that is no number is no point either."""
    run = tmp_path / "logs" / "version_0"
    run.mkdir(parents=True)
    rows = "sharpness/grad_norm,step\n0.5,1\n0.25,abc\n0.3,\n0.2,nan\n0.75,3\n,0.7"
    (run / "metrics.csv").write_text(rows)
    assert read_csv(run).scalars == {"sharpness/grad_norm": [(1, 0.5), (3, 0.75)]}
    done = plot_cli(str(run), "--out", str(tmp_path / "ok.png"), "--title", "cost $x^$ of 100%")
    assert done.returncode == 0 and "1 run, 1 panels, 2 points" in done.stdout, done.stderr

    for name, content, fragment in [
        ("latin1", b"step,\xff\xfe\n1,2\n", "is not a readable CSV file"),
        ("nul", b"step,sharpness/x\n\x001,2\n", "logged no sharpness/* scalar"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_bytes(content)
        line = one_line(plot_cli(str(tmp_path / name), cwd=tmp_path))
        assert fragment in line and name in line, line

    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "metrics.csv").write_text("sharpness/grad_norm,step\n-1e308,1\n1e308,2\n")
    done = plot_cli(str(huge), "--out", str(tmp_path / "huge.png"))
    assert done.returncode == 0 or "cannot draw these values" in one_line(done)


def test_wandb_rows_keep_dotted_scalars_drop_table_fields_and_fall_back_to_wandbs_own_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """W&B's history as its reader prints it: a table's fields are dotted keys; a user's scalar may be dotted too."""
    from lightning_sam import runs

    def history(**row: object) -> dict[str, object]:
        return {"type": "history", "history": {"item": row}}

    table = {"sharpness/spectrum_table._type": "table-file", "sharpness/spectrum_table.nrows": 400}
    lightning = [history(**{"trainer/global_step": 3, "_step": 0, "val.acc": 0.5, **table}),
                 history(**{"trainer/global_step": float("nan"), "_step": 1, "val.acc": 0.7}),
                 history(**{"trainer/global_step": 5, "_step": 2, "sharpness/grad_norm": 0.25})]  # fmt: skip
    monkeypatch.setattr(runs, "_wandb_records", lambda run_dir: lightning)
    assert read_wandb(Path("run")).scalars == {"val.acc": [(3, 0.5)], "sharpness/grad_norm": [(5, 0.25)]}

    plain = [history(_step=0, loss=1.0), history(_step=1, loss=0.5)]  # wandb.log without Lightning
    monkeypatch.setattr(runs, "_wandb_records", lambda run_dir: plain)
    assert read_wandb(Path("run")).scalars == {"loss": [(0, 1.0), (1, 0.5)]}
