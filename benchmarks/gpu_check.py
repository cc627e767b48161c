#!/usr/bin/env python
"""One-call GPU check of jaxgpt (one NVIDIA GPU, < 8 minutes): numerics, training speed, memory, decode.

Everything goes through the library (`jaxgpt.models.gpt2`, `jaxgpt.train.steps.train_step` /
`lm_loss_fn`, `jaxgpt.train.optim.make_optimizer`, `jaxgpt.generation.decode.generate_tokens`) on a random
gpt2-124m (GPT-2's defaults: tied head, qkv bias; dropout 0 so the fused attention path is
taken) and prints one table (`--json` writes it too):

* bf16 vs fp32 logits: the same params run with `model.dtype=float32, attention=reference`
  and `model.dtype=bfloat16, attention=cudnn` on random tokens (`--agree-batch` x seq): max
  |logit difference| and the fraction of positions whose argmax agrees.
* training: `train_step` with AdamW (clip 1.0) at `--batch` x `--seq`, bf16, cudnn attention;
  median step time over `--steps` after `--warmup` (compilation excluded). MFU two ways:
  FLOPs per step from XLA's cost analysis of the compiled step (`compiled.cost_analysis()`;
  XLA may not count FLOPs inside cuDNN custom calls, so this can undercount attention), and
  the 6N + attention count of `jaxgpt.engine.metrics.flops_per_token`; the peak is
  `jaxgpt.engine.metrics.peak_flops_per_device()` (bf16 dense peaks by device kind: H100/H200 989e12,
  A100 312e12, L4 121e12, ...; on CPU the nominal fp32 peak; JAXGPT_PEAK_FLOPS overrides).
* peak memory: the device's `memory_stats()["peak_bytes_in_use"]` after training where the
  backend reports it, else the compiled step's memory analysis (arguments + outputs + temps
  - aliased).
* decode: `generate_tokens`, greedy, `--prompt-len` + `--new-tokens`, at batch 1 and
  `--decode-batch` (64), bf16; new tokens / median call time (compile excluded). Decode tries
  cudnn attention and falls back to xla if cudnn rejects the masked single-token query.

`--smoke`: a 2 x 64 model (GPT-2 vocabulary), seq 32, batch 2, 1 + 3 steps, decode 8 + 16 tokens
at batch 1 and 4: seconds on a CPU (mostly XLA compilation). Without a GPU (or with `--smoke` on CPU) training and
decode run fp32 with `attention=xla`, and the table says cudnn was skipped.

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --smoke --json /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


def _timed(fn, reps: int) -> list[float]:
    import jax

    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def _flops_from_cost(cost) -> float | None:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def logits_agreement(cfg, params, tokens, attention16: str) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxgpt.models import build_model

    def logits(c):
        return jax.jit(lambda p, t: build_model(c).apply({"params": p}, t))(params, tokens)

    l32 = logits(replace(cfg, dtype="float32", attention="reference"))
    l16 = logits(replace(cfg, dtype="bfloat16", attention=attention16))
    diff = jnp.abs(l32.astype(jnp.float32) - l16.astype(jnp.float32))
    top1 = jnp.mean((jnp.argmax(l32, -1) == jnp.argmax(l16, -1)).astype(jnp.float32))
    return {"logits_max_abs_diff": float(jnp.max(diff)), "logits_mean_abs_diff": float(jnp.mean(diff)),
            "logits_fp32_std": float(jnp.std(l32)), "logits_top1_agreement": float(top1)}


def train_check(cfg, params, args, peak: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.config import TrainConfig
    from jaxgpt.engine.metrics import flops_per_token
    from jaxgpt.models import build_model
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

    tx = make_optimizer(TrainConfig(batch_size=args.batch, lr=3e-4, warmup_steps=0, max_steps=10_000,
                                    grad_clip=1.0, num_devices=1))
    # A copy: the step donates its state, and the caller keeps using `params`.
    state = create_train_state(jax.tree_util.tree_map(jnp.array, params), tx)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (1, args.batch, args.seq + 1), dtype=np.int32)  # [accum, b, t+1]
    batch = jax.device_put({"inputs": toks[..., :-1], "targets": toks[..., 1:]})
    key = jax.random.key(2)
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(build_model(cfg)), tx=tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = _flops_from_cost(compiled.cost_analysis())
    mem = compiled.memory_analysis()
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        return holder["state"], metrics

    _timed(one, args.warmup)
    times = _timed(one, args.steps)
    loss = float(one()[1]["loss"])
    med = statistics.median(times)
    tokens = args.batch * args.seq
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak_mem, mem_src = float(stats["peak_bytes_in_use"]), "memory_stats peak_bytes_in_use"
    else:
        peak_mem = float(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                         - mem.alias_size_in_bytes)
        mem_src = "compiled memory_analysis (args + outputs + temps - aliased)"
    return {"train_step_s": med, "train_tokens_per_s": tokens / med, "train_compile_s": compile_s,
            "train_loss": loss, "train_flops_per_step_xla": xla_flops,
            "train_mfu_xla": xla_flops / med / peak if xla_flops else None,
            "train_flops_per_step_6n": flops_per_token(cfg, args.seq) * tokens,
            "train_mfu_6n": flops_per_token(cfg, args.seq) * tokens / med / peak,
            "peak_memory_bytes": peak_mem, "peak_memory_source": mem_src}


def decode_check(cfg, params, batch: int, args) -> tuple[float, object]:
    """(new tokens/s, the config that ran: attention falls back from cudnn to xla)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.generation.decode import generate_tokens

    prompt = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (batch, args.prompt_len)), jnp.int32)
    mask = jnp.ones(prompt.shape, bool)

    def call(c):
        return generate_tokens(params, c, prompt, mask, jax.random.key(0), max_new_tokens=args.new_tokens,
                               temperature=0.0)["tokens"]

    try:
        jax.block_until_ready(call(cfg))
    except Exception as e:  # cudnn may reject the masked q_len=1 call
        if cfg.attention != "cudnn":
            raise
        print(f"decode with cudnn attention failed ({type(e).__name__}: {str(e)[:120]}); using xla",
              file=sys.stderr)
        cfg = replace(cfg, attention="xla")
        jax.block_until_ready(call(cfg))
    med = statistics.median(_timed(lambda: call(cfg), args.decode_reps))
    return batch * args.new_tokens / med, cfg


def run(args) -> dict:
    import jax

    from jaxgpt.config import PRESETS, ModelConfig
    from jaxgpt.config.checks import validate_model
    from jaxgpt.engine.metrics import peak_flops_per_device
    from jaxgpt.models import count_params, init_params

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    notes = []
    if args.smoke:
        cfg = ModelConfig(vocab_size=50257, context_length=max(32, args.seq, args.prompt_len + args.new_tokens),
                          n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    else:
        cfg = ModelConfig(**PRESETS["gpt2-124m"], dropout=0.0)
    if on_gpu:
        cfg = replace(cfg, dtype="bfloat16", attention="cudnn")
    else:
        cfg = replace(cfg, dtype="float32", attention="xla")
        notes.append(f"no GPU ({dev.platform}): cudnn skipped; training and decode in fp32 with attention=xla; "
                     "bf16 logits with attention=reference")
    validate_model(cfg)
    peak = peak_flops_per_device()
    t_all = time.perf_counter()
    row = {"device": str(dev), "device_kind": getattr(dev, "device_kind", ""), "platform": dev.platform,
           "smoke": args.smoke, "model": f"{cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}",
           "train_dtype": cfg.dtype, "attention": cfg.attention, "batch": args.batch, "seq": args.seq,
           "peak_flops_per_device": peak}

    phases = {}
    t = time.perf_counter()
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))  # one compile, not op by op
    row["params"] = count_params(params)
    phases["init"] = time.perf_counter() - t
    t = time.perf_counter()
    row.update(train_check(cfg, params, args, peak))
    phases["train"] = time.perf_counter() - t
    rng = jax.random.key(4)
    tokens = jax.random.randint(rng, (args.agree_batch, args.seq), 0, cfg.vocab_size, dtype="int32")
    t = time.perf_counter()
    row.update(logits_agreement(cfg, params, tokens, "cudnn" if on_gpu else "reference"))
    phases["logits"] = time.perf_counter() - t
    dcfg = cfg
    for b in (1, args.decode_batch):
        t = time.perf_counter()
        tps, dcfg = decode_check(dcfg, params, b, args)
        phases[f"decode_b{b}"] = time.perf_counter() - t
        row[f"decode_b{b}_tokens_per_s"] = tps
    row["decode_attention"] = dcfg.attention + (" (cudnn failed)" if dcfg.attention != cfg.attention else "")
    row["decode_batches"] = [1, args.decode_batch]
    row["wall_s"] = time.perf_counter() - t_all
    row["phase_s"] = phases
    row["notes"] = notes
    return row


TABLE = [  # (key, label, format)
    ("logits_max_abs_diff", "bf16 vs fp32 logits: max |diff|", "{:.4f}"),
    ("logits_mean_abs_diff", "bf16 vs fp32 logits: mean |diff|", "{:.5f}"),
    ("logits_fp32_std", "fp32 logits std (scale)", "{:.4f}"),
    ("logits_top1_agreement", "bf16 vs fp32 top-1 agreement", "{:.2%}"),
    ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("train_step_s", "train step (median s)", "{:.4f}"),
    ("train_compile_s", "train step compile (s)", "{:.1f}"),
    ("train_flops_per_step_xla", "FLOPs/step (XLA cost analysis)", "{:.3e}"),
    ("train_mfu_xla", "MFU (XLA FLOPs)", "{:.1%}"),
    ("train_flops_per_step_6n", "FLOPs/step (6N + attention)", "{:.3e}"),
    ("train_mfu_6n", "MFU (6N + attention)", "{:.1%}"),
    ("peak_flops_per_device", "peak FLOP/s used for MFU", "{:.3e}"),
    ("peak_memory_bytes", "peak memory (GiB)", None),
    ("decode_b1_tokens_per_s", "decode tokens/s, batch 1", "{:,.1f}"),
]


def format_table(row: dict) -> str:
    lines = [(f"jaxgpt GPU check: {row['device_kind'] or row['platform']} ({row['device']}); model {row['model']}, "
              f"{row['params'] / 1e6:.1f}M params; train {row['train_dtype']} attention={row['attention']} "
              f"batch {row['batch']} x seq {row['seq']}"), "", "| check | value |", "|---|---|"]
    table = TABLE + [(f"decode_b{row['decode_batches'][1]}_tokens_per_s",
                      f"decode tokens/s, batch {row['decode_batches'][1]}", "{:,.1f}")]
    for key, label, fmt in table:
        v = row.get(key)
        if key == "peak_memory_bytes":
            text = f"{v / 2**30:.2f} ({row['peak_memory_source']})"
        else:
            text = "n/a" if v is None else fmt.format(v)
        lines.append(f"| {label} | {text} |")
    lines.append(f"| decode attention | {row['decode_attention']} |")
    lines.append(f"| wall time (s) | {row['wall_s']:.1f} |")
    lines += [f"note: {n}" for n in row["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU-friendly, seconds)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 16; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="training sequence length (default 1024; smoke 32)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 2; smoke 1)")
    p.add_argument("--agree-batch", type=int, default=4, help="rows for the bf16/fp32 logits check")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt (default 20; smoke 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 200; smoke 16)")
    p.add_argument("--decode-batch", type=int, default=None, help="the large decode batch (default 64; smoke 4)")
    p.add_argument("--decode-reps", type=int, default=None, help="timed decode calls per batch size (default 3; smoke 2)")
    p.add_argument("--json", help="write the table's numbers to this path")
    args = p.parse_args(argv)
    defaults = {"batch": (16, 2), "seq": (1024, 32), "steps": (20, 3), "prompt_len": (20, 8),
                "new_tokens": (200, 16), "decode_batch": (64, 4),
                "warmup": (2, 1), "decode_reps": (3, 2)}
    for k, (full, smoke) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else full)
    if args.smoke:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    row = run(args)
    print(format_table(row))
    if args.json:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(clean, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
