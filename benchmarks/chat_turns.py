#!/usr/bin/env python
"""A multi-turn chat's cost a turn: the whole conversation prefilled again each turn, against a
KV cache kept across turns, jaxgpt and transformers in the same run.

    python benchmarks/chat_turns.py --turns 8 --rounds 3 --json chat_turns.json
    python benchmarks/chat_turns.py --tiny --turns 3 --rounds 1    # smoke test

The conversation: turn k's prompt is turn k-1's prompt, its answer and `--message` new tokens
(random ids), and each answer is `--answer` greedy tokens (no eos), batch 1, float32, on
`families.py`'s ~150M Llama (`--family`). Four ways to run it:

* `jaxgpt`: `generate_tokens` on the whole prompt each turn, left-padded to a multiple of 128
  (what `python -m jaxgpt chat` did before its session);
* `jaxgpt-session`: `DecodeSession` (`jaxgpt.generation.session`): each turn prefills only
  the tokens its prompt adds, the answer before it already in the cache;
* `transformers`: `generate(use_cache=True)` on the whole prompt each turn (a fresh cache);
* `transformers-cache`: `generate(cache=<the last turn's cache>)` (`past_key_values=` before
  transformers 5.25), its documented way to continue from a cache (it prefills the uncached
  tokens only).

Timing: one untimed conversation per way (compilation; its time is printed: a CLI chat pays
it), then `--rounds` alternating timed conversations; medians of the whole conversation and
of its last turn. The greedy tokens of all four are compared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def conversation(fns: dict, name: str, messages, answer: int):
    """Run `fns[name]` (a fresh conversation's `turn(prompt_ids) -> answer_ids`) over the
    messages; returns (seconds a turn, the answers)."""
    turn = fns[name]()
    prompt, times, answers = [], [], []
    for message in messages:
        prompt = prompt + message
        start = time.perf_counter()
        out = turn(prompt)
        times.append(time.perf_counter() - start)
        assert len(out) == answer, (name, len(out))
        answers.append(out)
        prompt = prompt + out
    return times, answers


def jax_ways(cfg, params, answer: int):
    import jax
    import numpy as np

    from jaxgpt.generation import DecodeSession, generate_tokens, pad_prompts

    key = jax.random.key(0)

    def plain():
        def turn(ids):
            tokens, mask = pad_prompts([ids], max_new_tokens=answer, context_length=cfg.context_length, bucket=128)
            out = generate_tokens(params, cfg, tokens, mask, key, max_new_tokens=answer)
            return np.asarray(out["tokens"])[0].tolist()
        return turn

    def session():
        s = DecodeSession(params, cfg)

        def turn(ids):
            tokens, mask = np.asarray([ids], np.int32), np.ones((1, len(ids)), bool)
            return np.asarray(s.generate_tokens(tokens, mask, key, max_new_tokens=answer)["tokens"])[0].tolist()
        return turn

    return {"jaxgpt": plain, "jaxgpt-session": session}


def torch_ways(cfg, params, answer: int):
    import torch

    from jaxgpt.io import torch_twin

    model = torch_twin.to_torch(params, cfg, attn_implementation="sdpa").eval()
    try:  # transformers >= 5.25 names it `cache` (`past_key_values` deprecated)
        from transformers.generation.utils import ALL_CACHE_NAMES  # noqa: F401
        name = "cache"
    except ImportError:
        name = "past_key_values"

    def run(ids, cache=None):
        ids = torch.as_tensor([ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer,
                                 min_new_tokens=answer, do_sample=False, use_cache=True, eos_token_id=None,
                                 pad_token_id=0, return_dict_in_generate=True, **{name: cache})
        return out.sequences[0, ids.shape[1]:].tolist(), getattr(out, name)

    def fresh():
        return lambda ids: run(ids)[0]

    def cached():
        state = {"cache": None}

        def turn(ids):
            new, state["cache"] = run(ids, state["cache"])
            return new
        return turn

    return {"transformers": fresh, "transformers-cache": cached}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama", choices=["llama", "qwen3", "gemma3"])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message", type=int, default=32, help="new tokens a turn (the user's message and headers)")
    p.add_argument("--answer", type=int, default=64, help="greedy tokens an answer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ways", default="jaxgpt,jaxgpt-session,transformers,transformers-cache")
    p.add_argument("--json")
    p.add_argument("--tiny", action="store_true", help="2 layers x 64 (a smoke test, seconds)")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    from families import CONFIGS
    from jaxgpt.config import load_config
    from jaxgpt.models import count_params, init_params

    tiny = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.mlp_dim=128",
            "model.head_size=16"] if args.tiny else []
    cfg = load_config(None, CONFIGS[args.family] + tiny + ["model.dropout=0.0"]).model
    if args.turns * (args.message + args.answer) > cfg.context_length:
        raise SystemExit(f"{args.turns} turns of {args.message} + {args.answer} tokens pass the context of "
                         f"{cfg.context_length}")
    torch.set_num_threads(os.cpu_count() or 1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    host = f"{cpu}, {os.cpu_count()} cores, {', '.join(isa) or 'no AVX2'}"
    # Scaled-up random weights: peaked logits, so greedy tokens do not hang on float noise.
    params = jax.tree.map(lambda x: x * 3.0, init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(1)
    messages = [rng.integers(0, cfg.vocab_size, args.message).tolist() for _ in range(args.turns)]
    fns = {**jax_ways(cfg, params, args.answer), **torch_ways(cfg, params, args.answer)}
    ways = args.ways.split(",")
    print(f"host: {host}; load {os.getloadavg()[0]:.2f}; {args.family} ({count_params(params) / 1e6:.0f}M), "
          f"{args.turns} turns of {args.message} new + {args.answer} answer tokens (last prompt "
          f"{args.turns * args.message + (args.turns - 1) * args.answer} tokens)", flush=True)
    first, totals, last, answers = {}, {w: [] for w in ways}, {w: [] for w in ways}, {}
    for way in ways:
        times, answers[way] = conversation(fns, way, messages, args.answer)
        first[way] = sum(times)
        print(f"  {way}: first conversation (compiling) {first[way]:.2f}s", flush=True)
    for r in range(args.rounds):
        for way in ways:
            times, _ = conversation(fns, way, messages, args.answer)
            totals[way].append(sum(times))
            last[way].append(times[-1])
            print(f"  {way}: round {r + 1}/{args.rounds}: {sum(times):.2f}s, last turn {times[-1]:.3f}s", flush=True)
    rows = {w: {"first_s": first[w], "conversation_s": statistics.median(totals[w]),
                "last_turn_s": statistics.median(last[w])} for w in ways}
    print("\n| way | first conversation, compiling (s) | conversation, median (s) | last turn, median (s) |")
    print("|---|---|---|---|")
    for w, row in rows.items():
        print(f"| {w} | {row['first_s']:.2f} | {row['conversation_s']:.2f} | {row['last_turn_s']:.3f} |")
    same = all(answers[w] == answers[ways[0]] for w in ways)
    print(f"\nGreedy answers, same weights: {'identical' if same else 'DIFFERENT'} over {args.turns} turns")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "family": args.family, "turns": args.turns,
                                               "message": args.message, "answer": args.answer, "rows": rows,
                                               "same_answers": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    from jaxgpt.cli.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # as train.py and finetune.py do (JAXGPT_HUGE_PAGES=0: 4 KiB pages)
    sys.exit(main())
