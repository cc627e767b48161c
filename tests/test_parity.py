"""Training parity with a PyTorch model jaxgpt did not write: Hugging Face `GPT2LMHeadModel`.

Shaped as the book's GPTModel (untied head; no qkv bias, which on the HF side is a zero,
frozen c_attn bias), with the same weights (moved both ways by `jaxgpt.io.torch_twin`), the
same batches and the same optimiser (`torch.optim.AdamW` with jaxgpt's decay set vs
`jaxgpt.train.optim.make_optimizer` driven through the real `jaxgpt.train.steps.train_step`), the two
must give the same logits and the same training losses.

Tolerances (float32, dropout off): logits 1e-4 absolute (observed ~1e-5 on logits of std
~2.5); per-step loss relative 1e-4 over 20 steps (observed <= 8e-6: the frameworks differ
only in summation order, which Adam's 1/sqrt(v) amplifies a little each step); parameters
after 20 steps 2e-4 absolute (observed 2.3e-5; they move by ~4e-2). Decaying every
parameter, as the book's AdamW does, or beta2 0.95 instead of 0.999 on the torch side
gives loss differences of 6e-3 and 2e-2 and parameter differences of ~4e-3
(`test_step_parity_detects_a_different_optimiser`), so the check can fail.
The 124M, 90-step comparison (and the book's own GPTModel) is `benchmarks/parity_124m.py`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.io import torch_twin  # noqa: E402
from jaxgpt.config import ModelConfig, TrainConfig, load_config  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.models.gpt2 import GPT  # noqa: E402
from jaxgpt.models import init_params
from jaxgpt.train.optim import make_optimizer  # noqa: E402
from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step  # noqa: E402

transformers.logging.set_verbosity_error()
LOGIT_ATOL = 1e-4
LOSS_RTOL = 1e-4
PARAM_ATOL = 2e-4
STEPS = 20

# The book's variant at a small shape: untied head, no qkv bias, dropout off.
BOOK = ModelConfig(vocab_size=257, context_length=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                   qkv_bias=False, tie_embeddings=False, init="torch-default")
# Constant lr (no warmup, no decay), torch's default betas, no clipping.
TRAIN = TrainConfig(batch_size=4, max_steps=STEPS, lr=2e-3, warmup_steps=0, min_lr_ratio=1.0,
                    weight_decay=0.1, b1=0.9, b2=0.999, grad_clip=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny shapes: one torch thread is ~7x faster than two on a busy 2-core machine (the
    threads' spin-waits compete with XLA's and other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturbed(params, seed: int, scale: float = 0.1):
    """`params` plus N(0, scale) noise on every leaf, so LayerNorms and biases matter too."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape), jnp.float32),
                                  params)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    """(init, logits) compiled once per config: eager flax would dispatch op by op."""
    init = jax.jit(lambda key: init_params(cfg, key))
    logits = jax.jit(lambda params, x: GPT(cfg).apply({"params": params}, x))
    return init, logits


def init(cfg, seed=0):
    return _jitted(cfg)[0](jax.random.key(seed))


def jax_logits(cfg, params, tokens):
    return np.asarray(_jitted(cfg)[1](params, jnp.asarray(tokens, jnp.int32)))


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens(cfg, seed=0, batch=3):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, cfg.context_length))


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# ---------------------------------------------------------------------------------------
# Weights both ways


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["book-no-qkv-bias", "qkv-bias"])
def test_jaxgpt_to_torch_logits_and_back(qkv_bias):
    cfg = dataclasses.replace(BOOK, qkv_bias=qkv_bias)
    params = perturbed(init(cfg), seed=1, scale=0.3)
    model = torch_twin.to_torch(params, cfg)
    x = tokens(cfg)
    ref = torch_logits(model, x)
    assert ref.std() > 1.0, "logits should be far from uniform for a meaningful comparison"
    np.testing.assert_allclose(jax_logits(cfg, params, x), ref, rtol=0, atol=LOGIT_ATOL)
    biases = [p for n, p in model.named_parameters() if n.endswith("attn.c_attn.bias")]
    assert len(biases) == cfg.n_layer
    assert all(p.requires_grad == qkv_bias for p in biases)  # frozen zeros when the config has none
    assert qkv_bias or all(float(p.abs().max()) == 0.0 for p in biases)
    back = flat(torch_twin.from_torch(model, cfg))
    assert back.keys() == flat(params).keys()
    for k, v in flat(params).items():
        assert np.array_equal(back[k], v), k


def test_torch_to_jaxgpt_from_hf_own_init():
    """Weights made by torch (HF's own initialiser, then perturbed in torch) load into jaxgpt
    and give the same logits: the direction that does not start from jaxgpt params."""
    torch.manual_seed(0)
    cfg = BOOK
    model = transformers.GPT2LMHeadModel(torch_twin.hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.c_attn.bias"):
                p.zero_()  # the book's model has no qkv bias
            else:
                p.add_(0.3 * torch.randn_like(p))
    x = tokens(cfg, seed=2)
    ref = torch_logits(model, x)
    assert ref.std() > 1.0
    params = torch_twin.from_torch(model, cfg)
    np.testing.assert_allclose(jax_logits(cfg, params, x), ref, rtol=0, atol=LOGIT_ATOL)


def test_from_torch_refuses_a_qkv_bias_the_config_lacks():
    model = torch_twin.to_torch(init(BOOK), BOOK)
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.bias.fill_(0.5)
    with pytest.raises(UserError, match="h.1.attn.c_attn.bias is not zero"):
        torch_twin.from_torch(model, BOOK)


# ---------------------------------------------------------------------------------------
# Step parity


def learnable_batches(cfg, steps, batch, seed=0):
    """`steps` batches `[batch, seq + 1]` cycling over 4 fixed random sequences, so the
    loss falls fast (memorisation) and the optimiser state grows large: a real trajectory."""
    pool = np.random.RandomState(seed).randint(0, cfg.vocab_size, (4, cfg.context_length + 1))
    order = np.random.RandomState(seed + 1).randint(0, 4, (steps, batch))
    return pool[order]


@functools.lru_cache(maxsize=None)
def _train_step(cfg, train):
    """jaxgpt's optimiser and its real `train_step`, compiled once per (model, train) config."""
    tx = make_optimizer(train)
    return tx, jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(GPT(cfg)), tx=tx))


def run_both(cfg, train, *, torch_train=None, torch_decay=None, seed=0):
    """Train jaxgpt and its torch twin side by side from the same (perturbed) init on the
    same batches. Returns (jax losses, torch losses, initial params, jax params, torch
    params as jaxgpt params). `torch_train` / `torch_decay` change the torch optimiser only
    (the negative controls)."""
    params = perturbed(init(cfg, seed), seed=seed + 1, scale=0.02)
    model = torch_twin.to_torch(params, cfg).train()
    opt = torch_twin.torch_adamw(model, params, torch_train or train, decay=torch_decay)
    tx, step = _train_step(cfg, train)
    state = create_train_state(params, tx)
    jl, tl = [], []
    for window in learnable_batches(cfg, train.max_steps, train.batch_size, seed):
        inputs, targets = window[:, :-1], window[:, 1:]
        state, metrics = step(state, {"inputs": inputs[None], "targets": targets[None]}, jax.random.key(0))
        jl.append(float(metrics["loss"]))
        opt.zero_grad(set_to_none=True)
        loss = torch_twin.torch_lm_loss(model, inputs, targets)
        loss.backward()
        opt.step()
        tl.append(loss.item())
    return np.array(jl), np.array(tl), params, state.params, torch_twin.from_torch(model, cfg)


def max_param_diff(a, b):
    fa, fb = flat(a), flat(b)
    return max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)


@pytest.fixture(scope="module")
def parity_run():
    return run_both(BOOK, TRAIN)


def test_step_parity_with_torch_adamw(parity_run):
    """20 steps from the same weights on the same batches: same losses, same weights."""
    jl, tl, start, jax_params, torch_params = parity_run
    assert tl[-1] < tl[0] - 2.0, f"the run should learn: {tl[0]:.3f} -> {tl[-1]:.3f}"
    np.testing.assert_allclose(jl, tl, rtol=LOSS_RTOL, atol=0)
    assert max_param_diff(start, torch_params) > 50 * PARAM_ATOL  # the weights really moved
    assert max_param_diff(jax_params, torch_params) < PARAM_ATOL


def test_decay_set_is_the_matrices():
    names = torch_twin.decay_names(init(BOOK))
    layer = {f"transformer.h.{i}.{m}.weight" for i in range(BOOK.n_layer)
             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} | layer


@pytest.mark.parametrize("change", ["decay-all", "beta2"])
def test_step_parity_detects_a_different_optimiser(parity_run, change):
    """The parity check can fail: a torch optimiser decaying every parameter (the book's
    AdamW over `model.parameters()`) or with beta2 0.95 ends up measurably elsewhere."""
    if change == "decay-all":
        model = torch_twin.to_torch(init(BOOK), BOOK)
        kw = {"torch_decay": {n for n, p in model.named_parameters() if p.requires_grad}}
    else:
        kw = {"torch_train": dataclasses.replace(TRAIN, b2=0.95)}
    jl, tl, _, jax_params, torch_params = run_both(BOOK, TRAIN, **kw)
    assert np.max(np.abs(jl - tl) / tl) > 10 * LOSS_RTOL
    assert max_param_diff(jax_params, torch_params) > 10 * PARAM_ATOL


# ---------------------------------------------------------------------------------------
# model.init=torch-default


def test_torch_default_init_matches_torch_layers():
    """Against torch's own nn.Linear / nn.Embedding init at the same shapes: the same bounds
    (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases) and spreads (sample stds);
    LayerNorms 1 and 0."""
    cfg = dataclasses.replace(BOOK, vocab_size=1024, n_embd=128, n_head=4)
    p = flat(init(cfg))
    torch.manual_seed(0)
    for path, v in p.items():
        name = "/".join(path)
        if path[-1] == "embedding":
            ref = torch.nn.Embedding(*v.shape).weight
        elif path[-1] == "kernel":
            ref = torch.nn.Linear(*v.shape).weight.T
        elif path[-1] == "bias" and "ln" not in name:
            fan_in = 4 * cfg.n_embd if path[-2:] == ("c_proj", "bias") and path[1] == "mlp" else cfg.n_embd
            ref = torch.nn.Linear(fan_in, v.shape[0]).bias
        else:
            expected = 1.0 if path[-1] == "scale" else 0.0
            assert np.all(v == expected), name
            continue
        ref = ref.detach().numpy()
        assert v.shape == ref.shape, name
        # Sample stds of n draws differ by ~1/sqrt(n) (relative); 4 of those is a safe band.
        assert abs(v.std() / ref.std() - 1) < max(0.03, 4 / np.sqrt(v.size)), (name, v.std(), ref.std())
        if path[-1] != "embedding":
            bound = 1 / np.sqrt(ref.shape[0] if path[-1] == "kernel" else fan_in)
            assert np.abs(v).max() <= bound and np.abs(ref).max() <= bound, name
            assert np.abs(v).max() > 0.95 * bound, name


def test_bad_init_and_eval_train_batches_are_user_errors():
    with pytest.raises(UserError, match="model.init must be gpt2 or torch-default, got 'pytorch'"):
        load_config(None, ["model.init=pytorch"])
    with pytest.raises(UserError, match="train.eval_train_batches must be >= 0"):
        load_config(None, ["train.eval_train_batches=-1"])
