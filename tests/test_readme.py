"""Every Python block of the README runs as written (in order, one namespace), so the
research-use snippets stay true; `runs/mine`, which they read, is a tiny run made here."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_every_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    from jaxgpt.config import load_config
    from jaxgpt.tasks.pretrain import pretrain

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXGPT_CACHE", str(tmp_path / "cache"))  # token files of the blocks' corpora
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32", "train.max_steps=2",
            "train.eval_interval=2", "train.batch_size=4", "train.sample_tokens=0", f"data.cache_dir={tmp_path}"]
    pretrain(load_config(None, tiny), "runs/mine")
    blocks = python_blocks()
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    assert "Every effort moves you" not in capsys.readouterr().err
