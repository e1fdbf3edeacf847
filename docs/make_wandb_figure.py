"""Plot what a demo run logged to W&B, read back from its offline run files.

    lightning-sam demo --out-dir demo_out          # logs offline without a W&B login
    python docs/make_wandb_figure.py demo_out docs/img/wandb_sharpness.png

Each run's records come from ``python -m wandb leet inspect --json RUN_DIR`` (W&B's own
reader), so the figure shows exactly the history rows W&B stored: the ``sharpness/*``
scalars against ``trainer/global_step``, one line per run, SGD in blue and SAM in red.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def records(run_dir: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(demo_dir: str, out_png: str) -> None:
    runs = []
    for run_dir in sorted(Path(demo_dir, "wandb").glob("offline-run-*")):
        recs = records(run_dir)
        name = next(r["run"].get("display_name", run_dir.name) for r in recs if r["type"] == "run")
        rows = [r["history"]["item"] for r in recs if r["type"] == "history"]
        runs.append((name, rows))
    keys = sorted({k for _, rows in runs for row in rows for k in row if k.startswith("sharpness/") and "." not in k})
    cols = 2
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(6.5 * cols, 3.2 * -(-len(keys) // cols)))
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, rows in runs:
            points = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points, strict=True)
                color = "tab:red" if name.startswith("sam") else "tab:blue"
                ax.plot(steps, values, color=color, alpha=0.75, label=name, marker="." if len(points) < 20 else None)
        ax.set(title=key, xlabel="trainer/global_step")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("sharpness/* as stored in the demo's W&B runs (offline), SGD blue, SAM red")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    print(f"wrote {out_png} from {len(runs)} runs")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
