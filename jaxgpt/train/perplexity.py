"""A model's next-token loss and perplexity on a corpus, outside training: what
`python -m jaxgpt perplexity` prints, and the number a pretraining run logs as `val_loss`.

    splits = load_splits(DataConfig(path="the-verdict", val_ratio=0.1), 256, tokenizer=tokenizer_of(config))
    corpus_loss(config, params, splits.val)   # {"loss", "perplexity", "tokens", "windows"}
    corpus_loss(config, params, splits.val, byte_lengths=token_byte_lengths(tokenizer))  # + "bytes", "bits_per_byte"

Every window is scored once, in order, with dropout off; the loss is the mean over the
scored target tokens (the final partial batch padded and masked), so it does not depend on
the batch size or the number of devices. With windows `T` long every `S < T` tokens (a
sliding window), each window after the first scores only its last `S` targets, the ones no
earlier window scored: every target once, each with at least `T - S` tokens of context (the
"perplexity of fixed-length models" evaluation). With `S >= T` every target of every window
counts. The batches run through the same compiled eval step as training's evaluation
(`jaxgpt.train.steps.eval_step` with `lm_loss_fn`: the LM head fused into the
cross-entropy), jitted on one device or pmapped over all local ones.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxgpt.data import eval_batches, num_eval_batches
from jaxgpt.errors import UserError
from jaxgpt.models import build_model
from jaxgpt.parallel import DataParallel, resolve_num_devices
from jaxgpt.train.steps import eval_step, lm_loss_fn


def first_windows(windows, n: int):
    """The first `n` windows of `windows` (all of them if there are fewer), as `Windows` over
    only the tokens they read: a quick estimate on a large corpus."""
    if n >= len(windows):
        return windows
    t, s = windows.context_length, windows.stride
    return type(windows)(windows.tokens[: (n - 1) * s + t + 1], t, s)


def scored_batches(windows, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`jaxgpt.data.eval_batches` (`inputs`, `targets`, `mask` `[batch_size, T]`), with the
    targets an earlier window already scored masked out (a sliding window: stride < T)."""
    t, s = windows.context_length, windows.stride
    for n, batch in enumerate(eval_batches(windows, batch_size)):
        if s < t:
            window = n * batch_size + np.arange(batch_size)[:, None]  # each row's window index
            batch["mask"] = batch["mask"] * ((np.arange(t) >= t - s) | (window == 0))
        yield batch


def corpus_loss(config, params: Any, windows, *, batch_size: int = 8, layout=None, progress: str = "",
                byte_lengths: np.ndarray | None = None) -> dict:
    """`{"loss", "perplexity", "tokens", "windows"}` of the model `config` with `params` over
    `windows` (`jaxgpt.data.Windows`): the mean cross-entropy in nats per scored target token
    (see the module docstring) and its exp. `layout`: a `jaxgpt.parallel` layout (default:
    pmap over every local device); `batch_size` windows a step, a multiple of its devices.
    `progress`: a progress bar's label ("" = none). With `byte_lengths` (`[vocab]`, from
    `jaxgpt.text.token_bytes.token_byte_lengths`) also `"bytes"`, the text the scored targets
    stand for, and `"bits_per_byte"`, the loss summed and put per byte in bits."""
    layout = layout or DataParallel(resolve_num_devices(0))
    if batch_size < 1 or batch_size % layout.num_devices:
        raise UserError(f"the batch size ({batch_size}) must be a positive multiple of the "
                        f"{layout.num_devices} device(s)")
    if not len(windows):
        raise UserError(f"no window of {windows.context_length + 1} tokens to score; use a shorter context or a "
                        "longer corpus")
    p_eval = layout.compile_eval_step(eval_step, loss_fn=lm_loss_fn(build_model(config)))
    placed = layout.put_frozen(params)
    scored_bytes = [0]

    def counting_bytes(batches):
        for batch in batches:
            scored_bytes[0] += int((byte_lengths[batch["targets"]] * (batch["mask"] > 0)).sum())
            yield batch

    batches = scored_batches(windows, batch_size)
    if byte_lengths is not None:
        batches = counting_bytes(batches)
    if progress:
        batches = tqdm(batches, total=num_eval_batches(windows, batch_size), desc=progress, leave=False,
                       disable=jax.process_index() != 0)
    loss = layout.evaluate(p_eval, placed, batches)["loss"]
    if not math.isfinite(loss):
        raise UserError(f"the loss is {loss}: the model's log-probabilities are not finite; check the weights")
    perplexity = math.exp(loss) if loss < 700 else math.inf  # past float64's range
    t, n = windows.context_length, len(windows)
    scored = t + (n - 1) * min(windows.stride, t)  # all of the first window's targets, then the new ones
    out = {"loss": loss, "perplexity": perplexity, "tokens": scored, "windows": n}
    if byte_lengths is not None and scored_bytes[0]:
        out.update(bytes=scored_bytes[0], bits_per_byte=loss * scored / (math.log(2) * scored_bytes[0]))
    return out
