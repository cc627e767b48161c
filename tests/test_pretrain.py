"""End-to-end pretraining on tiny models: run directory, resume, bad input, generate CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32",
    "model.dropout=0.1", "data.stride=16", "train.batch_size=4", "train.max_steps=6",
    "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=3", "train.sample_tokens=4",
    "train.lr=1e-3",
]


def tiny_cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_run_directory_contents(tmp_path):
    from jaxgpt.tasks.pretrain import pretrain

    run = tmp_path / "run"
    run.mkdir()  # as a run killed before its first checkpoint leaves it: marker, metrics, no checkpoint
    from jaxgpt.engine.rundir import mark_run

    mark_run(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    summary = pretrain(tiny_cfg(tmp_path), run)
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "loss.png", "checkpoints"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "tokens_seen", "train_loss", "lr", "tokens_per_sec", "mfu"):
        assert key in records[0]
    assert "val_loss" in records[2] and "val_loss" not in records[0]
    assert records[-1]["tokens_seen"] == 6 * 4 * 32
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("step", "tokens_seen", "train_loss", "val_loss", "tokens_per_sec"):
        assert saved[key] is not None
    assert saved == pytest.approx(summary) or saved["step"] == summary["step"] == 6
    assert load_config(run / "config.yaml") == tiny_cfg(tmp_path)


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under `folder` (read without TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_scalars_are_the_jsonl_records(tmp_path):
    from jaxgpt.tasks.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(tiny_cfg(tmp_path, "train.tensorboard=true", "train.max_steps=3", "train.sample_tokens=0"), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train_loss"]] == [r["step"] for r in records] == [1, 2, 3]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    assert [v for _, v in scalars["val_loss"]] == pytest.approx([r["val_loss"] for r in records if "val_loss" in r])


def test_resume_gives_identical_losses(tmp_path):
    """2N steps straight == N steps, stop, resume, N steps (dropout on, so PRNG state matters)."""
    from jaxgpt.tasks.pretrain import pretrain

    cfg = tiny_cfg(tmp_path)
    pretrain(cfg, tmp_path / "straight")
    pretrain(cfg, tmp_path / "split", stop_after=3)
    first = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(first) == 3
    pretrain(load_config(tmp_path / "split" / "config.yaml"), tmp_path / "split", resume=True)
    losses = lambda run: [json.loads(l)["train_loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("straight") == losses("split")  # exact equality on CPU
    val = lambda run: json.loads((tmp_path / run / "metrics.json").read_text())["val_loss"]
    assert val("straight") == val("split")


def _main(argv):
    import train

    return train.main(argv)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing.txt"], "nor an existing file"),
        (["--data", "{tmp}/empty.txt"], "empty"),
        (["--data", "{tmp}/short.txt"], "window"),
        (["--set", "model.n_layers=2"], "unknown config key model.n_layers"),
        (["--set", "model.preset=gpt9"], "unknown model preset"),
        (["--set", "train.lr=-0.1"], "train.lr must be positive"),
        (["--set", "data.context_length=64"], "longer than the model's context"),
        (["--resume", "{tmp}"], "no checkpoint"),
        (["--config", "{tmp}/nope.yaml"], "not found"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    extra = [] if "--resume" in args else ["--out", str(out)]
    argv = [x for s in TINY for x in ("--set", s)] + ["--set", f"data.cache_dir={tmp_path / 'cache'}"] + extra + args
    if "--resume" in args:
        argv = args
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    from jaxgpt.tasks.pretrain import pretrain

    pretrain(tiny_cfg(tmp_path), tmp_path / "run", stop_after=1)
    argv = ["--out", str(tmp_path / "run")] + [x for s in TINY for x in ("--set", s)]
    assert _main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_init_takes_the_checkpoints_shape_before_the_data_is_checked_against_it(tmp_path, capsys):
    """`train.py --init RUN --set data.context_length=L` (continued pretraining, as the README
    shows it) checks L against the checkpoint's context, not the default model's; a shape key
    set with --init is refused, not silently replaced by the checkpoint's."""
    from jaxgpt.io.checkpoint import load_params, read_run_config
    from jaxgpt.tasks.pretrain import pretrain

    source = tmp_path / "source"
    pretrain(tiny_cfg(tmp_path, "model.context_length=64", "train.max_steps=1", "train.sample_tokens=0"), source)
    capsys.readouterr()
    sets = [s for s in TINY if not s.startswith("model.") or s.startswith("model.dropout=")]  # the rest: --init's
    argv = [x for s in sets for x in ("--set", s)] + ["--set", f"data.cache_dir={tmp_path / 'cache'}",
                                                     "--init", str(source), "--set", "train.sample_tokens=0"]
    assert _main(argv + ["--set", "model.n_layer=2", "--out", str(tmp_path / "shape")]) == 2  # not silently dropped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set model.n_layer: the model's shape comes from --init" in err[0], err
    longer = tmp_path / "longer"
    assert _main(argv + ["--set", "data.context_length=128", "--out", str(longer)]) == 2  # past the checkpoint's 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.context_length=128 is longer than the model's context" in err[0], err
    assert not longer.exists()
    run = tmp_path / "continued"
    assert _main(argv + ["--set", "data.context_length=64", "--set", "train.max_steps=1", "--out", str(run)]) == 0
    cfg = read_run_config(run)
    assert (cfg.model.context_length, cfg.data.context_length) == (64, 64)
    assert load_params(run)[1]["wpe"]["embedding"].shape == (64, 32)


def test_cli_train_then_generate(tmp_path):
    """The README's commands as subprocesses: train, resume to more steps, generate."""
    env_args = [x for s in TINY for x in ("--set", s)] + ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "--out", str(run), *env_args], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    done = subprocess.run([sys.executable, "train.py", "--resume", str(run), "--set", "train.max_steps=8"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "metrics.json").read_text())["step"] == 8
    gen = subprocess.run(
        [sys.executable, "-m", "jaxgpt", "generate", "--init", str(run), "--prompt", "Every effort moves you",
         "--max-new-tokens", "5"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Every effort moves you")
    bad = subprocess.run(
        [sys.executable, "-m", "jaxgpt", "generate", "--init", str(run), "--prompt", "word " * 40,
         "--max-new-tokens", "5"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "context" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    import signal
    import time

    from jaxgpt.io import checkpoint

    run = tmp_path / "run"
    sets = [x for s in TINY + ["train.max_steps=100000", f"data.cache_dir={tmp_path / 'cache'}"] for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "train.py", "--out", str(run), *sets], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                              len((run / "metrics.jsonl").read_text().splitlines()) >= 4):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved a checkpoint" in out
    step = checkpoint.latest_step(run)
    assert step is not None and step >= 4
    assert not (run / "metrics.json").exists()  # no summary for an unfinished run


def test_checkpoint_interval_saves_on_logged_steps_too(tmp_path):
    """train.checkpoint_interval=2 with a log line every step: checkpoints at 2 and 4 (not
    eval points) as well as the eval points 3 and 6."""
    from jaxgpt.io import checkpoint
    from jaxgpt.tasks.pretrain import pretrain

    pretrain(tiny_cfg(tmp_path, "train.checkpoint_interval=2", "train.keep_checkpoints=10"), tmp_path / "run")
    assert sorted(checkpoint.checkpoint_manager(tmp_path / "run", read_only=True).all_steps()) == [2, 3, 4, 6]


def test_eval_mode_train_loss(tmp_path):
    """train.eval_train_batches=N logs `train_eval_loss` at eval points: the mean token loss,
    dropout off, of the first N train batches in corpus order. Checked against the final
    checkpoint's weights scored here by hand (numpy log-softmax); off (0) by default."""
    import numpy as np

    from jaxgpt.io.checkpoint import load_params
    from jaxgpt.data import pretraining_data
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.tasks.pretrain import pretrain

    assert load_config(None).train.eval_train_batches == 0
    cfg = tiny_cfg(tmp_path, "train.eval_train_batches=2", "train.max_steps=4", "train.eval_interval=2",
                   "train.sample_tokens=0", "train.num_devices=1")
    summary = pretrain(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_eval_loss" in r] == [2, 4]
    _, params = load_params(tmp_path / "run")
    windows = pretraining_data(cfg).splits.train
    batch = windows.take(np.arange(2 * cfg.train.batch_size))  # 2 batches of 4, in order
    logits = np.asarray(GPT(cfg.model).apply({"params": params}, batch["inputs"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    assert summary["train_eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert records[-1]["train_eval_loss"] == pytest.approx(expected, rel=1e-5)
