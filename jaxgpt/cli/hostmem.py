"""Huge pages for the host's large buffers: what the entry points set before any work.

XLA:CPU takes each step's large temporaries (the LM head's `[1024, 50257]` float32 logits
are ~200 MB) from malloc, and glibc maps every allocation over 32 MB afresh from the kernel,
so each step page-faults them in again, 4 KiB at a time. That costs more than the arithmetic
on them: an elementwise add on `[1024, 50257]` takes 82 ms with 4 KiB pages and 18.5 ms with
2 MiB transparent huge pages (AMD EPYC, 2 cores), and the small config's training step
0.91 s -> 0.70 s. glibc uses huge pages only when `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` is
in the environment when the process starts, so `train.py` and `finetune.py` re-execute
themselves once with it (`reexec_with_huge_pages`). `JAXGPT_HUGE_PAGES=0` turns this off.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(environ: dict, thp_mode: str, libc: str) -> dict | None:
    """The environment to re-execute with, or None when there is nothing to change: turned
    off (`JAXGPT_HUGE_PAGES=0`), already set, not glibc, or a kernel whose transparent huge
    pages are not `[madvise]` (`[always]` gives them without asking, `[never]` not at all)."""
    if environ.get("JAXGPT_HUGE_PAGES", "1") == "0" or libc != "glibc" or "[madvise]" not in thp_mode:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with `huge_pages_env` (same pid, open files
    and arguments); returns without doing anything when that is None. Call it first thing
    in a `__main__` block, never from library code or a test process."""
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return
    env = huge_pages_env(dict(os.environ), mode, platform.libc_ver()[0])
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
