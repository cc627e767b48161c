"""Runs behind tests/test_mesh.py, in a process of its own with 8 fake CPU devices (the test
suite's other processes have 4): `python tests/mesh_runs.py OUT` writes OUT/result.json.

The same tiny model and data under every layout, 6 steps each, dropout 0: pmap replicas,
one device, mesh data=8, fsdp=8, data=2 x fsdp=2 x tensor=2; an fsdp=8 run stopped at step
3 and resumed with fsdp=4 on 4 devices and with pmap on 1 device; LoRA classification on
one device and fsdp=8; two GRPO updates on one device and on data=2 x fsdp=2 x tensor=2.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import load_config  # noqa: E402
from jaxgpt.engine.metrics import read_jsonl  # noqa: E402

MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.context_length=32", "model.dropout=0.0"]
PRETRAIN = MODEL + ["data.stride=16", "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=2",
                    "train.log_interval=1", "train.eval_interval=3", "train.sample_tokens=0", "train.lr=1e-3"]
LAYOUTS = {"one": ["train.num_devices=1"], "pmap": [], "data8": ["mesh.data=8"], "fsdp8": ["mesh.fsdp=8"],
           "d2f2t2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def params_of(run: Path):
    from jaxgpt.io.checkpoint import load_params

    return jax.tree_util.tree_leaves(load_params(run)[1])


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def pretraining(out: Path) -> dict:
    from jaxgpt.io.checkpoint import read_run_config
    from jaxgpt.tasks.pretrain import pretrain

    result = {}
    sets = PRETRAIN + [f"data.cache_dir={out / 'cache'}"]
    for name, extra in LAYOUTS.items():
        pretrain(load_config(None, sets + extra), out / name)
        result[name] = [r["train_loss"] for r in read_jsonl(out / name / "metrics.jsonl")]
    result["param_diff"] = {name: max_diff(params_of(out / name), params_of(out / "one")) for name in LAYOUTS}
    pretrain(load_config(None, sets + LAYOUTS["fsdp8"]), out / "stopped", stop_after=3)
    for name, extra in {"fsdp4": ["train.num_devices=4", "mesh.fsdp=4"],
                        "pmap1": ["train.num_devices=1", "mesh.fsdp=1"]}.items():
        run = out / f"resumed-{name}"
        shutil.copytree(out / "stopped", run)
        pretrain(read_run_config(run, extra), run, resume=True)
        result[f"resumed-{name}"] = [r["train_loss"] for r in read_jsonl(run / "metrics.jsonl")]
    return result


def lora_classification(out: Path) -> dict:
    from jaxgpt.tasks.classify import ClassifyConfig, finetune_classifier

    data = out / "spam.tsv"
    data.write_text("".join(f"{'spam' if i % 3 == 0 else 'ham'}\t{'win cash now' if i % 3 == 0 else 'see you'} {i}\n"
                            for i in range(48)))
    sets = MODEL + [f"data.path={data}", "train.batch_size=8", "train.epochs=2", "train.log_interval=1",
                    "finetune.train_mode=lora", "lora.rank=4", "model.dropout=0.0"]
    result = {}
    for name in ("one", "fsdp8"):
        finetune_classifier(load_config(None, sets + LAYOUTS[name], cls=ClassifyConfig), out / f"lora-{name}")
        result[f"lora-{name}"] = [r["train_loss"] for r in read_jsonl(out / f"lora-{name}" / "metrics.jsonl")
                                  if "train_loss" in r]
    return result


def grpo_updates(out: Path) -> dict:
    from jaxgpt.config import ModelConfig, TrainConfig
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.parallel import DataParallel, MeshParallel
    from jaxgpt.rl.grpo import grpo_loss_fn
    from jaxgpt.train.steps import create_train_state, train_step

    cfg = ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    tx = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0))
    rng = np.random.default_rng(0)
    rows, p, n = 16, 8, 8
    batch = {"tokens": rng.integers(0, 97, (rows, p + n)).astype(np.int32),
             "attention_mask": np.ones((rows, p + n), bool), "completion_mask": np.ones((rows, n), bool),
             "old_logprobs": np.full((rows, n), -4.5, np.float32), "ref_logprobs": np.full((rows, n), -4.6, np.float32),
             "advantages": rng.normal(size=rows).astype(np.float32)}
    loss_fn = grpo_loss_fn(GPT(cfg), clip_eps=0.2, clip_eps_high=None, kl_beta=0.05, loss_agg="sequence")
    result, final = {}, {}
    for name, layout in {"one": DataParallel(1), "d2f2t2": MeshParallel(2, 2, 2)}.items():
        placed = layout.place(create_train_state(params, tx), train_step, 1, loss_fn=loss_fn, tx=tx)
        result[f"grpo-{name}"] = [float(placed.update(batch, jax.random.key(1))["loss"]) for _ in range(2)]
        final[name] = jax.tree_util.tree_leaves(jax.device_get(placed.host()["params"]))
    result["grpo_param_diff"] = max_diff(final["one"], final["d2f2t2"])
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = {**pretraining(out), **lora_classification(out), **grpo_updates(out)}
    (out / "result.json").write_text(json.dumps(result))
