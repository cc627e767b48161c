"""`finetune.py instruct`: instruction fine-tuning, Alpaca format (Raschka ch. 7), and chat SFT.

The model keeps its LM head and learns to continue `format_prompt(instruction, input)` (or its
chat template's prompt) with the reference response and its eos (`jaxgpt.data.instruct`: prompt
tokens masked from the loss by default, length-bucketed batches); records that are conversations
(`messages`) train on every assistant turn (`jaxgpt.data.conversations`). Training is the shared
`train_step` through the shared engine (AdamW, full / last-block / LoRA label trees, pmapped
data parallelism, checkpoints, `--resume`); the val loss is measured before the first update
(`val_loss_before`) and at the end of every epoch. At the end the test records are answered
greedily (KV cache, batched, `jaxgpt.generation.decode.generate_tokens`, stopping at
`<|endoftext|>`) and scored against the references (`jaxgpt.text.scoring`: exact match, ROUGE-L
F1).

Run directory: config.yaml, metrics.jsonl (a step-0 record with `val_loss_before`'s value,
then the train loop's records), metrics.json, loss.png, responses.json (the test records
plus `model_response`, `exact_match`, `rougeL_f1`; a conversation's record is the `messages`
before the answer scored, and that answer as `output`), checkpoints/. metrics.json: `train_loss`
(running loss of the last updates), `val_loss_before`, `val_loss`, `test_loss` (token means
over the scored tokens, dropout off), `test_exact_match`, `test_rougeL_f1`,
`padding_fraction` (share of padded positions in an epoch's batches; `..._unbucketed`: the
same with random batches each padded to its longest row), `tokens_per_sec` (real, non-padding
tokens per second of training steps, each batch shape's first, compiling step excluded),
parameter counts and timings.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from jaxgpt.config import at_least
from jaxgpt.data.instruct import InstructData, InstructDataConfig, load_instruct, validate_data
from jaxgpt.engine import Plot
from jaxgpt.engine.driver import train
from jaxgpt.engine.loop import Throughput
from jaxgpt.errors import UserError
from jaxgpt.models.lora import has_lora, merge_lora
from jaxgpt.generation.responses import greedy_responses
from jaxgpt.train.steps import lm_loss_fn
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import SplitTask, TaskConfig
from jaxgpt.io.files import atomic_write

DEFAULT_CONFIG = default_config("instruct")
RESPONSES_FILE = "responses.json"


@dataclass(frozen=True)
class GenerateConfig:
    """`generate` section: answering the test records after training (greedy)."""

    max_new_tokens: int = 64  # per response; fewer where the prompt leaves less room in the context
    batch_size: int = 16  # prompts decoded together (sorted by length, left-padded)


@dataclass(frozen=True)
class InstructConfig(TaskConfig):
    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def validate_generate(cfg: GenerateConfig) -> None:
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError(f"generate.max_new_tokens and generate.batch_size must be >= 1, "
                        f"got {cfg.max_new_tokens}, {cfg.batch_size}")


def instruct_data(data: InstructDataConfig, context_length: int, batch_size: int, *,
                  tfds_data_dir: str | None = None, tokenizer=None) -> InstructData:
    """`load_instruct`, given the SFT splits of `data.task` when one is set: `jaxgpt.data` sits
    below the RL package and does not import it, so the task layer fetches them."""
    task_splits = None
    if data.task:
        from jaxgpt.rl.tasks import sft_splits  # only when asked, as validate_config does

        task_splits = sft_splits(data.task, data.seed)
    return load_instruct(data, context_length, batch_size, task_splits=task_splits, tfds_data_dir=tfds_data_dir,
                         tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------
# Generation


def answer_and_score(params, cfg: InstructConfig, data: InstructData, key) -> tuple[list[dict], dict]:
    """`(responses.json rows, {"test_exact_match", "test_rougeL_f1"})` for the test split."""
    from jaxgpt.text.scoring import score_responses

    test = data.splits["test"]
    if not len(test):
        return [], {"test_exact_match": None, "test_rougeL_f1": None}
    answers = greedy_responses(params, cfg.model, test.prompts, key,
                                 max_new_tokens=cfg.generate.max_new_tokens, batch_size=cfg.generate.batch_size)
    scores = score_responses(answers, [r["output"] for r in test.records])
    asked = [{"messages": r["messages"]} if "messages" in r else {"instruction": r["instruction"],
                                                                    "input": r.get("input", "")} for r in test.records]
    rows = [{**q, "output": r["output"], "model_response": a, **s}
            for q, r, a, s in zip(asked, test.records, answers, scores["per_record"])]
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


class Instruct(SplitTask):
    name = "instruct"
    config_class = InstructConfig
    loop_splits = ("val",)
    before_splits = ("val",)
    final_splits = ("val", "test")
    examples = "records"
    plots = (Plot("loss.png", "step", ("train_loss", "val_loss"), "loss"),)
    jit_init = True

    @staticmethod
    def validate_config(cfg) -> None:
        validate_data(cfg.data, cfg.model.context_length)
        at_least(cfg.data, "data", 0, "seed")
        if cfg.data.task:
            from jaxgpt.rl.tasks import get_task

            get_task(cfg.data.task)
        validate_generate(cfg.generate)

    def load_data(self) -> None:
        self.data = instruct_data(self.cfg.data, self.cfg.model.context_length, self.batch_size,
                                  tfds_data_dir=self.tfds_data_dir, tokenizer=self.tokenizer)
        self.padding = self.data.padding_stats(self.batch_size)

    def describe(self) -> str:
        p = self.padding
        return (f"{super().describe()} | padding {p['padding_fraction']:.1%} "
                f"(unbucketed {p['padding_fraction_unbucketed']:.1%})")

    def loss_fn(self, model):
        return lm_loss_fn(model)  # batch: inputs, targets, mask [B, L]

    def throughput(self):
        return Throughput(tokens_per_iteration=round(self.padding["mean_batch_tokens"]))

    def summary(self, loop, before: dict, final: dict) -> dict:
        started = time.perf_counter()
        params = loop.placed.host()["params"]
        if has_lora(params):
            params = merge_lora(params, self.cfg.lora)
        self.responses, scores = answer_and_score(params, self.cfg, self.data, self.keys.sample)
        return {**super().summary(loop, before, final), **scores,
                "padding_fraction": self.padding["padding_fraction"],
                "padding_fraction_unbucketed": self.padding["padding_fraction_unbucketed"],
                "tokens_per_sec": real_tokens_per_sec(loop.iteration_times, loop.start, self.data, self.batch_size),
                "generate_seconds": time.perf_counter() - started,
                "max_length": self.data.max_length, "mask_prompt": self.data.mask_prompt}

    def write_outputs(self, loop, summary: dict) -> None:
        atomic_write(self.run.path / RESPONSES_FILE, json.dumps(self.responses, indent=1, ensure_ascii=False) + "\n")


RECIPE = Instruct


# The Python entry point: finetune_instruct(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
finetune_instruct = functools.partial(train, Instruct)


def load_instruct_run(run_dir: str | Path) -> tuple[InstructConfig, Any]:
    """`(cfg, plain params)` of an instruct run (LoRA adapters merged)."""
    return common.load_run(run_dir, InstructConfig)
