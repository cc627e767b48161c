"""Downloading a Hugging Face hub repository (`--init Qwen/Qwen3-0.6B`) into the verified cache.

    folder = download_repo("Qwen/Qwen3-0.6B")     # $JAXGPT_CACHE/hf/Qwen--Qwen3-0.6B

The hub's metadata API (`/api/models/REPO/revision/main?blobs=true`) names the commit and,
for every file, its size and hash (the LFS sha256, else the git blob id). The files a model
needs are fetched from that commit with `jaxgpt.io.download.fetch_verified` (a file enters the
cache only once its size and hash match): config.json, the weights (`model.safetensors`, or
the index and every shard it lists), the tokenizer (`tokenizer.json`, `tokenizer_config.json`,
a `chat_template.jinja` when there is one; a GPT-2 repository may lack them, its tokenizer is
built in) and `generation_config.json` when present; of a PEFT LoRA adapter's repository, its
adapter_config.json and adapter_model.safetensors (its base is then resolved as `--init`). What was
verified is recorded beside the folder (`NAME.verified.json`), so later runs check sizes only,
offline. `$HF_TOKEN` is sent as a bearer token (Llama's repositories are gated);
`$JAXGPT_HF_ENDPOINT` replaces https://huggingface.co. Offline, or on any failure, one line
says which files to put where by hand.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from jaxgpt.errors import UserError
from jaxgpt.io.download import Expected, VerificationError, fetch_verified, remove_if_empty
from jaxgpt.io.files import DiskFull, atomic_write, disk_full_as

NEEDED = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"
ADAPTER = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT LoRA adapter's repository
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # organisation/name on the hub


def hub_endpoint() -> str:
    return os.environ.get("JAXGPT_HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def auth_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def cache_root() -> Path:
    """`$JAXGPT_CACHE` or `~/.cache/jaxgpt`; models live under `hf/NAME` in it, data sets under
    `hf/datasets/NAME`."""
    return Path(os.environ.get("JAXGPT_CACHE") or "~/.cache/jaxgpt").expanduser()


def repo_dir(repo: str) -> Path:
    return cache_root() / "hf" / repo.replace("/", "--")


def get_json(url: str):
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers()), timeout=60) as response:
        return json.loads(response.read(64 << 20).decode())


def expected_of(entry: dict) -> Expected:
    lfs = entry.get("lfs") or {}
    if lfs.get("sha256"):
        return Expected(int(lfs.get("size", entry.get("size"))), sha256=lfs["sha256"])
    if entry.get("blobId") and entry.get("size") is not None:
        return Expected(int(entry["size"]), git_sha1=entry["blobId"])
    raise VerificationError(f"the hub gives no size and hash for {entry.get('rfilename')}")


def _files(info: dict, repo: str, base: str, commit: str, target: Path, fetched: set[str]) -> dict[str, Expected]:
    """The files to fetch (name -> what it must be): needed, optional, and the weights. Those it
    had to read to decide (the shard index, a GPT-2 config.json) are fetched here, into `fetched`."""
    siblings = {s.get("rfilename"): s for s in info.get("siblings", []) if isinstance(s, dict)}
    present = [f for f in (*NEEDED, *OPTIONAL) if f in siblings]
    if "model.safetensors" not in siblings and INDEX not in siblings and all(f in siblings for f in ADAPTER):
        return {f: expected_of(siblings[f]) for f in (*ADAPTER, *present)}  # a PEFT adapter: its base comes next
    if "model.safetensors" in siblings:
        weights = ["model.safetensors"]
    elif INDEX in siblings:
        fetch_verified(f"{base}/{repo}/resolve/{commit}/{INDEX}", target / INDEX, expected_of(siblings[INDEX]),
                       label=f"{INDEX} of {repo}", headers=auth_headers())
        fetched.add(INDEX)
        weights = [INDEX, *dict.fromkeys(json.loads((target / INDEX).read_text())["weight_map"].values())]
    else:
        raise VerificationError(f"{repo} has no model.safetensors (nor {INDEX})")
    needed = NEEDED
    if "tokenizer.json" not in siblings and "config.json" in siblings:
        fetched.add("config.json")
        if _is_gpt2(siblings, repo, base, commit, target):
            needed = ("config.json",)  # GPT-2's tokenizer is built in (tiktoken): its repos may lack tokenizer.json
    missing = [f for f in (*needed, *weights) if f not in siblings]
    if missing:
        raise VerificationError(f"{repo} lacks {', '.join(missing)}")
    return {f: expected_of(siblings[f]) for f in dict.fromkeys((*needed, *weights, *present))}


def _is_gpt2(siblings: dict, repo: str, base: str, commit: str, target: Path) -> bool:
    """config.json (fetched and verified now) says `model_type: gpt2`."""
    path = target / "config.json"
    fetch_verified(f"{base}/{repo}/resolve/{commit}/config.json", path, expected_of(siblings["config.json"]),
                   label=f"config.json of {repo}", headers=auth_headers())
    try:
        return json.loads(path.read_text()).get("model_type", "gpt2") == "gpt2"
    except (ValueError, AttributeError):
        return False  # the loader says what is wrong with it


def is_recorded(target: Path) -> bool:
    """The folder holds every file a previous download verified, at its recorded size."""
    try:
        record = json.loads(target.with_name(target.name + ".verified.json").read_text())
    except (OSError, ValueError):
        return False
    files = record.get("files", {})
    return bool(files) and all((target / f).is_file() and (target / f).stat().st_size == e["size"]
                               for f, e in files.items())


def download_repo(repo: str, revision: str = "main") -> Path:
    """The local folder of hub repository `repo` (`ORG/NAME`), downloading what is missing."""
    target = repo_dir(repo)
    if is_recorded(target):
        return target
    base, page = hub_endpoint(), f"https://huggingface.co/{repo}"
    try:
        return _download(repo, revision, target, base, page)
    except UserError:
        remove_if_empty(target)  # a failed first try leaves no empty folder in the cache
        raise


@contextlib.contextmanager
def explained_failures(repo: str, page: str, offline: str, target: Path):
    """A failed download of `repo` into `target` as one line: gated (set HF_TOKEN), not found, a
    file that did not verify, a full disk (`DiskFull`; the partial file is gone), or no network
    (`offline`: what to do by hand)."""
    try:
        with disk_full_as(f"the files of {repo}", target):
            yield
    except DiskFull as e:
        raise UserError(f"{e}; free space, or set $JAXGPT_CACHE to another disk") from None
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(f"{repo} is gated or private (HTTP {e.code}): accept its licence on {page} and set "
                            "HF_TOKEN to a token that may read it") from None
        raise UserError(f"cannot download {repo}: HTTP {e.code} from the hub; check the name ({page})") from None
    except VerificationError as e:
        raise UserError(f"cannot download {repo}: {e}; check the connection (or $JAXGPT_HF_ENDPOINT) and try "
                        "again") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {repo} (offline?): {offline} [{reason}]") from None


def write_record(target: Path, repo: str, commit: str, files: dict[str, Expected]) -> None:
    """What was verified, beside `target` (`NAME.verified.json`), written atomically."""
    record = {"repo": repo, "revision": commit,
              "files": {f: {"size": e.size, "sha256": e.sha256, "git_sha1": e.git_sha1} for f, e in files.items()}}
    atomic_write(target.with_name(target.name + ".verified.json"), json.dumps(record, indent=1))


def _download(repo: str, revision: str, target: Path, base: str, page: str) -> Path:
    offline = (f"put config.json, the model*.safetensors weights (with {INDEX} if sharded), tokenizer.json and "
               f"tokenizer_config.json from {page} into a folder and pass --init FOLDER")
    with explained_failures(repo, page, offline, target):
        target.mkdir(parents=True, exist_ok=True)
        info = get_json(f"{base}/api/models/{repo}/revision/{revision}?blobs=true")
        commit = info.get("sha") or revision
        fetched: set[str] = set()
        files = _files(info, repo, base, commit, target, fetched)
        for name, expected in files.items():
            if name not in fetched:
                fetch_verified(f"{base}/{repo}/resolve/{commit}/{name}", target / name, expected,
                               label=f"{name} of {repo}", headers=auth_headers())
        write_record(target, repo, commit, files)
    return target


__all__ = ["REPO_ID", "auth_headers", "cache_root", "download_repo", "expected_of", "explained_failures", "get_json",
           "hub_endpoint", "is_recorded", "repo_dir", "write_record"]
