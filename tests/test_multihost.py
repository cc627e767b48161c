"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices (gloo collectives,
coordinator on 127.0.0.1) against 1 process x 4 devices and 1 process x 1 device.

Every process is started and stopped by the test, with a time limit, on loopback only.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 420
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32",
    "model.dropout=0.0", "data.stride=16", "train.batch_size=8", "train.max_steps=6",
    "train.warmup_steps=2", "train.log_interval=2", "train.eval_interval=3", "train.sample_tokens=0",
    "train.lr=3e-3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def _train(args, devices, cache):
    sets = [x for s in TINY + [f"data.cache_dir={cache}"] for x in ("--set", s)]
    return [sys.executable, "train.py", *args, *sets], _env(devices)


def _run_processes(commands):
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in commands]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _summary(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_elsewhere(tmp_path):
    cache = tmp_path / "cache"
    port = _free_port()
    multi = tmp_path / "multi"
    _run_processes([
        _train(["--out", str(multi), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i)], 2, cache)
        for i in range(2)
    ])
    _run_processes([_train(["--out", str(tmp_path / "four")], 4, cache)])
    _run_processes([_train(["--out", str(tmp_path / "one"), "--set", "train.num_devices=1"], 1, cache)])

    # Same global batch, same data order, gradients summed over all 4 devices in both
    # layouts: val_loss agrees to 1e-5 (float32 reduction order only).
    two_by_two, one_by_four, one_by_one = (_summary(tmp_path / r)["val_loss"] for r in ("multi", "four", "one"))
    assert two_by_two == pytest.approx(one_by_four, rel=1e-5, abs=1e-5)
    assert two_by_two == pytest.approx(one_by_one, rel=1e-5, abs=1e-5)
    # Only process 0 wrote metrics: one line per log/eval point (steps 2, 3, 4, 6), not two.
    assert [json.loads(l)["step"] for l in (multi / "metrics.jsonl").read_text().splitlines()] == [2, 3, 4, 6]

    # A checkpoint written by 2 processes resumes in 1 process.
    resume = [sys.executable, "train.py", "--resume", str(multi), "--set", "train.max_steps=8"]
    _run_processes([(resume, _env(1))])
    assert _summary(multi)["step"] == 8


PEER_TIMEOUT = 10  # seconds; the bound below is this plus start-up slack
DEAD_PEER = ("process 1 of 2 sent no heartbeat", "a computation across processes failed")


def _records(run):
    """step -> record, the last one of each step winning (a resumed run repeats some)."""
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_a_killed_process_stops_the_other_in_bounded_time_and_both_resume_exactly(tmp_path):
    """SIGKILL process 1 mid-training: process 0 exits 2 with one clear line within
    PEER_TIMEOUT (+ slack) instead of hanging in a collective; --resume on both processes then
    ends with exactly the losses of an uninterrupted 2-process run."""
    import signal
    import time

    cache = tmp_path / "cache"
    extra = ["--set", "train.max_steps=24", "--set", "train.checkpoint_interval=4", "--set", "train.log_interval=1",
             "--set", "train.eval_interval=1000", "--peer-timeout", str(PEER_TIMEOUT)]

    def pair(run, *args):
        port = _free_port()
        commands = [_train(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                            *args], 2, cache) for i in range(2)]
        return [(cmd + extra, env) for cmd, env in commands]  # after TINY's --set items, so they win

    _run_processes(pair(tmp_path / "straight", "--out", str(tmp_path / "straight")))
    run = tmp_path / "killed"
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in pair(run, "--out", str(run))]
    try:
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                               and len((run / "metrics.jsonl").read_text().splitlines()) >= 9):
            if procs[0].poll() is not None or procs[1].poll() is not None:
                outs = [p.communicate(timeout=60)[0] if p.poll() is not None else "" for p in procs]
                raise AssertionError(f"a process ended before the kill: {[o[-1500:] for o in outs]}")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        out, _ = procs[0].communicate(timeout=PEER_TIMEOUT + 60)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    # Either the watchdog (blocked in a collective: PEER_TIMEOUT + 1 s measured) or the
    # collective itself (gloo saw the connection reset: at once) says it.
    assert len(errors) == 1 and any(m in errors[0] for m in DEAD_PEER) and "--resume" in errors[0], out[-2000:]
    assert waited < PEER_TIMEOUT + 15, waited

    _run_processes(pair(run, "--resume", str(run)))
    straight, resumed = _records(tmp_path / "straight"), _records(run)
    assert sorted(resumed) == sorted(straight) == list(range(1, 25))
    assert [resumed[s]["train_loss"] for s in range(9, 25)] == [straight[s]["train_loss"] for s in range(9, 25)]
    assert _summary(run)["val_loss"] == _summary(tmp_path / "straight")["val_loss"]


@pytest.mark.slow
def test_two_processes_with_a_sharded_mesh_match_one_process(tmp_path):
    """fsdp=8 over 2 processes x 4 devices (each process writes its own shards of the
    checkpoints) == fsdp=8 over 1 process x 8 devices, and the 2-process run resumes in 1."""
    cache = tmp_path / "cache"
    port = _free_port()
    fsdp = ["--set", "mesh.fsdp=8", "--set", "model.n_embd=64", "--set", "model.n_head=4"]  # c_fc [64, 256]: sharded
    _run_processes([
        _train(["--out", str(tmp_path / "multi"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), *fsdp], 4, cache)
        for i in range(2)
    ])
    _run_processes([_train(["--out", str(tmp_path / "single"), *fsdp], 8, cache)])
    losses = {r: [json.loads(line)["train_loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("multi", "single")}
    assert losses["multi"] == pytest.approx(losses["single"], rel=1e-5)
    assert _summary(tmp_path / "multi")["val_loss"] == pytest.approx(_summary(tmp_path / "single")["val_loss"], rel=1e-5)
    resume = [sys.executable, "train.py", "--resume", str(tmp_path / "multi"), "--set", "train.max_steps=8"]
    _run_processes([(resume, _env(8))])
    assert _summary(tmp_path / "multi")["step"] == 8


# ---------------------------------------------------------------------------------------
# Preemption: SIGTERM to one process stops every process at one step (issue 29)

PREEMPT = ["--set", "train.max_steps=16", "--set", "train.eval_interval=8", "--set", "train.log_interval=2"]


def _wait_for_records(run, procs, n):
    import time

    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                           and len((run / "metrics.jsonl").read_text().splitlines()) >= n):
        if any(p.poll() is not None for p in procs):
            outs = [p.communicate(timeout=60)[0] if p.poll() is not None else "" for p in procs]
            raise AssertionError(f"a process ended early: {[o[-1500:] for o in outs]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight_16(tmp_path_factory):
    """16 steps on 1 process x 4 devices, uninterrupted."""
    tmp = tmp_path_factory.mktemp("preempt")
    cmd, env = _train(["--out", str(tmp / "straight")], 4, tmp / "cache")
    _run_processes([(cmd + PREEMPT, env)])  # after TINY's --set items, so they win
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pmap", "fsdp"])
def test_sigterm_to_one_process_saves_one_step_on_every_process(straight_16, tmp_path, layout):
    """SIGTERM to process 1 of 2 (2 devices each): both finish the same step, save it, exit
    143; process 0 says so in one line; --resume on 1 process x 4 devices ends where an
    uninterrupted 16-step run ends."""
    import signal

    mesh = ["--set", "mesh.fsdp=4"] if layout == "fsdp" else []
    run, port = tmp_path / "run", _free_port()
    commands = [_train(["--out", str(run), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i)], 2, straight_16 / "cache") for i in range(2)]
    procs = [subprocess.Popen(cmd + PREEMPT + mesh, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in commands]
    try:
        _wait_for_records(run, procs, 2)  # step 4 logged
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [o[-1500:] for o in outs]
    said = [line for line in outs[0].splitlines() if line.startswith("preempted")]
    assert len(said) == 1 and said[0].startswith("preempted (SIGTERM to process 1): every process saved a "
                                                 "checkpoint at step "), outs[0][-1500:]
    step = int(said[0].split("at step ")[1].split(";")[0])
    from jaxgpt.io import checkpoint

    assert 4 <= step < 16 and checkpoint.latest_step(run) == step
    assert not any(line.startswith(("error", "Traceback")) for out in outs for line in out.splitlines()), outs
    assert not (run / ".lock").exists()

    _run_processes([([sys.executable, "train.py", "--resume", str(run)], _env(4))])
    resumed, straight = _summary(run), _summary(straight_16 / "straight")
    assert resumed["step"] == 16
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_killed_process_under_a_mesh_stops_the_other_with_one_line(tmp_path):
    """SIGKILL process 1 of an fsdp=4 mesh over 2 processes: process 0 exits 2 with one line
    within --peer-timeout, whatever it was blocked in (not JAX's abort, exit 134, after its
    heartbeat timeout)."""
    import signal
    import time

    run, port = tmp_path / "run", _free_port()
    extra = ["--set", "train.max_steps=400", "--set", "train.log_interval=1", "--set", "train.eval_interval=1000",
             "--set", "mesh.fsdp=4", "--peer-timeout", str(PEER_TIMEOUT)]
    commands = [_train(["--out", str(run), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i)], 2, tmp_path / "cache") for i in range(2)]
    procs = [subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in commands]
    try:
        _wait_for_records(run, procs, 4)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        out, _ = procs[0].communicate(timeout=PEER_TIMEOUT + 60)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and any(m in errors[0] for m in DEAD_PEER) and "--resume" in errors[0], out[-2000:]
    assert "Traceback" not in out and "Check failure" not in out, out[-2000:]
    assert waited < PEER_TIMEOUT + 15, waited
    assert not (run / ".lock").exists()
