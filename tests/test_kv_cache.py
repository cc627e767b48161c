"""The KV cache's sliding-window rings (Gemma 3): the cache holds only what a window reaches,
and cached calls of any length (prefill, chunks longer or shorter than the ring, decode steps),
with left padding, give the logits of one uncached forward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.config.loading import from_dict
from jaxgpt.generation import generate_tokens
from jaxgpt.models import build_model, init_cache, init_params

_TINY = dict(family="gemma3", vocab_size=97, context_length=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
             head_size=8, mlp_dim=48, dropout=0.0, qkv_bias=False, tie_embeddings=True, sliding_window_pattern=2)
PAD = 3  # row 1's left padding


def _leaf_slots(cache):
    return [layer["k"].shape[1] for layer in cache["layers"]]


def test_sliding_layers_keep_a_ring_of_their_window():
    cfg = ModelConfig(sliding_window=5, **_TINY)
    cache = init_cache(cfg, 2, 19)
    assert _leaf_slots(cache) == [5, 19, 5]  # layer 1 of every 2 is global
    assert cache["layers"][0]["k"].shape == (2 * 2, 5, 8)
    assert _leaf_slots(init_cache(cfg, 1, 4)) == [4, 4, 4]  # a window past the cache: every slot, still a ring


def test_gemma_3_1b_cache_at_32k_slots_is_a_sixth():
    """gemma-3-1b: 26 layers, 4 of them global, the other 22 with a 512-slot window."""
    cfg = from_dict(ModelConfig, {"preset": "gemma-3-1b"})
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 32_768))
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["layers"]))
    every_slot = 2 * cfg.n_layer * cfg.kv_heads * 32_768 * cfg.head_dim
    assert n == 2 * cfg.kv_heads * cfg.head_dim * (4 * 32_768 + 22 * 512)
    assert n / every_slot == pytest.approx(0.167, abs=1e-3)


@pytest.mark.parametrize("window", [4, 32])  # a ring shorter than the calls / as long as the whole cache
def test_cached_calls_of_any_length_equal_one_forward_pass(window):
    cfg = ModelConfig(sliding_window=window, **_TINY)
    params = init_params(cfg, jax.random.key(0))
    model = build_model(cfg)
    t = 19
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, cfg.vocab_size)
    mask = np.ones((2, t), bool)
    mask[1, :PAD] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = model.apply({"params": params}, tokens, positions=positions, attention_mask=mask)

    cache, outs, start = init_cache(cfg, 2, t), [], 0
    apply = jax.jit(lambda c, x, p, m: model.apply({"params": params}, x, positions=p, attention_mask=m, cache=c))
    for n in (6, 1, 1, 3, 1, 7):  # prefill past the ring, decode steps, chunks shorter and longer than it
        s = slice(start, start + n)
        logits, cache = apply(cache, tokens[:, s], positions[:, s], mask[:, s])
        outs.append(logits)
        start += n
    assert start == t and int(cache["index"]) == t
    np.testing.assert_allclose(np.concatenate(outs, 1)[mask], np.asarray(full)[mask], atol=2e-5, rtol=0)


def test_left_padded_generation_equals_each_row_alone():
    """`generate_tokens` (prefill, then a decode loop over the rings) on a left-padded batch
    gives each row the greedy tokens it gets alone."""
    cfg = ModelConfig(sliding_window=4, **_TINY)
    params = init_params(cfg, jax.random.key(2))
    prompts = np.asarray(jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size))
    mask = np.ones_like(prompts, bool)
    mask[1, :PAD] = False
    both = generate_tokens(params, cfg, jnp.asarray(prompts), mask, jax.random.key(0), max_new_tokens=12)
    alone = generate_tokens(params, cfg, jnp.asarray(prompts[1:, PAD:]), mask[1:, PAD:], jax.random.key(0),
                            max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(both["tokens"][1]), np.asarray(alone["tokens"][0]))
