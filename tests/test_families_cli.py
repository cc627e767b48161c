"""Llama 3, Qwen3 and Gemma 3 through every stage from the command line, on tiny configs: pretraining
from scratch (`--set model.family=...`) with an exact `--resume`, classification (full,
last-block, LoRA), instruction SFT (with a tokenizer and chat template made here: 70,000 ids,
so the token files are uint32), reward model, DPO, GRPO and PPO; a mesh (fsdp and tensor,
tensor splitting the KV heads where it divides them) equal to one device; blockwise and xla
attention with grouped K/V equal to the reference. The whole chain per family is `slow`."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig, TrainConfig, load_config
from jaxgpt.engine.metrics import read_jsonl
from tests.test_chat import CHATML, chat_folder
from tests.test_classify import _write_csv
from tests.test_dpo import write_pairs
from tests.test_instruct import _write_jsonl

FAMILIES = ("llama", "qwen3", "gemma3")
SHAPE = ["model.n_layer=1", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=32", "model.mlp_dim=48"]
# Qwen3's head_dim != n_embd / n_head; Gemma 3's first layer attends within 8 slots, its second globally
OWN = {"qwen3": ["model.head_size=16"], "llama": [],
       "gemma3": ["model.head_size=16", "model.n_layer=2", "model.sliding_window=8", "model.sliding_window_pattern=2"]}
WINDOW = {"gemma3": dict(sliding_window=8, sliding_window_pattern=2)}


def _sets(*items):
    return [a for s in items for a in ("--set", s)]


def _main(script, argv):
    import finetune
    import train

    return (train if script == "train" else finetune).main([str(a) for a in argv])


def _model(family, **kw):
    return ModelConfig(**{**dict(family=family, qkv_bias=False, vocab_size=97, context_length=32, n_layer=2, n_head=4,
                                 n_kv_head=2, n_embd=32, mlp_dim=48, dropout=0.0), **WINDOW.get(family, {}), **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_pretraining_from_scratch_resumes_exactly(tmp_path, family):
    """`train.py --set model.family=F`: a run stopped after 4 steps and resumed ends where the
    straight run ends (train and val loss equal as strings)."""
    sets = _sets(f"model.family={family}", *SHAPE, *OWN[family], "model.context_length=32", "train.max_steps=8",
                 "train.eval_interval=4", "train.batch_size=4", "train.sample_tokens=4", "train.warmup_steps=2",
                 f"data.cache_dir={tmp_path / 'cache'}")
    assert _main("train", ["--out", tmp_path / "straight", *sets]) == 0
    from jaxgpt.tasks.pretrain import pretrain

    cfg = load_config(tmp_path / "straight" / "config.yaml")
    assert cfg.model.family == family and not cfg.model.qkv_bias  # the family's defaults
    pretrain(cfg, tmp_path / "split", stop_after=4)
    assert _main("train", ["--resume", tmp_path / "split"]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("straight", "split"))
    assert (repr(a["train_loss"]), repr(a["val_loss"])) == (repr(b["train_loss"]), repr(b["val_loss"]))


def test_qwen3_sft_with_a_chat_template_and_uint32_tokens(tmp_path):
    """Instruction SFT of a Qwen3 whose tokenizer (70,000 ids) and ChatML template are the
    test's own: prompts are the template's, the loss covers the response and the token the
    template ends an answer with (`<|im_end|>`; the eos is `<|end|>`), and the run keeps a copy of the tokenizer (generation after the folder is
    gone still works)."""
    from jaxgpt.cli import generate as cli
    from jaxgpt.tasks.instruct import InstructConfig, load_instruct_run

    folder = chat_folder(tmp_path, CHATML, n_words=70_000)
    words = [f"w{i}" for i in range(60_000, 60_010)]
    rows = [{"instruction": f"w1 {words[i % 10]}", "output": f"{words[i % 10]} {words[(i + 1) % 10]}"}
            for i in range(24)]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["instruct", "--data", data, "--out", tmp_path / "sft", *_sets(
        "model.family=qwen3", *SHAPE, "model.head_size=16", "model.vocab_size=70016", f"model.tokenizer={folder}",
        "model.context_length=48", "train.epochs=1", "train.batch_size=4", "data.val_fraction=0.2",
        "data.test_fraction=0.2", "generate.max_new_tokens=4", "generate.batch_size=4")]
    assert _main("finetune", argv) == 0
    cfg, params = load_instruct_run(tmp_path / "sft")
    assert cfg.model.tokenizer.endswith("tokenizer") and Path(cfg.model.tokenizer, "tokenizer.json").is_file()
    from jaxgpt.data.instruct import encode_split
    from jaxgpt.text.prompts import prompt_format
    from jaxgpt.text.tokenizer import load_tokenizer

    tok = load_tokenizer(str(folder))
    prompt = prompt_format(tok).prompt("w1 w60000")
    assert prompt == "<|im_start|>user\nw1 w60000<|im_end|>\n<|im_start|>assistant\n"
    enc = encode_split([{"instruction": "w1 w60000", "output": "w60000"}], 48, tok)
    assert enc.seqs[0].tolist() == tok.encode(prompt) + tok.encode("w60000") + [tok.special_tokens["<|im_end|>"]]
    assert enc.prompt_lengths[0] == len(tok.encode(prompt)) and max(enc.seqs[0]) > 65_536
    import shutil

    shutil.rmtree(folder)  # the run has its own copy
    assert cli.main(["--init", str(tmp_path / "sft"), "--instruction", "w1 w60003", "--max-new-tokens", "3"]) == 0
    assert InstructConfig  # noqa: B018  (the task's config class loads the run: above)


@pytest.mark.parametrize("family, kv, tensor", [("llama", 2, 2), ("qwen3", 1, 2)])  # gemma3: llama's axes
def test_a_mesh_update_equals_one_device(family, kv, tensor):
    """Three updates on fsdp 2 x tensor 2 (4 devices) == one device. With kv=2 the k/v
    projections split over tensor by whole heads; with kv=1 they stay whole on each device."""
    from jaxgpt.models import build_model, init_params
    from jaxgpt.parallel import DataParallel, MeshParallel
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step
    from tests.test_mesh import _same_adam_params

    cfg = _model(family, n_kv_head=kv, n_embd=64, mlp_dim=64)
    params, tx = init_params(cfg, jax.random.key(0)), make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0))
    rng = np.random.default_rng(0)
    batches = [{k: rng.integers(0, 97, (8, 16)).astype(np.int32) for k in ("inputs", "targets")} for _ in range(3)]
    out = {}
    for name, layout in {"one": DataParallel(1), "mesh": MeshParallel(1, 2, tensor, model=cfg)}.items():
        placed = layout.place(create_train_state(params, tx), train_step, 2, loss_fn=lm_loss_fn(build_model(cfg)), tx=tx)
        out[name] = ([float(placed.update(b, jax.random.key(1))["loss"]) for b in batches],
                     jax.device_get(placed.host()["params"]))
    spec = lambda n: str(placed.state.params["layers_0"]["self_attn"][n]["kernel"].sharding.spec)  # noqa: E731
    assert "tensor" in spec("q_proj") and ("tensor" in spec("k_proj")) == (kv % tensor == 0)
    np.testing.assert_allclose(out["one"][0], out["mesh"][0], rtol=1e-5)
    jax.tree_util.tree_map(_same_adam_params, out["one"][1], out["mesh"][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_and_xla_attention_equal_the_reference(family):
    """Logits and gradients of the whole model with grouped K/V: blockwise (padded, cached
    and causal paths) and xla equal the reference (float32, 1e-5)."""
    import dataclasses

    from jaxgpt.models import build_model, init_params

    cfg = _model(family, n_kv_head=1)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 97)
    mask = jnp.arange(24)[None] < jnp.array([[24], [17]])

    def run(kind):
        model = build_model(dataclasses.replace(cfg, attention=kind))
        loss = lambda p, m: model.apply({"params": p}, tokens, attention_mask=m).sum()  # noqa: E731
        return [jax.value_and_grad(loss)(params, m) for m in (None, mask)]

    want = jax.jit(lambda: run("reference"))()
    for kind in ("blockwise", "xla"):
        got = jax.jit(lambda k=kind: run(k))()
        for (wv, wg), (gv, gg) in zip(want, got):
            np.testing.assert_allclose(gv, wv, rtol=1e-5)
            # absolute tolerance on each leaf's scale: Gemma's embedding gradients are sqrt(n_embd) larger
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max()))), gg, wg)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_from_the_command_line(tmp_path, family):
    """pretrain -> classify (full, last-block, LoRA) -> instruct SFT -> reward -> DPO -> PPO and
    GRPO from the SFT run, each through finetune.py on a tiny model of the family; LoRA's
    default targets are the family's q, k, v, o, gate, up and down projections."""
    from jaxgpt.io.checkpoint import load_params

    model = [f"model.family={family}", *SHAPE, *OWN[family], "model.context_length=64"]
    pre = tmp_path / "pre"
    assert _main("train", ["--out", pre, *_sets(*model, "train.max_steps=2", "train.eval_interval=2",
                                                "train.batch_size=4", "train.sample_tokens=0",
                                                f"data.cache_dir={tmp_path / 'cache'}")]) == 0
    csv = _write_csv(tmp_path / "c.csv")
    small = ["train.batch_size=4", "train.epochs=1", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    for mode in ("full", "last-block", "lora"):
        argv = ["classify", "--init", pre, "--data", csv, "--train-mode", mode, "--out", tmp_path / f"cls-{mode}"]
        assert _main("finetune", argv + _sets(*small, "lora.rank=2")) == 0
    from jaxgpt.tasks.classify import ClassifyConfig

    _, lora_params = load_params(tmp_path / "cls-lora", config_cls=ClassifyConfig)
    adapted = {k for k, v in lora_params["layers_0"]["self_attn"].items() if "lora_a" in v}
    adapted |= {k for k, v in lora_params["layers_0"]["mlp"].items() if "lora_a" in v}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert _main("finetune", ["instruct", "--init", pre, "--data", _write_jsonl(tmp_path / "i.jsonl", 24), "--out", sft,
                              *_sets(*small, "generate.max_new_tokens=4", "generate.batch_size=4")]) == 0
    pairs = write_pairs(tmp_path / "p.jsonl", 20)
    pair_sets = ["train.batch_size=4", "train.epochs=1", "data.val_fraction=0.2", "data.test_fraction=0.2",
                 "data.bucket=0"]
    assert _main("finetune", ["reward", "--init", sft, "--data", pairs, "--out", rm, *_sets(*pair_sets)]) == 0
    assert _main("finetune", ["dpo", "--init", sft, "--data", pairs, "--out", tmp_path / "dpo", *_sets(
        *pair_sets, "dpo.num_responses=1", "dpo.max_new_tokens=4")]) == 0
    rl = ["rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "rollout.eval_batch_size=4", "data.eval_size=4",
          "train.max_steps=2", "train.eval_interval=2", "train.log_interval=1", "train.num_devices=1"]
    assert _main("finetune", ["ppo", "--init", sft, "--reward", rm, "--data", _write_jsonl(tmp_path / "q.jsonl", 24),
                              "--out", tmp_path / "ppo", *_sets(*rl)]) == 0
    assert _main("finetune", ["grpo", "--init", sft, "--task", "arithmetic", "--out", tmp_path / "grpo",
                              *_sets(*rl, "grpo.group_size=2", "rollout.max_new_tokens=12")]) == 0
    for run in ("cls-full", "sft", "rm", "dpo", "ppo", "grpo"):
        summary = json.loads((tmp_path / run / "metrics.json").read_text())
        assert summary["total_params"] > 0, run
        assert read_jsonl(tmp_path / run / "metrics.jsonl"), run
