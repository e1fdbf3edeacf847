"""`lightning-sam` on the command line, through a subprocess: help, every bad value, and the extras the docs name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sam._demo_cli import (
    ACCELERATORS,
    LOGGER_PACKAGES,
    LOGGERS,
    MEASURE_NAMES,
    METHODS,
    PRECISIONS,
    STRATEGIES,
    demo_parser,
)

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str, code: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_sam ARGV``, or ``python -c CODE`` (which runs ``main(ARGV)`` itself)."""
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "lightning_sam", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


BAD_VALUES = [
    (["--precision", "42"], "--precision", ", ".join(PRECISIONS)),
    (["--strategy", "foo"], "--strategy", ", ".join(STRATEGIES)),
    (["--accelerator", "tpu"], "--accelerator", ", ".join(ACCELERATORS)),
    (["--logger", "mlflow"], "--logger", ", ".join(LOGGERS)),
    (["--methods", "sgd", "adam"], "--methods", ", ".join(METHODS)),
    (["--measures", "curvature"], "--measures", ", ".join(MEASURE_NAMES)),
    (["--lr", "-1"], "--lr", "a number > 0"),
    (["--lr", "0"], "--lr", "a number > 0"),
    (["--lr", "nan"], "--lr", "a number > 0"),
    (["--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["--devices", "0"], "--devices", "an integer >= 1"),
    (["--epochs", "-3"], "--epochs", "an integer >= 1"),
    (["--epochs", "2.5"], "--epochs", "an integer >= 1"),
    (["--every-n-steps", "0"], "--every-n-steps", "an integer >= 1"),
    (["--noise", "1.0"], "--noise", "a number in [0, 1)"),
    (["--noise", "-0.1"], "--noise", "a number in [0, 1)"),
    (["--rho", "-0.1"], "--rho", "a number >= 0"),
    (["--asam-rho", "inf"], "--asam-rho", "a number >= 0"),
    (["--msam-rho", "x"], "--msam-rho", "a number >= 0"),
    (["--seeds", "0", "-1"], "--seeds", "an integer from 0 to 4294967295"),
    (["--precision", "16-mixed"], "--precision", "32-true, bf16-mixed"),
    (["--epochs"], "--epochs", "expected one argument"),
    (["--epochz", "3"], "--epochz", "did you mean --epochs?"),
    (["--progress", "--quiet"], "--progress", "--quiet"),
    (["--batch-size", "2000"], "--batch-size", "at most 1257"),
    (["--batch-size", "700", "--strategy", "ddp", "--devices", "2"], "--batch-size", "629 per process"),
    (["--batch-size", "630", "--devices", "2"], "--batch-size", "629 per process"),  # auto: one process per device
]


@pytest.mark.parametrize(("argv", "option", "valid"), BAD_VALUES, ids=[" ".join(a) for a, _, _ in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_the_option_and_the_valid_values(
    argv: list[str], option: str, valid: str
) -> None:
    line = assert_one_line_error(cli("demo", *argv), option, valid)
    assert line.startswith("lightning-sam demo: error: ")


def test_an_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    assert_one_line_error(cli("demo", "--out-dir", str(tmp_path / "taken")), "--out-dir", "a directory")


def test_parsing_and_its_errors_import_neither_torch_nor_lightning() -> None:
    """So that --help and every error answer at once (``import lightning`` alone takes seconds)."""
    for argv in (["--help"], ["demo", "--help"], ["demo", "--lr", "-1"], ["demo", "--methods", "adam"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "lightning_sam", *argv],
            capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        )  # fmt: skip
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import")}
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning", "numpy"))
        assert not heavy, (
            f"lightning-sam {' '.join(argv)} imported {heavy[:3]}...: the package's __init__ must import its classes "
            "lazily, so that lightning_sam._demo_cli answers before torch and Lightning are imported"
        )
        assert done.returncode in (0, 2)


def test_help_exits_zero_and_shows_every_default() -> None:
    top = cli("--help")
    assert top.returncode == 0, top.stderr
    assert "demo" in top.stdout and "--version" in top.stdout
    demo = cli("demo", "--help")
    assert demo.returncode == 0, demo.stderr
    for option, default in [("--noise", "0.4"), ("--epochs", "40"), ("--methods", "sgd sam looksam"),
                            ("--seeds", "0 1 2"), ("--precision", "32-true"), ("--logger", "wandb")]:  # fmt: skip
        assert re.search(rf"{option} .*?\(default: {default}\)", " ".join(demo.stdout.split())), option
    for name, method in METHODS.items():
        assert name in demo.stdout and method.summary.split()[0] in demo.stdout
    for action in demo_parser()._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert "(default: " in (action.help or ""), action.option_strings


def test_version_and_commands() -> None:
    import lightning_sam

    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"lightning-sam {lightning_sam.__version__}"
    assert_one_line_error(cli(), "a command is needed", "demo")
    assert_one_line_error(cli("train"), "unknown command 'train'", "valid commands: demo")
    assert_one_line_error(cli("--bogus"), "--bogus")


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_without_its_package_names_the_extra(logger: str) -> None:
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in LOGGER_PACKAGES[logger])
    code = f"import sys; {hide}; from lightning_sam.__main__ import main; sys.exit(main(sys.argv[1:]))"
    assert_one_line_error(cli("demo", "--logger", logger, code=code), f"--logger {logger}", 'pip install ".[demo]"')


def test_a_setting_lightning_rejects_is_one_line_too() -> None:
    """What only Lightning can check (is there a GPU?) still ends in one line and exit code 2."""
    done = cli("demo", "--accelerator", "gpu", "--devices", "8", "--logger", "none", "--methods", "sgd", timeout=300)
    assert_one_line_error(done, "--accelerator/--devices", "gpu, 8")


# The extras ------------------------------------------------------------------------------------------------------


def extras() -> dict[str, set[str]]:
    """Each extra of pyproject.toml, as the set of requirement names it installs (other extras expanded)."""
    tomllib = pytest.importorskip("tomllib")
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        found: set[str] = set()
        for requirement in table[extra]:
            match = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", requirement)
            assert match, requirement
            name = match.group(0)
            if name.startswith("lightning-sam["):
                for inner in name[len("lightning-sam[") : -1].split(","):
                    found |= names(inner.strip())
            else:
                found.add(name.lower())
        return found

    return {extra: names(extra) for extra in table}


def test_the_demo_extra_installs_what_every_logger_needs() -> None:
    demo = extras()["demo"]
    assert {"scikit-learn", "matplotlib"} <= demo
    for logger in LOGGERS:
        if logger in LOGGER_PACKAGES:
            assert LOGGER_PACKAGES[logger][0] in demo, f"--logger {logger} needs {LOGGER_PACKAGES[logger][0]}"


def test_the_cli_extra_has_lightning_cli_s_requirement_and_test_installs_every_feature() -> None:
    table = extras()
    assert "jsonargparse[signatures]" in table["cli"]
    assert table["demo"] | table["cli"] | table["wandb"] <= table["test"]


def test_the_readme_says_which_extra_each_feature_needs() -> None:
    readme = (ROOT / "README.md").read_text()
    for extra in ("demo", "cli", "wandb", "test", "docs"):
        installs = rf"(\.|lightning-sam)\[([a-z]+,)*{extra}(,[a-z]+)*\]"
        assert re.search(installs, readme), f"README never installs the {extra} extra"
    cli_section = readme[readme.index("examples/cli") - 400 : readme.index("examples/cli") + 400]
    assert "[cli" in cli_section, "the LightningCLI example must say which extra it needs"
