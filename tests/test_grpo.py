"""GRPO: advantages, k3 KL, the clipped loss and its aggregation against hand-computed
values; a toy problem where the loss must raise the reward; 1 device == 4 devices."""
from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.rl.grpo import aggregate, clipped_surrogate, group_advantages, grpo_loss, grpo_loss_fn, k3_kl
from tests.cli_helpers import assert_refused, run_finetune


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0]
    adv = np.asarray(group_advantages(rewards, 4))
    std = math.sqrt((4 * 0.25) / 3)  # sample std (ddof 1) of [1, 0, 0, 1]
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(adv[4:8], 0.0)  # every completion equally good: no signal
    std3 = math.sqrt((3 * 0.75 ** 2 + 2.25 ** 2) / 3)
    np.testing.assert_allclose(adv[8:], np.array([-0.75, -0.75, -0.75, 2.25]) / (std3 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 4, normalize_std=False))[:4], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 2, normalize_std=False)), [0.5, -0.5, -0.5, 0.5,
                               0, 0, 0, 0, 0, 0, -1.5, 1.5])


def test_k3_by_hand():
    logp, ref = np.log(0.5), np.log(0.25)
    assert float(k3_kl(logp, ref)) == pytest.approx(0.5 - math.log(0.5) - 1.0, abs=1e-7)  # 0.19315
    assert float(k3_kl(ref, logp)) == pytest.approx(2.0 - math.log(2.0) - 1.0, abs=1e-6)
    assert float(k3_kl(-1.3, -1.3)) == 0.0
    # Unbiased: E_{x~p}[k3] = KL(p || q) for a small categorical.
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    expected = float(np.sum(p * np.log(p / q)))
    assert float(np.sum(p * np.asarray(k3_kl(jnp.log(p), jnp.log(q))))) == pytest.approx(expected, abs=1e-6)


def test_clipped_surrogate_by_hand():
    logp = jnp.log(jnp.array([1.5, 0.5, 0.5, 1.5, 1.1]))
    adv = jnp.array([1.0, 1.0, -1.0, -1.0, 2.0])
    loss, clipped = clipped_surrogate(logp, jnp.zeros(5), adv, 0.2, 0.2)
    np.testing.assert_allclose(np.asarray(loss), [-1.2, -0.5, 0.8, 1.5, -2.2], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [1, 0, 1, 0, 0])
    loss, clipped = clipped_surrogate(logp, jnp.zeros(5), adv, 0.2, 0.28)  # clip-higher
    np.testing.assert_allclose(np.asarray(loss), [-1.28, -0.5, 0.8, 1.5, -2.2], rtol=1e-6)
    # Clipped tokens get no gradient; unclipped ones get -A * ratio.
    grads = jax.grad(lambda lp: jnp.sum(clipped_surrogate(lp, jnp.zeros(5), adv, 0.2, 0.2)[0]))(logp)
    np.testing.assert_allclose(np.asarray(grads), [0.0, -0.5, 0.0, 1.5, -2.2], rtol=1e-6)


def test_aggregate_by_hand():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert [float(v) for v in aggregate(x, mask, "token")] == [7.0, 3.0]
    assert [float(v) for v in aggregate(x, mask, "sequence")] == [5.5, 2.0]  # (1.5 + 4) over 2 rows
    with pytest.raises(ValueError):
        aggregate(x, mask, "batch")


def test_grpo_loss_by_hand():
    mask = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.float32)
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.9, 0.1, 0.1]]))
    old = jnp.log(jnp.array([[0.25, 0.5, 0.6], [0.9, 0.3, 0.3]]))
    ref = jnp.log(jnp.array([[0.5, 0.25, 0.5], [0.45, 0.3, 0.3]]))
    adv = jnp.array([1.0, -2.0])
    loss_sum, sums = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1, loss_agg="sequence")
    # row 0: ratios 2 (clipped to 1.2), 1, 0.8333 -> pg -1.2, -1, -0.8333; k3: 0, 0.19315, 0
    # row 1: ratio 1 -> pg 2; k3: exp(log .5) - log .5 - 1 = 0.19315
    k = 0.5 - math.log(0.5) - 1.0
    row0 = (-1.2 + (-1.0 + 0.1 * k) + (-0.5 / 0.6)) / 3
    row1 = 2.0 + 0.1 * k
    assert float(loss_sum) == pytest.approx(row0 + row1, rel=1e-5)
    assert float(sums["count"]) == 2.0
    assert float(sums["clip_frac"]) == pytest.approx(1 / 3, rel=1e-5)
    assert float(sums["kl"]) == pytest.approx(k / 3 + k, rel=1e-5)
    tok_sum, tok = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1, loss_agg="token")
    assert float(tok["count"]) == 4.0
    assert float(tok_sum) == pytest.approx(row0 * 3 + row1, rel=1e-5)
    # On-policy (logp == old), the gradient is -A / |o| per token (sequence aggregation).
    g = jax.grad(lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), lp, adv, mask, loss_agg="sequence")[0])(logp)
    np.testing.assert_allclose(np.asarray(g), [[-1 / 3] * 3, [2.0, 0.0, 0.0]], rtol=1e-6)


def _toy_experience(params, cfg, key, group_size=8):
    from jaxgpt.rl.rollout import pad_prompt_batch, rollout

    tokens, mask = pad_prompt_batch([[1, 2], [3, 4, 5], [6], [7, 8]], max_new_tokens=6, context_length=16)
    out = jax.device_get(rollout(params, cfg, tokens, mask, key, group_size=group_size, max_new_tokens=6,
                                 temperature=1.0, eos_id=15))
    reward = ((out["tokens"][:, -6:] == 5) & out["completion_mask"]).sum(1) / 6.0  # "say 5"
    batch = {"tokens": out["tokens"], "attention_mask": out["attention_mask"],
             "completion_mask": out["completion_mask"], "old_logprobs": out["logprobs"],
             "ref_logprobs": out["logprobs"], "advantages": np.asarray(group_advantages(reward, group_size))}
    return batch, float(reward.mean())


def test_grpo_raises_the_reward_of_a_toy_task():
    """Through the real pieces (rollout, advantages, loss_fn, shared train_step): a random
    GPT learns to emit token 5, the reward going from ~1/16 to > 0.8."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.train.steps import create_train_state, train_step

    cfg = ModelConfig(vocab_size=16, context_length=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    tx = optax.adam(3e-3)
    state = create_train_state(init_params(cfg, jax.random.key(0)), tx)
    loss_fn = grpo_loss_fn(GPT(cfg), clip_eps=0.2, clip_eps_high=None, kl_beta=0.0, loss_agg="sequence")
    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx))
    rewards = []
    for it in range(25):
        batch, reward = _toy_experience(state.params, cfg, jax.random.key(100 + it))
        rewards.append(reward)
        for _ in range(2):
            state, metrics = step(state, {k: np.asarray(v)[None] for k, v in batch.items()}, jax.random.key(0))
    assert rewards[0] < 0.2 and np.mean(rewards[-3:]) > 0.8, rewards


def test_on_policy_loss_equals_the_loss_with_exact_old_logprobs():
    """`on_policy` (one update per batch) skips the rescoring pass: loss and gradient are those
    of the clipped loss given the current policy's own (tempered) log-probs as old ones."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.rl.rollout import completion_logprobs

    cfg = ModelConfig(vocab_size=16, context_length=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    batch, _ = _toy_experience(params, cfg, jax.random.key(1))
    mask = batch["completion_mask"]
    batch["old_logprobs"] = np.asarray(completion_logprobs(GPT(cfg), params, batch["tokens"], batch["attention_mask"],
                                                           mask.shape[1], temperature=0.5)) * mask
    kwargs = dict(clip_eps=0.2, clip_eps_high=None, kl_beta=0.1, loss_agg="sequence", temperature=0.5)
    grads = []
    for on_policy, old in ((False, batch["old_logprobs"]), (True, np.full_like(batch["old_logprobs"], 7.0))):
        loss_fn = grpo_loss_fn(GPT(cfg), on_policy=on_policy, **kwargs)
        (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {**batch, "old_logprobs": old}, None)
        grads.append((float(loss), g, float(sums["ratio"] / sums["count"])))
    (l1, g1, r1), (l2, g2, r2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5) and r1 == pytest.approx(1.0, abs=1e-5) and r2 == 1.0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g2)


def test_update_is_the_same_on_1_and_4_devices():
    """The loss is a sum / count through the shared step: 4 devices (psum) give the update of 1."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.parallel import DataParallel
    from jaxgpt.train.steps import create_train_state, train_step

    cfg = ModelConfig(vocab_size=16, context_length=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    params = init_params(cfg, jax.random.key(0))
    batch, _ = _toy_experience(params, cfg, jax.random.key(1))
    batch["old_logprobs"] = batch["old_logprobs"] - 0.1 * batch["completion_mask"]  # ratios != 1, some clipped
    tx = optax.sgd(0.1)
    for agg in ("sequence", "token"):
        loss_fn = grpo_loss_fn(GPT(cfg), clip_eps=0.05, clip_eps_high=None, kl_beta=0.1, loss_agg=agg)
        results = []
        for n in (1, 4):
            dp = DataParallel(n)
            step = dp.compile_train_step(train_step, loss_fn=loss_fn, tx=tx)
            state, metrics = step(dp.replicate(create_train_state(params, tx)), dp.shard_train(batch, 2), jax.random.key(0))
            results.append((dp.unreplicate(state).params, dp.first(metrics)))
        (p1, m1), (p4, m4) = results
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p4)
        for k in ("loss", "clip_frac", "kl", "count"):
            assert float(m1[k]) == pytest.approx(float(m4[k]), rel=1e-5), k
        assert 0.0 < float(m1["clip_frac"]) < 1.0


def test_process_advantages_by_hand():
    from jaxgpt.rl.grpo import process_advantages

    # One group of 2 completions, 3 steps each: all 6 step rewards are normalised together.
    steps = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    flat = steps.reshape(-1)
    norm = ((flat - flat.mean()) / (flat.std(ddof=1) + 1e-4)).reshape(2, 3)
    to_go = np.flip(np.cumsum(np.flip(norm, 1), 1), 1)  # a step's advantage: its own + later steps
    segments = np.array([[0, 0, 1, 2, 2, 5], [0, 1, 1, 1, 2, 2]])  # step of each token (5 -> last)
    adv = np.asarray(process_advantages(steps, segments, 2))
    np.testing.assert_allclose(adv[0], to_go[0][[0, 0, 1, 2, 2, 2]], rtol=1e-5)
    np.testing.assert_allclose(adv[1], to_go[1][[0, 1, 1, 1, 2, 2]], rtol=1e-5)
    assert adv[0, 0] == pytest.approx(norm[0].sum(), rel=1e-5)
    # The loss takes per-token advantages as they are.
    mask = jnp.ones((2, 6))
    lp = jnp.full((2, 6), -1.0)
    g = jax.grad(lambda x: grpo_loss(x, jax.lax.stop_gradient(x), x, jnp.asarray(adv), mask, loss_agg="token")[0])(lp)
    np.testing.assert_allclose(np.asarray(g), -adv, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# finetune.py grpo end to end

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=64",
        "rollout.prompts_per_step=4", "grpo.group_size=4", "rollout.minibatches=2", "rollout.max_new_tokens=12",
        "rollout.eval_batch_size=8", "data.eval_size=8", "train.max_steps=4", "train.eval_interval=2",
        "train.log_interval=1", "train.lr=1e-3", "data.eval_samples=0"]


def _argv(out, extra=()):
    argv = ["grpo", "--out", out]
    for item in TINY + list(extra):
        argv += ["--set", item]
    return argv


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random-init model never solves a problem (every advantage 0, no update): reward
    completions by their length instead, so the tests below really train."""
    from jaxgpt.rl.tasks import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, c, p: float(len(c) % 2))
    monkeypatch.setattr(ArithmeticTask, "step_rewards", lambda self, c, p: [float(len(c) % 3 == 0), float(len(c) % 2)])


def test_grpo_command_on_4_devices_and_run_dir(tmp_path, monkeypatch, varied_rewards):
    """Random init (no --init), the default task, pmapped updates over 4 devices; kl_ref
    logged on request (grpo.log_kl), pass@1..2 before and after."""
    from jaxgpt.rl import evaluation

    calls = []
    sample = evaluation.sample_completions
    monkeypatch.setattr(evaluation, "sample_completions", lambda *a, **k: calls.append(k["samples"]) or sample(*a, **k))
    assert run_finetune(_argv(tmp_path / "run", ["grpo.log_kl=true", "data.eval_samples=2"])) == 0
    assert calls == [1, 2, 1, 1, 2]  # greedy + sampled before; greedy at 2 and 4 (the summary reuses it); sampled after
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "reward.png", "kl.png", "length.png",
            "eval_samples.jsonl", "checkpoints"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "metrics.json").read_text())
    for key in ("eval_accuracy_before", "eval_accuracy_after", "eval_format_rate_after", "rollout_tokens_per_sec",
                "seconds_per_iteration", "kl", "eval_completion_len_after", "eval_sample_accuracy_before"):
        assert summary[key] is not None, key  # kl: the last logged kl_ref
    for when in ("before", "after"):
        pass_at = summary[f"eval_pass_at_k_{when}"]
        assert set(pass_at) == {"1", "2"} and 0 <= pass_at["1"] <= pass_at["2"] <= 1
        assert pass_at["1"] == pytest.approx(summary[f"eval_sample_accuracy_{when}"])
    assert summary["loss_type"] == "grpo" and summary["grpo_settings"]["loss_agg"] == "sequence"
    assert summary["iteration"] == 4 and summary["step"] == 4 * 2 and summary["task"] == "arithmetic"
    assert summary["num_prompts"]["eval"] == 8
    for key in ("eval_step_accuracy_before", "eval_step_accuracy_after"):  # the fixture's 2 step rewards
        assert len(summary[key]) == 2 and all(0.0 <= v <= 1.0 for v in summary[key]), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert 0.0 < r["reward"] < 1.0 and np.isfinite(r["loss"]) and "kl_ref" in r  # log_interval 1
        assert r["grad_norm"] > 0
    assert records[-1]["kl_ref"] != 0  # the policy moved away from the reference
    assert "kl" not in records[-1]  # kl_beta 0: the loss's k3 would compare with a stand-in reference
    assert summary["eval_accuracy_after"] == records[-1]["eval_accuracy"]
    assert summary["eval_step_accuracy_after"] == records[-1]["eval_step_accuracy"]
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"question", "answer", "completion", "reward"} <= set(samples[0])


def test_on_policy_run_matches_a_run_that_rescores(tmp_path, monkeypatch, varied_rewards):
    """One update per batch at T 0.5: skipping the rescoring pass (on-policy) trains like the
    run that rescores every batch for old log-probs; kl_ref is logged on logged iterations.
    Two iterations: later rollouts may flip a sampled token on a 1e-7 difference in params."""
    from jaxgpt.config import load_config
    from jaxgpt.tasks import grpo
    from jaxgpt.tasks.grpo import DEFAULT_CONFIG, GRPOConfig, finetune_grpo

    extra = ["train.num_devices=1", "rollout.minibatches=1", "rollout.temperature=0.5", "train.max_steps=2",
             "train.log_interval=2", "train.eval_interval=2", "grpo.log_kl=true"]
    cfg = load_config(DEFAULT_CONFIG, TINY + extra, cls=GRPOConfig)
    finetune_grpo(cfg, tmp_path / "on")
    monkeypatch.setattr(grpo, "is_on_policy", lambda r: False)
    finetune_grpo(cfg, tmp_path / "rescored")
    runs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("on", "rescored")}
    assert [r["iteration"] for r in runs["on"]] == [2] and "kl_ref" in runs["on"][0]  # iteration 1: not rescored
    for a, b in zip(runs["on"], runs["rescored"]):
        for k in ("reward", "loss", "grad_norm", "kl_ref"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), k
        assert a["ratio"] == 1.0 and a["clip_frac"] == 0.0


def test_grpo_lora_resume_matches_a_straight_run(tmp_path, varied_rewards):
    """LoRA mode, process supervision, tempered sampling; 2 iterations + --resume == 4 straight."""
    from jaxgpt.config import load_config
    from jaxgpt.tasks.grpo import DEFAULT_CONFIG, GRPOConfig, finetune_grpo

    extra = ["train.num_devices=1", "finetune.train_mode=lora", "lora.rank=2", "grpo.supervision=process",
             "rollout.temperature=0.8", "rollout.inner_epochs=2", "grpo.kl_beta=0.05"]
    cfg = load_config(DEFAULT_CONFIG, TINY + extra, cls=GRPOConfig)
    straight = finetune_grpo(cfg, tmp_path / "straight")
    finetune_grpo(cfg, tmp_path / "split", stop_after=2)
    assert run_finetune(["grpo", "--resume", tmp_path / "split"]) == 0
    keys = ("reward", "loss", "kl", "clip_frac", "kl_ref", "eval_accuracy", "grad_norm")
    strip = lambda run: [{k: r.get(k) for k in keys} for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert strip("split") == strip("straight")
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert resumed["eval_accuracy_after"] == straight["eval_accuracy_after"] and straight["step"] == 16
    assert straight["trainable_params"] < straight["total_params"]
    records = strip("straight")
    assert all(r["grad_norm"] > 0 for r in records) and records[-1]["kl"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "chess"], "unknown task 'chess'"),
        (["--task", "arithmetic:digits=9"], "digits must be 1..6"),
        (["--data", "{tmp}/q.jsonl"], "reads no data file"),
        (["--task", "gsm8k", "--data", "{tmp}/empty.jsonl"], "is empty"),
        (["--task", "gsm8k", "--data", "{tmp}/noanswer.jsonl"], "line 1 has no answer field 'answer'"),
        (["--task", "gsm8k", "--data", "{tmp}/missing.jsonl"], "not found"),
        (["--task", "gsm8k", "--set", "grpo.supervision=process"], "task gsm8k has no process rewards"),
        (["--set", "grpo.group_size=1"], "grpo.group_size must be >= 2"),
        (["--set", "grpo.loss_agg=batch"], "grpo.loss_agg must be one of"),
        (["--set", "grpo.supervision=steps"], "grpo.supervision must be one of"),
        (["--set", "grpo.clip_eps=0"], "grpo.clip_eps must be > 0"),
        (["--set", "grpo.kl_beta=-0.1"], "grpo.kl_beta must be >= 0"),
        (["--set", "grpo.loss_type=ppo"], "grpo.loss_type must be one of"),
        (["--set", "grpo.clip_eps_high=0.1"], "grpo.clip_eps_high (0.1) must be >= grpo.clip_eps (0.2)"),
        (["--set", "grpo.loss_type=gspo", "--set", "grpo.clip_eps=0.01"], "must be >= grpo.clip_eps (0.01)"),
        (["--set", "grpo.scale_rewards=std"], "grpo.scale_rewards must be one of"),
        (["--set", "grpo.ratio_level=word"], "grpo.ratio_level must be one of"),
        (["--set", "grpo.overlong=cut"], "grpo.overlong must be one of"),
        (["--set", "data.eval_temperature=0"], "data.eval_temperature must be > 0"),
        (["--task", "gsm8k", "--data", "{tmp}/unparsable.jsonl"], "record 1: the answer field has no final answer"),
        (["--set", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["--set", "rollout.minibatches=3"], "do not split into rollout.minibatches=3"),
        (["--set", "rollout.minibatches=8"], "divisible by devices x train.grad_accum_steps"),
        (["--set", "model.context_length=48"], "exceed the model's context of 48"),
        (["--set", "data.max_prompt_tokens=10"], "every arithmetic rl prompt is longer"),
        (["--set", "data.eval_size=-1"], "data.eval_size must be >= 0"),
        (["--set", "train.lr=-1"], "train.lr must be positive"),
        (["--set", "grpo.colour=red"], "unknown config key grpo.colour"),
        (["--resume", "{tmp}"], "not a run directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    (tmp_path / "q.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "noanswer.jsonl").write_text('{"question": "What?"}\n')
    (tmp_path / "unparsable.jsonl").write_text('{"question": "How many?", "answer": "Four of them."}\n')
    argv = _argv(tmp_path / "run") if "--resume" not in extra else ["grpo"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert_refused(run_finetune, argv, capsys, message, tmp_path / "run")


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_saves_the_iteration_and_resume_finishes(tmp_path, monkeypatch, varied_rewards, signum, code):
    """Ctrl-C (or a preemption's SIGTERM) during iteration 2's rollout: the iteration finishes,
    a checkpoint is saved, the command exits 130 (143) without a summary, and --resume
    completes the run."""
    import signal

    from jaxgpt.io import checkpoint
    from jaxgpt.rl.tasks import ArithmeticTask

    calls = {"n": 0}
    scored = ArithmeticTask.reward

    def reward_then_interrupt(self, completion, problem):
        calls["n"] += 1
        if calls["n"] == 8 + 4 * 4 + 1:  # after the 8 eval prompts and iteration 1's 4 x 4 samples
            signal.raise_signal(getattr(signal, signum))
        return scored(self, completion, problem)

    monkeypatch.setattr(ArithmeticTask, "reward", reward_then_interrupt)
    run = tmp_path / "run"
    assert run_finetune(_argv(run, ["train.num_devices=1"])) == code
    assert checkpoint.latest_step(run) == 2 and not (run / "metrics.json").exists()
    assert run_finetune(["grpo", "--resume", run]) == 0
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 4


def test_a_completion_budget_shorter_than_the_solutions_is_reported(capsys):
    from jaxgpt.rl.tasks import get_task
    from jaxgpt.rl.prompt_sets import warn_if_solutions_cut
    from jaxgpt.text.gpt2_bpe import encode

    problems = get_task("arithmetic").split("rl", 0)[:50]
    longest = max(len(encode(p.solution)) + 1 for p in problems)
    warn_if_solutions_cut(problems, longest)
    assert capsys.readouterr().out == ""
    warn_if_solutions_cut(problems, longest - 1)
    out = capsys.readouterr().out
    assert f"rollout.max_new_tokens={longest - 1}" in out and f"longest {longest}" in out
