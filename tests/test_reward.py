"""Reward model: the Bradley-Terry loss against closed forms, preference data (split, prompt
format, masks, batches), scores at the last real token, finetune.py reward end to end, the
PPO-facing API (load_reward_model / reward_scores), the scoring CLI, LoRA + resume, bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig, load_config
from jaxgpt.data.preference import PreferenceDataConfig, encode_example, load_preference, split_indices
from jaxgpt.errors import UserError
from jaxgpt.train.preference_losses import pairwise_loss, preference_sums
from jaxgpt.text.gpt2_bpe import EOT_ID, decode
from tests.cli_helpers import assert_refused, init_sets, run_finetune

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(context_length=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=64", "model.dropout=0.1",
        "train.batch_size=4", "train.epochs=3", "train.warmup_steps=1", "train.log_interval=1", "train.lr=3e-3",
        "data.val_fraction=0.2", "data.test_fraction=0.2", "data.bucket=0"]


def write_pairs(path: Path, n: int = 20) -> Path:
    rows = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else "numbers", "chosen": f"Sure, it is {2 * i}.",
             "rejected": f"Go away, {i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Pure loss


def test_pairwise_loss_closed_form():
    rc, rr = np.array([0.0, 2.0, 1.0, -100.0, 30.0]), np.array([0.0, 0.0, 3.0, 0.0, 0.0])
    expect = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2)), 100.0, math.log1p(math.exp(-30))]
    np.testing.assert_allclose(pairwise_loss(rc, rr), expect, rtol=1e-6)
    g = jax.grad(lambda a: pairwise_loss(a, 0.5))(2.0)  # d/dr_c = -sigmoid(r_r - r_c)
    assert float(g) == pytest.approx(-1 / (1 + math.exp(1.5)), rel=1e-5)
    loss_sum, sums = preference_sums(pairwise_loss(rc[:3], rr[:3]), rc[:3], rr[:3], np.array([1.0, 1.0, 0.0]))
    assert float(loss_sum) == pytest.approx(expect[0] + expect[1], rel=1e-6)
    assert {k: float(v) for k, v in sums.items()} == pytest.approx(
        {"count": 2.0, "correct": 1.0, "margin": 2.0, "chosen_reward": 2.0, "rejected_reward": 0.0})


# ---------------------------------------------------------------------------------------
# Data


def test_bundled_preference_data_split_format_and_batches():
    from jaxgpt.text.prompts import format_prompt

    data = load_preference(PreferenceDataConfig(), 128)
    assert data.num_read == 1100 and {s: len(data.splits[s]) for s in ("train", "val", "test")} == \
        {"train": 935, "val": 55, "test": 110}
    parts = split_indices(1100, 0.05, 0.1, 123)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(1100))
    assert data.splits["test"].columns["record"].tolist() == parts["test"].tolist()
    assert not np.array_equal(split_indices(1100, 0.05, 0.1, 7)["test"], parts["test"])
    split = data.splits["val"]
    for i in (0, 17):
        rec, c = split.records[i], split.columns
        p = int(c["prompt_lengths"][i])
        assert decode(c["chosen"][i, :p]) == format_prompt(rec["instruction"], rec["input"])
        for k in ("chosen", "rejected"):
            n = int(c[f"{k}_lengths"][i])
            prompt_ids, response_ids = encode_example(rec["instruction"], rec["input"], rec[k])
            assert c[k][i, :n].tolist() == prompt_ids + response_ids and response_ids[-1] == EOT_ID
            assert (c[f"{k}_mask"][i, :p] == 0).all() and (c[f"{k}_mask"][i, p:n] == 1).all()
            assert (c[f"{k}_mask"][i, n:] == 0).all() and (c[k][i, n:] == EOT_ID).all()
    # Training batches: pure in the step, bucketed widths, every pair once per epoch.
    b = data.train_batch(5, 8)
    np.testing.assert_array_equal(b["chosen"], data.train_batch(5, 8)["chosen"])
    widths = {data.train_batch(i, 8)["chosen"].shape[1] for i in range(data.steps_per_epoch(8))}
    assert widths <= {32, 64, 96, 128} and len(widths) > 1
    epoch = np.concatenate([data.train_batch(i, 8)["record"] for i in range(data.steps_per_epoch(8))])
    train_records = set(data.splits["train"].columns["record"].tolist())
    assert len(set(epoch.tolist())) == 928 and set(epoch.tolist()) <= train_records
    # Eval batches: every pair once, the last batch's padding rows weighted 0.
    batches = list(data.eval_batches("val", 8))
    rows = np.concatenate([bb["row"][bb["weight"] > 0] for bb in batches])
    assert sorted(rows.tolist()) == list(range(55)) and batches[-1]["weight"].sum() == 55 - 48
    capped = list(data.eval_batches("val", 8, max_batches=3))  # batches 0, 3, 6 of the full pass, as they are
    assert len(capped) == 3
    for got, want in zip(capped, (batches[0], batches[3], batches[6])):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def test_tfds_preference_data_equals_bundled(tmp_path):
    from jaxgpt.data.preference import read_pairs

    via_tfds = read_pairs(PreferenceDataConfig(path="tfds:preference_data"), tfds_data_dir=str(tmp_path / "tfds"))
    assert via_tfds == read_pairs(PreferenceDataConfig())


# ---------------------------------------------------------------------------------------
# Scores


def test_reward_scores_read_the_last_real_token():
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.tasks.reward import reward_scores

    params = init_params(MODEL, jax.random.key(0), num_classes=1)
    score = jax.jit(reward_scores, static_argnums=0)
    real = [[5, 17, 42, 8, EOT_ID], [9, EOT_ID]]
    tokens = np.full((2, 12), EOT_ID, np.int32)
    tokens[0, :5], tokens[1, :2], tokens[1, 2:] = real[0], real[1], 7  # row 1 padded with junk
    got = np.asarray(score(MODEL, params, tokens, np.array([5, 2], np.int32)))
    assert got.shape == (2,) and got.dtype == np.float32
    for i, r in enumerate(real):
        alone = GPT(MODEL, num_classes=1).apply({"params": params}, jnp.asarray([r]))[0, -1, 0]
        assert got[i] == pytest.approx(float(alone), abs=1e-5)


# ---------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    data = write_pairs(tmp / "pairs.jsonl")
    argv = ["reward", "--data", data, "--out", tmp / "run"]
    for item in TINY:
        argv += ["--set", item]
    assert run_finetune(argv) == 0  # 4 devices: pmapped
    return tmp / "run", data


def test_run_directory_and_accuracy(reward_run):
    run, data = reward_run
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "loss.png", "accuracy.png", "checkpoints"} <= \
        {p.name for p in run.iterdir()}
    s = json.loads((run / "metrics.json").read_text())
    assert s["num_examples"] == {"train": 12, "val": 4, "test": 4} and s["step"] == 9
    for key in ("train_pairwise_accuracy", "val_pairwise_accuracy", "test_pairwise_accuracy", "val_loss",
                "test_loss", "train_eval_loss", "val_score_margin", "val_pairwise_accuracy_before"):
        assert s[key] is not None, key
    # "Sure, ..." beats "Go away, ..." everywhere after a few steps; the loss fell from about log 2.
    assert s["train_pairwise_accuracy"] == s["val_pairwise_accuracy"] == s["test_pairwise_accuracy"] == 1.0
    assert s["val_loss"] < s["val_loss_before"] and s["val_score_margin"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_pairwise_accuracy" in r] == [0, 3, 6, 9]


def test_load_reward_model_and_cli(reward_run, tmp_path):
    from jaxgpt.tasks.reward import load_reward_model, reward_scores

    run, _ = reward_run
    model_cfg, params = load_reward_model(run)
    assert model_cfg.n_embd == 32 and params["score"]["kernel"].shape == (32, 1) and "lm_head" not in params
    ids = [sum(encode_example("Add 3 and 3.", "", r), []) for r in ("Sure, it is 6.", "Go away, 3.")]
    tokens = np.full((2, max(map(len, ids))), EOT_ID, np.int32)
    for i, r in enumerate(ids):
        tokens[i, : len(r)] = r
    direct = np.asarray(reward_scores(model_cfg, params, tokens, np.array([len(r) for r in ids], np.int32)))
    assert direct[0] > direct[1]
    out = subprocess.run([sys.executable, "-m", "jaxgpt", "reward", "--init", str(run), "--instruction", "Add 3 and 3.",
                          "--response", "Sure, it is 6.", "--response", "Go away, 3."],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose([float(x) for x in out.stdout.split()], direct, atol=1e-3)
    with pytest.raises(UserError, match="not a jaxgpt run directory"):
        load_reward_model(tmp_path)
    bad = subprocess.run([sys.executable, "-m", "jaxgpt", "reward", "--init", str(tmp_path), "--instruction", "x",
                          "--response", "y"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # the engine's LoRA resume is also checked on instruct and GRPO runs in the default suite
def test_lora_from_an_instruct_like_run_and_resume(reward_run, tmp_path):
    """--init a run whose config.yaml has another task's sections; LoRA reward model; N steps,
    stop, --resume == 2N straight; the merged params score like the LoRA model."""
    from test_dpo import make_lm_run

    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.tasks.common import load_run
    from jaxgpt.tasks.reward import DEFAULT_CONFIG, RewardConfig, load_reward_model, reward_scores, train_reward_model

    _, data = reward_run
    init = make_lm_run(tmp_path / "sft", extra={"instruct": {"max_new_tokens": 3}, "data": {"mask_prompt": True}})
    sets = TINY + [f"data.path={data}", f"finetune.init={init}", "finetune.train_mode=lora", "lora.rank=2",
                   "train.num_devices=1", "train.epochs=2"]
    cfg = load_config(DEFAULT_CONFIG, sets, cls=RewardConfig)
    straight = train_reward_model(cfg, tmp_path / "straight")
    train_reward_model(cfg, tmp_path / "split", stop_after=4)
    assert run_finetune(["reward", "--resume", tmp_path / "split"]) == 0
    losses = lambda run: [r.get("train_loss") for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]
    assert losses("straight") == losses("split")
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["test_loss"] == straight["test_loss"]
    assert 0 < straight["trainable_params"] < straight["total_params"]
    run_cfg, lora_params = load_run(tmp_path / "straight", RewardConfig, merge=False)
    model_cfg, merged = load_reward_model(tmp_path / "straight")
    assert "lora_a" in lora_params["h_0"]["attn"]["c_attn"] and "lora_a" not in merged["h_0"]["attn"]["c_attn"]
    batch = load_preference(run_cfg.data, 64).train_batch(0, 4)
    lora_scores = GPT(run_cfg.model, num_classes=1, lora=run_cfg.lora).apply({"params": lora_params}, batch["chosen"])
    lora_scores = np.take_along_axis(np.asarray(lora_scores)[..., 0], batch["chosen_lengths"][:, None] - 1, 1)[:, 0]
    np.testing.assert_allclose(np.asarray(reward_scores(model_cfg, merged, batch["chosen"], batch["chosen_lengths"])),
                               lora_scores, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/empty.json"], "is empty"),
        (["--data", "{tmp}/norejected.jsonl"], "line 1 has no rejected field 'rejected'"),
        (["--data", "{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
        (["--data", "{tmp}/long.jsonl"], "record 1: the prompt is"),
        (["--set", "data.instruction_field=prompt"], "no instruction field 'prompt'"),
        (["--set", "data.val_fraction=0.9"], "must be < 1"),
        (["--set", "data.max_length=65"], "longer than the model's context"),
        (["--init", "{tmp}"], "holds neither config.yaml"),
        (["--resume", "{tmp}"], "not a run directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(reward_run, tmp_path, capsys, args, message):
    _, good = reward_run
    (tmp_path / "empty.json").write_text(" \n")
    (tmp_path / "norejected.jsonl").write_text('{"instruction": "a", "chosen": "b", "worse": "c"}\n')
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a",\n')
    long = {"instruction": "word " * 80, "chosen": "a", "rejected": "b"}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n")
    argv = ["reward"] if "--resume" in args else ["reward", "--out", tmp_path / "run"]
    if "--data" not in args and "--resume" not in args:
        argv += ["--data", good]
    for item in init_sets(TINY) if "--init" in args else TINY:
        argv += ["--set", item]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_refused(run_finetune, argv, capsys, message, tmp_path / "run")
