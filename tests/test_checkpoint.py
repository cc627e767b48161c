import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.io import checkpoint
from jaxgpt.config import Config, TrainConfig, save_config
from jaxgpt.errors import UserError
from jaxgpt.models import init_params
from jaxgpt.train.optim import make_optimizer
from jaxgpt.train.steps import create_train_state


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


# ---------------------------------------------------------------------------------------
# Self-verifying checkpoints: a damaged newest step falls back to the newest intact one


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run directory with intact steps 1, 2, 3 (each state's `step` leaf = its step)."""
    from jaxgpt.config import ModelConfig

    cfg = ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    base = tmp_path_factory.mktemp("three")
    manager = checkpoint.checkpoint_manager(base, keep=3)
    states = {}
    for step in (1, 2, 3):
        s = jax.device_get(_state(cfg, seed=step))
        s["step"] = np.int32(step)
        checkpoint.save(manager, step, s, {"step": step})
        states[step] = s
    manager.close()
    save_config(Config(model=cfg), base / "config.yaml")
    return base, states, cfg


def _copy(base, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def _biggest_state_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _biggest_state_file(step_dir)
    os.truncate(f, f.stat().st_size // 2)


def _tamper(step_dir):  # same size, one bit flipped: only the sha256 can tell
    f = _biggest_state_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated": _truncate,
    "meta-emptied": lambda d: (d / "meta" / "metadata").write_text(""),
    "file-deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "tampered": _tamper,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_falls_back_with_a_warning(three_steps, tmp_path, capsys, damage):
    base, states, cfg = three_steps
    run = _copy(base, tmp_path)
    DAMAGE[damage](run / "checkpoints" / "3")
    restored, meta = checkpoint.restore(run, _state(cfg), quarantine=False)
    assert meta == {"step": 2}
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored["params"], states[2]["params"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint 3" in err[0] and "using step 2" in err[0], err
    assert (run / "checkpoints" / "3").is_dir()  # quarantine=False leaves the run as it was
    _, params = checkpoint.load_params(run)  # generate/--init read the same step
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, states[2]["params"])


def test_manifest_is_written_last_and_lists_every_file(three_steps):
    import json

    base, _, _ = three_steps
    step_dir = base / "checkpoints" / "3"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and manifest["step"] == 3
    assert checkpoint.verify_step(step_dir) is None


def test_step_without_manifest_still_loads(three_steps, tmp_path):
    """Checkpoints saved before manifests existed are trusted if they load."""
    base, _, cfg = three_steps
    run = _copy(base, tmp_path)
    (run / "checkpoints" / "3" / "manifest.json").unlink()
    assert checkpoint.restore(run, _state(cfg))[1] == {"step": 3}
    (run / "checkpoints" / "3" / "meta" / "metadata").write_text("")  # ... and fall back if not
    assert checkpoint.restore(run, _state(cfg), quarantine=False)[1] == {"step": 2}


def test_resume_quarantines_the_damaged_step_and_saves_it_afresh(three_steps, tmp_path, capsys):
    """After falling back from damaged 3 to 2, the run's next save at 3 must happen (not be
    skipped as 'already saved') and rotation must keep 2 rather than a damaged 3."""
    base, states, cfg = three_steps
    run = _copy(base, tmp_path)
    _truncate(run / "checkpoints" / "3")
    assert checkpoint.restore(run, _state(cfg))[1] == {"step": 2}
    assert "corrupt-checkpoints" in capsys.readouterr().err
    assert checkpoint.all_steps(run) == [1, 2]
    assert [p.name.split("-")[0] for p in (run / "corrupt-checkpoints").iterdir()] == ["3"]
    manager = checkpoint.checkpoint_manager(run, keep=2)
    assert manager.latest_step() == 2
    checkpoint.save(manager, 3, states[3], {"step": 3})
    manager.close()
    assert checkpoint.all_steps(run) == [2, 3]
    assert checkpoint.restore(run, _state(cfg))[1] == {"step": 3}


def test_no_intact_step_is_one_user_error(three_steps, tmp_path):
    base, _, cfg = three_steps
    run = _copy(base, tmp_path)
    for step in (1, 2, 3):
        _truncate(run / "checkpoints" / str(step))
    with pytest.raises(UserError, match=r"no intact checkpoint .*step 3: .*step 2: .*step 1: ") as e:
        checkpoint.restore(run, _state(cfg))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no intact checkpoint"):
        checkpoint.load_params(run)
    assert checkpoint.all_steps(run) == [1, 2, 3]  # nothing moved when nothing could be used


def test_other_model_is_not_damage(three_steps, tmp_path):
    """A checkpoint of another shape is a config error, not a reason to fall back."""
    import dataclasses

    base, _, cfg = three_steps
    with pytest.raises(UserError, match="checkpoint 3 .* does not match"):
        checkpoint.restore(base, _state(dataclasses.replace(cfg, n_embd=64)), quarantine=False)


def test_rotation_cut_short_leaves_no_step_that_looks_whole(three_steps, tmp_path, monkeypatch):
    """Rotation renames an old step into checkpoints/.deleting before deleting it: a kill in
    the middle of the deletion (injected) leaves only the trash, which the next --resume
    (tidy) removes; the steps listed are the kept ones, and rotation happens only once the
    new step's manifest is written."""
    base, states, cfg = three_steps
    run = _copy(base, tmp_path)
    manager = checkpoint.checkpoint_manager(run, keep=2)
    real_rmtree = shutil.rmtree
    order = []

    def killed(path, *a, **k):
        order.append(("rmtree", os.path.basename(path)))
        for p in sorted(Path(path).rglob("*"))[:3]:  # a few files go, then the kill
            if p.is_file():
                p.unlink()
        raise KeyboardInterrupt

    real_manifest = checkpoint.write_manifest
    monkeypatch.setattr(checkpoint, "write_manifest", lambda d, s: (order.append(("manifest", s)), real_manifest(d, s)))
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(manager, 4, states[3], {"step": 4})
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert order[0] == ("manifest", 4) and order[1] == ("rmtree", ".deleting")
    assert checkpoint.all_steps(run) == [3, 4] and (run / "checkpoints" / ".deleting").is_dir()
    assert checkpoint.restore(run, _state(cfg))[1] == {"step": 4}  # tidies first
    assert not (run / "checkpoints" / ".deleting").exists() and not (run / "corrupt-checkpoints").exists()


def test_half_deleted_steps_are_moved_aside_in_one_line(three_steps, tmp_path, capsys):
    """What older versions' rotation left when killed: a step with `state` but no `meta`,
    an empty step; and a step whose manifest lists a file that is gone. --resume (restore
    with quarantine) reports them in one line and moves them to corrupt-checkpoints; a
    read-only load never changes the run."""
    import shutil

    base, states, cfg = three_steps
    run = _copy(base, tmp_path)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "1" / "meta")
    (ckpts / "1" / "manifest.json").unlink()
    (ckpts / "5").mkdir()
    (ckpts / "2" / "meta" / "metadata").unlink()
    capsys.readouterr()
    checkpoint.load_params(run)  # reading: nothing moved
    assert checkpoint.all_steps(run) == [1, 2, 3, 5]
    capsys.readouterr()
    assert checkpoint.restore(run, _state(cfg))[1] == {"step": 3}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 incomplete checkpoint folder(s)" in err[0], err
    assert "step 1: its meta is missing; step 2: meta/metadata is missing; step 5: it is empty" in err[0]
    assert checkpoint.all_steps(run) == [3]
    assert sorted(p.name.split("-")[0] for p in (run / "corrupt-checkpoints").iterdir()) == ["1", "2", "5"]
    assert checkpoint.newest_intact_step(run) == 3
