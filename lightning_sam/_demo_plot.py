"""The figures of ``lightning-sam demo`` and ``lightning-sam plot``: sharpness curves and the Hessian's spectrum.

The demo's (`figure`): accuracy, sharpness, the spectrum and accuracy against wall time, one colour
and one legend entry per method: its mean over seeds as a line, the range over seeds (min to max)
as a band. ``lightning-sam plot``'s (`runs_figure`): the same sharpness and spectrum panels for
runs read back from their logs, one colour per run. Every panel has data and a labelled y axis;
the axes are linear but the spectrum's density (log scale: its outliers are orders of magnitude
rarer than its bulk). torch is imported by the demo's figure only.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_sam.demo import RunResult
    from lightning_sam.runs import Density, Run

__all__ = ["Y_LABELS", "draw", "draw_runs", "figure", "run_styles", "runs_figure", "y_label"]

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray")
LineStyle = Literal["-", "--", ":", "-."]
LINESTYLES: tuple[LineStyle, ...] = (
    "-",
    "--",
    ":",
    "-.",
)  # past len(COLORS) runs, the colours come back with another line style
Y_LABELS = {
    "first_order": "L(w + e) − L(w)",
    "grad_norm": "‖g‖",
    "hessian_max_eig": "largest Hessian eigenvalue",
    "preconditioned_max_eig": "λ_max(P⁻¹H)",
    "eos_ratio": "λ_max(S H) / base optimizer's edge",
    "sam_eos_ratio": "λ_max / SAM's edge",
    "critical_sharpness": "2 / η_c along the update",
    "hessian_trace": "trace of the Hessian",
    "adaptive_avg": "E[L(w + δ)] − L(w)",
    "adaptive_worst": "max L(w + δ) − L(w)",
}


def y_label(key: str) -> str:
    """The y-axis label of a ``sharpness/...`` key: what the measure is, or the key's own name.

    Examples:
        >>> y_label("sharpness/grad_norm"), y_label("sharpness/hessian_eig_2")
        ('‖g‖', 'Hessian eigenvalue 2')
    """
    name = key.removeprefix("sharpness/")
    if name.startswith("hessian_eig_") and name[len("hessian_eig_") :].isdigit():
        return f"Hessian eigenvalue {name[len('hessian_eig_') :]}"
    return Y_LABELS.get(name, name)


def _band(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """x, mean, min and max over the curves, at the x values every curve has."""
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    columns = [[c[x] for c in curves] for x in xs]
    return xs, [statistics.mean(v) for v in columns], [min(v) for v in columns], [max(v) for v in columns]


def _layout(fig: Figure, n: int) -> list[Any]:
    """Axes for n panels in rows of up to three; a shorter last row is stretched to full width (no empty panel)."""
    cols = min(3, n)
    rows = -(-n // cols)
    last = n - cols * (rows - 1)
    grid = fig.add_gridspec(rows, cols * last)
    axes = [fig.add_subplot(grid[i // cols, (i % cols) * last : (i % cols + 1) * last]) for i in range(n - last)]
    width = cols * last // last
    axes += [fig.add_subplot(grid[rows - 1, j * width : (j + 1) * width]) for j in range(last)]
    return axes


def figure(results: Sequence[RunResult], keys: Sequence[str], title: str = "", cost_note: str = "") -> Figure:
    """Draw the figure (matplotlib's Agg backend): accuracy, one panel per ``sharpness/...`` key, accuracy vs time.

    ``cost_note`` (e.g. the machine and its load while the runs were timed) is appended to the
    x label of the accuracy-against-cost panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lightning_sam.figures import plot_spectrum
    from lightning_sam.hessian import Spectrum

    names = list(dict.fromkeys(r.name for r in results))
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    keys = [k for k in keys if k != "sharpness/negative_fraction"]  # one value per run: the spectrum panel shows it
    with_spectrum = any(r.spectrum is not None for r in results)
    n = 2 + len(keys) + with_spectrum
    cols = min(3, n)
    fig = plt.figure(figsize=(4.8 * cols, 3.5 * -(-n // cols) + 1.2), layout="constrained")
    axes = _layout(fig, n)
    accuracy, *sharpness, cost = axes
    spectrum_ax = sharpness.pop() if with_spectrum else None
    for name in names:
        runs = [r for r in results if r.name == name]
        seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        x, mean, low, high = _band([{e: 100 * a for e, a in r.accuracy_curve} for r in runs])
        accuracy.plot(x, mean, color=color[name], label=f"{name} ({runs[0].settings}; {seeds})")
        accuracy.fill_between(x, low, high, color=color[name], alpha=0.2, linewidth=0)
        for ax, key in zip(sharpness, keys, strict=True):
            curves = [{s: row[key] for s, row in r.sharpness_history if key in row} for r in runs]
            x, mean, low, high = _band([c for c in curves if c])
            marker = "." if len(x) < 20 else None
            ax.plot(x, mean, color=color[name], marker=marker)
            ax.fill_between(x, low, high, color=color[name], alpha=0.2, linewidth=0)
        spectra = [r.spectrum for r in runs if r.spectrum is not None]
        if spectrum_ax is not None and spectra:  # every seed's runs in one density
            pooled = Spectrum(*(torch.cat([getattr(sp, f) for sp in spectra]) for f in ("nodes", "weights")))
            plot_spectrum(spectrum_ax, pooled, label=name, color=color[name])
        times, accs = [r.seconds for r in runs], [100 * r.test_acc for r in runs]
        cost.scatter(times, accs, color=color[name], alpha=0.35, s=14)
        t, a = statistics.mean(times), statistics.mean(accs)
        cost.errorbar(t, a, xerr=[[t - min(times)], [max(times) - t]], yerr=[[a - min(accs)], [max(accs) - a]],
                      color=color[name], fmt="o", capsize=3)  # fmt: skip
    accuracy.set(title="clean test accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax, key in zip(sharpness, keys, strict=True):
        ax.set(title=key, xlabel="optimizer step", ylabel=y_label(key))
    cost_label = f"wall time per run (s), {cost_note}" if cost_note else "wall time per run (s)"
    cost.set(title="accuracy against cost (dots: seeds)", xlabel=cost_label, ylabel="final clean test accuracy (%)")
    if spectrum_ax is not None:
        spectrum_ax.set_title("Hessian spectrum, end of training")
        spectrum_ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax is not spectrum_ax:  # log-scale density: its own tick labels
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    fig.legend(*accuracy.get_legend_handles_labels(), loc="outside upper center", ncol=min(4, len(names)), fontsize=8)
    caption = "lines and large dots: mean over seeds; bands and bars: min to max over seeds"
    fig.supxlabel(f"{title}\n{caption}" if title else caption, fontsize=7.5)  # the setting, timing and machine
    return fig


def draw(results: Sequence[RunResult], keys: Sequence[str], path: Path, title: str = "", cost_note: str = "") -> Path:
    """Draw the figure and write it as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results, keys, title, cost_note=cost_note)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_styles(n: int) -> list[tuple[str, LineStyle]]:
    """The ``(colour, line style)`` of each of n runs: the colours in turn, then again with the next style.

    Examples:
        >>> run_styles(10)[0], run_styles(10)[8]
        (('tab:blue', '-'), ('tab:blue', '--'))
    """
    return [(COLORS[i % len(COLORS)], LINESTYLES[i // len(COLORS) % len(LINESTYLES)]) for i in range(n)]


def _spectrum_label(label: str, spectrum: Density) -> str:
    """A run's entry in the spectrum panel's legend: its name, the step and the fraction of negative eigenvalues."""
    fraction = f", {spectrum.negative_fraction:.1%} negative" if spectrum.negative_fraction is not None else ""
    return f"{label} (step {spectrum.step}{fraction})"


def runs_figure(runs: Sequence[Run], keys: Sequence[str], title: str = "") -> Figure:
    """Draw ``lightning-sam plot``'s figure: one panel per key, one colour (and legend entry) per run.

    A ``sharpness/...`` key's panel has its `y_label`; ``sharpness/spectrum`` is the panel of the
    Hessian spectrum density each run logged last (log scale, its negative fraction in the
    legend); any other key (``--metric``) is plotted under its own name. The x axis is the
    optimizer step. A matplotlib ``Figure`` without pyplot: nothing to close, no backend switched.

    Examples:
        >>> from pathlib import Path
        >>> from lightning_sam.runs import Run
        >>> runs = [Run(name, Path(name), "csv", {"sharpness/grad_norm": [(1, 0.5 + i), (3, 0.4 + i)],
        ...                                       "val_acc": [(3, 0.9)]}) for i, name in enumerate(["sgd", "sam"])]
        >>> fig = runs_figure(runs, ["sharpness/grad_norm", "val_acc"], title="my runs")
        >>> [ax.get_ylabel() for ax in fig.axes], [t.get_text() for t in fig.legends[0].get_texts()]
        (['‖g‖', 'val_acc'], ['sgd', 'sam'])
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from lightning_sam.runs import SPECTRUM

    n = len(keys)
    cols = min(3, n)
    fig = Figure(figsize=(4.8 * cols, 3.5 * -(-n // cols) + 1.0), layout="constrained")
    axes = _layout(fig, n)
    styles = run_styles(len(runs))
    for ax, key in zip(axes, keys, strict=True):
        if key == SPECTRUM:
            for run, (color, style) in zip(runs, styles, strict=True):
                if run.spectrum is not None:
                    ax.plot(run.spectrum.eigenvalues, run.spectrum.density, color=color, linestyle=style,
                            label=_spectrum_label(run.label, run.spectrum))  # fmt: skip
            peak = max((max(r.spectrum.density, default=0.0) for r in runs if r.spectrum is not None), default=1.0)
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(peak * 1e-7, 1e-12))
            ax.set(title="Hessian spectrum, last logged", xlabel="Hessian eigenvalue", ylabel="density (log scale)")
            ax.legend(fontsize=7)
        else:
            for run, (color, style) in zip(runs, styles, strict=True):
                found = run.points(key)
                if found:
                    steps, values = zip(*found, strict=True)
                    marker = "." if len(found) < 20 else None
                    ax.plot(steps, values, color=color, linestyle=style, marker=marker)
            ylabel = y_label(key) if key.startswith("sharpness/") else key
            ax.set(title=key, xlabel="optimizer step", ylabel=ylabel)
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color, linestyle=style) for color, style in styles]
    fig.legend(handles, [run.label for run in runs], loc="outside lower center", ncol=min(4, len(runs)), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def draw_runs(runs: Sequence[Run], keys: Sequence[str], path: Path, title: str = "") -> Path:
    """Draw `runs_figure` and write it as a PNG (its folder created if missing).

    Text is drawn as given: a ``$`` in a run's name or the title is not read as TeX math.
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        fig = runs_figure(runs, keys, title)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return path
