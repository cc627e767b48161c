"""The training engine under every task: one driver, one loop, recipes on top.

    entry points (train.py, finetune.py)
        -> jaxgpt.tasks.<task>: a Recipe (config, data, model attributes, loss, batches, evals)
        -> driver.train(recipe_cls, cfg, ...): run directory, --init, state, before/after evals
        -> loop.Loop: iterations of minibatches; logs, evals, checkpoints, Ctrl-C / SIGTERM, NaN checks
        -> jaxgpt.parallel (placement, compiled steps) -> jaxgpt.train.steps (pure train/eval steps)
        -> jaxgpt.models (the family lookup) / train.losses / train.optim

See ARCHITECTURE.md for the picture and how to add a task.
"""
from jaxgpt.engine.keys import Keys
from jaxgpt.engine.recipe import Plot, Recipe, Schedule
from jaxgpt.engine.rundir import RunDir, default_out_dir, is_main_process, log

__all__ = ["Keys", "Plot", "Recipe", "RunDir", "Schedule", "default_out_dir", "is_main_process", "log"]
