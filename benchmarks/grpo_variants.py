#!/usr/bin/env python
"""The GRPO family on one SFT model with one budget: held-out accuracy before -> after,
reward and completion-length curves (README, "GRPO variants").

    python finetune.py instruct --task arithmetic --out runs/arith-sft
    python benchmarks/grpo_variants.py --sft runs/arith-sft --out runs/variants          # runs, then plots
    python benchmarks/grpo_variants.py --out runs/variants --plot-only --docs docs       # plots the runs made

Each variant is `finetune.py grpo --init SFT --set grpo.loss_type=V --set train.max_steps=N`
(the defaults otherwise: LoRA r16, 16 problems x 8 samples an iteration, T 0.3, process
rewards, one on-policy update an iteration), run one after another into OUT/V; a variant
whose OUT/V/metrics.json exists is not run again. `--set` items go to every run. Then
OUT/variants.md gets the table and DOCS/grpo-variants-{reward,length}.png the curves
(training reward at the rollout temperature and mean completion tokens, per logged
iteration, one line a variant).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_variant(sft: str, out: Path, variant: str, steps: int, extra: list[str]) -> None:
    if (out / variant / "metrics.json").exists():
        return
    argv = [sys.executable, str(ROOT / "finetune.py"), "grpo", "--init", sft, "--out", str(out / variant),
            "--set", f"grpo.loss_type={variant}", "--set", f"train.max_steps={steps}"]
    for item in extra:
        argv += ["--set", item]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    print(f"{variant}: {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def table(out: Path, variants: list[str]) -> str:
    rows = ["| loss_type | held-out accuracy before -> after | gain | training reward first -> last | "
            "completion tokens (last) | groups dropped / iteration | wall time |", "|---|---|---|---|---|---|---|"]
    for v in variants:
        path = out / v / "metrics.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        records = [json.loads(line) for line in (out / v / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in records if "reward" in r]
        before, after = s["eval_accuracy_before"], s["eval_accuracy_after"]
        dropped = s.get("groups_dropped_per_iteration") if s["grpo_settings"]["dynamic_sampling"] else None
        rows.append(f"| `{v}` | {before:.1%} -> {after:.1%} | {100 * (after - before):+.1f} | "
                    f"{s['reward_first']:.2f} -> {s['reward_last']:.2f} | {trained[-1]['completion_len']:.1f} | "
                    f"{'%.1f' % dropped if dropped is not None else '-'} | {s['wall_seconds'] / 60:.1f} min |")
    return "\n".join(rows)


def plot(out: Path, variants: list[str], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, name in (("reward", "training reward (T 0.3)", "reward"),
                              ("completion_len", "completion tokens (mean)", "length")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for v in variants:
            path = out / v / "metrics.jsonl"
            if not path.exists():
                continue
            pts = [(r["iteration"], r[key]) for r in map(json.loads, path.read_text().splitlines()) if key in r]
            ax.plot(*zip(*pts), label=v)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / f"grpo-variants-{name}.png", dpi=80)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", help="the SFT run every variant starts from")
    parser.add_argument("--out", required=True, help="directory of the variants' runs")
    parser.add_argument("--variants", nargs="+", default=["grpo", "dr_grpo", "dapo", "gspo", "cispo"])
    parser.add_argument("--steps", type=int, default=60, help="iterations of every run (default: 60)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="a config override for every run")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the PNGs go")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.plot_only:
        if not args.sft:
            parser.error("--sft is needed to run the variants")
        out.mkdir(parents=True, exist_ok=True)
        for v in args.variants:
            run_variant(args.sft, out, v, args.steps, args.extra)
    text = table(out, args.variants)
    (out / "variants.md").write_text(text + "\n")
    print(text)
    plot(out, args.variants, Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
