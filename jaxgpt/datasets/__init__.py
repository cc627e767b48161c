"""Data files bundled with the package, so the project trains and tests with no network.

Each file is named in `BUNDLED`; its source and licence are in `LICENSES.md` next to it.
Adding a data set is one registry line plus the file (and its row in LICENSES.md):

    "sms-spam": Bundled("SMSSpamCollection", kind="tsv", sha256="..."),

`kind == "text"` marks a plain-text pretraining corpus: only those are valid values of
`data.path` (see `jaxgpt.data.tokens`). Other kinds are read by the tasks that use them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from jaxgpt.errors import UserError

DATA_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bundled:
    """One bundled file: its name in this folder, what it holds, and its sha256."""

    file: str
    kind: str = "text"  # text (pretraining corpus) | tsv | json | jsonl | ...
    sha256: str = ""  # checked by tests/test_data.py; "" skips the check
    description: str = ""


BUNDLED: dict[str, Bundled] = {
    "the-verdict": Bundled(
        "the-verdict.txt",
        sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        description='"The Verdict", Edith Wharton (1908), 20,479 bytes, 5,145 GPT-2 tokens',
    ),
}


def bundled_names(kind: str | None = None) -> list[str]:
    """Registered names, optionally only those of one kind (e.g. "text")."""
    return sorted(n for n, b in BUNDLED.items() if kind is None or b.kind == kind)


def bundled_path(name: str) -> Path:
    """Path of bundled data set `name`; UserError for an unknown name or a missing file."""
    entry = BUNDLED.get(name)
    if entry is None:
        raise UserError(f"unknown bundled data set {name!r}; bundled: {', '.join(bundled_names())}")
    path = DATA_DIR / entry.file
    if not path.is_file():
        raise UserError(f"bundled data file {path} is missing; reinstall jaxgpt")
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
