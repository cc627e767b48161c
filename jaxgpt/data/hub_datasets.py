"""`data.path: hf:ORG/NAME[@REV][:SUBSET][:SPLIT]`: a Hugging Face hub data set, downloaded once, read as files.

    folder = hub_split("hf:tatsu-lab/alpaca")        # the train split's files, in the cache
    folder = hub_split("hf:openai/gsm8k:main:test")  # subset (config) main, split test
    folder = hub_split("hf:ORG/NAME/data/*.parquet") # files of the repository, by a glob
    folder = hub_split("hf:ORG/NAME@v1.0:test")      # at a tag, branch or commit (default: main)

A spec names a data set repository and, optionally, a subset and a split. The split defaults to
`train` (or to the only split there is); one name after the repository is a subset if the README
names such a subset, else a split. Which files make a split follows the `datasets` library, so a
repository reads as the hub's viewer shows it:

1. the `configs:` block of the repository's README.md (each subset's `data_files` by split: globs);
2. else sharded names, `data/SPLIT-00000-of-00004*.*`;
3. else a folder name, then a file name, holding a split's keyword between non-word characters
   (train, training; validation, valid, val, dev; test, testing, eval, evaluation);
4. else every data file is the train split.

Data files are .parquet, .json, .jsonl, .csv, .tsv and .txt, each optionally gzipped. They are
fetched from the commit the hub names for the revision (`@REV`, default `main`) at the first
download, each checked against the size and hash the hub gives (`jaxgpt.io.download.fetch_verified`),
into `$JAXGPT_CACHE/hf/datasets/ORG--NAME/SUBSET/SPLIT/` (`.../@REV/SUBSET/SPLIT/` for another
revision) at their paths in the repository; `SPLIT.verified.json` beside it names the commit. That folder
is what the readers get (a folder of record shards, `jaxgpt.data.records`; a corpus folder,
`jaxgpt.data.tokens`); once verified it is read from there, offline. `$HF_TOKEN` and
`$JAXGPT_HF_ENDPOINT` work as for models (`jaxgpt.io.hub_repos`).
"""
from __future__ import annotations

import importlib.util
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from jaxgpt.errors import UserError
from jaxgpt.io.download import fetch_verified
from jaxgpt.io.files import atomic_write
from jaxgpt.io.hub_repos import (REPO_ID, auth_headers, cache_root, expected_of, explained_failures, get_json,
                                 hub_endpoint, is_recorded, write_record)

PREFIX = "hf:"
DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".tsv", ".txt")
KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
            "test": ("test", "testing", "eval", "evaluation")}
SEP = "[-._ 0-9]"  # what may stand beside a split keyword in a name (`datasets`' non-word characters)
SHARDED = re.compile(r"data/(?P<split>\w+)-\d{5}-of-\d{5}[^/]*\.[^/]+")
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSpec:
    repo: str
    names: tuple[str, ...] = ()  # what follows the repository: (), (subset or split,), (subset, split)
    files: str = ""  # a glob of paths in the repository, instead of a split
    revision: str = "main"  # a branch, tag or commit

    @property
    def page(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}"


def is_hub_spec(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def hub_hint(spec: str) -> str:
    """For a data.path that was not found: "; did you mean hf:SPEC?" when it reads as a hub id (not
    as a data file's path)."""
    repo = spec.strip().split(":")[0]
    return f"; did you mean hf:{spec.strip()}?" if REPO_ID.fullmatch(repo) and not is_data_file(repo) else ""


def parse_spec(spec: str) -> HubSpec:
    """`hf:ORG/NAME`, `hf:ORG/NAME:SPLIT`, `hf:ORG/NAME:SUBSET:SPLIT` or `hf:ORG/NAME/GLOB`, NAME
    optionally `NAME@REV`."""
    body = spec.strip()[len(PREFIX):]
    where, *names = body.split(":")
    parts = where.split("/")
    name, _, revision = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
    repo, files = f"{parts[0]}/{name}", "/".join(parts[2:])
    if (not REPO_ID.fullmatch(repo) or len(names) > 2 or not all(names) or (files and names)
            or (revision and not re.fullmatch(r"[\w.-]+", revision))):
        raise UserError(f"data.path {spec!r}: give hf:ORG/NAME, hf:ORG/NAME:SPLIT, hf:ORG/NAME:SUBSET:SPLIT or "
                        "hf:ORG/NAME/PATH (a file or glob in the repository), NAME optionally NAME@REV (a tag, "
                        "branch or commit)")
    return HubSpec(repo, tuple(names), files, revision or "main")


def glob_regex(pattern: str) -> re.Pattern:
    """A repository path glob as a regex: `*` and `?` within one folder, `**` across folders
    (`**/` also matches no folder), `[...]` a class of characters."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _matching(patterns: list[str], names: list[str]) -> list[str]:
    """The names a pattern matches; a pattern naming a folder matches the files below it."""
    regexes = [glob_regex(p.strip("/")) for p in patterns]
    return [n for n in names if any(r.fullmatch(n) or r.fullmatch(n.rsplit("/", 1)[0]) for r in regexes)]


def is_data_file(name: str) -> bool:
    lower = name.lower().removesuffix(".gz")
    return not name.rsplit("/", 1)[-1].startswith(".") and lower.endswith(DATA_SUFFIXES)


def _keyword(name: str, keywords: tuple[str, ...], where: str) -> bool:
    words = "|".join(keywords)
    if where == "folder":
        return any(re.fullmatch(f"(?:.*{SEP})?(?:{words})(?:{SEP}.*)?", d) for d in name.split("/")[:-1])
    return bool(re.fullmatch(f"(?:.*{SEP})?(?:{words}){SEP}.*", name.rsplit("/", 1)[-1]))


def splits_by_name(names: list[str]) -> dict[str, list[str]]:
    """split -> data files, from the files' names alone (steps 2-4 of the module docstring)."""
    sharded: dict[str, list[str]] = {}
    for n in names:
        if m := SHARDED.fullmatch(n):
            sharded.setdefault(m["split"], []).append(n)
    if sharded:
        return sharded
    for where in ("folder", "file"):
        found = {split: [n for n in names if _keyword(n, words, where)] for split, words in KEYWORDS.items()}
        if any(found.values()):
            return {split: files for split, files in found.items() if files}
    return {"train": list(names)}


def readme_subsets(readme: str) -> dict[str, dict[str, list[str]]]:
    """subset -> split -> path globs, from the `configs:` block of a data set card's YAML header;
    the default subset first ({} without such a block)."""
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", readme, re.S)
    try:
        meta = yaml.safe_load(m[1]) if m else {}
    except yaml.YAMLError:
        return {}
    subsets: dict[str, dict[str, list[str]]] = {}
    configs = meta.get("configs") if isinstance(meta, dict) else None
    for c in configs if isinstance(configs, list) else []:
        if not isinstance(c, dict):
            continue
        files = c.get("data_files")
        if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
            files = {"train": files}
        elif isinstance(files, list):
            files = {f.get("split", "train"): f.get("path") for f in files if isinstance(f, dict)}
        if not isinstance(files, dict):
            continue
        by_split = {str(k): [v] if isinstance(v, str) else [str(p) for p in v or []] for k, v in files.items()}
        name = str(c.get("config_name", "default"))
        if c.get("default") or name == "default":
            subsets = {name: by_split, **subsets}
        else:
            subsets[name] = by_split
    return subsets


def pick_files(spec: HubSpec, names: list[str], readme: str) -> tuple[str, str, list[str]]:
    """(subset, split, repository paths) that `spec` names among the repository's files."""
    data = [n for n in names if is_data_file(n)]
    if spec.files:
        return "files", _slug(spec.files), [n for n in _matching([spec.files], names) if is_data_file(n)]
    subsets = readme_subsets(readme)
    subset, split = spec.names if len(spec.names) == 2 else (None, None)
    if len(spec.names) == 1:
        (subset, split) = (spec.names[0], None) if spec.names[0] in subsets else (None, spec.names[0])
    if subset is not None and subset not in subsets:
        known = ", ".join(subsets) or "none: the repository's README names no configs"
        raise UserError(f"{spec.repo} has no subset {subset!r} (its subsets: {known})")
    subset = subset or next(iter(subsets), "default")
    splits = ({s: _matching(p, data) for s, p in subsets[subset].items()} if subsets else splits_by_name(data))
    splits = {s: f for s, f in splits.items() if f}
    if not splits:
        raise UserError(f"{spec.repo} has no data files jaxgpt reads ({', '.join(DATA_SUFFIXES)}, optionally .gz); "
                        f"see {spec.page}")
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
    if split not in splits:
        example = f"hf:{spec.repo}{'' if subset == 'default' else ':' + subset}:{next(iter(splits))}"
        raise UserError(f"{spec.repo} has no split {split!r} (its splits: {', '.join(splits)}); e.g. {example}")
    return subset, split, splits[split]


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "files"


def hub_split(spec: str) -> Path:
    """The local folder holding the data files `spec` names, downloading what is missing."""
    s = parse_spec(spec)
    root, key = _root(s), _key(s)
    resolved = _read_json(root / "specs.json")
    if key in resolved and is_recorded(root / resolved[key]):
        return root / resolved[key]
    for rel in resolved.values() if COMMIT.fullmatch(s.revision) else ():  # that commit, fetched by another spec
        where = root / rel
        if (_commit_of(where) == s.revision and is_recorded(where)
                and rel.split("/")[-2:] == (["files", _slug(s.files)] if s.files else list(s.names[-2:]))):
            return where
    base = hub_endpoint()
    offline = f"download the data files from {s.page} and give their folder as data.path"
    with explained_failures(s.repo, s.page, offline, root):
        info = get_json(f"{base}/api/datasets/{s.repo}/revision/{s.revision}?blobs=true")
        commit = info.get("sha") or s.revision
        siblings = {e["rfilename"]: e for e in info.get("siblings", []) if isinstance(e, dict) and "rfilename" in e}
        readme = ""
        if "README.md" in siblings and not s.files:
            request = urllib.request.Request(f"{base}/datasets/{s.repo}/resolve/{commit}/README.md",
                                             headers=auth_headers())
            with urllib.request.urlopen(request, timeout=60) as response:
                readme = response.read(1 << 22).decode("utf-8", "replace")
        subset, split, files = pick_files(s, sorted(siblings), readme)
        if not files:
            raise UserError(f"{s.repo} has no data files matching {s.files!r}; see {s.page}")
        if any(n.lower().endswith(".parquet") for n in files) and importlib.util.find_spec("pyarrow") is None:
            raise UserError(f"{s.repo}'s {split} files are parquet, which needs pyarrow (not installed): "
                            "pip install -e \".[parquet]\" (or pip install pyarrow)")
        target = root / ("" if s.revision == "main" else f"@{s.revision}") / subset / split
        expected = {name: expected_of(siblings[name]) for name in files}
        for name, exp in expected.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            fetch_verified(f"{base}/datasets/{s.repo}/resolve/{commit}/{urllib.parse.quote(name)}", target / name,
                           exp, label=f"{name} of {s.repo}", headers=auth_headers())
        write_record(target, s.repo, commit, expected)
        atomic_write(root / "specs.json", json.dumps({**_read_json(root / "specs.json"),
                                                       key: target.relative_to(root).as_posix()}))
    return target


def _root(s: HubSpec) -> Path:
    return cache_root() / "hf" / "datasets" / s.repo.replace("/", "--")


def _key(s: HubSpec) -> str:
    """What a spec said; `specs.json` keeps the folder it resolved to."""
    return ":".join([s.revision, s.files or "", *s.names])


def _commit_of(folder: Path) -> str | None:
    return _read_json(folder.with_name(folder.name + ".verified.json")).get("revision")


def pinned(spec: str) -> str:
    """A downloaded `hf:` spec as the exact files it resolved to, `hf:ORG/NAME@COMMIT:SUBSET:SPLIT`
    (`@COMMIT/GLOB`): what a run's config.yaml keeps, so that `--resume` anywhere reads the same
    data. Anything else (and a spec not yet downloaded) as it is."""
    if not is_hub_spec(spec):
        return spec
    s = parse_spec(spec)
    rel = _read_json(_root(s) / "specs.json").get(_key(s))
    commit = _commit_of(_root(s) / rel) if rel else None
    if not commit or not COMMIT.fullmatch(commit):
        return spec
    if s.files:
        return f"{PREFIX}{s.repo}@{commit}/{s.files}"
    subset, split = rel.split("/")[-2:]
    return f"{PREFIX}{s.repo}@{commit}:{subset}:{split}"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["HubSpec", "glob_regex", "hub_split", "is_hub_spec", "parse_spec", "pick_files", "pinned",
           "readme_subsets", "splits_by_name"]
