import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import TrainConfig
from jaxgpt.train.losses import token_cross_entropy
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params
from jaxgpt.train.optim import FREEZE, TRAIN, count_trainable, decay_mask, label_params, lr_schedule, make_optimizer
from jaxgpt.parallel import DataParallel
from jaxgpt.train.steps import create_train_state, eval_step, lm_loss_fn, train_step


def _batches(cfg, n=5, batch=8, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "inputs": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
            "targets": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
        }
        for _ in range(n)
    ]


def _train(cfg, tcfg, num_devices, accum, batches):
    params = init_params(cfg, jax.random.key(0))
    tx = make_optimizer(tcfg)
    dp = DataParallel(num_devices)
    state = dp.replicate(create_train_state(params, tx))
    step = dp.compile_train_step(train_step, loss_fn=lm_loss_fn(GPT(cfg)), tx=tx)
    losses = []
    for b in batches:
        state, metrics = step(state, dp.shard_train(b, accum), jax.random.key(1))
        losses.append(float(dp.first(metrics)["loss"]))
    return dp.unreplicate(state), losses


def test_pmap_over_4_devices_equals_single_device(tiny_model_cfg):
    """5 pmapped steps on 4 fake CPU devices == 5 jitted single-device steps, same global batch.

    Tolerance: 1e-5 absolute on every parameter. The only difference is the order of the
    float32 sums (per device, then psum), which Adam's normalised update turns into ~1e-6.
    """
    assert jax.local_device_count() >= 4, "conftest sets 4 host devices"
    tcfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=5)
    batches = _batches(tiny_model_cfg)
    single, l1 = _train(tiny_model_cfg, tcfg, 1, 1, batches)
    multi, l4 = _train(tiny_model_cfg, tcfg, 4, 1, batches)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), single.params, multi.params)
    assert int(multi.step) == 5


def test_gradient_accumulation_equals_one_big_batch(tiny_model_cfg):
    tcfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=3)
    batches = _batches(tiny_model_cfg, n=3)
    big, _ = _train(tiny_model_cfg, tcfg, 1, 1, batches)
    acc, _ = _train(tiny_model_cfg, tcfg, 2, 2, batches)  # 2 devices x 2 micro-batches x 2 rows
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), big.params, acc.params)


def test_loss_decreases_on_a_repeated_batch(tiny_model_cfg):
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=20)
    batches = _batches(tiny_model_cfg, n=1) * 20
    _, losses = _train(tiny_model_cfg, tcfg, 1, 1, batches)
    assert losses[-1] < 0.5 * losses[0]


def test_cross_entropy_closed_form():
    vocab = 10
    logits = jnp.zeros((2, 3, vocab))
    targets = jnp.zeros((2, 3), jnp.int32)
    loss_sum, count = token_cross_entropy(logits, targets)
    assert count == 6 and np.isclose(loss_sum / count, math.log(vocab))
    # p(target) = 0.5 exactly on two unmasked tokens
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]] * 3]))
    mask = jnp.array([[1, 0, 1]])
    loss_sum, count = token_cross_entropy(logits, jnp.zeros((1, 3), jnp.int32), mask)
    assert count == 2 and np.isclose(loss_sum, 2 * math.log(2.0), atol=1e-6)


def test_eval_step_sums_match_manual(tiny_model_cfg):
    params = init_params(tiny_model_cfg, jax.random.key(0))
    b = _batches(tiny_model_cfg, n=1)[0]
    out = eval_step(params, b, loss_fn=lm_loss_fn(GPT(tiny_model_cfg)))
    logits = GPT(tiny_model_cfg).apply({"params": params}, b["inputs"])
    manual = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()
    np.testing.assert_allclose(out["loss"] / out["count"], manual, rtol=1e-6)


def test_schedule_warmup_then_cosine():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    s = lr_schedule(t)
    assert float(s(0)) == 0.0 and np.isclose(float(s(5)), 0.5) and np.isclose(float(s(10)), 1.0)
    assert np.isclose(float(s(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way down the cosine
    assert np.isclose(float(s(110)), 0.1)


def test_weight_decay_only_on_matrices(tiny_model_cfg):
    params = init_params(tiny_model_cfg, jax.random.key(0))
    mask = decay_mask(params)
    assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["wte"]["embedding"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"] and not mask["ln_f"]["scale"]


def test_frozen_params_bitwise_unchanged_and_stateless(tiny_model_cfg):
    params = init_params(tiny_model_cfg, jax.random.key(0))
    labels = label_params(params, lambda path, _: path[0] == "h_1")
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0), labels)
    state = create_train_state(params, tx)
    # No Adam moments for frozen leaves: only the trainable block's leaves carry state.
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert n_state == 2 * count_trainable(params, labels)
    step = jax.jit(lambda s, b, k: train_step(s, b, k, loss_fn=lm_loss_fn(GPT(tiny_model_cfg)), tx=tx))
    for b in _batches(tiny_model_cfg, n=3):
        state, _ = step(state, jax.tree_util.tree_map(lambda x: x[None], b), jax.random.key(0))
    for name in ("h_0", "wte", "wpe", "ln_f"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.params[name], params[name])
    assert not np.array_equal(state.params["h_1"]["mlp"]["c_fc"]["kernel"], params["h_1"]["mlp"]["c_fc"]["kernel"])
    assert labels["h_1"]["ln_1"]["scale"] == TRAIN and labels["h_0"]["ln_1"]["scale"] == FREEZE


def test_bad_batch_division_is_a_user_error():
    from jaxgpt.errors import UserError

    with pytest.raises(UserError, match="divisible"):
        DataParallel(4).check_batch_size(6, 1)


def test_labels_differentiate_only_the_trainable_leaves(tiny_model_cfg):
    """With the label tree, frozen gradients are never computed (fewer FLOPs), yet the
    update equals the unlabeled step's and `grad_norm` is the trainable gradients' norm."""
    params = init_params(tiny_model_cfg, jax.random.key(0))
    labels = label_params(params, lambda path, _: path[0] == "h_1")
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0), labels)
    loss_fn = lm_loss_fn(GPT(tiny_model_cfg))
    b = _batches(tiny_model_cfg, n=1)[0]
    stacked = jax.tree_util.tree_map(lambda x: x[None], b)
    state = create_train_state(params, tx)
    plain = jax.jit(lambda s: train_step(s, stacked, jax.random.key(0), loss_fn=loss_fn, tx=tx))
    labeled = jax.jit(lambda s: train_step(s, stacked, jax.random.key(0), loss_fn=loss_fn, tx=tx, labels=labels))
    compiled = [f.lower(state).compile() for f in (plain, labeled)]
    flops = [(c[0] if isinstance(c, list) else c)["flops"] for c in (f.cost_analysis() for f in compiled)]
    assert flops[1] < 0.9 * flops[0]
    (s1, m1), (s2, m2) = (f(state) for f in compiled)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), s1.params, s2.params)
    grads, aux = jax.jit(jax.grad(lambda p: loss_fn(p, b, None), has_aux=True))(params)
    expected = optax.tree.norm(grads["h_1"]) / aux["count"]
    np.testing.assert_allclose(float(m2["grad_norm"]), float(expected), rtol=1e-5)
    assert float(m1["grad_norm"]) > float(m2["grad_norm"])  # the unlabeled norm counts frozen gradients too


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_loss_equals_the_plain_loss_and_gradients(tiny_model_cfg, tied):
    """`lm_loss_fn` (LM head fused into the loss, over token chunks) against the logits
    `GPT.apply` returns put through optax's cross-entropy: loss and every parameter's
    gradient, tied and untied head, 5-token chunks that do not divide the 2 x 16 tokens, a
    mask. float32: rel 1e-5 on the loss, abs 1e-5 on gradients (rounding of the chunked
    sums; the largest gradients here are ~0.5)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_model_cfg, tie_embeddings=tied)
    model = GPT(cfg)
    params = init_params(cfg, jax.random.key(0))
    batch = {k: v[:2] for k, v in _batches(cfg, n=1)[0].items()}
    batch["mask"] = (np.arange(16)[None, :] % 3 != 0).astype(np.float32).repeat(2, 0)

    def plain(p):
        logits = model.apply({"params": p}, batch["inputs"])
        return token_cross_entropy(logits, batch["targets"], batch["mask"])[0]

    def fused(p):
        return lm_loss_fn(model, chunk_size=5)(p, batch, None)[0]

    (want, want_grads), (got, got_grads) = jax.value_and_grad(plain)(params), jax.value_and_grad(fused)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)


def test_fused_head_logprobs_equal_log_softmax_and_skip_a_frozen_kernels_gradient():
    """`head_logprobs` (chunked, recomputed in the backward pass) against `token_logprobs`
    of the materialised logits at temperature 0.7, values and gradients; and with the kernel
    frozen the compiled cross-entropy gradient does fewer FLOPs (its kernel-gradient matmul
    is dead code, as for a LoRA run's frozen head)."""
    from jaxgpt.train.losses import head_cross_entropy, head_logprobs, token_logprobs

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden, kernel = jax.random.normal(k1, (3, 7, 16)), 0.3 * jax.random.normal(k2, (16, 50))
    tokens = jax.random.randint(k3, (3, 7), 0, 50)

    def plain(h, w):
        return jnp.sum(token_logprobs(h @ w / 0.7, tokens) * jnp.arange(6.0))

    def fused(h, w):
        return jnp.sum(head_logprobs(h, w, tokens, temperature=0.7, chunk_size=4) * jnp.arange(6.0))

    np.testing.assert_allclose(fused(hidden, kernel), plain(hidden, kernel), rtol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(hidden, kernel), jax.grad(plain, (0, 1))(hidden, kernel)):
        np.testing.assert_allclose(a, b, atol=1e-5)

    def ce(h, w):
        return head_cross_entropy(h, w, tokens, chunk_size=4)[0]

    def flops(argnums):
        cost = jax.jit(jax.grad(ce, argnums)).lower(hidden, kernel).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops((0,)) < 0.8 * flops((0, 1))
