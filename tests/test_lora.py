"""LoRA adapters and train modes: counts, exactness at init, merging, freezing (CPU, seconds)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.models.lora import LoRAConfig, check_targets, has_lora, lora_param_count, matches, merge_lora
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params, param_shapes
from jaxgpt.train.optim import TRAIN, count_trainable, make_optimizer
from jaxgpt.train.steps import create_train_state, train_step
from jaxgpt.engine.params import graft, train_labels


def _closed_form(m: ModelConfig, num_classes: int, rank: int, split_qkv: bool) -> int:
    """rank x (d_in + d_out) per adapted matrix: every dense layer of the classifier."""
    d = m.n_embd
    qkv = 3 * rank * (d + d) if split_qkv else rank * (d + 3 * d)
    block = qkv + rank * (d + d) + rank * (d + 4 * d) + rank * (4 * d + d)  # attn c_proj, c_fc, mlp c_proj
    return m.n_layer * block + rank * (d + num_classes)  # + the head


@pytest.mark.parametrize("split_qkv, expected", [(False, 2_371_616), (True, 2_666_528)])
def test_124m_classifier_trainable_counts(split_qkv, expected):
    """Appendix E: rank 16 on every dense layer of the 124M 2-class classifier (no allocation)."""
    m = ModelConfig()
    lora = LoRAConfig(rank=16, split_qkv=split_qkv)
    shapes = param_shapes(m, num_classes=2, lora=lora)
    assert _closed_form(m, 2, 16, split_qkv) == expected
    assert lora_param_count(shapes) == expected
    labels = train_labels(shapes, "lora", m)
    assert count_trainable(shapes, labels) == expected
    # Every other leaf is frozen, the head's own kernel included.
    assert labels["score"]["kernel"] != TRAIN and labels["score"]["lora_a"] == TRAIN
    plain = param_shapes(m, num_classes=2)
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == sum(
        x.size for x in jax.tree_util.tree_leaves(plain)) + expected


def test_split_qkv_shapes_and_target_matching():
    m = ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=16)
    shapes = param_shapes(m, num_classes=3, lora=LoRAConfig(rank=4, split_qkv=True))
    attn = shapes["h_0"]["attn"]
    assert attn["c_attn"]["lora_a"].shape == (3, 16, 4) and attn["c_attn"]["lora_b"].shape == (3, 4, 16)
    assert attn["c_proj"]["lora_a"].shape == (16, 4)
    assert shapes["score"]["lora_b"].shape == (4, 3)
    only = param_shapes(m, num_classes=3, lora=LoRAConfig(rank=4, targets=("attn/c_proj",)))
    assert has_lora(only["h_1"]["attn"]["c_proj"]) and not has_lora(only["h_1"]["mlp"])
    assert not has_lora(only["score"]) and lora_param_count(only) == 2 * 4 * (16 + 16)
    assert matches(("h_3", "mlp", "c_proj"), ("c_proj",)) and not matches(("h_3", "mlp", "c_fc"), ("c_proj",))
    check_targets(LoRAConfig(targets=("c_fc", "h_1/mlp/c_proj")), param_shapes(m, num_classes=3))
    with pytest.raises(UserError, match="'c_fcc' matches no dense layer"):
        check_targets(LoRAConfig(targets=("c_attn", "c_fcc")), param_shapes(m, num_classes=3))


@pytest.fixture
def tiny():
    return ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_b_zero_gives_the_base_output_exactly(tiny, split_qkv):
    tiny = dataclasses.replace(tiny, n_layer=1)
    lora = LoRAConfig(rank=4, alpha=8.0, split_qkv=split_qkv)
    base = init_params(tiny, jax.random.key(0), num_classes=2)
    with_lora = graft(init_params(tiny, jax.random.key(1), num_classes=2, lora=lora), base, "base")
    assert lora_param_count(with_lora) > 0
    tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, tiny.vocab_size)
    # Op by op (no jit, whose fusion may reassociate the float sums): y + 0 is exactly y.
    out_base = GPT(tiny, num_classes=2).apply({"params": base}, tokens)
    out_lora = GPT(tiny, num_classes=2, lora=lora).apply({"params": with_lora}, tokens)
    np.testing.assert_array_equal(np.asarray(out_base), np.asarray(out_lora))


def _train(tiny, model, params, labels, steps=3):
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10), labels)
    state = create_train_state(params, tx)

    def loss_fn(p, batch, key):
        logits = model.apply({"params": p}, batch["tokens"])[:, -1]
        ce = -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["labels"]]
        return ce.sum(), {"count": jnp.asarray(logits.shape[0], jnp.float32)}

    step = jax.jit(lambda s, b, k: train_step(s, b, k, loss_fn=loss_fn, tx=tx))
    batch = {"tokens": jax.random.randint(jax.random.key(3), (1, 4, 8), 0, tiny.vocab_size),
             "labels": jnp.array([[0, 1, 1, 0]])}
    for _ in range(steps):
        state, _ = step(state, batch, jax.random.key(4))
    return state


@pytest.mark.parametrize("split_qkv", [False, True])
def test_merge_lora_after_training_matches(tiny, split_qkv):
    lora = LoRAConfig(rank=4, alpha=8.0, split_qkv=split_qkv)
    model = GPT(tiny, num_classes=2, lora=lora)
    params = init_params(tiny, jax.random.key(0), num_classes=2, lora=lora)
    state = _train(tiny, model, params, train_labels(params, "lora", tiny))
    trained = jax.device_get(state.params)
    assert np.abs(trained["h_0"]["attn"]["c_attn"]["lora_b"]).max() > 0  # the adapters moved
    merged = merge_lora(trained, lora)
    assert not has_lora(merged)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(
        init_params(tiny, jax.random.key(0), num_classes=2))
    tokens = jax.random.randint(jax.random.key(5), (3, 12), 0, tiny.vocab_size)
    before = jax.jit(model.apply)({"params": trained}, tokens)
    after = jax.jit(GPT(tiny, num_classes=2).apply)({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(before), np.asarray(after), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["full", "last-block", "lora"])
def test_frozen_params_unchanged_and_stateless(tiny, mode):
    """Each train mode is a label tree: frozen leaves are bitwise unchanged after training and
    have no Adam moments; trainable leaves all move."""
    lora = LoRAConfig(rank=4) if mode == "lora" else None
    model = GPT(tiny, num_classes=2, lora=lora)
    params = init_params(tiny, jax.random.key(0), num_classes=2, lora=lora)
    if lora is not None:  # nonzero B so every adapter leaf gets a gradient
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.01 if getattr(p[-1], "key", "") == "lora_b" else x, params)
    labels = train_labels(params, mode, tiny)
    before = jax.device_get(params)
    state = _train(tiny, model, params, labels)
    after = jax.device_get(state.params)
    flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                      for path, leaf in jax.tree_util.tree_leaves_with_path(t)}
    fb, fa, fl = flat(before), flat(after), flat(labels)
    trainable = {k for k, v in fl.items() if v == TRAIN}
    expected = {"full": set(fb),
                "last-block": {k for k in fb if k.startswith(("h_1/", "ln_f/", "score/"))},
                "lora": {k for k in fb if k.endswith(("lora_a", "lora_b"))}}[mode]
    assert trainable == expected
    for name in fb:
        if name in trainable:
            assert not np.array_equal(fb[name], fa[name]), f"{name} did not train"
        else:
            assert np.array_equal(fb[name], fa[name]), f"frozen {name} changed"
    # Optimiser state: Adam moments (mu, nu) exist for trainable leaves only.
    moments = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if np.ndim(leaf) > 0]
    assert sum(int(np.size(leaf)) for _, leaf in moments) == 2 * count_trainable(params, labels)
    names = {"/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key")).split("/", 1)[1]
             for path, _ in moments}
    assert names == trainable


def test_init_from_a_lora_run_merges_with_the_runs_own_alpha(tiny, tmp_path):
    """`--init RUN` (hub.resolve_init: generate, export, train, finetune) on a LoRA run folds
    the adapters in with the run's lora.alpha, not the default: the plain LM it returns gives
    the LoRA model's logits."""
    from jaxgpt.io import checkpoint
    from jaxgpt.config import Config, save_config
    from jaxgpt.io.hub import resolve_init

    @dataclasses.dataclass(frozen=True)
    class LoRARunConfig(Config):
        lora: LoRAConfig = LoRAConfig()

    lora = LoRAConfig(rank=2, alpha=5.0, targets=("c_attn", "c_fc"))
    params = jax.device_get(init_params(tiny, jax.random.key(0), lora=lora))
    # Nonzero adapters, so the scale alpha / r matters.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full_like(x, 0.05) if p[-1].key == "lora_b" else x, params)
    save_config(LoRARunConfig(model=tiny, lora=lora), tmp_path / "config.yaml")
    checkpoint.save(checkpoint.checkpoint_manager(tmp_path), 1, {"params": params}, {"step": 1})

    config, merged = resolve_init(str(tmp_path))
    assert config == tiny and not has_lora(merged)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, tiny.vocab_size)
    want = GPT(tiny, lora=lora).apply({"params": params}, tokens)
    got = GPT(tiny).apply({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
