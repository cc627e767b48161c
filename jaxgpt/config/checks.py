"""Range checks that no type can express, one `UserError` naming the key each (non-finite
numbers are already refused while a config is parsed, `jaxgpt.config.loading`)."""
from __future__ import annotations

from jaxgpt.config.sections import (ATTENTION_KINDS, DTYPES, FAMILIES, MODEL_INITS, REMAT_POLICIES, ROPE_SCALINGS,
                                    DataConfig, MeshConfig, ModelConfig, TrainConfig)
from jaxgpt.errors import UserError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def one_of(value: str, choices, key: str) -> None:
    """UserError naming `key` unless `value` is one of `choices`."""
    _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")


def at_least(section, prefix: str, minimum: float, *names: str) -> None:
    """UserError naming `prefix.name` for the first of `names` in `section` below `minimum`."""
    for name in names:
        value = getattr(section, name)
        _require(value >= minimum, f"{prefix}.{name} must be >= {minimum}, got {value}")


def validate(cfg, *, check_vocab: bool = False, model_from_init: bool = False) -> None:
    """Range checks that no type can express (non-finite numbers are refused when parsed).
    Raises `UserError` naming the key. `check_vocab`, `model_from_init`: see `load_config`."""
    m = getattr(cfg, "model", None)
    if isinstance(m, ModelConfig):
        validate_model(m, check_vocab=check_vocab)
    d = getattr(cfg, "data", None)
    if isinstance(d, DataConfig):
        _require(d.stride >= 0 and d.context_length >= 0,
                 f"data.stride and data.context_length must be >= 0, got {d.stride}, {d.context_length}")
        if isinstance(m, ModelConfig) and not model_from_init and d.context_length > m.context_length:
            raise UserError(
                f"data.context_length={d.context_length} is longer than the model's context "
                f"(model.context_length={m.context_length}); use at most {m.context_length}"
            )
        _require(0.0 <= d.val_ratio < 1.0, f"data.val_ratio must be in [0, 1), got {d.val_ratio}")
        _require(d.seed >= 0, f"data.seed must be >= 0, got {d.seed}")
        _require(bool(d.path.strip()), "data.path is empty; give a bundled corpus name, a text file, a folder or tfds:NAME")
        _require(bool(d.text_field.strip()), "data.text_field is empty; name the tfds feature that holds the text")
    mesh = getattr(cfg, "mesh", None)
    if isinstance(mesh, MeshConfig):
        sizes = (mesh.data, mesh.fsdp, mesh.tensor)
        _require(all(v >= 1 or v == -1 for v in sizes) and sizes.count(-1) <= 1,
                 f"mesh.data, mesh.fsdp and mesh.tensor must each be >= 1, one of them may be -1 (the rest of "
                 f"the devices); got {', '.join(map(str, sizes))}")
    t = getattr(cfg, "train", None)
    if isinstance(t, TrainConfig):
        validate_train(t)


def validate_model(m: ModelConfig, *, check_vocab: bool = False) -> None:
    one_of(m.family, FAMILIES, "model.family")
    for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("n_kv_head", "head_size", "mlp_dim"):
        _require(getattr(m, name) >= 0, f"model.{name} must be >= 0 (0 = the default), got {getattr(m, name)}")
    _require(bool(m.head_size) or not m.n_embd % m.n_head,
             f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}), or set model.head_size")
    _require(not m.n_head % m.kv_heads, f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    _require(m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}")
    _require(m.rope_local_theta > 0, f"model.rope_local_theta must be positive, got {m.rope_local_theta}")
    _require(m.sliding_window >= 0, f"model.sliding_window must be >= 0 (0 = none), got {m.sliding_window}")
    _require(m.sliding_window_pattern >= 1, f"model.sliding_window_pattern must be >= 1, got {m.sliding_window_pattern}")
    _require(m.query_pre_attn_scalar >= 0, f"model.query_pre_attn_scalar must be >= 0 (0 = head_dim), got "
             f"{m.query_pre_attn_scalar}")
    one_of(m.rope_scaling.type, ROPE_SCALINGS, "model.rope_scaling.type")
    if m.rope_scaling.type:
        r = m.rope_scaling
        _require(r.factor >= 1 and r.original_context > 0 and 0 < r.low_freq_factor < r.high_freq_factor,
                 "model.rope_scaling needs factor >= 1, original_context > 0 and 0 < low_freq_factor < "
                 f"high_freq_factor; got {r}")
    _require(bool(m.tokenizer.strip()), "model.tokenizer is empty; give gpt2 or a folder with tokenizer.json")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.layer_norm_epsilon > 0, f"model.layer_norm_epsilon must be positive, got {m.layer_norm_epsilon}")
    _require(m.dtype in DTYPES, f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    _require(m.param_dtype in DTYPES, f"model.param_dtype must be float32, bfloat16 or float16, got {m.param_dtype!r}")
    _require(m.init in MODEL_INITS, f"model.init must be {' or '.join(MODEL_INITS)}, got {m.init!r}")
    _require(m.attention in ATTENTION_KINDS,
             f"model.attention must be {', '.join(ATTENTION_KINDS[:-1])} or {ATTENTION_KINDS[-1]}, got {m.attention!r}")
    _require(m.remat_policy in REMAT_POLICIES,
             f"model.remat_policy {m.remat_policy!r} is not a jax.checkpoint_policies policy; "
             f"choose one of {', '.join(REMAT_POLICIES)}")
    if check_vocab and m.tokenizer == "gpt2":  # other tokenizers: checked once loaded (the driver)
        from jaxgpt.text.gpt2_bpe import N_VOCAB

        _require(m.vocab_size >= N_VOCAB,
                 f"model.vocab_size={m.vocab_size} is smaller than the GPT-2 tokenizer's {N_VOCAB:,} ids; "
                 f"use at least {N_VOCAB} (e.g. 50304, a multiple of 64)")


def validate_train(t: TrainConfig) -> None:
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    for name in ("batch_size", "grad_accum_steps", "max_steps", "log_interval", "eval_interval"):
        _require(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "num_devices", "eval_batches",
                 "checkpoint_interval", "sample_tokens", "seed", "eval_train_batches"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("b1", "b2"):
        _require(0.0 <= getattr(t, name) < 1.0, f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _require(not t.sample_tokens or bool(t.sample_prompt),
             "train.sample_prompt is empty; give a prompt or set train.sample_tokens=0")
