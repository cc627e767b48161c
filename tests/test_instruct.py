"""Instruction fine-tuning: batches and masks, bucketing, splits, the finetune.py CLI end to end,
resume, LoRA, generate --instruction, --task, bad input."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import load_config
from jaxgpt.data.instruct import (Encoded, InstructDataConfig, bucket_length, encode_split, epoch_batches,
                                  load_instruct, make_batch, padding_fraction, split_sizes)
from jaxgpt.errors import UserError
from jaxgpt.text.prompts import format_prompt
from jaxgpt.tasks.instruct import instruct_data
from jaxgpt.text.gpt2_bpe import EOT_ID, encode
from tests.cli_helpers import assert_refused, run_finetune

ROOT = Path(__file__).resolve().parent.parent
E = EOT_ID
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=64", "model.dropout=0.1",
    "train.batch_size=8", "train.epochs=2", "train.warmup_steps=2", "train.log_interval=1", "train.lr=3e-3",
    "data.val_fraction=0.2", "data.test_fraction=0.1", "generate.max_new_tokens=6", "generate.batch_size=4",
]
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "sound", "table", "water"]


def _write_jsonl(path: Path, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        a, b = WORDS[i % 10], WORDS[(3 * i + 1) % 10]
        rec = {"instruction": "Repeat the words." if i % 2 else f"Say {a} twice.", "output": f"{a} {b}" * (1 + i % 3)}
        if i % 2:
            rec["input"] = f"{a} {b}"
        rows.append(json.dumps(rec))
    path.write_text("\n".join(rows) + "\n")
    return path


def _argv(*args, sets=TINY):
    out = ["instruct", *args]
    for item in sets:
        out += ["--set", item]
    return out


# ---------------------------------------------------------------------------------------
# Batches


def _toy(seqs, prompt_lengths):
    seqs = [np.asarray(s, np.int32) for s in seqs]
    return Encoded([{}] * len(seqs), seqs, np.array(prompt_lengths, np.int32), np.array([len(s) - 1 for s in seqs]))


def test_batch_shift_masks_and_padding_exact():
    # prompt 11 12 13 | response 21 22 | EOT ; prompt 31 32 | response 41 | EOT
    data = _toy([[11, 12, 13, 21, 22, E], [31, 32, 41, E]], [3, 2])
    b = make_batch(data, [0, 1], batch_size=3, length=8, mask_prompt=True)
    np.testing.assert_array_equal(b["inputs"], [[11, 12, 13, 21, 22, E, E, E], [31, 32, 41, E, E, E, E, E], [E] * 8])
    np.testing.assert_array_equal(b["targets"], [[12, 13, 21, 22, E, E, E, E], [32, 41, E, E, E, E, E, E], [E] * 8])
    # Scored: the response tokens and the first EOT after them; prompt and padding are not.
    np.testing.assert_array_equal(b["mask"], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    assert b["inputs"].dtype == np.int32 and b["mask"].dtype == np.float32
    full = make_batch(data, [0, 1], batch_size=2, length=8, mask_prompt=False)
    np.testing.assert_array_equal(full["mask"], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    # Truncation to the batch length: the EOT (and 22) fall off; nothing past the row is scored.
    cut = make_batch(data, [0], batch_size=1, length=4, mask_prompt=True)
    np.testing.assert_array_equal(cut["inputs"], [[11, 12, 13, 21]])
    np.testing.assert_array_equal(cut["targets"], [[12, 13, 21, 22]])
    np.testing.assert_array_equal(cut["mask"], [[0, 0, 1, 1]])


def test_encode_split_tokens_and_truncation():
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    enc = encode_split(recs, max_length=64)
    for rec, seq, p in zip(recs, enc.seqs, enc.prompt_lengths):
        prompt = encode(format_prompt(rec["instruction"], rec["input"]))
        assert seq.tolist() == prompt + encode(rec["output"]) + [E] and p == len(prompt)
    assert enc.prompts[1] == encode(format_prompt("Add the numbers.", "2 and 3"))
    short = encode_split(recs, max_length=int(enc.prompt_lengths.max()) + 1)
    assert short.lengths.tolist() == [min(x, int(enc.prompt_lengths.max()) + 1) for x in enc.lengths]
    with pytest.raises(UserError, match="record 2.*leaves no room"):
        encode_split([dict(r, where=f"record {i + 1}") for i, r in enumerate(recs)], max_length=int(enc.prompt_lengths[1]))


def test_loss_ignores_padding_and_prompt(tiny_model_cfg):
    """The LM loss of a batch is the mean CE over exactly the masked targets: changing a
    padding or prompt target changes nothing, a response target changes the loss."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.models import init_params
    from jaxgpt.train.steps import lm_loss_fn

    cfg = tiny_model_cfg
    data = _toy([[1, 2, 3, 4, 5, 96], [6, 7, 8, 96]], [3, 2])
    b = {k: jnp.asarray(v) for k, v in make_batch(data, [0, 1], 2, 8, True).items()}
    b = {**b, "inputs": jnp.where(b["inputs"] == E, 96, b["inputs"]), "targets": jnp.where(b["targets"] == E, 96, b["targets"])}
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(1))  # jitted: op-by-op init is slow
    loss_fn = jax.jit(lm_loss_fn(GPT(cfg)))
    total, aux = loss_fn(params, b, None)
    logits = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(params, b["inputs"])
    logp = jax.nn.log_softmax(logits, -1)
    picks = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    direct = -sum(float(logp[r, c, int(b["targets"][r, c])]) for r, c in picks)
    assert aux["count"] == 5 and float(total) == pytest.approx(direct, rel=1e-5)
    moved = b["targets"].at[0, 6].set(7).at[0, 0].set(9)  # padding and prompt targets
    assert float(loss_fn(params, {**b, "targets": moved}, None)[0]) == pytest.approx(float(total), rel=1e-6)
    assert float(loss_fn(params, {**b, "targets": b["targets"].at[1, 1].set(3)}, None)[0]) != pytest.approx(float(total))


# ---------------------------------------------------------------------------------------
# Splits and bucketing


def test_bundled_split_as_the_book_and_seeded():
    data = load_instruct(InstructDataConfig(), context_length=128, batch_size=8)
    assert {s: len(data.splits[s]) for s in ("train", "val", "test")} == {"train": 935, "val": 55, "test": 110}
    assert split_sizes(1100, 0.05, 0.1) == (935, 55, 110)
    where = {s: {r["where"] for r in data.splits[s].records} for s in data.splits}  # "<path> record N"
    assert len(where["train"] | where["val"] | where["test"]) == 1100
    again = load_instruct(InstructDataConfig(), 128, 8)
    assert [r["output"] for r in again.splits["test"].records] == [r["output"] for r in data.splits["test"].records]
    other = load_instruct(InstructDataConfig(seed=7), 128, 8)
    assert [r["output"] for r in other.splits["test"].records] != [r["output"] for r in data.splits["test"].records]
    assert data.splits["train"].lengths.max() <= 128


def test_bucketing_every_record_once_less_padding_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 120, size=203)
    batches = epoch_batches(lengths, 8, 4, seed=5, epoch=0)
    order = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(order), np.arange(203))  # each record exactly once
    assert sum(len(b) < 8 for b in batches) == 1 and len(batches) == 26
    again = epoch_batches(lengths, 8, 4, seed=5, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(np.concatenate(epoch_batches(lengths, 8, 4, seed=5, epoch=1)), order)
    assert not np.array_equal(np.concatenate(epoch_batches(lengths, 8, 4, seed=6, epoch=0)), order)
    naive = np.array_split(np.random.default_rng(5).permutation(203), 26)
    bucketed = padding_fraction(batches, lengths, 8, 16, 128)
    assert bucketed < padding_fraction(naive, lengths, 8, 1, 128)
    assert bucketed < padding_fraction(naive, lengths, 8, 16, 128)
    assert {bucket_length(int(lengths[b].max()), 16, 128) for b in batches} <= {32, 48, 64, 80, 96, 112, 128}
    assert bucket_length(100, 16, 104) == 104 and bucket_length(17, 16, 128) == 32


def test_train_batches_of_the_bundled_data():
    data = load_instruct(InstructDataConfig(), 128, 8)
    per = data.steps_per_epoch(8)
    assert per == 117  # ceil(935 / 8): the last batch is filled with mask-0 rows
    seen = np.concatenate([data.train_indices(s, 8) for s in range(per)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(935))
    shapes, real = set(), 0
    for s in range(per):
        b = data.train_batch(s, 8)
        shapes.add(b["inputs"].shape)
        real += data.real_tokens(s, 8)
        assert b["mask"].sum() > 0
    assert len(shapes) <= 5 and all(shape[0] == 8 and shape[1] % 16 == 0 for shape in shapes)
    stats = data.padding_stats(8)
    assert stats["padding_fraction"] < stats["padding_fraction_unbucketed"]
    assert stats["padding_fraction"] == pytest.approx(1 - real / (stats["mean_batch_tokens"] * per))
    np.testing.assert_array_equal(data.train_batch(5, 8)["inputs"], data.train_batch(5, 8)["inputs"])


def test_task_sft_splits(monkeypatch):
    calls = []

    def sft_splits(task, seed):
        calls.append((task, seed))
        if task != "fake":
            raise UserError(f"unknown task {task!r}")
        rec = lambda i: {"instruction": f"What is {i} + 1?", "input": "", "output": str(i + 1)}  # noqa: E731
        return {"train": [rec(i) for i in range(10)], "val": [rec(i) for i in range(10, 13)],
                "test": [rec(i) for i in range(13, 15)]}

    fake = types.ModuleType("jaxgpt.rl.tasks")
    fake.sft_splits = sft_splits
    monkeypatch.setitem(sys.modules, "jaxgpt.rl", types.ModuleType("jaxgpt.rl"))
    monkeypatch.setitem(sys.modules, "jaxgpt.rl.tasks", fake)
    data = instruct_data(InstructDataConfig(task="fake", seed=9), 64, 4)
    assert calls == [("fake", 9)]
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [10, 3, 2]
    assert data.splits["test"].records[1]["output"] == "15"
    with pytest.raises(UserError, match="unknown task 'nope'"):
        instruct_data(InstructDataConfig(task="nope"), 64, 4)


# ---------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    data = _write_jsonl(tmp / "data.jsonl")
    run = tmp / "run"
    assert run_finetune(_argv("--data", data, "--out", run)) == 0  # 4 fake devices: pmapped
    return run, data


def test_run_directory_and_metrics(tiny_run):
    run, _ = tiny_run
    assert {"config.yaml", "metrics.jsonl", "metrics.json", "loss.png", "responses.json", "checkpoints"} <= \
        {p.name for p in run.iterdir()}
    summary = json.loads((run / "metrics.json").read_text())
    for key in ("train_loss", "val_loss_before", "val_loss", "test_loss", "test_exact_match", "test_rougeL_f1",
                "padding_fraction", "padding_fraction_unbucketed", "tokens_per_sec", "trainable_params",
                "total_params", "wall_seconds"):
        assert summary[key] is not None, key
    assert summary["num_examples"] == {"train": 28, "val": 8, "test": 4}
    assert summary["step"] == 8 and summary["epoch"] == 2.0  # ceil(28 / 8) = 4 steps an epoch
    assert 0 <= summary["padding_fraction"] < 1 and 0 <= summary["test_rougeL_f1"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["val_loss"] == summary["val_loss_before"]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8]
    assert [r["epoch"] for r in records if "val_loss" in r] == [0.0, 1.0, 2.0]
    responses = json.loads((run / "responses.json").read_text())
    assert len(responses) == 4
    from jaxgpt.text.scoring import score_responses

    scores = score_responses([r["model_response"] for r in responses], [r["output"] for r in responses])
    assert summary["test_rougeL_f1"] == pytest.approx(scores["rougeL_f1"])
    assert summary["test_exact_match"] == pytest.approx(scores["exact_match"])
    assert set(responses[0]) == {"instruction", "input", "output", "model_response", "exact_match", "rougeL_f1"}


def test_responses_are_the_greedy_kv_cache_decode(tiny_run):
    """responses.json holds each test prompt's greedy continuation, cut at <|endoftext|>:
    recomputed here one prompt at a time without a cache."""
    from jaxgpt.models.gpt2 import GPT
    from jaxgpt.tasks.instruct import InstructConfig
    from jaxgpt.tasks.common import load_run
    from jaxgpt.text.gpt2_bpe import decode

    run, _ = tiny_run
    cfg, params = load_run(run, InstructConfig)
    ctx = cfg.model.context_length
    apply = jax.jit(lambda t: GPT(cfg.model).apply({"params": params}, t))  # causal: right padding is inert
    for rec in json.loads((run / "responses.json").read_text()):
        ids = encode(format_prompt(rec["instruction"], rec["input"]))
        out = []
        for _ in range(min(cfg.generate.max_new_tokens, ctx - len(ids))):
            seq = ids + out
            nxt = int(jnp.argmax(apply(jnp.array([seq + [0] * (ctx - len(seq))]))[0, len(seq) - 1]))
            out.append(nxt)
            if nxt == E:
                break
        assert rec["model_response"] == decode([t for t in out if t != E]).strip()


def test_generate_instruction_prints_the_response(tiny_run, capsys):
    from jaxgpt.cli import generate as cli
    from jaxgpt.generation.responses import greedy_responses
    from jaxgpt.tasks.instruct import InstructConfig
    from jaxgpt.tasks.common import load_run

    run, _ = tiny_run
    rc = cli.main(["--init", str(run), "--instruction", "Repeat the words.", "--input", "apple river",
                   "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and "### Response" not in out and "Below is an instruction" not in out
    cfg, params = load_run(run, InstructConfig)
    prompt = encode(format_prompt("Repeat the words.", "apple river"))
    expected = greedy_responses(params, cfg.model, [prompt], jax.random.key(0), max_new_tokens=6, batch_size=1)
    assert out == expected[0] + "\n"
    assert cli.main(["--init", str(run), "--input", "x", "--prompt", "y"]) == 2
    assert cli.main(["--init", str(run), "--instruction", "a", "--prompt", "y"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_lora_run_and_resume_match_a_straight_run(tmp_path, capsys):
    """LoRA mode end to end; N steps, stop, --resume == 2N steps straight (dropout on); the
    generate CLI merges the run's adapters."""
    from jaxgpt.cli import generate as cli
    from jaxgpt.models.lora import merge_lora
    from jaxgpt.tasks.common import load_run
    from jaxgpt.tasks.instruct import InstructConfig, finetune_instruct

    data = _write_jsonl(tmp_path / "data.jsonl")
    cfg = load_config(None, TINY + [f"data.path={data}", "finetune.train_mode=lora", "lora.rank=2",
                                    "lora.alpha=4", "train.num_devices=1", "data.bucket=64"],  # one shape
                      cls=InstructConfig)
    straight = finetune_instruct(cfg, tmp_path / "straight")
    finetune_instruct(cfg, tmp_path / "split", stop_after=3)
    assert run_finetune(["instruct", "--resume", tmp_path / "split"]) == 0
    losses = lambda run: [json.loads(line).get("train_loss") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("straight") == losses("split")
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    for key in ("val_loss_before", "val_loss", "test_loss", "test_rougeL_f1"):
        assert resumed[key] == straight[key], key
    d, r, layers = 32, 2, 1
    assert straight["trainable_params"] == layers * (r * (d + 3 * d) + r * (d + d) + r * (d + 4 * d) + r * (4 * d + d))
    assert straight["val_loss"] < straight["val_loss_before"]
    _, raw = load_run(tmp_path / "straight", InstructConfig, merge=False)
    assert np.abs(raw["h_0"]["mlp"]["c_fc"]["lora_b"]).max() > 0
    _, params = cli.load_init(str(tmp_path / "straight"))
    expected = merge_lora(raw, cfg.lora)  # alpha 4, rank 2: scale 2
    np.testing.assert_allclose(params["h_0"]["mlp"]["c_fc"]["kernel"], expected["h_0"]["mlp"]["c_fc"]["kernel"])
    assert "lora_a" not in params["h_0"]["mlp"]["c_fc"]
    assert cli.main(["--init", str(tmp_path / "straight"), "--instruction", "Say apple twice.",
                     "--max-new-tokens", "4"]) == 0


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/empty.jsonl"], "is empty"),
        (["--data", "{tmp}/noinstr.jsonl"], "line 1 has no instruction field 'instruction'"),
        (["--data", "{tmp}/nooutput.jsonl"], "line 2 has no output field 'output'"),
        (["--data", "{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
        (["--data", "{tmp}/missing.jsonl"], "not found"),
        (["--data", "{tmp}/few.jsonl"], "too few records to split"),
        (["--data", "{tmp}/long.jsonl"], "leaves no room for a response"),
        (["--set", "data.max_length=200"], "data.max_length must be in"),
        (["--set", "data.val_fraction=0.9"], "must be < 1"),
        (["--set", "train.batch_size=64"], "larger than the training split"),
        (["--set", "generate.max_new_tokens=0"], "generate.max_new_tokens"),
        (["--set", "data.sort_chunk=0"], "data.sort_chunk"),
        (["--train-mode", "lora", "--set", "lora.targets=[c_attn,score]"], "'score' matches no dense layer"),
        (["--task", "arith", "--data", "{tmp}/good.jsonl"], "alternatives"),
        (["--resume", "{tmp}"], "not a run directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "noinstr.jsonl").write_text('{"prompt": "a", "output": "b"}\n')
    (tmp_path / "nooutput.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    (tmp_path / "few.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    long = _write_jsonl(tmp_path / "long.jsonl").read_text()
    (tmp_path / "long.jsonl").write_text(long + json.dumps({"instruction": "word " * 60, "output": "x"}) + "\n")
    good = _write_jsonl(tmp_path / "good.jsonl")
    argv = ["instruct", "--out", tmp_path / "run"]
    if "--data" not in args and "--resume" not in args:
        argv += ["--data", good]
    if "--resume" in args:
        argv = ["instruct"]
    for item in TINY:
        argv += ["--set", item]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_refused(run_finetune, argv, capsys, message, tmp_path / "run")


def test_config_file_loads_as_the_task_config():
    from jaxgpt.tasks import config_class_for
    from jaxgpt.tasks.instruct import InstructConfig

    path = ROOT / "configs" / "finetune" / "instruct.yaml"
    assert config_class_for(path) is InstructConfig
    cfg = load_config(path, cls=InstructConfig)
    assert cfg.data.path == "instruction-data" and cfg.data.mask_prompt and cfg.generate.max_new_tokens > 0
    assert dataclasses.replace(cfg.data, task="x").task == "x"


@pytest.mark.slow
@pytest.mark.optimized  # minutes of training: running, not compiling
def test_default_command_from_a_pretrained_run(tmp_path):
    """The issue's result, shortened for CI: from `train.py`'s default config (120 of its 250
    steps), one epoch of the default SFT (of 4) lowers the val loss by >= 0.5. The full
    commands' figures are in the README."""
    import subprocess

    pre = tmp_path / "pretrained"
    subprocess.run([sys.executable, "train.py", "--out", str(pre), "--set", f"data.cache_dir={tmp_path / 'cache'}",
                    "--set", "train.max_steps=120"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    out = subprocess.run([sys.executable, "finetune.py", "instruct", "--init", str(pre), "--out", str(tmp_path / "sft"),
                          "--set", "train.epochs=1"], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert summary["val_loss"] <= summary["val_loss_before"] - 0.5
    assert summary["test_rougeL_f1"] > 0
