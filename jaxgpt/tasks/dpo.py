"""`finetune.py dpo`: direct preference optimisation (Rafailov et al. 2023; Raschka ch. 7).

The policy starts from `--init` (an instruction-tuned run, e.g. runs/sft) and the *reference*
is that same initial model, frozen. For every pair the policy's and the reference's summed
response log-probs (`jaxgpt.losses.sequence_logprobs`, prompt and padding masked) give
`dpo_loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`
(`jaxgpt.preference.dpo_loss`; `dpo.label_smoothing` > 0 gives conservative DPO).

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

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.data.preference import SPLITS, PreferenceData, PreferenceDataConfig, load_preference
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig, is_lora_leaf
from jaxgpt.losses import sequence_logprobs
from jaxgpt.preference import dpo_loss, implicit_rewards, preference_sums
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

DEFAULT_CONFIG = default_config("dpo")
REFERENCE_FILE = "reference_logprobs.npz"
RESPONSES_FILE = "responses.json"
LM_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every dense layer of an LM (its head is tied to wte)
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
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(targets=LM_LORA_TARGETS))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dpo: DPOSection = field(default_factory=DPOSection)


CONFIG_CLASS = DPOConfig


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


def response_logprobs(model, params, batch, dropout_key=None):
    """`(logp_chosen [b], logp_rejected [b])`: summed log-probs of each response given its
    prompt (`jaxgpt.losses.sequence_logprobs`).

    batch: `chosen`, `rejected` `[b, t]` int32, `chosen_mask`, `rejected_mask` `[b, t]` (1 on
    response tokens), optional `positions [b, w]` int32 (consecutive, starting at or before
    the last prompt token and covering the responses; `jaxgpt.data.preference`). With
    positions the LM head runs on those `w` positions only, and tokens and masks are read
    there: the same sum (the masked-out prompt logits were never needed) at a fraction of
    the head's `[2b, t, vocab]` cost. One forward pass over the `[2b, t]` concatenation."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    positions = batch.get("positions")
    if positions is not None:
        positions = jnp.concatenate([positions, positions])
    logits = model.apply({"params": params}, tokens, deterministic=dropout_key is None, head_positions=positions,
                         rngs=None if dropout_key is None else {"dropout": dropout_key})
    if positions is not None:
        tokens = jnp.take_along_axis(tokens, positions, axis=1)
        mask = jnp.take_along_axis(mask, positions, axis=1)
    return jnp.split(sequence_logprobs(logits, tokens, mask), 2)


def reference_params(params, train_mode: str):
    """The frozen reference model's params, given the policy's initial params.

    lora: the policy tree without its `lora_a`/`lora_b` leaves; every other leaf is the same
    object (the base weights the policy freezes), so no second copy exists. Other modes: the
    initial params themselves (training updates a device copy, `DataParallel.replicate`)."""
    if train_mode != "lora":
        return params

    def strip(node, path=()):
        if not hasattr(node, "items"):
            return node
        return {k: strip(v, path + (k,)) for k, v in node.items() if not is_lora_leaf(path + (k,))}

    return strip(params)


def reference_fn(ref_model):
    """`fn(ref_params, batch, *, axis_name=None) -> {"ref_chosen", "ref_rejected"}` (`[b]`
    each, dropout off): per-pair values, not sums, so no cross-device reduction."""

    def fn(ref_params, batch, axis_name=None):
        ref_c, ref_r = response_logprobs(ref_model, ref_params, batch)
        return {"ref_chosen": ref_c, "ref_rejected": ref_r}

    return fn


def dpo_loss_fn(model, beta: float, label_smoothing: float = 0.0):
    """`loss_fn(params, batch, dropout_key) -> (loss_sum, sums)` for `steps.train_step`.

    batch: as `response_logprobs`, plus `ref_chosen`, `ref_rejected` `[b]` (the reference's
    log-probs, precomputed) and optional `weight [b]`. Sums: `count`, `correct` (reward
    accuracy), `margin`, `chosen_reward`, `rejected_reward` (implicit rewards)."""

    def loss_fn(params, batch, dropout_key):
        pi_c, pi_r = response_logprobs(model, params, batch, dropout_key)
        ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)
        rewards_c, rewards_r = implicit_rewards(pi_c, ref_c, beta), implicit_rewards(pi_r, ref_r, beta)
        return preference_sums(loss, rewards_c, rewards_r, batch.get("weight"))

    return loss_fn


def precompute_reference(dp, ref_model, ref_params, data: PreferenceData, batch_size: int) -> dict[str, dict]:
    """`{split: {"ref_chosen": [n], "ref_rejected": [n]}}` float32: one pass of the frozen
    reference over every pair (jitted, or pmapped over `dp`'s devices)."""
    from jaxgpt.trainer import is_main_process
    from tqdm.auto import tqdm

    p_ref = dp.compile_eval_step(reference_fn(ref_model))
    ref_params = dp.replicate(ref_params) if dp.num_devices > 1 else ref_params
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
    np.savez(path, **{f"{split}/{k}": v for split, cols in ref.items() for k, v in cols.items()})


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


def _named(out: dict, split: str) -> dict:
    if not out:
        return {}
    loss_key = "train_eval_loss" if split == "train" else f"{split}_loss"
    return {loss_key: out["loss"], f"{split}_reward_accuracy": out["correct"], f"{split}_reward_margin": out["margin"],
            f"{split}_chosen_reward": out["chosen_reward"], f"{split}_rejected_reward": out["rejected_reward"]}


# ---------------------------------------------------------------------------------------
# Greedy responses before / after


def sample_responses(model_cfg: ModelConfig, params, records: list[dict], max_new_tokens: int, key) -> list[str]:
    """Greedy responses (`sampling.generate_tokens`, stopping at <|endoftext|>) to `records`'
    prompts; `params` are plain (merged) LM params."""
    from jaxgpt.prompts import format_prompt
    from jaxgpt.sampling import generate_tokens, pad_prompts
    from jaxgpt.tokenizer import EOT_ID, decode, encode

    if not records:
        return []
    prompts = [encode(format_prompt(r["instruction"], r["input"])) for r in records]
    max_new = min(max_new_tokens, model_cfg.context_length - max(len(p) for p in prompts))
    if max_new < 1:
        return [""] * len(records)
    tokens, mask = pad_prompts(prompts, max_new_tokens=max_new, context_length=model_cfg.context_length,
                               pad_id=EOT_ID)
    out = generate_tokens(params, model_cfg, tokens, mask, key, max_new_tokens=max_new, temperature=0.0,
                          eos_id=EOT_ID)
    toks, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    return [decode([t for t in row[:n] if t != EOT_ID]).strip() for row, n in zip(toks, lengths)]


def response_records(data: PreferenceData, n: int) -> list[dict]:
    """The first `n` val and `n` test records (what responses.json shows)."""
    return [{"split": s, **r} for s in ("val", "test") for r in data.splits[s].records[:n]]


# ---------------------------------------------------------------------------------------
# The run


def finetune_dpo(cfg: DPOConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                 stop_after: int | None = None, tfds_data_dir: str | None = None) -> dict:
    """DPO-train `cfg` into `out_dir` and return the summary written to metrics.json.

    stop_after: end after this many total steps as if interrupted (resume continues)."""
    from jaxgpt.lora import merge_lora
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.model import GPT, init_params
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.steps import eval_step
    from jaxgpt.trainer import Keys, RunDir, TrainLoop, default_out_dir, evaluate_batches, is_main_process, log

    started = time.perf_counter()
    validate_dpo(cfg)
    run = RunDir(out_dir or default_out_dir("dpo"), resume=resume)
    loaded = None
    if not resume:
        cfg, loaded = common.resolve_init(cfg)
    t, mode, d = cfg.train, cfg.finetune.train_mode, cfg.dpo
    data = load_preference(cfg.data, cfg.model.context_length, tfds_data_dir=tfds_data_dir)
    dp = DataParallel(resolve_num_devices(t.num_devices))
    dp.check_batch_size(t.batch_size, t.grad_accum_steps)
    per_epoch = data.steps_per_epoch(t.batch_size)
    if per_epoch == 0:
        raise UserError(f"train.batch_size={t.batch_size} is larger than the training split "
                        f"({len(data.splits['train'])} pairs); lower train.batch_size")
    attrs = {"lora": common.lora_for(cfg)}
    common.check_lora_targets(cfg, attrs)

    keys = Keys.from_seed(t.seed)
    model = GPT(cfg.model, **attrs)
    params = init_params(cfg.model, keys.init, **attrs)
    params, state, tx, labels, trainable, total, total_steps, eval_interval = common.start_training(
        cfg, params, loaded, per_epoch, run, resume)
    if resume:
        ref = _load_reference(run.path / REFERENCE_FILE, data)
    log(f"model: {total:,} params, {trainable:,} trainable ({mode}) | data: {data.describe()} | "
        f"{total_steps} steps ({per_epoch}/epoch) | beta {d.beta} | devices: {dp.num_devices}")
    if not resume:  # the frozen initial model, once: the plain model on the base leaves
        ref = precompute_reference(dp, GPT(cfg.model), reference_params(params, mode), data, t.batch_size)
    for split in SPLITS:
        data.splits[split].columns.update(ref[split])
    run.create(cfg)
    if is_main_process() and not resume:
        _save_reference(run.path / REFERENCE_FILE, ref)

    plain = lambda p: merge_lora(jax.device_get(p), cfg.lora) if mode == "lora" else jax.device_get(p)
    shown = response_records(data, d.num_responses)
    responses_path = run.path / RESPONSES_FILE
    if not resume and is_main_process():
        before = sample_responses(cfg.model, plain(params), shown, d.max_new_tokens, keys.sample)
        responses_path.write_text(json.dumps([{**r, "response_before": b} for r, b in zip(shown, before)], indent=1))

    loss_fn = dpo_loss_fn(model, d.beta, d.label_smoothing)
    loop = TrainLoop(cfg=common.loop_config(cfg, eval_interval), run=run, dp=dp, state=state, tx=tx,
                     labels=labels, loss_fn=loss_fn, keys=keys, tokens_per_step=t.batch_size * 2 * data.max_length)
    del state, params, loaded  # the loop holds its own device copy; drop the rest (large models)
    p_eval = dp.compile_eval_step(eval_step, loss_fn=loss_fn)
    select = lambda batch: {k: batch[k] for k in BATCH_KEYS if k in batch}

    def evaluate_split(params, split: str, max_batches: int = 0) -> dict:
        if not len(data.splits[split]):
            return {}
        batches = (select(b) for b in data.eval_batches(split, t.batch_size, max_batches))
        return _named(evaluate_batches(dp, p_eval, params, batches), split)

    def evaluate(params) -> dict:
        epoch = loop.step / per_epoch
        out = {"epoch": round(epoch, 4), **evaluate_split(params, "train", t.eval_batches),
               **evaluate_split(params, "val", t.eval_batches)}
        num = lambda k: f"{out.get(k, float('nan')):.3f}"
        log(f"epoch {epoch:.2f} (step {loop.step}): reward margin train {num('train_reward_margin')} "
            f"val {num('val_reward_margin')} | reward accuracy val {num('val_reward_accuracy')} | "
            f"val loss {num('val_loss')}")
        return out

    if resume:
        before = next((r for r in read_jsonl(run.metrics_jsonl) if r.get("step") == 0), {})
    else:
        before = {"step": 0, "epoch": 0.0, **evaluate_split(loop.state.params, "train", t.eval_batches),
                  **evaluate_split(loop.state.params, "val")}
        loop.writer.write(before)
    train_started = time.perf_counter()
    result = loop.run_steps(total_steps, lambda step: select(data.train_batch(step, t.batch_size)), evaluate,
                            lr_at=lr_schedule(t, total_steps), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started

    final: dict[str, Any] = {}
    for split in SPLITS:
        final.update(evaluate_split(loop.state.params, split))
    after = sample_responses(cfg.model, plain(dp.unreplicate(loop.state.params)), shown, d.max_new_tokens, keys.sample)
    summary = {
        "step": loop.step, "epoch": round(loop.step / per_epoch, 4), "train_mode": mode, "init": cfg.finetune.init,
        "beta": d.beta, "label_smoothing": d.label_smoothing, "trainable_params": trainable, "total_params": total,
        "train_loss": result["train_loss"],
        **{f"{k}_before": before.get(k) for k in ("val_loss", "val_reward_margin", "val_reward_accuracy",
                                                  "train_eval_loss", "train_reward_margin", "train_reward_accuracy")},
        "val_reward_margin_after": final.get("val_reward_margin"),
        "train_reward_margin_after": final.get("train_reward_margin"),
        **final,
        "pairs_per_sec": loop.tokens_per_sec() / (2 * data.max_length),
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
        "num_examples": {s: len(data.splits[s]) for s in SPLITS},
        "truncated_responses": data.truncated, "max_length": data.max_length,
    }
    if is_main_process():
        shown_before = json.loads(responses_path.read_text()) if responses_path.is_file() else shown
        responses_path.write_text(json.dumps([{**r, "response_after": a} for r, a in zip(shown_before, after)],
                                             indent=1) + "\n")
        write_json(run.path / "metrics.json", summary)
        records = read_jsonl(run.metrics_jsonl)
        plot_curves(run.path / "loss.png", records, "step", ["train_loss", "train_eval_loss", "val_loss"], "loss")
        plot_curves(run.path / "margin.png", records, "step", ["train_reward_margin", "val_reward_margin"],
                    "reward margin (chosen - rejected)")
        num = lambda k: "n/a" if summary.get(k) is None else f"{summary[k]:.3f}"
        log(f"done: step {summary['step']} | val reward margin {num('val_reward_margin_before')} -> "
            f"{num('val_reward_margin_after')} | val reward accuracy {num('val_reward_accuracy')} | "
            f"{summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No dpo-only flags: everything is a config key (`--set dpo.beta=0.5`)."""


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg, out, resume = common.load_task_config(args, DPOConfig, DEFAULT_CONFIG, parser)
    finetune_dpo(cfg, out, resume=resume)
    return 0


__all__ = ["DPOConfig", "DPOSection", "dpo_loss_fn", "finetune_dpo", "precompute_reference", "reference_fn",
           "reference_params", "response_logprobs", "sample_responses", "validate_dpo"]
