"""Run outputs: JSONL metrics, the summary JSON, loss plots, FLOP counts and MFU."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import jax

from jaxgpt.config import ModelConfig
from jaxgpt.io.files import DiskFull, atomic_write, disk_full_as, write_via_temporary


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` (flushed, so a crash keeps them)
    and, with `tensorboard_dir`, each number of the record as a TensorBoard scalar there
    (x axis: the record's `iteration`, else its `step`).

    `enabled=False` (every process but 0 in a multi-host run) makes it a no-op.
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        self._tensorboard = None
        self._tensorboard_dir = tensorboard_dir
        if enabled and tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # optional: checked by `check_tensorboard`

            self._tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, record: Mapping) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with disk_full_as("a metrics record", self.path), open(self.path, "ab") as f:
                f.write(line)
                f.flush()
        except DiskFull:  # no torn line: cut the file back to its last whole record
            try:
                os.truncate(self.path, size)
            except OSError:
                pass
            raise
        if self._tensorboard is not None:
            x = record.get("iteration", record.get("step", 0))
            with disk_full_as("TensorBoard scalars", self._tensorboard_dir):
                for key, value in record.items():
                    if key not in ("iteration", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tensorboard.add_scalar(key, value, x)
                self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def check_tensorboard() -> None:
    """`train.tensorboard=true` needs the optional tensorboardX: a one-line error, before
    anything is written, when it is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        from jaxgpt.errors import UserError

        raise UserError("train.tensorboard=true needs tensorboardX: pip install 'jaxgpt[tensorboard]' "
                        "(or pip install tensorboardX)")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def write_json(path: str | Path, data: Mapping) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a summary."""
    atomic_write(path, json.dumps({k: _plain(v) for k, v in data.items()}, indent=2) + "\n")


def plot_curves(
    path: str | Path,
    records: Iterable[Mapping],
    x: str,
    ys: Iterable[str],
    ylabel: str,
    xlabel: str | None = None,
) -> None:
    """Line plot of `ys` against `x` from metrics records (missing values skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for y in ys:
        pts = [(r[x], r[y]) for r in records if r.get(y) is not None and r.get(x) is not None]
        if pts:
            ax.plot(*zip(*pts), label=y, marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_via_temporary(path, lambda tmp: fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per token of `cfg`'s family (`jaxgpt.models.family.Family.flops_per_token`:
    6N + attention, N the blocks' matmul weights plus the LM head)."""
    from jaxgpt.models import family_of

    return family_of(cfg).flops_per_token(cfg, seq_len, training)


# Dense peak FLOP/s per device by `device_kind` substring: bf16 for accelerators (what MFU is
# quoted against). A CPU has no published figure: see `cpu_peak_flops`. JAXGPT_PEAK_FLOPS
# overrides either.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_device() -> float:
    if os.environ.get("JAXGPT_PEAK_FLOPS"):
        return float(os.environ["JAXGPT_PEAK_FLOPS"])
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    if device.platform == "cpu":
        return cpu_peak_flops() / max(jax.local_device_count(), 1)
    return float("nan")


def cpu_peak_flops() -> float:
    """Nominal fp32 peak of this CPU: cores x max(2.5 GHz, the clock /proc/cpuinfo reports) x
    FLOP/cycle, 64 with AVX-512 (two 16-wide FMA ports) else 32 (AVX2). Turbo clocks can
    beat it: an XLA 2048^2 matmul reached 455 GFLOP/s on a 2-core AMD EPYC (AVX-512,
    2.6 GHz) whose nominal peak here is 332 GFLOP/s, so CPU MFU is indicative only."""
    ghz, wide = 2.5, False
    try:
        info = open("/proc/cpuinfo").read()
        mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
        ghz = max([ghz] + [m / 1000 for m in mhz])
        wide = " avx512f" in info
    except (OSError, ValueError):
        pass
    return (os.cpu_count() or 1) * ghz * 1e9 * (64 if wide else 32)


def mfu(tokens_per_sec: float, cfg: ModelConfig, seq_len: int, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak."""
    peak = peak_flops_per_device() * num_devices
    return tokens_per_sec * flops_per_token(cfg, seq_len) / peak
