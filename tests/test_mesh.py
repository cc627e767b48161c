"""Sharded training over a device mesh (`jaxgpt.parallel.mesh`) gives the numbers of one
device and of pmap replicas, resumes onto another layout, and refuses bad meshes.

Tolerances: losses rel 1e-5; params abs 1e-5 (float32 reduction order; Adam turns the
~1e-9 noise of the key bias's zero gradient into ~1e-6 moves, as in test_train_step), but for
the few elements whose gradient is itself float noise (`_same_adam_params`)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.parallel.mesh import param_spec

ROOT = Path(__file__).resolve().parent.parent


def test_param_specs_shard_matrices_and_split_heads():
    from jax.sharding import PartitionSpec as P

    assert param_spec(("h_0", "attn", "c_attn", "kernel"), (768, 2304), fsdp=8, tensor=2) == P("fsdp", "tensor")
    assert param_spec(("h_0", "mlp", "c_proj", "kernel"), (3072, 768), fsdp=8, tensor=2) == P("tensor", "fsdp")
    assert param_spec(("h_0", "attn", "c_attn", "bias"), (2304,), fsdp=8, tensor=2) == P("tensor")
    assert param_spec(("wte", "embedding"), (50257, 768), fsdp=8, tensor=1) == P(None, "fsdp")  # 50257 is odd
    assert param_spec(("h_0", "ln_1", "scale"), (768,), fsdp=8, tensor=2) == P(None)  # small: replicated
    # AdamW's moments follow their parameter (their path ends with the parameter's).
    assert param_spec((0, "mu", "h_3", "mlp", "c_fc", "kernel"), (768, 3072), 4, 2) == P("fsdp", "tensor")


def test_mesh_update_equals_one_device():
    """Three updates with fsdp=2 x tensor=2 on the suite's 4 devices == one device."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.parallel import DataParallel, MeshParallel
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

    cfg = ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=128, dropout=0.0)
    params, tx = init_params(cfg, jax.random.key(0)), make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0))
    rng = np.random.default_rng(0)
    batches = [{k: rng.integers(0, 97, (8, 16)).astype(np.int32) for k in ("inputs", "targets")} for _ in range(3)]
    out = {}
    for name, layout in {"one": DataParallel(1), "mesh": MeshParallel(1, 2, 2)}.items():
        placed = layout.place(create_train_state(params, tx), train_step, 2, loss_fn=lm_loss_fn(GPT(cfg)), tx=tx)
        out[name] = ([float(placed.update(b, jax.random.key(1))["loss"]) for b in batches],
                     jax.device_get(placed.host()["params"]))
    assert "fsdp" in str(placed.state.params["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec)  # really sharded
    np.testing.assert_allclose(out["one"][0], out["mesh"][0], rtol=1e-5)
    jax.tree_util.tree_map(_same_adam_params, out["one"][1], out["mesh"][1])


def test_bf16_compute_under_a_mesh_and_remat_matches_one_device():
    """bfloat16 compute (on CPU: the bf16 dense matmuls with loop-carried backward operands,
    `jaxgpt.models.matmuls`) partitioned fsdp=2 x tensor=2, with and without `model.remat`:
    two updates' losses equal one device's within bf16 rounding."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.parallel import DataParallel, MeshParallel
    from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step

    cfg = ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=128, dropout=0.0)
    params, tx = init_params(cfg, jax.random.key(0)), make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0))
    rng = np.random.default_rng(0)
    batches = [{k: rng.integers(0, 97, (8, 16)).astype(np.int32) for k in ("inputs", "targets")} for _ in range(2)]
    for remat in (False, True):
        model = GPT(dataclasses.replace(cfg, dtype="bfloat16", remat=remat))
        losses = {}
        for name, layout in {"one": DataParallel(1), "mesh": MeshParallel(1, 2, 2)}.items():
            placed = layout.place(create_train_state(params, tx), train_step, 2, loss_fn=lm_loss_fn(model), tx=tx)
            losses[name] = [float(placed.update(b, jax.random.key(1))["loss"]) for b in batches]
        assert losses["one"][-1] < losses["one"][0]
        np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-3)


def _same_adam_params(a, b):
    """Params after a few AdamW steps at lr 1e-3 from the same start: abs 1e-5 everywhere but
    on a few elements whose gradient is float noise (Adam's first steps move every element by
    ~lr whatever its gradient's size, so one with a gradient of ~1e-8, at Adam's eps, moves by
    an amount the reduction order decides: seen 1.2e-5); those within 1e-4, a tenth of one
    step. A layout bug moves many elements by ~lr."""
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() < 1e-4 and (diff > 1e-5).mean() < 1e-3, (diff.max(), (diff > 1e-5).sum(), diff.size)


@pytest.mark.slow
def test_every_layout_on_8_devices_gives_the_same_run(tmp_path):
    """pmap, one device, mesh data=8 / fsdp=8 / 2x2x2 pretraining; resume onto fsdp=4 and
    onto pmap on 1 device; LoRA classification; GRPO updates (tests/mesh_runs.py)."""
    done = subprocess.run([sys.executable, "tests/mesh_runs.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    for name in ("pmap", "data8", "fsdp8", "d2f2t2", "resumed-fsdp4", "resumed-pmap1"):
        assert len(r[name]) == 6
        np.testing.assert_allclose(r[name], r["one"], rtol=1e-5, err_msg=name)
    assert max(r["param_diff"].values()) < 1e-5
    np.testing.assert_allclose(r["lora-fsdp8"], r["lora-one"], rtol=1e-5)
    np.testing.assert_allclose(r["grpo-d2f2t2"], r["grpo-one"], rtol=1e-5)
    assert r["grpo_param_diff"] < 1e-5


@pytest.mark.parametrize("sets, words", [
    (["mesh.data=3"], "mesh.data x mesh.fsdp x mesh.tensor = 3 x 1 x 1 = 3, but there are 4 devices"),
    (["mesh.fsdp=-1", "mesh.tensor=3"], "do not split by 3"),
    (["mesh.fsdp=2", "mesh.tensor=2", "model.n_head=1"], "mesh.tensor=2 must divide model.n_head=1"),
    (["mesh.data=4", "train.batch_size=6"], "divisible by mesh.data x mesh.fsdp"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "one of them may be -1"),
])
def test_bad_meshes_exit_2_before_anything_is_written(tmp_path, capsys, sets, words):
    import train

    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32", "train.batch_size=8",
            f"data.cache_dir={tmp_path / 'cache'}"]
    argv = ["--out", str(tmp_path / "run")] + [a for s in tiny + sets for a in ("--set", s)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_grpo_rollouts_and_lora_under_a_mesh(tmp_path, monkeypatch):
    """Sampling, rollouts, greedy evaluation and LoRA merging with sharded params (fsdp 2 x
    tensor 2): the first update's loss is the one-device run's, and its run exports to HF."""
    import finetune
    from jaxgpt.cli.export import main as export_main
    from jaxgpt.rl.tasks import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, c, p: float(len(c) % 2))  # a random model never solves one
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=128", "model.context_length=64",
            "rollout.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=12", "rollout.eval_batch_size=8",
            "data.eval_size=8", "train.max_steps=2", "train.log_interval=1", "train.eval_interval=2",
            "finetune.train_mode=lora", "lora.rank=2"]
    records = {}
    for name, extra in {"one": ["train.num_devices=1"], "mesh": ["mesh.fsdp=2", "mesh.tensor=2"]}.items():
        argv = ["grpo", "--out", str(tmp_path / name)] + [a for s in tiny + extra for a in ("--set", s)]
        assert finetune.main(argv) == 0
        records[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert records["mesh"][0]["reward"] == records["one"][0]["reward"]  # the same rollouts
    assert records["mesh"][0]["loss"] == pytest.approx(records["one"][0]["loss"], rel=1e-4, abs=1e-6)
    assert "eval_accuracy" in records["mesh"][-1]
    assert export_main(["--init", str(tmp_path / "mesh"), "--to-hf", str(tmp_path / "hf")]) == 0
