"""`pip install -e .` alone gives everything the package imports: every third-party module
that `jaxgpt/` imports (in code, or in the source of a worker process it starts) belongs to
a distribution in `[project] dependencies`, apart from the few that are optional and say so
when missing (`.[test]` pulls in torch and transformers, whose own dependencies would hide
a missing one from every other test); and `requires-python` is the 3.11 that jax>=0.7 needs."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Behind an extra or a clear error: torch (pytorch_model.bin, the PyTorch twin), transformers
# (the parity twins), tensorflow (OpenAI's TF checkpoints), tensorboardX (`.[tensorboard]`),
# pyarrow (`.parquet` data, `.[parquet]`).
OPTIONAL = {"torch", "transformers", "tensorflow", "tensorboardX", "pyarrow"}
CODE_IMPORT = re.compile(r"^\s*(?:from\s+([A-Za-z_]\w*)[\w.]*\s+import\s|import\s+([A-Za-z_]\w*))", re.M)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    """Top-level modules of every import statement under jaxgpt/, and of import lines in
    string constants (the source of worker processes started with `python -c`)."""
    found = set()
    for path in (ROOT / "jaxgpt").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\nimport " in node.value:
                found.update(a or b for a, b in CODE_IMPORT.findall(node.value))
    return found


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # jax>=0.7 and flax require it; code uses 3.11 (hashlib.file_digest)
    declared = {canonical(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in project["dependencies"]}
    dists = packages_distributions()
    third_party = imported_modules() - set(sys.stdlib_module_names) - {"jaxgpt", "__future__"} - OPTIONAL
    assert {"jax", "flax", "yaml", "tokenizers", "jinja2", "sympy"} <= third_party  # the scan sees them
    missing = {m: dists.get(m) for m in third_party if not {canonical(d) for d in dists.get(m, [])} & declared}
    assert not missing, f"imported by jaxgpt/ but not in [project] dependencies: {missing}"
