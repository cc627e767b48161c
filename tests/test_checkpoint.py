import jax
import numpy as np
import pytest

from jaxgpt import checkpoint
from jaxgpt.config import Config, TrainConfig, save_config
from jaxgpt.errors import UserError
from jaxgpt.model import init_params
from jaxgpt.optim import make_optimizer
from jaxgpt.steps import create_train_state


def _state(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    s = create_train_state(params, make_optimizer(TrainConfig()))
    return {"step": s.step, "params": s.params, "opt_state": s.opt_state}


def test_roundtrip_and_latest(tmp_path, tiny_model_cfg):
    state = jax.device_get(_state(tiny_model_cfg))
    manager = checkpoint.checkpoint_manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoint.save(manager, step, state, {"step": step, "rng_key_data": [0, step]})
    assert checkpoint.latest_step(tmp_path) == 3
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["2", "3"]  # keep_checkpoints=2
    target = _state(tiny_model_cfg, seed=1)
    restored, meta = checkpoint.restore(tmp_path, target)
    assert meta == {"step": 3, "rng_key_data": [0, 3]}
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored["params"], state["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored["opt_state"], state["opt_state"])


def test_unfinished_write_is_never_the_latest(tmp_path, tiny_model_cfg):
    """Orbax writes into a temporary directory and renames it when complete; a save killed
    mid-write leaves only the temporary directory, which must not count as a checkpoint."""
    state = jax.device_get(_state(tiny_model_cfg))
    manager = checkpoint.checkpoint_manager(tmp_path)
    checkpoint.save(manager, 5, state, {"step": 5})
    # Simulate an interrupted save of step 9: copy step 5's files under Orbax's tmp name.
    import shutil

    shutil.copytree(tmp_path / "checkpoints" / "5", tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-123")
    assert checkpoint.latest_step(tmp_path) == 5
    restored, meta = checkpoint.restore(tmp_path, _state(tiny_model_cfg))
    assert meta["step"] == 5


def test_missing_and_mismatched(tmp_path, tiny_model_cfg):
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.restore(tmp_path, _state(tiny_model_cfg))
    with pytest.raises(UserError, match="not a jaxgpt run directory"):
        checkpoint.load_params(tmp_path)
    import dataclasses

    manager = checkpoint.checkpoint_manager(tmp_path)
    checkpoint.save(manager, 1, jax.device_get(_state(tiny_model_cfg)), {"step": 1})
    bigger = dataclasses.replace(tiny_model_cfg, n_embd=64)
    with pytest.raises(UserError, match="does not match"):
        checkpoint.restore(tmp_path, _state(bigger))


def test_load_params_reads_config_and_latest(tmp_path, tiny_model_cfg):
    cfg = Config(model=tiny_model_cfg)
    save_config(cfg, tmp_path / "config.yaml")
    state = jax.device_get(_state(tiny_model_cfg))
    checkpoint.save(checkpoint.checkpoint_manager(tmp_path), 4, state, {"step": 4})
    loaded_cfg, params = checkpoint.load_params(tmp_path)
    assert loaded_cfg.model == tiny_model_cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, state["params"])
