"""jaxgpt.engine.rundir: the checks the training loops make around saves, resumes and --out."""
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.errors import UserError
from jaxgpt.engine.rundir import (DivergenceGuard, RunLock, check_finite_before_save, check_new_run_dir, is_our_run,
                           mark_run, truncate_metrics)


def test_finite_losses_and_params_pass_and_nan_names_its_step():
    params = {"w": jnp.ones((3, 3)), "b": np.zeros(3, np.float32)}
    check_finite_before_save(10, [jnp.float32(2.0), 1.5, jnp.float32(1.2)], params, last_saved=7)
    with pytest.raises(UserError, match=r"train loss is nan at step 9; not saving step 10 \(the last good "
                                        r"checkpoint is step 7\)") as e:
        check_finite_before_save(10, [1.0, jnp.float32(np.nan), np.inf], params, last_saved=7)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="global norm is (inf|nan) at step 4.*no checkpoint was written"):
        check_finite_before_save(4, [1.0], {"w": jnp.array([1.0, np.inf])})


def test_guard_collects_the_losses_since_the_last_save():
    guard = DivergenceGuard(last_saved=None)
    for loss in (3.0, 2.0):
        guard.record(jnp.float32(loss))
    guard.check(2, {"w": jnp.ones(2)})
    guard.saved(2)
    guard.record(jnp.float32(np.nan))  # step 3: logged or not, it is seen before saving 4
    guard.record(jnp.float32(1.0))
    with pytest.raises(UserError, match="at step 3; not saving step 4 .*step 2"):
        guard.check(4)


def _write(path, records, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_truncate_metrics_drops_steps_past_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": s, "train_loss": 1.0 / s} for s in range(1, 7)] + [{"note": "no step"}],
           torn='{"step": 7, "train_lo')
    assert truncate_metrics(path, 3) == 4
    assert [json.loads(l).get("step") for l in path.read_text().splitlines()] == [1, 2, 3, None]
    before = path.stat().st_mtime_ns
    assert truncate_metrics(path, 3) == 0 and path.stat().st_mtime_ns == before  # untouched
    rl = tmp_path / "rl.jsonl"
    _write(rl, [{"iteration": i, "step": 4 * i} for i in range(1, 5)])
    assert truncate_metrics(rl, 2, key="iteration") == 2
    assert [json.loads(l)["iteration"] for l in rl.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(tmp_path / "absent.jsonl", 1) == 0


def test_out_dir_must_be_new_empty_or_ours(tmp_path):
    assert check_new_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_new_run_dir(tmp_path / "empty")
    users = tmp_path / "users"
    users.mkdir()
    (users / "config.yaml").write_text("mine: true\n")
    (users / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=r"not a jaxgpt run \(config.yaml, metrics.jsonl\)"):
        check_new_run_dir(users)
    assert sorted(p.name for p in users.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert not is_our_run(users)
    mark_run(tmp_path / "empty")  # a run killed before its first checkpoint is still ours
    (tmp_path / "empty" / "metrics.jsonl").write_text("{}\n")
    check_new_run_dir(tmp_path / "empty")
    (users / "checkpoints").mkdir()  # a run from before the marker: config.yaml + checkpoints/
    assert is_our_run(users)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_new_run_dir(tmp_path / "file")


def test_run_lock_is_exclusive_and_released(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert f"pid {os.getpid()}" in (run / ".lock").read_text()
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on .*\)"):
            RunLock(run).acquire()
    with RunLock(run):  # released on exit
        pass
    assert not run.exists()  # the lock file goes with the lock, and the folder only the lock made
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    with RunLock(run):
        assert (run / ".lock").is_file()
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    RunLock(tmp_path / "other", enabled=False).acquire()  # processes > 0 take no lock
    assert not (tmp_path / "other").exists()


def test_a_killed_runs_lock_is_not_stale(tmp_path):
    """flock is released by the kernel when its holder dies, even by SIGKILL."""
    run = tmp_path / "run"
    code = f"from jaxgpt.engine.rundir import RunLock; import time; RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = RunLock(run).acquire()
    lock.release()
