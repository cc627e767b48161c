"""The PyTorch side of benchmarks/train_throughput.py: the book's models (`llms-from-scratch`,
`pip install --no-deps llms-from-scratch`) as training references, and a torch fp32 matmul rate.

Variants (the `--frameworks` names), all on the book's GPT_CONFIG_124M-style dict built by
`torch_gpt_config` (untied head, no qkv bias, dropout 0.0 like the jaxgpt side):

* `torch`: `llms_from_scratch.ch04.GPTModel`, eager (the book's own MultiHeadAttention with a
  materialised causal mask, its LayerNorm and tanh-GELU modules);
* `torch-sdpa`: `llms_from_scratch.ch04.GPTModelFast` (same parameters, fused qkv Linear,
  `F.scaled_dot_product_attention(is_causal=True)`, `nn.LayerNorm`, `nn.GELU("tanh")`), eager;
* `torch-compile`: `torch.compile(GPTModel)` (inductor, default mode). Compilation happens in
  the first steps, which the benchmark's `--warmup` discards.

The optimiser step (AdamW, matrices decayed, global-norm clip 1.0) is eager in every variant.
"""
from __future__ import annotations

import statistics
import time

TORCH_VARIANTS = {"torch": "llms-from-scratch GPTModel (eager)",
                  "torch-sdpa": "llms-from-scratch GPTModelFast (SDPA, eager)",
                  "torch-compile": "torch.compile(GPTModel)"}


def torch_gpt_config(cfg) -> dict:
    """The book's GPT_CONFIG_124M-style dict for a jaxgpt ModelConfig."""
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "emb_dim": cfg.n_embd,
        "n_heads": cfg.n_head,
        "n_layers": cfg.n_layer,
        "drop_rate": cfg.dropout,
        "qkv_bias": False,
    }


def build_model(variant: str, cfg):
    """(module to train, module to call) for a variant; the two differ for torch-compile."""
    import torch
    from llms_from_scratch.ch04 import GPTModel, GPTModelFast

    book_cfg = torch_gpt_config(cfg)
    if variant == "torch-sdpa":
        model = GPTModelFast(book_cfg)
        return model, model
    model = GPTModel(book_cfg)
    if variant == "torch-compile":
        return model, torch.compile(model)
    return model, model


class TorchRunner:
    def __init__(self, case, device: str, seed: int = 0, adamw: str = "default", *, variant: str = "torch",
                 lr: float, weight_decay: float, betas: tuple[float, float], grad_clip: float):
        import numpy as np
        import torch
        import torch.nn.functional as F

        self.torch, self.F, self.device, self.grad_clip = torch, F, device, grad_clip
        torch.manual_seed(seed)
        model, self.call = build_model(variant, case.model_cfg)
        self.model = model.to(device)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        params = list(self.model.parameters())
        # Decay matrices only, as jaxgpt.train.optim does (biases, LayerNorm scale/shift undecayed).
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, **impl)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, case.model_cfg.vocab_size, (case.batch, case.seq + 1), dtype=np.int64)
        t = torch.from_numpy(tokens).to(device)
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.autocast = case.precision == "bf16"
        self.last_loss = None

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def step(self) -> float:
        torch, F = self.torch, self.F
        self._sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.call(self.inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self._sync()
        dt = time.perf_counter() - t0
        self.last_loss = loss.detach()
        return dt

    def loss(self) -> float:
        return float(self.last_loss)


def torch_matmul_flops(n: int = 2048, reps: int = 7, device: str = "cpu") -> float:
    """Measured fp32 FLOP/s of an `n x n @ n x n` torch matmul: 2 n^3 / median time."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for i in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)
