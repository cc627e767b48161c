from pathlib import Path

import pytest

from jaxgpt.config import Config, ModelConfig, load_config, parse_overrides, replace, save_config
from jaxgpt.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_config_loads(path):
    """Pretraining configs load as `Config`; configs/finetune/TASK[-x].yaml as TASK's class."""
    from jaxgpt.tasks import config_class_for, task_of_config

    cls = config_class_for(path)
    cfg = load_config(path, cls=cls)
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert (path.parent.name == "finetune") == (task_of_config(path) is not None)
    if task_of_config(path) is not None:
        from jaxgpt.tasks.common import validate_finetune

        validate_finetune(cfg)


def test_defaults_and_overrides():
    cfg = load_config(None, ["model.n_layer=4", "train.lr=1e-3", "data.path=foo.txt", "model.qkv_bias=false"])
    assert cfg.model.n_layer == 4 and cfg.train.lr == 1e-3 and cfg.data.path == "foo.txt"
    assert cfg.model.qkv_bias is False
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_preset_then_overrides():
    cfg = load_config(None, ["model.preset=gpt2-355m", "model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 16, 1024)


def test_int_accepted_for_float_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=1"])
    assert isinstance(cfg.train.lr, float)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.n_layers=4", "unknown config key model.n_layers"),
        ("modle.n_layer=4", "unknown config key modle"),
        ("model.preset=gpt5", "unknown model preset"),
        ("train.lr=-1", "train.lr must be positive"),
        ("train.lr=abc", "expected a number"),
        ("model.n_head=5", "divisible"),
        ("model.qkv_bias=maybe", "true or false"),
        ("model.dtype=int8", "model.dtype"),
        ("data.val_ratio=1.5", "data.val_ratio"),
        ("train.batch_size=0", "train.batch_size must be positive"),
        ("novalue", "section.key=value"),
    ],
)
def test_bad_values_are_user_errors(override, words):
    with pytest.raises(UserError, match=words):
        load_config(None, [override])


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_replace_returns_validated_copy():
    cfg = Config()
    new = replace(cfg, train={"max_steps": 7})
    assert new.train.max_steps == 7 and cfg.train.max_steps != 7
    assert isinstance(new.model, ModelConfig)
