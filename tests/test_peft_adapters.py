"""PEFT LoRA adapters: `python -m jaxgpt export --adapter` writes a run's as a folder that
`peft.PeftModel.from_pretrained` puts on the base model, giving the run's logits; `--init
ADAPTER` reads one PEFT saved onto its base, giving PEFT's logits."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxgpt.config import save_config  # noqa: E402
from jaxgpt.io.checkpoint import checkpoint_manager, save  # noqa: E402
from jaxgpt.io.hf_export import export_hf  # noqa: E402
from jaxgpt.models import build_model, init_params  # noqa: E402
from jaxgpt.models.lora import LoRAConfig  # noqa: E402
from jaxgpt.tasks.common import FinetuneConfig  # noqa: E402
from jaxgpt.tasks.instruct import InstructConfig  # noqa: E402
from tests.test_export_heads import _config  # noqa: E402

TOKENS = np.array([[5, 90, 31, 7, 7, 200, 3], [1, 2, 3, 4, 5, 6, 7]])


def _lora_run(tmp_path, name: str, lora: LoRAConfig, *, init: str = "base", classes: int = 0):
    """A base language model exported to HF, and a LoRA run on it (a classifier's with `classes`)
    whose adapters are random (not the zeros a fresh lora_b holds, so the adapters change the logits)."""
    cfg = _config(tmp_path, name)
    extra = {"num_classes": classes} if classes else {}
    base = init_params(cfg, jax.random.key(0))
    base_dir = export_hf(jax.device_get(base), cfg, tmp_path / "base") if init == "base" else None
    params = traverse_util.flatten_dict(jax.device_get(init_params(cfg, jax.random.key(1), lora=lora, **extra)))
    flat_base = traverse_util.flatten_dict(jax.device_get(base))
    rng = np.random.default_rng(2)
    for path in params:
        params[path] = (flat_base[path] if path in flat_base else
                        rng.normal(0, 0.2, np.shape(params[path])).astype(np.float32))
    params = traverse_util.unflatten_dict(params)
    run = tmp_path / "run"
    run.mkdir()
    finetune = FinetuneConfig(init=str(base_dir) if base_dir else init, train_mode="lora")
    save_config(InstructConfig(model=cfg, lora=lora, finetune=finetune), run / "config.yaml")
    save(checkpoint_manager(run), 1, {"params": params, "step": np.int32(1)}, {})
    return cfg, params, base_dir, run


def _export(run, out, capsys=None) -> int:
    from jaxgpt.cli.export import main

    return main(["--init", str(run), "--to-hf", str(out), "--adapter"])


@pytest.mark.parametrize("name, targets", [("gpt2", ("all",)), ("qwen3-untied", ("all",)),
                                           ("gemma3-window4", ("q_proj", "layers_1/mlp/down_proj"))])
def test_peft_puts_the_adapters_on_the_base_and_gives_the_runs_logits(tmp_path, capsys, name, targets):
    lora = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    cfg, params, base_dir, run = _lora_run(tmp_path, name, lora)
    out = tmp_path / "adapter"
    assert _export(run, out) == 0
    printed = capsys.readouterr().out
    assert "as a PEFT LoRA adapter: r=4 lora_alpha=8.0" in printed and str(base_dir) in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    want_targets = {"gpt2": ["c_attn", "c_fc", "c_proj"],
                    "qwen3-untied": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                    "gemma3-window4": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                       "model.layers.1.self_attn.q_proj"]}[name]
    assert config["target_modules"] == want_targets and config["fan_in_fan_out"] == (name == "gpt2")

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        before = base(torch.from_numpy(TOKENS)).logits.numpy()
        model = peft.PeftModel.from_pretrained(base, out).eval()
        got = model(torch.from_numpy(TOKENS)).logits.numpy()
    ours = np.asarray(build_model(cfg, lora=lora).apply({"params": params}, TOKENS))
    assert np.abs(ours - before).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, ours, atol=2e-4)


@pytest.mark.parametrize("name, classes", [("gpt2", 3), ("qwen3-untied", 1)])
def test_a_classifiers_adapter_saves_its_score_head(tmp_path, capsys, name, classes):
    """A LoRA classifier (3 classes) or reward model (1) is a SEQ_CLS adapter: PEFT on
    `AutoModelForSequenceClassification` of the base gives the run's scores."""
    lora = LoRAConfig(rank=2, alpha=6.0)
    cfg, params, base_dir, run = _lora_run(tmp_path, name, lora, classes=classes)
    assert _export(run, tmp_path / "adapter") == 0
    shown = capsys.readouterr().out
    assert f"from_pretrained(BASE, num_labels={classes}, id2label={{0: 'LABEL_0'" in shown  # no labels.json here
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=classes,
                                                                           pad_token_id=0).eval()  # no 0 in TOKENS
    with torch.no_grad():
        before = base(torch.from_numpy(TOKENS)).logits.numpy()
        got = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(torch.from_numpy(TOKENS)).logits.numpy()
    ours = np.asarray(build_model(cfg, lora=lora, num_classes=classes).apply({"params": params}, TOKENS))[:, -1]
    assert got.shape == (2, classes) and np.abs(ours - before).max() > 1e-2  # the head and adapters matter
    np.testing.assert_allclose(got, ours, atol=2e-4)
    # and back: the adapter as --init is the run's classifier (labels as transformers names them)
    from jaxgpt.errors import UserError
    from jaxgpt.tasks.classify import load_classifier
    from jaxgpt.tasks.reward import load_reward_model

    if classes > 1:
        back_cfg, back, labels, _ = load_classifier(tmp_path / "adapter")
        assert labels == [f"LABEL_{i}" for i in range(classes)]
    else:
        back_cfg, back = load_reward_model(tmp_path / "adapter")
        with pytest.raises(UserError, match="is not a classifier's adapter: it is a reward model's"):
            load_classifier(tmp_path / "adapter")
    again = np.asarray(build_model(back_cfg, num_classes=classes).apply({"params": back}, TOKENS))[:, -1]
    np.testing.assert_allclose(again, ours, atol=2e-5)


def test_init_from_a_classifier_adapter_peft_saved(tmp_path):
    """A SEQ_CLS adapter PEFT made and saved itself (its default modules_to_save, random A and B,
    a trained score head) read as a classifier: PEFT's scores."""
    from jaxgpt.tasks.classify import load_classifier

    cfg = _config(tmp_path, "qwen3-untied")
    base_dir = export_hf(jax.device_get(init_params(cfg, jax.random.key(0))), cfg, tmp_path / "base")
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3, pad_token_id=0)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"])).eval()
    model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = model(torch.from_numpy(TOKENS)).logits.numpy()
    got_cfg, params, labels, _ = load_classifier(tmp_path / "theirs")
    ours = np.asarray(build_model(got_cfg, num_classes=3).apply({"params": params}, TOKENS))[:, -1]
    assert labels == ["LABEL_0", "LABEL_1", "LABEL_2"] and "lm_head" not in params
    np.testing.assert_allclose(ours, want, atol=2e-4)


@pytest.mark.parametrize("case, message", [
    ("full", "has no LoRA adapters (finetune.train_mode=full): export the model itself"),
    ("split", "lora.split_qkv=true puts three adapters on the fused c_attn"),
    ("random", "was trained from random weights (finetune.init is empty)"),
    ("not-a-run", "is no run directory (no config.yaml)")])
def test_what_has_no_peft_form_is_one_line(tmp_path, capsys, case, message):
    lora = LoRAConfig(rank=2, alpha=4.0, split_qkv=case == "split")
    if case == "not-a-run":
        run = tmp_path / "nothing"
        run.mkdir()
    elif case == "full":
        cfg = _config(tmp_path, "gpt2")
        run = tmp_path / "run"
        run.mkdir()
        save_config(InstructConfig(model=cfg, finetune=FinetuneConfig(init="gpt2")), run / "config.yaml")
        save(checkpoint_manager(run), 1, {"params": jax.device_get(init_params(cfg, jax.random.key(0))),
                                          "step": np.int32(1)}, {})
    else:
        run = _lora_run(tmp_path, "gpt2", lora, init="" if case == "random" else "base")[3]
    assert _export(run, tmp_path / "adapter") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("name, rslora", [("gpt2", False), ("qwen3-untied", True)])
def test_init_from_an_adapter_peft_saved_gives_peft_logits(tmp_path, monkeypatch, name, rslora):
    """An adapter made and saved by PEFT itself (random A and B, rsLoRA's alpha / sqrt(r) for
    Qwen3) read as `--init ADAPTER`, from a folder or a hub repository: its base with the
    adapters merged, PEFT's logits; jaxgpt's own export reads back to the run's merged params."""
    from jaxgpt.io.hub import resolve_init
    from jaxgpt.models.lora import merge_lora
    from tests.test_hf_folders import RepoServer

    cfg = _config(tmp_path, name)
    base_dir = export_hf(jax.device_get(init_params(cfg, jax.random.key(0))), cfg, tmp_path / "base")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora,
                                                      fan_in_fan_out=name == "gpt2", init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = model(torch.from_numpy(TOKENS)).logits.numpy()
        with model.disable_adapter():
            plain = model(torch.from_numpy(TOKENS)).logits.numpy()
    got_cfg, params = resolve_init(str(tmp_path / "theirs"))
    assert dataclasses.replace(got_cfg, tokenizer=cfg.tokenizer) == cfg  # the base folder's tokenizer
    ours = np.asarray(build_model(cfg).apply({"params": params}, TOKENS))
    assert np.abs(want - plain).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, want, atol=2e-4)
    server = RepoServer(tmp_path / "theirs", "Org/Tiny-LoRA")  # the hub: the adapter only, its base local
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXGPT_HF_ENDPOINT", server.endpoint)
    _, hub = resolve_init("Org/Tiny-LoRA")
    for path, value in traverse_util.flatten_dict(hub).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(traverse_util.flatten_dict(params)[path]))

    lora = LoRAConfig(rank=4, alpha=8.0)
    _, run_params, _, run = _lora_run(tmp_path / "mine", name, lora)
    assert _export(run, tmp_path / "mine" / "adapter") == 0
    _, back = resolve_init(str(tmp_path / "mine" / "adapter"))
    merged = traverse_util.flatten_dict(jax.device_get(merge_lora(run_params, lora)))
    for path, value in traverse_util.flatten_dict(back).items():
        np.testing.assert_allclose(np.asarray(value), merged[path], atol=1e-6, err_msg="/".join(path))


def test_adapters_jaxgpt_cannot_hold_are_one_line(tmp_path):
    from jaxgpt.errors import UserError
    from jaxgpt.io.hub import resolve_init

    cfg, _, _, run = _lora_run(tmp_path, "gpt2", LoRAConfig(rank=2, alpha=4.0))
    out = tmp_path / "adapter"
    assert _export(run, out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    for change, message in ((dict(use_dora=True), "sets use_dora, which jaxgpt's LoRA layers cannot hold"),
                            (dict(peft_type="IA3"), "is a PEFT IA3 adapter; jaxgpt reads LoRA adapters only"),
                            (dict(base_model_name_or_path=""), "names no base_model_name_or_path"),
                            (dict(modules_to_save=["lm_head"]), "sets modules_to_save, which jaxgpt's"),
                            (dict(task_type="SEQ_CLS", modules_to_save=["score"]),
                             r"is a classifier's adapter \(SEQ_CLS\) without its score head")):
        (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            resolve_init(str(out))
