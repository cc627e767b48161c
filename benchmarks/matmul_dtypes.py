#!/usr/bin/env python
"""The CPU's matmul rate by dtype: XLA (as jaxgpt runs it) against torch, same process.

    python benchmarks/matmul_dtypes.py --n 2048 --reps 7

What `model.dtype=bfloat16` can gain on this host: an `n x n` float32 and bfloat16 matmul,
XLA with the default result type and with `preferred_element_type=float32` (bf16 inputs,
float32 accumulation, how jaxgpt's bf16 dots are written where it matters), against
`torch.matmul` (MKL for float32; oneDNN for bfloat16, which uses AVX512-BF16 / AMX tiles where
the CPU has them). GFLOP/s = 2 n^3 / median seconds. Prints the CPU's bf16 features from
/proc/cpuinfo: without AVX512-BF16 or AMX both libraries emulate bf16.

    python benchmarks/matmul_dtypes.py --dense-layers --tokens 1024

`--dense-layers` also times gpt2-124m's bf16 dense-layer shapes (`[tokens, in] x [in, out]`,
float32 accumulation) three ways: XLA; `torch.matmul` (oneDNN) called from a jitted function
through `jax.pure_callback`, the shortest route from JAX to oneDNN's AMX kernels; and
`torch.matmul` alone. The callback column is what such a route would deliver on this host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _gflops(v: float) -> str:
    """A rate for the table: whole GFLOP/s, or two decimals below 10 (torch's bf16 matmul on a
    CPU without bf16 instructions runs at a fraction of one)."""
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def rate(fn, flops: float, reps: int) -> float:
    """GFLOP/s of `fn` (doing `flops`), from the median of `reps` timed calls after one untimed."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dense-layers", action="store_true", help="also gpt2-124m's bf16 dense-layer shapes, three ways")
    p.add_argument("--tokens", type=int, default=1024, help="rows of the dense-layer matmuls (batch x seq)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    flags = open("/proc/cpuinfo").read().split()
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    a = np.random.default_rng(0).standard_normal((args.n, args.n), dtype=np.float32)
    rows, flops = [], 2 * args.n**3
    for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        x = jnp.asarray(a, jdt)
        plain = jax.jit(lambda x: x @ x)
        f32acc = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        t = torch.from_numpy(a).to(tdt)
        row = {"dtype": jnp.dtype(jdt).name,
               "xla": rate(lambda: plain(x).block_until_ready(), flops, args.reps),
               "xla_f32_accumulate": rate(lambda: f32acc(x).block_until_ready(), flops, args.reps),
               "torch": rate(lambda: torch.matmul(t, t), flops, args.reps)}
        rows.append(row)
    print(f"CPU bf16 features: {', '.join(f for f in features if f != 'avx512f') or 'none'} "
          f"({'avx512f' if 'avx512f' in features else 'no avx512f'}); jax {jax.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print("| dtype | XLA GFLOP/s | XLA, float32 accumulation | torch | XLA / torch |")
    print("|---|---|---|---|---|")
    for r in rows:
        best = max(r["xla"], r["xla_f32_accumulate"])
        print(f"| {r['dtype']} | {_gflops(r['xla'])} | {_gflops(r['xla_f32_accumulate'])} | {_gflops(r['torch'])} "
              f"| {best / r['torch']:.2f}x |")
    dense = dense_layers(args.tokens, args.reps) if args.dense_layers else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"features": features, "n": args.n, "rows": rows, "dense_layers": dense}, f, indent=2)
    return 0


def dense_layers(tokens: int, reps: int) -> list[dict]:
    """GFLOP/s of bf16 `[tokens, k] x [k, n]` (float32 accumulation, bf16 result): XLA, torch
    through `jax.pure_callback`, torch alone; prints a markdown table."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    import torch

    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read, never written

    def as_torch(a):  # a bf16 numpy buffer as a torch tensor, no copy
        return torch.from_numpy(np.asarray(a).view(np.int16)).view(torch.bfloat16)

    def torch_matmul(x, w):
        return torch.matmul(as_torch(x), as_torch(w)).view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    callback = jax.jit(lambda x, w: jax.pure_callback(
        torch_matmul, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16), x, w))
    rng = np.random.default_rng(0)
    rows = []
    print(f"\n| bf16 `[{tokens}, k] x [k, n]` | XLA GFLOP/s | torch via `pure_callback` | torch alone |")
    print("|---|---|---|---|")
    for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
        x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.bfloat16)
        tx, tw = as_torch(np.array(x)), as_torch(np.array(w))
        flops = 2 * tokens * k * n
        row = {"k": k, "n": n,
               "xla": rate(lambda: xla(x, w).block_until_ready(), flops, reps),
               "torch_callback": rate(lambda: callback(x, w).block_until_ready(), flops, reps),
               "torch": rate(lambda: torch.matmul(tx, tw), flops, reps)}
        rows.append(row)
        print(f"| {k} -> {n} | {row['xla']:.0f} | {row['torch_callback']:.0f} | {row['torch']:.0f} |")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
