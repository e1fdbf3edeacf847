"""The demo's fit time against torch's thread count, on an idle machine and with cores kept busy.

    python benchmarks/bench_threads.py --threads 1 2 --busy 0 1 --repeats 3

Each cell runs ``lightning-sam demo --methods sgd sam --seeds 0 --logger none --threads N``
in a fresh process while ``--busy`` other processes spin (``while True: pass``), and reads the
runs' ``trainer.fit`` seconds from its ``results.csv``. Cells are interleaved (every thread count
once per repeat) so that a slow spell of a shared machine hits them all; the table gives the
median over repeats of each method's seconds, and each count's ratio to one thread's under the
same load. It also checks that the thread count leaves the accuracies as they are (it may not:
a different count sums in a different order).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def demo(threads: int, epochs: int, out: Path) -> dict[str, tuple[float, float]]:
    """``{method: (seconds, test_acc)}`` of one demo run with ``threads`` threads."""
    command = [sys.executable, "-m", "lightning_sam", "demo", "--methods", "sgd", "sam", "--seeds", "0"]
    command += ["--epochs", str(epochs), "--logger", "none", "--threads", str(threads), "--out-dir", str(out)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    with (out / "results.csv").open() as f:
        return {row["method"]: (float(row["seconds"]), float(row["test_acc"])) for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning processes beside the demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
    print("| busy processes | threads | SGD s/run | SAM s/run | ratio to 1 thread (SAM) | SAM test acc |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                cells: dict[int, list[dict[str, tuple[float, float]]]] = {t: [] for t in args.threads}
                for _ in range(args.repeats):
                    for t in args.threads:
                        cells[t].append(demo(t, args.epochs, Path(tmp) / f"t{t}"))
            finally:
                for spinner in spinners:
                    spinner.kill()
            median = {
                t: {m: statistics.median(r[m][0] for r in runs) for m in ("sgd", "sam")} for t, runs in cells.items()
            }
            base = median[min(args.threads)]["sam"]
            for t in args.threads:
                accs = sorted({r["sam"][1] for r in cells[t]})
                print(f"| {busy} | {t} | {median[t]['sgd']:.2f} | {median[t]['sam']:.2f} | "
                      f"{median[t]['sam'] / base:.2f} | {', '.join(f'{a:.4f}' for a in accs)} |")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
