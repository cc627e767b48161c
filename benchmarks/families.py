#!/usr/bin/env python
"""Llama, Qwen3 and Gemma 3 speed on this machine: jaxgpt vs transformers' `LlamaForCausalLM` /
`Qwen3ForCausalLM` / `Gemma3ForCausalLM` in the same run, for a training step and batch-1
greedy decode.

    python benchmarks/families.py --families llama,qwen3 --steps 10 --rounds 3 --json families.json
    python benchmarks/families.py --tiny --families llama --steps 1 --rounds 1 --warmup 1   # smoke test

Models: ~150M parameters each (`CONFIGS`: width 768, 12 layers, 12 query / 4 key-value heads,
MLP 2048, GPT-2's vocabulary, untied head; Qwen3 adds its q/k norms; Gemma 3 its four norms
a block and a 128-slot sliding window on 5 layers in 6, so that it masks at these lengths),
float32, dropout 0.
`--train-dtype bfloat16` trains in bf16 compute on both sides (jaxgpt `model.dtype=bfloat16`,
transformers under `torch.autocast("cpu", torch.bfloat16)`, float32 weights and loss).

* Training: forward, mean next-token cross-entropy, backward, global-norm clipping at 1.0,
  AdamW (decay 0.1 on matrices, betas 0.9/0.95) on `--batch x --seq` tokens. jaxgpt: its real
  `train_step` (fused LM head). transformers: the model with `attn_implementation` `sdpa` (its
  fastest on CPU; `--torch-attention eager` for the other), the loss on its logits,
  `torch.optim.AdamW` (foreach) and `clip_grad_norm_`.
* Decode: a `--prompt`-token prompt, `--new-tokens` greedy tokens, batch 1. jaxgpt:
  `generate_tokens` (one jitted prefill + `lax.while_loop` over a KV cache); transformers:
  `generate(do_sample=False, use_cache=True)` with its dynamic cache.

Timing: `--warmup` untimed runs per framework (compilation), then `--rounds` alternating
blocks of `--steps` timed runs each (jaxgpt block, transformers block, ...), so drifts in the
machine's load hit both; medians. torch uses `os.cpu_count()` threads. Like the entry points,
the script re-executes itself with glibc's huge pages for large allocations (both frameworks
get them; `JAXGPT_HUGE_PAGES=0` turns it off).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    "llama": ["model.family=llama", "model.n_layer=12", "model.n_head=12", "model.n_kv_head=4", "model.n_embd=768",
              "model.mlp_dim=2048", "model.tie_embeddings=false", "model.context_length=1024"],
    "qwen3": ["model.family=qwen3", "model.n_layer=12", "model.n_head=12", "model.n_kv_head=4", "model.n_embd=768",
              "model.head_size=64", "model.mlp_dim=2048", "model.tie_embeddings=false", "model.context_length=1024"],
    "gemma3": ["model.family=gemma3", "model.n_layer=12", "model.n_head=12", "model.n_kv_head=4", "model.n_embd=768",
               "model.head_size=64", "model.mlp_dim=2048", "model.tie_embeddings=false", "model.context_length=1024",
               "model.sliding_window=128", "model.sliding_window_pattern=6"],
}


def jax_side(cfg, train_cfg, batch: int, seq: int, prompt, new_tokens: int, train_dtype: str = "float32"):
    import dataclasses

    import jax
    import numpy as np

    from jaxgpt.generation import generate_tokens
    from jaxgpt.models import build_model, init_params
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    tx = make_optimizer(train_cfg)
    state = [create_train_state(params, tx)]
    model = build_model(dataclasses.replace(cfg, dtype=train_dtype))  # decode stays in cfg's dtype
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(model), tx=tx), donate_argnums=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, batch, seq + 1)).astype(np.int32)
    data = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}

    def train():
        state[0], metrics = step(state[0], data, jax.random.key(0))
        jax.block_until_ready(metrics["loss"])

    mask = np.ones_like(prompt, bool)

    def decode():  # the current params: training donated the first ones
        out = generate_tokens(state[0].params, cfg, prompt, mask, jax.random.key(0), max_new_tokens=new_tokens)
        jax.block_until_ready(out["tokens"])

    return train, decode, params


def torch_side(cfg, params, train_cfg, batch: int, seq: int, prompt, new_tokens: int, attention: str,
               train_dtype: str = "float32"):
    import numpy as np
    import torch

    from jaxgpt.io import torch_twin

    model = torch_twin.to_torch(params, cfg, attn_implementation=attention).train()
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if p.ndim >= 2],
                              "weight_decay": train_cfg.weight_decay},
                             {"params": [p for n, p in model.named_parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=train_cfg.lr, betas=(train_cfg.b1, train_cfg.b2), eps=1e-8, foreach=True)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)))

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_dtype == "bfloat16"):
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()

    ids = torch.as_tensor(prompt)

    def decode():
        with torch.no_grad():
            model.eval()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, eos_token_id=None,
                           pad_token_id=0)
            model.train()

    return train, decode


def timed(fns: dict, warmup: int, steps: int, rounds: int) -> dict:
    """Median seconds per call of each function, alternating blocks of `steps` calls."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # one untimed call after the other framework's block
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="llama,qwen3")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-attention", default="sdpa")
    p.add_argument("--attention", default="reference", help="jaxgpt's model.attention (auto: blockwise from 256 keys on CPU)")
    p.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="training compute dtype: jaxgpt's model.dtype, transformers under torch.autocast(bfloat16); "
                   "decode stays float32")
    p.add_argument("--json")
    p.add_argument("--tiny", action="store_true", help="2 layers x 64 (a smoke test, seconds)")
    args = p.parse_args(argv)
    tiny = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.mlp_dim=128",
            "model.head_size=16"] if args.tiny else []

    import numpy as np
    import torch

    from jaxgpt.config import load_config
    from jaxgpt.models import count_params

    torch.set_num_threads(os.cpu_count() or 1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    host = f"{cpu}, {os.cpu_count()} cores, {', '.join(isa) or 'no AVX2'}"
    print(f"host: {host}; load {os.getloadavg()[0]:.2f}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}", flush=True)
    rows = []
    for family in args.families.split(","):
        cfg = load_config(None, CONFIGS[family] + tiny + [f"model.attention={args.attention}", "model.dropout=0.0",
                                                   "train.lr=3e-4", "train.weight_decay=0.1",
                                                   "train.grad_clip=1.0", "train.warmup_steps=0"])
        prompt = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (1, args.prompt)).astype(np.int32)
        jtrain, jdecode, params = jax_side(cfg.model, cfg.train, args.batch, args.seq, prompt, args.new_tokens,
                                           args.train_dtype)
        ttrain, tdecode = torch_side(cfg.model, params, cfg.train, args.batch, args.seq, prompt, args.new_tokens,
                                     args.torch_attention, args.train_dtype)
        n = count_params(params)
        train = timed({"jaxgpt": jtrain, "transformers": ttrain}, args.warmup, args.steps, args.rounds)
        decode = timed({"jaxgpt": jdecode, "transformers": tdecode}, 1, args.decode_steps, args.rounds)
        tokens = args.batch * args.seq
        row = {"family": family, "params": n, "batch": args.batch, "seq": args.seq, "train_dtype": args.train_dtype,
               "train_tokens_per_sec": {k: tokens / v for k, v in train.items()},
               "train_speedup": train["transformers"] / train["jaxgpt"],
               "decode_tokens_per_sec": {k: args.new_tokens / v for k, v in decode.items()},
               "decode_speedup": decode["transformers"] / decode["jaxgpt"]}
        rows.append(row)
        print(f"{family} ({n / 1e6:.0f}M): train ({args.train_dtype}) {row['train_tokens_per_sec']['jaxgpt']:.0f} vs "
              f"{row['train_tokens_per_sec']['transformers']:.0f} tokens/s ({row['train_speedup']:.2f}x); decode "
              f"{row['decode_tokens_per_sec']['jaxgpt']:.1f} vs {row['decode_tokens_per_sec']['transformers']:.1f} "
              f"tokens/s ({row['decode_speedup']:.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "torch_attention": args.torch_attention, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    from jaxgpt.cli.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # as train.py and finetune.py do (JAXGPT_HUGE_PAGES=0: 4 KiB pages)
    sys.exit(main())
