"""Typed, frozen run configuration: YAML files, presets and dotted `--set` overrides.

A config is a tree of frozen dataclasses. It is built from (in order) the dataclass
defaults, a YAML file, then `--set section.key=value` overrides; every key must name a
field, every value must have the field's type, and `validate` checks ranges. The resolved
config is written into each run directory as `config.yaml`, so a run can be resumed or
reloaded without the file it started from.

The `model` section may name a `preset` (`gpt2-124m`, ...); its fields are filled from the
preset first and then any other keys given override them. Later layers win: a preset set by
`--set` (or a later file) replaces the shape keys an earlier file set, while keys given in
the same layer as the preset still override it.

Every value is checked here, before a run directory exists: numbers must be finite, ranges
are checked by `validate`, enumerations must name a known choice, and `model.vocab_size`
must hold the GPT-2 tokenizer's ids (a run's own saved config, reloaded, keeps its vocab).
"""
from jaxgpt.config.checks import at_least, one_of, validate, validate_model, validate_train
from jaxgpt.config.loading import (from_dict, is_run_config, load_config, parse_overrides, read_yaml, replace,
                                   save_config, to_dict, with_local_paths)
from jaxgpt.config.sections import (ATTENTION_KINDS, DTYPES, FAMILIES, INIT_KEPT, MODEL_INITS, PRESET_KEYS, PRESETS,
                                    REMAT_POLICIES, TRAIN_MODES, Config, DataConfig, MeshConfig, ModelConfig,
                                    RopeScaling, TrainConfig)

__all__ = ["ATTENTION_KINDS", "DTYPES", "FAMILIES", "INIT_KEPT", "MODEL_INITS", "PRESET_KEYS", "PRESETS",
           "REMAT_POLICIES", "TRAIN_MODES", "Config", "DataConfig", "MeshConfig", "ModelConfig", "RopeScaling",
           "TrainConfig", "at_least", "from_dict", "is_run_config", "load_config", "one_of", "parse_overrides",
           "read_yaml", "replace", "save_config", "to_dict", "with_local_paths", "validate", "validate_model",
           "validate_train"]
