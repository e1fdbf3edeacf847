"""Read back what runs logged: W&B run folders, ``CSVLogger`` folders and TensorBoard event files.

``lightning-sam plot`` draws the sharpness curves of a user's own runs from these. Each reader
returns a [`Run`][lightning_sam.runs.Run]: its label, every scalar it logged as ``(step, value)``
points against the optimizer step (W&B's ``trainer/global_step``, the ``step`` of Lightning's CSV
and TensorBoard loggers: the same numbers for the same fit), and the Hessian spectrum density
when the run logged one to W&B. Only the standard library is needed, and W&B's or TensorBoard's
own reader for their files; neither torch nor matplotlib is imported.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FORMATS",
    "SPECTRUM",
    "Density",
    "Run",
    "RunsError",
    "drawable",
    "find_runs",
    "label_runs",
    "metric_keys",
    "panel_keys",
    "points",
    "read_csv",
    "read_run",
    "read_runs",
    "read_tensorboard",
    "read_wandb",
    "sharpness_keys",
]

Format = Literal["wandb", "csv", "tensorboard"]
FORMATS: tuple[Format, ...] = ("wandb", "csv", "tensorboard")
# The panel of the Hessian spectrum density (a W&B table, not a scalar): what --keys calls it.
SPECTRUM = "sharpness/spectrum"
NEGATIVE_FRACTION = "sharpness/negative_fraction"  # one value per spectrum: the spectrum panel's legend shows it
_WANDB_RUN = re.compile(r"(offline-)?run-.+")
_EVENTS = "events.out.tfevents."
_LOOKED_FOR = "W&B run folders (wandb/offline-run-*, wandb/run-*), CSVLogger metrics.csv files, TensorBoard event files"


class RunsError(ValueError):
    """A path that holds no readable run, or a request the runs cannot satisfy; its message is one line."""


@dataclass(frozen=True)
class Density:
    """A Hessian eigenvalue density logged to W&B (``sharpness/spectrum``): its grid and density values.

    Examples:
        >>> Density(step=7, eigenvalues=[0.0, 1.0], density=[0.5, 0.5], negative_fraction=0.1).step
        7
    """

    step: int
    eigenvalues: list[float]
    density: list[float]  # the density itself (W&B's table holds its log10)
    negative_fraction: float | None = None


@dataclass
class Run:
    """One run's logged scalars, ``{key: [(step, value), ...]}`` in logging order, and its last spectrum.

    Examples:
        >>> run = Run("sgd", Path("logs/version_0"), "csv", {"sharpness/grad_norm": [(1, 0.5), (3, 0.4)]})
        >>> run.points("sharpness/grad_norm"), run.points("val_acc")
        ([(1, 0.5), (3, 0.4)], [])
    """

    label: str
    path: Path  # the run's folder, or its event file
    format: Format
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    spectrum: Density | None = None
    named: bool = False  # named by a path given (not found by searching a folder above it)

    def points(self, key: str) -> list[tuple[int, float]]:
        """The ``(step, value)`` points of a key; none if the run did not log it."""
        return self.scalars.get(key, [])


def _number(value: Any) -> float | None:
    """A logged value as a float, or None for what is not a number (text, tables, booleans)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "nan", "Infinity", "inf", "-Infinity", "-inf"):
        return float(value.replace("Infinity", "inf"))
    return None


def _step(value: Any) -> int | None:
    """A logged step as an int, or None for what is not a finite number (a truncated row, text, NaN)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _add(scalars: dict[str, list[tuple[int, float]]], key: str, step: int, value: Any) -> None:
    number = _number(value)
    if number is not None:
        scalars.setdefault(key, []).append((step, number))


# Finding runs -----------------------------------------------------------------------------------------------------


def _is_wandb_run(folder: Path) -> bool:
    return bool(_WANDB_RUN.fullmatch(folder.name)) and any(folder.glob("*.wandb"))


def _is_event_file(path: Path) -> bool:
    return path.name.startswith(_EVENTS)


def _runs_in(folder: Path) -> list[tuple[Format, Path]]:
    """The runs in a folder and below it; W&B run folders are not searched further, symlinks are not followed."""
    found: list[tuple[Format, Path]] = []
    for here, dirs, files in os.walk(folder):
        place = Path(here)
        if _is_wandb_run(place):
            found.append(("wandb", place))
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (place / d).is_symlink())
        if "metrics.csv" in files:
            found.append(("csv", place))
        if any(name.startswith(_EVENTS) for name in files):
            found.append(("tensorboard", place))
    return found


def find_runs(paths: Iterable[Path]) -> list[tuple[Format, Path]]:
    r"""The runs the paths name or hold, as ``(format, path)``, in the order given; each run once.

    A path is a run (a W&B run folder or its ``.wandb`` file, a ``metrics.csv`` or the folder that
    holds it, a TensorBoard event file or a folder of them) or a folder to search for runs, such
    as a W&B ``save_dir`` (its ``wandb/`` run folders) or a Lightning ``save_dir`` (its versions).

    Raises:
        RunsError: A path does not exist, is a file of no run, or is a folder with no run in it.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for version in ("version_0", "version_1"):
        ...         (Path(tmp) / "lightning_logs" / version).mkdir(parents=True)
        ...         _ = (Path(tmp) / "lightning_logs" / version / "metrics.csv").write_text("step,loss\n0,1.0\n")
        ...     [(kind, path.name) for kind, path in find_runs([Path(tmp)])]
        [('csv', 'version_0'), ('csv', 'version_1')]
    """
    found: dict[tuple[Format, Path], None] = {}
    for given in paths:
        if not given.exists():
            raise RunsError(f"{str(given)!r} does not exist")
        path = given.resolve()  # a link too, such as wandb/latest-run
        if path.is_file():
            if _is_event_file(path):
                runs: list[tuple[Format, Path]] = [("tensorboard", path)]
            elif path.name == "metrics.csv":
                runs = [("csv", path.parent)]
            elif path.suffix == ".wandb" and _is_wandb_run(path.parent):
                runs = [("wandb", path.parent)]
            else:
                why = f"give a run's folder or a folder of runs ({_LOOKED_FOR})"
                raise RunsError(f"{str(given)!r} is a file of no run; {why}")
        else:
            runs = _runs_in(path)
            if not runs:
                raise RunsError(f"no run found in {str(given)!r} (looked for {_LOOKED_FOR})")
        for kind, run in runs:
            found.setdefault((kind, run), None)
    return list(found)


# Reading one run --------------------------------------------------------------------------------------------------


def read_csv(folder: Path, label: str = "") -> Run:
    r"""Read a ``CSVLogger`` run: its ``metrics.csv``, one point per non-empty cell, at the row's ``step``.

    Raises:
        RunsError: The file has no ``step`` column (it is not a Lightning ``CSVLogger``'s).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     rows = "epoch,sharpness/grad_norm,step\n,0.75,1\n0,,1\n,0.5,3\n"
        ...     _ = (Path(tmp) / "metrics.csv").write_text(rows)
        ...     read_csv(Path(tmp)).scalars
        {'sharpness/grad_norm': [(1, 0.75), (3, 0.5)], 'epoch': [(1, 0.0)]}
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    file = folder / "metrics.csv"
    try:
        with file.open(newline="") as f:
            rows = csv.DictReader(f)
            if "step" not in (rows.fieldnames or []):
                raise RunsError(f"{str(file)!r} has no step column: not a Lightning CSVLogger's metrics.csv")
            for row in rows:
                step = _step(row["step"])
                if step is None:  # a row cut short (a run still writing, or killed), or no step in it
                    continue
                for key, text in row.items():
                    if key != "step" and key is not None and text:
                        try:
                            _add(scalars, key, step, float(text))
                        except ValueError:  # text, not a number
                            continue
    except (UnicodeDecodeError, csv.Error, ValueError) as error:
        if isinstance(error, RunsError):
            raise
        raise RunsError(f"{str(file)!r} is not a readable CSV file: {error}") from None
    return Run(label or folder.name, folder, "csv", scalars)


def read_tensorboard(path: Path, label: str = "") -> Run:
    """Read a TensorBoard run (an event file, or a folder of them) with TensorBoard's ``EventAccumulator``.

    Every scalar point is kept (no reservoir sampling), at the step it was logged with.
    """
    # No type hints in tensorboard (unused-ignore: for a mypy told to skip it)
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped,unused-ignore]
        EventAccumulator,
    )

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(int(e.step), float(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return Run(label or path.name, path, "tensorboard", scalars)


def _wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records, as W&B's own reader prints them (``wandb leet inspect --json``)."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = next(iter(done.stderr.strip().splitlines()[-1:]), f"exit code {done.returncode}")
        raise RunsError(f"W&B could not read {str(run_dir)!r} (wandb leet inspect, wandb >= 0.31): {why}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def read_wandb(run_dir: Path, label: str = "") -> Run:
    """Read a W&B run folder (offline or synced) with W&B's own reader, ``wandb leet inspect --json``.

    The points of every numeric key of the history rows that carry ``trainer/global_step`` (what
    Lightning's ``WandbLogger`` logs), against it (against W&B's ``_step`` in a run that never logged
    it); the fields of tables and plots are left out; the label is the run's display name. The last
    ``sharpness/spectrum`` table (a JSON file under ``files/``) is the run's spectrum, with the
    ``sharpness/negative_fraction`` logged at its step.
    """
    records = _wandb_records(run_dir)
    names = [r["run"]["display_name"] for r in records if r.get("type") == "run" and r["run"].get("display_name")]
    scalars: dict[str, list[tuple[int, float]]] = {}
    table: tuple[int, str] | None = None
    rows = [r["history"]["item"] for r in records if r.get("type") == "history"]
    # Lightning's WandbLogger logs trainer/global_step beside every row; a run that never did: W&B's own _step.
    x = "trainer/global_step" if any("trainer/global_step" in row for row in rows) else "_step"
    for row in rows:
        step = _step(row.get(x))
        if step is None:
            continue
        media = {key.rsplit(".", 1)[0] for key in row if key.endswith("._type")}  # tables, plots: their fields
        for key, value in row.items():
            if not key.startswith("_") and key != "trainer/global_step" and key.rsplit(".", 1)[0] not in media:
                _add(scalars, key, step, value)
        if isinstance(row.get(f"{SPECTRUM}_table.path"), str):
            table = (step, row[f"{SPECTRUM}_table.path"])
    run = Run(label or (names[-1] if names else run_dir.name), run_dir, "wandb", scalars)
    if table is not None:
        step, relative = table
        try:
            data = json.loads((run_dir / "files" / relative).read_text())["data"]
        except (OSError, ValueError, KeyError) as error:
            raise RunsError(f"the spectrum table of {str(run_dir)!r} is unreadable: {error}") from error
        points = [(float(x), 10.0 ** float(y)) for x, _, y in data if _number(x) is not None and _number(y) is not None]
        fractions = [v for s, v in run.points(NEGATIVE_FRACTION) if s == step]
        run.spectrum = Density(
            step, [x for x, _ in points], [y for _, y in points], fractions[-1] if fractions else None
        )
    return run


def read_run(kind: Format, path: Path, label: str = "") -> Run:
    """Read one run of a given format (``"wandb"``, ``"csv"`` or ``"tensorboard"``).

    Examples:
        >>> read_run("mlflow", Path("."))
        Traceback (most recent call last):
        ...
        lightning_sam.runs.RunsError: unknown run format 'mlflow'; valid formats: wandb, csv, tensorboard
    """
    readers = {"wandb": read_wandb, "csv": read_csv, "tensorboard": read_tensorboard}
    if kind not in readers:
        raise RunsError(f"unknown run format {kind!r}; valid formats: {', '.join(FORMATS)}")
    return readers[kind](path, label)


def label_runs(runs: Sequence[tuple[Format, Path]], names: Sequence[str | None] = ()) -> list[str]:
    """Each run's label: its name (W&B's display name) if given, else its folder relative to the common parent.

    The common parent is that of the runs' grandparents, so that a Lightning run keeps its logger's
    name (``lightning_logs/version_3``); an event file stands for its folder. Equal labels get the
    format, then the file, appended.

    Examples:
        >>> label_runs([("csv", Path("/x/lightning_logs/version_0")), ("csv", Path("/x/lightning_logs/version_1"))])
        ['lightning_logs/version_0', 'lightning_logs/version_1']
        >>> label_runs([("csv", Path("/x/logs/version_0")), ("tensorboard", Path("/x/logs/version_0"))])
        ['logs/version_0 (csv)', 'logs/version_0 (tensorboard)']
        >>> label_runs([("wandb", Path("/x/wandb/offline-run-1")), ("csv", Path("/x/a/version_0"))], ["sgd", None])
        ['sgd', 'a/version_0']
    """
    names = list(names) + [None] * (len(runs) - len(names))
    places = [path.parent if path.is_file() or _is_event_file(path) else path for _, path in runs]
    base = os.path.commonpath([str(p.parent.parent) for p in places]) if places else ""
    labels = [name or os.path.relpath(place, base) for name, place in zip(names, places, strict=True)]
    clashes = {label for label in labels if labels.count(label) > 1}
    labels = [f"{label} ({kind})" if label in clashes and not name else label
              for label, name, (kind, _) in zip(labels, names, runs, strict=True)]  # fmt: skip
    clashes = {label for label in labels if labels.count(label) > 1}
    labels = [f"{label} ({os.path.relpath(path, base)})" if label in clashes else label
              for label, (_, path) in zip(labels, runs, strict=True)]  # fmt: skip
    return labels


def read_runs(paths: Iterable[Path]) -> list[Run]:
    """Find and read every run the paths name or hold (see `find_runs`), labelled by `label_runs`.

    A run that a path names (its folder, or a file of it) is `Run.named`; one found in a folder
    above it is not.

    Raises:
        RunsError: A path holds no run, or a run is unreadable.
    """
    paths = list(paths)
    found = find_runs(paths)
    runs = [read_run(kind, path) for kind, path in found]
    names = [run.label if run.format == "wandb" and run.label != run.path.name else None for run in runs]
    given = {path.resolve() for path in paths}
    named = given | {path.parent for path in given if path.is_file()}  # metrics.csv, a .wandb file
    for run, label in zip(runs, label_runs(found, names), strict=True):
        run.label, run.named = label, run.path in named
    return runs


# What to draw -----------------------------------------------------------------------------------------------------


def _order(key: str) -> tuple[str, int, str]:
    """Sort keys by their measure (its diagnostics right after it, hessian_eig_N in numeric order).

    Examples:
        >>> sorted(["h_eig_10", "h_eig_2_residual", "h_eig_2", "g_residual", "g"], key=_order)
        ['g', 'g_residual', 'h_eig_2', 'h_eig_2_residual', 'h_eig_10']
    """
    suffix = next((s for s in ("_residual", "_stderr") if key.endswith(s)), "")
    base = key[: len(key) - len(suffix)]
    match = re.fullmatch(r"(.*?)(\d+)", base)
    return (match.group(1), int(match.group(2)), suffix) if match else (base, -1, suffix)


def sharpness_keys(runs: Sequence[Run]) -> list[str]:
    """Every ``sharpness/*`` scalar the runs logged (but ``negative_fraction``), then the spectrum if any run has one.

    Examples:
        >>> logged = ["sharpness/hessian_eig_10", "sharpness/hessian_eig_2", "sharpness/negative_fraction", "val_acc"]
        >>> run = Run("a", Path("a"), "csv", {key: [(1, 1.0)] for key in logged})
        >>> sharpness_keys([run])
        ['sharpness/hessian_eig_2', 'sharpness/hessian_eig_10']
    """
    keys = {k for run in runs for k in run.scalars if k.startswith("sharpness/") and "." not in k and run.scalars[k]}
    keys.discard(NEGATIVE_FRACTION)
    return sorted(keys, key=_order) + [SPECTRUM] * any(run.spectrum is not None for run in runs)


def metric_keys(runs: Sequence[Run]) -> list[str]:
    """The other scalars the runs logged (what ``--metric`` can ask for), sorted.

    Examples:
        >>> metric_keys([Run("a", Path("a"), "csv", {"sharpness/grad_norm": [(1, 1.0)], "val_acc": [(1, 0.9)]})])
        ['val_acc']
    """
    return sorted({k for run in runs for k in run.scalars if not k.startswith("sharpness/") and run.scalars[k]})


def _listed(keys: Sequence[str]) -> str:
    return ", ".join(keys) if keys else "none"


def panel_keys(runs: Sequence[Run], keys: Sequence[str] = (), metrics: Sequence[str] = ()) -> list[str]:
    """The panels to draw, in order: ``keys`` (default: `sharpness_keys`), then ``metrics``.

    A key may leave out its ``sharpness/`` prefix; ``sharpness/spectrum`` is the spectrum panel,
    and ``sharpness/negative_fraction`` a panel of its own only when asked for.

    Raises:
        RunsError: A key or metric that no run logged (the message lists those they did).

    Examples:
        >>> run = Run("a", Path("a"), "csv", {"sharpness/grad_norm": [(1, 1.0)], "val_acc": [(1, 0.9)]})
        >>> panel_keys([run]), panel_keys([run], ["grad_norm"], ["val_acc"])
        (['sharpness/grad_norm'], ['sharpness/grad_norm', 'val_acc'])
        >>> panel_keys([run], ["trace"])
        Traceback (most recent call last):
        ...
        lightning_sam.runs.RunsError: --keys got 'sharpness/trace', which no run logged; available: sharpness/grad_norm
    """
    available = sharpness_keys(runs)
    logged = {k for run in runs for k in run.scalars if run.scalars[k]}
    if NEGATIVE_FRACTION in logged:
        available = sorted([*available, NEGATIVE_FRACTION], key=lambda k: (k == SPECTRUM, _order(k)))
    chosen = []
    for key in keys:
        key = key if key.startswith("sharpness/") else f"sharpness/{key}"
        if key not in available:
            raise RunsError(f"--keys got {key!r}, which no run logged; available: {_listed(available)}")
        chosen.append(key)
    if not keys:
        chosen = [k for k in available if k != NEGATIVE_FRACTION]
    others = metric_keys(runs)
    for metric in metrics:
        if metric not in logged:
            raise RunsError(f"--metric got {metric!r}, which no run logged; available: {_listed(others)}")
        chosen.append(metric)
    return list(dict.fromkeys(chosen))


def _nothing_to_draw(run: Run, keys: Sequence[str]) -> str | None:
    """Why a run has no point in any panel of ``keys`` (one line), or None if it has some."""
    if any(math.isfinite(v) for k in keys for _, v in run.points(k)) or (SPECTRUM in keys and run.spectrum):
        return None
    where = f"{run.label} ({run.format}, {str(run.path)!r})"
    if not any(k.startswith("sharpness/") for k in run.scalars):
        others = _listed(metric_keys([run]))
        return f"{where} logged no sharpness/* scalar (was a SharpnessMonitor attached?); --metric KEY plots: {others}"
    return f"{where} logged no finite value of {', '.join(keys)}"


def drawable(runs: Sequence[Run], keys: Sequence[str]) -> tuple[list[Run], list[Run]]:
    """The runs with a point to draw in the panels of ``keys``, and those without (found in a folder, so skipped).

    Raises:
        RunsError: A `Run.named` run has nothing to draw, or no run has (the message says why).

    Examples:
        >>> runs = [Run("a", Path("a"), "csv", {"sharpness/g": [(1, 1.0)]}),
        ...         Run("b", Path("b"), "csv", {"x": [(1, 0.0)]})]
        >>> [[run.label for run in part] for part in drawable(runs, ["sharpness/g"])]
        [['a'], ['b']]
    """
    kept: list[Run] = []
    skipped: list[Run] = []
    for run in runs:
        why = _nothing_to_draw(run, keys)
        if why is not None and run.named:
            raise RunsError(why)
        (kept if why is None else skipped).append(run)
    if not kept:
        raise RunsError(_nothing_to_draw(skipped[0], keys) if len(skipped) == 1 else f"no run has anything to draw: "
                        f"{'; '.join(str(_nothing_to_draw(run, keys)) for run in skipped)}")  # fmt: skip
    return kept, skipped


def points(runs: Sequence[Run], keys: Sequence[str]) -> int:
    """How many scalar points the panels of ``keys`` draw.

    Examples:
        >>> points([Run("a", Path("a"), "csv", {"x": [(1, 1.0), (2, 1.0)], "y": [(1, 0.0)]})], ["x"])
        2
    """
    return sum(len(run.points(k)) for run in runs for k in keys)
