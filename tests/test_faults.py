"""Faults end to end: a damaged newest checkpoint, bad config values, a killed tokenizer.

Each test drives the real entry points in-process (`train.main`, `jaxgpt.cli.generate.main`)
on a tiny model, so what it checks is what a user would see: the exit code, one line on
stderr, the files left behind and the losses of the resumed run.
"""
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32",
    "model.dropout=0.1", "data.stride=16", "train.batch_size=4", "train.max_steps=6",
    "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=3", "train.sample_tokens=0",
    "train.lr=1e-3",
]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def _train(argv):
    import train

    return train.main(argv)


def _losses(run: Path) -> dict[int, float]:
    """step -> train_loss, the last record of each step winning (a resumed run may repeat steps)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run; checkpoints at the eval points 3 and 6."""
    root = tmp_path_factory.mktemp("faults")
    run = root / "straight"
    assert _train(["--out", str(run), *_sets(TINY + [f"data.cache_dir={root / 'cache'}"])]) == 0
    return run


def _truncate_largest(step_dir: Path) -> None:
    import os

    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(f, f.stat().st_size // 2)


def test_resume_after_damaged_latest_uses_the_previous_step(straight, tmp_path, capsys):
    """Step 6 truncated: --resume warns once, continues from 3 and reproduces steps 4-6 of the
    uninterrupted run exactly; generate --init reads step 3 too."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _truncate_largest(run / "checkpoints" / "6")
    capsys.readouterr()
    assert _train(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 6" in warnings[0] and "using step 3" in warnings[0], err
    want, got = _losses(straight), _losses(run)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
    summary = lambda r: json.loads((r / "metrics.json").read_text())
    assert summary(run)["val_loss"] == summary(straight)["val_loss"]
    from jaxgpt.io import checkpoint

    assert checkpoint.all_steps(run) == [3, 6] and checkpoint.verify_step(run / "checkpoints" / "6") is None


def test_generate_and_resume_with_no_intact_checkpoint(straight, tmp_path, capsys):
    from jaxgpt.cli import generate

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "checkpoints" / "6" / "meta" / "metadata").write_text("")
    capsys.readouterr()
    assert generate.main(["--init", str(run), "--prompt", "Every effort", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Every effort")
    assert "checkpoint 6" in out.err and "using step 3" in out.err
    _truncate_largest(run / "checkpoints" / "3")
    for entry in (lambda: _train(["--resume", str(run)]),
                  lambda: generate.main(["--init", str(run), "--prompt", "Every effort", "--max-new-tokens", "2"])):
        assert entry() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "no intact checkpoint" in err[0], "\n".join(err)


@pytest.mark.parametrize(
    "argv, config_text, words",
    [
        (["--set", "train.lr=nan"], None, "train.lr: expected a finite number"),
        (["--set", "train.lr=inf"], None, "train.lr: expected a finite number"),
        (["--set", "train.b2=1"], None, "train.b2 must be in [0, 1)"),
        (["--set", "model.vocab_size=1000"], None, "smaller than the GPT-2 tokenizer's"),
        (["--set", "model.remat_policy=bogus"], None, "model.remat_policy 'bogus'"),
        (["--set", "model.attention=flash"], None, "model.attention must be"),
        ([], "model: 5\n", "config model: expected a section"),
        (["finetune.py", "classify", "--set", "train.lr=nan"], None, "train.lr: expected a finite number"),
        (["finetune.py", "grpo", "--set", "model=[1]"], None, "config model: expected a section"),
    ],
)
def test_bad_values_exit_2_before_a_run_directory_exists(tmp_path, capsys, argv, config_text, words):
    out = tmp_path / "out"
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        argv = argv + ["--config", str(tmp_path / "c.yaml")]
    if argv[0] == "finetune.py":
        import finetune

        code = finetune.main(argv[1:] + ["--out", str(out)])
    else:
        code = _train(argv + ["--out", str(out), "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_tokenizer_killed_midway_leaves_nothing_a_later_run_uses(tmp_path):
    """SIGKILL during the tokenization of a ~3 MB corpus: no token file or sidecar appears; the
    next run retokenizes (removing the dead writer's temp file) and gets the right tokens."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from jaxgpt.data import bundled as datasets

    from jaxgpt.text import gpt2_bpe as tokenizer
    from jaxgpt.data.tokens import prepare_token_file

    text = datasets.bundled_path("the-verdict").read_text(encoding="utf-8") * 150
    corpus = tmp_path / "big.txt"
    corpus.write_text(text, encoding="utf-8")
    cache = tmp_path / "cache"
    code = ("import sys; from jaxgpt.data.tokens import prepare_token_file; "
            "prepare_token_file(sys.argv[1], sys.argv[2], chunk_chars=2048, num_threads=1)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(corpus), str(cache)], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            tmps = list(cache.glob("*.bin.tmp-*")) if cache.exists() else []
            if tmps and tmps[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "tokenization finished before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(cache.glob("*.bin.tmp-*")), "the kill came after the tokenization"
    assert not list(cache.glob("*.bin")) and not list(cache.glob("*.json"))
    path, n = prepare_token_file(str(corpus), cache)
    assert not list(cache.glob("*.tmp-*"))
    np.testing.assert_array_equal(np.fromfile(path, "<u2"), tokenizer.encode(text))


def test_a_token_file_changed_in_place_is_not_trusted(tmp_path, monkeypatch):
    """Same size, one token changed: the sidecar's sha256 catches it and the corpus is
    tokenized again (a run never trains on tokens that are not its corpus's)."""
    import numpy as np

    from jaxgpt.text import gpt2_bpe as tokenizer
    from jaxgpt.data.tokens import prepare_token_file

    corpus = tmp_path / "c.txt"
    corpus.write_text("Every effort moves you, and more.\n" * 20)
    path, n = prepare_token_file(str(corpus), tmp_path / "cache")
    good = path.read_bytes()
    path.write_bytes(good[:2] + bytes([good[2] ^ 1]) + good[3:])
    calls = []
    real = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert prepare_token_file(str(corpus), tmp_path / "cache")[1] == n
    assert calls and path.read_bytes() == good
    np.testing.assert_array_equal(np.fromfile(path, "<u2"), tokenizer.encode(corpus.read_text()))
