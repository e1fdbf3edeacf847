"""The README's and docs' Python blocks run, and the examples run with tiny limits."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", block)
        for path in DOC_FILES
        for i, block in enumerate(PYTHON_BLOCK.findall(path.read_text()))
    ]


def test_docs_have_python_blocks() -> None:
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[w for w, _ in python_blocks()])
def test_docs_python_block_runs(where: str, code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")  # a block's WandbLogger(offline=True) must not leak into other tests
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def run_example(path: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [path, *argv])
    runpy.run_path(str(ROOT / "examples" / path), run_name="__main__")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minimal_example(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_example("minimal.py", [], monkeypatch, tmp_path)
    assert "sharpness/hessian_max_eig" in capsys.readouterr().out
    assert list(tmp_path.glob("lightning_logs/**/metrics.csv"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_plain_pytorch_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_example("plain_pytorch.py", ["--epochs", "1"], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert re.search(r"plain loop: clean test accuracy \d+\.\d%", out)
    assert re.search(r"Fabric \(bf16-mixed\): clean test accuracy \d+\.\d%", out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cifar10_resnet_example_on_fake_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv = ["--fake-data", "--max-steps", "2", "--batch-size", "4", "--logger", "csv", "--measures", "grad_norm"]
    run_example("cifar10_resnet.py", argv, monkeypatch, tmp_path)
    assert "torchvision" not in sys.modules, "the fake-data path must not need torchvision"
    metrics = next(tmp_path.glob("lightning_logs/cifar10_resnet/version_0/metrics.csv")).read_text()
    assert "sharpness/grad_norm" in metrics


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_cifar10_resnet_example_logs_to_wandb_offline_without_a_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import wandb

    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "HOME"):
        monkeypatch.setenv(var, str(tmp_path))  # no credentials anywhere (HOME: no ~/.netrc)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["--fake-data", "--max-steps", "2", "--batch-size", "4", "--logger", "wandb", "--measures", "grad_norm"]
    try:
        run_example("cifar10_resnet.py", argv, monkeypatch, tmp_path)
    finally:
        wandb.finish()
        wandb.teardown()  # W&B keeps the settings it first read (no WANDB_MODE here) for later runs in this process
    assert list(tmp_path.glob("wandb/offline-run-*")), "an offline run, without asking for a login"


def test_lightning_cli_example_with_its_yaml(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cli" / "main.py"),
            "fit",
            "--config",
            str(ROOT / "examples" / "cli" / "config.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.every_n_steps=10",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = next(tmp_path.glob("lightning_logs/cli/version_0/metrics.csv")).read_text()
    assert "sharpness/hessian_max_eig" in metrics
    assert "val_acc" in metrics


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["lightning", "fabric"])
def test_fsdp_example_on_two_cpu_processes(loop: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "examples" / "fsdp.py"), "--devices", "2", "--epochs", "1"]
    done = subprocess.run(
        [*argv, *(["--fabric"] if loop == "fabric" else [])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert re.search(r"clean test accuracy \d+\.\d%", done.stdout)
    if loop == "lightning":
        assert "rank 0 holds 42501 of the 85002 parameters" in done.stdout
        logged = done.stdout.split("sharpness at the end:")[1]
        for key in ("hessian_max_eig", "hessian_trace", "eos_ratio", "sam_eos_ratio", "critical_sharpness"):
            assert f"sharpness/{key} " in logged, key
        header = next(tmp_path.glob("logs/fsdp/version_*/metrics.csv")).read_text().splitlines()[0]
        assert "sharpness/hessian_max_eig" in header


def test_api_reference_renders_docstring_examples_as_code(tmp_path: Path) -> None:
    """mkdocstrings reads Google-style ``Examples:`` sections as code; anything else becomes quoted run-on text."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    api = (site / "api" / "index.html").read_text()
    public_classes = ["SAM", "SAMMixin", "SAMStep", "LookSAM", "GSAM", "FriendlySAM", "MSAM", "SharpnessMonitor"]
    code_examples = re.findall(r'<code><span class="gp">&gt;&gt;&gt;', api)
    assert len(code_examples) >= len(public_classes)
    assert "<blockquote>" not in api
    assert "&gt;&gt;&gt; import" not in re.sub(r"<code>.*?</code>", "", api, flags=re.S)
