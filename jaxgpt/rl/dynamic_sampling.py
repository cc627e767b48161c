"""Dynamic sampling (DAPO sec. 3.2): keep only groups whose completions' rewards differ.

A group of G completions whose rewards are all equal (all right, all wrong; under process
supervision, the same per-line rewards) gets zero advantage everywhere: it adds no gradient
but still counts in the loss's denominator, diluting the rest. Dynamic sampling drops such
groups and refills the batch with groups of new prompts, rolled out in further tries of
the same shape (`prompts_per_step` prompts, one compilation), up to `max_tries` rollouts an
iteration; if the batch is still short, the first dropped groups fill it (they add no
policy gradient, as in plain GRPO), and the metrics say how many.

Everything is a function of (seed, iteration, try): the refill prompts come from a seeded
permutation of the RL split (the iteration's own prompts left out) and the rollout key of try
t > 0 is `fold_in(rollout key of the iteration, t)`, so `--resume` repeats an iteration exactly.
"""
from __future__ import annotations

import numpy as np


def informative_groups(rewards, group_size: int) -> np.ndarray:
    """`[groups]` bool: True where some completion's reward differs from the others'.
    rewards: `[rows]` or `[rows, S]` (per-step rewards), rows = groups x G, groups adjacent."""
    r = np.asarray(rewards)
    r = r.reshape(-1, group_size, *r.shape[1:])
    return np.any(r != r[:, :1], axis=tuple(range(1, r.ndim)))


def refill_prompts(n: int, batch: int, *, seed: int, iteration: int, attempt: int, exclude) -> np.ndarray:
    """`[batch]` prompt indices among `n` for refill try `attempt` (>= 1) of `iteration`:
    a permutation seeded by (seed, iteration, attempt), the prompts of `exclude` last (used
    only when fewer than `batch` others exist)."""
    order = np.random.default_rng([seed, iteration, attempt, 0x5EED]).permutation(n)
    seen = np.isin(order, np.asarray(exclude, dtype=order.dtype))
    return np.concatenate([order[~seen], order[seen]])[:batch]


def choose_groups(informative: list[np.ndarray], needed: int) -> tuple[list[tuple[int, int]], int]:
    """`(chosen, filled)`: the first `needed` informative groups over the tries so far, as
    (try, group) pairs in sampling order, topped up with the first uninformative ones when
    there are too few; `filled` counts those. informative: one `[groups]` bool array a try."""
    good = [(t, j) for t, flags in enumerate(informative) for j in np.flatnonzero(flags)]
    bad = [(t, j) for t, flags in enumerate(informative) for j in np.flatnonzero(~flags)]
    chosen = good[:needed]
    filled = needed - len(chosen)
    return sorted(chosen + bad[:filled]), filled


def gather_groups(parts: list[dict], chosen: list[tuple[int, int]], group_size: int) -> dict:
    """The rows of the `chosen` (try, group) pairs from each try's dict of `[rows, ...]`
    arrays (or lists), concatenated in `chosen` order."""
    out = {}
    for key in parts[0]:
        pieces = []
        for t, j in chosen:
            value = parts[t][key]
            rows = slice(j * group_size, (j + 1) * group_size)
            pieces.append(value[rows])
        out[key] = (np.concatenate(pieces) if not isinstance(parts[0][key], list)
                    else [x for piece in pieces for x in piece])
    return out


__all__ = ["choose_groups", "gather_groups", "informative_groups", "refill_prompts"]
