"""What a task is to the engine: a `Recipe` subclass (one module per task in `jaxgpt.tasks`).

The driver (`jaxgpt.engine.driver.train`) owns the sequence every task shares; a recipe
fills in only what differs, through these hooks (defaults in brackets):

    set-up, before anything is written
      validate_config(cfg)       the task's own config sections (static: no devices, no data)  [none]
      validate()                 checks that need the devices or other inputs      [none]
      load_data()                self.data                                         (required)
      schedule() -> Schedule     iterations, eval interval, updates per iteration  (required)
      model_attrs() -> dict      GPT attributes beyond lora (num_classes, value_head)  [{}]
      prepare(params, meta)      frozen things from the initial params (references)    [none]
      describe() -> str          the data part of the run's first line              [""]
    the run
      created()                  files written once the run directory exists          [none]
      loss_fn(model)             `(params, batch, key) -> (loss_sum, sums)` for the train step
      source(iteration, local_params) -> (minibatches, stats)   the updates of an iteration
      evaluate(placed) -> dict   at eval points                                    [{}]
      evaluate_before(placed)    before the first update (kept in checkpoints)      [None]
      final(loop) -> dict        the evaluation of the final params    [the loop's last one]
    results
      summary(loop, before, final) -> dict   metrics.json (after the driver's common keys)
      write_outputs(loop, summary)             responses.json, eval_samples.jsonl, ...  [none]

Class attributes: `name` (run-directory prefix), `config_class`, `plots`, `metric_names`
(step metrics kept in records: supervised `{"loss": "train_loss"}`, RL None = all), `rl`,
`log_before` (the before-evaluation is also the step-0 record), `reference_on_resume`
(RL: `--init` is the frozen reference, loaded again on --resume), `postfix` (progress bar),
`jit_init` (one jitted initialisation instead of op-by-op).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from jaxgpt.engine.keys import Keys
from jaxgpt.engine.loop import Loop, Throughput
from jaxgpt.engine.rundir import RunDir


@dataclass(frozen=True)
class Schedule:
    iterations: int  # of the loop
    eval_interval: int  # iterations
    updates_per_iteration: int = 1  # the lr schedule spans iterations x this
    steps_per_epoch: int = 0  # 0: not counted in epochs

    @property
    def updates(self) -> int:
        return self.iterations * self.updates_per_iteration


@dataclass(frozen=True)
class Plot:
    """`file`: `ys` against `x` from metrics.jsonl."""

    file: str
    x: str
    ys: tuple[str, ...]
    ylabel: str


class Recipe:
    """One run of one task; see the module docstring for the hooks."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    plots: ClassVar[tuple[Plot, ...]] = ()
    metric_names: ClassVar[dict[str, str] | None] = {"loss": "train_loss"}
    rl: ClassVar[bool] = False
    log_before: ClassVar[bool] = False
    reference_on_resume: ClassVar[bool] = False
    postfix: ClassVar[dict[str, str]] = {"loss": "train_loss"}
    # Initialise the params in one jitted call (fast on a CPU) rather than op by op. XLA's
    # fused normal draws differ from the op-by-op ones by ~1e-8, so a recipe keeps the way
    # its published figures were measured (README): only instruct's were jitted.
    jit_init: ClassVar[bool] = False

    def __init__(self, cfg, *, dp, run: RunDir, keys: Keys, tfds_data_dir: str | None = None):
        from jaxgpt.text.tokenizer import tokenizer_of

        self.cfg, self.dp, self.run, self.keys, self.tfds_data_dir = cfg, dp, run, keys, tfds_data_dir
        self.tokenizer = tokenizer_of(cfg.model)  # the model's (`model.tokenizer`): data, sampling, scoring
        self.data: Any = None
        self.p_eval: Callable | None = None  # the task loss's compiled eval step (set by the driver)
        self.trainable = self.total = 0  # parameter counts (set by the driver)

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def validate_config(cfg) -> None:
        pass

    def validate(self) -> None:
        pass

    def load_data(self) -> None:
        raise NotImplementedError

    def schedule(self) -> Schedule:
        raise NotImplementedError

    def model_attrs(self) -> dict:
        return {}

    def prepare(self, params, meta: dict) -> None:
        pass

    def describe(self) -> str:
        return ""

    # -- the run --------------------------------------------------------------------------
    def created(self) -> None:
        pass

    def loss_fn(self, model):
        raise NotImplementedError

    def source(self, iteration: int, local_params: Callable[[], Any]) -> tuple[Sequence[dict], dict]:
        raise NotImplementedError

    def throughput(self) -> Throughput | None:
        return None

    def evaluate(self, placed) -> dict:
        return {}

    def evaluate_before(self, placed) -> dict | None:
        return None

    def final(self, loop: Loop) -> dict:
        return loop.final_eval(self.evaluate)

    # -- results --------------------------------------------------------------------------
    def summary(self, loop: Loop, before: dict, final: dict) -> dict:
        return {}

    def write_outputs(self, loop: Loop, summary: dict) -> None:
        pass

    def done_line(self, summary: dict) -> str:
        return ""
