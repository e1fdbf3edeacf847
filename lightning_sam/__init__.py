"""Sharpness-Aware Minimization for PyTorch and PyTorch Lightning."""

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.mixin import SAMMixin
from lightning_sam.optimizer import SAM

__all__ = ["SAM", "SAMMixin", "SharpnessMonitor"]
__version__ = "0.1.0"
