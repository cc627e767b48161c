"""PPO: KL-shaped rewards, GAE, whitening and the clipped losses against hand-computed
values; a toy reward PPO must raise; `finetune.py ppo` end to end, resume, bad input."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.rl.ppo import gae, kl_penalized_rewards, ppo_loss, whiten
from tests.cli_helpers import assert_refused, run_finetune


def test_kl_penalized_rewards_by_hand():
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    r = np.asarray(kl_penalized_rewards(jnp.array([2.0, -1.0]), logp, ref, mask, 0.1))
    np.testing.assert_allclose(r, [[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]], rtol=1e-6)
    # A row with no completion token gets nothing (not the score at index 0).
    none = kl_penalized_rewards(jnp.array([5.0]), logp[:1], ref[:1], jnp.zeros((1, 3)), 0.1)
    np.testing.assert_array_equal(np.asarray(none), 0.0)


def test_gae_by_hand():
    rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = jnp.array([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    adv, ret = map(np.asarray, gae(rewards, values, mask, gamma=1.0, lam=0.95))
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    a1 = 0.1 + 0.95 * 0.3
    np.testing.assert_allclose(adv[0], [0.1 + 0.95 * a1, a1, 0.3], rtol=1e-6)
    np.testing.assert_allclose(ret[0], adv[0] + [0.5, 0.6, 0.7], rtol=1e-6)
    # row 1 ends after 2 tokens: V after the last token is 0, the padding value 9 is ignored.
    np.testing.assert_allclose(adv[1], [0.1 + 0.95 * 1.4, 1.4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ret[1], [0.6 + 0.95 * 1.4, 2.0, 0.0], rtol=1e-6)
    # gamma < 1, lam = 1: the advantage is the discounted return minus the value.
    adv, ret = map(np.asarray, gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=1.0))
    np.testing.assert_allclose(ret[0], [0.81, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(adv[0], [0.31, 0.3, 0.3], rtol=1e-5)


def test_gae_matches_a_python_loop():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
    lengths = [7, 1, 4, 0, 6]
    mask = np.array([[1] * n + [0] * (7 - n) for n in lengths], np.float32)
    adv, ret = map(np.asarray, gae(rewards * mask, values, mask, gamma=0.97, lam=0.9))
    for b, n in enumerate(lengths):
        expected, running = np.zeros(7), 0.0
        for t in reversed(range(n)):
            nxt = values[b, t + 1] if t + 1 < n else 0.0
            running = rewards[b, t] + 0.97 * nxt - values[b, t] + 0.97 * 0.9 * running
            expected[t] = running
        np.testing.assert_allclose(adv[b], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret[b, :n], expected[:n] + values[b, :n], rtol=1e-5, atol=1e-6)


def test_whiten_and_value_head():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    w = np.asarray(whiten(x, mask))
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(w[np.asarray(mask, bool)], (real - 3.0) / np.sqrt(2.0), rtol=1e-5)
    assert w[0, 2] == 0.0
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params

    def values_of(head, hidden):  # the model's value head on final hidden states [b, t, d]
        cfg = ModelConfig(vocab_size=8, context_length=4, n_layer=1, n_head=1, n_embd=hidden.shape[-1])
        return GPT(cfg, value_head=True).apply({"params": {"value_head": head}}, hidden, method=GPT.values)

    cfg4 = ModelConfig(vocab_size=8, context_length=4, n_layer=1, n_head=1, n_embd=4)
    head = init_params(cfg4, jax.random.key(0), value_head=True)["value_head"]
    assert np.asarray(values_of(head, jnp.ones((2, 3, 4)))).tolist() == [[0.0] * 3] * 2
    head = {"kernel": jnp.array([[1.0], [2.0]]), "bias": jnp.array([0.5])}
    np.testing.assert_allclose(np.asarray(values_of(head, jnp.array([[[1.0, 1.0], [0.0, -1.0]]]))), [[3.5, -1.5]])


def test_ppo_loss_by_hand():
    logp = jnp.log(jnp.array([[1.5, 0.5]]))
    old = jnp.zeros((1, 2))
    adv = jnp.array([[1.0, -1.0]])
    values, old_values, returns = jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.0]]), jnp.array([[2.0, 1.0]])
    mask = jnp.ones((1, 2))
    loss, sums = ppo_loss(logp, old, adv, values, old_values, returns, mask, clip_eps=0.2, value_clip=0.2, vf_coef=0.5)
    # policy: ratio 1.5, A=1 -> -1.2 (clipped); ratio 0.5, A=-1 -> 0.8 (clipped)
    # value: token 0: plain (1-2)^2 = 1, clipped V = 0.7 -> (0.7-2)^2 = 1.69 -> 0.5 * 1.69; token 1: 0.5 * 1
    assert float(sums["pg_loss"]) == pytest.approx(-1.2 + 0.8, rel=1e-6)
    assert float(sums["value_loss"]) == pytest.approx(0.5 * 1.69 + 0.5, rel=1e-6)
    assert float(loss) == pytest.approx(-0.4 + 0.5 * (0.845 + 0.5), rel=1e-6)
    assert float(sums["clip_frac"]) == 2.0 and float(sums["value_clip_frac"]) == 1.0 and float(sums["count"]) == 2.0
    k = (1.5 - 1 - np.log(1.5)) + (0.5 - 1 - np.log(0.5))
    assert float(sums["approx_kl"]) == pytest.approx(k, rel=1e-5)


def test_ppo_raises_a_toy_reward():
    """The real pieces (rollout, one-pass policy + values, KL-shaped rewards, GAE, whitening,
    the loss through the shared train_step): a random GPT learns to emit token 5."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.rl.ppo import policy_and_values, ppo_loss_fn
    from jaxgpt.rl.rollout import pad_prompt_batch, rollout
    from jaxgpt.train.steps import create_train_state, train_step

    cfg = ModelConfig(vocab_size=16, context_length=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    params = init_params(cfg, jax.random.key(0), value_head=True)
    tx = optax.adam(3e-3)
    state = create_train_state(params, tx)
    model = GPT(cfg, value_head=True)
    step = jax.jit(functools.partial(train_step, tx=tx, loss_fn=ppo_loss_fn(model, clip_eps=0.2, value_clip=0.2,
                                                                            vf_coef=0.1)))
    score = jax.jit(lambda p, t, m: policy_and_values(model, p, t, m, 6))
    ref_score = jax.jit(lambda t, m: policy_and_values(model, params, t, m, 6)[0])
    tokens, mask = pad_prompt_batch([[1, 2], [3, 4, 5], [6], [7, 8]] * 4, max_new_tokens=6, context_length=16)
    scores = []
    for it in range(25):
        plain = {k: v for k, v in state.params.items() if k != "value_head"}
        out = rollout(plain, cfg, tokens, mask, jax.random.key(100 + it), max_new_tokens=6, eos_id=15)
        cm = out["completion_mask"].astype(jnp.float32)
        s = jnp.sum((out["tokens"][:, -6:] == 5) * cm, axis=1) / 6.0
        scores.append(float(s.mean()))
        logp, values = score(state.params, out["tokens"], out["attention_mask"])
        rewards = kl_penalized_rewards(s, logp, ref_score(out["tokens"], out["attention_mask"]), cm, 0.01)
        adv, ret = gae(rewards, values * cm, cm)
        batch = {"tokens": out["tokens"], "attention_mask": out["attention_mask"], "completion_mask": out["completion_mask"],
                 "old_logprobs": logp * cm, "old_values": values * cm, "advantages": whiten(adv, cm), "returns": ret}
        for _ in range(2):
            state, metrics = step(state, jax.tree_util.tree_map(lambda x: np.asarray(x)[None], batch), jax.random.key(0))
    assert scores[0] < 0.2 and np.mean(scores[-3:]) > 0.6, scores
    assert float(metrics["value_loss"]) < 0.5


# ---------------------------------------------------------------------------------------
# finetune.py ppo end to end

TINY = ModelConfig(context_length=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
SETS = ["rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "rollout.eval_batch_size=4", "data.eval_size=4",
        "train.max_steps=4", "train.eval_interval=2", "train.log_interval=1", "rollout.minibatches=2",
        "train.num_devices=1"]


def save_run(path: Path, params, model_cfg: ModelConfig) -> Path:
    """A run directory (config.yaml + one checkpoint) holding `params`."""
    from jaxgpt.io import checkpoint
    from jaxgpt.config import Config, save_config

    path.mkdir(parents=True)
    save_config(Config(model=model_cfg), path / "config.yaml")
    checkpoint.save(checkpoint.checkpoint_manager(path), 1, {"params": jax.device_get(params), "step": np.int32(1)}, {})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny random 'SFT' policy, a tiny random reward model (score head), and prompts."""
    from jaxgpt.models import init_params

    tmp = tmp_path_factory.mktemp("ppo")
    sft = save_run(tmp / "sft", init_params(TINY, jax.random.key(1)), TINY)
    rm = save_run(tmp / "rm", init_params(TINY, jax.random.key(2), num_classes=1), TINY)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say something kind, number {i}.", "input": "" if i % 2 else "x"})
                            + "\n" for i in range(16)))
    return tmp, sft, rm, data


def _argv(out, sft, rm, data, extra=()):
    argv = ["ppo", "--init", sft, "--reward", rm, "--data", data, "--out", out]
    for item in SETS + list(extra):
        argv += ["--set", item]
    return argv


def test_ppo_command_run_dir_and_resume(runs):
    tmp, sft, rm, data = runs
    assert run_finetune(_argv(tmp / "straight", sft, rm, data)) == 0
    summary = json.loads((tmp / "straight" / "metrics.json").read_text())
    for key in ("eval_reward_before", "eval_reward_after", "kl", "eval_kl", "value_loss_last", "rollout_tokens_per_sec"):
        assert summary[key] is not None, key
    assert summary["iteration"] == 4 and summary["step"] == 4 * 2 * 2  # inner_epochs 2 x minibatches 2
    assert summary["num_prompts"] == {"train": 12, "eval": 4}
    assert summary["trainable_params"] == summary["total_params"]  # full mode, value head included
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "reward.png", "kl.png", "loss.png",
            "checkpoints"} <= {p.name for p in (tmp / "straight").iterdir()}
    records = [json.loads(line) for line in (tmp / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for key in ("score", "reward", "kl", "clip_frac", "value_loss", "approx_kl", "terminated"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert "eval_reward" in records[1] and "eval_reward" not in records[0]
    assert abs(summary["eval_kl_before"]) < 1e-4  # the policy starts at the reference
    # Stop after 2 iterations, resume: the same metrics as the straight run.
    from jaxgpt.config import load_config
    from jaxgpt.tasks.ppo import PPOConfig, finetune_ppo

    cfg = load_config(tmp / "straight" / "config.yaml", cls=PPOConfig)
    finetune_ppo(cfg, tmp / "split", stop_after=2)
    assert run_finetune(["ppo", "--resume", tmp / "split"]) == 0
    keys = ("score", "kl", "loss", "value_loss", "clip_frac", "eval_reward")
    strip = lambda run: [{k: r.get(k) for k in keys} for r in map(json.loads, (tmp / run / "metrics.jsonl").read_text().splitlines())]
    assert strip("split") == strip("straight")
    resumed = json.loads((tmp / "split" / "metrics.json").read_text())
    assert resumed["eval_reward_after"] == summary["eval_reward_after"]
    assert resumed["eval_reward_before"] == summary["eval_reward_before"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "ppo.reward="], "no reward model"),
        (["--reward", "{sft}x"], "not a jaxgpt run directory"),
        (["--reward", "{sft}"], "is not a reward-model run"),
        (["--set", "ppo.kl_coef=-1"], "ppo.kl_coef must be >= 0"),
        (["--set", "ppo.lam=2"], "ppo.lam must be in [0, 1]"),
        (["--set", "data.eval_size=16"], "not more than data.eval_size=16"),
        (["--set", "rollout.max_new_tokens=60"], "exceed the model's context of 64"),
        (["--set", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["--set", "rollout.minibatches=3"], "do not split into rollout.minibatches=3"),
        (["--set", "rollout.sampler=magic"], "rollout.sampler must be one of"),
        (["--data", "{tmp}/empty.jsonl"], "is empty"),
        (["--data", "{tmp}/nofield.jsonl"], "line 1 has no instruction field 'instruction'"),
        (["--data", "{tmp}/missing.jsonl"], "not found"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, capsys, extra, message):
    tmp, sft, rm, data = runs
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "hi"}\n')
    argv = _argv(tmp_path / "run", sft, rm, data)
    if "ppo.reward=" in extra:
        argv = [a for a in argv if a not in ("--reward", rm)]
    argv += [a.replace("{sft}", str(sft)).replace("{tmp}", str(tmp_path)) for a in extra]
    assert_refused(run_finetune, argv, capsys, message, tmp_path / "run")


@pytest.mark.slow  # 20 s: the pmapped engine's equivalence is also checked by pretraining and GRPO runs
def test_ppo_updates_are_the_same_on_1_and_4_devices(runs):
    """The pmapped update (4 fake CPU devices, each minibatch split 4 ways, gradients psum'd)
    trains the same policy as one device: equal rollouts and metrics to float tolerance."""
    tmp, sft, rm, data = runs
    logs = {}
    for devices in (1, 4):
        out = tmp / f"devices{devices}"
        extra = ["rollout.prompts_per_step=8", f"train.num_devices={devices}", "train.max_steps=2"]
        assert run_finetune(_argv(out, sft, rm, data, extra)) == 0
        logs[devices] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs[1]) == len(logs[4]) == 2
    for one, four in zip(logs[1], logs[4]):
        for key in ("score", "kl", "loss", "value_loss", "pg_loss", "clip_frac"):
            assert four[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key
