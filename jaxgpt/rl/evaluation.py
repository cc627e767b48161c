"""Evaluating a policy on a verifiable task: greedy accuracy, unbiased pass@k, format rate,
mean completion length. Shared by `python -m jaxgpt evaluate` and GRPO's before/after
evaluation, so both report the same numbers the same way.

    greedy   one completion per problem at temperature 0: `accuracy` (the task's verifier),
             `format_rate` (a final answer could be read), `completion_len` (tokens, the end
             token included), `step_accuracy` for tasks with process rewards.
    sampled  K completions per problem at `temperature`: `pass_at_k[k]` for k = 1..K with the
             unbiased estimator of Chen et al. 2021 (`pass_at_k`), averaged over problems, and
             the samples' `sample_accuracy` (= pass@1), `sample_format_rate`,
             `sample_completion_len`.

Prompts are the task's padded prompt arrays (`jaxgpt.rl.prompt_sets`: the Alpaca format
the SFT model was trained on), run in chunks of one shape (one compilation per call shape).
"""
from __future__ import annotations

import jax
import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right: 1 - C(n - c, k) / C(n, k),
    computed as a running product (Chen et al. 2021, fig. 3) to stay exact for large n."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def sample_completions(params, model_cfg, tokens: np.ndarray, mask: np.ndarray, key, *, samples: int,
                       batch: int, max_new_tokens: int, tokenizer, temperature: float = 0.0,
                       top_p: float | None = None) -> tuple[list[str], np.ndarray]:
    """`(texts, lengths)`: `samples` completions of every prompt (prompt i's at rows
    i*samples .. i*samples + samples - 1), in calls of `max(1, batch // samples)` prompts
    (the last padded with copies of its first prompt, so every call has one shape); ended
    at and decoded with the model's `tokenizer`."""
    from jaxgpt.rl.common import generate_all, token_kwargs
    from jaxgpt.rl.rollout import completion_texts

    outs = generate_all(params, model_cfg, tokens, mask, key, batch=max(1, min(batch // samples, len(tokens))),
                        group_size=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        **token_kwargs(tokenizer, model_cfg))
    texts = [t for out in outs for t in completion_texts(out, tokenizer.stop_ids, tokenizer)]
    return texts, np.concatenate([out["lengths"] for out in outs])


def greedy_metrics(task, problems, texts: list[str], lengths) -> dict:
    """accuracy, format_rate, completion_len (+ step_accuracy) of one completion a problem."""
    out = {"accuracy": float(np.mean([task.reward(t, p) for t, p in zip(texts, problems)])),
           "format_rate": float(np.mean([task.extract(t) is not None for t in texts])),
           "completion_len": float(np.mean(lengths))}
    if hasattr(task, "step_rewards"):  # which worked line goes wrong: [line 1, line 2, ..., answer]
        steps = np.array([task.step_rewards(t, p) for t, p in zip(texts, problems)], np.float64)
        out["step_accuracy"] = [round(float(v), 4) for v in steps.mean(0)]
    return out


def sampled_metrics(task, problems, texts: list[str], lengths, samples: int) -> dict:
    """pass_at_k {k: value} for k = 1..samples, and the samples' accuracy, format rate and
    mean length; texts: `samples` completions a problem, a problem's adjacent."""
    right = np.array([task.reward(t, problems[i // samples]) for i, t in enumerate(texts)]).reshape(-1, samples)
    correct = (right > 0.5).sum(1)
    return {"pass_at_k": {str(k): float(np.mean([pass_at_k(samples, int(c), k) for c in correct]))
                          for k in range(1, samples + 1)},
            "sample_accuracy": float(right.mean()),
            "sample_format_rate": float(np.mean([task.extract(t) is not None for t in texts])),
            "sample_completion_len": float(np.mean(lengths))}


def evaluate_policy(params, model_cfg, task, problems, tokens, mask, key, *, samples: int, temperature: float,
                    batch: int, max_new_tokens: int, tokenizer, top_p: float | None = None,
                    greedy: bool = True) -> tuple[dict, list[str]]:
    """`(metrics, greedy texts)`: greedy metrics (when `greedy`) and, with samples > 0, the
    sampled ones (see the module docstring). params: plain GPT params (LoRA merged)."""
    metrics, greedy_texts = {}, []
    if greedy:
        greedy_texts, lengths = sample_completions(params, model_cfg, tokens, mask, key, samples=1, batch=batch,
                                                   max_new_tokens=max_new_tokens, tokenizer=tokenizer)
        metrics.update(greedy_metrics(task, problems, greedy_texts, lengths))
    if samples > 0:
        texts, lengths = sample_completions(params, model_cfg, tokens, mask, jax.random.fold_in(key, 1),
                                            samples=samples, batch=batch, max_new_tokens=max_new_tokens,
                                            tokenizer=tokenizer, temperature=temperature, top_p=top_p)
        metrics.update(sampled_metrics(task, problems, texts, lengths, samples))
    return metrics, greedy_texts


__all__ = ["evaluate_policy", "greedy_metrics", "pass_at_k", "sample_completions", "sampled_metrics"]
