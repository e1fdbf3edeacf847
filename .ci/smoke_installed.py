"""Smoke test of the installed wheel: run from outside the source tree, in a venv with only the wheel (and [plot]).

    python .ci/smoke_installed.py WORK_DIR

Checks that the package imports from site-packages (not the checkout), ships its type marker, and that `SAM` in a
plain loop, `SAMMixin` under Lightning's Trainer with `SharpnessMonitor`, the `lightning-sam` command and its
`plot` command work. Each check compares against a value computed here independently, and exits non-zero on failure.
"""

from __future__ import annotations

import csv
import importlib.resources
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

import lightning_sam
from lightning_sam import SAM, SAMMixin, SharpnessMonitor


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"smoke test failed: {what}")
    print(f"ok: {what}")


def sam_step_from_the_paper(w: torch.Tensor, a: torch.Tensor, rho: float, lr: float) -> torch.Tensor:
    """One SAM step on L(w) = ½ wᵀ diag(a) w, from Foret et al. (2021): g = a·w, e = ρ g/‖g‖, w -= lr·∇L(w + e)."""
    g = a * w
    e = rho * g / g.norm()
    return w - lr * a * (w + e)


class Model(SAMMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> SAM:
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)


def main() -> None:
    work = Path(sys.argv[1])
    source_tree = Path(__file__).resolve().parents[1]
    where = Path(lightning_sam.__file__).resolve()
    check(source_tree not in where.parents and "site-packages" in where.parts, f"imported from the wheel ({where})")
    check(importlib.resources.files("lightning_sam").joinpath("py.typed").is_file(), "py.typed is installed")

    w0, a = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.2])
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.05)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (a * w * w).sum()
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    expected = sam_step_from_the_paper(w0, a, rho=0.1, lr=0.05)
    check(torch.allclose(w.detach(), expected, rtol=0, atol=1e-6), "SAM.step(closure) takes the paper's step")

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randint(0, 2, (128,)))
    logger = CSVLogger(work / "logs", name="smoke")
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=2,
        callbacks=[SharpnessMonitor(measures=["grad_norm", "hessian_max_eig"], every_n_steps=4)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = Model()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    check(trainer.optimizers[0].steps_taken == 16, "SAMMixin took 16 SAM steps (2 epochs of 8 batches)")
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        logged = {key for row in csv.DictReader(f) for key, value in row.items() if value}
    check({"sharpness/grad_norm", "sharpness/hessian_max_eig"} <= logged, "SharpnessMonitor logged its measures")

    command = Path(sys.executable).with_name("lightning-sam")
    version = subprocess.run([command, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    check(version == f"lightning-sam {lightning_sam.__version__}", f"the lightning-sam command ({version})")
    png = work / "curves.png"
    plot = subprocess.run([command, "plot", logger.log_dir, "--out", png], capture_output=True, text=True)
    drawn = plot.returncode == 0 and png.is_file() and png.stat().st_size > 10_000
    check(drawn, f"lightning-sam plot: {plot.stdout.strip()} {plot.stderr.strip()[-500:]}")


if __name__ == "__main__":
    main()
