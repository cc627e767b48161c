"""The dense layers' matmuls (`jaxgpt/models/matmuls.py`): bf16 compute on CPU with float32
accumulation (forward, backward and decode, reading bf16 weights), one-row products as row
blocks, and `[batch, seq, in]` layers as one 2-D matmul."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params, param_shapes


def test_cpu_bf16_dense_matmul_accumulates_in_float32():
    """bfloat16 compute on CPU runs every `nn.Dense` through `cpu_bf16_dot_general` (bf16 in,
    float32 accumulation, bf16 out, in both backward matmuls too): values and gradients equal
    float32's within bf16 rounding, and other dimension numbers fall through to lax."""
    from jaxgpt.models.matmuls import cpu_bf16_dot_general

    x = jax.random.normal(jax.random.key(0), (4, 8, 64)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (64, 32)) / 8).astype(jnp.bfloat16)
    dims = (((2,), (0,)), ((), ()))
    mm = lambda x, w: cpu_bf16_dot_general(x, w, dims)  # noqa: E731
    f32 = lambda x, w: jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims)  # noqa: E731
    assert mm(x, w).dtype == jnp.bfloat16
    np.testing.assert_allclose(mm(x, w).astype(jnp.float32), f32(x, w), rtol=2**-7, atol=2e-2)
    ct = jax.random.normal(jax.random.key(2), (4, 8, 32)).astype(jnp.bfloat16)
    got = jax.vjp(mm, x, w)[1](ct)
    want = jax.vjp(f32, x, w)[1](ct.astype(jnp.float32))
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=2**-7, atol=5e-2)
    batched = (((2,), (2,)), ((0,), (0,)))  # not a dense layer's: lax's own dot
    y = jax.random.normal(jax.random.key(3), (4, 16, 64)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(cpu_bf16_dot_general(x, y, batched), jax.lax.dot_general(x, y, batched))
    cfg = ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    params = init_params(cfg, jax.random.key(4))
    tokens = jnp.arange(16)[None] % 97
    lo = GPT(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, tokens)
    hi = GPT(cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(lo, hi, atol=0.05)


def _compiled_dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in `fn`'s optimised CPU HLO."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    dtype_of = dict(re.findall(r"%(\S+) = (\w+)\[", text))
    return [(dtype_of.get(a, "?"), dtype_of.get(b, "?")) for a, b in re.findall(r" dot\(%(\S+), %(\S+)\)", text)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot selection")
def test_cpu_bf16_backward_matmuls_stay_in_bf16():
    """The backward matmuls of a bf16 dense layer and of the fused LM head (cross-entropy and
    log-probs) run as bf16 dots (`matmuls.loop_carried_dots`): written plainly (`g @ w.T`, `x.T @ g`) XLA:CPU converts
    their operands to float32 and runs them at float32 speed. Checked on the compiled HLO
    wherever this XLA runs a plain bf16 matmul in bf16 at all; the gradients equal
    float32's within bf16 rounding, for matrix and vector shapes."""
    from jaxgpt.models.matmuls import matmul_2d
    from jaxgpt.train.losses import head_cross_entropy, head_logprobs

    bf, f32 = jnp.bfloat16, jnp.float32
    x = jax.random.normal(jax.random.key(0), (64, 96)).astype(bf)
    w = (jax.random.normal(jax.random.key(1), (96, 80)) / 8).astype(bf)
    if _compiled_dot_operand_dtypes(lambda x, w: jnp.dot(x, w, preferred_element_type=f32), x, w) != [("bf16", "bf16")]:
        pytest.skip("this XLA:CPU converts every bf16 dot to float32")

    def dense_loss(x, w):
        return jnp.sum(matmul_2d(x, w, cpu_bf16=True).astype(f32) ** 2)

    def head_loss(h, k):
        return head_cross_entropy(h, k, jnp.arange(h.shape[0]) % 80, chunk_size=32)[0]

    def logprob_loss(h, k):  # DPO's and RL's log-probs: the head recomputed in the backward pass
        tokens = (jnp.arange(h.shape[0] + 1) * 7 % 80)[None]
        return jnp.sum(head_logprobs(jnp.concatenate([h, h[:1]])[None], k, tokens, chunk_size=32))

    for loss in (dense_loss, head_loss, logprob_loss):
        dtypes = _compiled_dot_operand_dtypes(jax.grad(loss, (0, 1)), x, w)
        assert len(dtypes) >= 3 and all(d == ("bf16", "bf16") for d in dtypes), (loss.__name__, dtypes)
        for shape in ((64, 96), (1, 96), (3, 96)):  # matrix, vector and tiny (XLA's own emitters)
            xs = x[: shape[0]]
            got = jax.grad(loss, (0, 1))(xs, w)
            want = jax.grad(lambda a, b: loss(a.astype(f32), b.astype(f32)), (0, 1))(xs, w)
            for a, b in zip(got, want):
                assert a.dtype == bf
                np.testing.assert_allclose(a.astype(f32), b, rtol=2**-6, atol=2e-2 * float(jnp.max(jnp.abs(b))))


def _weight_dots(text: str, shapes: set[str]) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of the dots in compiled HLO `text` that read an operand of
    one of `shapes` (e.g. "256,768")."""
    shape_of = dict(re.findall(r"%(\S+) = \w+\[([\d,]*)\]", text))
    dtype_of = dict(re.findall(r"%(\S+) = (\w+)\[", text))
    return [(dtype_of.get(a, "?"), dtype_of.get(b, "?")) for a, b in re.findall(r" dot\(%(\S+), %(\S+)\)", text)
            if shape_of.get(a) in shapes or shape_of.get(b) in shapes]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot selection")
@pytest.mark.parametrize("rows,weights", [(1, "float32"), (3, "float32"), (1, "bfloat16")])
def test_cpu_bf16_decoding_reads_bf16_weights(rows, weights):
    """bf16 decoding on CPU multiplies by the bf16 weights, the tied head included: a one-row
    dot goes in as two rows (`matmuls.two_rows`) and the head contracts the embedding on its
    own d (`decode_tied_head`), and embedding rows are gathered from the stored table
    (`layers.Embed`, `take_rows`). Plainly written, XLA:CPU ran them in float32 and hoisted the
    weights' conversion out of the decode loop: a float32 copy of every weight held while
    decoding (1.8-2.3x the float32 params' bytes of temporaries here, with float32 or bf16
    weights; now the bf16 copy of float32 weights and little else). Checked on the compiled loop (every dot reading a weight) and its memory;
    logits equal float32 math on the bf16-rounded operands."""
    from jaxgpt.generation.decode import _generate_jit
    from jaxgpt.models.matmuls import decode_tied_head, matmul_2d

    bf, f32 = jnp.bfloat16, jnp.float32
    if _compiled_dot_operand_dtypes(lambda x, w: jnp.dot(x, w, preferred_element_type=f32),
                                    jnp.ones((64, 96), bf), jnp.ones((96, 80), bf)) != [("bf16", "bf16")]:
        pytest.skip("this XLA:CPU converts every bf16 dot to float32")
    from jaxgpt.models.layers import take_rows

    cfg = ModelConfig(vocab_size=4096, context_length=64, n_layer=2, n_head=4, n_embd=256, dropout=0.0,
                      dtype="bfloat16", param_dtype=weights)
    params = param_shapes(cfg)
    prompt = jax.ShapeDtypeStruct((rows, 8), jnp.int32)
    compiled = _generate_jit.lower(params, prompt, jax.ShapeDtypeStruct((rows, 8), bool), jax.random.key(0), 0.0, 1.0,
                                   config=cfg, max_new_tokens=24, greedy=True, top_k=None, use_top_p=False, eos_id=None,
                                   pad_id=0, vocab_limit=None).compile()
    matrices = [leaf.shape for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 2]
    dots = _weight_dots(compiled.as_text(), {f"{a},{b}" for a, b in matrices} | {f"{b},{a}" for a, b in matrices})
    assert len(dots) >= 4 * cfg.n_layer and all(d == ("bf16", "bf16") for d in dots), dots
    float32_bytes = sum(leaf.size * 4 for leaf in jax.tree_util.tree_leaves(params))
    bf16_copies = float32_bytes / 2 if weights == "float32" else 0  # made once for the loop
    assert compiled.memory_analysis().temp_size_in_bytes < bf16_copies + 0.3 * float32_bytes

    table = jax.random.normal(jax.random.key(2), (50, 8)).astype(bf)
    ids = jnp.array([[3, 7, 3], [49, 0, 3]])
    np.testing.assert_array_equal(take_rows(table, ids), jnp.take(table, ids, axis=0))
    ct = jax.random.normal(jax.random.key(3), (2, 3, 8)).astype(bf)
    np.testing.assert_array_equal(jax.vjp(take_rows, table, ids)[1](ct)[0],
                                  jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)[1](ct)[0])

    x = jax.random.normal(jax.random.key(0), (rows, 1, 64)).astype(bf)
    w = (jax.random.normal(jax.random.key(1), (64, 96)) / 8).astype(bf)
    want = (x.astype(f32) @ w.astype(f32)).astype(bf).astype(f32)
    np.testing.assert_allclose(matmul_2d(x, w, cpu_bf16=True).astype(f32), want, rtol=2**-7, atol=1e-6)
    logits = decode_tied_head(x, w.T)  # the embedding [vocab, d]
    assert logits.shape == (rows, 1, 96) and logits.dtype == f32
    np.testing.assert_allclose(logits, x.astype(f32) @ w.astype(f32), rtol=1e-5, atol=1e-5)


def test_one_row_matmuls_run_in_row_blocks():
    """A one-token dense layer on CPU (batch-1 decoding) multiplies by row blocks of the
    weight (`matmuls.row_block_gemv`, a batched dot), equal to the plain product, its parts
    added pairwise (no reduce op: XLA:CPU would run it as a YNNPACK call of its own); more
    rows, a weight with an odd number of blocks, or a head much wider than deep stay plain."""
    from jaxgpt.models.matmuls import GEMV_BLOCK, matmul_2d

    def batched_dots(x, w):
        jaxpr = jax.make_jaxpr(matmul_2d)(x, w)
        return [e.params["dimension_numbers"][1] != ((), ()) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]

    k = 4 * GEMV_BLOCK
    w = jax.random.normal(jax.random.key(1), (k, 96)) / 16
    x = jax.random.normal(jax.random.key(0), (3, 1, k))
    np.testing.assert_allclose(matmul_2d(x[:1], w), x[:1] @ w, rtol=1e-5, atol=1e-5)
    assert batched_dots(x[:1], w) == [True]
    assert "reduce_sum" not in str(jax.make_jaxpr(matmul_2d)(x[:1], w))
    w6 = jax.random.normal(jax.random.key(2), (6 * GEMV_BLOCK, 96)) / 16  # 6 -> 3 -> 2 -> 1 parts
    x6 = jax.random.normal(jax.random.key(3), (1, 6 * GEMV_BLOCK))
    np.testing.assert_allclose(matmul_2d(x6, w6), x6 @ w6, rtol=1e-5, atol=1e-5)
    assert batched_dots(x, w) == [False]  # three rows
    assert batched_dots(x[:1, :, :3 * GEMV_BLOCK], w[:3 * GEMV_BLOCK]) == [False]  # odd block count
    assert batched_dots(x[:1], jnp.ones((k, 4 * k + 1))) == [False]  # a vocabulary head


def test_dense_layers_run_as_one_2d_matmul():
    """Every dense layer (`dense_dot_general`) flattens `[batch, seq, in]` to one 2-D matmul,
    so its weight gradient is a 2-D dot (the 3-D form's costs XLA:CPU a strided transposed
    copy of the cotangent): same values and gradients as lax's 3-D dot, and every dot in the
    forward+backward jaxpr has rank-2 operands."""
    from jaxgpt.models.matmuls import dense_dot_general

    x = jax.random.normal(jax.random.key(0), (4, 8, 64))
    w = jax.random.normal(jax.random.key(1), (64, 32)) / 8
    ct = jax.random.normal(jax.random.key(2), (4, 8, 32))
    dims = (((2,), (0,)), ((), ()))
    flat = lambda x, w: dense_dot_general(x, w, dims)  # noqa: E731
    lax3d = lambda x, w: jax.lax.dot_general(x, w, dims)  # noqa: E731
    np.testing.assert_allclose(flat(x, w), lax3d(x, w), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.vjp(flat, x, w)[1](ct), jax.vjp(lax3d, x, w)[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda x, w, ct: jax.vjp(flat, x, w)[1](ct))(x, w, ct)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(v.aval.ndim == 2 for e in dots for v in e.invars)
    batched = (((2,), (2,)), ((0,), (0,)))  # not a dense layer's: lax's own dot
    y = jax.random.normal(jax.random.key(3), (4, 16, 64))
    np.testing.assert_array_equal(dense_dot_general(x, y, batched), jax.lax.dot_general(x, y, batched))
