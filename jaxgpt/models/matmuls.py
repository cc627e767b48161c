"""How the dense layers (and, in bf16, the fused LM head) multiply: one 2-D matmul over the
tokens; with bfloat16 compute on CPU the CPU's bf16 instructions in the forward matmul and
both backward ones; and a one-token float32 matmul on CPU (batch-1 decoding) as row blocks.

Both answer to how XLA:CPU (jax 0.10.2) lays out and dispatches dots; the figures in the
docstrings were measured on AVX-512 EPYC hosts (`benchmarks/matmul_dtypes.py` and the
micro-benchmarks in BENCHMARKS.md). GPUs and TPUs run the same 2-D matmuls; the bf16 path is
chosen on CPU only (`jaxgpt.models.layers.dense`, `jaxgpt.train.losses`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def loop_carried_dots(*pairs):
    """`tuple(a @ b for a, b in pairs)`, each `[m, k] @ [k, n] -> [m, n]` float32, with the
    operands handed to the matmuls through a one-step `lax.scan` carry and an optimisation
    barrier, so that each dot sees two row-major operands in canonical orientation.

    Why: XLA:CPU runs a bf16 dot on its bf16 kernels (YNNPACK: AVX512-BF16, AMX) only when
    both operands are row-major and un-transposed when its operand upcaster looks, early in
    compilation; otherwise it converts both to float32 and runs at float32 speed. JAX lowers
    `w.T` to a transpose that keeps the input's memory order (a column-major result), so
    `g @ w.T` and `x.T @ g`, the two backward matmuls of every dense layer, were upcast. A
    loop carry gets the default row-major layout: the transposes are materialised (a weight,
    or one `[in, tokens]` activation, both small beside the matmul) and the dots stay bf16.
    The barrier keeps XLA from folding the transposes back into the dots once it removes the
    one-trip loop. Backward of a `[1024, 768] x [768, 3072]` bf16 layer on an AVX512-BF16
    EPYC: 64 ms -> 28 ms. For float32 it does not pay (level or slower), so only the bf16
    paths use it.
    """
    def body(carry, _):
        operands = lax.optimization_barrier(carry)
        return carry, tuple(jnp.dot(a, b, preferred_element_type=jnp.float32) for a, b in operands)

    _, outs = lax.scan(body, tuple(pairs), None, length=1)
    return tuple(o[0] for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x, w, out_dtype=None):
    """`x [m, k] @ w [k, n]` for bf16 `x`, `w` on the CPU's bf16 instructions: float32
    accumulation, result in `out_dtype` (default x's, bf16; the LM head asks float32 logits),
    and both backward matmuls in bf16 too (`loop_carried_dots`; the cotangent is rounded to
    bf16 first, as under torch's autocast)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def _bf16_matmul_fwd(x, w, out_dtype):
    return bf16_matmul(x, w, out_dtype), (x, w)


def _bf16_matmul_bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx, dw = loop_carried_dots((g, w.T), (x.T, g))
    return dx.astype(x.dtype), dw.astype(w.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul_2d(x, w, *, cpu_bf16: bool = False):
    """`x [..., in] @ w [in, out]` as one 2-D matmul over `[tokens, in]`; `[..., out]`.

    Why 2-D: the gradient of a 3-D `[batch, seq, in]` dot contracts two dims for the weight,
    and XLA:CPU lays that out by copying the output's cotangent transposed, in a strided loop
    (fused with SwiGLU's backward it was 11% of a Llama step); the 2-D form's weight gradient
    is one plain matmul. A SwiGLU MLP forward+backward, [1024, 768] -> 2048, on an AVX-512
    EPYC: 221 ms 3-D, 160 ms 2-D. `cpu_bf16`: bf16 inputs, float32 accumulation, bf16 result
    (`cpu_bf16_dot_general`; one row, a decode step's, as `two_rows`)."""
    x2 = x.reshape(-1, x.shape[-1])
    if cpu_bf16 and x2.shape[0] == 1:  # see `two_rows`
        y = bf16_matmul(two_rows(x2), w)[:1]
    elif cpu_bf16:
        y = bf16_matmul(x2, w)
    elif x2.shape[0] == 1 and _row_blocks_pay(w.shape):
        y = row_block_gemv(x2, w)
    else:
        y = x2 @ w
    return y.reshape(*x.shape[:-1], w.shape[-1])


def is_cpu_bf16(dtype) -> bool:
    """Whether matmuls in `dtype` take this module's bf16 CPU paths."""
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def two_rows(x):
    """`[1, k]` -> `[2, k]` (the row twice), for a bf16 matrix-vector product on CPU.

    XLA:CPU runs a bf16 dot with one row in float32: it converts the weight to float32
    first, and in a decode loop it hoists that conversion out of the loop, so batch-1 bf16
    decoding held a float32 copy of every weight beside the bf16 one (gpt2-124m's compiled
    decode loop: 0.98 GiB of temporaries, against 0.08 in float32) and read it at float32
    speed. With two rows the dot stays on the bf16 kernel, reading the bf16 weight; the
    second row is free beside the weight's reads."""
    return jnp.concatenate([x, x])


def decode_tied_head(hidden, embedding):
    """A tied LM head for a decode step on the bf16 CPU path: `hidden [batch, 1, d]` against
    `embedding [vocab, d]` contracted on d, bf16 operands, float32 logits `[batch, 1, vocab]`.

    `nn.Embed.attend`'s `hidden @ embedding.T` in bf16 ran in float32 on CPU (a transposed
    operand, `loop_carried_dots`), and in a decode loop XLA hoisted the conversion: float32
    copies of the embedding, plain and transposed, held for the whole loop (llama-3.2-1b:
    2 x 1 GiB). Contracted on its own d, the embedding is read in place by the bf16 kernel
    (one row: `two_rows`)."""
    b, t, d = hidden.shape
    x = hidden.reshape(b * t, d).astype(jnp.bfloat16)
    logits = lax.dot_general(two_rows(x) if b * t == 1 else x, embedding.astype(jnp.bfloat16),
                             (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits[:b * t].reshape(b, t, embedding.shape[0])


GEMV_BLOCK = 128  # rows of the weight per partial product in `row_block_gemv`


def _row_blocks_pay(shape) -> bool:
    """Whether a one-row `x @ w` with `w` of `shape` [k, n] runs as `row_block_gemv`: on CPU,
    k an even number of blocks, n <= 4k (a vocabulary head, n >> k, ran slower that way)."""
    k, n = shape
    return jax.default_backend() == "cpu" and k % (2 * GEMV_BLOCK) == 0 and n <= 4 * k


def row_block_gemv(x, w):
    """`x [1, k] @ w [k, n]` as `k / GEMV_BLOCK` products of `GEMV_BLOCK`-row blocks of w
    (one batched dot), summed.

    A decode step at batch 1 is matrix-vector products that only have to stream the weights
    from memory. XLA:CPU's one-row matmul fell short of the memory's speed for most of a
    GPT's shapes; as a batch of row blocks, each a contiguous slab of w, it reaches it.
    Measured on a 2-core AVX-512 EPYC (GB/s of weights read; `jnp.sum` over the same bytes
    ~27-33): `[3072, 768]` 22 -> 31, `[768, 768]` 24 -> 30, `[768, 2304]` 25-30 -> 37;
    `[768, 3072]` level; a gpt2-124m decode step ~15% faster (`BENCHMARKS.md`, decode). With
    more than one row it does not pay (4 rows: level or slower).

    The partial products are added pairwise, not by `jnp.sum`: XLA:CPU hands a reduce over
    the block axis to YNNPACK as an op of its own (a thread-pool call, 6-10 us at these
    sizes, four a layer), while the adds fuse into the elementwise op that follows. A
    gpt2-124m decode step on an AVX2 EPYC: 0.4-0.5 ms less of ~19 ms under XLA's profiler,
    ~1% faster end to end (`BENCHMARKS.md`)."""
    k, n = w.shape
    blocks = k // GEMV_BLOCK
    parts = lax.dot_general(x.reshape(blocks, 1, GEMV_BLOCK), w.reshape(blocks, GEMV_BLOCK, n),
                            (((2,), (1,)), ((0,), (0,))))  # [blocks, 1, n]
    return pairwise_sum([parts[i] for i in range(blocks)])


def pairwise_sum(terms: list):
    """`terms[0] + terms[1] + ...` as a balanced tree of adds (rounding like a pairwise sum)."""
    while len(terms) > 1:
        terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
    return terms[0]


def _is_dense_contraction(lhs, rhs, dimension_numbers) -> bool:
    """`nn.Dense`'s contraction: the input's last dim with a 2-D kernel's first, no batch dims."""
    (contract_l, contract_r), batch = dimension_numbers
    return tuple(contract_l) == (lhs.ndim - 1,) and tuple(contract_r) == (0,) and rhs.ndim == 2 and not batch[0]


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """`nn.Dense`'s dot: `matmul_2d` for the dense contraction, `lax.dot_general` for anything
    else (or when a precision or result type is asked for)."""
    plain = precision is None and preferred_element_type is None and not kw
    if plain and _is_dense_contraction(lhs, rhs, dimension_numbers):
        return matmul_2d(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)


def cpu_bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """`nn.Dense`'s dot for bfloat16 compute on CPU: bf16 inputs, float32 accumulation, bf16
    result, in the forward matmul and both backward ones (`loop_carried_dots`). XLA:CPU runs
    a bf16 dot on the CPU's bf16 instructions (AVX512-BF16, AMX) only when it accumulates in
    float32: a 2048^2 matmul on an AVX512-BF16 host, 179 GFLOP/s with a bf16 result, 382
    this way (float32: 200; `benchmarks/matmul_dtypes.py`). Other dimension numbers go to
    `lax.dot_general`."""
    if _is_dense_contraction(lhs, rhs, dimension_numbers) and lhs.dtype == rhs.dtype == jnp.bfloat16:
        return matmul_2d(lhs, rhs, cpu_bf16=True)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)
