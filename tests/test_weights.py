"""GPT-2 weight loading/export: parity with Hugging Face transformers (torch CPU).

Every model here is a small random GPT-2 built and saved by the test itself; nothing
touches the network (preset downloads are served from a local file:// directory or fail
through a patched `urlopen`). Tolerance: logits agree to 1e-4 absolute in float32 (observed
differences are ~1e-6 on logits of magnitude ~10: the two implementations differ only in
summation order).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from jaxgpt.io import hf_load as weights, openai_tf as weights_openai  # noqa: E402
from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.io.hf_export import config_to_hf, export_hf  # noqa: E402
from jaxgpt.cli.export import main as export_main  # noqa: E402
from jaxgpt.io.hub import resolve_init  # noqa: E402
from jaxgpt.models.gpt2 import GPT  # noqa: E402
from jaxgpt.models import init_params  # noqa: E402
from tests.hf_gpt2 import SHAPES, hf_tensors, save_hf_models  # noqa: E402

transformers.logging.set_verbosity_error()
LOGIT_ATOL = 1e-4  # float32, absolute


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory saved with save_pretrained, the torch model)."""
    return save_hf_models(tmp_path_factory)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def jax_logits(config, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(GPT(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


# ---------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(hf_models, name):
    path, model = hf_models[name]
    config, params = resolve_init(str(path))
    kw = SHAPES[name]
    assert (config.vocab_size, config.context_length, config.n_embd, config.n_layer, config.n_head) == (
        kw["vocab_size"], kw["n_positions"], kw["n_embd"], kw["n_layer"], kw["n_head"])
    assert config.layer_norm_epsilon == kw.get("layer_norm_epsilon", 1e-5)
    assert config.tie_embeddings == kw.get("tie_word_embeddings", True)
    assert ("lm_head" in params) == (not config.tie_embeddings)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, config.context_length))
    ref, out = hf_logits(model, tokens), jax_logits(config, params, tokens)
    assert ref.std() > 1.0, "logits should be far from uniform for a meaningful comparison"
    np.testing.assert_allclose(out, ref, rtol=0, atol=LOGIT_ATOL)


def test_conv1d_layout_needs_no_transpose(hf_models):
    """HF Conv1D weight is [in, out] = flax kernel layout: c_attn [d, 3d] is copied as is,
    and Conv1D's forward is x @ W + b with that same array."""
    path, model = hf_models["odd"]
    _, params = resolve_init(str(path))
    conv = model.transformer.h[1].attn.c_attn
    w = conv.weight.detach().numpy()
    assert w.shape == (48, 144)
    kernel = np.asarray(params["h_1"]["attn"]["c_attn"]["kernel"])
    assert np.array_equal(kernel, w)
    x = np.random.RandomState(1).randn(3, 48).astype(np.float32)
    with torch.no_grad():
        y = conv(torch.tensor(x)).numpy()
    np.testing.assert_allclose(x @ kernel + np.asarray(params["h_1"]["attn"]["c_attn"]["bias"]), y, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_generation_matches_transformers(hf_models, name):
    """40 greedy tokens, token for token, through jaxgpt's KV-cache decoder; two prompts of
    different lengths share one left-padded batch, each compared with HF on its own."""
    from jaxgpt.generation.decode import generate_tokens

    path, model = hf_models[name]
    config, params = resolve_init(str(path))
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, config.vocab_size, 7), rng.randint(0, config.vocab_size, 4)]
    n_new = 40
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    out = generate_tokens(params, config, tokens, mask, jax.random.key(0), max_new_tokens=n_new,
                          temperature=0.0, eos_id=None)
    ours = np.asarray(out["tokens"])
    assert ours.shape == (len(prompts), n_new)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor(p[None], dtype=torch.long), do_sample=False,
                                 max_new_tokens=n_new, pad_token_id=0, eos_token_id=None,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
        ref = ref[0, len(p):].numpy()
        assert len(ref) == n_new
        assert len(set(ref.tolist())) >= 8, "degenerate generation proves little"
        np.testing.assert_array_equal(ours[i], ref)


def test_repetition_penalty_matches_transformers(hf_models):
    """Greedy decoding with `repetition_penalty=1.8` equals transformers' `generate(...,
    repetition_penalty=1.8)` token for token (two prompts in one left-padded batch, the
    padding never counted as seen), differs from plain greedy, and the log-probs are still the
    model's own: those of the plain logits at the chosen tokens."""
    from jaxgpt.generation.decode import generate_tokens, pad_prompts
    from jaxgpt.models import build_model

    path, model = hf_models["odd"]
    config, params = resolve_init(str(path))
    rng = np.random.RandomState(5)
    prompts = [rng.randint(0, config.vocab_size, 6), rng.randint(0, config.vocab_size, 3)]
    tokens, mask = pad_prompts([p.tolist() for p in prompts], max_new_tokens=30, context_length=config.context_length)
    run = lambda **kw: jax.tree_util.tree_map(np.asarray, generate_tokens(  # noqa: E731
        params, config, tokens, mask, jax.random.key(0), max_new_tokens=30, **kw))
    out, plain = run(repetition_penalty=1.8), run()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor(p[None], dtype=torch.long), do_sample=False, max_new_tokens=30,
                                 repetition_penalty=1.8, pad_token_id=0, eos_token_id=None,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
        np.testing.assert_array_equal(out["tokens"][i], ref[0, len(p):].numpy())
    assert (out["tokens"] != plain["tokens"]).any() and len(set(out["tokens"][0].tolist())) > 20
    full = np.concatenate([tokens, out["tokens"]], axis=1)[1:, -33:]  # row 1: its 3 prompt tokens + 30
    logp = jax.nn.log_softmax(build_model(config).apply({"params": params}, full), axis=-1)
    want = np.take_along_axis(np.asarray(logp)[0, 2:-1], out["tokens"][1][:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(out["logprobs"][1], want, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_hf_round_trip_is_bitwise(hf_models, tmp_path, name):
    path, _ = hf_models[name]
    config, params = resolve_init(str(path))
    out = export_hf(params, config, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    before, after = hf_tensors(path), hf_tensors(out)
    assert sorted(before) == sorted(after)
    for k in before:
        assert after[k].dtype == np.float32 and after[k].flags.c_contiguous
        assert np.array_equal(before[k], after[k]), k
    original = json.loads((path / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon",
                "activation_function", "tie_word_embeddings", "resid_pdrop"):
        assert exported[key] == original.get(key, getattr(GPT2Config(), key)), key
    reloaded, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # and back again
    config2, params2 = resolve_init(str(out))
    assert config2 == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, params2)


def test_export_native_model_without_qkv_bias(tmp_path):
    """A jaxgpt-initialised, untied, qkv_bias=False model exports to HF with zero c_attn
    biases (HF GPT-2 has no bias-free option; adding zeros is exact) and HF reproduces it."""
    config = ModelConfig(vocab_size=97, context_length=24, n_layer=2, n_head=2, n_embd=16,
                         qkv_bias=False, tie_embeddings=False, layer_norm_epsilon=1e-6, dropout=0.0)
    params = init_params(config, jax.random.key(0))
    # spread the logits: scale matrices (not LayerNorms) and give biases non-zero values
    params = traverse_util.unflatten_dict({
        k: v * (30.0 if k[0] == "lm_head" else 5.0) if k[-1] in ("kernel", "embedding") else
        v + 0.1 * jax.random.normal(jax.random.key(len(k)), v.shape) if k[-1] == "bias" else v
        for k, v in traverse_util.flatten_dict(params).items()})
    out = export_hf(params, config, tmp_path / "native")
    tensors = hf_tensors(out)
    assert np.array_equal(tensors["transformer.h.1.attn.c_attn.bias"], np.zeros(48, np.float32))
    assert tensors["lm_head.weight"].shape == (97, 16)
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    assert hf.config.tie_word_embeddings is False
    tokens = np.random.RandomState(0).randint(0, 97, (2, 24))
    ref = hf_logits(hf, tokens)
    assert ref.std() > 1.0
    np.testing.assert_allclose(jax_logits(config, params, tokens), ref, rtol=0, atol=LOGIT_ATOL)


# ---------------------------------------------------------------------------------------
# Other layouts


def test_pytorch_bin_and_state_dict(hf_models, tmp_path):
    path, model = hf_models["untied_eps"]
    want_cfg, want = resolve_init(str(path))
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    for cfg, params in (resolve_init(str(d)), weights.load_hf_state_dict(model.state_dict(), model.config)):
        assert cfg == want_cfg
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               params, want)


class _Evil:
    """Unpickling this would create `marker` (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _bin_dir(tmp_path, name, write):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1)))
    write(d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_a_malicious_pytorch_bin_never_runs(tmp_path, capsys, kind):
    """A pickle whose loading would run code is refused in one line of ours; nothing runs."""
    import pickle


    marker = tmp_path / "pwned"
    evil = {"wte.weight": _Evil(str(marker))}
    write = (lambda p: torch.save(evil, p)) if kind == "torch-zip" else (lambda p: p.write_bytes(pickle.dumps(evil)))
    d = _bin_dir(tmp_path, "evil", write)
    with pytest.raises(UserError, match=r"pytorch_model.bin") as e:
        resolve_init(str(d))
    assert "\n" not in str(e.value) and not marker.exists()
    assert export_main(["--init", str(d), "--to-hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pytorch_model.bin" in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-dict"])
def test_a_corrupt_pytorch_bin_is_one_line(hf_models, tmp_path, damage):
    path, model = hf_models["untied_eps"]
    good = tmp_path / "good.bin"
    torch.save(model.state_dict(), good)
    data = good.read_bytes()
    write = {"truncated": lambda p: p.write_bytes(data[: len(data) // 2]),
             "garbage": lambda p: p.write_bytes(b"\x00not a checkpoint" * 64),
             "not-a-dict": lambda p: torch.save([torch.zeros(2)], p)}[damage]
    d = _bin_dir(tmp_path, damage, write)
    with pytest.raises(UserError, match=r"^(cannot read|refusing) .*pytorch_model.bin") as e:
        resolve_init(str(d))
    assert "\n" not in str(e.value)


def test_openai_layout_keys_without_prefix_and_buffers(hf_models, tmp_path):
    """The layout of the openai-community upload: GPT2Model keys (no `transformer.`), the
    `attn.bias` / `attn.masked_bias` mask buffers, and a tied `lm_head.weight` equal to wte."""
    path, _ = hf_models["odd"]
    want_cfg, want = resolve_init(str(path))
    tensors = {k.removeprefix("transformer."): v for k, v in hf_tensors(path).items()}
    for i in range(3):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    d = tmp_path / "official"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"))
    cfg, params = resolve_init(str(d))
    assert cfg == want_cfg and "lm_head" not in params
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(UserError, match="lm_head.weight differs from wte.weight"):
        resolve_init(str(d))


def openai_variables(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """A GPT-2 state dict in OpenAI's TF layout (Conv1D weights as [1, in, out])."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"model/wte": sd["transformer.wte.weight"], "model/wpe": sd["transformer.wpe.weight"],
           "model/ln_f/g": sd["transformer.ln_f.weight"], "model/ln_f/b": sd["transformer.ln_f.bias"]}
    for i in range(model.config.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"model/h{i}/{ln}/g"] = sd[p + ln + ".weight"]
            out[f"model/h{i}/{ln}/b"] = sd[p + ln + ".bias"]
        for mod in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            out[f"model/h{i}/{mod}/w"] = sd[p + mod.replace("/", ".") + ".weight"][None]
            out[f"model/h{i}/{mod}/b"] = sd[p + mod.replace("/", ".") + ".bias"]
    return out


def test_openai_tf_mapping_with_fake_reader(hf_models):
    path, model = hf_models["odd"]
    want_cfg, want = resolve_init(str(path))
    variables = openai_variables(model)
    hparams = {"n_vocab": 257, "n_ctx": 64, "n_embd": 48, "n_head": 3, "n_layer": 3}
    cfg, params = weights_openai.load_openai_variables([(k, v.shape) for k, v in variables.items()],
                                                variables.__getitem__, hparams)
    assert cfg == want_cfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)
    variables["model/h2/mlp/c_fc/w"] = variables["model/h2/mlp/c_fc/w"][:, :, :10]
    with pytest.raises(UserError, match=r"h_2/mlp/c_fc/kernel: checkpoint has \[48, 10\], model expects \[48, 192\]"):
        weights_openai.load_openai_variables([(k, v.shape) for k, v in variables.items()], variables.__getitem__, hparams)


def test_openai_tf_dir_needs_tensorflow(tmp_path, monkeypatch):
    d = tmp_path / "117M"
    d.mkdir()
    (d / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
                                                "n_head": 12, "n_layer": 12}))
    (d / "model.ckpt.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails even if installed
    with pytest.raises(UserError, match=r"needs TensorFlow \(pip install tensorflow\)") as e:
        resolve_init(str(d))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Bad input


def copy_hf(path: Path, dest: Path, config_changes=None, tensors=None) -> Path:
    dest.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_changes or {})
    (dest / "config.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else hf_tensors(path), str(dest / "model.safetensors"))
    return dest


def test_shape_mismatch_names_parameter_and_shapes(hf_models, tmp_path):
    path, _ = hf_models["odd"]
    bad = copy_hf(path, tmp_path / "bad", {"n_positions": 32})
    with pytest.raises(UserError, match=r"^wpe/embedding: checkpoint has \[64, 48\], model expects \[32, 48\]") as e:
        resolve_init(str(bad))
    assert "\n" not in str(e.value)
    # loading into a model of another size (the run's config) names the first mismatch
    expect = ModelConfig(vocab_size=257, context_length=64, n_layer=3, n_head=4, n_embd=64)
    with pytest.raises(UserError, match=r"h_0/attn/c_attn/kernel: checkpoint has \[48, 144\], model expects \[64, 192\]"):
        resolve_init(str(path), expect=expect)


def test_missing_and_unexpected_tensors(hf_models, tmp_path):
    path, _ = hf_models["odd"]
    tensors = hf_tensors(path)
    missing = dict(tensors)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(UserError, match="missing tensor h_1/mlp/c_fc/bias"):
        resolve_init(str(copy_hf(path, tmp_path / "missing", tensors=missing)))
    extra = {**tensors, "transformer.h.3.ln_1.weight": np.ones(48, np.float32)}
    with pytest.raises(UserError, match=r"unexpected tensor transformer.h.3.ln_1.weight \[48\]"):
        resolve_init(str(copy_hf(path, tmp_path / "extra", tensors=extra)))
    junk = {**tensors, "transformer.h.0.attn.q_proj.weight": np.ones((48, 48), np.float32)}
    with pytest.raises(UserError, match="unexpected tensor transformer.h.0.attn.q_proj.weight"):
        resolve_init(str(copy_hf(path, tmp_path / "junk", tensors=junk)))


@pytest.mark.parametrize("changes, message", [
    ({"activation_function": "relu"}, "activation_function is 'relu'"),
    ({"n_inner": 100}, "n_inner is 100"),
    ({"model_type": "mistral"}, "only GPT-2"),
    ({"n_embd": None}, "missing n_embd"),
])
def test_unsupported_config(hf_models, tmp_path, changes, message):
    path, _ = hf_models["odd"]
    with pytest.raises(UserError, match=message):
        resolve_init(str(copy_hf(path, tmp_path / "cfg", changes)))


def test_missing_files_and_unknown_spec(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(ModelConfig())))
    with pytest.raises(UserError, match="has config.json but no model.safetensors"):
        resolve_init(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither config.yaml"):
        resolve_init(str(empty))
    with pytest.raises(UserError, match="no such directory or preset; give a jaxgpt run directory.*gpt2-xl"):
        resolve_init(str(tmp_path / "nope"))
    (d / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_init(str(d))
