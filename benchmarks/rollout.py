#!/usr/bin/env python
"""Rollout throughput: completion tokens per second of `jaxgpt.rl.rollout.rollout`.

What is timed is exactly what an RL iteration runs: `prompts` left-padded prompts of
`--prompt-len` tokens, each repeated `--group` times, decoded for `--new-tokens` tokens by the
jitted KV-cache sampler (temperature 1, full vocabulary). No eos is set, so every row
produces all its tokens and tokens/s = rows x new_tokens / seconds (an RL batch that stops
early at `<|endoftext|>` is cheaper). The first call (compilation) is run and discarded;
then `--repeats` calls with different keys are timed (`jax.block_until_ready`), and the
median is reported, together with the time of the reference-model scoring of the same batch
(`completion_logprobs`, one forward pass over prompt + completion).

The PyTorch reference, measured in the same run (`--torch-reference`, on by default when
transformers is installed): Hugging Face `GPT2LMHeadModel.generate` on a GPT-2 of the same
shape (random weights, float32, KV cache, `do_sample=True`, top-k off, the same rows and
token counts, `min_new_tokens` forcing every row to full length), median of the same
number of repeats after one warm-up call.

    python benchmarks/rollout.py                          # GRPO's default: 4x256 GPT, 16 x 8 rows
    python benchmarks/rollout.py --preset gpt2-124m --prompt-len 64 --new-tokens 64 --prompts 4
    python benchmarks/rollout.py --sampler gumbel                   # jax.random.categorical's draw
    python benchmarks/rollout.py --json rollout.json

Random weights: throughput does not depend on them (no eos).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np


def model_shape(args) -> dict:
    """`n_layer`, `n_head`, `n_embd` of `--preset` (its vocabulary and context are the
    benchmark's own: GPT-2's 50,257 tokens, prompt + new tokens), else of the flags."""
    from jaxgpt.config import PRESETS

    source = PRESETS[args.preset] if args.preset else vars(args)
    return {k: source[k] for k in ("n_layer", "n_head", "n_embd")}


def measure(args) -> dict:
    from jaxgpt.config import ModelConfig
    from jaxgpt.models import build_model, init_params
    from jaxgpt.rl.rollout import completion_logprobs, rollout

    cfg = ModelConfig(vocab_size=50257, context_length=args.prompt_len + args.new_tokens, dropout=0.0,
                      dtype=args.dtype, **model_shape(args))
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, (args.prompts, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    rows = args.prompts * args.group
    n = args.new_tokens
    model = build_model(cfg)
    score = jax.jit(lambda p, t, m: completion_logprobs(model, p, t, m, n))

    def once(i):
        t0 = time.perf_counter()
        out = rollout(params, cfg, tokens, mask, jax.random.key(i), group_size=args.group, max_new_tokens=n,
                      temperature=1.0, method=args.sampler)
        jax.block_until_ready(out["tokens"])
        t1 = time.perf_counter()
        jax.block_until_ready(score(params, out["tokens"], out["attention_mask"]))
        return t1 - t0, time.perf_counter() - t1

    once(0)  # compile both
    times = [once(i + 1) for i in range(args.repeats)]
    sample_s = statistics.median(t for t, _ in times)
    score_s = statistics.median(s for _, s in times)
    return {
        "device": jax.devices()[0].device_kind, "platform": platform.processor() or platform.machine(),
        "model": args.preset or f"{args.n_layer}x{args.n_embd}", "dtype": args.dtype, "sampler": args.sampler,
        "rows": rows, "prompt_len": args.prompt_len, "new_tokens": n,
        "rollout_seconds": sample_s, "rollout_tokens_per_sec": rows * n / sample_s,
        "score_seconds": score_s, "score_tokens_per_sec": rows * (args.prompt_len + n) / score_s,
    }


def measure_torch(args, threads: int | None = None) -> dict:
    """HF transformers `generate` on the same shape and batch (see the module docstring)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = model_shape(args)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=args.prompt_len + args.new_tokens, n_layer=shape["n_layer"],
                        n_head=shape["n_head"], n_embd=shape["n_embd"])
    model = GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(0)
    prompts = torch.as_tensor(rng.integers(0, 50000, (args.prompts, args.prompt_len)), dtype=torch.long)
    rows, n = args.prompts * args.group, args.new_tokens

    def once(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                 max_new_tokens=n, min_new_tokens=n, num_return_sequences=args.group,
                                 pad_token_id=50256, eos_token_id=None)
        assert out.shape == (rows, args.prompt_len + n), out.shape
        return time.perf_counter() - t0

    once(0)
    seconds = statistics.median(once(i + 1) for i in range(args.repeats))
    return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_rollout_seconds": seconds, "torch_rollout_tokens_per_sec": rows * n / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="", help="gpt2-124m | ... (default: --n-layer/--n-head/--n-embd)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sampler", default="inverse_cdf", help="inverse_cdf (the rollout default) | gumbel")
    p.add_argument("--no-torch-reference", dest="torch_reference", action="store_false",
                   help="skip the HF transformers generate() reference")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    from jaxgpt.config import PRESETS

    if args.preset and args.preset not in PRESETS:
        p.error(f"unknown --preset {args.preset!r}; one of {', '.join(PRESETS)}")
    result = measure(args)
    if args.torch_reference:
        try:
            result.update(measure_torch(args))
        except ImportError as e:  # torch / transformers are test extras
            result["torch_reference"] = f"skipped: {e}"
        else:
            result["speedup_vs_torch"] = result["rollout_tokens_per_sec"] / result["torch_rollout_tokens_per_sec"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
