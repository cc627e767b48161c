#!/usr/bin/env python
"""The CPU's matmul rate by dtype: XLA (as jaxgpt runs it) against torch, same process.

    python benchmarks/matmul_dtypes.py --n 2048 --reps 7

What `model.dtype=bfloat16` can gain on this host: an `n x n` float32 and bfloat16 matmul,
XLA with the default result type and with `preferred_element_type=float32` (bf16 inputs,
float32 accumulation, how jaxgpt's bf16 dots are written where it matters), against
`torch.matmul` (MKL for float32; oneDNN for bfloat16, which uses AVX512-BF16 / AMX tiles where
the CPU has them). GFLOP/s = 2 n^3 / median seconds. Prints the CPU's bf16 features from
/proc/cpuinfo: without AVX512-BF16 or AMX both libraries emulate bf16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def rate(fn, n: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    flags = open("/proc/cpuinfo").read().split()
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    a = np.random.default_rng(0).standard_normal((args.n, args.n), dtype=np.float32)
    rows = []
    for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        x = jnp.asarray(a, jdt)
        plain = jax.jit(lambda x: x @ x)
        f32acc = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        t = torch.from_numpy(a).to(tdt)
        row = {"dtype": jnp.dtype(jdt).name,
               "xla": rate(lambda: plain(x).block_until_ready(), args.n, args.reps),
               "xla_f32_accumulate": rate(lambda: f32acc(x).block_until_ready(), args.n, args.reps),
               "torch": rate(lambda: torch.matmul(t, t), args.n, args.reps)}
        rows.append(row)
    print(f"CPU bf16 features: {', '.join(f for f in features if f != 'avx512f') or 'none'} "
          f"({'avx512f' if 'avx512f' in features else 'no avx512f'}); jax {jax.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print("| dtype | XLA GFLOP/s | XLA, float32 accumulation | torch | XLA / torch |")
    print("|---|---|---|---|---|")
    for r in rows:
        best = max(r["xla"], r["xla_f32_accumulate"])
        print(f"| {r['dtype']} | {r['xla']:.0f} | {r['xla_f32_accumulate']:.0f} | {r['torch']:.0f} | {best / r['torch']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"features": features, "n": args.n, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
