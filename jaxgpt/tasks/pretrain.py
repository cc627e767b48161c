"""`train.py`: next-token pretraining on a corpus, as a recipe on the shared engine.

Data is `jaxgpt.data.pretraining_data` (cached token file, windows of `data.context_length`
every `data.stride` tokens, the last `data.val_ratio` of the stream for validation); batch
s is a pure function of (data.seed, s), and in a multi-process run each process reads only
its rows of the global batch. Evaluation: the val loss over `train.eval_batches` batches
(0 = all) every `train.eval_interval` steps and at the end, with a greedy sample of
`train.sample_prompt`; with `train.eval_train_batches` N > 0 also `train_eval_loss`, the
train loss in eval mode (dropout off) over the first N train batches, as the book reports
it. metrics.json: step, tokens_seen, train_loss (the running mean of the updates' losses
over the last logged window, dropout on), val_loss, [train_eval_loss], tokens_per_sec
(median step after the first), mfu, params, sample.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax

from jaxgpt.config import Config
from jaxgpt.engine import Plot, Recipe, Schedule, log
from jaxgpt.engine.driver import train
from jaxgpt.engine.loop import Throughput
from jaxgpt.engine.metrics import mfu
from jaxgpt.train.steps import lm_loss_fn

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "default.yaml"


class Pretrain(Recipe):
    name = "train"
    config_class = Config
    plots = (Plot("loss.png", "tokens_seen", ("train_loss", "val_loss"), "loss"),)
    postfix = {"loss": "train_loss", "tok_s": "tokens_per_sec"}

    def validate(self) -> None:
        t = self.cfg.train
        self.dp.check_batch_size(t.batch_size // jax.process_count(), t.grad_accum_steps)

    def load_data(self) -> None:
        from jaxgpt.data import pretraining_data  # imported here: tfds is slow to import

        self.data = pretraining_data(self.cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                                     tfds_data_dir=self.tfds_data_dir, tokenizer=self.tokenizer)

    def schedule(self) -> Schedule:
        return Schedule(self.cfg.train.max_steps, self.cfg.train.eval_interval)

    def describe(self) -> str:
        return f"data: {self.data.describe()}"

    def loss_fn(self, model):
        return lm_loss_fn(model)

    def source(self, iteration, local_params):
        return [self.data.train_batch(iteration)], {}

    def throughput(self) -> Throughput:
        seq = self.data.context_length
        return Throughput(self.cfg.train.batch_size * seq, self.cfg.model, seq, self.dp.device_count)

    def evaluate(self, placed) -> dict:
        t = self.cfg.train
        out = self.dp.evaluate(self.p_eval, placed.params, self.data.val_batches(t.eval_batches))
        result = {"val_loss": out["loss"]} if out else {}
        if t.eval_train_batches:  # the train loss as the book reports it: eval mode, fixed batches
            train_out = self.dp.evaluate(self.p_eval, placed.params, self.data.train_eval_batches(t.eval_train_batches))
            result["train_eval_loss"] = train_out["loss"]
        if t.sample_tokens:  # every process: params of a multi-process mesh are gathered for it
            sample = sample_text(self.cfg.model, placed.local_params(), t.sample_prompt, t.sample_tokens)
            log(f"step {placed.step} sample: {sample!r}")
        return result

    def summary(self, loop, before: dict, final: dict) -> dict:
        m, t, tp = self.cfg.model, self.cfg.train, loop.throughput
        tps = loop.tokens_per_sec()
        return {"tokens_seen": loop.iteration * tp.tokens_per_iteration,
                "train_loss": loop.last_record.get("train_loss"), "val_loss": final.get("val_loss"),
                **({"train_eval_loss": final["train_eval_loss"]} if "train_eval_loss" in final else {}),
                "tokens_per_sec": tps, "mfu": mfu(tps, m, tp.seq_len, tp.num_devices), "params": self.total,
                "sample": sample_text(m, loop.placed.local_params(), t.sample_prompt, t.sample_tokens)
                if t.sample_tokens else ""}

    def done_line(self, s: dict) -> str:
        num = lambda v, fmt: "n/a" if v is None or v != v else format(v, fmt)  # None/NaN: not measured
        return (f"train loss {num(s['train_loss'], '.3f')} | val loss {num(s['val_loss'], '.3f')} | "
                f"{num(s['tokens_per_sec'], '.0f')} tokens/s")

    def write_outputs(self, loop, summary: dict) -> None:
        if summary["sample"]:
            log(f"sample: {summary['sample']!r}")


# The Python entry point: pretrain(cfg, out_dir=None, *, resume=False, init=None, stop_after=None) -> summary
pretrain = functools.partial(train, Pretrain)


def sample_text(model_cfg, params: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (shortened to fit the context), for progress samples."""
    from jaxgpt.generation.decode import generate
    from jaxgpt.text.tokenizer import tokenizer_of

    ids = tokenizer_of(model_cfg).encode(prompt)[-max(model_cfg.context_length - max_new_tokens, 1):]
    max_new = min(max_new_tokens, model_cfg.context_length - len(ids))
    if max_new <= 0:
        return ""
    return prompt + generate(params, model_cfg, [ids], max_new_tokens=max_new, temperature=0.0)[0]
