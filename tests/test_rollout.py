"""Rollouts: grouping (one prefill a group), masks, log-probs against a full forward pass, the sliced LM head,
right-padding for the reward model, greedy parity with `generate`, one compilation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.train.losses import token_logprobs
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params
from jaxgpt.rl.rollout import (completion_logprobs, completion_texts, pad_prompt_batch,
                               positions_of, right_padded, rollout)

EOS = 3
PROMPTS = [[5, 6, 7], [1, 2, 9, 4, 5, 6], [9]]


def _cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0), **kw})


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(1))
    tokens, mask = pad_prompt_batch(PROMPTS, max_new_tokens=10, context_length=32)
    out = jax.device_get(rollout(params, cfg, tokens, mask, jax.random.key(2), group_size=4, max_new_tokens=10,
                                 temperature=1.0, eos_id=EOS))
    return cfg, params, tokens, mask, out


def test_layout_groups_and_masks(setup):
    cfg, params, tokens, mask, out = setup
    assert tokens.shape == (3, 6) and mask.sum(1).tolist() == [3, 6, 1]
    assert out["tokens"].shape == (12, 16) and out["completion_mask"].shape == (12, 10)
    for i, prompt in enumerate(PROMPTS):
        for g in range(4):  # row i*G + g holds prompt i, left-padded
            row = out["tokens"][i * 4 + g]
            assert row[6 - len(prompt):6].tolist() == prompt
            assert out["attention_mask"][i * 4 + g, :6].sum() == len(prompt)
    cm = out["completion_mask"]
    np.testing.assert_array_equal(out["attention_mask"][:, 6:], cm)
    np.testing.assert_array_equal(cm.sum(1), out["lengths"])
    for r, (row, n) in enumerate(zip(out["tokens"][:, 6:], out["lengths"])):
        assert cm[r].tolist() == [True] * n + [False] * (10 - n)
        assert EOS not in row[: n - 1].tolist()  # a row stops at its first eos
        if n < 10:
            assert row[n - 1] == EOS and (row[n:] == EOS).all()  # then pads with eos
    assert (out["logprobs"][~cm] == 0).all() and (out["logprobs"][cm] < 0).all()
    # The G samples of a prompt differ (sampled, not copies).
    assert len({tuple(r) for r in out["tokens"][:4].tolist()}) > 1


def test_a_group_shares_one_prefill(setup):
    """Each prompt is prefilled once and its KV cache copied to its G rows (`group_size`):
    the samples are those of the prompts repeated G times (ring layers too, Gemma 3's)."""
    from jaxgpt.generation.decode import generate_tokens

    gemma = _cfg(family="gemma3", n_layer=3, n_head=4, n_kv_head=2, head_size=8, mlp_dim=48, qkv_bias=False,
                 tie_embeddings=True, sliding_window=4, sliding_window_pattern=2)
    cfg, params, tokens, mask, out = setup
    for cfg, params, out in [(cfg, params, out), (gemma, init_params(gemma, jax.random.key(1)), None)]:
        kw = dict(max_new_tokens=10, temperature=1.0, eos_id=EOS, method="inverse_cdf")
        out = out or generate_tokens(params, cfg, tokens, mask, jax.random.key(2), group_size=4, **kw)
        rows = generate_tokens(params, cfg, np.repeat(tokens, 4, 0), np.repeat(mask, 4, 0), jax.random.key(2), **kw)
        np.testing.assert_array_equal(out["tokens"][:, -10:], rows["tokens"])
        np.testing.assert_allclose(out["logprobs"], rows["logprobs"], atol=1e-5)


def test_logprobs_match_a_full_forward_pass(setup):
    cfg, params, _, _, out = setup
    model = GPT(cfg)
    lp = np.asarray(completion_logprobs(model, params, out["tokens"], out["attention_mask"], 10))
    cm = out["completion_mask"]
    np.testing.assert_allclose(lp * cm, out["logprobs"], atol=2e-5)  # sampler's KV-cache path
    logits = model.apply({"params": params}, out["tokens"], positions=positions_of(out["attention_mask"]),
                         attention_mask=out["attention_mask"])
    full = np.asarray(token_logprobs(logits, out["tokens"]))[:, -10:]
    np.testing.assert_allclose(lp, full, atol=1e-6)
    # Each row alone, unpadded, gives the same log-probs: padding changes nothing.
    for r in (0, 5, 11):
        real = out["tokens"][r][out["attention_mask"][r]]
        alone = model.apply({"params": params}, real[None])
        own = np.asarray(token_logprobs(alone, real[None]))[0, -out["lengths"][r]:]
        np.testing.assert_allclose(own, lp[r, : out["lengths"][r]], atol=2e-5)


@pytest.mark.parametrize("tie, dtype", [(True, "float32"), (False, "float32"), (True, "bfloat16")])
def test_lm_logits_on_hidden_states_is_the_models_head(tie, dtype):
    cfg = _cfg(tie_embeddings=tie, dtype=dtype)
    params = init_params(cfg, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 97)
    hidden = GPT(cfg).apply({"params": params}, tokens, return_hidden=True)
    logits = GPT(cfg).apply({"params": params}, tokens)
    lm_logits = GPT(cfg).apply({"params": params}, hidden, method=GPT.lm_logits)
    np.testing.assert_array_equal(np.asarray(lm_logits), np.asarray(logits))


def test_greedy_rollout_is_generate(setup):
    from jaxgpt.generation.decode import generate

    cfg, params, tokens, mask, _ = setup
    out = rollout(params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=10, temperature=0.0, eos_id=EOS)
    class Tok:  # token ids as text, so `generate` can run on a 97-token vocabulary
        n_vocab = 97

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    texts = completion_texts(jax.device_get(out), EOS, tokenizer=Tok)
    expected = generate(params, cfg, PROMPTS, max_new_tokens=10, eos_id=EOS, tokenizer=Tok)
    assert texts == expected


def test_same_key_same_rollout_one_compilation(setup):
    from jaxgpt.generation.decode import trace_count

    cfg, params, tokens, mask, out = setup
    before = trace_count()
    again = rollout(params, cfg, tokens, mask, jax.random.key(2), group_size=4, max_new_tokens=10, eos_id=EOS)
    other = rollout(params, cfg, tokens, mask, jax.random.key(5), group_size=4, max_new_tokens=10, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(again["tokens"]), out["tokens"])
    assert not np.array_equal(np.asarray(other["tokens"]), out["tokens"])
    assert trace_count() == before  # same shapes: no retracing


def test_right_padded_for_the_reward_model(setup):
    _, _, _, _, out = setup
    tokens, lengths = map(np.asarray, right_padded(out["tokens"], out["attention_mask"], pad_id=0))
    for r in range(12):
        real = out["tokens"][r][out["attention_mask"][r]]
        assert lengths[r] == len(real)
        np.testing.assert_array_equal(tokens[r, : lengths[r]], real)
        assert (tokens[r, lengths[r]:] == 0).all()


def test_pad_prompt_batch_errors():
    tokens, mask = pad_prompt_batch([[1, 2], [3]], max_new_tokens=3, context_length=8, length=5, pad_id=7)
    assert tokens.tolist() == [[7, 7, 7, 1, 2], [7, 7, 7, 7, 3]] and mask.sum() == 3
    with pytest.raises(UserError, match="exceed the model's context of 8"):
        pad_prompt_batch([[1, 2]], max_new_tokens=7, context_length=8)
    with pytest.raises(UserError, match="longer than the prompt length 2"):
        pad_prompt_batch([[1, 2, 3]], max_new_tokens=1, context_length=8, length=2)
    with pytest.raises(UserError, match="empty prompt"):
        pad_prompt_batch([[1], []], max_new_tokens=1, context_length=8)


def test_completion_texts_cut_at_eos():
    out = {"tokens": np.array([[9, 9, 40, 41, 3, 3], [9, 9, 42, 43, 44, 45]]),
           "completion_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool), "lengths": np.array([3, 4])}
    from jaxgpt.text.gpt2_bpe import decode

    texts = completion_texts(out, EOS, tokenizer=type("T", (), {"decode": staticmethod(lambda ids: ",".join(map(str, ids)))}))
    assert texts == ["40,41", "42,43,44,45"]
    assert completion_texts({**out, "tokens": np.array([[9, 9, 15, 16, 50256, 0]])[:, :6],
                             "lengths": np.array([3]), "completion_mask": np.ones((1, 4), bool)},
                            50256) == [decode([15, 16])]
    # several end ids (Tokenizer.stop_ids): whichever ends the row is dropped
    assert completion_texts(out, (7, 3), tokenizer=type("T", (), {"decode": staticmethod(
        lambda ids: ",".join(map(str, ids)))})) == ["40,41", "42,43,44,45"]


def test_inverse_cdf_sampler_has_the_categorical_distribution():
    """`categorical_inverse_cdf` (the rollout's default token draw) against exact probabilities:
    several blocks, a vocabulary that is not a multiple of the block, zero-probability ids."""
    from jaxgpt.generation.decode import categorical_inverse_cdf

    v = 700  # 3 blocks of 256, the last one partial
    logits = np.full(v, -np.inf, np.float32)
    support = np.array([0, 3, 255, 256, 300, 511, 512, 699])
    probs = np.array([0.05, 0.1, 0.15, 0.2, 0.05, 0.2, 0.15, 0.1])
    logits[support] = np.log(probs)
    n = 40000
    draws = jax.vmap(lambda k: categorical_inverse_cdf(k, jnp.asarray(logits)[None])[0])(jax.random.split(jax.random.key(0), n))
    counts = np.bincount(np.asarray(draws), minlength=v)
    assert counts[np.setdiff1d(np.arange(v), support)].sum() == 0  # never a zero-probability id
    freq = counts[support] / n
    assert np.all(np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / n)), (freq, probs)  # 4 sigma
    # A one-hot distribution, at the very end of the vocabulary, is always drawn.
    onehot = np.full((3, v), -np.inf, np.float32)
    onehot[:, v - 1] = 0.0
    assert np.asarray(categorical_inverse_cdf(jax.random.key(1), jnp.asarray(onehot))).tolist() == [v - 1] * 3


def test_rollout_samplers_agree_in_distribution():
    """The gumbel and inverse-CDF rollouts of one model draw their first token from the same
    distribution (the model's), 256 draws each."""
    cfg = _cfg(vocab_size=32)
    params = init_params(cfg, jax.random.key(7))
    tokens, mask = pad_prompt_batch([[1, 2, 3]] * 256, max_new_tokens=4, context_length=32)
    means = {}
    for method in ("gumbel", "inverse_cdf"):
        out = rollout(params, cfg, tokens, mask, jax.random.key(3), max_new_tokens=4, method=method)
        first = np.asarray(out["tokens"])[:, 6]
        means[method] = np.bincount(first, minlength=32) / len(first)
    exact = np.asarray(jax.nn.softmax(GPT(cfg).apply({"params": params}, jnp.array([[1, 2, 3]]))[0, -1]))
    for method in means:
        np.testing.assert_allclose(means[method], exact, atol=0.08)
