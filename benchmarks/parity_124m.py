#!/usr/bin/env python
"""Training parity at 124M with the book's PyTorch model, and the book's ch05 run itself.

Two modes (results printed and, with `--json`, written as JSON):

`--mode parity` (default): jaxgpt against two PyTorch models it did not write, from the
same initial weights, fed the same batches, with dropout 0 and the same optimiser:

* `hf`: Hugging Face `GPT2LMHeadModel` via `jaxgpt.io.torch_twin` (qkv bias zero and frozen);
* `book`: the book's own `GPTModel` (`llms_from_scratch.ch04`, `pip install --no-deps
  llms-from-scratch`; its declared dependencies pull TensorFlow), weights mapped by
  `book_state_dict` / `params_from_book` below.

The shape is the book's GPT_CONFIG_124M (12 x 768, context 256, untied head, no qkv bias).
The initial weights are the book's: `torch.manual_seed(seed)` then `GPTModel(cfg)` (without
llms-from-scratch: jaxgpt's `model.init=torch-default`). Batches are `configs/book/ch05.yaml`'s
(jaxgpt's data pipeline, batch 2 x 256 of The Verdict). Optimiser: AdamW lr 4e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 0.1 on jaxgpt's decay set (matrices and embeddings)
in every framework, constant lr, no clipping. Before training, logits are compared (dropout
off) and weights are moved both ways; then each step's loss is recorded and compared:
`rel = |loss_jaxgpt - loss_ref| / loss_ref`. `hf` vs `book` (torch against torch) is the
float32 noise floor that jaxgpt's differences should be read against.

`--mode book-ch05`: the book's chapter-5 training run, with the book's own code
(`create_dataloader_v1`, `GPTModel`, `train_model_simple`, `calc_loss_loader`): 90% of the
*characters* for training, `torch.manual_seed(123)` before the loaders and again before the
model, AdamW(lr 4e-4, weight decay 0.1 on *all* parameters), dropout 0.1, 10 epochs, eval
every 5 steps over 5 batches. The BPE comes from `jaxgpt.text.gpt2_bpe` (the same tiktoken
encoding, offline). `--init gpt2` starts the book's model from jaxgpt's default GPT-2 init
instead, and `--decay matrices` decays only jaxgpt's decay set: the two differences between
the projects, tried one at a time inside the book's own loop. The final model is also
scored on jaxgpt's val windows (a token split) and on every train window in eval mode.

    python benchmarks/parity_124m.py --steps 90 --json parity.json
    python benchmarks/parity_124m.py --mode book-ch05 --json book.json [--init gpt2] [--decay matrices]
    python benchmarks/parity_124m.py --n-layer 2 --n-embd 64 --n-head 4 --steps 5   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxgpt, not another installed copy

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import traverse_util  # noqa: E402

from jaxgpt.io import torch_twin  # noqa: E402
from jaxgpt.config import load_config, replace  # noqa: E402

CH05 = REPO / "configs" / "book" / "ch05.yaml"


# ---------------------------------------------------------------------------------------
# The book's GPTModel <-> jaxgpt params


def book_config(cfg) -> dict:
    """The book's GPT_CONFIG_124M-style dict for a jaxgpt ModelConfig (untied, no qkv bias)."""
    assert not cfg.tie_embeddings and not cfg.qkv_bias, "the book's GPTModel: untied head, no qkv bias"
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.n_embd,
            "n_heads": cfg.n_head, "n_layers": cfg.n_layer, "drop_rate": cfg.dropout, "qkv_bias": False}


def book_state_dict(params, cfg) -> dict[str, torch.Tensor]:
    """jaxgpt params -> the book's GPTModel state dict. nn.Linear weights are `[out, in]`
    (jaxgpt kernels transposed); c_attn's q|k|v output blocks become W_query/W_key/W_value."""
    p = torch_twin.numpy_params(params)
    t = lambda a: torch.tensor(np.ascontiguousarray(a))
    d = cfg.n_embd
    out = {"tok_emb.weight": t(p["wte"]["embedding"]), "pos_emb.weight": t(p["wpe"]["embedding"]),
           "final_norm.scale": t(p["ln_f"]["scale"]), "final_norm.shift": t(p["ln_f"]["bias"]),
           "out_head.weight": t(p["lm_head"]["kernel"].T)}
    for i in range(cfg.n_layer):
        h, b = p[f"h_{i}"], f"trf_blocks.{i}."
        qkv = h["attn"]["c_attn"]["kernel"]
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[f"{b}att.{name}.weight"] = t(qkv[:, j * d:(j + 1) * d].T)
        for src, dst in (("attn/c_proj", "att.out_proj"), ("mlp/c_fc", "ff.layers.0"), ("mlp/c_proj", "ff.layers.2")):
            a, m = src.split("/")
            out[f"{b}{dst}.weight"] = t(h[a][m]["kernel"].T)
            out[f"{b}{dst}.bias"] = t(h[a][m]["bias"])
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{b}{dst}.scale"], out[f"{b}{dst}.shift"] = t(h[src]["scale"]), t(h[src]["bias"])
    return out


def params_from_book(model, cfg):
    """The book's GPTModel -> jaxgpt params (inverse of `book_state_dict`)."""
    s = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    flat = {("wte", "embedding"): s["tok_emb.weight"], ("wpe", "embedding"): s["pos_emb.weight"],
            ("ln_f", "scale"): s["final_norm.scale"], ("ln_f", "bias"): s["final_norm.shift"],
            ("lm_head", "kernel"): s["out_head.weight"].T}
    for i in range(cfg.n_layer):
        b, h = f"trf_blocks.{i}.", f"h_{i}"
        flat[(h, "attn", "c_attn", "kernel")] = np.concatenate(
            [s[f"{b}att.{n}.weight"].T for n in ("W_query", "W_key", "W_value")], axis=1)
        for dst, src in (("attn/c_proj", "att.out_proj"), ("mlp/c_fc", "ff.layers.0"), ("mlp/c_proj", "ff.layers.2")):
            a, m = dst.split("/")
            flat[(h, a, m, "kernel")] = s[f"{b}{src}.weight"].T
            flat[(h, a, m, "bias")] = s[f"{b}{src}.bias"]
        for dst, src in (("ln_1", "norm1"), ("ln_2", "norm2")):
            flat[(h, dst, "scale")], flat[(h, dst, "bias")] = s[f"{b}{src}.scale"], s[f"{b}{src}.shift"]
    params = traverse_util.unflatten_dict({k: jnp.asarray(np.ascontiguousarray(v)) for k, v in flat.items()})
    from jaxgpt.io.hf_load import check_params

    check_params(params, cfg, "book GPTModel")
    return params


def book_model(cfg, params=None):
    from llms_from_scratch.ch04 import GPTModel

    model = GPTModel(book_config(cfg))
    if params is not None:
        missing, unexpected = model.load_state_dict(book_state_dict(params, cfg), strict=False)
        assert not unexpected and all(k.endswith("att.mask") for k in missing), (missing, unexpected)
    return model


def have_book() -> bool:
    try:
        import llms_from_scratch.ch04  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------
# Step parity


def ch05_config(args, dropout: float):
    over = [f"model.dropout={dropout}"]
    if args.n_layer:
        over += [f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}", f"model.n_embd={args.n_embd}"]
    return load_config(CH05, over)


def max_abs_tree(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def run_parity(args) -> dict:
    import functools

    from jaxgpt.data import pretraining_data
    from jaxgpt.models import build_model, init_params
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

    cfg = ch05_config(args, dropout=0.0)
    m, t = cfg.model, replace(cfg, train={"max_steps": args.steps}).train
    refs = [r for r in args.refs.split(",") if r]
    if "book" in refs and not have_book():
        print("llms-from-scratch is not installed: skipping the book's GPTModel "
              "(pip install --no-deps llms-from-scratch)")
        refs.remove("book")
    if have_book():  # the book's own init: torch.manual_seed, then GPTModel(cfg)
        torch.manual_seed(args.seed)
        params = params_from_book(book_model(m), m)
        init = f"the book's GPTModel after torch.manual_seed({args.seed})"
    else:
        params = init_params(m, jax.random.key(args.seed))
        init = f"jaxgpt model.init={m.init}, seed {args.seed}"
    data = pretraining_data(cfg)
    batches = [data.train_batch(i) for i in range(args.steps)]

    models = {"hf": lambda: torch_twin.to_torch(params, m), "book": lambda: book_model(m, params)}
    torch_models = {r: models[r]() for r in refs}
    out = {"init": init, "steps": args.steps, "shape": f"{m.n_layer}x{m.n_embd}, context {m.context_length}",
           "batch": f"{t.batch_size} x {data.context_length}", "checks": {}}

    # Logits (dropout off) and weights both ways, before training.
    probe = batches[0]["inputs"]
    ref_logits = np.asarray(build_model(m).apply({"params": params}, jnp.asarray(probe)))
    for r, tm in torch_models.items():
        tm.eval()
        with torch.no_grad():
            lg = tm(torch.as_tensor(probe, dtype=torch.long))
            lg = (lg.logits if r == "hf" else lg).numpy()
        back = torch_twin.from_torch(tm, m) if r == "hf" else params_from_book(tm, m)
        out["checks"][r] = {"logits_max_abs_diff": float(np.max(np.abs(lg - ref_logits))),
                            "logits_std": float(ref_logits.std()),
                            "weights_back_max_abs_diff": max_abs_tree(params, back)}
        print(f"{r}: logits max |diff| {out['checks'][r]['logits_max_abs_diff']:.2e} "
              f"(logit std {ref_logits.std():.2f}); torch -> jaxgpt weights max |diff| "
              f"{out['checks'][r]['weights_back_max_abs_diff']:.1e}")
        tm.train()

    decay = torch_twin.decay_names(params)
    hf_to_book = {"transformer.wte.weight": "tok_emb.weight", "transformer.wpe.weight": "pos_emb.weight",
                  "lm_head.weight": "out_head.weight"}
    opts = {}
    for r, tm in torch_models.items():
        if r == "hf":
            opts[r] = torch_twin.torch_adamw(tm, params, t)
        else:  # the same decay set under the book's names: every 2-d weight
            names = {n for n, p in tm.named_parameters() if p.ndim >= 2}
            assert len(names) == len(decay) + 2 * m.n_layer  # c_attn is three Linears in the book
            assert set(hf_to_book.values()) <= names
            opts[r] = torch_twin.torch_adamw(tm, params, t, decay=names)
    tx = make_optimizer(t)
    state = create_train_state(params, tx)
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(build_model(m)), tx=tx))
    key = jax.random.key(0)
    losses = {"jaxgpt": [], **{r: [] for r in torch_models}}
    times = {k: 0.0 for k in losses}
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = step(state, {k: v[None] for k, v in b.items()}, key)
        losses["jaxgpt"].append(float(metrics["loss"]))
        times["jaxgpt"] += time.perf_counter() - t0
        for r, tm in torch_models.items():
            t0 = time.perf_counter()
            opts[r].zero_grad(set_to_none=True)
            if r == "hf":
                loss = torch_twin.torch_lm_loss(tm, b["inputs"], b["targets"])
            else:
                from llms_from_scratch.ch05 import calc_loss_batch

                loss = calc_loss_batch(torch.as_tensor(b["inputs"], dtype=torch.long),
                                       torch.as_tensor(b["targets"], dtype=torch.long), tm, "cpu")
            loss.backward()
            opts[r].step()
            losses[r].append(loss.item())
            times[r] += time.perf_counter() - t0
        rel = {r: abs(losses["jaxgpt"][-1] - losses[r][-1]) / losses[r][-1] for r in torch_models}
        print(f"step {i + 1:3d}  " + "  ".join(f"{k} {v[-1]:.5f}" for k, v in losses.items())
              + "  " + "  ".join(f"rel[{r}] {v:.1e}" for r, v in rel.items()), flush=True)
    out["losses"] = losses
    out["seconds"] = times
    pairs = [("jaxgpt", r) for r in torch_models] + ([("hf", "book")] if len(torch_models) == 2 else [])
    out["rel_diff"] = {}
    for a, b in pairs:
        rel = [abs(x - y) / y for x, y in zip(losses[a], losses[b])]
        out["rel_diff"][f"{a}_vs_{b}"] = {"per_step": rel, "max": max(rel),
                                          "max_first_20": max(rel[:20]), "final": rel[-1]}
        print(f"{a} vs {b}: max rel diff {max(rel):.2e} (first 20 steps {max(rel[:20]):.2e}, final {rel[-1]:.2e})")
    return out


# ---------------------------------------------------------------------------------------
# The book's ch05 run, with the book's own code


def run_book_ch05(args) -> dict:
    from unittest import mock

    import llms_from_scratch.ch02 as ch02
    from llms_from_scratch.ch05 import calc_loss_loader, train_model_simple

    from jaxgpt.data import bundled as datasets

    from jaxgpt.text import gpt2_bpe as tokenizer
    from jaxgpt.data import pretraining_data
    from jaxgpt.models import init_params

    cfg = ch05_config(args, dropout=0.1)
    m = cfg.model
    enc = tokenizer.get_encoding()  # tiktoken's "gpt2" encoding, built offline
    text = datasets.bundled_path("the-verdict").read_text(encoding="utf-8")
    split_idx = int(0.90 * len(text))
    ctx = m.context_length
    with mock.patch.object(ch02.tiktoken, "get_encoding", lambda name: enc):
        torch.manual_seed(123)
        train_loader = ch02.create_dataloader_v1(text[:split_idx], batch_size=2, max_length=ctx, stride=ctx,
                                                 drop_last=True, shuffle=True, num_workers=0)
        val_loader = ch02.create_dataloader_v1(text[split_idx:], batch_size=2, max_length=ctx, stride=ctx,
                                               drop_last=False, shuffle=False, num_workers=0)
    torch.manual_seed(123)
    model = book_model(m)
    if args.init == "gpt2":  # jaxgpt's default init, moved into the book's model
        model = book_model(m, init_params(replace(cfg, model={"init": "gpt2"}).model, jax.random.key(args.seed)))
    params = list(model.named_parameters())
    if args.decay == "all":  # the book: AdamW(model.parameters(), weight_decay=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    else:  # jaxgpt's decay set
        optimizer = torch.optim.AdamW([{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": 0.1},
                                       {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}],
                                      lr=4e-4)
    t0 = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=10, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=enc)
    seconds = time.perf_counter() - t0
    model.eval()
    data = pretraining_data(cfg)  # jaxgpt's windows: val = the last 10% of the *tokens*

    def jaxgpt_windows_loss(batches) -> float:
        total = count = 0.0
        with torch.no_grad():
            for b in batches:
                logits = model(torch.as_tensor(b["inputs"], dtype=torch.long))
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                       torch.as_tensor(b["targets"], dtype=torch.long).flatten(),
                                                       reduction="none")
                mask = torch.as_tensor(b["mask"]).flatten()
                total += float((ce * mask).sum())
                count += float(mask.sum())
        return total / count

    with torch.no_grad():
        final = {"train_all_windows_book_loader": calc_loss_loader(train_loader, model, "cpu"),
                 "val_book_split": calc_loss_loader(val_loader, model, "cpu")}
    final["val_jaxgpt_token_split"] = jaxgpt_windows_loss(data.val_batches())
    final["train_all_windows_jaxgpt"] = jaxgpt_windows_loss(data.train_eval_batches(10 ** 6))
    steps = [5 * i for i in range(len(train_losses))]  # the book's global_step (0-based)
    print(f"book ch05 (init {args.init}, decay {args.decay}): step {steps[-1]} train {train_losses[-1]:.3f} "
          f"val {val_losses[-1]:.3f}; after training: {json.dumps({k: round(v, 3) for k, v in final.items()})}; "
          f"{seconds:.0f} s")
    return {"init": args.init, "decay": args.decay, "book_step": steps, "updates_done": [s + 1 for s in steps],
            "tokens_seen": tokens_seen, "train_loss": train_losses, "val_loss": val_losses, "final": final,
            "train_windows": len(train_loader.dataset), "val_windows": len(val_loader.dataset), "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("parity", "book-ch05"), default="parity")
    p.add_argument("--steps", type=int, default=90, help="parity: optimiser steps")
    p.add_argument("--refs", default="hf,book", help="parity: torch models to compare (hf, book)")
    p.add_argument("--seed", type=int, default=123, help="torch.manual_seed of the initial weights")
    p.add_argument("--init", choices=("book", "gpt2"), default="book", help="book-ch05: initial weights")
    p.add_argument("--decay", choices=("all", "matrices"), default="all", help="book-ch05: parameters decayed")
    p.add_argument("--n-layer", type=int, default=0, help="smaller shape for a smoke test (with --n-embd, --n-head)")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    machine = {"cpu": cpu, "cores": cores, "avx512f": "avx512f" in Path("/proc/cpuinfo").read_text(),
               "jax": jax.__version__, "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}
    print(json.dumps(machine))
    t0 = time.perf_counter()
    result = run_parity(args) if args.mode == "parity" else run_book_ch05(args)
    result.update(machine=machine, wall_seconds=time.perf_counter() - t0, command=" ".join(sys.argv))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
