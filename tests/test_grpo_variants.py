"""The GRPO family against implementations we did not write: each variant's loss and its
gradient on fixed inputs equal TRL's `GRPOTrainer._compute_loss` for the same setting (TRL is
a test extra; its loss is called on a stand-in trainer whose model returns our log-probs),
advantage scaling and DAPO's overlong penalty equal NumPy transcriptions of the papers'
formulas and TRL's reward function; degenerate inputs stay finite; the variant table
resolves as documented."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.errors import UserError
from jaxgpt.rl.grpo import group_advantages, grpo_loss, overlong_penalty, process_advantages
from jaxgpt.rl.grpo_variants import VARIANTS, resolve

jax.config.update("jax_enable_x64", False)


def _inputs(seed=0, b=6, n=7, noise=0.3, per_token_adv=False, empty_rows=False):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (b, n)))
    old = logp + rng.normal(0, noise, (b, n))
    ref = logp + rng.normal(0, 0.3, (b, n))
    adv = rng.normal(size=(b, n) if per_token_adv else b)
    lengths = rng.integers(1, n + 1, b)
    if empty_rows:
        lengths[1] = 0
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float64)
    return logp, old, ref, adv, mask


def _ours(logp, old, ref, adv, mask, **kw):
    """loss = sum / count (as the train step divides) and d loss / d logp."""
    def loss(lp):
        s, sums = grpo_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                            jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32), **kw)
        return s / jnp.maximum(sums["count"], 1.0)
    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp, jnp.float32))
    return float(value), np.asarray(grad)


def _trl(loss_type, logp, old, ref, adv, mask, *, eps_low, eps_high, beta, level="token", max_len=None):
    """TRL's `GRPOTrainer._compute_loss` on a stand-in trainer: loss and d loss / d logp."""
    torch = pytest.importorskip("torch")
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    b, n = logp.shape
    identity = lambda x, *a, **k: x
    accelerator = SimpleNamespace(num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity,
                                  sync_gradients=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len or n, accelerator=accelerator,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros((b, 1), dtype=torch.long), "prompt_mask": torch.ones((b, 1), dtype=torch.long),
              "completion_ids": torch.zeros((b, n), dtype=torch.long), "completion_mask": as_t(mask),
              "advantages": as_t(adv), "old_per_token_logps": as_t(old), "ref_per_token_logps": as_t(ref),
              "num_items_in_batch": as_t(mask.sum())}
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy()


# (our loss_type, TRL's loss_type and importance_sampling_level, the noise of log pi_old)
CASES = [("grpo", "grpo", "token", 0.3), ("dr_grpo", "dr_grpo", "token", 0.3), ("dapo", "dapo", "token", 0.3),
         ("gspo", "grpo", "sequence", 3e-4), ("cispo", "cispo", "token", 1.0)]


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["outcome", "process"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("variant, trl_type, level, noise", CASES, ids=[c[0] for c in CASES])
def test_each_variant_equals_trl(variant, trl_type, level, noise, beta, per_token_adv):
    v = VARIANTS[variant]
    logp, old, ref, adv, mask = _inputs(noise=noise, per_token_adv=per_token_adv)
    n = logp.shape[1]
    ours = _ours(logp, old, ref, adv, mask, clip_eps=v["clip_eps"], clip_eps_high=v["clip_eps_high"], kl_beta=beta,
                 loss_agg=v["loss_agg"], ratio_level=v["ratio_level"], form=v["form"], loss_constant=n + 3)
    # TRL's cispo caps the weight at epsilon_high itself; ours clips it to 1 + clip_eps_high.
    high = 1.0 + v["clip_eps_high"] if variant == "cispo" else v["clip_eps_high"]
    theirs = _trl(trl_type, logp, old, ref, adv, mask, eps_low=v["clip_eps"], eps_high=high, beta=beta, level=level,
                  max_len=n + 3)
    assert ours[0] == pytest.approx(theirs[0], rel=2e-5, abs=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-4, atol=1e-6)
    assert np.abs(theirs[1]).max() > 1e-3  # the case has a gradient to compare


def test_variants_clip_where_expected():
    """The inputs above really exercise the clip ranges: some tokens clipped, some not."""
    logp, old, ref, adv, mask = _inputs()
    _, sums = grpo_loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask),
                        clip_eps=0.2, clip_eps_high=0.28, loss_agg="token")
    assert 0.05 < float(sums["clip_frac"] / sums["count"]) < 0.8


def _numpy_advantages(rewards, g, scale, eps=1e-4):
    """The papers' A_i = (r_i - mean(group)) / (std + eps), written out with NumPy loops."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    batch_std = np.std(rewards, ddof=1) if rewards.size > 1 else 0.0
    for start in range(0, len(rewards), g):
        r = rewards[start:start + g]
        std = {"group": np.std(r, ddof=1) if g > 1 else 0.0, "batch": batch_std, "none": None}[scale]
        out[start:start + g] = (r - r.mean()) / (std + eps) if std is not None else r - r.mean()
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantage_scaling_equals_numpy(scale):
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0.5, 0, 0, 3.0])
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, 4, scale=scale)),
                               _numpy_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-6)
    steps = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], np.float64)
    segments = np.array([[0, 1, 2, 2], [0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 3]])
    adv = np.asarray(process_advantages(steps, segments, 2, scale=scale))
    flat = _numpy_advantages(steps.reshape(-1), 6, scale) if scale != "batch" else \
        (steps.reshape(-1) - np.repeat(steps.reshape(2, 6).mean(1), 6)) / (np.std(steps, ddof=1) + 1e-4)
    norm = flat.reshape(4, 3)
    expected = np.array([[norm[i, j:].sum() for j in np.minimum(segments[i], 2)] for i in range(4)])
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)


def test_overlong_penalty_equals_dapo_and_trl():
    lengths = np.array([3, 16, 17, 19, 20])
    got = overlong_penalty(lengths, 20, 4)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.75, -1.0])  # DAPO eq. 13: ((20 - 4) - |y|) / 4
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 4, factor=0.5), got * 0.5)
    rewards = pytest.importorskip("trl.rewards")
    theirs = rewards.get_soft_overlong_punishment(20, 4)([[1] * int(k) for k in lengths])
    np.testing.assert_allclose(got, theirs, atol=1e-7)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_degenerate_inputs_are_finite(variant):
    """Equal rewards, one sample, a fully masked row, every completion masked (all
    truncated): finite losses and gradients, and no gradient without signal."""
    v = VARIANTS[variant]
    kw = dict(clip_eps=v["clip_eps"], clip_eps_high=v["clip_eps_high"], kl_beta=0.0, loss_agg=v["loss_agg"],
              ratio_level=v["ratio_level"], form=v["form"])
    logp, old, ref, _, mask = _inputs(empty_rows=True)
    for scale in ("group", "batch", "none"):
        equal = np.asarray(group_advantages(np.ones(6), 3, scale=scale))
        assert np.all(equal == 0)
        loss, grad = _ours(logp, old, ref, equal, mask, **kw)
        assert np.isfinite(loss) and np.all(grad == 0)
        single = np.asarray(group_advantages([1.0], 1, scale=scale))  # one sample: nothing to compare
        assert np.all(np.isfinite(single)) and single[0] == 0
    adv = np.random.default_rng(1).normal(size=6)
    loss, grad = _ours(logp, old, ref, adv, mask, **kw)  # row 1 has no loss token
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(grad[1] == 0)
    loss, grad = _ours(logp, old, ref, adv, np.zeros_like(mask), **{**kw, "kl_beta": 0.1})  # all truncated
    assert loss == 0.0 and np.all(grad == 0)


def _section(**kw):
    from jaxgpt.tasks.grpo import GRPOSection

    return GRPOSection(**kw)


def test_variant_defaults_and_single_knobs():
    base = resolve(_section(), 24)
    assert (base.loss_agg, base.scale_rewards, base.clip_eps, base.clip_eps_high, base.ratio_level, base.form,
            base.dynamic_sampling, base.overlong, base.kl_beta, base.needs_reference) == \
        ("sequence", "group", 0.2, 0.2, "token", "clip", False, "none", 0.0, False)
    dapo = resolve(_section(loss_type="dapo"), 24)
    assert (dapo.loss_agg, dapo.clip_eps_high, dapo.dynamic_sampling, dapo.overlong, dapo.overlong_buffer) == \
        ("token", 0.28, True, "penalty", 5)
    assert resolve(_section(loss_type="dr_grpo"), 24).scale_rewards == "none"
    assert resolve(_section(loss_type="gspo"), 24).ratio_level == "sequence"
    # Each knob on its own, over a variant's default.
    assert resolve(_section(loss_type="dapo", dynamic_sampling=False), 24).dynamic_sampling is False
    assert resolve(_section(loss_type="dapo", scale_rewards="batch"), 24).scale_rewards == "batch"
    assert resolve(_section(loss_agg="constant"), 24).loss_agg == "constant"
    assert resolve(_section(ratio_level="sequence"), 24).ratio_level == "sequence"
    assert resolve(_section(clip_eps_high=0.3), 24).clip_eps_high == 0.3
    assert resolve(_section(clip_eps=0.1, clip_eps_high=0.0), 24).clip_eps_high == 0.1  # 0 = clip_eps
    assert resolve(_section(normalize_std=False), 24).scale_rewards == "none"  # the earlier spelling
    assert resolve(_section(kl_beta=0.02), 24).needs_reference and resolve(_section(log_kl=True), 24).needs_reference
    assert resolve(_section(overlong="mask", overlong_buffer=3), 24).overlong_buffer == 3


@pytest.mark.parametrize("kw, message", [
    (dict(loss_type="ppo"), "grpo.loss_type must be one of"),
    (dict(clip_eps=0.3, clip_eps_high=0.2), "grpo.clip_eps_high (0.2) must be >= grpo.clip_eps (0.3)"),
    (dict(loss_type="dapo", clip_eps_high=0.1), "must be >= grpo.clip_eps"),
    (dict(kl_beta=-0.01), "grpo.kl_beta must be >= 0"),
    (dict(scale_rewards="batch", normalize_std=False), "contradicts grpo.scale_rewards"),
    (dict(max_sampling_tries=0), "grpo.max_sampling_tries must be >= 1"),
    (dict(loss_type="dapo", overlong_buffer=30), "exceeds rollout.max_new_tokens"),
])
def test_bad_settings(kw, message):
    with pytest.raises(UserError, match=pytest.importorskip("re").escape(message)):
        resolve(_section(**kw), 24)
