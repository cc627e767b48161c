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
    "sms-spam": Bundled(
        "SMSSpamCollection.tsv.gz",
        kind="tsv",
        sha256="54f1a7cc2b9a61635129defb042df692f0493b8fd80ffeaff87be4f57ee731ee",
        description="SMS Spam Collection v.1: 5,574 SMS, `label<TAB>text` (4,827 ham, 747 spam), gzipped",
    ),
    "instruction-data": Bundled(
        "instruction-data.json.gz",
        kind="json",
        sha256="cb432834464c32663b9ff90cf1cb5ad4b760bdc1742749547d845ab3279f99b0",
        description="1,100 Alpaca-style records {instruction, input, output}, a JSON array, gzipped",
    ),
    "preference-data": Bundled(
        "instruction-data-with-preference.json.gz",
        kind="json",
        sha256="32a5e96489e8ee4f6e24031026b153ff46b68c8bf0467a4acccd9d6f68bbdfa6",
        description="the same 1,100 records plus `chosen` and `rejected` responses, a JSON array, gzipped",
    ),
    "gsm8k-test": Bundled(
        "gsm8k-test.jsonl.gz",
        kind="jsonl",
        sha256="1affc2f095eb08c525d0504bce7f620740776bcd7d67a12c71901700cb7ab73a",
        description="GSM8K test split: 1,319 {question, answer} records, final answer after '#### ', gzipped",
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
