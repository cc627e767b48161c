"""Llama / Qwen3 Hugging Face folders in (`--init DIR`, sharded, bfloat16, with a tokenizer),
a hub id downloaded from a local server into the verified cache (`jaxgpt.io.hub_repos`, with
`HF_TOKEN`), and the folders jaxgpt refuses: one line, exit 2, nothing written."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.io.hub import resolve_init  # noqa: E402
from jaxgpt.models import family_of  # noqa: E402
from tests.test_chat import CHATML, chat_folder  # noqa: E402

CFG = ModelConfig(family="qwen3", qkv_bias=False, vocab_size=310, context_length=32, n_layer=2, n_head=4, n_kv_head=2,
                  n_embd=32, head_size=16, mlp_dim=48, dropout=0.0, layer_norm_epsilon=1e-6, rope_theta=1e6)


def hf_folder(path: Path, *, dtype=torch.float32, shards: int = 1, tokenizer: bool = True) -> tuple[Path, dict]:
    """`save_pretrained` of a random transformers Qwen3 (sharded when `shards` > 1), with the
    test's tokenizer and chat template; returns the folder and its float32 state dict."""
    torch.manual_seed(0)
    model = family_of(CFG).torch_model(CFG).to(dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(size // shards, 1) if shards > 1 else "5GB")
    if tokenizer:
        for f in chat_folder(path.parent / f"{path.name}-tok", CHATML).iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path, {k: v.float().numpy() for k, v in model.state_dict().items()}


def _as_hf(params, cfg) -> dict:
    family = family_of(cfg)
    out = {}
    for p, v in traverse_util.flatten_dict(jax.device_get(params)).items():
        key, transposed = family.hf_key(p)
        out[key] = np.asarray(v, np.float32).T if transposed else np.asarray(v, np.float32)
    return out


@pytest.mark.parametrize("dtype, shards", [(torch.float32, 3), (torch.bfloat16, 1)])
def test_sharded_and_bfloat16_folders_load_with_their_tokenizer(tmp_path, dtype, shards):
    path, state = hf_folder(tmp_path / "m", dtype=dtype, shards=shards)
    if shards > 1:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    cfg, params = resolve_init(str(path))
    assert cfg.family == "qwen3" and cfg.head_dim == 16 and cfg.tokenizer == str(path.resolve())
    got = _as_hf(params, cfg)
    assert set(got) | {"lm_head.weight"} >= set(state)
    for key, value in got.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)  # bf16 -> f32 is exact


@pytest.mark.parametrize("change, words", [
    ("model_type", "model_type is 'mistral'; only GPT-2 / Llama / Qwen3"),
    ("shard", "safetensors, which is not in"),
    ("shape", "checkpoint has [64, 32], model expects [32, 32]"),
])
def test_bad_folders_exit_2_before_anything_is_written(tmp_path, capsys, change, words):
    import finetune

    path, _ = hf_folder(tmp_path / "m", shards=3)
    config = json.loads((path / "config.json").read_text())
    if change == "model_type":
        config["model_type"] = "mistral"
    elif change == "shard":
        sorted(path.glob("model-*.safetensors"))[1].unlink()
    else:
        config["num_attention_heads"] = 2  # o_proj is [64, 32] (4 heads x 16) in the file; 2 heads: [32, 32]
    (path / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' progress bars while saving
    assert finetune.main(["instruct", "--init", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


class RepoServer:
    """The hub's metadata API and file downloads for one repository, on loopback."""

    SHA = ("c0ffee" * 7)[:40]  # the commit every revision names

    def __init__(self, folder: Path, repo: str, token: str = "", kind: str = "models"):
        """kind: "models" or "datasets" (a data set's files are served at their paths below `folder`)."""
        self.files = {f.relative_to(folder).as_posix(): f.read_bytes()
                      for f in sorted(folder.rglob("*")) if f.is_file()}
        siblings = []
        for name, data in self.files.items():
            entry = {"rfilename": name, "size": len(data)}
            if name.endswith((".safetensors", ".parquet")):  # LFS files: sha256
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            else:
                entry["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            siblings.append(entry)
        info = json.dumps({"sha": self.SHA, "siblings": siblings}).encode()
        owner = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.requests.append(self.path)
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                files = f"{'/datasets' if kind == 'datasets' else ''}/{repo}/resolve/{owner.SHA}/"
                name = urllib.parse.unquote(self.path[len(files):])
                if self.path.startswith(f"/api/{kind}/{repo}/revision/") and self.path.endswith("?blobs=true"):
                    body = info
                elif self.path.startswith(files) and name in owner.files:
                    body = owner.files[name]
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_a_hub_id_downloads_once_into_the_verified_cache(tmp_path, monkeypatch):
    path, state = hf_folder(tmp_path / "m", shards=2)
    server = RepoServer(path, "Org/Tiny-Qwen3", token="s3cret")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="Org/Tiny-Qwen3 is gated or private .* set HF_TOKEN"):
        resolve_init("Org/Tiny-Qwen3")
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    cfg, params = resolve_init("Org/Tiny-Qwen3")
    folder = tmp_path / "cache" / "hf" / "Org--Tiny-Qwen3"
    assert cfg.tokenizer == str(folder.resolve()) and (folder / "tokenizer_config.json").is_file()
    for key, value in _as_hf(params, cfg).items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    before = len(server.requests)
    server.server.shutdown()  # offline now: the verified cache is enough
    assert resolve_init("Org/Tiny-Qwen3")[0] == cfg and len(server.requests) == before


def test_offline_hub_id_says_where_to_put_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError) as e:
        resolve_init("qwen3-0.6b")
    message = str(e.value)
    assert "\n" not in message and "cannot download Qwen/Qwen3-0.6B (offline?)" in message
    assert "https://huggingface.co/Qwen/Qwen3-0.6B" in message and "--init FOLDER" in message


def test_a_mistyped_run_directory_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`--init runs/trian-1` where runs/ is a local folder: "no such directory" with the close
    name, not a download error for a hub repository `runs/trian-1`; the failed download
    leaves no empty folder in the cache."""
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train-1").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^--init runs/trian-1: no such directory \(did you mean runs/train-1\?\)"):
        resolve_init("runs/trian-1")
    with pytest.raises(UserError, match=r"no such directory \(runs/ holds train-1\)"):
        resolve_init("runs/spam")
    with pytest.raises(UserError, match="cannot download Org/Model"):  # no local folder Org/: a hub id
        resolve_init("Org/Model")
    assert list((tmp_path / "cache" / "hf").iterdir()) == []
