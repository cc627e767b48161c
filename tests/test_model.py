import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import PRESETS, ModelConfig, load_config
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import count_params, init_cache, init_params, param_shapes
from jaxgpt.models.attention import reference_attention


def test_gpt2_124m_parameter_counts():
    gpt2 = load_config(None, ["model.preset=gpt2-124m"]).model
    assert count_params(param_shapes(gpt2)) == 124_439_808  # as GPT-2 has them
    book = dataclasses.replace(gpt2, qkv_bias=False, tie_embeddings=False)
    assert count_params(param_shapes(book)) == 163_009_536  # the book's GPTModel


def test_gpt2_parameter_names(tiny_model_cfg):
    params = init_params(tiny_model_cfg, jax.random.key(0))
    assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
    block = params["h_0"]
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
    assert block["attn"]["c_attn"]["kernel"].shape == (32, 96)
    assert block["mlp"]["c_fc"]["kernel"].shape == (32, 128)
    untied = init_params(dataclasses.replace(tiny_model_cfg, tie_embeddings=False, qkv_bias=False), jax.random.key(0))
    assert untied["lm_head"]["kernel"].shape == (32, 97)
    assert "bias" not in untied["h_0"]["attn"]["c_attn"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def _tokens(cfg, b=3, t=20, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def test_causality(tiny_model_cfg):
    """Changing a later token never changes earlier logits."""
    cfg = tiny_model_cfg
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size)
    a = GPT(cfg).apply({"params": params}, tokens)
    b = GPT(cfg).apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-4


def test_fused_attention_matches_reference(tiny_model_cfg):
    """jax.nn.dot_product_attention (XLA) agrees with the plain einsum attention."""
    params = init_params(tiny_model_cfg, jax.random.key(0))
    tokens = _tokens(tiny_model_cfg)
    ref = GPT(tiny_model_cfg).apply({"params": params}, tokens)
    xla = GPT(dataclasses.replace(tiny_model_cfg, attention="xla")).apply({"params": params}, tokens)
    np.testing.assert_allclose(xla, ref, atol=2e-5, rtol=1e-5)
    # With a padding mask too (the explicit-mask path of the fused kernel).
    mask = jnp.arange(20)[None, :] < jnp.array([[20], [15], [7]])
    ref = GPT(tiny_model_cfg).apply({"params": params}, tokens, attention_mask=mask)
    xla = GPT(dataclasses.replace(tiny_model_cfg, attention="xla")).apply({"params": params}, tokens, attention_mask=mask)
    np.testing.assert_allclose(xla, ref, atol=2e-5, rtol=1e-5)


def test_reference_attention_closed_form():
    """One query, two keys: weights are softmax(q.k / sqrt(d)) by hand."""
    q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    v = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    w = np.exp([1 / np.sqrt(2), 0.0])
    w = w / w.sum()
    out = reference_attention(q, k, v, jnp.ones((1, 1, 1, 2), bool))
    np.testing.assert_allclose(out.reshape(2), w @ np.array([[1.0, 2.0], [3.0, 4.0]]), rtol=1e-6)


def test_kv_cache_matches_full_forward(tiny_model_cfg):
    cfg = tiny_model_cfg
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg, b=2, t=12)
    full = GPT(cfg).apply({"params": params}, tokens)
    cache = init_cache(cfg, 2, 16)
    step = jax.jit(lambda tokens, cache: GPT(cfg).apply({"params": params}, tokens, cache=cache))
    logits, cache = step(tokens[:, :5], cache)
    outs = [logits]
    for i in range(5, 12):
        logits, cache = step(tokens[:, i : i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    assert int(cache["index"]) == 12


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    tokens = _tokens(cfg)
    logits = GPT(cfg).apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    ref = GPT(tiny_model_cfg).apply({"params": params}, tokens)
    assert np.abs(np.asarray(logits - ref)).max() < 0.1  # bf16 rounding, same function


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_same_values_and_grads(tiny_model_cfg, policy):
    params = init_params(tiny_model_cfg, jax.random.key(0))
    tokens = _tokens(tiny_model_cfg)
    loss = lambda cfg: lambda p: GPT(cfg).apply({"params": p}, tokens).mean()
    g1 = jax.grad(loss(tiny_model_cfg))(params)
    g2 = jax.grad(loss(dataclasses.replace(tiny_model_cfg, remat=True, remat_policy=policy)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_remat_recomputes_on_xla_cpu_too():
    """`remat` (nothing_saveable) must lower the compiled step's temporaries on XLA:CPU,
    where `jax.checkpoint` saves nothing (its barriers are expanded, then CSE undoes the
    recomputation); and the custom VJP's gradients, dropout key included, equal autodiff's."""
    from jaxgpt.models.recompute import recompute_after_cotangent

    cfg = ModelConfig(vocab_size=97, context_length=128, n_layer=4, n_head=2, n_embd=64, dropout=0.0)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def temp_bytes(remat):
        model = GPT(dataclasses.replace(cfg, remat=remat))
        grad = jax.grad(lambda p, t: model.apply({"params": p}, t, return_hidden=True).sum())
        return jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 0.6 * temp_bytes(False)

    def fn(w, x, key):
        keep = jax.random.bernoulli(key, 0.7, x.shape)
        return jnp.tanh(jnp.where(keep, x, 0.0) @ w) ** 2

    w, x = jax.random.normal(jax.random.key(1), (8, 8)), jax.random.normal(jax.random.key(2), (4, 8))
    want = jax.grad(lambda w, x: fn(w, x, jax.random.key(3)).sum(), (0, 1))(w, x)
    got = jax.grad(lambda w, x: recompute_after_cotangent(fn)(w, x, jax.random.key(3)).sum(), (0, 1))(w, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_blocks_cast_their_weights_one_at_a_time():
    """Under `recompute_after_cotangent` a block's bfloat16 weights are cast to float32 (and,
    sharded, gathered) only when the block runs: XLA:CPU otherwise casts all 12 at the start
    and holds them through the forward pass (12 MiB here; 36 GiB per device for qwen3-8b)."""
    from jaxgpt.models.recompute import recompute_after_cotangent

    n_blocks, d = 12, 512
    block = lambda w, x: jnp.tanh(x @ w.astype(jnp.float32))  # noqa: E731

    def loss(ws, x):
        for w in ws:
            x = recompute_after_cotangent(block)(w, x)
        return x.sum()

    ws = [jax.ShapeDtypeStruct((d, d), jnp.bfloat16)] * n_blocks
    temp = jax.jit(jax.grad(loss)).lower(ws, jax.ShapeDtypeStruct((8, d), jnp.float32)).compile()
    assert temp.memory_analysis().temp_size_in_bytes <= 3 * d * d * 4  # a few cast weights, not 12


def test_gelu_tanh_equals_autodiff_and_keeps_only_its_input():
    """`recompute.gelu_tanh` (the MLP's GELU) against `jax.nn.gelu(approximate=True)`:
    values and gradients (float32 rtol 1e-5, bfloat16 inputs within bf16 rounding of the
    float32 derivative), second
    derivative included; and a stack of GELU MLPs compiles with fewer temporaries, since
    only the GELU's input is kept for the backward pass."""
    from jaxgpt.models.recompute import gelu_tanh

    x = jnp.linspace(-8.0, 8.0, 4001)
    ref = lambda x: jax.nn.gelu(x, approximate=True)
    np.testing.assert_allclose(gelu_tanh(x), ref(x), rtol=1e-6, atol=1e-6)
    for f in (jax.grad, lambda f: jax.grad(jax.grad(f))):
        np.testing.assert_allclose(jax.vmap(f(gelu_tanh))(x), jax.vmap(f(ref))(x), rtol=1e-5, atol=1e-6)
    xb = x.astype(jnp.bfloat16)  # the derivative in float32, rounded once: within bf16's 2^-8
    got, want = jax.vmap(jax.grad(gelu_tanh))(xb), jax.vmap(jax.grad(ref))(xb.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2**-8, atol=1e-6)

    def temp_bytes(act):
        def loss(ws, x):
            for w1, w2 in ws:
                x = x + act(x @ w1) @ w2
            return x.sum()

        ws = [(jax.ShapeDtypeStruct((64, 256), jnp.float32),) * 2 for _ in range(4)]
        ws = [(a, jax.ShapeDtypeStruct((256, 64), jnp.float32)) for a, _ in ws]
        x = jax.ShapeDtypeStruct((512, 64), jnp.float32)
        return jax.jit(jax.grad(loss)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(gelu_tanh) < 0.8 * temp_bytes(ref)


def test_layer_norm_equals_flax_and_keeps_only_its_input():
    """`recompute.LayerNorm` against `flax.linen.LayerNorm`: the same parameter tree, values
    (float32 output rtol 1e-6; bfloat16 output equal) and gradients w.r.t. x, scale and bias
    (rtol 1e-5); and a stack of LayerNorm + dense layers compiles with fewer temporaries."""
    from jaxgpt.models.recompute import LayerNorm

    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 16, 96))
    g = jax.random.normal(jax.random.key(1), x.shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        ours, theirs = LayerNorm(1e-5, dtype=dtype), nn.LayerNorm(1e-5, dtype=dtype)
        params = ours.init(jax.random.key(2), x)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(theirs.init(jax.random.key(2), x))
        params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
        y, y_ref = ours.apply(params, x), theirs.apply(params, x)
        assert y.dtype == y_ref.dtype == dtype
        np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=1e-6, atol=1e-6)
    loss = lambda m: lambda p, x: jnp.sum(m.apply(p, x) * g)
    got = jax.grad(loss(LayerNorm(1e-5)), (0, 1))(params, x)
    want = jax.grad(loss(nn.LayerNorm(1e-5)), (0, 1))(params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)

    def temp_bytes(norm):
        def loss(ws, x):
            for w in ws:
                x = x + norm.apply(params, x) @ w
            return x.sum()

        ws = [jax.ShapeDtypeStruct((96, 96), jnp.float32)] * 6
        return jax.jit(jax.grad(loss)).lower(ws, jax.ShapeDtypeStruct((2048, 96), jnp.float32)).compile() \
            .memory_analysis().temp_size_in_bytes

    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    assert temp_bytes(LayerNorm(1e-5)) < 0.8 * temp_bytes(nn.LayerNorm(1e-5))


def test_dropout_is_active_only_in_training(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, dropout=0.5)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    model = GPT(cfg)
    eval1 = model.apply({"params": params}, tokens)
    eval2 = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(eval1, eval2)
    train = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert np.abs(np.asarray(train - eval1)).max() > 1e-3


@pytest.mark.parametrize("name", [p for p in PRESETS if p.startswith("gpt2")])  # others: test_llama_qwen.py
def test_presets_shapes(name):
    cfg = load_config(None, [f"model.preset={name}"]).model
    shapes = param_shapes(cfg)
    d = cfg.n_embd
    assert shapes["h_0"]["attn"]["c_attn"]["kernel"].shape == (d, 3 * d)
    assert len([k for k in shapes if k.startswith("h_")]) == cfg.n_layer
