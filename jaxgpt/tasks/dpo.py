"""`finetune.py dpo`: direct preference optimisation (Rafailov et al. 2023; Raschka ch. 7).

The policy starts from `--init` (an instruction-tuned run, e.g. runs/sft) and the *reference*
is that same initial model, frozen. For every pair the policy's and the reference's summed
response log-probs (`jaxgpt.train.losses.sequence_logprobs`, prompt and padding masked) give
`dpo_loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`
(`jaxgpt.train.preference_losses.dpo_loss`; `dpo.label_smoothing` > 0 gives conservative DPO).

The reference is an explicit argument, never hidden state, and it is used exactly once: a
pass at the start computes `ref_chosen`, `ref_rejected` for every pair of every split
(dropout off) and stores them as data columns (and in RUN/reference_logprobs.npz, so
`--resume` needs no second model). The train step then runs the policy only. In
`--train-mode lora` the reference params are the policy's own base leaves with the adapter
leaves left out (`reference_params`), applied with the plain model (lora=None): the very
arrays the policy freezes, not a second copy of the model.

Metrics (train and val at each epoch end, val/train also before the first update, all three
splits at the end): `{split}_loss` (`train_eval_loss` on train), `{split}_reward_accuracy`
(pairs whose implicit reward `beta * (pi - ref)` is higher for the chosen response),
`{split}_reward_margin` (mean chosen minus rejected implicit reward), `{split}_chosen_reward`
and `{split}_rejected_reward`; metrics.json adds `val_reward_margin_before` / `_after` (and
train_*). Greedy responses to `dpo.num_responses` val and test prompts, before and after
training, go to RUN/responses.json. Run directory: config.yaml, metrics.jsonl, metrics.json,
loss.png, margin.png, responses.json, reference_logprobs.npz, checkpoints/.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.data.preference import SPLITS, PreferenceData, PreferenceDataConfig, load_preference
from jaxgpt.engine import Plot, is_main_process
from jaxgpt.engine.driver import train
from jaxgpt.errors import UserError
from jaxgpt.models.lora import merge_lora, without_adapters
from jaxgpt.models import build_model
from jaxgpt.train.preference_losses import dpo_loss_fn, reference_fn
from jaxgpt.tasks import default_config
from jaxgpt.tasks.common import PAIR_PLOTS, SplitTask, TaskConfig
from jaxgpt.tasks.reward import Reward
from jaxgpt.io.files import atomic_write, write_via_temporary

DEFAULT_CONFIG = default_config("dpo")
REFERENCE_FILE = "reference_logprobs.npz"
RESPONSES_FILE = "responses.json"
BATCH_KEYS = ("chosen", "rejected", "chosen_mask", "rejected_mask", "positions", "ref_chosen", "ref_rejected",
              "weight")


@dataclass(frozen=True)
class DPOSection:
    """`dpo` section."""

    beta: float = 0.1  # strength of the implicit KL penalty towards the reference
    label_smoothing: float = 0.0  # cDPO: assumed probability that a preference label is flipped (< 0.5)
    num_responses: int = 5  # greedy responses to this many val and this many test prompts, before and after
    max_new_tokens: int = 48  # per response (capped so the prompt + response fit the context)


@dataclass(frozen=True)
class DPOConfig(TaskConfig):
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOSection = field(default_factory=DPOSection)


def validate_dpo(cfg: DPOConfig) -> None:
    d = cfg.dpo
    if not (np.isfinite(d.beta) and d.beta > 0):
        raise UserError(f"dpo.beta must be > 0, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.num_responses < 0 or d.max_new_tokens < 1:
        raise UserError(f"dpo.num_responses must be >= 0 and dpo.max_new_tokens >= 1, "
                        f"got {d.num_responses} and {d.max_new_tokens}")


# ---------------------------------------------------------------------------------------
# Pure pieces: log-probs, reference, loss


def reference_params(params, train_mode: str):
    """The frozen reference's params from the policy's initial ones: in lora mode the base
    leaves without the adapters (the same arrays the policy freezes, no copy); otherwise
    the initial params themselves (training updates a device copy)."""
    return without_adapters(params) if train_mode == "lora" else params


def precompute_reference(dp, ref_model, ref_params, data: PreferenceData, batch_size: int) -> dict[str, dict]:
    """`{split: {"ref_chosen": [n], "ref_rejected": [n]}}` float32: one pass of the frozen
    reference over every pair (jitted, or pmapped over `dp`'s devices)."""
    from tqdm.auto import tqdm

    p_ref = dp.compile_eval_step(reference_fn(ref_model))
    ref_params = dp.put_frozen(ref_params)
    out = {}
    for split in SPLITS:
        n = len(data.splits[split])
        vals = {"ref_chosen": np.full(n, np.nan, np.float32), "ref_rejected": np.full(n, np.nan, np.float32)}
        batches = data.eval_batches(split, batch_size)
        for batch in tqdm(batches, total=-(-n // batch_size), desc=f"reference {split}", leave=False,
                          disable=not is_main_process()):
            got = jax.device_get(p_ref(ref_params, dp.shard_eval({k: batch[k] for k in BATCH_KEYS[:5]})))
            real = batch["weight"] > 0
            for k, v in vals.items():
                v[batch["row"][real]] = np.asarray(got[k]).reshape(-1)[real]
        if np.isnan(vals["ref_chosen"]).any() or np.isnan(vals["ref_rejected"]).any():
            raise UserError(f"the reference model's log-probs of the {split} pairs are not finite; "
                            "check the --init weights")
        out[split] = vals
    return out


def _save_reference(path: Path, ref: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{split}/{k}": v for split, cols in ref.items() for k, v in cols.items()})

    write_via_temporary(path, write)


def _load_reference(path: Path, data: PreferenceData) -> dict:
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing; the run's reference log-probs are needed to continue")
    with np.load(path) as z:
        ref = {s: {k: z[f"{s}/{k}"] for k in ("ref_chosen", "ref_rejected")} for s in SPLITS}
    for s in SPLITS:
        if len(ref[s]["ref_chosen"]) != len(data.splits[s]):
            raise UserError(f"--resume: {path} holds {len(ref[s]['ref_chosen'])} {s} pairs, the data has "
                            f"{len(data.splits[s])}; the data set changed since the run started")
    return ref


def sample_responses(model_cfg: ModelConfig, params, records: list[dict], max_new_tokens: int, key,
                     tokenizer=None) -> list[str]:
    """Greedy responses to `records`' prompts, in one batch; `params` are plain (merged);
    `tokenizer` defaults to the model's."""
    from jaxgpt.data.conversations import record_prompt
    from jaxgpt.generation.responses import greedy_responses
    from jaxgpt.text.tokenizer import tokenizer_of

    tokenizer = tokenizer or tokenizer_of(model_cfg)
    prompts = [tokenizer.encode(record_prompt(r, tokenizer)) for r in records]
    return greedy_responses(params, model_cfg, prompts, key, max_new_tokens=max_new_tokens,
                            batch_size=max(len(prompts), 1), tokenizer=tokenizer)


def response_records(data: PreferenceData, n: int) -> list[dict]:
    """The first `n` val and `n` test records (what responses.json shows)."""
    return [{"split": s, **r} for s in ("val", "test") for r in data.splits[s].records[:n]]


class DPO(SplitTask):
    name = "dpo"
    config_class = DPOConfig
    split_metrics = {"correct": "reward_accuracy", "margin": "reward_margin", "chosen_reward": "chosen_reward",
                     "rejected_reward": "rejected_reward"}
    batch_keys = BATCH_KEYS
    examples = "pairs"
    plots = (*PAIR_PLOTS, Plot("margin.png", "step", ("train_reward_margin", "val_reward_margin"),
                               "reward margin (chosen - rejected)"))

    @staticmethod
    def validate_config(cfg) -> None:
        Reward.validate_config(cfg)  # the same preference data section
        validate_dpo(cfg)

    def load_data(self) -> None:
        self.data = load_preference(self.cfg.data, self.cfg.model.context_length, tfds_data_dir=self.tfds_data_dir,
                                    tokenizer=self.tokenizer)
        self.shown = response_records(self.data, self.cfg.dpo.num_responses)

    def describe(self) -> str:
        return f"{super().describe()} | beta {self.cfg.dpo.beta}"

    def plain(self, params):
        """Params the plain sampler runs: LoRA adapters merged."""
        params = jax.device_get(params)
        return merge_lora(params, self.cfg.lora) if self.cfg.finetune.train_mode == "lora" else params

    def prepare(self, params, meta: dict) -> None:
        """The reference: the frozen initial model, run once over every pair (or, on
        --resume, its stored log-probs); and the greedy responses before training."""
        mode, path = self.cfg.finetune.train_mode, self.run.path / REFERENCE_FILE
        if self.run.resume:
            self.ref = _load_reference(path, self.data)
        else:  # the plain model on the base leaves
            self.ref = precompute_reference(self.dp, build_model(self.cfg.model), reference_params(params, mode), self.data,
                                            self.batch_size)
            if is_main_process():
                self.responses_before = self.sample(params)
        for split in SPLITS:
            self.data.splits[split].columns.update(self.ref[split])

    def sample(self, params) -> list[str]:
        d = self.cfg.dpo
        return sample_responses(self.cfg.model, self.plain(params), self.shown, d.max_new_tokens, self.keys.sample,
                                self.tokenizer)

    def created(self) -> None:
        if is_main_process() and not self.run.resume:
            _save_reference(self.run.path / REFERENCE_FILE, self.ref)
            atomic_write(self.run.path / RESPONSES_FILE, json.dumps(
                [{**r, "response_before": b} for r, b in zip(self.shown, self.responses_before)], indent=1))

    def loss_fn(self, model):
        return dpo_loss_fn(model, self.cfg.dpo.beta, self.cfg.dpo.label_smoothing)

    def throughput(self):
        return self.throughput_of(2 * self.data.max_length)

    def evaluate_before(self, placed) -> dict:
        return {**self.evaluate_split(placed, "train", self.cfg.train.eval_batches),
                **self.evaluate_split(placed, "val")}

    def summary(self, loop, before: dict, final: dict) -> dict:
        d = self.cfg.dpo
        self.responses_after = self.sample(loop.placed.host()["params"])
        return {"beta": d.beta, "label_smoothing": d.label_smoothing, **super().summary(loop, before, final),
                "val_reward_margin_after": final.get("val_reward_margin"),
                "train_reward_margin_after": final.get("train_reward_margin"),
                "pairs_per_sec": loop.tokens_per_sec() / (2 * self.data.max_length),
                "truncated_responses": self.data.truncated, "max_length": self.data.max_length}

    def write_outputs(self, loop, summary: dict) -> None:
        path = self.run.path / RESPONSES_FILE
        shown = json.loads(path.read_text()) if path.is_file() else self.shown
        atomic_write(path, json.dumps([{**r, "response_after": a} for r, a in zip(shown, self.responses_after)],
                                      indent=1) + "\n")


RECIPE = DPO


# The Python entry point: finetune_dpo(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
finetune_dpo = functools.partial(train, DPO)


__all__ = ["DPOConfig", "DPOSection", "finetune_dpo", "precompute_reference", "reference_params", "sample_responses",
           "validate_dpo"]
