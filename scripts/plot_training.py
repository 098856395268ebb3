"""Plot a training run: loss, top-1 agreement and evaluated τ against training tokens.

  python scripts/plot_training.py RUN/train_log.jsonl --out curve.png [--label NAME ...]

Several logs can be given to compare runs (e.g. the ablations) on one figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_log(path: Path) -> list[dict]:
    """The records of the last run in the log (a new run restarts its step count)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(records) if i and r["step"] < records[i - 1]["step"]]
    return records[starts[-1]:] if starts else records


def smooth(values: list[float], window: int = 10) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--label", nargs="*", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Draft training")
    args = parser.parse_args(argv)
    labels = args.label or [path.parent.name for path in args.logs]

    figure, (loss_axis, top1_axis, tau_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for path, label in zip(args.logs, labels, strict=True):
        records = read_log(path)
        steps = [r for r in records if "loss" in r]
        tokens = np.array([r["tokens"] for r in steps]) / 1e6
        for axis, key in ((loss_axis, "loss"), (top1_axis, "top1")):
            values = smooth([r[key] for r in steps])
            axis.plot(tokens[len(tokens) - len(values):], values, label=label)
        evaluated = [r for r in records if "eval" in r]
        for name in sorted({k for r in evaluated for k in r["eval"]}):
            points = [(r["tokens"] / 1e6, r["eval"][name]["tau"]) for r in evaluated
                      if name in r["eval"]]
            tau_axis.plot(*zip(*points, strict=True), marker="o", label=f"{label}: {name}")
    loss_axis.set(title="training loss (smoothed)", xlabel="trained tokens seen (M)")
    top1_axis.set(title="top-1 agreement on training batches", xlabel="trained tokens seen (M)")
    tau_axis.set(title="τ (mean accepted length), replay on evaluation prompts",
                 xlabel="trained tokens seen (M)", ylabel="τ")
    for axis in (loss_axis, top1_axis, tau_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
