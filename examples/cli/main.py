"""LightningCLI entry point: `python examples/cli/main.py fit --config examples/cli/config.yaml`.

Needs the `cli` extra (LightningCLI's jsonargparse): `pip install ".[cli]"` in the lightning_sam clone.
The YAML selects the SAM module and the sharpness monitor; any option can be overridden on
the command line, e.g. `--model.rho 0.1` or `--model.class_path model.Classifier` for SGD.
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    if importlib.util.find_spec("jsonargparse") is None:
        sys.exit(
            "examples/cli/main.py: error: LightningCLI needs jsonargparse: "
            'pip install ".[cli]" in your lightning_sam clone'
        )
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True)


if __name__ == "__main__":
    main()
