"""Task heads out to Hugging Face (`python -m jaxgpt export`) and back in: a classify run is
written as its family's `*ForSequenceClassification` with its labels, a reward run as one with
a single score, a PPO policy as the language model without its value head. transformers'
class probabilities and scores equal jaxgpt's (1e-5), and the exported folders serve
`python -m jaxgpt classify` / `reward` as the runs do."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.config import ModelConfig, save_config  # noqa: E402
from jaxgpt.errors import UserError  # noqa: E402
from jaxgpt.models import build_model, init_params  # noqa: E402
from jaxgpt.text.tokenizer import tokenizer_of  # noqa: E402
from tests.test_chat import CHATML, chat_folder  # noqa: E402
from tests.test_ppo import save_run  # noqa: E402

TEXTS = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w10", "", "w4 w4 w4 w4 w4 w4 w4 w4 w4 w4 w4 w4 w9"]
LABELS = ["ham", "spam", "eggs"]
_SHAPE = dict(context_length=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
MODELS = {  # gpt2 with tiktoken (its pad is its eos); the others with a tokenizer.json (pad != eos)
    "gpt2": dict(family="gpt2", **_SHAPE),
    "qwen3-untied": dict(family="qwen3", qkv_bias=False, vocab_size=310, n_kv_head=2, head_size=16, mlp_dim=48,
                         tie_embeddings=False, layer_norm_epsilon=1e-6, **_SHAPE),
    "gemma3-window4": dict(family="gemma3", qkv_bias=False, vocab_size=310, n_kv_head=2, head_size=16, mlp_dim=48,
                           sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=16,
                           layer_norm_epsilon=1e-6, **_SHAPE),
}


def _config(tmp_path: Path, name: str) -> ModelConfig:
    kw = dict(MODELS[name])
    if kw["family"] != "gpt2":
        kw["tokenizer"] = str(chat_folder(tmp_path / "tok", CHATML))
    return ModelConfig(**kw)


def _export(init, out: Path) -> int:
    from jaxgpt.cli.export import main

    return main(["--init", str(init), "--to-hf", str(out)])


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([r + [pad] * (width - len(r)) for r in rows], np.int64)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_classify_run_exports_as_sequence_classification(tmp_path, capsys, name):
    from jaxgpt.cli.classify_texts import main as classify_main
    from jaxgpt.io.checkpoint import checkpoint_manager, save
    from jaxgpt.io.hub import resolve_init
    from jaxgpt.tasks.classify import ClassifyConfig, load_classifier, predict

    cfg = _config(tmp_path, name)
    params = jax.device_get(init_params(cfg, jax.random.key(3), num_classes=len(LABELS)))
    run = tmp_path / "run"
    run.mkdir()
    save_config(ClassifyConfig(model=cfg), run / "config.yaml")
    (run / "labels.json").write_text(json.dumps({"labels": LABELS, "max_length": 24}))
    save(checkpoint_manager(run), 1, {"params": params, "step": np.int32(1)}, {})
    out = tmp_path / "hf"
    assert _export(run, out) == 0
    family_class = {"gpt2": "GPT2", "qwen3": "Qwen3", "gemma3": "Gemma3Text"}[cfg.family]
    assert f"as {family_class}ForSequenceClassification" in capsys.readouterr().out

    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(theirs).__name__ == f"{family_class}ForSequenceClassification"
    assert [theirs.config.id2label[i] for i in range(3)] == LABELS
    tok = tokenizer_of(cfg)
    ids = [(tok.encode(t) or [tok.eos_id])[:24] for t in TEXTS]  # a run reads a text's first max_length tokens
    assert max(map(len, ids)) > 4  # past the sliding window
    with torch.no_grad():
        probs = theirs(torch.from_numpy(_padded(ids, tok.pad_id))).logits.softmax(-1).numpy()
    want = [(LABELS[int(i)], float(p[i])) for p, i in zip(probs, probs.argmax(-1))]
    assert len({label for label, _ in want}) > 1  # the texts are told apart

    ours = predict(*load_classifier(run), TEXTS, batch_size=2)  # the run's tokenizer, not GPT-2's
    assert [label for label, _ in ours] == [label for label, _ in want]
    np.testing.assert_allclose([p for _, p in ours], [p for _, p in want], atol=1e-5)
    folder = load_classifier(out)  # the export serves `python -m jaxgpt classify` as the run does
    assert folder[2] == LABELS and folder[3] == cfg.context_length
    np.testing.assert_allclose([p for _, p in predict(*folder[:3], 24, TEXTS)], [p for _, p in want], atol=1e-5)
    assert classify_main(["--init", str(out), *TEXTS[:2]]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [label for label, _ in want[:2]]
    if not cfg.tie_embeddings:  # no LM head: the commands that generate refuse it in one line
        from jaxgpt.cli.generate import main as generate_main

        assert generate_main(["--init", str(out), "--prompt", "w1", "--max-new-tokens", "2"]) == 2
        assert "has no language-model head (lm_head): it is a classifier" in capsys.readouterr().err
    assert _export(out, tmp_path / "again") == 0  # HF -> jaxgpt -> HF: the same files, labels included
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    _, back = resolve_init(out)  # and --init takes it back whole, score head included
    flat = traverse_util.flatten_dict(params)
    assert set(traverse_util.flatten_dict(back)) == set(flat)
    for path, value in traverse_util.flatten_dict(back).items():
        np.testing.assert_array_equal(np.asarray(value), flat[path], err_msg="/".join(path))


@pytest.mark.parametrize("name", ["gpt2", "qwen3-untied"])
def test_a_reward_run_exports_with_one_score(tmp_path, monkeypatch, name):
    """The score is read at the eos ending each sequence. GPT-2 pads with that eos, so its
    config.json has no pad_token_id and transformers scores one row at a time; with its own
    padding token a batch of right-padded rows scores the same. On the hub, the folder serves
    `--reward ORG/NAME` (and `classify --init ORG/NAME`'s refusal names the reward command)."""
    from jaxgpt.tasks.classify import load_classifier
    from jaxgpt.tasks.reward import load_reward_model, reward_scores
    from tests.test_hf_folders import RepoServer

    cfg = _config(tmp_path, name)
    run = save_run(tmp_path / "rm", init_params(cfg, jax.random.key(4), num_classes=1), cfg)
    out = tmp_path / "hf"
    assert _export(run, out) == 0
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = tokenizer_of(cfg)
    rows = [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    model_cfg, params = load_reward_model(run)
    want = np.asarray(reward_scores(model_cfg, params, _padded(rows, tok.pad_id).astype(np.int32),
                                    np.array([len(r) for r in rows])))
    with torch.no_grad():
        if cfg.family == "gpt2":
            assert theirs.config.pad_token_id is None
            got = [float(theirs(torch.tensor([r])).logits[0, 0]) for r in rows]
        else:
            assert theirs.config.pad_token_id == tok.pad_id != tok.eos_id
            got = theirs(torch.from_numpy(_padded(rows, tok.pad_id))).logits[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(np.round(want, 4))) == len(rows)
    again = reward_scores(*load_reward_model(out), _padded(rows, tok.pad_id).astype(np.int32),
                          np.array([len(r) for r in rows]))  # the export serves `--reward` as the run does
    np.testing.assert_allclose(np.asarray(again), want, atol=1e-6)
    server = RepoServer(out, "Org/Tiny-RM")
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    hub = reward_scores(*load_reward_model("Org/Tiny-RM"), _padded(rows, tok.pad_id).astype(np.int32),
                        np.array([len(r) for r in rows]))
    np.testing.assert_allclose(np.asarray(hub), want, atol=1e-6)
    with pytest.raises(UserError, match="is not a classifier: its config.json is a reward model"):
        load_classifier("Org/Tiny-RM")


def test_a_ppo_policy_exports_without_its_value_head(tmp_path):
    from safetensors import safe_open

    cfg = ModelConfig(**MODELS["gpt2"])
    params = init_params(cfg, jax.random.key(5), value_head=True)
    assert "value_head" in params
    out = tmp_path / "hf"
    assert _export(save_run(tmp_path / "ppo", params, cfg), out) == 0
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert not any("value" in key for key in f.keys())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    tokens = np.array([[5, 900, 31, 7, 7]])
    ours = build_model(cfg).apply({"params": {k: v for k, v in params.items() if k != "value_head"}}, tokens)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(tokens)).logits.numpy(), np.asarray(ours), atol=1e-4)


def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from jaxgpt.io import hf_export

    def half_then_full(path, tensors, metadata=None):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = ModelConfig(**MODELS["gpt2"])
    run = save_run(tmp_path / "run", init_params(cfg, jax.random.key(6)), cfg)
    monkeypatch.setattr(hf_export, "write_safetensors", half_then_full)
    out = tmp_path / "out" / "hf"
    assert _export(run, out) == 2
    err = capsys.readouterr().err
    assert err == f"error: the disk is full: could not write the export ({out}: no space left on device)\n"
    assert list((tmp_path / "out").iterdir()) == []  # neither the export nor its temporary folder
