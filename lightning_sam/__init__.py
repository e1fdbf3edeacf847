"""Sharpness-Aware Minimization for PyTorch and PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_sam._registry import METHODS

if TYPE_CHECKING:
    from lightning_sam.aesam import AESAM, AELookSAM
    from lightning_sam.callbacks import SharpnessMonitor
    from lightning_sam.friendly_sam import FriendlySAM
    from lightning_sam.gsam import GSAM
    from lightning_sam.looksam import LookSAM
    from lightning_sam.mixin import SAMMixin
    from lightning_sam.msam import MSAM
    from lightning_sam.optimizer import SAM
    from lightning_sam.plots import LandscapePlot, SpectrumPlot
    from lightning_sam.rst import RST
    from lightning_sam.step import SAMStep

__all__ = [
    "AESAM",
    "GSAM",
    "MSAM",
    "RST",
    "SAM",
    "AELookSAM",
    "FriendlySAM",
    "LandscapePlot",
    "LookSAM",
    "SAMMixin",
    "SAMStep",
    "SharpnessMonitor",
    "SpectrumPlot",
]
__version__ = "0.1.0"

# Imported on first use, so that `lightning-sam --help` and its errors answer without importing torch and Lightning.
_HOMES = {
    "SAMMixin": "mixin",
    "SAMStep": "step",
    "SharpnessMonitor": "callbacks",
    "SpectrumPlot": "plots",
    "LandscapePlot": "plots",
    **{m.optimizer: m.home for m in METHODS.values() if m.optimizer is not None and m.home is not None},
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"lightning_sam.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_sam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
