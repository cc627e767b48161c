"""Peak host memory of creating a run's train state (params + AdamW moments) on a mesh.

    python benchmarks/init_memory.py --preset gpt2-1558m --fsdp 8 --init sharded
    python benchmarks/init_memory.py --preset gpt2-774m --fsdp 8 --init whole

`sharded` is what the engine does (`MeshParallel.initialise`: one jitted init whose outputs
land in their shardings, the moments made beside each shard); `whole` is what it did before
(the params initialised whole on one device, the moments beside them, then copied into the
mesh), kept here as the comparison. With fake CPU devices every device's memory is this
process's, so the peak RSS (`ru_maxrss`) is the host memory the state cost. Each mode runs in
a process of its own (a fresh peak); prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def measure(preset: str, fsdp: int, init: str) -> dict:
    import resource

    import jax

    from jaxgpt.config import ModelConfig, PRESETS, TrainConfig
    from jaxgpt.models import count_params, init_params
    from jaxgpt.parallel import MeshParallel
    from jaxgpt.train.optim import make_optimizer
    from jaxgpt.train.steps import create_train_state

    cfg = ModelConfig(**PRESETS[preset], dropout=0.0)
    layout = MeshParallel(1, fsdp, 1, devices=tuple(jax.devices()[:fsdp]), model=cfg)
    tx = make_optimizer(TrainConfig())
    key = jax.random.key(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if init == "sharded":
        params = layout.initialise(lambda k: init_params(cfg, k), key, jit=True)
    else:  # the old path: whole on device 0, then placed
        params = init_params(cfg, key)
    state = layout.replicate(create_train_state(params, tx))
    jax.block_until_ready(state)
    del params
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    n = count_params(state.params)
    per_device = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
                     for s in leaf.addressable_shards if s.device == jax.devices()[0])
    return {"preset": preset, "fsdp": fsdp, "init": init, "params": n, "state_gib": 12 * n / 2**30,
            "peak_rss_gib": peak / 2**20, "rss_before_gib": before / 2**20, "device0_state_gib": per_device / 2**30}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-1558m")
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--init", default="sharded,whole", help="sharded, whole, or both (comma-separated)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.fsdp, args.init)))
        return 0
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.fsdp}", "JAX_PLATFORMS": "cpu"}
    for init in args.init.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--fsdp", str(args.fsdp),
                               "--init", init], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        if done.returncode:
            print(json.dumps({"preset": args.preset, "fsdp": args.fsdp, "init": init, "failed": done.returncode,
                              "stderr": done.stderr.strip().splitlines()[-1:] or ""}))
        else:
            print(done.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
