import re
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


# ---------------------------------------------------------------------------------------
# Every field of every config class, with a bad value of its type

import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

# Strings that take any text (a path resolved later, a prompt, an optional column name).
FREE_TEXT = {
    "data.cache_dir", "train.sample_prompt", "finetune.init",
    "grpo:data.path", "reward:data.input_field", "dpo:data.input_field", "ppo:data.input_field",
}
# Strings that must name one of a few choices.
CHOICES = {"model.dtype", "model.attention", "model.remat_policy", "finetune.train_mode", "rollout.sampler",
           "grpo.loss_agg", "grpo.supervision", "data.task", "grpo.loss_type", "grpo.scale_rewards",
           "grpo.ratio_level", "grpo.overlong"}


def _config_classes():
    from jaxgpt.tasks import TASKS, config_class_for, default_config
    from jaxgpt.tasks.pretrain import DEFAULT_CONFIG

    yield "pretrain", Config, DEFAULT_CONFIG
    for name in TASKS:
        yield name, config_class_for(default_config(name)), default_config(name)


def _bad_values(task: str, key: str, typ) -> list:
    if key.startswith("mesh."):
        return [0, -2]  # -1 is valid: the rest of the devices
    if typ is bool:
        return ["maybe"]
    if typ is int:
        return [-1]
    if typ is float:
        return [float("nan"), -1.0]  # inf: test_bad_ranges_and_kinds
    if typing.get_origin(typ) is tuple:
        return ["''"]  # an empty list
    if f"{task}:{key}" in FREE_TEXT or key in FREE_TEXT:
        return []
    return ["no-such-choice"] if key in CHOICES else ["''"]


def _walk():
    for task, cls, path in _config_classes():
        for section in dataclasses.fields(cls):
            section_cls = typing.get_type_hints(cls)[section.name]
            hints = typing.get_type_hints(section_cls)
            for f in dataclasses.fields(section_cls):
                key = f"{section.name}.{f.name}"
                for bad in _bad_values(task, key, hints[f.name]):
                    yield pytest.param(task, cls, path, key, bad, id=f"{task}-{key}={bad}")


def _load(task, cls, path, override):
    cfg = load_config(path, [override], cls=cls)
    if task != "pretrain":
        from jaxgpt.tasks import load
        from jaxgpt.tasks.common import validate_finetune

        validate_finetune(cfg)
        load(task).RECIPE.validate_config(cfg)  # a task's own config sections


@pytest.mark.parametrize("task, cls, path, key, bad", list(_walk()))
def test_every_config_field_refuses_a_bad_value(task, cls, path, key, bad):
    value = "nan" if isinstance(bad, float) and math.isnan(bad) else bad
    with pytest.raises(UserError) as e:
        _load(task, cls, path, f"{key}={value}")
    message = str(e.value)
    assert "\n" not in message and key.split(".")[-1] in message, message


def test_free_text_fields_exist():
    """The exemptions above name real fields (so the walk cannot silently skip a renamed one)."""
    keys = {f"{task}:{s.name}.{f.name}" for task, cls, _ in _config_classes() for s in dataclasses.fields(cls)
            for f in dataclasses.fields(typing.get_type_hints(cls)[s.name])}
    for key in FREE_TEXT:
        assert key in keys or any(k.endswith(":" + key) for k in keys), key


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=nan", "train.lr: expected a finite number"),
        ("train.lr=inf", "train.lr: expected a finite number"),
        ("train.lr=0", "train.lr must be positive"),
        ("train.b1=1.0", "train.b1 must be in [0, 1)"),
        ("train.b2=1.5", "train.b2"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("model.dropout=1.0", "model.dropout must be in [0, 1)"),
        ("model.layer_norm_epsilon=0", "model.layer_norm_epsilon must be positive"),
        ("model.vocab_size=1000", "model.vocab_size=1000 is smaller than the GPT-2 tokenizer's 50,257"),
        ("model.remat_policy=save_only_these_names", "model.remat_policy"),
        ("model.remat_policy=everything", "not a jax.checkpoint_policies policy"),
        ("model.attention=flash", "model.attention must be"),
        ("model=5", "config model: expected a section"),
        ("train=[1, 2]", "config train: expected a section"),
        ("model.preset=5", "unknown model preset"),
        ("train.sample_prompt=''", "train.sample_prompt is empty"),
    ],
)
def test_bad_ranges_and_kinds(override, words):
    with pytest.raises(UserError, match=re.escape(words)):
        load_config(None, [override])


def test_good_edge_values_pass():
    cfg = load_config(None, ["model.vocab_size=50304", "model.remat_policy=dots_saveable", "train.b1=0",
                             "train.grad_clip=0", "train.sample_prompt=''", "train.sample_tokens=0"])
    assert cfg.model.vocab_size == 50304 and cfg.train.b1 == 0.0


def test_a_section_given_as_a_scalar_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: 5\n")
    with pytest.raises(UserError, match="config model: expected a section of key: value lines, got 5"):
        load_config(p)


def test_a_later_preset_replaces_an_earlier_files_shape(tmp_path):
    """default.yaml shrinks gpt2-124m to 4 layers; `--set model.preset=gpt2-124m` must then give
    GPT-2 124M, while shape keys set beside the preset in the same layer still win."""
    from jaxgpt.models import count_params, param_shapes
    from jaxgpt.tasks.pretrain import DEFAULT_CONFIG

    small = load_config(DEFAULT_CONFIG).model
    assert (small.n_layer, small.n_embd, small.context_length) == (4, 128, 128)
    full = load_config(DEFAULT_CONFIG, ["model.preset=gpt2-124m"]).model
    assert count_params(param_shapes(full)) == 124_439_808 and full.context_length == 1024
    mixed = load_config(DEFAULT_CONFIG, ["model.preset=gpt2-355m", "model.n_layer=2"]).model
    assert (mixed.n_layer, mixed.n_head, mixed.n_embd, mixed.context_length) == (2, 16, 1024, 1024)
    p = tmp_path / "later.yaml"
    p.write_text("model:\n  n_layer: 3\n")  # a later layer without a preset only changes its keys
    assert load_config(p, ["model.preset=gpt2-124m"]).model.n_layer == 12
    assert load_config(p, ["model.n_embd=64", "model.n_head=4"]).model.n_layer == 3


def test_a_runs_own_config_keeps_its_vocabulary(tmp_path, tiny_model_cfg):
    """The tokenizer check guards new configs; a saved run (its weights) keeps its vocab."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(Config(model=tiny_model_cfg), run / "config.yaml")
    assert load_config(run / "config.yaml").model.vocab_size == 97
    with pytest.raises(UserError, match="vocab_size=97"):
        load_config(run / "config.yaml", check_vocab=True)
    save_config(Config(model=tiny_model_cfg), tmp_path / "mine.yaml")
    with pytest.raises(UserError, match="vocab_size=97"):
        load_config(tmp_path / "mine.yaml")


def test_a_model_shape_file_works_with_every_entry_point():
    """`--model-config configs/gpt2-124m.yaml` gives a fine-tuning task that file's shape
    (its data/train sections, which the task's classes lack, are not read)."""
    import finetune
    from jaxgpt.tasks import TASKS, default_config, load

    shape = Path(__file__).resolve().parent.parent / "configs" / "gpt2-124m.yaml"
    for task in TASKS:
        cfg = load_config(default_config(task), cls=load(task).RECIPE.config_class, model_file=shape)
        assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.dropout) == (12, 12, 768, 0.1), task
    args = finetune.build_parser().parse_args(["classify", "--model-config", str(shape)])
    assert args.model_config == str(shape)
