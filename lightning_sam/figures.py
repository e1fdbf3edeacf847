"""Figures of the Hessian's spectrum with matplotlib (an optional dependency: the ``demo`` extra has it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sam.hessian import Spectrum

__all__ = ["density_curve", "plot_spectrum", "save_spectrum_figure"]


def density_curve(spectrum: Spectrum, points: int = 400) -> tuple[Tensor, Tensor]:
    """The eigenvalue density on a grid spanning the nodes (5% margins): ``(eigenvalues, density)``."""
    lo, hi = float(spectrum.nodes.min()), float(spectrum.nodes.max())
    margin = 0.05 * (hi - lo) or 1.0
    grid = torch.linspace(lo - margin, hi + margin, points, dtype=torch.float64)
    return grid, spectrum.density(grid)


def plot_spectrum(ax: Any, spectrum: Spectrum, **line: Any) -> None:
    """Draw the density on a log scale on a matplotlib ``Axes``, with its negative fraction in the legend label."""
    grid, density = density_curve(spectrum)
    label = line.pop("label", "density")
    negative = float(spectrum.negative_fraction())
    ax.plot(grid.numpy(), density.clamp_min(1e-12).numpy(), label=f"{label} ({negative:.1%} negative)", **line)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(float(density.max()) * 1e-7, 1e-12))
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (log scale)")


def save_spectrum_figure(spectra: Mapping[str, Spectrum], path: Path, title: str) -> Path:
    """Write one figure of one or more spectra (e.g. SGD against SAM) to ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the user's process

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, spectrum in spectra.items():
        plot_spectrum(ax, spectrum, label=label)
    ax.set_title(title)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
