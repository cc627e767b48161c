"""What the task tests share: `finetune.py` run in this process, the check that a command
with bad input is refused the way every entry point refuses it (exit 2, one line, no output),
and a file whose disk fills up mid-write."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def run_finetune(argv) -> int:
    """`python finetune.py ARGV` in this process (paths may be `Path`s): its exit code."""
    import finetune

    return finetune.main([str(a) for a in argv])


def init_sets(sets: list[str]) -> list[str]:
    """`sets` less the model keys an `--init` checkpoint gives (its shape), which `--init` refuses."""
    from jaxgpt.config import INIT_KEPT

    return [s for s in sets if not s.startswith("model.") or s.split("=")[0].removeprefix("model.") in INIT_KEPT]


def assert_refused(run, argv, capsys, message: str, out: Path | None = None) -> None:
    """`run(argv)` exits 2 with one line on stderr that contains `message`, and leaves no `out`."""
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if out is not None:
        assert not Path(out).exists(), f"{out} was written"


class HalfWrite:
    """An open file whose next `write` puts down half of its data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        self.f.flush()
