"""The 15-line Lightning usage: SAMMixin + SAM + SharpnessMonitor (python examples/minimal.py)."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sam import SAM, SAMMixin, SharpnessMonitor


class Model(SAMMixin, pl.LightningModule):  # 1. the mixin first
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def training_step(self, batch, batch_idx):  # unchanged: return the loss
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # 2. SAM around the base optimizer
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


if __name__ == "__main__":
    data = torch.utils.data.TensorDataset(torch.randn(512, 20), torch.randint(0, 2, (512,)))
    monitor = SharpnessMonitor()  # 3. watch the sharpness
    trainer = pl.Trainer(max_epochs=3, logger=CSVLogger("lightning_logs"), callbacks=[monitor])
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    print(monitor.last_values)
