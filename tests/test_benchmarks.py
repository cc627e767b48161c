"""Smoke tests of the benchmark scripts (tiny shapes; seconds)."""
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path, capsys):
    gpu_check = _load("gpu_check")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| bf16 vs fp32 top-1 agreement |" in table and "| train tokens/s |" in table
    row = json.loads(out.read_text())
    positive = ["logits_fp32_std", "logits_top1_agreement", "train_tokens_per_s", "train_step_s",
                "train_flops_per_step_xla", "train_mfu_xla", "train_flops_per_step_6n", "train_mfu_6n",
                "peak_flops_per_device", "peak_memory_bytes", "decode_b1_tokens_per_s",
                f"decode_b{row['decode_batches'][1]}_tokens_per_s", "params"]
    for key in positive:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    # bf16 compute against fp32 on the same params: small differences, same argmax nearly everywhere.
    assert 0 <= row["logits_max_abs_diff"] < 0.1
    assert row["logits_top1_agreement"] >= 0.9
    assert math.isfinite(row["train_loss"])
    # XLA's FLOP count of the whole step is within 2x of the 6N + attention model count.
    assert 0.5 < row["train_flops_per_step_xla"] / row["train_flops_per_step_6n"] < 2
    if row["platform"] == "cpu":
        assert row["attention"] == "xla" and any("cudnn skipped" in n for n in row["notes"])


def test_profile_step_smoke(tmp_path, capsys):
    """One profiled step of the tiny config: XLA's trace is read and attributed to the
    model's components (the profiler API and HLO metadata move between JAX releases)."""
    profile_step = _load("profile_step")
    out = tmp_path / "profile.json"
    assert profile_step.main(["--config", "tiny", "--frameworks", "jax", "--warmup", "1", "--json", str(out)]) == 0
    assert "| component / pass | ms | share |" in capsys.readouterr().out
    comps = json.loads(out.read_text())["jax"]["components_ms"]
    named = {k.split(" / ")[0] for k, v in comps.items() if v > 0}
    for comp in ("LM head + cross-entropy (fused)", "layer norms", "mlp: c_fc matmul + bias",
                 "attn: scores, softmax, weighted sum", "AdamW, clipping, grad accumulation"):
        assert comp in named, (comp, sorted(named))


def test_families_and_matmul_dtypes_smoke(tmp_path, capsys):
    """The Llama/Qwen3 speed benchmark end to end on a tiny Llama (training, then decode from
    the trained params, against transformers), and the dtype matmul table."""
    families = _load("families")
    out = tmp_path / "families.json"
    assert families.main(["--tiny", "--families", "llama", "--batch", "2", "--seq", "16", "--prompt", "4",
                          "--new-tokens", "4", "--steps", "1", "--decode-steps", "1", "--rounds", "1", "--warmup", "1",
                          "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("train_tokens_per_sec", "decode_tokens_per_sec"):
        assert all(math.isfinite(v) and v > 0 for v in row[key].values()), row
    matmul = _load("matmul_dtypes")
    assert matmul.main(["--n", "64", "--reps", "1", "--json", str(tmp_path / "mm.json")]) == 0
    assert "| bfloat16 |" in capsys.readouterr().out


def test_decode_smoke(tmp_path, capsys):
    """Batch-1 decode of a tiny model, jaxgpt only: every timed call gets a bandwidth
    measurement of its own and its fraction of the memory-bound limit from it."""
    decode = _load("decode")
    out = tmp_path / "decode.json"
    assert decode.main(["--tiny", "--frameworks", "jax", "--rounds", "2", "--bw-mib", "16", "--json", str(out)]) == 0
    assert "| jaxgpt (generate_tokens, jitted, KV cache) |" in capsys.readouterr().out
    row = json.loads(out.read_text())
    jax_row = row["results"]["jaxgpt"]
    assert len(row["bandwidth_per_call"]) == len(jax_row["fractions_per_call"]) == 2
    for call, bw in zip(range(2), row["bandwidth_per_call"]):
        want = row["config"]["new_tokens"] / jax_row["times_s"][call] / (bw / row["bytes_per_token"])
        assert math.isclose(jax_row["fractions_per_call"][call], want, rel_tol=1e-9)
    assert 0 < jax_row["fraction_of_limit"] == statistics.median(jax_row["fractions_per_call"])


def test_decode_streamed_smoke(capsys):
    """`--frameworks jax,jax-stream`: the streamed loop (a host callback a token) is timed
    beside the plain one, and gives the same greedy tokens."""
    decode = _load("decode")
    assert decode.main(["--tiny", "--frameworks", "jax,jax-stream", "--rounds", "1", "--bw-mib", "16"]) == 0
    out = capsys.readouterr().out
    assert "| jaxgpt, streamed (on_token" in out and "Greedy tokens, same weights: identical" in out


@pytest.mark.slow
def test_chat_turns_smoke(tmp_path, capsys):
    """A conversation on jaxgpt's `DecodeSession` and on transformers' `generate` continuing
    from its last cache (tiny Llama, same weights): the same greedy answers, turn after turn."""
    chat_turns = _load("chat_turns")
    out = tmp_path / "chat.json"
    assert chat_turns.main(["--tiny", "--turns", "3", "--rounds", "1", "--ways", "jaxgpt-session,transformers-cache",
                            "--json", str(out)]) == 0
    assert "Greedy answers, same weights: identical over 3 turns" in capsys.readouterr().out
    assert json.loads(out.read_text())["same_answers"] is True


def test_train_throughput_smoke(tmp_path, capsys):
    """The training benchmark on the tiny config, jaxgpt only: the measured ceiling is the
    fastest of the matmul readings before and after the steps, and every MFU is against it."""
    train_throughput = _load("train_throughput")
    out = tmp_path / "tt.json"
    assert train_throughput.main(["--configs", "tiny", "--frameworks", "jax", "--steps", "2", "--rounds", "1",
                                  "--warmup", "1", "--matmul-n", "64", "--json", str(out)]) == 0
    assert "| tiny | fp32 | 2 x 32 | jaxgpt |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    machine, (row,) = data["machine"], data["results"]
    readings = [machine["matmul_fp32_flops"]["jax"], machine["matmul_fp32_flops_after"]["jax"]]
    assert machine["measured_ceiling_flops"] == max(readings) > 0
    flops_per_s = row["tokens_per_s"] * row["flops_per_token"]
    assert math.isclose(row["mfu_measured"], flops_per_s / max(readings), rel_tol=1e-9)
    assert math.isclose(row["mfu"], flops_per_s / machine["peak_flops_per_device"], rel_tol=1e-9)


def test_rollout_smoke(tmp_path, capsys):
    """A tiny GRPO-shaped rollout, jaxgpt only; a `--preset` keeps its layers and width but
    takes the benchmark's context (prompt + new tokens)."""
    rollout = _load("rollout")
    out = tmp_path / "rollout.json"
    argv = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--prompts", "2", "--group", "2",
            "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--no-torch-reference", "--json", str(out)]
    assert rollout.main(argv) == 0
    row = json.loads(out.read_text())
    assert row["rows"] == 4 and row["rollout_tokens_per_sec"] > 0 and row["score_tokens_per_sec"] > 0
    args = rollout.argparse.Namespace(preset="gpt2-124m", n_layer=1, n_head=2, n_embd=32)
    assert rollout.model_shape(args) == {"n_layer": 12, "n_head": 12, "n_embd": 768}
    try:
        rollout.main(["--preset", "gpt2-9b"])
    except SystemExit as e:
        assert e.code == 2 and "unknown --preset 'gpt2-9b'" in capsys.readouterr().err
    else:
        raise AssertionError("an unknown preset must exit 2")


def test_one_query_smoke(capsys):
    """The decode attention benchmark, against a checkout (this one) as `--compare-to`."""
    one_query = _load("one_query")
    argv = ["--slots", "24", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--layers", "2", "--rows", "2",
            "--steps", "3", "--rounds", "1", "--compare-to", str(BENCHMARKS.parent)]
    assert one_query.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 layers, 24 slots, 4 heads / 2 kv heads x 8, 2 rows" in out and out.count(" ms a step") == 2
