"""Every method ``lightning_sam`` offers, in one table, without importing torch.

The package's lazy exports (``lightning_sam.LookSAM``...) and the demo's ``--methods`` both
read it: a new variant is its own module, one entry here (and its name in ``__init__``'s
typing imports), its docs and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    """One optimizer the demo trains with: its label, its class in ``lightning_sam`` and its settings.

    ``optimizer`` names a class of ``lightning_sam`` (``None`` is plain SGD) and ``home`` the
    module that defines it, ``rho_from`` the demo option that sets its radius, ``settings``
    its other arguments: the paper's or the method's defaults, those of
    ``benchmarks/bench_variants.py`` on the same task.

    Examples:
        >>> METHODS["looksam"].describe(rho=0.2)
        'rho=0.2, k=5, alpha=0.7'
        >>> METHODS["asam"].kwargs(rho=1.0)
        {'rho': 1.0, 'adaptive': True, 'eta': 0.01}
    """

    label: str
    optimizer: str | None
    summary: str
    home: str | None = None
    rho_from: str | None = "rho"
    settings: dict[str, Any] = field(default_factory=dict)

    def kwargs(self, rho: float | None) -> dict[str, Any]:
        """The optimizer's keyword arguments besides SGD's (none for SGD)."""
        return {} if self.optimizer is None else {"rho": rho, **self.settings}

    def describe(self, rho: float | None) -> str:
        """The settings as one short string."""
        if self.optimizer is None:
            return "momentum 0.9"
        return ", ".join(f"{k}={v}" for k, v in self.kwargs(rho).items() if k != "adaptive")


METHODS: dict[str, Method] = {
    "sgd": Method("SGD", None, "plain SGD (momentum 0.9, weight decay 5e-4): the baseline", rho_from=None),
    "sam": Method("SAM", "SAM", "SAM (Foret et al. 2021), radius --rho", "optimizer"),
    "asam": Method(
        "ASAM", "SAM", "adaptive SAM (Kwon et al. 2021), radius --asam-rho", "optimizer", "asam_rho",
        {"adaptive": True, "eta": 0.01},
    ),
    "looksam": Method(
        "LookSAM", "LookSAM", "SAM's ascent every 5th step, reused in between (Liu et al. 2022)", "looksam",
        settings={"k": 5, "alpha": 0.7},
    ),
    "gsam": Method(
        "GSAM", "GSAM", "surrogate-gap guided SAM (Zhuang et al. 2022)", "gsam", settings={"alpha": 0.1}
    ),
    "friendlysam": Method(
        "FriendlySAM", "FriendlySAM", "SAM without the batch's full-gradient component (Li et al. 2024)",
        "friendly_sam", settings={"sigma": 1.0, "lmbda": 0.9},
    ),
    "msam": Method(
        "MSAM", "MSAM", "momentum SAM, one pass per step (Becker et al. 2024), radius --msam-rho", "msam",
        "msam_rho",
    ),
    "aesam": Method(
        "AE-SAM", "AESAM", "SAM on the steps whose gradient norm is unusually large (Jiang et al. 2023)", "aesam",
        settings={"delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
    ),
    "aelooksam": Method(
        "AE-LookSAM", "AELookSAM", "AE-SAM's trigger with LookSAM's reuse in between (Jiang et al. 2023)", "aesam",
        settings={"alpha": 0.7, "delta": 0.9, "lambda1": -1.0, "lambda2": 1.0},
    ),
    "rst": Method(
        "RST", "RST", "SAM on a random half of the steps (SS-SAM/RST, Zhao et al. 2022)", "rst",
        settings={"p": 0.5},
    ),
}  # fmt: skip
