"""LightningCLI entry point: `python examples/cli/main.py fit --config examples/cli/config.yaml`.

The YAML selects the SAM module and the sharpness monitor; any option can be overridden on
the command line, e.g. `--model.rho 0.1` or `--model.class_path model.Classifier` for SGD.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True)


if __name__ == "__main__":
    main()
