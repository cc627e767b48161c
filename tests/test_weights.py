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
import types
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from jaxgpt.io import hub, hf_load as weights, openai_tf as weights_openai  # noqa: E402
from jaxgpt.config import PRESETS, ModelConfig  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.io.hf_export import config_to_hf, export_hf  # noqa: E402
from jaxgpt.cli.export import main as export_main  # noqa: E402
from jaxgpt.io.hub import resolve_init  # noqa: E402
from jaxgpt.models.gpt2 import FAMILY as GPT2_FAMILY, GPT, num_params_hf  # noqa: E402
from jaxgpt.models import count_params, init_params, param_shapes  # noqa: E402

transformers.logging.set_verbosity_error()
LOGIT_ATOL = 1e-4  # float32, absolute

SHAPES = {
    # odd sizes: head_dim 16, vocab 257
    "odd": dict(vocab_size=257, n_positions=64, n_embd=48, n_layer=3, n_head=3),
    # untied head and a different LayerNorm epsilon
    "untied_eps": dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                       layer_norm_epsilon=1e-6, tie_word_embeddings=False),
    # many small heads, deeper
    "deep": dict(vocab_size=50, n_positions=56, n_embd=40, n_layer=4, n_head=5, layer_norm_epsilon=1e-6),
}


def make_hf_model(seed: int, **kw) -> GPT2LMHeadModel:
    """A random GPT-2 in eval mode with non-trivial weights: token embeddings std 0.3,
    position embeddings std 1 (so greedy decoding moves on instead of repeating one token),
    Conv1D std 0.1, biases std 0.1 and LayerNorm scales 1 +- 0.3, so logits spread over
    several units (far from uniform) and every parameter matters."""
    torch.manual_seed(seed)
    cfg = GPT2Config(bos_token_id=None, eos_token_id=None, **kw)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith(("transformer.ln_f", "ln_f")):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "wpe" in name:
                p.normal_(0.0, 1.0)
            elif "wte" in name or name == "lm_head.weight":
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory saved with save_pretrained, the torch model)."""
    out = {}
    for i, (name, kw) in enumerate(SHAPES.items()):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        model = make_hf_model(i, **kw)
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def jax_logits(config, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(GPT(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


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


# ---------------------------------------------------------------------------------------
# Presets and download


def _pin_to_files(monkeypatch, name, folder):
    """Pin preset `name`'s files to the sizes and sha256 of the files in `folder`."""
    import hashlib

    files = {f: hub.Expected((folder / f).stat().st_size, sha256=hashlib.sha256((folder / f).read_bytes()).hexdigest())
             for f in hub.PRESET_FILES}
    monkeypatch.setitem(hub.PRESET_PINS, name, hub.Pin(hub.PRESET_PINS[name].revision, files))


def test_preset_download_from_local_mirror_then_cached(hf_models, tmp_path, monkeypatch):
    path, model = hf_models["odd"]
    mirror = tmp_path / "mirror" / "gpt2" / "resolve" / hub.PRESET_PINS["gpt2"].revision
    mirror.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (mirror / f).write_bytes((path / f).read_bytes())
    _pin_to_files(monkeypatch, "gpt2", path)  # the mirror serves a tiny model under gpt2's name
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_BASE_URL", (tmp_path / "mirror").as_uri())
    cfg, params = resolve_init("gpt2-124m")  # alias of gpt2
    cached = tmp_path / "cache" / "hf" / "gpt2"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]  # no .part left
    assert cfg.n_embd == 48

    def offline(*a, **k):
        raise AssertionError("a cached preset must not touch the network")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    cfg2, _ = resolve_init("gpt2")
    assert cfg2 == cfg


class _Hub:
    """A local stand-in for huggingface.co on 127.0.0.1: the model API (sizes and hashes for
    a commit) and /resolve/ downloads, whose first responses can be cut short (no
    Content-Length) or tampered (same size, one byte changed)."""

    def __init__(self, name, folder):
        import hashlib
        import http.server
        import threading

        from jaxgpt.io.download import git_blob_sha1

        self.name, self.requests, self.faults = name, [], []
        self.files = {f: (folder / f).read_bytes() for f in hub.PRESET_FILES}
        data = self.files["model.safetensors"]
        siblings = [{"rfilename": "config.json", "size": len(self.files["config.json"]),
                     "blobId": git_blob_sha1(self.files["config.json"])},
                    {"rfilename": "model.safetensors", "size": 135, "blobId": "0" * 40,
                     "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 135}}]
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.requests.append(self.path)
                rev = hub.PRESET_PINS[owner.name].revision
                if self.path == f"/api/models/openai-community/{owner.name}/revision/{rev}?blobs=true":
                    body, length = json.dumps({"sha": rev, "siblings": siblings}).encode(), True
                else:
                    prefix = f"/openai-community/{owner.name}/resolve/{rev}/"
                    if not self.path.startswith(prefix) or self.path[len(prefix):] not in owner.files:
                        self.send_error(404)
                        return
                    file = self.path[len(prefix):]
                    body, length = owner.files[file], True
                    fault = owner.faults.pop(0) if file == "model.safetensors" and owner.faults else None
                    if fault == "truncate":
                        body, length = body[: len(body) // 2], False
                    elif fault == "tamper":
                        body = body[:-1] + bytes([body[-1] ^ 1])
                self.send_response(200)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("name, faults", [("gpt2-medium", ["truncate"]), ("gpt2-medium", ["tamper"]),
                                          ("gpt2", ["truncate"]), ("gpt2", ["tamper"]), ("gpt2-xl", [])])
def test_preset_download_is_verified_and_refetched_once(hf_models, tmp_path, monkeypatch, capsys, name, faults):
    """gpt2 is checked against its pinned sha256, the others against the hub's metadata for
    the pinned commit; a file cut short or tampered is deleted and fetched again, once."""
    folder = hf_models["odd"][0]
    server = _Hub(name, folder)
    try:
        if name == "gpt2":
            _pin_to_files(monkeypatch, "gpt2", folder)
        monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
        server.faults = list(faults)
        cfg, _ = resolve_init(name)
        assert cfg.n_embd == 48
        warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
        assert len(warnings) == len(faults)
        if faults:
            words = "was cut short" if faults[0] == "truncate" else "does not match its sha256"
            assert f"model.safetensors of {name} {words}" in warnings[0], warnings
        cached = tmp_path / "cache" / "hf" / name
        assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]
        assert (cached / "model.safetensors").read_bytes() == server.files["model.safetensors"]
        assert all(hub.PRESET_PINS[name].revision in r for r in server.requests)  # never `main`
        seen = len(server.requests)
        resolve_init(name)  # verified once: later runs read the cache
        assert len(server.requests) == seen
    finally:
        server.close()


def test_preset_download_that_stays_bad_is_one_line_and_leaves_nothing(hf_models, tmp_path, monkeypatch):
    folder = hf_models["odd"][0]
    server = _Hub("gpt2-large", folder)
    try:
        monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
        server.faults = ["tamper", "truncate"]
        with pytest.raises(UserError, match="cannot download gpt2-large: model.safetensors of gpt2-large was cut "
                                            "short .*twice") as e:
            resolve_init("gpt2-large")
        assert "\n" not in str(e.value)
        assert not (tmp_path / "cache" / "hf" / "gpt2-large" / "model.safetensors").exists()
        assert not list((tmp_path / "cache" / "hf" / "gpt2-large").glob("*.part"))
        assert not (tmp_path / "cache" / "hf" / "gpt2-large.verified.json").exists()
        # A same-size file already in the cache (from before downloads were verified) is checked too.
        cached = tmp_path / "cache" / "hf" / "gpt2-large"
        for f, data in server.files.items():
            (cached / f).write_bytes(data if f == "config.json" else data[:-1] + bytes([data[-1] ^ 1]))
        resolve_init("gpt2-large")
        assert (cached / "model.safetensors").read_bytes() == server.files["model.safetensors"]
    finally:
        server.close()


def test_every_preset_is_pinned_to_a_commit():
    import re

    assert set(hub.PRESET_PINS) == set(hub.HF_PRESETS)
    for name, pin in hub.PRESET_PINS.items():
        assert re.fullmatch(r"[0-9a-f]{40}", pin.revision), name
        for f, e in pin.files.items():
            assert f in hub.PRESET_FILES and re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.size > 0
    assert set(hub.PRESET_PINS["gpt2"].files) == set(hub.PRESET_FILES)


def test_preset_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        resolve_init("gpt2-medium")
    msg = str(e.value)
    target = tmp_path / "cache" / "hf" / "gpt2-medium"
    assert msg.startswith(f"cannot download gpt2-medium (offline?): put config.json and model.safetensors "
                          f"from https://huggingface.co/openai-community/gpt2-medium into {target}")
    assert "\n" not in msg
    assert not list(target.glob("*.part"))


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    class Broken:
        headers = {"Content-Length": "100"}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, n):
            if getattr(self, "done", False):
                raise ConnectionResetError("connection reset")
            self.done = True
            return b"x" * 10

    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda *a, **k: Broken())
    with pytest.raises(UserError, match="cannot download gpt2-large"):
        resolve_init("gpt2-large")
    assert list((tmp_path / "cache" / "hf" / "gpt2-large").iterdir()) == []


HF_PRESET_SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
                    "gpt2-xl": (1600, 48, 25)}


@pytest.mark.parametrize("ours, theirs", [("gpt2-124m", "gpt2"), ("gpt2-355m", "gpt2-medium"),
                                          ("gpt2-774m", "gpt2-large"), ("gpt2-1558m", "gpt2-xl")])
def test_preset_shapes_match_transformers(ours, theirs):
    """param_shapes(preset) == HF GPT2LMHeadModel's shapes, built on the meta device (no
    memory is allocated for the weights)."""
    n_embd, n_layer, n_head = HF_PRESET_SHAPES[theirs]
    config = ModelConfig(**PRESETS[ours])
    assert (config.n_embd, config.n_layer, config.n_head) == (n_embd, n_layer, n_head)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))
    hf_shapes = {}
    for key, t in hf.state_dict().items():
        target = GPT2_FAMILY.hf_target(key)
        assert target is not None, key
        if target.path is None or target.path == ("lm_head", "kernel"):
            continue  # mask buffers; the tied head is wte
        hf_shapes[target.path] = tuple(t.shape)
    ours_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(param_shapes(config)).items()}
    assert ours_shapes == hf_shapes
    n = sum(p.numel() for p in hf.parameters())  # the tied head counted once
    assert count_params(param_shapes(config)) == n == num_params_hf(config)
    if ours == "gpt2-124m":
        assert n == 124_439_808


# ---------------------------------------------------------------------------------------
# CLI, run directories, LoRA


def test_export_cli(hf_models, tmp_path, capsys):
    path, _ = hf_models["untied_eps"]
    out = tmp_path / "out"
    assert export_main(["--init", str(path), "--to-hf", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    capsys.readouterr()
    assert export_main(["--init", str(path), "--to-hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass --force" in err and err.count("\n") == 1
    assert export_main(["--init", str(path), "--to-hf", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left
    assert export_main(["--init", str(tmp_path / "missing"), "--to-hf", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory or preset" in err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("case", ["dot", "parent-of-cwd", "source", "holds-source", "other-files", "subfolder"])
def test_export_force_never_deletes_user_files(hf_models, tmp_path, capsys, monkeypatch, case):
    """--force replaces a previous export only: never `.`, a folder above it, the --init
    source (or a folder holding it), or a folder with anything else in it."""
    import shutil

    src = tmp_path / "lib" / "weights"
    shutil.copytree(hf_models["untied_eps"][0], src)  # config.json + model.safetensors: export-shaped
    (tmp_path / "proj" / "work").mkdir(parents=True)
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "proj" / "work")
    (tmp_path / "proj" / "work" / "train.log").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (other / name).write_text("mine")
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    out, words = {"dot": (".", "working folder"), "parent-of-cwd": (str(tmp_path / "proj"), "working folder"),
                  "source": (str(src), "--init weights"), "holds-source": (str(src.parent), "--init weights"),
                  "other-files": (str(other), "not a previous export (README.md)"),
                  "subfolder": (str(nested), "not a previous export (sub)")}[case]
    before = sorted(str(p) + (p.read_bytes().hex()[:64] if p.is_file() else "") for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert export_main(["--init", str(src), "--to-hf", out, "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert sorted(str(p) + (p.read_bytes().hex()[:64] if p.is_file() else "") for p in tmp_path.rglob("*")) == before
    if "source" not in case:  # the library refuses these too
        config, params = resolve_init(str(src))
        with pytest.raises(UserError, match=words.split(" (")[0]):
            export_hf(params, config, out, force=True)
    else:  # beside it is fine, and a second export there replaces the first
        assert export_main(["--init", str(src), "--to-hf", str(tmp_path / "hf")]) == 0
        assert export_main(["--init", str(src), "--to-hf", str(tmp_path / "hf"), "--force"]) == 0


def test_run_dir_delegates_to_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    config = ModelConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=4)
    params = init_params(config, jax.random.key(0))
    fake = types.ModuleType("jaxgpt.io.checkpoint")
    fake.load_params = lambda p, **kwargs: (types.SimpleNamespace(model=config), params)
    monkeypatch.setitem(sys.modules, "jaxgpt.io.checkpoint", fake)
    assert resolve_init(str(run)) == (config, params)


def test_run_dir_real_checkpoint(tmp_path):
    ckpt = pytest.importorskip("jaxgpt.io.checkpoint")
    if not all(hasattr(ckpt, n) for n in ("load_params", "checkpoint_manager", "save")):
        pytest.skip("jaxgpt.io.checkpoint has no load_params/save yet")
    from jaxgpt.config import Config, save_config

    config = ModelConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=4, tie_embeddings=False)
    params = jax.device_get(init_params(config, jax.random.key(0)))
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(model=config), run / "config.yaml")
    ckpt.save(ckpt.checkpoint_manager(run), 3, {"params": params, "step": np.int32(3)}, {})
    got_config, got = resolve_init(str(run))
    assert got_config == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, params)
    out = export_hf(got, got_config, tmp_path / "hf")
    assert "lm_head.weight" in hf_tensors(out)


def test_lora_params_must_be_merged_before_export(tmp_path):
    """Unmerged adapters are refused (their scale alpha / r lives in the run's config, which
    `--init RUN` reads); merged with `merge_lora` they export as W + A @ B * alpha / r."""
    from jaxgpt.models.lora import LoRAConfig, merge_lora

    config = ModelConfig(vocab_size=11, context_length=8, n_layer=1, n_head=1, n_embd=4)
    params = jax.device_get(init_params(config, jax.random.key(0)))
    lora = jax.tree_util.tree_map(lambda x: x, params)
    lora["h_0"]["attn"]["c_attn"]["lora_a"] = np.ones((4, 2), np.float32)
    lora["h_0"]["attn"]["c_attn"]["lora_b"] = np.ones((2, 12), np.float32)
    with pytest.raises(UserError, match="LoRA adapters"):
        export_hf(lora, config, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    out = export_hf(merge_lora(lora, LoRAConfig(rank=2, alpha=6.0)), config, tmp_path / "merged")
    np.testing.assert_allclose(hf_tensors(out)["transformer.h.0.attn.c_attn.weight"],
                               np.asarray(params["h_0"]["attn"]["c_attn"]["kernel"]) + 2.0 * 3.0, rtol=1e-6)
