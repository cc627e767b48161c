"""Verified downloads: a file reaches its destination only once its size and hash match.

`fetch_verified(url, dest, expected)` streams `url` into a temporary beside `dest` (`.NAME.tmp-PID`:
one per process, so the hosts of a multi-host run fetching the same file at once do not write
into each other's) while hashing it, checks
the byte count and the hash (sha256, or git's blob sha1, which is how the Hugging Face hub
names files kept outside LFS), and only then renames it to `dest`. A file cut short (with or
without a Content-Length) or one whose bytes differ is deleted and fetched once more, with a
one-line warning; a second failure raises `VerificationError`. Network failures propagate
as `OSError` / `urllib.error.URLError` for the caller to explain.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from jaxgpt.io.files import temporary_for

CHUNK = 1 << 20


class VerificationError(Exception):
    """The file did not match what it must be, twice."""


@dataclass(frozen=True)
class Expected:
    """What a file must be: its size, and its sha256 or its git blob sha1 (hex)."""

    size: int
    sha256: str = ""
    git_sha1: str = ""

    def __post_init__(self):
        if not (self.sha256 or self.git_sha1):
            raise ValueError("Expected needs a sha256 or a git blob sha1")


def git_blob_sha1(data: bytes) -> str:
    """git's object id of a file: sha1 of `blob <size>\\0` + its bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_matches(path: Path, expected: Expected) -> str | None:
    """None if the file at `path` is what `expected` says, else what is wrong."""
    size = path.stat().st_size
    if size != expected.size:
        return f"is {size:,} of {expected.size:,} bytes"
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            if expected.git_sha1:
                sha1.update(chunk)
    return _hash_problem(sha256.hexdigest(), sha1.hexdigest(), expected)


def _hash_problem(sha256: str, sha1: str, expected: Expected) -> str | None:
    if expected.sha256 and sha256 != expected.sha256.lower():
        return f"does not match its sha256 (got {sha256[:12]}, expected {expected.sha256[:12]})"
    if not expected.sha256 and sha1 != expected.git_sha1.lower():
        return f"does not match its git hash (got {sha1[:12]}, expected {expected.git_sha1[:12]})"
    return None


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds nothing (a download that failed before its first file)."""
    try:
        folder.rmdir()
    except OSError:  # not empty, or not there
        pass


def warn(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {msg}", file=sys.stderr)


def fetch_verified(url: str, dest: Path, expected: Expected, label: str = "", retries: int = 1,
                   headers: dict[str, str] | None = None) -> None:
    """Download `url` to `dest`, verified (see the module docstring); `headers`: e.g. an
    `Authorization` for gated hub repositories."""
    label = label or dest.name
    for attempt in range(retries + 1):
        problem = _fetch_once(url, dest, expected, label, headers or {})
        if problem is None:
            return
        if attempt < retries:
            warn(f"{label} {problem}; deleted it, downloading it again")
    raise VerificationError(f"{label} {problem} (twice)")


def _fetch_once(url: str, dest: Path, expected: Expected, label: str, headers: dict[str, str]) -> str | None:
    """One attempt: None when `dest` is now in place and verified, else the problem."""
    from tqdm import tqdm

    part = temporary_for(dest)
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % expected.size)
    done = 0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response, \
                open(part, "wb") as f, \
                tqdm(total=expected.size, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    sha256.update(chunk)
                    if expected.git_sha1:
                        sha1.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                    if done > expected.size:
                        break
            except http.client.IncompleteRead:  # the server closed before its Content-Length
                pass
        if done != expected.size:
            return f"was {'cut short' if done < expected.size else 'too long'} ({done:,} of {expected.size:,} bytes)"
        problem = _hash_problem(sha256.hexdigest(), sha1.hexdigest(), expected)
        if problem is None:
            os.replace(part, dest)
        return problem
    finally:
        part.unlink(missing_ok=True)
