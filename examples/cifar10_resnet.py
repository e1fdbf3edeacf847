"""The real recipe: ResNet-18 on CIFAR-10 with SAM (Foret et al. 2021, Table 1 setting).

SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule, rho 0.05, batch 128, label
smoothing off, bf16 on GPU, DDP over N GPUs, logged to W&B with the sharpness monitor:

    python examples/cifar10_resnet.py --devices 4 --strategy ddp --precision bf16-mixed --logger wandb

Downloads CIFAR-10 with torchvision (which is imported only on that path). ``--fake-data``
trains on random images instead, for a smoke test without torchvision or a network:

    python examples/cifar10_resnet.py --fake-data --max-steps 2 --batch-size 8 --logger csv
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAM, SAMMixin, SharpnessMonitor


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in the SAM paper's CIFAR runs."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class CIFARResNet(SAMMixin, pl.LightningModule):
    def __init__(self, rho: float = 0.05, adaptive: bool = False, lr: float = 0.1, epochs: int = 200) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = resnet18()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = SAM(
            self.parameters(),
            torch.optim.SGD,
            rho=hp["rho"],
            adaptive=hp["adaptive"],
            lr=hp["lr"],
            momentum=0.9,
            weight_decay=5e-4,
        )
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["epochs"])}


def loaders(fake: bool, batch_size: int, workers: int) -> tuple[DataLoader, DataLoader]:
    if fake:
        generator = torch.Generator().manual_seed(0)
        train = TensorDataset(
            torch.randn(4 * batch_size, 3, 32, 32, generator=generator), torch.randint(0, 10, (4 * batch_size,))
        )
        test = TensorDataset(
            torch.randn(2 * batch_size, 3, 32, 32, generator=generator), torch.randint(0, 10, (2 * batch_size,))
        )
    else:
        import torchvision
        from torchvision import transforms

        normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        augment = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        )
        train = torchvision.datasets.CIFAR10("data", train=True, download=True, transform=augment)
        test = torchvision.datasets.CIFAR10(
            "data", train=False, download=True, transform=transforms.Compose([transforms.ToTensor(), normalize])
        )
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True),
        DataLoader(test, batch_size=512, num_workers=workers),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=128, help="per device")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--adaptive", action="store_true", help="ASAM (the paper uses rho 2.0 for it)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    parser.add_argument("--logger", choices=["wandb", "csv"], default="wandb")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fake-data", action="store_true", help="random images: a smoke test without torchvision")
    parser.add_argument(
        "--measures", nargs="+", default=["first_order", "grad_norm", "hessian_max_eig", "eos_ratio"], help="monitor"
    )
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    if args.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        from lightning_sam.wandb_integration import offline_unless_logged_in

        # offline without a W&B login (wandb sync uploads the run later), as the demo does
        logger: Any = WandbLogger(project="lightning-sam-cifar10", log_model=False, mode=offline_unless_logged_in())
    else:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger("lightning_logs", name="cifar10_resnet")
    train, test = loaders(args.fake_data, args.batch_size, 0 if args.fake_data else args.workers)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        logger=logger,
        callbacks=[SharpnessMonitor(measures=args.measures, every_n_steps=1000), LearningRateMonitor("epoch")],
        log_every_n_steps=1 if args.fake_data else 50,
    )
    trainer.fit(CIFARResNet(rho=args.rho, adaptive=args.adaptive, lr=args.lr, epochs=args.epochs), train, test)


if __name__ == "__main__":
    main()
