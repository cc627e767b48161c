"""`finetune.py instruct`: instruction fine-tuning, Alpaca format (Raschka ch. 7).

The model keeps its LM head and learns to continue `format_prompt(instruction, input)` with
the reference response and `<|endoftext|>` (`jaxgpt.data.instruct`: prompt tokens masked
from the loss by default, length-bucketed batches). Training is the shared `train_step`
through `TrainLoop` (AdamW, full / last-block / LoRA label trees, pmapped data parallelism,
checkpoints, `--resume`); the val loss is measured before the first update
(`val_loss_before`) and at the end of every epoch. At the end the test records are answered
greedily (KV cache, batched, `jaxgpt.sampling.generate_tokens`, stopping at `<|endoftext|>`)
and scored against the references (`jaxgpt.scoring`: exact match, ROUGE-L F1).

Run directory: config.yaml, metrics.jsonl (a step-0 record with `val_loss_before`'s value,
then the train loop's records), metrics.json, loss.png, responses.json (the test records
plus `model_response`, `exact_match`, `rougeL_f1`), checkpoints/. metrics.json: `train_loss`
(running loss of the last updates), `val_loss_before`, `val_loss`, `test_loss` (token means
over the scored tokens, dropout off), `test_exact_match`, `test_rougeL_f1`,
`padding_fraction` (share of padded positions in an epoch's batches; `..._unbucketed`: the
same with random batches each padded to its longest row), `tokens_per_sec` (real, non-padding
tokens per second of training steps, each batch shape's first, compiling step excluded),
parameter counts and timings.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.data.instruct import InstructData, InstructDataConfig, load_instruct
from jaxgpt.errors import UserError
from jaxgpt.lora import LoRAConfig
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import FinetuneConfig, FinetuneTrainConfig

DEFAULT_CONFIG = default_config("instruct")
RESPONSES_FILE = "responses.json"
LM_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every dense layer of the transformer (the LM head is tied)


@dataclass(frozen=True)
class GenerateConfig:
    """`generate` section: answering the test records after training (greedy)."""

    max_new_tokens: int = 64  # per response; fewer where the prompt leaves less room in the context
    batch_size: int = 16  # prompts decoded together (sorted by length, left-padded)


@dataclass(frozen=True)
class LMLoRAConfig(LoRAConfig):
    """`lora` section of a language-model task: the default targets are the transformer's
    dense layers (there is no `score` head)."""

    targets: tuple[str, ...] = LM_LORA_TARGETS


@dataclass(frozen=True)
class InstructConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    lora: LMLoRAConfig = field(default_factory=LMLoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


CONFIG_CLASS = InstructConfig


def validate_generate(cfg: GenerateConfig) -> None:
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError(f"generate.max_new_tokens and generate.batch_size must be >= 1, "
                        f"got {cfg.max_new_tokens}, {cfg.batch_size}")


# ---------------------------------------------------------------------------------------
# Generation


def generate_responses(params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], key, *,
                       max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy responses to token-id prompts, in order. Prompts are sorted by length and
    decoded `batch_size` at a time (left-padded, KV cache, stopping at `<|endoftext|>`); a
    batch gets `min(max_new_tokens, context - its longest prompt)` new tokens. `params` are
    plain (LoRA merged). The last batch is filled with copies so every batch has one shape."""
    from jaxgpt.sampling import generate_tokens, pad_prompts
    from jaxgpt.tokenizer import EOT_ID, N_VOCAB, decode

    out: list[str] = [""] * len(prompts)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [list(prompts[i]) for i in idx]
        new = min(max_new_tokens, model_cfg.context_length - max(len(r) for r in rows))
        if new < 1:
            raise UserError(f"a test prompt of {max(len(r) for r in rows)} tokens leaves no room to answer "
                            f"in the context of {model_cfg.context_length}")
        rows += [rows[0]] * (batch_size - len(rows))
        tokens, mask = pad_prompts(rows, max_new_tokens=new, context_length=model_cfg.context_length,
                                   pad_id=EOT_ID)
        res = generate_tokens(params, model_cfg, tokens, mask, key, max_new_tokens=new, temperature=0.0,
                              eos_id=EOT_ID, vocab_limit=N_VOCAB if model_cfg.vocab_size > N_VOCAB else None)
        toks, lengths = np.asarray(res["tokens"]), np.asarray(res["lengths"])
        for row, i in enumerate(idx):
            ids = toks[row, :lengths[row]].tolist()
            if ids and ids[-1] == EOT_ID:
                ids = ids[:-1]
            out[i] = decode(ids).strip()
    return out


def answer_and_score(params, cfg: InstructConfig, data: InstructData, key) -> tuple[list[dict], dict]:
    """`(responses.json rows, {"test_exact_match", "test_rougeL_f1"})` for the test split."""
    from jaxgpt.scoring import score_responses

    test = data.splits["test"]
    if not len(test):
        return [], {"test_exact_match": None, "test_rougeL_f1": None}
    answers = generate_responses(params, cfg.model, test.prompts, key,
                                 max_new_tokens=cfg.generate.max_new_tokens, batch_size=cfg.generate.batch_size)
    scores = score_responses(answers, [r["output"] for r in test.records])
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"],
             "model_response": a, **s} for r, a, s in zip(test.records, answers, scores["per_record"])]
    return rows, {"test_exact_match": scores["exact_match"], "test_rougeL_f1": scores["rougeL_f1"]}


# ---------------------------------------------------------------------------------------
# Training


def real_tokens_per_sec(step_times: Sequence[float], first_step: int, data: InstructData, batch_size: int) -> float:
    """Non-padding tokens per second over the steps timed, leaving out the first step of each
    batch shape (it includes that shape's compilation)."""
    seen, tokens, seconds = set(), 0, 0.0
    for k, dt in enumerate(step_times):
        idx = data.train_indices(first_step + k, batch_size)
        shape = data.batch_length(idx)
        if shape in seen:
            tokens += data.real_tokens(first_step + k, batch_size)
            seconds += dt
        seen.add(shape)
    return tokens / seconds if seconds else float("nan")


def _val_loss_before(records: list[dict]) -> float | None:
    return next((r.get("val_loss") for r in records if r.get("step") == 0), None)


def finetune_instruct(cfg: InstructConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                      stop_after: int | None = None, tfds_data_dir: str | None = None) -> dict:
    """Fine-tune `cfg` into `out_dir`; returns the summary written to `metrics.json`.

    stop_after: end after this many total steps as if interrupted (resume continues)."""
    import jax

    from jaxgpt.lora import has_lora, merge_lora
    from jaxgpt.metrics import plot_curves, read_jsonl, write_json
    from jaxgpt.model import GPT, init_params
    from jaxgpt.optim import lr_schedule
    from jaxgpt.parallel import DataParallel, resolve_num_devices
    from jaxgpt.steps import eval_step, lm_loss_fn
    from jaxgpt.trainer import Keys, RunDir, TrainLoop, default_out_dir, evaluate_batches, is_main_process, log

    started = time.perf_counter()
    validate_generate(cfg.generate)
    run = RunDir(out_dir or default_out_dir("instruct"), resume=resume)
    loaded = None
    if not resume:
        cfg, loaded = common.resolve_init(cfg)
    t, mode = cfg.train, cfg.finetune.train_mode
    dp = DataParallel(resolve_num_devices(t.num_devices))
    dp.check_batch_size(t.batch_size, t.grad_accum_steps)
    data = load_instruct(cfg.data, cfg.model.context_length, t.batch_size, tfds_data_dir=tfds_data_dir)
    attrs = {"lora": common.lora_for(cfg)}
    common.check_lora_targets(cfg, attrs)

    keys = Keys.from_seed(t.seed)
    model = GPT(cfg.model, **attrs)
    # jitted: op-by-op initialisation of every leaf is seconds on a CPU; the values are the same
    params = jax.jit(lambda key: init_params(cfg.model, key, seq_len=data.max_length, **attrs))(keys.init)
    per_epoch = data.steps_per_epoch(t.batch_size)
    params, state, tx, labels, trainable, total, total_steps, eval_interval = common.start_training(
        cfg, params, loaded, per_epoch, run, resume)
    run.create(cfg)

    loss_fn = lm_loss_fn(model)  # batch: inputs, targets, mask [B, L]
    padding = data.padding_stats(t.batch_size)
    loop = TrainLoop(cfg=common.loop_config(cfg, eval_interval), run=run, dp=dp, state=state, tx=tx,
                     labels=labels, loss_fn=loss_fn, keys=keys, tokens_per_step=round(padding["mean_batch_tokens"]))
    p_eval = dp.compile_eval_step(eval_step, loss_fn=loss_fn)

    def evaluate_split(params, split: str, max_batches: int = 0) -> float | None:
        if not len(data.splits[split]):
            return None
        out = evaluate_batches(dp, p_eval, params, data.eval_batches(split, t.batch_size, max_batches))
        return out.get("loss")

    def evaluate(params) -> dict:
        epoch = loop.step / per_epoch
        val = evaluate_split(params, "val", t.eval_batches)
        log(f"epoch {epoch:.2f} (step {loop.step}): val loss {val:.4f}")
        return {"epoch": round(epoch, 4), "val_loss": val}

    log(f"model: {total:,} params, {trainable:,} trainable ({mode}) | data: {data.describe()} | "
        f"{total_steps} steps ({per_epoch}/epoch) | padding {padding['padding_fraction']:.1%} "
        f"(unbucketed {padding['padding_fraction_unbucketed']:.1%}) | devices: {dp.num_devices}")
    before = _val_loss_before(read_jsonl(run.metrics_jsonl)) if resume else None
    if before is None:
        before = evaluate_split(loop.state.params, "val")
        loop.writer.write({"step": 0, "epoch": 0.0, "tokens_seen": 0, "val_loss": before})
        log(f"before training: val loss {before:.4f}")
    first_step = loop.step
    train_started = time.perf_counter()
    result = loop.run_steps(total_steps, lambda step: data.train_batch(step, t.batch_size), evaluate,
                            lr_at=lr_schedule(t, total_steps), stop_after=stop_after)
    train_seconds = time.perf_counter() - train_started
    final = {f"{s}_loss": evaluate_split(loop.state.params, s) for s in ("val", "test")}

    gen_started = time.perf_counter()
    params = loop.host_state()["params"]
    if has_lora(params):
        params = merge_lora(params, cfg.lora)
    responses, scores = answer_and_score(params, cfg, data, keys.sample)
    summary = {
        "step": loop.step,
        "epoch": round(loop.step / per_epoch, 4),
        "train_mode": mode,
        "init": cfg.finetune.init,
        "trainable_params": trainable,
        "total_params": total,
        "train_loss": result["train_loss"],
        "val_loss_before": before,
        **final,
        **scores,
        "padding_fraction": padding["padding_fraction"],
        "padding_fraction_unbucketed": padding["padding_fraction_unbucketed"],
        "tokens_per_sec": real_tokens_per_sec(loop.step_times, first_step, data, t.batch_size),
        "train_seconds": train_seconds,
        "generate_seconds": time.perf_counter() - gen_started,
        "wall_seconds": time.perf_counter() - started,
        "num_examples": {s: len(data.splits[s]) for s in ("train", "val", "test")},
        "max_length": data.max_length,
        "mask_prompt": data.mask_prompt,
    }
    if is_main_process():
        (run.path / RESPONSES_FILE).write_text(json.dumps(responses, indent=1, ensure_ascii=False) + "\n")
        write_json(run.path / "metrics.json", summary)
        plot_curves(run.path / "loss.png", read_jsonl(run.metrics_jsonl), "step", ["train_loss", "val_loss"], "loss")
        fmt = lambda k: "n/a" if summary.get(k) is None or not math.isfinite(summary[k]) else f"{summary[k]:.4f}"  # noqa: E731
        log(f"done: step {summary['step']} | val loss {fmt('val_loss_before')} -> {fmt('val_loss')} | "
            f"test loss {fmt('test_loss')} | test ROUGE-L {fmt('test_rougeL_f1')} exact {fmt('test_exact_match')} | "
            f"{summary['tokens_per_sec']:.0f} tokens/s | {summary['wall_seconds'] / 60:.1f} min | run: {run.path}")
    return summary


# ---------------------------------------------------------------------------------------
# Command line (`finetune.py instruct`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest is not "task": finetune.py's subcommand is stored there
    parser.add_argument("--task", dest="sft_task", metavar="NAME",
                        help="SFT on a verifiable task's SFT split (e.g. arithmetic) instead of --data "
                             "(sets data.task)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    task = getattr(args, "sft_task", None)
    if task:
        if args.resume:
            parser.error("--resume takes its config, data, weights, train mode and directory from the run; "
                         "use only --set with it")
        if args.data:
            raise UserError("--task and --data are alternatives: give one of them")
        args.overrides = list(args.overrides) + [f"data.task={json.dumps(task)}"]
    cfg, out, resume = common.load_task_config(args, InstructConfig, DEFAULT_CONFIG, parser)
    finetune_instruct(cfg, out, resume=resume)
    return 0


def load_instruct_run(run_dir: str | Path) -> tuple[InstructConfig, Any]:
    """`(cfg, plain params)` of an instruct run (LoRA adapters merged)."""
    return common.load_run(run_dir, InstructConfig)
