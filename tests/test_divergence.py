"""No run is lost to a NaN: the one loop never saves non-finite state, the last good
checkpoint stays the latest, and the run stops with one line naming the step (exit 2).

The loop is the same for every task, so its rule is checked on every combination of log,
eval and checkpoint intervals with a stub state that goes NaN at a known step; then the
wiring end to end in pretraining, a fine-tuning task and GRPO."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.io import checkpoint
from jaxgpt.engine.keys import Keys
from jaxgpt.engine.loop import Cadence, Loop
from jaxgpt.errors import UserError
from jaxgpt.engine.metrics import MetricsWriter, read_jsonl
from jaxgpt.engine.rundir import RunDir

NAN_AT = 7  # the first update whose loss (and whose resulting params) are NaN


class StubState:
    """A `PlacedState` whose update `NAN_AT` returns a NaN loss and leaves NaN params."""

    def __init__(self):
        self.updates = 0

    def update(self, batch, key):
        self.updates += 1
        return {"loss": jnp.float32(math.nan if self.updates >= NAN_AT else 1.0 / self.updates)}

    @property
    def step(self):
        return self.updates

    def local_params(self):
        return self.host()["params"]

    def host(self):
        w = np.full(3, np.nan if self.updates >= NAN_AT else float(self.updates), np.float32)
        return {"step": np.int32(self.updates), "params": {"w": w}, "opt_state": {}}


def _due_saves(total, log, eval_, ckpt):
    return [s for s in range(1, total + 1) if s % eval_ == 0 or s == total or (ckpt and s % ckpt == 0)]


@pytest.mark.parametrize("log, eval_, ckpt, rl", list(itertools.product((1, 4, 10), (3, 100), (0, 2, 5), (False, True))))
def test_no_non_finite_checkpoint_for_any_cadence(tmp_path, log, eval_, ckpt, rl):
    run = RunDir(tmp_path / "run", resume=False)
    run.path.mkdir()
    loop = Loop(run=run, placed=StubState(), keys=Keys.from_seed(0), writer=MetricsWriter(run.metrics_jsonl),
                cadence=Cadence(total=12, log_interval=log, eval_interval=eval_, checkpoint_interval=ckpt),
                keep_checkpoints=1, rl=rl)
    unit = "iteration" if rl else "step"
    with pytest.raises(UserError, match=f"training diverged: .* at {unit} {NAN_AT}") as e:
        loop.run(lambda it, params: ([{}], {}), lambda placed: {})
    assert "\n" not in str(e.value)
    good = [s for s in _due_saves(12, log, eval_, ckpt) if s < NAN_AT]
    steps = checkpoint.all_steps(run.path) if (run.path / "checkpoints").is_dir() else []
    assert (max(steps) if steps else None) == (good[-1] if good else None)  # the last good one, never rotated out
    records = read_jsonl(run.metrics_jsonl)
    assert all(r[unit] < NAN_AT for r in records)  # nothing logged from the diverged state


def _assert_stopped_at_the_good_checkpoint(run, capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged") and ("step 2" in err[-1] or "iteration 2" in err[-1]), err[-1]
    assert checkpoint.latest_step(run) == 1
    from jaxgpt.io.hub import resolve_init

    _, params = resolve_init(str(run))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(params))


# lr ramps from 0 (update 1 leaves the params as they were: a good checkpoint) to 1e30,
# which blows the params up at update 2: its save must be refused.
BLOW_UP = ["train.lr=1e30", "train.warmup_steps=8", "train.checkpoint_interval=1", "train.log_interval=10",
           "train.grad_clip=0"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def test_pretraining_stops_at_its_last_good_checkpoint(tmp_path, capsys):
    import train

    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32", "data.stride=16",
            "train.batch_size=4", "train.max_steps=6", "train.eval_interval=50", "train.sample_tokens=0",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert train.main(["--out", str(tmp_path / "run"), *_sets(tiny + BLOW_UP)]) == 2
    _assert_stopped_at_the_good_checkpoint(tmp_path / "run", capsys)


def test_classify_stops_at_its_last_good_checkpoint(tmp_path, capsys):
    import finetune

    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i}\n" for i in range(40)))
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32", "train.batch_size=4",
            "train.epochs=0", "train.max_steps=6", "train.eval_interval=50", f"data.path={data}"]
    assert finetune.main(["classify", "--out", str(tmp_path / "run"), *_sets(tiny + BLOW_UP)]) == 2
    _assert_stopped_at_the_good_checkpoint(tmp_path / "run", capsys)


def test_grpo_stops_at_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import finetune
    from jaxgpt.rl.tasks import ArithmeticTask

    # A random model never solves a problem (no advantage, no update): reward lengths instead.
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, c, p: float(len(c) % 2))
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=64",
            "rollout.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=12", "rollout.eval_batch_size=8",
            "data.eval_size=8", "train.max_steps=6", "train.eval_interval=50", "grpo.supervision=outcome",
            "finetune.train_mode=full", "train.num_devices=1"]
    assert finetune.main(["grpo", "--out", str(tmp_path / "run"), *_sets(tiny + BLOW_UP)]) == 2
    _assert_stopped_at_the_good_checkpoint(tmp_path / "run", capsys)
