"""Lightning's own test suite as the oracle of "change nothing else" (not run in CI: it takes a while).

The chosen test modules run twice: as they are, and with Lightning's ``BoringModel`` (the module nearly every
Lightning test trains) replaced by a SAMMixin ``BoringModel`` that returns ``SAM(SGD)`` where it returns ``SGD``,
with the same scheduler. A test that passes without SAM and fails with it is listed, by module; a count per module
is printed at the end, as the docs' Trainer-features page reports it.

    python benchmarks/lightning_suite.py PATH/TO/lightning/tests [--modules trainer callbacks ...] [--show N]

Needs a checkout of Lightning's repository at (or near) the installed version: its tests are not in the wheel
(``git clone https://github.com/Lightning-AI/pytorch-lightning`` and ``git checkout <version>``),
pytest, pytest-timeout and the test requirements of that checkout (``requirements/pytorch/test.txt``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from pathlib import Path

DEFAULT_MODULES = ["trainer", "callbacks", "checkpointing", "tuner", "loops", "models"]

PLUGIN = '''
"""Loaded by pytest (-p sam_boring): Lightning's BoringModel, made a SAMMixin module returning SAM."""
import torch

import lightning.pytorch.demos as demos
import lightning.pytorch.demos.boring_classes as boring
from lightning_sam import SAM, SAMMixin

_Plain = boring.BoringModel


class BoringModel(SAMMixin, _Plain):
    def configure_optimizers(self):
        optimizer = SAM(self.parameters(), torch.optim.SGD, lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]


BoringModel.__module__ = _Plain.__module__


def pytest_configure(config):
    boring.BoringModel = BoringModel
    demos.BoringModel = BoringModel
'''


def run(tests: Path, modules: list[str], with_sam: bool, out: Path) -> dict[str, tuple[str, str]]:
    """Each test id's outcome (passed, failed, skipped) and failure message in one pytest run over the modules."""
    report = out / ("with_sam.xml" if with_sam else "without.xml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out), str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "-o"]
    command += ["addopts=", "-W", "ignore", "--continue-on-collection-errors", "--timeout=300"]
    command += ["-p", "sam_boring"] if with_sam else []
    command += [str(tests / "tests_pytorch" / m) for m in modules]
    subprocess.run(command, cwd=tests, env=env, capture_output=True, text=True, check=False)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child.get("message", "") for child in case}
        failure = kinds.get("failure", kinds.get("error"))
        outcome = "failed" if failure is not None else "skipped" if "skipped" in kinds else "passed"
        outcomes[name] = (outcome, (failure or "").split("\n")[0][:160])
    return outcomes


def module_of(test: str, modules: list[str]) -> str:
    dotted = test.split("::")[0]
    return next((m for m in modules if f".{m}." in f".{dotted}." or dotted.startswith(f"tests_pytorch.{m}")), "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", type=Path, help="the tests/ folder of a Lightning checkout")
    parser.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="folders of tests/tests_pytorch")
    parser.add_argument("--show", type=int, default=200, help="list at most this many failures")
    args = parser.parse_args()
    if not (args.tests / "tests_pytorch").is_dir():
        parser.error(f"{args.tests} has no tests_pytorch folder: give the tests/ folder of a Lightning checkout")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "sam_boring.py").write_text(PLUGIN)
        without = run(args.tests, args.modules, with_sam=False, out=out)
        with_sam = run(args.tests, args.modules, with_sam=True, out=out)
    passing = {t for t, (outcome, _) in without.items() if outcome == "passed"}
    broken = sorted(t for t in passing if with_sam.get(t, ("",))[0] == "failed")
    print(f"Lightning {version('lightning')}, torch {version('torch')}, tests of {', '.join(args.modules)}")
    print(f"{len(without)} tests, {len(passing)} pass without SAM; of those, {len(broken)} fail with SAM")
    print()
    print("| module | pass without SAM | fail with SAM |")
    print("|---|---:|---:|")
    totals, fails = (
        Counter(module_of(t, args.modules) for t in passing),
        Counter(module_of(t, args.modules) for t in broken),
    )
    for module in args.modules:
        print(f"| {module} | {totals[module]} | {fails[module]} |")
    print()
    for test in broken[: args.show]:
        print("failed with SAM:", test, "--", with_sam[test][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
