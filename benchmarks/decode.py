#!/usr/bin/env python
"""Batch-1 greedy decode: jaxgpt's sampler vs the book's KV-cache GPTModel, and the memory-bound limit.

* jaxgpt: `jaxgpt.generation.decode.generate_tokens` (the library's jitted prefill + `lax.while_loop`
  decode through a fixed-size KV cache), temperature 0, no eos. A first call compiles and is
  discarded; each timed call is `block_until_ready`'d.
* torch: `llms_from_scratch.kv_cache.gpt2.GPTModel` (the book's KV-cache GPT, its cache a
  `KVCache` of torch.cat-grown tensors) under `torch.inference_mode()`, driven by the loop of
  `llms_from_scratch.kv_cache.generate.generate_text_simple` (prefill, then argmax and one
  single-token forward per new token). That function itself expects `model.cfg` and
  `model.reset_kv_cache()`, which the GPT-2 KV model lacks, so the loop is written out
  here (`book_generate`); it skips the function's one forward after the last token, so both
  sides run 1 prefill + (new_tokens - 1) single-token steps. One untimed call warms it up.
  The installed llms-from-scratch (1.0.19, the latest) slices the causal mask wrongly in
  `kv_cache/gpt2.py`, so every cached single-token step raises; `_book_attention_forward`
  is its attention forward with that one line fixed (the same ops otherwise).

Both models have the same weights: jaxgpt's random init (`model.init=gpt2`), mapped to the
book's state-dict names by `benchmarks/parity_124m.py::book_state_dict` (the KV-cache model's
names are ch04's), shape `--preset` with the book's choices (untied head, no qkv bias,
dropout 0). Their greedy tokens are compared and the result printed.

Rounds alternate (jaxgpt, torch, torch, jaxgpt, ...) so drifting machine load hits both.
torch uses `--torch-threads` (default: the usable cores). On a machine shared with another
CPU job, torch's OpenMP threads waiting on each other at every small batch-1 op can cost
10x (2 cores under load ~6: 2.1 tokens/s with 2 threads, 20.8 with 1), so record the load
average (printed) and try `--torch-threads 1`.
tokens/s = new_tokens / wall time of one whole generate call (prefill included), median
over `--rounds`.

Memory-bound limit: at batch 1 every step reads every weight used by a matmul once, so
tokens/s <= bandwidth / bytes per token, bytes per token = 4 x (all parameters except the
wte/wpe tables, of which a step reads one row each; a tied head counts wte). The KV cache
reads (<= 2 x layers x tokens x n_embd x 4 bytes, ~1.4% of the weights at 124M and 220
tokens) are left out. Bandwidth is measured in the same run: the larger of a jitted
`jnp.sum` and a `torch.sum` over a `--bw-mib` float32 array (bytes read / median time),
once at the start and again just before every timed call; a call's fraction of the limit
is its tokens/s over the limit from the measurement just before it, and the table gives
the median over calls (the limit column: the median of all measurements). On a shared host
the bandwidth drifts by tens of percent within minutes, so one measurement at the start
misstated later rounds.

    python benchmarks/decode.py --rounds 3 --json decode.json
    python benchmarks/decode.py --tiny --rounds 1       # smoke test (2 x 64, seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def model_config(args):
    from jaxgpt.config import PRESETS, ModelConfig

    shape = dict(PRESETS[args.preset])
    if args.tiny:
        shape.update(n_layer=2, n_head=2, n_embd=64, context_length=max(64, args.prompt_len + args.new_tokens))
    return ModelConfig(**shape, dropout=0.0, qkv_bias=False, tie_embeddings=False)


def bytes_per_token(params, cfg) -> int:
    """4 x the parameters a batch-1 decode step reads in full (see the module docstring)."""
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        top = getattr(path[0], "key", str(path[0]))
        if top in ("wte", "wpe") and not (top == "wte" and cfg.tie_embeddings):
            continue
        total += leaf.size * leaf.dtype.itemsize
    return total


class Bandwidth:
    """Read bandwidth (bytes/s): the larger of a jitted `jnp.sum` and a `torch.sum` (when torch
    is loaded) over one `nbytes` float32 array each, median of `reps` sums. The arrays are
    made once; `measure()` is called before every timed decode call, because on a shared
    host the bandwidth drifts by tens of percent within a run (28-42 GB/s in one session),
    and a limit measured once would misstate every later round's fraction."""

    def __init__(self, nbytes: int, with_torch: bool, reps: int = 5):
        import jax
        import jax.numpy as jnp

        self.nbytes, self.reps = nbytes, reps
        self.x = jnp.ones((nbytes // 4,), jnp.float32)
        self.sum = jax.jit(jnp.sum)
        jax.block_until_ready(self.sum(self.x))
        self.tx = None
        if with_torch:
            import torch

            self.tx = torch.ones(nbytes // 4, dtype=torch.float32)
            torch.sum(self.tx)

    def _rate(self, fn) -> float:
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return self.nbytes / statistics.median(times)

    def measure(self) -> dict:
        import jax

        out = {"jax": self._rate(lambda: jax.block_until_ready(self.sum(self.x)))}
        if self.tx is not None:
            import torch

            out["torch"] = self._rate(lambda: torch.sum(self.tx))
        return out


def _book_attention_forward(self, x, use_cache=False, start_pos=0, cache=None):
    """`llms_from_scratch.kv_cache.gpt2.MultiHeadAttention.forward` (1.0.19) with one line
    fixed: the book slices the causal mask's columns (`[:, -num_tokens:]`), which is right
    only when num_tokens == seq_len and raises on every cached single-token step; the rows
    of the new queries (`[-num_tokens:, :]`) are meant. Every op is otherwise the book's."""
    import torch

    b, num_tokens, _ = x.shape
    keys, values, queries = self.W_key(x), self.W_value(x), self.W_query(x)
    keys, values, queries = (a.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
                             for a in (keys, values, queries))
    if use_cache:
        if cache is not None:
            keys = torch.cat([cache[0], keys], dim=2)
            values = torch.cat([cache[1], values], dim=2)
        next_cache = (keys, values)
    else:
        next_cache = None
    seq_len = keys.size(2)
    causal_mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device), diagonal=1)
    causal_mask = causal_mask[-num_tokens:, :][None, None, :, :]  # the fix
    attn_scores = queries @ keys.transpose(2, 3)
    attn_scores.masked_fill_(causal_mask, -torch.inf)
    attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1]**0.5, dim=-1))
    context_vec = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
    return self.out_proj(context_vec), next_cache


def book_kv_model(cfg, params):
    """The book's KV-cache GPT-2 with jaxgpt's `params` (ch04 state-dict names), the mask fix
    of `_book_attention_forward` bound on its attention modules."""
    import types

    from llms_from_scratch.kv_cache.gpt2 import GPTModel as KVGPTModel
    from parity_124m import book_config, book_state_dict

    model = KVGPTModel(book_config(cfg))
    missing, unexpected = model.load_state_dict(book_state_dict(params, cfg), strict=True)
    assert not missing and not unexpected
    for block in model.trf_blocks:
        block.att.forward = types.MethodType(_book_attention_forward, block.att)
    return model.eval()


def book_generate(model, idx, max_new_tokens: int):
    """`llms_from_scratch.kv_cache.generate.generate_text_simple(use_cache=True)`'s loop for
    the GPT-2 KV-cache model: new tokens `[batch, max_new_tokens]`."""
    import torch
    from llms_from_scratch.kv_cache.utils import KVCache

    with torch.inference_mode():
        cache = KVCache(n_layers=len(model.trf_blocks))
        model.current_pos = 0  # what reset_kv_cache would do
        logits = model(idx, use_cache=True, cache=cache)
        out = []
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = model(nxt, use_cache=True, cache=cache)
    return torch.cat(out, dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m", help="jaxgpt model preset (shape)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 20; --tiny 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 200; --tiny 16)")
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per framework, alternating")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: 2 layers x 64 wide (GPT-2 vocab), prompt 8, 16 new tokens, 64 MiB bandwidth array")
    p.add_argument("--bw-mib", type=int, default=None, help="bandwidth array size (default 1024; --tiny 64)")
    p.add_argument("--frameworks", default="jax,torch",
                   help="comma list of: jax, jax-stream (jaxgpt with a per-token host callback that detokenizes, "
                        "as generate --stream does), torch")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads (default: the usable cores). On a loaded machine OpenMP "
                   "threads waiting on each other can dominate batch-1 decode; try 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results to this path")
    args = p.parse_args(argv)
    if args.prompt_len is None:
        args.prompt_len = 8 if args.tiny else 20
    if args.new_tokens is None:
        args.new_tokens = 16 if args.tiny else 200
    bw_bytes = (args.bw_mib or (64 if args.tiny else 1024)) << 20
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if set(frameworks) - {"jax", "jax-stream", "torch"}:
        p.error(f"unknown frameworks {frameworks}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.models import count_params, init_params
    from jaxgpt.generation.decode import generate_tokens

    load_start = _loadavg()
    cfg = model_config(args)
    if args.prompt_len + args.new_tokens > cfg.context_length:
        p.error(f"--prompt-len + --new-tokens exceeds the context of {cfg.context_length}")
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(args.seed))  # one compile, not op by op
    n_params = count_params(params)
    bpt = bytes_per_token(params, cfg)
    prompt = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (1, args.prompt_len), dtype=np.int32)
    n = args.new_tokens

    runners, tokens = {}, {}
    if "jax" in frameworks:
        jp, jm, key = jnp.asarray(prompt), jnp.ones(prompt.shape, bool), jax.random.key(args.seed)

        def run_jax():
            t0 = time.perf_counter()
            out = generate_tokens(params, cfg, jp, jm, key, max_new_tokens=n, temperature=0.0)
            toks = jax.block_until_ready(out["tokens"])
            return time.perf_counter() - t0, np.asarray(toks)[0]

        runners["jaxgpt"] = run_jax
    if "jax-stream" in frameworks:
        from jaxgpt.generation.stream import TextStream
        from jaxgpt.text.tokenizer import load_tokenizer

        jp, jm, key = jnp.asarray(prompt), jnp.ones(prompt.shape, bool), jax.random.key(args.seed)
        gpt2 = load_tokenizer("gpt2")

        def run_jax_stream():
            stream = TextStream(gpt2)

            def on_token(step, toks, live):
                stream.push(toks[0])  # the text is decoded as the CLI's --stream decodes it, not printed

            t0 = time.perf_counter()
            out = generate_tokens(params, cfg, jp, jm, key, max_new_tokens=n, temperature=0.0, on_token=on_token)
            toks = jax.block_until_ready(out["tokens"])
            return time.perf_counter() - t0, np.asarray(toks)[0]

        runners["jaxgpt-stream"] = run_jax_stream
    torch = None
    if "torch" in frameworks:
        try:
            import llms_from_scratch.kv_cache.gpt2  # noqa: F401
            import torch
        except ImportError:
            print("the torch side needs torch and: pip install --no-deps llms-from-scratch", file=sys.stderr)
            return 2
        sys.path.insert(0, str(HERE))  # parity_124m
        torch.set_num_threads(args.torch_threads or _cores())
        model = book_kv_model(cfg, params)
        assert sum(q.numel() for q in model.parameters()) == n_params
        tp = torch.from_numpy(prompt.astype(np.int64))

        def run_torch():
            t0 = time.perf_counter()
            toks = book_generate(model, tp, n)
            return time.perf_counter() - t0, toks[0].numpy()

        runners["torch"] = run_torch

    # Bandwidth first (before the models' working sets are warm), then warm-up calls, then
    # every timed call right after a bandwidth measurement of its own.
    meter = Bandwidth(bw_bytes, with_torch=torch is not None)
    bws = meter.measure()
    print(f"bandwidth (sum over {bw_bytes >> 20} MiB fp32): "
          + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bws.items())
          + f"; {bpt / 1e6:.1f} MB read per token -> limit {max(bws.values()) / bpt:.1f} tokens/s", file=sys.stderr)
    for name, run in runners.items():
        dt, tokens[name] = run()
        print(f"  {name}: warm-up call {dt:.2f}s", file=sys.stderr)

    times = {k: [] for k in runners}
    fractions = {k: [] for k in runners}  # each call's tokens/s over the limit measured just before it
    bandwidths = [max(bws.values())]
    order = list(runners)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            bw = max(meter.measure().values())
            bandwidths.append(bw)
            dt, toks = runners[name]()
            times[name].append(dt)
            fractions[name].append(n / dt / (bw / bpt))
            assert np.array_equal(toks, tokens[name]), f"{name}: greedy tokens changed between calls"
            print(f"  {name}: round {r + 1}/{args.rounds}: {dt:.3f}s, {n / dt:.1f} tokens/s "
                  f"({bw / 1e9:.1f} GB/s just before: {100 * fractions[name][-1]:.1f}% of its limit)", file=sys.stderr)
    bandwidth = statistics.median(bandwidths)
    limit = bandwidth / bpt

    same = None
    first_diff = None
    if len(tokens) >= 2:
        a, *others = tokens.values()
        same = all(np.array_equal(a, b) for b in others)
        if not same:
            first_diff = min(int(np.argmax(a != b)) for b in others if not np.array_equal(a, b))
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {"median_s": med, "min_s": min(ts), "times_s": ts, "tokens_per_s": n / med,
                         "fraction_of_limit": statistics.median(fractions[name]),
                         "fractions_per_call": fractions[name]}
    th = results.get("torch")
    for name, r in results.items():
        r["over_torch"] = r["tokens_per_s"] / th["tokens_per_s"] if th else None
    load_end = _loadavg()

    shape = f"{cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params (untied, no qkv bias)"
    lines = [(f"Decode, batch 1, greedy: {'tiny' if args.tiny else args.preset} ({shape}); prompt {args.prompt_len}, "
              f"{n} new tokens; {args.rounds} rounds; {_cores()} cores; load avg start {load_start}, end {load_end}"),
             f"Memory-bound limit: {bandwidth / 1e9:.2f} GB/s (median of {len(bandwidths)} measurements, "
             f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}) / {bpt / 1e6:.1f} MB per token = "
             f"{limit:.1f} tokens/s; each call's fraction is against the bandwidth measured just before it",
             "", "| framework | median s / call | tokens/s (median) | fraction of memory-bound limit (median over calls) | x torch |",
             "|---|---|---|---|---|"]
    label = {"jaxgpt": "jaxgpt (generate_tokens, jitted, KV cache)",
             "jaxgpt-stream": "jaxgpt, streamed (on_token: a host callback a token, TextStream)",
             "torch": "torch (llms-from-scratch kv_cache GPTModel, inference_mode)"}
    for name, r in results.items():
        ratio = f"{r['over_torch']:.2f}x" if r["over_torch"] is not None and name != "torch" else ""
        lines.append(f"| {label[name]} | {r['median_s']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{100 * r['fraction_of_limit']:.1f}% | {ratio} |")
    if same is not None:
        lines += ["", f"Greedy tokens, same weights: {'identical' if same else 'DIFFER'} over {n} tokens"
                  + ("" if same else f" (first difference at new token {first_diff})")]
    print("\n".join(lines))
    if args.json:
        out = {"machine": {"cores_usable": _cores(), "load_avg_start": load_start, "load_avg_end": load_end,
                           "jax": jax.__version__, "torch": torch.__version__ if torch is not None else None,
                           "torch_threads": torch.get_num_threads() if torch is not None else None},
               "config": {"preset": None if args.tiny else args.preset, "tiny": args.tiny, "n_layer": cfg.n_layer,
                          "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                          "context_length": cfg.context_length, "params": n_params,
                          "prompt_len": args.prompt_len, "new_tokens": n, "rounds": args.rounds},
               "bandwidth_bytes_per_s": bws, "bandwidth_per_call": bandwidths[1:], "bandwidth_used": bandwidth,
               "bytes_per_token": bpt,
               "memory_bound_tokens_per_s": limit, "results": results,
               "greedy_tokens_identical": same, "first_difference": first_diff, "argv": sys.argv}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
