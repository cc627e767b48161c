#!/usr/bin/env python
"""The decode step's attention alone: `one_query_attention` over KV caches that fill as it goes.

`--layers` caches of `--slots` slots (heads-major, as `init_cache` keeps them: `[rows * kv_heads,
slots, head_dim]` each), one query per row per step, `--steps` steps in one jitted `fori_loop`;
step i sees the first 20 + (slots - 20) * i / steps slots, so the masks sweep a filling cache
as a generation does. No weights are read: this is the part of a decode step that grows with
the cache, which the memory-bound limit of `decode.py` does not count. ms a step, median of
`--rounds` calls after one compiling call.

`--compare-to DIR` also times the `one_query_attention` of another checkout
(`DIR/jaxgpt/models/attention.py`) in the same process, alternating, and checks that both
give the same outputs: before / after for a change.

    python benchmarks/one_query.py --slots 1024
    python benchmarks/one_query.py --slots 256 --heads 16 --kv-heads 4 --layers 8 --rows 8
    python benchmarks/one_query.py --slots 1024 --compare-to ../before
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path


def attention_from(checkout: Path):
    """`one_query_attention` as `checkout`'s `jaxgpt/models/attention.py` defines it."""
    path = checkout / "jaxgpt" / "models" / "attention.py"
    if not path.is_file():
        raise SystemExit(f"--compare-to: {path} not found; give a jaxgpt checkout")
    spec = importlib.util.spec_from_file_location("compared_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.one_query_attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=1024, help="cache length (default 1024)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no grouping)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rows", type=int, default=1, help="batch rows")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compare-to", type=Path, help="another jaxgpt checkout to time beside this one")
    args = p.parse_args(argv)
    kv = args.kv_heads or args.heads
    if args.heads % kv or args.slots <= 20 or min(args.layers, args.rows, args.steps, args.rounds) < 1:
        p.error("need --heads divisible by --kv-heads, --slots > 20 and positive counts")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jaxgpt.models.attention import one_query_attention

    b, h, d, s, n = args.rows, args.heads, args.head_dim, args.slots, args.steps
    rng = np.random.default_rng(0)
    caches = [[jnp.asarray(rng.standard_normal((b * kv, s, d), np.float32)) for _ in range(args.layers)]
              for _ in range(2)]
    q0 = jnp.asarray(rng.standard_normal((b, 1, h, d), np.float32))
    view = lambda c: jnp.swapaxes(c.reshape(b, kv, s, d), 1, 2)  # noqa: E731  (what write_cache returns)

    def loop_of(attention):
        @jax.jit
        def loop(keys, values, q):
            def step(i, q):
                live = jnp.arange(s) < 20 + (s - 20) * i // n
                mask = jnp.broadcast_to(live[None, None, None, :], (b, 1, 1, s))
                for k, v in zip(keys, values):  # the next layer's query depends on this one's output
                    q = q + 0.1 * attention(q, view(k), view(v), mask)
                    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
                return q
            return lax.fori_loop(0, n, step, q)
        return loop

    loops = {"this checkout": loop_of(one_query_attention)}
    if args.compare_to:
        loops[str(args.compare_to)] = loop_of(attention_from(args.compare_to))
    outs = {name: np.asarray(jax.block_until_ready(f(*caches, q0))) for name, f in loops.items()}
    if len(outs) == 2:
        a, c = outs.values()
        np.testing.assert_allclose(a, c, atol=1e-4, err_msg="the two checkouts' attention differ")
    times = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(loops[name](*caches, q0))
            times[name].append((time.perf_counter() - t0) / n)
    print(f"one-query attention: {args.layers} layers, {s} slots, {h} heads / {kv} kv heads x {d}, "
          f"{b} rows; {n} steps, median of {args.rounds}")
    for name, ts in times.items():
        print(f"  {name}: {1e3 * statistics.median(ts):.3f} ms a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
