"""Llama 3, Qwen3 and Gemma 3 against transformers' `LlamaForCausalLM` / `Qwen3ForCausalLM` /
`Gemma3ForCausalLM`, which jaxgpt did not write, on tiny random configs built here (offline):
grouped-query attention 4:2 and 4:1, Qwen3 with head_dim != hidden / heads, Llama 3.1's rope
scaling with a small original context (so it changes the frequencies at these lengths), tied
and untied heads; Gemma 3 with a 6-slot sliding window on every other layer (the rows are 40
tokens, so it masks), linear rope scaling, query_pre_attn_scalar != head_dim, and all-global.

Tolerances (float32, dropout off): logits 1e-5 absolute (`LOGIT_ATOL`; the frameworks differ
in summation order only), 30 greedy tokens identical, the KV-cache decode's logits equal to the
full forward pass's (1e-5), an export reloaded by transformers gives the same logits (1e-5),
and AdamW steps against the torch twin: losses relative 1e-4, params 2e-4 absolute, as
`tests/test_parity.py` states for GPT-2.
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

from jaxgpt.config import PRESETS, ModelConfig, RopeScaling, TrainConfig, from_dict  # noqa: E402
from jaxgpt.io import torch_twin  # noqa: E402
from jaxgpt.io.hf_load import load_hf_state_dict  # noqa: E402
from jaxgpt.models import build_model, count_params, family_of, init_cache, param_shapes  # noqa: E402
from jaxgpt.models.llama import num_params_hf  # noqa: E402
from jaxgpt.models.rope import rope_frequencies  # noqa: E402
from jaxgpt.train.optim import make_optimizer  # noqa: E402
from jaxgpt.train.steps import create_train_state, lm_loss_fn, train_step  # noqa: E402

transformers.logging.set_verbosity_error()
LOGIT_ATOL = 1e-5
T = 40  # tokens per row: beyond the scaled rope's original context of 16

_TINY = dict(vocab_size=211, context_length=64, n_layer=2, n_head=4, n_embd=32, mlp_dim=48, dropout=0.0,
             qkv_bias=False, layer_norm_epsilon=1e-5)
CASES = {
    "llama-gqa2-tied-rope31": ModelConfig(family="llama", n_kv_head=2, tie_embeddings=True, rope_theta=500000.0,
                                          rope_scaling=RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                   high_freq_factor=4.0, original_context=16),
                                          **_TINY),
    "llama-gqa4-untied": ModelConfig(family="llama", n_kv_head=1, tie_embeddings=False, **_TINY),
    "qwen3-headdim16-gqa2-tied": ModelConfig(family="qwen3", n_kv_head=2, head_size=16, tie_embeddings=True,
                                             rope_theta=1000000.0, **{**_TINY, "layer_norm_epsilon": 1e-6}),
    "qwen3-gqa4-untied": ModelConfig(family="qwen3", n_kv_head=1, tie_embeddings=False, **_TINY),
    "gemma3-window6-gqa2-linear": ModelConfig(
        family="gemma3", n_kv_head=2, head_size=16, tie_embeddings=True, rope_theta=1e6, rope_local_theta=1e4,
        rope_scaling=RopeScaling(type="linear", factor=4.0), sliding_window=6, sliding_window_pattern=2,
        query_pre_attn_scalar=24, **{**_TINY, "n_layer": 3, "layer_norm_epsilon": 1e-6}),
    "gemma3-global-gqa4-untied": ModelConfig(family="gemma3", n_kv_head=1, tie_embeddings=False,
                                             query_pre_attn_scalar=8, **_TINY),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' model of `cfg` with random weights (std 0.1: logits far from uniform)."""
    torch.manual_seed(seed)
    model = family_of(cfg).torch_model(cfg).eval()
    offset = 1.0 if cfg.family == "gemma3" else 0.0  # Gemma's norms weigh by 1 + weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(0.5 - offset, 1.5 - offset)  # norms away from 1
    return model


def tokens_of(cfg, batch=2, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, T))


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t: build_model(cfg).apply({"params": p}, t))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cfg = CASES[request.param]
    model = hf_model(cfg)
    loaded_cfg, params = load_hf_state_dict(model.state_dict(), model.config)
    return request.param, cfg, model, loaded_cfg, params


def test_config_round_trip_and_rope(case):
    name, cfg, model, loaded_cfg, _ = case
    assert dataclasses.replace(loaded_cfg, head_size=loaded_cfg.head_dim) == dataclasses.replace(cfg, head_size=cfg.head_dim)
    # The inverse frequencies transformers' rotary module holds (the llama3 / linear scaling included).
    rotary = model.model.rotary_emb
    if cfg.family != "gemma3":
        np.testing.assert_allclose(rope_frequencies(cfg), rotary.inv_freq.numpy(), rtol=1e-6)
        return
    np.testing.assert_allclose(rope_frequencies(cfg), rotary.full_attention_inv_freq.numpy(), rtol=1e-6)
    if cfg.sliding_window:
        np.testing.assert_allclose(rope_frequencies(cfg, cfg.rope_local_theta, scaled=False),
                                   rotary.sliding_attention_inv_freq.numpy(), rtol=1e-6)


def test_logits_equal_transformers(case):
    _, cfg, model, loaded_cfg, params = case
    tokens = tokens_of(cfg)
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(_forward(loaded_cfg)(params, jnp.asarray(tokens)))
    assert np.abs(want).max() > 1.0  # not near-uniform logits
    np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


def test_greedy_tokens_and_cached_decode(case):
    """30 greedy tokens equal transformers' `generate` (its own KV cache), and jaxgpt's
    cached decode logits equal its full forward pass over the same tokens."""
    from jaxgpt.generation import generate_tokens

    _, cfg, model, loaded_cfg, params = case
    prompt = tokens_of(cfg, batch=1, seed=3)[:, :8]
    with torch.no_grad():
        ids = torch.as_tensor(prompt)
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                              do_sample=False, eos_token_id=None, pad_token_id=cfg.vocab_size - 1)[0, 8:].numpy()
    out = generate_tokens(params, loaded_cfg, prompt, np.ones_like(prompt, bool), jax.random.key(0), max_new_tokens=30)
    np.testing.assert_array_equal(np.asarray(out["tokens"][0]), want)

    full = np.concatenate([prompt, want[None]], axis=1)
    model_fn = build_model(loaded_cfg)
    cache = init_cache(loaded_cfg, 1, full.shape[1])
    logits_prefill, cache = model_fn.apply({"params": params}, jnp.asarray(full[:, :8]), cache=cache)
    steps = [logits_prefill]
    for i in range(8, full.shape[1]):
        step, cache = model_fn.apply({"params": params}, jnp.asarray(full[:, i:i + 1]), cache=cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), _forward(loaded_cfg)(params, jnp.asarray(full)),
                               atol=LOGIT_ATOL, rtol=0)


def test_export_reloads_in_transformers(case, tmp_path):
    from jaxgpt.io.hf_export import export_hf

    _, cfg, model, loaded_cfg, params = case
    export_hf(params, loaded_cfg, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(again).__name__ == family_of(cfg).hf_architecture
    tokens = torch.as_tensor(tokens_of(cfg))
    with torch.no_grad():
        np.testing.assert_allclose(again(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa2-tied-rope31", "qwen3-headdim16-gqa2-tied", "gemma3-window6-gqa2-linear"])
def test_adamw_steps_equal_the_torch_twin(name):
    """Five AdamW steps of jaxgpt's real `train_step` and of `torch.optim.AdamW` on the twin,
    from the same weights on the same batches: the same losses and the same weights."""
    cfg = CASES[name]
    train = TrainConfig(lr=2e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1, b1=0.9, b2=0.999, grad_clip=0.0)
    model = hf_model(cfg, seed=1).train()
    _, params = load_hf_state_dict(model.state_dict(), model.config)
    opt = torch_twin.torch_adamw(model, params, train)
    tx = make_optimizer(train)
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(build_model(cfg)), tx=tx))
    state = create_train_state(params, tx)
    pool = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 17))
    jl, tl = [], []
    for _ in range(5):
        state, metrics = step(state, {"inputs": pool[None, :, :-1], "targets": pool[None, :, 1:]}, jax.random.key(0))
        jl.append(float(metrics["loss"]))
        opt.zero_grad(set_to_none=True)
        loss = torch_twin.torch_lm_loss(model, pool[:, :-1], pool[:, 1:])
        loss.backward()
        opt.step()
        tl.append(loss.item())
    assert tl[-1] < tl[0] - 0.05
    np.testing.assert_allclose(jl, tl, rtol=1e-4)
    theirs = traverse_util.flatten_dict(torch_twin.from_torch(model, cfg))
    ours = traverse_util.flatten_dict(jax.device_get(state.params))
    assert max(float(np.max(np.abs(ours[k] - np.asarray(theirs[k])))) for k in ours) < 2e-4


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p == "gemma-3-27b" else p
                                    for p in PRESETS if not p.startswith("gpt2")])  # 27b: 13 s on the meta device
def test_preset_parameter_counts_equal_transformers(preset):
    """Each preset's shape: jaxgpt's parameter count == transformers' model of the same config
    (built on the meta device: nothing allocated) == the arithmetic of `num_params_hf`."""
    cfg = from_dict(ModelConfig, {"preset": preset})
    with torch.device("meta"):
        hf = family_of(cfg).torch_model(cfg)
    n = sum(p.numel() for p in hf.parameters())  # a tied head counted once
    assert count_params(param_shapes(cfg)) == n == num_params_hf(cfg)


def test_gemma3_config_json_forms_and_refusals():
    """Gemma 3's config.json: transformers 5's `rope_parameters` and 4's flat rope keys, and
    `layer_types` or the older `sliding_window_pattern`, read the same; what jaxgpt does not
    build (softcapping, another layer pattern or activation, yarn) is a one-line UserError, and
    other families refuse Gemma's fields."""
    from jaxgpt.errors import UserError
    from jaxgpt.models import get_family

    family, cfg = get_family("gemma3"), CASES["gemma3-window6-gqa2-linear"]
    flat = family.config_to_hf(cfg)
    assert family.config_from_hf(flat) == cfg
    v5 = {k: v for k, v in flat.items() if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq")}
    v5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    pattern = {**{k: v for k, v in flat.items() if k != "layer_types"}, "sliding_window_pattern": 2}
    assert family.config_from_hf(v5) == family.config_from_hf(pattern) == cfg
    for bad, message in [({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
                         ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}, "every N-th"),
                         ({"hidden_activation": "gelu"}, "gelu_pytorch_tanh"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn")]:
        with pytest.raises(UserError, match=message):
            family.config_from_hf({**flat, **bad})
    with pytest.raises(UserError, match="Gemma 3's"):
        family_of(CASES["llama-gqa4-untied"]).validate(dataclasses.replace(CASES["llama-gqa4-untied"], sliding_window=8))


def test_gemma3_language_model_of_a_multimodal_checkpoint(tmp_path):
    """A saved `Gemma3ForConditionalGeneration` (the 4B-27B checkpoints' class; tiny vision tower
    made here): its config.json's text_config and the language model's weights load, the image
    side is skipped, and the logits of a text-only input equal transformers' (1e-5); the hub's
    older names (`language_model.model.*`) load the same."""
    from jaxgpt.io.hf_load import load_hf_dir

    text = dict(vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=64,
                rope_scaling={"rope_type": "linear", "factor": 4.0})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(-0.5, 0.5)
    model.save_pretrained(tmp_path / "mm")
    cfg, params = load_hf_dir(tmp_path / "mm")
    assert cfg == CASES["gemma3-window6-gqa2-linear"]
    tokens = tokens_of(cfg)
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(_forward(cfg)(params, jnp.asarray(tokens))), want, atol=LOGIT_ATOL, rtol=0)
    hub_names = {k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
                 .replace("model.multi_modal_projector.", "multi_modal_projector."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("language_model.model.") for k in hub_names)
    again = load_hf_state_dict(hub_names, model.config)[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
