"""TFDS builders for the bundled data sets: array_record files, built offline, no TensorFlow.

tensorflow-datasets 4.9.x builds and reads array_record datasets without TensorFlow:
`GeneratorBasedBuilder(file_format="array_record").download_and_prepare()` serializes
examples with its own (TF-free) example writer, and `tfds.data_source(...)` gives random
access to the records (text features come back as UTF-8 `bytes`). Two things differ from
the usual builder recipe and are why `LocalBuilder` exists:

* `_info` builds `tfds.core.DatasetInfo(builder=self, ...)` directly; the
  `dataset_info_from_configs` helper looks for metadata files next to the builder module.
* `code_path` is overridden: tfds 4.9.10 needs the `importlib_resources` backport to compute
  it for a builder in an installed package, and declares that backport only for Python < 3.9.
* `disable_shuffling=True`, so records keep the file's order (TFDS otherwise shuffles
  records by key hash when writing), and a corpus read back is the corpus that went in.

Defining a subclass registers it with TFDS under its snake_case class name (`TheVerdict`
-> `the_verdict`) as soon as its module is imported. A fine-tuning task adds a builder for
its bundled file in the same pattern, in this module or its own; for its own module, add the
module's name to `BUILDER_MODULES` so `tfds:NAME` sources find it:

    class SmsSpam(LocalBuilder):
        \"\"\"SMS Spam Collection v.1 (bundled): label + text.\"\"\"
        BUNDLED_NAME = "sms-spam"
        def _features(self):
            return {"label": tfds.features.ClassLabel(names=["ham", "spam"]), "text": tfds.features.Text()}
        def _generate_examples(self, path):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                label, text = line.split("\\t", 1)
                yield i, {"label": label, "text": text}
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds
from etils import epath

from jaxgpt import datasets

# Modules that define LocalBuilder subclasses; imported before a `tfds:NAME` source is opened.
BUILDER_MODULES: list[str] = ["jaxgpt.data.tfds_builders"]


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder whose data is a file bundled in `jaxgpt.datasets` (no download).

    Subclasses set `BUNDLED_NAME` (a key of `jaxgpt.datasets.BUNDLED`) and may override
    `_features()` and `_generate_examples(path)`. The default is one record per file,
    `{"text": <whole file>}` in a single `train` split.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Bundled with jaxgpt."}
    BUNDLED_NAME: str = ""
    HOMEPAGE: str = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10's DatasetBuilder.code_path evaluates `importlib_resources.abc` for any
        # builder defined in an installed package, but declares that backport only for
        # Python < 3.9, so on 3.10+ it raises ModuleNotFoundError. Same answer, no backport.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: Any = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _features(self) -> dict:
        return {"text": tfds.features.Text()}

    def _info(self) -> tfds.core.DatasetInfo:
        entry = datasets.BUNDLED[self.BUNDLED_NAME]
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip() or entry.description,
            features=tfds.features.FeaturesDict(self._features()),
            disable_shuffling=True,
            homepage=self.HOMEPAGE or None,
            license="see jaxgpt/datasets/LICENSES.md",
        )

    def _split_generators(self, dl_manager) -> dict:
        del dl_manager  # nothing to download: the data ships with the package
        return {"train": self._generate_examples(datasets.bundled_path(self.BUNDLED_NAME))}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        # Read as jaxgpt.data.tokens reads files (universal newlines), so the record's
        # tokens equal the file's tokens exactly.
        with open(path, encoding="utf-8") as f:
            yield 0, {"text": f.read()}


class TheVerdict(LocalBuilder):
    """"The Verdict", Edith Wharton (1908): one record, `text` = the whole story (public domain)."""

    BUNDLED_NAME = "the-verdict"
    HOMEPAGE = "https://github.com/rasbt/LLMs-from-scratch"


class SmsSpam(LocalBuilder):
    """SMS Spam Collection v.1 (bundled, CC BY 4.0): 5,574 records, `label` (ham/spam) + `text`."""

    BUNDLED_NAME = "sms-spam"
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/228/sms+spam+collection"

    def _features(self) -> dict:
        return {"label": tfds.features.ClassLabel(names=["ham", "spam"]), "text": tfds.features.Text()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        from jaxgpt.data.classification import read_file

        texts, labels = read_file(path)
        for i, (text, label) in enumerate(zip(texts, labels)):
            yield i, {"label": label, "text": text}


class JsonRecordsBuilder(LocalBuilder, skip_registration=True):
    """A bundled JSON/JSONL data set whose records are objects of string fields `FIELDS`."""

    FIELDS: tuple[str, ...] = ()

    def _features(self) -> dict:
        return {name: tfds.features.Text() for name in self.FIELDS}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        from jaxgpt.data.records import read_records

        fields = {name: name for name in self.FIELDS}
        for i, row in enumerate(read_records(self.BUNDLED_NAME, fields)):
            yield i, row


class InstructionData(JsonRecordsBuilder):
    """1,100 Alpaca-style instructions (bundled, Apache-2.0): `instruction`, `input`, `output`."""

    BUNDLED_NAME = "instruction-data"
    HOMEPAGE = "https://github.com/rasbt/LLMs-from-scratch"
    FIELDS = ("instruction", "input", "output")


class PreferenceData(JsonRecordsBuilder):
    """The 1,100 instructions with `chosen` and `rejected` responses (bundled, Apache-2.0)."""

    BUNDLED_NAME = "preference-data"
    HOMEPAGE = "https://github.com/rasbt/LLMs-from-scratch"
    FIELDS = ("instruction", "input", "output", "chosen", "rejected")


class Gsm8kTest(JsonRecordsBuilder):
    """GSM8K test split (bundled, MIT): 1,319 `question` + `answer` (final answer after '#### ')."""

    BUNDLED_NAME = "gsm8k-test"
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    FIELDS = ("question", "answer")


def register_all() -> None:
    """Import every module in `BUILDER_MODULES` (defining a builder class registers it)."""
    for module in BUILDER_MODULES:
        importlib.import_module(module)


def local_builder_class(name: str) -> type[LocalBuilder] | None:
    """The LocalBuilder registered as `name` (the part before any `/config` or `:version`)."""
    register_all()
    base = name.split(":")[0].split("/")[0]
    try:
        cls = tfds.builder_cls(base)
    except Exception:  # DatasetNotFoundError, or a registered dataset with import problems
        return None
    return cls if isinstance(cls, type) and issubclass(cls, LocalBuilder) else None


def prepare_local(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Build local dataset `name` into `data_dir` (a no-op once built); returns the builder."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
