#!/usr/bin/env python
"""Training throughput: jaxgpt vs the PyTorch references (`llms-from-scratch`'s GPTModel).

Both sides do the same work per step on the same shapes: forward, mean token
cross-entropy, backward, global-norm gradient clipping at 1.0, AdamW (weight decay 0.1 on
matrices, betas 0.9/0.95). Dropout is 0.0 on both sides. The head-to-head jaxgpt model is
configured like the book's model: untied LM head (`model.tie_embeddings=false`) and no qkv
bias (`model.qkv_bias=false`); its parameter count is checked equal to the torch model's.

Method: `--warmup` steps are run and discarded (XLA compilation; torch's first iterations),
then `--steps` steps are timed one by one, each synchronised (`jax.block_until_ready`; torch
on CPU is synchronous, on CUDA `torch.cuda.synchronize()`). The reported step time is the
median. With `--rounds R` the timed steps are split into R blocks per framework, run
alternately (jaxgpt block, torch block, ...), each block after one extra untimed step, so
slow drifts in machine load hit both frameworks alike.

PyTorch references (`benchmarks/torch_refs.py`): `torch` (the book's `GPTModel`, eager),
`torch-sdpa` (`GPTModelFast`: scaled_dot_product_attention, same parameter count) and
`torch-compile` (`torch.compile(GPTModel)`; compilation falls in the warm-up steps). The
`x torch` column is each row's tokens/s over the eager `torch` row's.

MFU uses `jaxgpt.engine.metrics.flops_per_token` (6N + attention, N including the LM head) for every
framework, against two ceilings: "MFU (nominal)", `jaxgpt.engine.metrics.peak_flops_per_device()`
(on CPU: cores x 2.5 GHz x 32 or 64 fp32 FLOP/cycle unless JAXGPT_PEAK_FLOPS is set), and
"MFU (measured)", the measured ceiling: the larger of a jitted JAX and a torch fp32
2048 x 2048 @ 2048 x 2048 matmul rate (median of 7), measured in the same run before the
cases and again after them, the fastest of the readings (`--matmul-n`; 0 skips it); fp32
rows only (no bf16 matmul is measured).

Threads: torch gets `torch.set_num_threads(n)` with n = the usable cores (os.cpu_count()
unless the process is pinned with taskset); XLA:CPU uses every usable core by default and no
XLA flag is changed here (set XLA_FLAGS yourself to experiment).

jaxgpt's step is the library's: the LM head fused into the cross-entropy over 1024-token
chunks (`jaxgpt.train.losses.head_cross_entropy`). `--frameworks jax,jax-unfused-head,...` adds a
row with the head run as one slice over all tokens (the logits materialised), to compare.

    python benchmarks/train_throughput.py --configs small,124m --steps 20 --warmup 3 \
        --json bench.json

On a GPU (`jax.devices()[0].platform == 'gpu'`, `--device-kind auto|gpu`) the 124m config is
also run in bf16 (`model.dtype=bfloat16`, `model.attention=cudnn`; torch under bf16 autocast
on CUDA when torch has CUDA). On CPU those rows are skipped with a message, unless
`--cpu-bf16`: then the 124m config also runs with `model.dtype=bfloat16` (the CPU's attention
kernel) against torch under `torch.autocast("cpu", torch.bfloat16)` (oneDNN, which uses
AVX512-BF16 / AMX where the CPU has them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (YAML file or None, overrides, batch, seq)
CONFIGS = {
    "tiny": (None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.context_length=32"], 2, 32),
    "small": (REPO / "configs" / "default.yaml", [], 16, 128),
    "124m": (None, ["model.preset=gpt2-124m"], 4, 256),
}
# The book's GPTModel: untied head, no qkv bias; dropout off on both sides.
HEAD_TO_HEAD = ["model.tie_embeddings=false", "model.qkv_bias=false", "model.dropout=0.0"]
LR = 3e-4
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)


@dataclass
class Case:
    config: str
    precision: str  # fp32 | bf16
    batch: int
    seq: int
    model_cfg: object = None  # jaxgpt ModelConfig
    results: dict = field(default_factory=dict)  # framework -> dict


# ---------------------------------------------------------------------------------------
# machine


def _cores() -> int:
    """Cores this process may run on (= os.cpu_count() unless pinned with taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(jax, torch) -> dict:
    dev = jax.devices()[0]
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": _cores(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "jax_platform": dev.platform,
        "jax_device_kind": getattr(dev, "device_kind", ""),
        "jax_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge pages: jaxgpt.cli.hostmem
    }
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------
# jaxgpt side


class JaxRunner:
    def __init__(self, case: Case, seed: int = 0, head_chunk: int = 0):
        """head_chunk: tokens per LM-head slice (0: the library default)."""
        import jax
        import numpy as np

        from jaxgpt.config import TrainConfig
        from jaxgpt.models import build_model, count_params, init_params
        from jaxgpt.train.optim import make_optimizer
        from jaxgpt.parallel import DataParallel
        from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

        self.jax = jax
        cfg = case.model_cfg
        train_cfg = TrainConfig(batch_size=case.batch, grad_accum_steps=1, lr=LR, warmup_steps=0,
                                max_steps=10_000, weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1],
                                grad_clip=GRAD_CLIP, num_devices=1)
        tx = make_optimizer(train_cfg)
        params = init_params(cfg, jax.random.key(seed))
        self.n_params = count_params(params)
        self.dp = DataParallel(1)
        loss_fn = lm_loss_fn(build_model(cfg), chunk_size=head_chunk) if head_chunk else lm_loss_fn(build_model(cfg))
        self.step_fn = self.dp.compile_train_step(train_step, loss_fn=loss_fn, tx=tx)
        self.state = self.dp.replicate(create_train_state(params, tx))
        del params
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, cfg.vocab_size, (case.batch, case.seq + 1), dtype=np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        self.batch = jax.device_put(self.dp.shard_train(batch, 1))
        self.key = jax.random.key(seed + 1)
        self.last_loss = None

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch, self.key)
        self.jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        self.last_loss = metrics["loss"]
        return dt

    def loss(self) -> float:
        return float(self.last_loss)


def jax_matmul_flops(n: int = 2048, reps: int = 7) -> float:
    """Measured fp32 FLOP/s of a jitted `n x n @ n x n` matmul: 2 n^3 / median time."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    jax.block_until_ready(mm(a, b))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def measure_matmuls(n: int, torch, torch_device: str, when: str) -> dict[str, float]:
    """fp32 FLOP/s of an `n^2` matmul, JAX's and (when torch is there) torch's."""
    rates = {"jax": jax_matmul_flops(n)}
    if torch is not None:
        from torch_refs import torch_matmul_flops

        rates["torch"] = torch_matmul_flops(n, device=torch_device)
    print(f"measured fp32 matmul {when}: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
          + f" GFLOP/s (n={n})", file=sys.stderr)
    return rates


# ---------------------------------------------------------------------------------------


def summarise(times: list[float], case: Case, peak: float, ceiling: float | None) -> dict:
    from jaxgpt.engine.metrics import flops_per_token

    med = statistics.median(times)
    tokens = case.batch * case.seq
    tps = tokens / med
    fpt = flops_per_token(case.model_cfg, case.seq)
    return {
        "median_step_s": med,
        "min_step_s": min(times),
        "mean_step_s": statistics.fmean(times),
        "timed_steps": len(times),
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak,
        "mfu_measured": tps * fpt / ceiling if ceiling and case.precision == "fp32" else None,
    }


def run_case(case: Case, frameworks: list[str], args, torch_device: str, peak: float,
             ceiling: float | None) -> None:
    runners = {}
    if "jax" in frameworks:
        runners["jaxgpt"] = JaxRunner(case, args.seed)
    if "jax-unfused-head" in frameworks:
        runners["jaxgpt-unfused-head"] = JaxRunner(case, args.seed, head_chunk=case.batch * case.seq)
    for fw in [f for f in frameworks if f.startswith("torch")]:
        from torch_refs import TorchRunner

        runners[fw] = TorchRunner(case, torch_device, args.seed, args.torch_adamw, variant=fw, lr=LR,
                                  weight_decay=WEIGHT_DECAY, betas=BETAS, grad_clip=GRAD_CLIP)
    counts = {k: r.n_params for k, r in runners.items()}
    if len(set(counts.values())) > 1:
        print(f"  WARNING: parameter counts differ: {counts}", file=sys.stderr)
    print(f"[{case.config} {case.precision}] params: {counts}", file=sys.stderr)

    times: dict[str, list[float]] = {k: [] for k in runners}
    for name, r in runners.items():
        t0 = time.perf_counter()
        warm = [r.step() for _ in range(args.warmup)]
        print(f"  {name}: warm-up {args.warmup} steps {time.perf_counter() - t0:.1f}s "
              f"(first {warm[0]:.2f}s, last {warm[-1]:.3f}s), loss {r.loss():.3f}" if warm else
              f"  {name}: no warm-up", file=sys.stderr)
    rounds = max(1, min(args.rounds, args.steps))
    per_round = [args.steps // rounds + (i < args.steps % rounds) for i in range(rounds)]
    for i, n in enumerate(per_round):
        for name, r in runners.items():
            if i > 0:
                r.step()  # re-warm caches after the other framework's block
            times[name].extend(r.step() for _ in range(n))
            print(f"  {name}: round {i + 1}/{rounds}: median {statistics.median(times[name][-n:]):.4f}s "
                  f"over {n} steps, loss {r.loss():.3f}", file=sys.stderr)
    for name, r in runners.items():
        case.results[name] = {**summarise(times[name], case, peak, ceiling), "params": r.n_params,
                              "final_loss": r.loss(), "step_times_s": times[name]}
    del runners


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="small,124m", help="comma list of: " + ",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework and config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate the frameworks in this many blocks of timed steps")
    p.add_argument("--frameworks", default="jax,torch",
                   help="comma list of: jax, torch, torch-sdpa, torch-compile, jax-unfused-head (jaxgpt "
                   "with the LM head as one slice over all tokens; an extra row)")
    p.add_argument("--matmul-n", type=int, default=2048,
                   help="size of the fp32 matmul measured as the MFU ceiling (0: skip)")
    p.add_argument("--device-kind", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: whatever jax.devices()[0] is; gpu adds the 124m bf16 rows")
    p.add_argument("--no-bf16", action="store_true", help="skip the GPU bf16 rows")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on CPU, add 124m bf16 rows (model.dtype=bfloat16 vs torch CPU autocast)")
    p.add_argument("--torch-adamw", default="default", choices=["default", "foreach", "fused"],
                   help="torch.optim.AdamW implementation (default: torch's choice, a per-tensor "
                   "loop on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results to this path")
    args = p.parse_args(argv)

    if args.device_kind == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    torch = None
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_refs
    known = {"jax", "jax-unfused-head", "torch", "torch-sdpa", "torch-compile"}
    if set(frameworks) - known:
        p.error(f"unknown frameworks {sorted(set(frameworks) - known)}; choose from {', '.join(sorted(known))}")
    if any(f.startswith("torch") for f in frameworks):
        import torch

        torch.set_num_threads(_cores())
        try:
            import llms_from_scratch.ch04  # noqa: F401
        except ImportError:
            print("the PyTorch reference needs: pip install --no-deps llms-from-scratch", file=sys.stderr)
            return 2

    from jaxgpt.config import load_config
    from jaxgpt.engine.metrics import peak_flops_per_device

    platform_ = jax.devices()[0].platform
    on_gpu = platform_ == "gpu"
    if args.device_kind == "gpu" and not on_gpu:
        print(f"--device-kind gpu but jax's first device is {platform_}; no GPU here", file=sys.stderr)
        return 2
    torch_device = "cpu"
    if torch is not None and on_gpu:
        if torch.cuda.is_available():
            torch_device = "cuda"
        else:
            print("note: this torch build has no CUDA; the torch reference runs on CPU", file=sys.stderr)

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")

    cases: list[Case] = []
    for n in names:
        path, overrides, batch, seq = CONFIGS[n]
        cfg = load_config(path, [*overrides, *HEAD_TO_HEAD]).model
        cases.append(Case(n, "fp32", batch, seq, cfg))
        if n == "124m" and not args.no_bf16:
            if on_gpu or args.cpu_bf16:
                attention = "model.attention=cudnn" if on_gpu else "model.attention=auto"
                cfg16 = load_config(path, [*overrides, *HEAD_TO_HEAD, "model.dtype=bfloat16", attention]).model
                cases.append(Case(n, "bf16", batch, seq, cfg16))
            else:
                print("skipping 124m bf16 (cudnn attention): no GPU", file=sys.stderr)

    peak = peak_flops_per_device()
    info = machine_info(jax, torch)
    info["peak_flops_per_device"] = peak
    ceiling = None
    if args.matmul_n:
        rates = measure_matmuls(args.matmul_n, torch, torch_device, "before the steps")
        ceiling = max(rates.values())
        info["matmul_fp32_flops"] = {"n": args.matmul_n, **rates}
    info["torch_device"] = torch_device if torch is not None else None
    print(f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} ({platform_}, "
          f"{info['jax_device_kind']}); torch {info['torch']} ({info['torch_threads']} threads, "
          f"{torch_device}); peak used for MFU: {peak / 1e9:.1f} GFLOP/s per device", file=sys.stderr)

    for case in cases:
        case_fw = frameworks
        if case.precision == "bf16" and torch_device == "cpu" and not args.cpu_bf16:
            case_fw = [f for f in frameworks if not f.startswith("torch")]  # no CPU bf16 reference
        run_case(case, case_fw, args, torch_device, peak, ceiling)
    if args.matmul_n:
        # Once more after the steps: a single reading can catch the host slow, and a
        # ceiling below what the model's own step reaches reads as MFU >= 100%.
        after = measure_matmuls(args.matmul_n, torch, torch_device, "after the steps")
        info["matmul_fp32_flops_after"] = {"n": args.matmul_n, **after}
        ceiling = max(ceiling, *after.values())
        for case in cases:
            for r in case.results.values():
                if r["mfu_measured"] is not None:  # fp32 rows
                    r["mfu_measured"] = r["tokens_per_s"] * r["flops_per_token"] / ceiling
        print(f"measured ceiling (the fastest of both readings): {ceiling / 1e9:.1f} GFLOP/s", file=sys.stderr)
    info["measured_ceiling_flops"] = ceiling

    # ---- report
    from torch_refs import TORCH_VARIANTS

    try:
        info["load_avg_at_end"] = os.getloadavg()
    except OSError:
        pass
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} ({platform_}); "
        f"torch {info['torch']} ({info['torch_threads']} threads, {torch_device}); "
        f"MFU (nominal) peak {peak / 1e9:.1f} GFLOP/s per device; MFU (measured) ceiling "
        + (f"{ceiling / 1e9:.1f} GFLOP/s (the fastest JAX/torch fp32 {args.matmul_n}^2 matmul, before and after the steps)" if ceiling else "not measured")
        + f"; GLIBC_TUNABLES={info['glibc_tunables'] or '(unset: 4 KiB pages)'}"
        + (f"; load avg at start {tuple(round(x, 2) for x in info['load_avg_at_start'])}"
           if "load_avg_at_start" in info else ""),
        "",
        ("| config | precision | batch x seq | framework | median step (s) | min step (s) | tokens/s (median) "
         "| MFU (nominal) | MFU (measured) | x torch |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for c in cases:
        th = c.results.get("torch")
        for fw, r in c.results.items():
            ratio = r["tokens_per_s"] / th["tokens_per_s"] if th and fw != "torch" else None
            mfu_m = f"{100 * r['mfu_measured']:.1f}%" if r["mfu_measured"] is not None else ""
            lines.append(
                f"| {c.config} | {c.precision} | {c.batch} x {c.seq} | "
                f"{f'{fw} ({TORCH_VARIANTS[fw]})' if fw in TORCH_VARIANTS else fw} | "
                f"{r['median_step_s']:.4f} | {r['min_step_s']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                f"{mfu_m} | {(f'{ratio:.2f}x' if ratio is not None else '')} |"
            )
            rows.append({
                "config": c.config, "precision": c.precision, "batch": c.batch, "seq": c.seq,
                "framework": fw,
                "model": {k: getattr(c.model_cfg, k) for k in (
                    "vocab_size", "context_length", "n_layer", "n_head", "n_embd", "dropout",
                    "qkv_bias", "tie_embeddings", "dtype", "attention")},
                **r, "jax_over_torch": ratio,  # this row's tokens/s over the eager torch row's
            })
    print("\n".join(lines))
    if args.json:
        out = {"machine": info, "method": {
            "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
            "statistic": "median step time", "optimizer": "AdamW lr 3e-4 betas (0.9, 0.95) "
            "weight_decay 0.1 on matrices, global-norm clip 1.0", "dropout": 0.0,
            "torch_adamw": args.torch_adamw,
            "argv": sys.argv}, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from jaxgpt.cli.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # as train.py does (JAXGPT_HUGE_PAGES=0: 4 KiB pages)
    sys.exit(main())
