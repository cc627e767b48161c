#!/usr/bin/env python
"""Where a training step's time goes: XLA's per-op profile of jaxgpt's step beside torch's
profiler on the book's `GPTModel`, the same step as `benchmarks/train_throughput.py`.

jaxgpt: one warm step under `jax.profiler.trace`; the trace's XLA:CPU thunk events (each
named after an HLO instruction of the compiled step) get their *exclusive* time (nested
events, e.g. a `while` loop's body, are not counted twice) and are attributed through the
instruction's `op_name` metadata (Flax module path, `transpose(...)` for the backward pass)
to a component (qkv matmul, attention core, layer norm, MLP, LM head + loss, AdamW, ...).
torch: one warm step under `torch.profiler.profile`, the phases wrapped in
`record_function` (forward, loss, backward, clip, optimizer); every aten op's self time is
summed per phase and per kind (matmul: mm/addmm/bmm; everything else by op name).

Times are summed over the threads that ran them (2 cores: up to twice the wall time), so
read the shares, not the absolute sums. One profiled step after `--warmup` steps.

    python benchmarks/profile_step.py --config 124m --json profile.json
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (substring of the op_name metadata, component); first match wins, in this order.
JAX_COMPONENTS = [
    ("/attn/c_attn", "attn: qkv matmul (c_attn)"),
    ("/attn/c_proj", "attn: output matmul (c_proj)"),
    ("/attn/", "attn: scores, softmax, weighted sum"),
    ("/mlp/c_fc", "mlp: c_fc matmul + bias"),
    ("/mlp/c_proj", "mlp: c_proj matmul + bias"),
    ("/mlp/", "mlp: GELU"),
    ("/ln_", "layer norms"),
    ("/wte", "embeddings"),
    ("/wpe", "embeddings"),
    ("jvp()", "LM head + cross-entropy (fused)"),
]
TORCH_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
PHASES = ("forward", "loss", "backward", "clip", "optimizer")


def jax_component(op_name: str, opcode: str) -> str:
    for key, comp in JAX_COMPONENTS:
        if key in op_name:
            return comp
    if "GPT" in op_name:
        return "model: other (residual adds, reshapes)"
    return "AdamW, clipping, grad accumulation"


def parse_hlo(text: str) -> dict[str, tuple[str, str, bool]]:
    """instruction name -> (op_name metadata, opcode, contains a dot) for every instruction
    of the optimised module, fused computations' dots folded into their fusion."""
    dots_in = set()  # fused computations with a dot inside
    current = None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if m and line.rstrip().endswith("{"):
            current = m.group(1)
        elif current and re.search(r"= \S+ dot\(|convolution\(", line):
            dots_in.add(current)
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%(\S+?)[,}\s]", line)
        has_dot = opcode in ("dot", "convolution") or bool(calls and calls.group(1) in dots_in)
        out[name] = (op.group(1) if op else "", opcode, has_dot)
    return out


def exclusive_times(events) -> dict[str, float]:
    """Event name -> summed exclusive ns on one trace line (nested events subtracted)."""
    evs = sorted(((e.start_ns, e.end_ns, e.name) for e in events), key=lambda t: (t[0], -t[1]))
    excl: dict[str, float] = collections.Counter()
    stack: list[tuple[float, str]] = []  # (end, name) of the enclosing events
    for start, end, name in evs:
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            excl[stack[-1][1]] -= end - start
        excl[name] += end - start
        stack.append((end, name))
    return excl


def profile_jax(case, warmup: int) -> dict:
    import jax
    from jax.profiler import ProfileData
    from train_throughput import JaxRunner

    r = JaxRunner(case)
    for _ in range(warmup):
        r.step()
    instrs = parse_hlo(r.step_fn.lower(r.state, r.batch, r.key).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            wall = r.step()
        data = ProfileData.from_file(sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1])
    by_comp: dict[tuple[str, str], float] = collections.Counter()
    by_instr: dict[str, float] = collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for name, ns in exclusive_times(line.events).items():
                if name not in instrs:
                    continue  # executor bookkeeping (ThunkExecutor::Execute, listeners)
                op_name, opcode, has_dot = instrs[name]
                if opcode == "while":
                    continue  # its body's events are counted themselves
                phase = "backward" if "transpose(" in op_name else "forward"
                comp = jax_component(op_name, opcode)
                if comp.startswith("LM head") or comp.startswith("AdamW"):
                    phase = "-"
                kind = "matmul" if has_dot else "other"
                by_comp[(comp, phase, kind)] += ns / 1e6
                by_instr[f"{name} ({opcode}) {op_name[-70:]}"] += ns / 1e6
    return {"wall_s": wall, "loss": r.loss(), "components_ms": by_comp, "top_ms": by_instr}


def profile_torch(case, warmup: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch_refs import TorchRunner
    from train_throughput import BETAS, GRAD_CLIP, LR, WEIGHT_DECAY

    r = TorchRunner(case, "cpu", 0, variant="torch", lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                    grad_clip=GRAD_CLIP)
    F = torch.nn.functional

    def step():
        r.opt.zero_grad(set_to_none=True)
        with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.autocast):
            logits = r.call(r.inputs)
        with record_function("loss"):
            loss = F.cross_entropy(logits.float().flatten(0, 1), r.targets.flatten())
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.grad_clip)
        with record_function("optimizer"):
            r.opt.step()
        return loss

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        loss = step()
        wall = time.perf_counter() - t0
    by_kind: dict[tuple[str, str], float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for ev in prof.events():
        if ev.name in PHASES or not ev.name.startswith("aten::"):
            continue
        parent, phase = ev.cpu_parent, "-"
        while parent is not None:
            if parent.name in PHASES:
                phase = parent.name
            parent = parent.cpu_parent
        kind = "matmul" if ev.name in TORCH_MATMULS else ev.name
        by_kind[(phase, "matmul" if kind == "matmul" else "other")] += ev.self_cpu_time_total / 1e3
        by_op[f"{phase}: {ev.name}"] += ev.self_cpu_time_total / 1e3
    return {"wall_s": wall, "loss": float(loss), "phases_ms": by_kind, "top_ms": by_op}


def table(rows: dict, total: float, head: str) -> list[str]:
    out = [head, "|---|---|---|"]
    for key, ms in sorted(rows.items(), key=lambda kv: -kv[1]):
        out.append(f"| {' / '.join(key) if isinstance(key, tuple) else key} | {ms:,.0f} | {100 * ms / total:.1f}% |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="124m", help="a config of train_throughput.py: tiny, small, 124m")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model.dtype of jaxgpt's step (bfloat16: attention auto, as train_throughput's --cpu-bf16); "
                   "torch's side runs under torch.autocast(bfloat16) then")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="rows of the top-op tables")
    p.add_argument("--json", help="write the tables to this path")
    args = p.parse_args(argv)

    from jaxgpt.config import load_config
    from train_throughput import CONFIGS, HEAD_TO_HEAD, Case

    if args.config not in CONFIGS:
        p.error(f"unknown config {args.config!r}; choose from {', '.join(CONFIGS)}")
    path, overrides, batch, seq = CONFIGS[args.config]
    bf16 = args.dtype == "bfloat16"
    extra = ["model.dtype=bfloat16", "model.attention=auto"] if bf16 else []
    cfg = load_config(path, [*overrides, *HEAD_TO_HEAD, *extra]).model
    case = Case(args.config, "bf16" if bf16 else "fp32", batch, seq, cfg)
    fws = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    out, lines = {}, [f"config {args.config}: batch {batch} x seq {seq}, {args.dtype}, dropout 0", ""]
    if "jax" in fws:
        j = profile_jax(case, args.warmup)
        total = sum(j["components_ms"].values())
        lines += [f"jaxgpt: step wall {j['wall_s']:.3f} s under the profiler; op time summed over "
                  f"threads {total / 1e3:.3f} s", ""]
        comp = collections.Counter()
        for (c, phase, kind), ms in j["components_ms"].items():
            comp[(c, phase)] += ms
        lines += table(comp, total, "| component / pass | ms | share |") + [""]
        kinds = collections.Counter()
        for (_, _, kind), ms in j["components_ms"].items():
            kinds[kind] += ms
        lines += table(kinds, total, "| kind | ms | share |") + [""]
        lines += table(dict(j["top_ms"].most_common(args.top)), total, "| top HLO instructions | ms | share |") + [""]
        out["jax"] = {"wall_s": j["wall_s"], "op_ms": total,
                      "components_ms": {" / ".join(k): v for k, v in j["components_ms"].items()},
                      "top_ms": dict(j["top_ms"].most_common(50))}
    if any(f.startswith("torch") for f in fws):
        import torch

        torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
        t = profile_torch(case, args.warmup)
        total = sum(t["phases_ms"].values())
        lines += [f"torch GPTModel (eager): step wall {t['wall_s']:.3f} s under the profiler; aten self "
                  f"time {total / 1e3:.3f} s", ""]
        lines += table(t["phases_ms"], total, "| phase / kind | ms | share |") + [""]
        lines += table(dict(t["top_ms"].most_common(args.top)), total, "| top aten ops | ms | share |") + [""]
        out["torch"] = {"wall_s": t["wall_s"], "op_ms": total,
                        "phases_ms": {" / ".join(k): v for k, v in t["phases_ms"].items()},
                        "top_ms": dict(t["top_ms"].most_common(50))}
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from jaxgpt.cli.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # as train.py does (JAXGPT_HUGE_PAGES=0: 4 KiB pages)
    sys.exit(main())
