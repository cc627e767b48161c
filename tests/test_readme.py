"""Every Python block of the README runs as written (in order, one namespace), so the
research-use snippets stay true; `runs/mine`, which they read, is a tiny run made here.
Every shell command of the README and BENCHMARKS parses with its program's own parser."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

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


# Placeholders the README's commands use for values a user fills in.
PLACEHOLDERS = {"N": "2", "I": "0"}


def shell_commands(text: str) -> list[list[str]]:
    """Each command of the text's ```bash blocks as argv (continuations joined, comments and
    `&&` chains split), placeholders `<...>` and `PLACEHOLDERS` filled in."""
    import shlex

    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = [PLACEHOLDERS.get(a, re.sub(r"<[^>]*>", "x", a)) for a in shlex.split(part, comments=True)]
                if argv:
                    commands.append(argv)
    return commands


def _entry_point(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"readme_{name}", README.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_command(argv: list[str]) -> None:
    """Parse `argv` with the program's own parser and load the config its flags name, as
    the program would before any work; flags of a benchmark script must appear in it."""
    import importlib

    from jaxgpt.cli import COMMANDS

    root = README.parent
    if argv[0] == "pip":
        extras = re.findall(r"\[(\w+)\]", " ".join(argv))
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
        assert all(re.search(rf"^{e} = \[", pyproject, re.M) for e in extras), extras
    elif argv[0] == "hf":  # huggingface_hub's CLI: the flags its `hf download --help` lists
        assert argv[1] == "download" and {a for a in argv if a.startswith("--")} <= {
            "--repo-type", "--include", "--exclude", "--local-dir", "--revision"}, argv
    elif argv[0] == "pytest":
        assert all((root / a).exists() for a in argv[1:] if a.startswith("tests/")), argv
    elif argv[:2] == ["python", "train.py"]:
        train = _entry_point("train")
        args = train.build_parser().parse_args(argv[2:])
        args.resume = None  # the run's config is not here: its overrides against the defaults
        args.config = args.config and str(root / args.config)
        train.config_of(args)
    elif argv[:2] == ["python", "finetune.py"]:
        from jaxgpt.cli.common import load_task_config
        from jaxgpt.tasks import TASKS, default_config, load

        args = _entry_point("finetune").build_parser().parse_args(argv[2:])
        args.resume = None  # the run's config is not here: its overrides against the task's defaults
        args.config = args.config and str(root / args.config)
        extra = {flag.key: getattr(args, flag.dest) for flag in TASKS[args.task].flags}
        load_task_config(args, load(args.task).RECIPE.config_class, default_config(args.task), args.parser, extra)
    elif argv[:3] == ["python", "-m", "jaxgpt"]:
        importlib.import_module(COMMANDS[argv[3]][0]).build_parser().parse_args(argv[4:])
    elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
        source = (root / argv[1]).read_text(encoding="utf-8")
        flags = [a.split("=")[0] for a in argv[2:] if a.startswith("--")]
        assert all(f'"{f}"' in source for f in flags), (argv[1], flags)
    else:
        assert argv[:2] == ["python", "-c"], f"a README command this test does not know: {argv}"


@pytest.mark.parametrize("doc, at_least", [("README.md", 60), ("BENCHMARKS.md", 15)])
def test_every_documented_command_parses(doc, at_least):
    """Every shell command in the README and BENCHMARKS names flags, subcommands, config keys,
    extras and files that exist: a renamed flag fails here, not in a user's terminal."""
    commands = shell_commands((README.parent / doc).read_text(encoding="utf-8"))
    assert len(commands) >= at_least
    failures = []
    for argv in commands:
        try:
            check_command(argv)
        except (Exception, SystemExit) as e:  # argparse exits 2 on an unknown flag
            failures.append(f"{' '.join(argv)}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("doc", ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"])
def test_every_documented_name_and_path_exists(doc):
    """`jaxgpt.x.y` names resolve to a module or attribute, and `jaxgpt/...`, `tests/...`,
    `benchmarks/...`, `configs/...` paths (or globs) exist (`TASK`, `mytask`: the docs' placeholders)."""
    import importlib

    text = (README.parent / doc).read_text(encoding="utf-8")
    missing = []
    for name in sorted(set(re.findall(r"jaxgpt(?:\.\w+)+", text))):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):  # the longest prefix that imports, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:k]))
                break
            except ImportError:
                continue
        for attr in parts[k:]:
            obj = getattr(obj, attr, None)
        missing += [name] if obj is None else []
    paths = re.findall(r"[`(]((?:jaxgpt|tests|benchmarks|configs|docs)/[\w./*-]+)", text)
    missing += [p for p in paths if not any(README.parent.glob(p)) and not re.search(r"TASK|mytask", p)]
    assert not missing, missing
