"""Preemption, full disks and finished runs (issue 29), end to end on a tiny model.

Each run goes through the real entry points in-process (`train.main`, `finetune.main`):
SIGTERM is raised from inside the run at a known step (`signal.raise_signal`), a full disk
through a small tmpfs where this process may mount one (root), else through a write that
raises ENOSPC. What is checked is what a user sees: the exit code, one line, the files left
and the losses after --resume, against an uninterrupted run. The 2-process SIGTERM and the
dead peer under a mesh are in tests/test_multihost.py (slow).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Records at 4, 8 (eval) and 12 (eval); checkpoints at 8 and 12. Dropout on: PRNG state matters.
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32",
    "model.dropout=0.1", "data.stride=16", "train.batch_size=4", "train.max_steps=12",
    "train.warmup_steps=2", "train.log_interval=4", "train.eval_interval=8", "train.sample_tokens=0",
    "train.lr=1e-3",
]
TIMING = {"tokens_per_sec", "mfu", "train_seconds", "wall_seconds"}  # measured, not computed


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def _train(argv) -> int:
    import train

    return train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    run = root / "straight"
    assert _train(["--out", run, *_sets(TINY + [f"data.cache_dir={root / 'cache'}"])]) == 0
    return run


def _new_run(straight, tmp_path, *extra):
    return ["--out", tmp_path / "run", *_sets(TINY + [f"data.cache_dir={straight.parent / 'cache'}", *extra])]


def _said(text: str) -> list[str]:
    """The lines of `text` that are not progress bars."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("train:")]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_results(run: Path, straight: Path) -> None:
    """metrics.jsonl and metrics.json as the uninterrupted run's (timings aside); val_loss
    equal as written."""
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
    assert [strip(r) for r in _records(run)] == [strip(r) for r in _records(straight)]
    got, want = (json.loads((r / "metrics.json").read_text()) for r in (run, straight))
    assert strip(got) == strip(want)
    assert repr(got["val_loss"]) == repr(want["val_loss"]) and got["train_loss"] == want["train_loss"]


def _leftovers(run: Path) -> list[str]:
    """Lock files and temporaries anywhere in the run directory."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name == ".lock" or ".tmp" in p.name or p.name == ".deleting")


def _signal_at(monkeypatch, when: dict[int, list[int]]) -> None:
    """Raise the given signals in this process at the start of those iterations (0-based:
    iteration 5 is step 6, which is then finished and saved)."""
    from jaxgpt.tasks.pretrain import Pretrain

    real = Pretrain.source

    def source(self, iteration, local_params):
        for signum in when.get(iteration, ()):
            signal.raise_signal(signum)
        return real(self, iteration, local_params)

    monkeypatch.setattr(Pretrain, "source", source)


# ---------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_saves_exits_143_and_resume_ends_as_a_straight_run(straight, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 6 (between the records of 4 and 8): the step finishes, a checkpoint
    is saved with the log window's two iterations, one line, exit 143. Before --resume, leave
    what killed saves and rotations of older versions leave (an empty step folder, one with
    `state` but no `meta`, Orbax's temporary folder, our trash and a temporary file): the
    resume reports the two folders in one line, moves them aside, removes the rest, and ends
    exactly where the straight run ends, train_loss of the record at 8 (steps 5-8) included."""
    from jaxgpt.io import checkpoint

    run = tmp_path / "run"
    _signal_at(monkeypatch, {5: [signal.SIGTERM]})
    capsys.readouterr()
    assert _train(_new_run(straight, tmp_path)) == 143
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("preempted")]
    assert lines == [f"preempted (SIGTERM): saved a checkpoint at step 6; resume with --resume {run}"], out
    assert "error" not in err and "Traceback" not in err, err
    assert checkpoint.all_steps(run) == [6] and [r["step"] for r in _records(run)] == [4]
    assert not (run / "metrics.json").exists() and _leftovers(run) == []
    monkeypatch.undo()

    ckpts = run / "checkpoints"
    (ckpts / "2").mkdir()
    shutil.copytree(ckpts / "6" / "state", ckpts / "1" / "state")
    shutil.copytree(ckpts / "6", ckpts / "7.orbax-checkpoint-tmp-1733")
    (ckpts / ".deleting" / "3" / "state").mkdir(parents=True)
    (run / ".metrics.json.tmp-99").write_text("{")
    assert _train(["--resume", run]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in _said(err) if line.startswith("warning:")]
    assert len(warnings) == 1 and len(_said(err)) == 1 and "2 incomplete checkpoint folder(s)" in warnings[0], err
    assert "step 1: its meta is missing" in warnings[0] and "step 2: it is empty" in warnings[0]
    assert sorted(p.name.split("-")[0] for p in (run / "corrupt-checkpoints").iterdir()) == ["1", "2"]
    assert checkpoint.all_steps(run) == [8, 12] and _leftovers(run) == []
    _same_results(run, straight)


@pytest.mark.parametrize("second", ["during the save", "during a step"])
def test_a_second_sigterm(straight, tmp_path, monkeypatch, capsys, second):
    """A second SIGTERM while the checkpoint is written waits for it (manifest included: the
    step verifies), then stops; between saves it stops at once, saving nothing more."""
    from jaxgpt.io import checkpoint

    run = tmp_path / "run"
    if second == "during the save":
        _signal_at(monkeypatch, {5: [signal.SIGTERM]})
        real = checkpoint.write_manifest

        def write_manifest(step_dir, step):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.05)
            return real(step_dir, step)

        monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    else:
        _signal_at(monkeypatch, {5: [signal.SIGTERM, signal.SIGTERM]})
    capsys.readouterr()
    assert _train(_new_run(straight, tmp_path)) == 143
    err = _said(capsys.readouterr().err)
    assert len(err) == 1, err
    if second == "during the save":
        assert err[0].startswith("stopped by a second SIGTERM once the checkpoint being written was complete")
        assert checkpoint.all_steps(run) == [6] and checkpoint.verify_step(run / "checkpoints" / "6") is None
    else:
        assert err[0].startswith("stopped at once by a second SIGTERM")
        assert checkpoint.all_steps(run) == []
    assert _leftovers(run) == []


def test_a_sigterm_during_a_save_stops_right_after_it(straight, tmp_path, monkeypatch, capsys):
    """The notice comes while step 8's checkpoint is written: that step is the one saved, no
    further step runs."""
    from jaxgpt.io import checkpoint

    real = checkpoint.write_manifest

    def write_manifest(step_dir, step):
        if step == 8:
            signal.raise_signal(signal.SIGTERM)
        return real(step_dir, step)

    monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(_new_run(straight, tmp_path)) == 143
    assert "preempted (SIGTERM): saved a checkpoint at step 8;" in capsys.readouterr().out
    assert checkpoint.all_steps(run) == [8] and [r["step"] for r in _records(run)] == [4, 8]


def test_kill_term_from_outside(tmp_path):
    """`kill -TERM` as a scheduler sends it, to a real process: exit 143, the line, the step
    it names is the newest checkpoint, no lock left."""
    from jaxgpt.io import checkpoint

    run = tmp_path / "run"
    sets = _sets(TINY + ["train.max_steps=100000", "train.log_interval=1", f"data.cache_dir={tmp_path / 'cache'}"])
    proc = subprocess.Popen([sys.executable, "train.py", "--out", str(run), *sets], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                              len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in out.splitlines() if line.startswith("preempted")]
    assert len(lines) == 1 and lines[0].startswith("preempted (SIGTERM): saved a checkpoint at step "), out[-2000:]
    step = int(lines[0].split("step ")[1].split(";")[0])
    assert step >= 3 and checkpoint.latest_step(run) == step
    assert _leftovers(run) == [] and not (run / "metrics.json").exists()


# ---------------------------------------------------------------------------------------
# Finished runs


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_rewrites_nothing(straight, tmp_path, capsys):
    """--resume of a finished run: one line, exit 0, not a byte or mtime changed. Its results
    lost (killed after the final checkpoint): --resume writes them from the checkpoint, equal
    to the uninterrupted run's, and leaves metrics.jsonl alone."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = _snapshot(run)
    capsys.readouterr()
    assert _train(["--resume", run]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [f"{run} is finished (step 12 of 12); its results are in "
                                        f"{run / 'metrics.json'}, nothing to do (to train longer: --resume {run} "
                                        "--set train.max_steps=N)"], out
    assert err == "" and _snapshot(run) == before
    assert _train(["--resume", run, "--set", "model.n_embd=64"]) == 2  # the checkpoint fixes the shape: one line
    assert capsys.readouterr().err.startswith("error: --set model.n_embd: a resumed run keeps its checkpoint's "
                                              "model shape") and _snapshot(run) == before
    assert _train(["--resume", run, *_sets(TINY)]) == 0 and _snapshot(run) == before  # restating it is fine
    capsys.readouterr()
    (run / "metrics.json").unlink()
    (run / "loss.png").unlink()
    assert _train(["--resume", run]) == 0
    assert "writing its missing results from the last checkpoint" in capsys.readouterr().out
    _same_results(run, straight)
    assert (run / "loss.png").is_file()
    assert _snapshot(run)["metrics.jsonl"] == before["metrics.jsonl"] and _leftovers(run) == []


def test_a_finished_finetune_run_is_safe_too(tmp_path, capsys):
    import finetune

    data = tmp_path / "reviews.csv"
    data.write_text("label,text\n" + "".join(f'pos,"great film {i}"\nneg,awful movie {i}\n' for i in range(12)))
    run = tmp_path / "run"
    sets = _sets(["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32",
                  "train.batch_size=8", "train.epochs=1", "train.warmup_steps=1", "train.num_devices=1",
                  "data.val_fraction=0.2", "data.test_fraction=0.2"])
    assert finetune.main(["classify", "--data", str(data), "--out", str(run), *sets]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert finetune.main(["classify", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert " is finished (step 1 of 1); its results are in " in out and _snapshot(run) == before, out
    assert out.rstrip().endswith(f"(to train longer: --resume {run} --set train.epochs=N)"), out
    for change in ("finetune.train_mode=lora", "lora.rank=4"):  # the checkpoint fixes them: one line each
        assert finetune.main(["classify", "--resume", str(run), "--set", change]) == 2
        assert f"--set {change.split('=')[0]}: a resumed run keeps" in capsys.readouterr().err
    # an epochs run would ignore max_steps: refused, not silently unused
    assert finetune.main(["classify", "--resume", str(run), "--set", "train.max_steps=5"]) == 2
    assert _snapshot(run) == before
    assert capsys.readouterr().err.strip() == (
        "error: --set train.max_steps=5 has no effect while train.epochs=1 (the run counts epochs); "
        "add --set train.epochs=0 to count steps instead")
    summary = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    assert finetune.main(["classify", "--resume", str(run)]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in summary.items() if k not in TIMING}


# ---------------------------------------------------------------------------------------
# Full disks


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MiB tmpfs (one checkpoint of the tiny model is 18.6 MiB), or a skip where this
    process may not mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {made.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _full_disk_then_resume(straight, run, capsys, argv, what, newest, make_room=lambda: None):
    capsys.readouterr()
    assert _train(argv) == 2
    err = _said(capsys.readouterr().err)
    errors = [line for line in err if not line.startswith("warning:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: the disk is full: could not write {what}") and str(run) in errors[0]
    assert f"the newest intact checkpoint is step {newest} ({run / 'checkpoints' / str(newest)})" in errors[0]
    assert errors[0].endswith(f"free space, then --resume {run}")
    assert [p.name for p in (run / "checkpoints").iterdir()] == [str(newest)] and _leftovers(run) == []
    make_room()
    assert _train(["--resume", run]) == 0
    _same_results(run, straight)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # an Orbax callback after its loop
def test_a_full_disk_on_a_small_tmpfs(straight, tmp_path, small_disk, capsys):
    """Checkpoint 8 fits, checkpoint 12 does not: one line (after the free-space warning), the
    partial step removed, no lock; after the disk grows --resume ends as the straight run."""
    run = small_disk / "run"
    argv = ["--out", run, *_sets(TINY + [f"data.cache_dir={straight.parent / 'cache'}"])]
    grow = lambda: subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    _full_disk_then_resume(straight, run, capsys, argv, "checkpoint step 12", 8, grow)


def _enospc_open(real_open, when):
    def fake_open(file, mode="r", *args, **kwargs):
        if when(str(file), mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    return fake_open


def test_a_full_disk_while_writing_the_manifest(straight, tmp_path, monkeypatch, capsys):
    """ENOSPC injected into the manifest of step 12 (Orbax has committed the step): the step
    is removed, never left unverified; --resume after that ends as the straight run."""
    import builtins

    from jaxgpt.io import files

    run = tmp_path / "run"
    monkeypatch.setattr(files, "open", _enospc_open(builtins.open, lambda f, m: "/12/.manifest.json" in f),
                        raising=False)
    _full_disk_then_resume(straight, run, capsys, _new_run(straight, tmp_path),
                           "the manifest of checkpoint step 12", 8, monkeypatch.undo)


def test_a_full_disk_while_appending_metrics(straight, tmp_path, monkeypatch, capsys):
    """A metrics record cut short by a full disk is cut back out (no torn line)."""
    import builtins

    from jaxgpt.engine import metrics
    from tests.cli_helpers import HalfWrite

    calls = {"n": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            calls["n"] += 1
            if calls["n"] == 3:  # the record of step 12, before its checkpoint
                return HalfWrite(f)
        return f

    run = tmp_path / "run"
    monkeypatch.setattr(metrics, "open", fake_open, raising=False)
    capsys.readouterr()
    assert _train(_new_run(straight, tmp_path)) == 2
    err = _said(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: the disk is full: could not write a metrics record "
                                               f"({run / 'metrics.jsonl'}: no space left on device); the newest "
                                               f"intact checkpoint is step 8"), err
    assert [r["step"] for r in _records(run)] == [4, 8] and _leftovers(run) == []


def test_too_little_room_for_one_checkpoint_stops_before_the_first_step(straight, tmp_path, monkeypatch, capsys):
    from jaxgpt.engine import rundir

    monkeypatch.setattr(rundir, "free_bytes", lambda path: 1 << 20)
    assert _train(_new_run(straight, tmp_path)) == 2
    err = _said(capsys.readouterr().err)
    assert len(err) == 1 and "1.0 MiB free, but one checkpoint takes about 18.6 MiB" in err[0], err
    assert not (tmp_path / "run").exists()


def test_an_error_after_the_lock_leaves_no_lock(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    assert _train(["--resume", run, "--set", "train.batch_size=3"]) == 2
    assert "train.batch_size=3" in capsys.readouterr().err
    assert _leftovers(run) == []
