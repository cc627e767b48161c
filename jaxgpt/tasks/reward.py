"""`finetune.py reward`: a reward model trained on preference pairs (Bradley-Terry).

The model is the GPT with its LM head replaced by a scalar head (`num_classes=1`,
leaf `score/kernel [n_embd, 1]`), read at each row's last real token: the <|endoftext|>
after the response (rows are right-padded; attention is causal, so padding cannot change
it). Each pair's chosen and rejected sequences (`jaxgpt.data.preference`, the instruction
format) go through one forward pass, and the loss is `-log sigmoid(r_chosen - r_rejected)`
(`jaxgpt.train.preference_losses.pairwise_loss`), through the shared `train_step` and the shared engine (AdamW,
train modes full / last-block / lora, pmapped data parallelism, checkpoints, `--resume`).

Metrics: `{split}_pairwise_accuracy` (fraction of pairs scored chosen > rejected),
`{split}_loss` (`train_eval_loss` on the train split: `train_loss` is the running loss of
the updates) and `{split}_score_margin` (mean r_chosen - r_rejected), on train and val at
each epoch end and on all three splits at the end; `val_pairwise_accuracy_before` before the
first update. Run directory: config.yaml, metrics.jsonl, metrics.json, loss.png,
accuracy.png, checkpoints/.

For RL (PPO) and scoring: `load_reward_model(run)` and the pure `reward_scores(...)`;
`python -m jaxgpt reward --init RUN --instruction ... --response ...` prints scores.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig, at_least
from jaxgpt.data.preference import PreferenceDataConfig, load_preference, validate_data
from jaxgpt.engine import Plot
from jaxgpt.engine.driver import train
from jaxgpt.errors import UserError
from jaxgpt.models.lora import LoRAConfig
from jaxgpt.train.losses import last_token
from jaxgpt.train.preference_losses import reward_loss_fn
from jaxgpt.tasks import default_config
from jaxgpt.tasks.common import PAIR_PLOTS, SplitTask, TaskConfig

DEFAULT_CONFIG = default_config("reward")
BATCH_KEYS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths", "weight")


@dataclass(frozen=True)
class RewardConfig(TaskConfig):
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)


def reward_scores(model_cfg: ModelConfig, params, tokens, lengths):
    """Scores `[b]` float32 of right-padded rows `tokens [b, t]` int32 with `lengths [b]`
    int32 real tokens each: the scalar head at position `lengths - 1` (dropout off).

    Pure and jittable (`jax.jit(reward_scores, static_argnums=0)`); `params` are plain
    (merged) reward-model params from `load_reward_model`. Rows should be scored as trained:
    `format_prompt(instruction, input) + response + <|endoftext|>`
    (`jaxgpt.data.preference.encode_example`), the end-of-text being the last real token."""
    from jaxgpt.models import build_model

    scores = build_model(model_cfg, num_classes=1).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    return last_token(scores, jnp.asarray(lengths, jnp.int32))[:, 0]


@dataclass(frozen=True)
class _RewardRun:
    """The sections of a reward run's config.yaml that loading its model needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def load_reward_model(run_dir: str | Path, flag: str = "--reward") -> tuple[ModelConfig, Any]:
    """`(model_cfg, params)` of a reward run's latest checkpoint (plain params: LoRA adapters
    merged), or of a Hugging Face `*ForSequenceClassification` folder or hub id with one label
    (a reward run's export, or e.g. Skywork's Llama / Qwen3 reward models), with a
    `score/kernel [n_embd, 1]` head, for `reward_scores`; or a PEFT SEQ_CLS adapter of one label
    on its base."""
    from jaxgpt.io import checkpoint
    from jaxgpt.io.hf_load import load_hf_dir
    from jaxgpt.io.hub import local_folder
    from jaxgpt.io.peft_adapters import is_adapter_folder, load_adapter
    from jaxgpt.models.lora import has_lora, merge_lora

    run_dir = local_folder(run_dir, flag)
    if is_adapter_folder(run_dir):
        model_cfg, params = load_adapter(run_dir)
    elif (run_dir / "config.json").is_file() and not (run_dir / "config.yaml").is_file():
        model_cfg, params = load_hf_dir(run_dir)
    elif not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a jaxgpt run directory (no config.yaml)")
    else:
        cfg, params = checkpoint.load_params(run_dir, config_cls=_RewardRun)
        if has_lora(params):
            params = merge_lora(params, cfg.lora)
        model_cfg = cfg.model
    kernel = params.get("score", {}).get("kernel") if hasattr(params, "get") else None
    if kernel is None or tuple(np.shape(kernel)) != (model_cfg.n_embd, 1):
        raise UserError(f"{run_dir} is not a reward-model run (no score head [{model_cfg.n_embd}, 1]); "
                        "train one with `python finetune.py reward`")
    return model_cfg, params


class Reward(SplitTask):
    name = "reward"
    config_class = RewardConfig
    split_metrics = {"correct": "pairwise_accuracy", "margin": "score_margin"}
    before_splits = ("val",)
    batch_keys = BATCH_KEYS
    examples = "pairs"
    plots = (*PAIR_PLOTS, Plot("accuracy.png", "epoch", ("train_pairwise_accuracy", "val_pairwise_accuracy"),
                               "pairwise accuracy"))

    @staticmethod
    def validate_config(cfg) -> None:
        validate_data(cfg.data, cfg.model.context_length)
        at_least(cfg.data, "data", 0, "seed")

    def load_data(self) -> None:
        self.data = load_preference(self.cfg.data, self.cfg.model.context_length, tfds_data_dir=self.tfds_data_dir,
                                    tokenizer=self.tokenizer)

    def model_attrs(self) -> dict:
        return {"num_classes": 1}

    def loss_fn(self, model):
        return reward_loss_fn(model)

    def throughput(self):
        return self.throughput_of(2 * self.data.max_length)

    def summary(self, loop, before: dict, final: dict) -> dict:
        return {**super().summary(loop, before, final), "pairs_per_sec": loop.tokens_per_sec() / (2 * self.data.max_length),
                "truncated_responses": self.data.truncated, "max_length": self.data.max_length}


RECIPE = Reward


# The Python entry point: train_reward_model(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
train_reward_model = functools.partial(train, Reward)


__all__ = ["RewardConfig", "load_reward_model", "reward_scores", "train_reward_model"]
