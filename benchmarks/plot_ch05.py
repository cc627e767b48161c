#!/usr/bin/env python
"""The README's ch05 plot: jaxgpt's `configs/book/ch05.yaml` runs beside the book's own
PyTorch run (`benchmarks/parity_124m.py --mode book-ch05 --json ...`) and the book's
printed table (train 9.817 -> 0.569, val 9.924 -> 6.373 at step 0 and step 85).

    python benchmarks/plot_ch05.py --book book.json --run "jaxgpt, init torch-default=runs/ch05" \
        --run "jaxgpt, init gpt2=runs/ch05-gpt2" [--book "book code, init gpt2=book-gpt2.json"] \
        --out docs/ch05_loss.png

x is optimiser updates done (the book's `global_step` + 1). Train losses are the eval-mode
ones (`train_eval_loss`, dropout off) on both sides; the book's are over 5 shuffled train
batches, jaxgpt's over its first 5 train batches.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BOOK_TABLE = {"updates": [1, 86], "train": [9.817, 0.569], "val": [9.924, 6.373]}


def labelled(spec: str, default: str) -> tuple[str, str]:
    label, sep, path = spec.rpartition("=")
    return (label, path) if sep else (default, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--book", action="append", default=[], help="[LABEL=]JSON from parity_124m.py --mode book-ch05")
    p.add_argument("--run", action="append", default=[], help="[LABEL=]jaxgpt run directory (metrics.jsonl)")
    p.add_argument("--out", default="docs/ch05_loss.png")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    colors = iter(["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"])
    for spec in args.book:
        label, path = labelled(spec, "book's code (torch), this machine")
        b = json.loads(Path(path).read_text())
        c = next(colors)
        ax_train.plot(b["updates_done"], b["train_loss"], color=c, marker="o", ms=2.5, lw=1.2, label=label)
        ax_val.plot(b["updates_done"], b["val_loss"], color=c, marker="o", ms=2.5, lw=1.2, label=label)
    for spec in args.run:
        label, path = labelled(spec, "jaxgpt")
        records = [json.loads(l) for l in (Path(path) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        ev = [r for r in records if "train_eval_loss" in r]
        c = next(colors)
        ax_train.plot([r["step"] for r in ev], [r["train_eval_loss"] for r in ev], color=c, ls="--",
                      marker="s", ms=2.5, lw=1.2, label=label)
        ax_val.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], color=c, ls="--",
                    marker="s", ms=2.5, lw=1.2, label=label)
    for ax, key in ((ax_train, "train"), (ax_val, "val")):
        ax.scatter(BOOK_TABLE["updates"], BOOK_TABLE[key], marker="*", s=90, color="k", zorder=5,
                   label="the book's printed table")
        ax.set_xlabel("optimiser updates (batch 2 x 256 tokens)")
        ax.grid(alpha=0.3)
    ax_train.set_title("train loss (eval mode, dropout off)", fontsize=10)
    ax_val.set_title("val loss", fontsize=10)
    ax_train.set_ylabel("cross-entropy")
    ax_val.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
