"""Plot what a demo run logged to W&B, read back from its offline run files.

    lightning-sam demo --out-dir demo_out          # logs offline without a W&B login
    python docs/make_wandb_figure.py demo_out docs/img/wandb_sharpness.png

Each run's records come from ``python -m wandb leet inspect --json RUN_DIR`` (W&B's own
reader), so the figure shows exactly the history rows W&B stored: the ``sharpness/*``
scalars against ``trainer/global_step``, one line per run, one colour per method, and the
``sharpness/spectrum`` line plot each run logged at the end of training (its table file).
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


COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink")


def main(demo_dir: str, out_png: str) -> None:
    runs = []
    for run_dir in sorted(Path(demo_dir, "wandb").glob("offline-run-*")):
        recs = records(run_dir)
        name = next(r["run"].get("display_name", run_dir.name) for r in recs if r["type"] == "run")
        rows = [r["history"]["item"] for r in recs if r["type"] == "history"]
        spectra = [row["sharpness/spectrum_table.path"] for row in rows if "sharpness/spectrum_table.path" in row]
        spectrum = json.loads((run_dir / "files" / spectra[-1]).read_text())["data"] if spectra else None
        runs.append((name, rows, spectrum))
    methods = list(dict.fromkeys(name.rsplit("-seed", 1)[0] for name, _, _ in runs))
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(methods)}
    keys = sorted(
        {k for _, rows, _ in runs for row in rows for k in row if k.startswith("sharpness/") and "." not in k}
        - {"sharpness/negative_fraction"}  # one point per run: the spectrum panel shows it
    )
    panels = len(keys) + any(spectrum for _, _, spectrum in runs)
    cols = 2
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(6.5 * cols, 3.2 * -(-panels // cols)))
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, rows, _ in runs:
            points = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points, strict=True)
                c = color[name.rsplit("-seed", 1)[0]]
                ax.plot(steps, values, color=c, alpha=0.75, label=name, marker="." if len(points) < 20 else None)
        ax.set(title=key, xlabel="trainer/global_step")
    if panels > len(keys):
        ax = axes.flat[len(keys)]
        for name, _, spectrum in runs:
            if spectrum:  # rows of (eigenvalue, curve name, log10 density)
                ax.plot([r[0] for r in spectrum], [r[2] for r in spectrum], color=color[name.rsplit("-seed", 1)[0]],
                        alpha=0.75, label=name)  # fmt: skip
        ax.set(title="sharpness/spectrum at the end of training", xlabel="Hessian eigenvalue", ylabel="log10 density")
        ax.set_ylim(bottom=-6)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("sharpness/* as stored in the demo's W&B runs (offline), one colour per method")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    print(f"wrote {out_png} from {len(runs)} runs")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
