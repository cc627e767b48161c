"""pass@k against the combinatorial definition; `python -m jaxgpt evaluate` on a tiny GRPO run
gives the run's own before/after figures; dynamic sampling's pieces; DAPO end to end with
refills, overlong shaping and an exact --resume; bad input exits 2 and writes nothing."""
from __future__ import annotations

import json
import zlib
from itertools import combinations
from math import comb

import numpy as np
import pytest

from jaxgpt.rl.dynamic_sampling import choose_groups, gather_groups, informative_groups, refill_prompts
from jaxgpt.rl.evaluation import pass_at_k
from tests.cli_helpers import assert_refused, run_finetune


@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (4, 0), (4, 2), (5, 5), (10, 3), (8, 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c):
    """Chen et al. 2021: the fraction of k-subsets of the n samples that hold a right one."""
    samples = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_dynamic_sampling_pieces():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1], np.float32)  # groups of 3: equal, mixed, ...
    assert informative_groups(rewards, 3).tolist() == [False, True, True, False]
    steps = np.array([[1, 0], [1, 0], [1, 1], [1, 1]], np.float32)  # per-line rewards: groups of 2
    assert informative_groups(steps, 2).tolist() == [False, False]
    assert informative_groups(np.array([[1, 0], [1, 1]]), 2).tolist() == [True]
    a = refill_prompts(50, 8, seed=0, iteration=3, attempt=1, exclude=np.arange(8))
    assert a.tolist() == refill_prompts(50, 8, seed=0, iteration=3, attempt=1, exclude=np.arange(8)).tolist()
    assert not set(a.tolist()) & set(range(8)) and len(set(a.tolist())) == 8
    assert a.tolist() != refill_prompts(50, 8, seed=0, iteration=3, attempt=2, exclude=np.arange(8)).tolist()
    assert sorted(refill_prompts(10, 10, seed=0, iteration=0, attempt=1, exclude=np.arange(8)).tolist()[:2]) == [8, 9]
    chosen, filled = choose_groups([np.array([False, True]), np.array([True, True])], 2)
    assert chosen == [(0, 1), (1, 0)] and filled == 0
    chosen, filled = choose_groups([np.array([False, True]), np.array([False, False])], 3)
    assert chosen == [(0, 0), (0, 1), (1, 0)] and filled == 2  # too few: the first uninformative ones fill in
    parts = [{"x": np.arange(4), "t": ["a", "b", "c", "d"]}, {"x": np.arange(4) + 10, "t": list("efgh")}]
    got = gather_groups(parts, [(0, 1), (1, 0)], 2)
    assert got["x"].tolist() == [2, 3, 10, 11] and got["t"] == ["c", "d", "e", "f"]


# ---------------------------------------------------------------------------------------
# end to end (tiny random-init model)

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=64", "train.num_devices=1",
        "rollout.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=12", "rollout.eval_batch_size=8",
        "data.eval_size=8", "train.max_steps=4", "train.eval_interval=2", "train.log_interval=1", "train.lr=1e-3"]


@pytest.fixture
def half_the_prompts_teach_nothing(monkeypatch):
    """Random-init completions rewarded by length, but every completion of half the problems
    gets 0 (an all-wrong group): dynamic sampling has groups to drop."""
    from jaxgpt.rl.tasks import ArithmeticTask

    def reward(self, completion, problem):
        return float(len(completion) % 2) if zlib.crc32(problem.question.encode()) % 2 else 0.0

    monkeypatch.setattr(ArithmeticTask, "reward", reward)


def _evaluate(argv):
    from jaxgpt.cli.evaluate import main

    return main([str(a) for a in argv])


def test_evaluate_command_gives_the_grpo_runs_own_figures(tmp_path, capsys, half_the_prompts_teach_nothing):
    run = tmp_path / "run"
    argv = ["grpo", "--out", run, "--set", "data.eval_samples=2", "--set", "train.max_steps=2"]
    for item in TINY:
        argv += ["--set", item]
    assert run_finetune(argv) == 0
    summary = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert _evaluate(["--init", run, "--task", "arithmetic", "--samples", 2, "--limit", 8, "--batch", 8,
                      "--max-new-tokens", 12]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "evaluate-arithmetic-eval.json").read_text())
    assert "pass@k" in printed and f"wrote {run / 'evaluate-arithmetic-eval.json'}" in printed
    assert result["problems"] == 8 and set(result["pass_at_k"]) == {"1", "2"}
    for key in ("accuracy", "format_rate", "completion_len", "step_accuracy", "pass_at_k", "sample_accuracy",
                "sample_format_rate", "sample_completion_len"):
        assert result[key] == summary[f"eval_{key}_after"], key


def test_dapo_drops_refills_and_resumes_exactly(tmp_path, half_the_prompts_teach_nothing):
    from jaxgpt.config import load_config
    from jaxgpt.tasks.grpo import DEFAULT_CONFIG, GRPOConfig, finetune_grpo

    cfg = load_config(DEFAULT_CONFIG, TINY + ["grpo.loss_type=dapo", "grpo.supervision=outcome",
                                              "grpo.overlong_buffer=4", "data.eval_samples=0"], cls=GRPOConfig)
    straight = finetune_grpo(cfg, tmp_path / "straight")
    finetune_grpo(cfg, tmp_path / "split", stop_after=2)
    assert run_finetune(["grpo", "--resume", tmp_path / "split"]) == 0
    records = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward", "loss", "groups_dropped", "groups_unfilled", "sampling_tries", "overlong_penalty",
            "eval_accuracy", "grad_norm")
    assert [{k: r.get(k) for k in keys} for r in records("split")] == [{k: r.get(k) for k in keys}
                                                                       for r in records("straight")]
    recs = records("straight")
    assert all(r["groups_dropped"] >= 1 and r["sampling_tries"] >= 1 for r in recs)
    assert any(r["sampling_tries"] > 1 for r in recs)  # refills happened
    assert all(r["overlong_penalty"] <= 0 and "truncated_frac" in r for r in recs)
    assert straight["loss_type"] == "dapo" and straight["grpo_settings"]["clip_eps_high"] == 0.28
    assert straight["groups_dropped_per_iteration"] >= 1


def test_kl_beta_0_loads_no_reference(tmp_path, monkeypatch, half_the_prompts_teach_nothing):
    """No reference params kept or scored unless the loss or grpo.log_kl asks."""
    from jaxgpt.config import load_config
    from jaxgpt.rl.common import RLTask
    from jaxgpt.tasks.grpo import DEFAULT_CONFIG, GRPOConfig, finetune_grpo

    prepared = []
    original = RLTask.prepare
    monkeypatch.setattr(RLTask, "prepare", lambda self, p, m: prepared.append(1) or original(self, p, m))
    cfg = load_config(DEFAULT_CONFIG, TINY + ["train.max_steps=1", "data.eval_samples=0", "grpo.overlong=mask"],
                      cls=GRPOConfig)
    finetune_grpo(cfg, tmp_path / "run")
    assert prepared == []
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl_ref" not in record and "kl" not in record and np.isfinite(record["loss"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory (config.yaml + checkpoint) of a random 1-layer GPT with a 64-token context."""
    import jax

    from jaxgpt.config import Config, ModelConfig, save_config
    from jaxgpt.io import checkpoint
    from jaxgpt.models import init_params

    path = tmp_path_factory.mktemp("evaluate") / "run"
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_length=64, dropout=0.0)
    path.mkdir()
    save_config(Config(model=model), path / "config.yaml")
    params = jax.device_get(init_params(model, jax.random.key(0)))
    checkpoint.save(checkpoint.checkpoint_manager(path), 1, {"params": params, "step": np.int32(1)}, {})
    return path


@pytest.mark.parametrize("extra, message", [
    (["--task", "chess"], "unknown task 'chess'"),
    (["--task", "gsm8k", "--data", "{tmp}/noanswers.jsonl"], "record 1: the answer field has no final answer"),
    (["--task", "gsm8k:verifier=loose"], "verifier must be one of"),
    (["--samples", "-1"], "--samples must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--max-new-tokens", "60"], "exceed the model's context of 64; set --max-prompt-tokens"),
    (["--init", "{tmp}/nothing"], "no such directory"),
    (["--out", "{tmp}/missing/x.json"], "no such directory"),
])
def test_evaluate_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_run, capsys, extra, message):
    (tmp_path / "noanswers.jsonl").write_text(json.dumps({"question": "How many?", "answer": "Four of them."}) + "\n")
    argv = ["--init", tiny_run, "--task", "arithmetic", "--limit", "4"]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = value.replace("{tmp}", str(tmp_path))
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = sorted(p.name for p in tiny_run.iterdir())
    assert_refused(_evaluate, argv, capsys, message)
    assert sorted(p.name for p in tiny_run.iterdir()) == before and not list(tmp_path.glob("*.json"))
