"""`jaxgpt.models.attention`: blockwise (flash-style) attention equals the reference, forward and
gradients, for every mask the model builds; dropout is honoured and the backward pass uses the
forward's mask; `model.attention=blockwise` gives the reference's logits, grads and generations.

Shapes are small and tiles of 8 over lengths of 20, so every case spans several tiles and a
padded last tile. Tolerances: float32 1e-5 absolute (observed ~1e-6), bfloat16 3e-2.
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.models import attention
from jaxgpt.models.attention import (
    blockwise_attention,
    choose_attention,
    dropout_keep_mask,
    one_query_attention,
    reference_attention,
)
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params
from jaxgpt.generation.decode import _generate_jit as decode_jit, generate_tokens

B, T, H, D, TILE = 2, 20, 2, 8, 8
ATOL = 1e-5


def _qkvg(q_len=T, kv_len=T, dtype=jnp.float32, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, q_len, H, D), dtype), jax.random.normal(kk, (B, kv_len, H, D), dtype),
            jax.random.normal(kv, (B, kv_len, H, D), dtype), jax.random.normal(kg, (B, q_len, H, D), dtype))


def _model_mask(q_len, kv_len, start, key_valid):
    """The mask `GPT.hidden_states` builds: causal over slots, padding keys off, own slot on."""
    q_slots, k_slots = start + jnp.arange(q_len), jnp.arange(kv_len)
    causal = k_slots[None, :] <= q_slots[:, None]
    return (causal[None, None] & key_valid[:, None, None, :]) | (k_slots[None, :] == q_slots[:, None])[None, None]


def _out_and_grads(fn, q, k, v, g):
    """fn's output and its vjp with cotangent g: (out, dq, dk, dv)."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))


def _assert_close(got, want, atol=ATOL, what=""):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                                   err_msg=f"{what} {name}")


LEFT_PAD = jnp.arange(T)[None, :] >= jnp.array([[0], [7]])  # row 1: 7 padding tokens first
CAUSAL = _model_mask(T, T, 0, jnp.ones((B, T), bool))
CASES = {  # name: (q_len, mask; None = is_causal)
    "causal": (T, None),
    # left padding, and one row with every key masked (the reference: the mean of v)
    "padding": (T, _model_mask(T, T, 0, LEFT_PAD).at[1, :, 4].set(False)),
    "decode-q1": (1, _model_mask(1, T, 13, LEFT_PAD)),  # a cache of T slots, 13 filled
    "decode-q3": (3, _model_mask(3, T, 11, LEFT_PAD)),
}


def test_blockwise_equals_reference():
    """Every case in one jit (one compile): output and q, k, v gradients, float32 1e-5."""
    def blockwise(mask):
        if mask is None:
            return lambda q, k, v: blockwise_attention(q, k, v, is_causal=True, block_q=TILE, block_k=TILE)
        return lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=TILE, block_k=TILE)

    @jax.jit
    def run(q, k, v, g):
        out = {}
        for name, (q_len, mask) in CASES.items():
            args = (q[:, :q_len], k, v, g[:, :q_len])
            ref_mask = CAUSAL if mask is None else mask
            out[name] = (_out_and_grads(blockwise(mask), *args),
                         _out_and_grads(lambda q, k, v, m=ref_mask: reference_attention(q, k, v, m), *args))
        return out

    for name, (got, want) in run(*_qkvg()).items():
        _assert_close(got, want, what=name)


def test_blockwise_bfloat16():
    """bf16 inputs (float32 scores and accumulators) stay within bf16 rounding of the reference
    and keep their dtype."""
    causal = lambda q, k, v: blockwise_attention(q, k, v, is_causal=True, block_q=TILE, block_k=TILE)
    ref = lambda q, k, v: reference_attention(q, k, v, CAUSAL)
    got, want = jax.jit(lambda *a: (_out_and_grads(causal, *a), _out_and_grads(ref, *a)))(*_qkvg(dtype=jnp.bfloat16))
    assert got[0].dtype == jnp.bfloat16
    _assert_close(got, want, atol=3e-2, what="bf16")


def test_dropout_is_honoured_and_the_backward_uses_the_forwards_mask():
    rate = 0.3
    drop = lambda rng: lambda q, k, v: blockwise_attention(q, k, v, is_causal=True, block_q=TILE, block_k=TILE,
                                                           dropout_rate=rate, dropout_rng=rng)

    @jax.jit
    def run(q, k, v, g, rng, other):
        keep = dropout_keep_mask(rng, (B, H, T, T), dropout_rate=rate, block_q=TILE, block_k=TILE)

        def explicit(q, k, v):  # softmax, then the very same keep mask, by plain autodiff
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
            w = jax.nn.softmax(jnp.where(CAUSAL, s, jnp.finfo(jnp.float32).min), axis=-1)
            return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, w / (1 - rate), 0.0), v)

        return (_out_and_grads(drop(rng), q, k, v, g), _out_and_grads(explicit, q, k, v, g), keep.mean(),
                drop(rng)(q, k, v), drop(other)(q, k, v), reference_attention(q, k, v, CAUSAL))

    got, want, keep_rate, again, other, undropped = run(*_qkvg(), jax.random.key(5), jax.random.key(6))
    _assert_close(got, want, what="dropout")  # forward and backward drew the same mask
    np.testing.assert_array_equal(got[0], again)  # deterministic for a key
    assert np.abs(np.asarray(got[0] - other)).max() > 1e-2
    assert np.abs(np.asarray(got[0] - undropped)).max() > 1e-2  # not silently dropped
    assert abs(float(keep_rate) - (1 - rate)) < 0.05


def test_choose_attention_on_cpu():
    pick = lambda kind, dropout=0.0, kv_len=64, is_causal=True, q_len=0: choose_attention(
        kind, dtype=jnp.float32, dropout=dropout, kv_len=kv_len, is_causal=is_causal, q_len=q_len)
    assert pick("auto") == "reference"
    assert pick("auto", kv_len=attention.AUTO_BLOCKWISE_MIN_KV_CAUSAL) == "blockwise"
    assert pick("auto", kv_len=attention.AUTO_BLOCKWISE_MIN_KV_CAUSAL, is_causal=False) == "reference"
    assert pick("auto", kv_len=attention.AUTO_BLOCKWISE_MIN_KV_MASKED, is_causal=False) == "blockwise"
    # a padding mask over the queries' own slots skips tiles as the causal kernel does
    assert choose_attention("auto", dtype=jnp.float32, dropout=0.0, kv_len=attention.AUTO_BLOCKWISE_MIN_KV_CAUSAL,
                            is_causal=False, causal_mask=True) == "blockwise"
    assert pick("xla") == "xla" and pick("cudnn") == "cudnn" and pick("blockwise", dropout=0.1) == "blockwise"
    assert pick("xla", dropout=0.1) == "reference" and pick("cudnn", dropout=0.1) == "reference"
    # a decode step (one query over the cache) reads the cache in place, whatever its length
    for kind in ("reference", "auto"):
        assert pick(kind, q_len=1, is_causal=False) == pick(kind, q_len=1, kv_len=4096, is_causal=False) == "one_query"
        assert pick(kind, q_len=2, is_causal=False) != "one_query"
    assert pick("blockwise", q_len=1) == "blockwise" and pick("xla", q_len=1) == "xla"
    assert pick("reference", q_len=1, dropout=0.1) == "reference"


@pytest.mark.parametrize("kv_heads", [H, 1])
@pytest.mark.parametrize("q_len", [1, 3])
def test_one_query_attention_equals_reference(kv_heads, q_len):
    """The decode-step kernel, for one and several queries, plain and grouped-query K/V, with
    the model's cache masks (a padded row, queries at the end of a partly filled cache) and in
    bfloat16."""
    heads, s = 4, 11
    q = jax.random.normal(jax.random.key(0), (B, q_len, heads, D))
    k, v = (jax.random.normal(jax.random.key(i), (B, s, kv_heads, D)) for i in (1, 2))
    key_valid = (jnp.arange(s)[None, :] >= jnp.array([[0], [4]])) & (jnp.arange(s) < 9)
    mask = _model_mask(q_len, s, 9 - q_len, key_valid)
    want = reference_attention(q, k, v, mask)
    np.testing.assert_allclose(one_query_attention(q, k, v, mask), want, atol=ATOL)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = one_query_attention(*bf, mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), reference_attention(*bf, mask).astype(jnp.float32), atol=3e-2)


def _hlo_instructions(text):
    """name -> (opcode, operand names, called computation, computation it is in) of every
    instruction of an optimised HLO module's text, and computation -> its ROOT's opcode."""
    instrs, roots, comp = {}, {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            comp = head.group(1)
        m = re.match(r"^\s+(ROOT )?%(\S+) = .*?\b([a-z][\w-]*)\(([^)]*)\)", line)
        if m:
            calls = re.search(r"(?:calls|body)=%([\w.-]+)", line)
            instrs[m.group(2)] = (m.group(3), re.findall(r"%([\w.-]+)", m.group(4)), calls and calls.group(1), comp)
            if m.group(1):
                roots[comp] = m.group(3)
    return instrs, roots


def test_decode_steps_read_the_kv_cache_in_place(tiny_model_cfg):
    """In the compiled decode loop every dot that reads the KV cache reads the loop's own
    buffer, updated in place: no per-step copy or transpose of any layer's cache (the
    einsum over a `[batch, len, heads, head_dim]` cache cost XLA:CPU two transposed copies
    per layer and token, ~13% of a gpt2-124m decode step)."""
    cfg, p, n = tiny_model_cfg, 5, 7
    args = (_params(cfg), jnp.zeros((1, p), jnp.int32), jnp.ones((1, p), bool), jax.random.key(0),
            jnp.float32(0), jnp.float32(1))
    text = decode_jit.lower(*args, config=cfg, max_new_tokens=n, greedy=True, top_k=None, use_top_p=False,
                            eos_id=None, pad_id=0, vocab_limit=None).compile().as_text()
    instrs, roots = _hlo_instructions(text)
    loop = {called for op, _, called, _ in instrs.values() if op == "while"}
    assert len(loop) == 1
    cache_elems = cfg.kv_heads * (p + n) * cfg.head_dim
    sizes = {name: int(np.prod([int(x) for x in dims.split(",") if x])) for name, dims in
             re.findall(r"^\s+(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]", text, re.M)}
    cache_reads = 0
    for name, (opcode, operands, _, comp) in instrs.items():
        for src in operands if opcode == "dot" and comp in loop else ():
            if sizes.get(src) != cache_elems:
                continue
            while instrs[src][0] == "bitcast":
                src = instrs[src][1][0]
            op, _, called, _ = instrs[src]
            cache_reads += 1
            assert op == "get-tuple-element" or (op == "fusion" and roots.get(called) == "dynamic-update-slice"), \
                f"{name} reads the cache through {src} ({op}: a copy)"
    assert cache_reads == 2 * cfg.n_layer  # K and V of every layer


@pytest.fixture
def small_tiles(monkeypatch):
    """The model calls blockwise_attention with the default tiles: make them span several."""
    monkeypatch.setattr(attention, "BLOCK_Q", TILE)
    monkeypatch.setattr(attention, "BLOCK_K", TILE)


@functools.lru_cache
def _params(cfg):
    """Params for `cfg`, initialised once per config under jit (eager flax init is slow)."""
    return jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))


def test_gpt_blockwise_matches_reference(tiny_model_cfg, small_tiles):
    """Logits (causal and padded) and their gradients, and a greedy KV-cache generation."""
    ref_cfg, blk_cfg = tiny_model_cfg, dataclasses.replace(tiny_model_cfg, attention="blockwise")
    params = _params(ref_cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, T), 0, ref_cfg.vocab_size)
    pad = jnp.arange(T)[None, :] >= jnp.array([[0], [5], [12]])

    @functools.partial(jax.jit, static_argnums=1)
    def logits_and_grads(params, cfg):
        apply = lambda p: (GPT(cfg).apply({"params": p}, tokens),  # is_causal: no mask array
                           GPT(cfg).apply({"params": p}, tokens, attention_mask=pad))
        logits, vjp = jax.vjp(apply, params)
        return logits, vjp(jax.tree_util.tree_map(lambda x: 2 * x / x.size, logits))  # of mean(logits ** 2)

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5),
                           logits_and_grads(params, ref_cfg), logits_and_grads(params, blk_cfg))

    prompt_mask = pad[:, :9] | (jnp.arange(9) == 8)  # left-padded, one real token at least
    gen = lambda cfg: generate_tokens(params, cfg, tokens[:, :9], prompt_mask, jax.random.key(2),
                                      max_new_tokens=8)["tokens"]
    np.testing.assert_array_equal(gen(ref_cfg), gen(blk_cfg))  # greedy: prefill, then q_len 1 decode


def test_gpt_blockwise_dropout_trains(tiny_model_cfg, small_tiles, monkeypatch):
    """Training with dropout hands the rate and a key to the blockwise kernel (whose dropout
    the tests above check); the result is deterministic per key and changes with the key."""
    import jaxgpt.models.layers

    seen = []
    spy = lambda *a, **kw: seen.append((kw["dropout_rate"], kw["dropout_rng"] is not None)) or blockwise_attention(*a, **kw)
    monkeypatch.setattr(jaxgpt.models.layers, "blockwise_attention", spy)
    cfg = dataclasses.replace(tiny_model_cfg, attention="blockwise", dropout=0.5)
    params = _params(tiny_model_cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    train = jax.jit(lambda p, key: GPT(cfg).apply({"params": p}, tokens, deterministic=False, rngs={"dropout": key}))
    a, b, c = (train(params, jax.random.key(seed)) for seed in (3, 3, 4))
    assert seen == [(0.5, True)] * cfg.n_layer  # traced once
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-3


@pytest.mark.parametrize("window, group", [(1, 1), (5, 2), (30, 2)])
def test_sliding_window_kernels_equal_the_reference_with_the_windowed_mask(window, group):
    """Causal attention within the `window` latest keys (Gemma 3's local layers): blockwise in
    4 x 4 tiles (skipping tiles outside the window, in the backward pass too) and XLA's fused
    kernel (`local_window_size`) generate the window themselves; values and gradients equal
    the reference given the window as a mask (float32, grouped K/V folded into the rows)."""
    from jaxgpt.models.attention import blockwise_attention, fused_attention, reference_attention

    b, t, kv, d = 2, 21, 2, 8
    keys = jax.random.split(jax.random.key(window), 3)
    q = jax.random.normal(keys[0], (b, t, kv * group, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
    pos = jnp.arange(t)
    mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window))[None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    want = jax.value_and_grad(loss(lambda q, k, v: reference_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for fn in (lambda q, k, v: blockwise_attention(q, k, v, is_causal=True, window=window, block_q=4, block_k=4),
               lambda q, k, v: fused_attention(q, k, v, None, implementation="xla", is_causal=True, window=window)):
        got = jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for g, w in zip(got[1], want[1]):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_padded_model_call_skips_the_tiles_above_the_diagonal(monkeypatch):
    """A padded batch without a cache (RL updates, rollout scoring): blockwise reads the padding
    mask *and* skips the tiles above the diagonal and outside a sliding window; a cached call
    (keys are not the queries' slots) reads its mask alone. Logits and gradients of a padded
    Gemma 3 (window 6 in tiles of 4) equal the reference's."""
    from jaxgpt.config import ModelConfig
    from jaxgpt.models import build_model, init_cache, layers

    cfg = ModelConfig(family="gemma3", vocab_size=97, context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      mlp_dim=48, head_size=8, qkv_bias=False, dropout=0.0, sliding_window=6, sliding_window_pattern=2)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 97)
    pad = jnp.arange(24)[None] >= jnp.array([[0], [7]])  # the second row left-padded
    calls = []
    real = layers.blockwise_attention

    def spy(q, k, v, mask=None, **kw):
        calls.append((mask is not None, kw["is_causal"], kw["window"]))
        return real(q, k, v, mask, block_q=4, block_k=4, **{n: a for n, a in kw.items() if n not in ("block_q", "block_k")})

    monkeypatch.setattr(layers, "blockwise_attention", spy)

    def loss_and_grads(kind):
        model = build_model(dataclasses.replace(cfg, attention=kind))
        f = lambda p: model.apply({"params": p}, tokens, attention_mask=pad).astype(jnp.float32).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (want, want_g), (got, got_g) = loss_and_grads("reference"), loss_and_grads("blockwise")
    assert calls == [(True, True, 6), (True, True, 0)]  # local layer, global layer: mask, causal and window
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(  # on each leaf's scale (Gemma's embedding)
        a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max()))), got_g, want_g)

    calls.clear()
    global_cfg = dataclasses.replace(cfg, attention="blockwise", sliding_window=0)
    cache = init_cache(global_cfg, 2, 32)  # a prefill of 24 of 32 slots: keys are not the queries
    model = build_model(global_cfg)
    jax.jit(lambda p, c: model.apply({"params": p}, tokens, attention_mask=pad, cache=c))(params, cache)
    assert calls == [(True, False, 0)] * 2
