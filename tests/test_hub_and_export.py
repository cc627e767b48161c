"""GPT-2 presets from the Hub (pinned, verified, cached downloads served locally) and the
export CLI (run directories as the source, LoRA parameters refused until merged).

Every model here is a small random GPT-2 built and saved by the test itself; nothing
touches the network: downloads come from a file:// mirror or a local HTTP server on
127.0.0.1, or fail through a patched `urlopen`.
"""
from __future__ import annotations

import json
import sys
import types
import urllib.error

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from jaxgpt.io import hub  # noqa: E402
from jaxgpt.config import PRESETS, ModelConfig  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.io.hf_export import export_hf  # noqa: E402
from jaxgpt.cli.export import main as export_main  # noqa: E402
from jaxgpt.io.hub import resolve_init  # noqa: E402
from jaxgpt.models.gpt2 import FAMILY as GPT2_FAMILY, num_params_hf  # noqa: E402
from jaxgpt.models import count_params, init_params, param_shapes  # noqa: E402
from tests.hf_gpt2 import hf_tensors, save_hf_models  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory saved with save_pretrained, the torch model)."""
    return save_hf_models(tmp_path_factory)


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
    assert not (tmp_path / "cache" / "hf" / "gpt2-large").exists()  # no partial file, no empty folder


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
