"""Sharpness-Aware Minimization for PyTorch and PyTorch Lightning."""

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.mixin import SAMMixin
from lightning_sam.optimizer import SAM
from lightning_sam.step import SAMStep
from lightning_sam.variants import GSAM, MSAM, FriendlySAM, LookSAM

__all__ = ["GSAM", "MSAM", "SAM", "FriendlySAM", "LookSAM", "SAMMixin", "SAMStep", "SharpnessMonitor"]
__version__ = "0.1.0"
