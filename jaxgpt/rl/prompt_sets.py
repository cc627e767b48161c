"""RL prompt sets, encoded once and left-padded to one length per split (one compilation
for every rollout): a verifiable task's problems (GRPO: `rl` and `eval` splits) or
instruction prompts (PPO: `train` and held-out `eval`), in the Alpaca format
(`jaxgpt.text.prompts.prompt_format`: the chat template, else Alpaca, as `finetune.py instruct`
trains on)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxgpt.data.conversations import as_messages, record_prompt
from jaxgpt.data.records import read_records
from jaxgpt.errors import UserError
from jaxgpt.text.prompts import prompt_format
from jaxgpt.rl.rollout import encode_prompts, pad_prompt_batch
from jaxgpt.rl.tasks import get_task
from jaxgpt.engine.rundir import log
from jaxgpt.text.tokenizer import Tokenizer, gpt2_tokenizer, newline_counts


def prompt_arrays(prompts: Sequence[Sequence[int]], *, max_prompt_tokens: int, max_new_tokens: int,
                  context_length: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens [n, P], mask [n, P], kept)`: the prompts left-padded to one length P (one
    compilation for every rollout), and the indices of the prompts kept.

    max_prompt_tokens > 0 drops longer prompts and sets P; 0 keeps all, P = the longest."""
    lengths = np.array([len(p) for p in prompts])
    kept = np.flatnonzero(lengths <= max_prompt_tokens) if max_prompt_tokens > 0 else np.arange(len(prompts))
    if len(kept) == 0:
        raise UserError(f"every {what} prompt is longer than data.max_prompt_tokens={max_prompt_tokens} "
                        f"(shortest: {lengths.min()} tokens); raise it")
    p = max_prompt_tokens if max_prompt_tokens > 0 else int(lengths.max())
    if p + max_new_tokens > context_length:
        raise UserError(f"{what} prompts of up to {p} tokens plus rollout.max_new_tokens={max_new_tokens} exceed "
                        f"the model's context of {context_length}; set data.max_prompt_tokens "
                        f"<= {context_length - max_new_tokens} or lower rollout.max_new_tokens")
    tokens, mask = pad_prompt_batch([prompts[i] for i in kept], max_new_tokens=max_new_tokens,
                                    context_length=context_length, length=p)
    return tokens, mask, kept


@dataclass
class TaskData:
    """Problems and their padded prompts: `rl` (training) and `eval` (held out)."""

    task: object
    problems: dict
    tokens: dict
    masks: dict
    dropped: dict


def split_prompts(task, split: str, *, seed: int, size: int, max_prompt_tokens: int, max_new_tokens: int,
                  context_length: int, name: str, tokenizer: Tokenizer | None = None) -> tuple[list, np.ndarray, np.ndarray, int]:
    """`(problems, tokens [n, P], mask [n, P], dropped)`: the first `size` (0 = all) problems
    of a task split as prompts in the model's format (`prompt_format(tokenizer)`: its chat
    template, else Alpaca), left-padded (`prompt_arrays`), the too-long dropped."""
    tokenizer = tokenizer or gpt2_tokenizer()
    probs = task.split(split, seed)
    if size:
        probs = probs[:size]
    if not probs:
        raise UserError(f"task {name}: the {split} split is empty; give more data")
    fmt = prompt_format(tokenizer)
    ids = encode_prompts([fmt.prompt(p.question) for p in probs], tokenizer)
    tokens, mask, kept = prompt_arrays(ids, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                       context_length=context_length, what=f"{name} {split}")
    return [probs[i] for i in kept], tokens, mask, len(probs) - len(kept)


def load_task_data(cfg, tokenizer: Tokenizer | None = None) -> TaskData:
    """A GRPO config's task problems, `rl` and `eval` splits, as padded prompts (`tokenizer`:
    the model's; default GPT-2's)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    d = cfg.data
    task = get_task(d.task, d.path)
    problems, tokens, masks, dropped = {}, {}, {}, {}
    for split in ("rl", "eval"):
        problems[split], tokens[split], masks[split], dropped[split] = split_prompts(
            task, split, seed=d.seed, size=d.eval_size if split == "eval" else 0,
            max_prompt_tokens=d.max_prompt_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
            context_length=cfg.model.context_length, name=d.task, tokenizer=tokenizer)
    warn_if_solutions_cut(problems["rl"], cfg.rollout.max_new_tokens, tokenizer)
    return TaskData(task, problems, tokens, masks, dropped)


def warn_if_solutions_cut(problems, max_new_tokens: int, tokenizer: Tokenizer | None = None) -> None:
    """A completion cut at `max_new_tokens` has no final answer and scores 0, so a budget
    shorter than the task's worked solutions silently zeroes every reward: say so."""
    tokenizer = tokenizer or gpt2_tokenizer()
    needed = np.array([len(ids) + 1 for ids in tokenizer.encode_batch([p.solution for p in problems])])  # + eos
    cut = float(np.mean(needed > max_new_tokens))
    if cut > 0:
        log(f"warning: {cut:.0%} of the RL split's reference solutions need more than rollout.max_new_tokens="
            f"{max_new_tokens} tokens (longest {needed.max()}, with <|endoftext|>); completions cut there have no "
            "final answer and score 0: raise rollout.max_new_tokens")


def token_newlines(tokenizer: Tokenizer | None = None):
    """`[vocab]` int32: how many newlines each token decodes to (process supervision splits
    completions into solution lines by these)."""
    return newline_counts(tokenizer or gpt2_tokenizer())


def load_prompts(cfg, tokenizer: Tokenizer | None = None) -> dict:
    """`{"train"|"eval": (tokens [n, P], mask [n, P], dropped)}` from a PPO config's
    instruction records, and `eval_text` (each eval prompt as "instruction [input]"). A record
    whose instruction field is a list of messages is a conversation the model continues, in
    its chat template (eval_text: the last user message)."""
    d, tokenizer = cfg.data, tokenizer or gpt2_tokenizer()
    prompt = {"instruction": d.instruction_field}
    rows = read_records(d.path, prompt, {"input": d.input_field}, instead=prompt)
    for i, row in enumerate(rows):
        if isinstance(row["instruction"], list):  # a conversation to continue (TRL's conversational prompts)
            row["messages"] = as_messages(row["instruction"], f"{d.path} record {i + 1}", answered=False)
            row["where"] = f"{d.path} record {i + 1}"
            row["instruction"] = next((m["content"] for m in row["messages"][::-1] if m["role"] == "user"), "")
    if len(rows) <= d.eval_size:
        raise UserError(f"{d.path} has {len(rows)} records, not more than data.eval_size={d.eval_size}")
    order = np.random.default_rng(d.seed).permutation(len(rows))
    out = {}
    for split, index in (("eval", order[: d.eval_size]), ("train", order[d.eval_size:])):
        ids = encode_prompts([record_prompt(rows[i], tokenizer) for i in index], tokenizer)
        tokens, mask, kept = prompt_arrays(ids, max_prompt_tokens=d.max_prompt_tokens,
                                           max_new_tokens=cfg.rollout.max_new_tokens,
                                           context_length=cfg.model.context_length, what=f"{d.path} {split}")
        out[split] = (tokens, mask, len(index) - len(kept))
        if split == "eval":  # "instruction [input]" of each kept prompt, for eval_samples.jsonl
            kept_rows = [rows[index[i]] for i in kept]
            out["eval_text"] = [r["instruction"] + (f" [{r['input']}]" if r["input"] else "") for r in kept_rows]
    return out


__all__ = ["TaskData", "load_prompts", "load_task_data", "prompt_arrays", "split_prompts", "token_newlines", "warn_if_solutions_cut"]
