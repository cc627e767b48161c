"""Writing run files safely: whole or not at all, and a full disk said in one line.

    atomic_write(path, data)        text or bytes to a temporary beside `path`, then renamed
    write_via_temporary(path, fn)   `fn(tmp)` writes the file (savefig, np.savez), then renamed
    disk_full_as(what, path)        context: a full disk (ENOSPC, EDQUOT) becomes `DiskFull`
    is_disk_full(exc)               any exception whose chain says "no space" (Orbax and
                                    tensorstore report it as ValueError text, not OSError)

A failed write removes its temporary, so an error exit leaves no `*.tmp*` file behind.
Temporaries are named `.NAME.tmp-PID` (see `is_temporary`), which the run directory also
sweeps at start-up and after an error exit (a SIGKILL cannot clean up after itself).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from jaxgpt.errors import UserError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How tensorstore, Orbax and asyncio word the same two errors.
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='?(28|122)\b", re.I)
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")


class DiskFull(UserError):
    """A write that failed because the disk (or the user's quota) is full. `what` names the
    file's role ("checkpoint step 40", "metrics.jsonl"), `path` where it was written; the
    driver adds the newest intact checkpoint to the message."""

    def __init__(self, what: str, path: str | Path, reason: str = "no space left on device"):
        self.what, self.path, self.reason = what, Path(path), reason
        super().__init__(f"the disk is full: could not write {what} ({self.path}: {reason})")


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc` or anything in its `__cause__` / `__context__` chain is ENOSPC/EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_reason(exc: BaseException | None) -> str:
    """'disk quota exceeded' (EDQUOT) or 'no space left on device', from the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.EDQUOT) or re.search(
                r"quota exceeded|os_error_code='?122\b", str(exc), re.I):
            return "disk quota exceeded"
        exc = exc.__cause__ or exc.__context__
    return "no space left on device"


@contextlib.contextmanager
def disk_full_as(what: str, path: str | Path) -> Iterator[None]:
    """Within the block, a full disk raises `DiskFull(what, path)` (other errors pass)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(what, path, disk_full_reason(e)) from e
        raise


def temporary_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(name: str) -> bool:
    """A temporary of `atomic_write` / `write_via_temporary` (`.NAME.tmp-PID`)."""
    return bool(_TEMPORARY.match(name))


def write_via_temporary(path: str | Path, write: Callable[[Path], None], what: str | None = None) -> None:
    """`write(tmp)` then rename `tmp` to `path`, so readers see the old file or the whole
    new one; on any failure the temporary is removed, and a full disk is `DiskFull`."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        with disk_full_as(what or path.name, path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, data: str | bytes, what: str | None = None) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (`write_via_temporary`)."""
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()

    write_via_temporary(path, write, what)


__all__ = ["DiskFull", "atomic_write", "disk_full_as", "disk_full_reason", "is_disk_full", "is_temporary",
           "temporary_for", "write_via_temporary"]
