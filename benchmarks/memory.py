#!/usr/bin/env python
"""Peak training memory from XLA's compiled memory analysis (no arrays are allocated).

    python benchmarks/memory.py                       # gpt2-124m, seq 1024, batch 8, remat off/on
    python benchmarks/memory.py --attention reference,blockwise --head-chunk 0,1024
                                                      # + each attention kind x LM-head chunking
    python benchmarks/memory.py --budget-gib 16       # + the largest batch that fits 16 GiB
    python benchmarks/memory.py --set model.dtype=bfloat16 --json out.json
    python benchmarks/memory.py --layouts --preset gpt2-774m --preset gpt2-1558m   # per device, 8 devices:
                                                      # pmap replicas vs mesh fsdp=8 (remat off/on)
    python benchmarks/memory.py --finetune --preset qwen3-8b --preset llama-3.1-8b --seq 2048 --batch 8 \
        --set model.param_dtype=bfloat16 --set model.remat=true   # per device on fsdp=8: LoRA and full
    python benchmarks/memory.py --generate 16 --preset gemma-3-270m --preset gemma-3-1b --seq 8192 --batch 4
                                                      # generation: a 16-token prompt, then seq - 16 tokens

With `--layouts` the global batch is split over 8 devices (8 fake CPU devices when no
accelerator has them): a replica holds the whole state and its batch / 8 rows (pmap's
per-device program); `fsdp=8` shards params, gradients and AdamW moments 8 ways
(`jaxgpt.parallel.mesh`). Numbers are per device.

The train step is lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct`), and
`compiled.memory_analysis()` gives argument, output, temporary and aliased bytes; the peak
is arguments + outputs + temporaries - aliased (the donated state is reused for the output).
Numbers are for the backend this runs on (XLA's CPU and GPU schedulers differ).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if ("--layouts" in sys.argv or "--finetune" in sys.argv) and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxgpt.config import load_config  # noqa: E402
from jaxgpt.train.losses import HEAD_CHUNK_TOKENS  # noqa: E402
from jaxgpt.models import build_model, init_params  # noqa: E402
from jaxgpt.train.optim import make_optimizer  # noqa: E402
from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step  # noqa: E402

GIB = 1024**3


def peak_bytes(model_cfg, train_cfg, batch: int, seq: int, mesh=None, head_chunk: int = HEAD_CHUNK_TOKENS,
               lora=None) -> dict:
    """Per device. mesh: a `MeshParallel` (batch = the global batch), else one device.
    head_chunk: tokens per slice of the fused LM head + loss; 0 = the whole batch in one
    slice (the `[tokens, vocab]` logits materialised, as an unfused head would). lora: a
    `LoRAConfig`: train only the adapters (`--train-mode lora`: the base frozen, no moments)."""
    from jaxgpt.engine.params import train_labels

    attrs = {"lora": lora} if lora is not None else {}
    abstract = jax.eval_shape(lambda k: init_params(model_cfg, k, **attrs), jax.random.key(0))
    labels = train_labels(abstract, "lora", model_cfg) if lora is not None else None
    tx = make_optimizer(train_cfg, labels)
    state = jax.eval_shape(lambda k: create_train_state(init_params(model_cfg, k, **attrs), tx), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)  # [accum, batch, seq]
    loss_fn = lm_loss_fn(build_model(model_cfg, **attrs), chunk_size=head_chunk or batch * seq)
    if mesh is None:
        step = jax.jit(lambda s, b, k: train_step(s, b, k, loss_fn=loss_fn, tx=tx, labels=labels), donate_argnums=0)
    else:
        from jax.sharding import PartitionSpec

        state = mesh.restore_target(state)  # abstract, with the mesh's shardings
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=mesh.sharding(PartitionSpec(None, ("data", "fsdp"))))
        step = mesh.compile_train_step(train_step, state=state, loss_fn=loss_fn, tx=tx, labels=labels)
    t0 = time.perf_counter()
    compiled = step.lower(state, {"inputs": tokens, "targets": tokens}, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    out["compile_s"] = time.perf_counter() - t0
    return out


def largest_batch(model_cfg, train_cfg, seq: int, budget: float, hi: int = 1024) -> int:
    """Binary search on the batch size (each probe is one compile)."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if peak_bytes(model_cfg, train_cfg, mid, seq)["peak_bytes"] <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def layouts(presets, seq: int, batch: int, overrides, budget_gib: float) -> list[dict]:
    """Per-device peak of pmap replicas vs mesh fsdp=8, remat off/on, for each preset."""
    from jaxgpt.parallel import MeshParallel

    print(f"| preset | layout | remat | peak GiB / device | params + opt state GiB / device | fits {budget_gib:g} GiB |")
    print("|---|---|---|---|---|---|")
    rows = []
    for preset in presets:
        cfg = load_config(None, [f"model.preset={preset}", "model.dropout=0.0", *overrides])
        mesh = MeshParallel(1, 8, 1, devices=tuple(jax.devices()[:8]), model=cfg.model)
        for name, layout, rows_per in (("pmap replicas", None, batch // 8), ("mesh fsdp=8", mesh, batch)):
            for remat in (False, True):
                r = peak_bytes(dataclasses.replace(cfg.model, remat=remat), cfg.train, rows_per, seq, layout)
                r.update(preset=preset, layout=name, remat=remat, fits=r["peak_bytes"] <= budget_gib * GIB)
                rows.append(r)
                print(f"| {preset} | {name} | {remat} | {r['peak_bytes'] / GIB:.2f} | {r['argument_bytes'] / GIB:.2f} | "
                      f"{'yes' if r['fits'] else 'no'} |", flush=True)
    return rows


def finetune(presets, seq: int, batch: int, overrides) -> list[dict]:
    """Per-device peak of LoRA and full fine-tuning on a mesh of fsdp=8 (model settings, such
    as bfloat16 weights and remat, from `--set`), and whether it fits 16 and 80 GiB."""
    from jaxgpt.models.lora import LoRAConfig
    from jaxgpt.parallel import MeshParallel

    print("| preset | train mode | param dtype | remat | peak GiB / device | params + opt GiB / device | "
          "fits 16 GiB | fits 80 GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in presets:
        cfg = load_config(None, [f"model.preset={preset}", "model.dropout=0.0", "model.attention=blockwise", *overrides])
        mesh = MeshParallel(1, 8, 1, devices=tuple(jax.devices()[:8]), model=cfg.model)
        for mode, lora in (("lora", LoRAConfig(rank=16)), ("full", None)):
            r = peak_bytes(cfg.model, cfg.train, batch, seq, mesh, lora=lora)
            r.update(preset=preset, mode=mode, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                     fits_16=r["peak_bytes"] <= 16 * GIB, fits_80=r["peak_bytes"] <= 80 * GIB)
            rows.append(r)
            print(f"| {preset} | {mode} | {cfg.model.param_dtype} | {cfg.model.remat} | {r['peak_bytes'] / GIB:.2f} | "
                  f"{r['argument_bytes'] / GIB:.2f} | {'yes' if r['fits_16'] else 'no'} | "
                  f"{'yes' if r['fits_80'] else 'no'} | {r['compile_s']:.0f} |", flush=True)
    return rows


def generate(presets, seq: int, batch: int, prompt: int, overrides) -> list[dict]:
    """`generate_tokens`' jitted loop (prefill, then a `lax.while_loop` of decode steps) for
    `batch` rows of `prompt` tokens and `seq - prompt` new ones: its KV cache and peak."""
    from jaxgpt.generation.decode import _generate_jit
    from jaxgpt.models import init_cache, param_shapes

    print("| preset | rows x (prompt + new) | KV cache GiB | temporaries GiB | peak GiB | compile s |")
    print("|---|---|---|---|---|---|")
    rows = []
    for preset in presets:
        cfg = load_config(None, [f"model.preset={preset}", "model.dropout=0.0", f"model.context_length={seq}",
                                 *overrides])
        cache = jax.eval_shape(lambda: init_cache(cfg.model, batch, seq))  # noqa: B023
        tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
        t0 = time.perf_counter()
        lowered = _generate_jit.lower(param_shapes(cfg.model), tokens, jax.ShapeDtypeStruct((batch, prompt), bool),
                                      jax.random.key(0), 0.0, 1.0, config=cfg.model, max_new_tokens=seq - prompt,
                                      greedy=True, top_k=None, use_top_p=False, eos_id=None, pad_id=0, vocab_limit=None)
        mem = lowered.compile().memory_analysis()
        r = {"preset": preset, "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache)),
             "temp_bytes": mem.temp_size_in_bytes, "compile_s": time.perf_counter() - t0,
             "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes}
        rows.append(r)
        print(f"| {preset} | {batch} x ({prompt} + {seq - prompt}) | {r['cache_bytes'] / GIB:.3f} | "
              f"{r['temp_bytes'] / GIB:.2f} | {r['peak_bytes'] / GIB:.2f} | {r['compile_s']:.0f} |", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", help="model preset (repeatable with --layouts; default gpt2-124m)")
    p.add_argument("--layouts", action="store_true", help="per device on 8 devices: pmap replicas vs mesh fsdp=8")
    p.add_argument("--finetune", action="store_true", help="per device on fsdp=8: LoRA and full fine-tuning")
    p.add_argument("--generate", type=int, default=0, metavar="PROMPT",
                   help="generation instead of training: a PROMPT-token prompt, then seq - PROMPT new tokens")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget-gib", type=float, default=0.0, help="also find the largest batch under this peak")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    p.add_argument("--attention", default="", help="comma list of model.attention kinds to compare (default: the config's)")
    p.add_argument("--head-chunk", default=str(HEAD_CHUNK_TOKENS),
                   help="comma list of LM-head chunk sizes in tokens (0 = no chunking: the full logits)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    presets = args.preset or ["gpt2-124m"]
    if args.finetune or args.generate:
        rows = (generate(presets, args.seq, args.batch, args.generate, args.overrides) if args.generate
                else finetune(presets, args.seq, args.batch, args.overrides))
        if args.json:
            Path(args.json).write_text(json.dumps({"backend": jax.devices()[0].platform, "seq": args.seq,
                                                   "batch": args.batch, "rows": rows}, indent=2))
        return 0
    if args.layouts:
        rows = layouts(presets, args.seq, args.batch, args.overrides, args.budget_gib or 16.0)
        if args.json:
            Path(args.json).write_text(json.dumps({"backend": jax.devices()[0].platform, "seq": args.seq,
                                                   "batch": args.batch, "rows": rows}, indent=2))
        return 0
    args.preset = presets[0]
    cfg = load_config(None, [f"model.preset={args.preset}", "model.dropout=0.0", *args.overrides])
    device = jax.devices()[0]
    print(f"backend: {device.platform} ({getattr(device, 'device_kind', '')}), {args.preset}, "
          f"seq {args.seq}, batch {args.batch}, dtype {cfg.model.dtype}")
    print("| attention | LM-head chunk | remat | policy | peak GiB | temporaries GiB | params+opt (args) GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    kinds = [a for a in args.attention.split(",") if a] or [cfg.model.attention]
    chunks = [int(c) for c in args.head_chunk.split(",")]
    for attention, chunk, remat in ((a, c, r) for a in kinds for c in chunks for r in (False, True)):
        mcfg = dataclasses.replace(cfg.model, remat=remat, attention=attention)
        r = peak_bytes(mcfg, cfg.train, args.batch, args.seq, head_chunk=chunk)
        r.update(attention=attention, head_chunk=chunk, remat=remat, policy=mcfg.remat_policy if remat else "-")
        if args.budget_gib:
            r["largest_batch_in_budget"] = largest_batch(mcfg, cfg.train, args.seq, args.budget_gib * GIB)
        rows.append(r)
        print(f"| {attention} | {chunk or 'none'} | {remat} | {r['policy']} | {r['peak_bytes'] / GIB:.2f} | "
              f"{r['temp_bytes'] / GIB:.2f} | {r['argument_bytes'] / GIB:.2f} | {r['compile_s']:.0f} |"
              + (f" largest batch in {args.budget_gib:g} GiB: {r['largest_batch_in_budget']}" if args.budget_gib else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": device.platform, "preset": args.preset, "seq": args.seq,
                                               "batch": args.batch, "dtype": cfg.model.dtype, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
