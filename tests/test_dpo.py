"""DPO: the loss against closed forms, sequence log-probs against a per-token loop with a real
GPT, the frozen reference (one copy in LoRA mode, precomputed once, pmapped == jitted), the
finetune.py dpo run directory, LoRA + resume, and bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import Config, ModelConfig, load_config, save_config
from jaxgpt.data.preference import PreferenceDataConfig, load_preference
from jaxgpt.errors import UserError
from jaxgpt.train.losses import sequence_logprobs
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params
from jaxgpt.train.preference_losses import dpo_logits, dpo_loss, implicit_rewards
from tests.cli_helpers import assert_refused, run_finetune

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(context_length=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
TINY = ["train.batch_size=4", "train.epochs=2", "train.warmup_steps=1", "train.log_interval=1", "train.lr=1e-3",
        "data.val_fraction=0.2", "data.test_fraction=0.2", "data.bucket=0", "dpo.num_responses=2",
        "dpo.max_new_tokens=4", "train.eval_batches=0"]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def write_pairs(path: Path, n: int = 20, fields=("instruction", "input", "chosen", "rejected")) -> Path:
    ins, inp, cho, rej = fields
    rows = [{ins: f"Add {i} and {i}.", inp: "" if i % 2 else "numbers", cho: f"Sure, it is {2 * i}.",
             rej: f"Go away, {i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_lm_run(path: Path, model: ModelConfig = MODEL, seed: int = 3, extra: dict | None = None) -> Path:
    """A run directory holding random LM weights (what --init reads), with extra config sections."""
    from jaxgpt.io import checkpoint

    params = jax.device_get(init_params(model, jax.random.key(seed)))
    path.mkdir(parents=True)
    save_config(Config(model=model), path / "config.yaml")
    if extra:  # e.g. an instruct run's own sections: --init must read only the model section
        import yaml

        cfg = yaml.safe_load((path / "config.yaml").read_text())
        cfg.update(extra)
        (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    checkpoint.save(checkpoint.checkpoint_manager(path), 1, {"params": params, "step": np.int32(1)}, {})
    return path


# ---------------------------------------------------------------------------------------
# Pure losses


def test_dpo_loss_closed_form():
    pi_c, pi_r, ref_c, ref_r = np.array([-1.0, -5.0, 0.0]), np.array([-2.0, -1.0, 0.0]), \
        np.array([-1.5, -3.0, 0.0]), np.array([-1.5, -3.0, 0.0])
    beta = 0.1
    z = [beta * ((-1.0 + 1.5) - (-2.0 + 1.5)), beta * ((-5.0 + 3.0) - (-1.0 + 3.0)), 0.0]  # 0.1, -0.4, 0
    np.testing.assert_allclose(dpo_logits(pi_c, pi_r, ref_c, ref_r, beta), z, rtol=1e-6)
    expect = [-math.log(sigmoid(v)) for v in z]
    np.testing.assert_allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta), expect, rtol=1e-6)
    assert abs(float(dpo_loss(0.0, 0.0, 0.0, 0.0, beta)) - math.log(2)) < 1e-7
    # cDPO: -(1 - eps) log s(z) - eps log s(-z)
    eps = 0.2
    cdpo = [-(1 - eps) * math.log(sigmoid(v)) - eps * math.log(sigmoid(-v)) for v in z]
    np.testing.assert_allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, eps), cdpo, rtol=1e-6)
    # Stable for large logits, and the gradient wrt pi_chosen is -beta * sigmoid(-z).
    assert float(dpo_loss(-1000.0, 0.0, 0.0, 0.0, 1.0)) == pytest.approx(1000.0)
    g = jax.grad(lambda p: dpo_loss(p, -2.0, -1.5, -1.5, beta))(-1.0)
    assert float(g) == pytest.approx(-beta * sigmoid(-0.1), rel=1e-5)
    np.testing.assert_allclose(implicit_rewards(np.array([-1.0, -4.0]), np.array([-3.0, -4.0]), 0.5), [1.0, 0.0])


def test_sequence_logprobs_match_a_per_token_loop_with_a_real_gpt():
    """The summed response log-prob equals a direct loop: run the model on each prefix and add
    log p(next token); padding and prompt tokens contribute nothing."""
    m = ModelConfig(vocab_size=61, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    params = init_params(m, jax.random.key(0))
    apply = jax.jit(lambda t: GPT(m).apply({"params": params}, t))
    rows = [([5, 9, 11], [3, 4, 60]), ([7], [8, 2]), ([1, 2, 3, 4, 5], [6])]  # (prompt, response)
    width = 10
    tokens = np.full((3, width), 60, np.int32)
    mask = np.zeros((3, width), np.float32)
    for i, (p, r) in enumerate(rows):
        tokens[i, : len(p) + len(r)] = p + r
        mask[i, len(p): len(p) + len(r)] = 1
    got = np.asarray(sequence_logprobs(apply(jnp.asarray(tokens)), tokens, mask))
    for i, (p, r) in enumerate(rows):
        seq, direct = p + r, 0.0
        for pos in range(len(p), len(seq)):
            logits = np.asarray(apply(jnp.asarray([seq[:pos]])))[0, -1].astype(np.float64)
            direct += logits[seq[pos]] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        assert got[i] == pytest.approx(direct, abs=1e-4)
    # Different padding tokens after the row change nothing (causal attention).
    tokens2 = tokens.copy()
    for i, (p, r) in enumerate(rows):
        tokens2[i, len(p) + len(r):] = 17
    again = sequence_logprobs(apply(jnp.asarray(tokens2)), tokens2, mask)
    np.testing.assert_allclose(np.asarray(again), got, atol=1e-5)


def test_response_window_equals_the_full_head(tmp_path):
    """`positions` (the LM head on the response window only) give the full-logits sums."""
    from jaxgpt.train.preference_losses import response_logprobs

    data = load_preference(PreferenceDataConfig(path=str(write_pairs(tmp_path / "p.jsonl")), bucket=16), 64)
    model = GPT(MODEL)
    params = init_params(MODEL, jax.random.key(1))
    batch = data.train_batch(0, 4)
    assert batch["positions"].shape[1] < batch["chosen"].shape[1]
    full = response_logprobs(model, params, {k: v for k, v in batch.items() if k != "positions"})
    window = response_logprobs(model, params, batch)
    np.testing.assert_allclose(np.asarray(window), np.asarray(full), rtol=1e-5)
    direct = sequence_logprobs(model.apply({"params": params}, batch["chosen"]), batch["chosen"], batch["chosen_mask"])
    np.testing.assert_allclose(np.asarray(window[0]), np.asarray(direct), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# The reference


def test_lora_reference_is_the_policys_own_base_leaves(tmp_path):
    """LoRA: the reference tree holds the very arrays the policy freezes (one copy), the plain
    model on it is the policy with adapters off, and precomputing it pmapped == jitted."""
    from jaxgpt.models.lora import LoRAConfig, is_lora_leaf
    from jaxgpt.parallel import DataParallel
    from jaxgpt.train.preference_losses import response_logprobs
    from jaxgpt.tasks.dpo import precompute_reference, reference_params

    lora = LoRAConfig(rank=2, targets=("c_attn", "c_fc"))
    policy = init_params(MODEL, jax.random.key(2), lora=lora)
    ref = reference_params(policy, "lora")
    flat_policy = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(policy)}
    flat_ref = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(ref)}
    assert set(flat_ref) == {p for p in flat_policy if not is_lora_leaf(p)} and len(flat_ref) < len(flat_policy)
    for path, leaf in flat_ref.items():
        assert leaf is flat_policy[path]
        assert leaf.unsafe_buffer_pointer() == flat_policy[path].unsafe_buffer_pointer()
    assert reference_params(policy, "full") is policy

    data = load_preference(PreferenceDataConfig(path=str(write_pairs(tmp_path / "p.jsonl")), bucket=16), 64)
    batch = data.train_batch(0, 4)
    plain = response_logprobs(GPT(MODEL), ref, batch)
    with_adapters = response_logprobs(GPT(MODEL, lora=lora), policy, batch)  # lora_b = 0: same function
    np.testing.assert_allclose(np.asarray(plain), np.asarray(with_adapters), rtol=1e-6)
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if p[-1].key == "lora_b" else x, policy)
    assert not np.allclose(np.asarray(response_logprobs(GPT(MODEL, lora=lora), moved, batch)), np.asarray(plain))

    one = precompute_reference(DataParallel(1), GPT(MODEL), ref, data, 4)
    four = precompute_reference(DataParallel(4), GPT(MODEL), ref, data, 4)
    for split in ("train", "val", "test"):
        assert one[split]["ref_chosen"].shape == (len(data.splits[split]),)
        np.testing.assert_allclose(four[split]["ref_chosen"], one[split]["ref_chosen"], rtol=1e-5)
        np.testing.assert_allclose(four[split]["ref_rejected"], one[split]["ref_rejected"], rtol=1e-5)
    # Stored per pair, in split order: pair 0 of train scored alone gives the same value.
    single = {k: v[:1] for k, v in data.splits["train"].take([0], 64, 64).items()}
    np.testing.assert_allclose(np.asarray(response_logprobs(GPT(MODEL), ref, single)[0])[0],
                               one["train"]["ref_chosen"][0], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# End to end through finetune.py


def _args(run, init, data, extra=()):
    argv = ["dpo", "--init", init, "--data", data, "--out", run]
    for item in TINY + list(extra):
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    init = make_lm_run(tmp / "sft", extra={"data": {"instruction_field": "q", "mask_prompt": True},
                                           "instruct": {"max_new_tokens": 7}})
    data = write_pairs(tmp / "pairs.jsonl")
    assert run_finetune(_args(tmp / "run", init, data)) == 0  # 4 devices: pmapped
    return tmp / "run", init, data


def test_run_directory_and_margin(dpo_run):
    run, init, _ = dpo_run
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "loss.png", "margin.png", "responses.json",
            "reference_logprobs.npz", "checkpoints"} <= {p.name for p in run.iterdir()}
    s = json.loads((run / "metrics.json").read_text())
    assert s["num_examples"] == {"train": 12, "val": 4, "test": 4} and s["step"] == 6
    # Before the first update the policy is the reference: margin 0, loss log 2.
    assert s["val_reward_margin_before"] == 0.0 and s["train_reward_margin_before"] == 0.0
    assert s["val_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["train_reward_margin_after"] > 0.1 and s["train_eval_loss"] < math.log(2)
    assert s["val_reward_margin_after"] == s["val_reward_margin"]
    for key in ("val_reward_accuracy", "test_reward_accuracy", "test_reward_margin", "train_reward_accuracy"):
        assert 0.0 <= s[key] <= 1.0 or key.endswith("margin")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and [r["step"] for r in records if "val_reward_margin" in r] == [0, 3, 6]
    responses = json.loads((run / "responses.json").read_text())
    assert [r["split"] for r in responses] == ["val", "val", "test", "test"]
    assert all(isinstance(r["response_before"], str) and isinstance(r["response_after"], str) for r in responses)
    # The reference log-probs stored are the init model's (not the trained policy's).
    from jaxgpt.io.hub import resolve_init
    from jaxgpt.train.preference_losses import response_logprobs

    cfg, params = resolve_init(str(init))
    data = load_preference(PreferenceDataConfig(path=str(dpo_run[2]), val_fraction=0.2, test_fraction=0.2,
                                                bucket=16), 64)
    batch = next(data.eval_batches("val", 4))
    with np.load(run / "reference_logprobs.npz") as z:
        ref_c = z["val/ref_chosen"][batch["row"]]
    np.testing.assert_allclose(np.asarray(response_logprobs(GPT(cfg), params, batch)[0]), ref_c, rtol=1e-5)


@pytest.mark.slow  # the engine's LoRA resume is also checked on instruct and GRPO runs in the default suite
def test_lora_run_and_resume_match_a_straight_run(dpo_run, tmp_path):
    _, init, data = dpo_run
    extra = ["train.num_devices=1", "lora.rank=2", "train.lr=3e-3", "dpo.num_responses=1"]
    assert run_finetune(_args(tmp_path / "straight", init, data, extra) + ["--train-mode", "lora"]) == 0
    from jaxgpt.tasks.dpo import DEFAULT_CONFIG, DPOConfig, finetune_dpo

    sets = TINY + extra + [f"data.path={data}", f"finetune.init={init}", "finetune.train_mode=lora"]
    cfg = load_config(DEFAULT_CONFIG, sets, cls=DPOConfig)
    finetune_dpo(cfg, tmp_path / "split", stop_after=4)
    assert run_finetune(["dpo", "--resume", tmp_path / "split"]) == 0
    losses = lambda run: [r.get("train_loss") for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]
    assert losses("straight") == losses("split")
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("straight", "split"))
    assert a["test_reward_margin"] == b["test_reward_margin"] and a["val_reward_margin_before"] == 0.0
    assert a["train_reward_margin_after"] > 0 and a["trainable_params"] < a["total_params"]
    responses = [json.loads((tmp_path / r / "responses.json").read_text()) for r in ("straight", "split")]
    assert responses[0] == responses[1] and len(responses[0]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/empty.jsonl"], "is empty"),
        (["--data", "{tmp}/nochosen.jsonl"], "line 1 has no chosen field 'chosen'"),
        (["--data", "{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
        (["--data", "{tmp}/long.jsonl"], "record 2: the prompt is"),
        (["--data", "{tmp}/missing.jsonl"], "not found"),
        (["--set", "data.rejected_field=worse"], "no rejected field 'worse'"),
        (["--set", "dpo.beta=0"], "dpo.beta must be > 0"),
        (["--set", "dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
        (["--set", "dpo.gamma=1"], "unknown config key dpo.gamma"),
        (["--set", "train.batch_size=64"], "larger than the training split"),
        (["--train-mode", "lora", "--set", "lora.targets=[score]"], "'score' matches no dense layer"),
        (["--init", "{tmp}/nowhere"], "no such directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(dpo_run, tmp_path, capsys, args, message):
    _, init, good = dpo_run
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nochosen.jsonl").write_text('{"instruction": "a", "better": "b", "rejected": "c"}\n')
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": \n')
    rows = [{"instruction": "hi", "chosen": "a", "rejected": "b"},
            {"instruction": "word " * 80, "chosen": "a", "rejected": "b"}]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["dpo", "--out", tmp_path / "run"]
    if "--data" not in args:
        argv += ["--data", good]
    if "--init" not in args:
        argv += ["--init", init]
    for item in TINY:
        argv += ["--set", item]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_refused(run_finetune, argv, capsys, message, tmp_path / "run")


def test_truncated_responses_are_counted(tmp_path):
    rows = [{"instruction": f"Say {i}.", "chosen": "yes " * (30 if i == 1 else 1), "rejected": "no"} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_preference(PreferenceDataConfig(path=str(tmp_path / "t.jsonl")), 64)
    assert data.truncated == 1 and "1 responses truncated" in data.describe()
    full = [s for s in data.splits.values() if len(s) and (s.columns["chosen_lengths"] == 64).any()]
    assert len(full) == 1
    from jaxgpt.text.prompts import format_prompt
    from jaxgpt.text.gpt2_bpe import encode

    n = len(encode(format_prompt("Say 0.")))
    assert load_preference(PreferenceDataConfig(path=str(tmp_path / "t.jsonl")), n + 1).truncated == 12
    with pytest.raises(UserError, match="record 1: the prompt is"):
        load_preference(PreferenceDataConfig(path=str(tmp_path / "t.jsonl")), n)
