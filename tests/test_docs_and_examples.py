"""The README's and docs' Python blocks run, and the examples run with tiny limits."""

from __future__ import annotations

import re
import runpy
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
def test_docs_python_block_runs(where: str, code: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def test_sam_vs_sgd_example_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["sam_vs_sgd.py", "--epochs", "1"])
    runpy.run_path(str(ROOT / "examples" / "sam_vs_sgd.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"\| SGD \| \d+\.\d% \|", out)
    assert re.search(r"\| SAM \(rho=0\.1\) \| \d+\.\d% \|", out)


@pytest.mark.parametrize("argv", [["--noise", "1.0"], ["--epochs", "0"]])
def test_sam_vs_sgd_example_rejects_bad_input(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["sam_vs_sgd.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "sam_vs_sgd.py"), run_name="__main__")
    assert exit_info.value.code == 2
