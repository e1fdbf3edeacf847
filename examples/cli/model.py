"""Modules and data for the LightningCLI example (see config.yaml beside this file).

Needs the `cli` and `demo` extras (jsonargparse for LightningCLI, scikit-learn for the data).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_sam import SAM, SAMMixin
from lightning_sam.demo import noisy_digits


class Classifier(pl.LightningModule):
    """A digits MLP trained with SGD."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, hidden: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"])


class SAMClassifier(SAMMixin, Classifier):
    """The same classifier trained with SAM (select it with `model.class_path`)."""

    def __init__(self, rho: float = 0.05, adaptive: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return SAM(
            self.parameters(),
            torch.optim.SGD,
            rho=hp["rho"],
            adaptive=hp["adaptive"],
            lr=hp["lr"],
            momentum=hp["momentum"],
        )


class NoisyDigits(pl.LightningDataModule):
    """scikit-learn's digits with symmetric label noise on the training split."""

    def __init__(self, noise: float = 0.4, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.train_set, self.test_set = noisy_digits(noise, seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # Full batches only: a ragged last batch has a noisier gradient, and spikes the logged curves.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)
