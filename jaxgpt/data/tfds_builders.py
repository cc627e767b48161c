"""TFDS builders for the bundled data sets: array_record files, built offline, no TensorFlow.

tensorflow-datasets 4.9.x builds and reads array_record datasets without TensorFlow:
`GeneratorBasedBuilder(file_format="array_record").download_and_prepare()` serializes
examples with its own (TF-free) example writer, and `tfds.data_source(...)` gives random
access to the records (text features come back as UTF-8 `bytes`). Three things differ from
the usual builder recipe:

* `_info` builds `tfds.core.DatasetInfo(builder=self, ...)` directly; the
  `dataset_info_from_configs` helper looks for metadata files next to the builder module.
* `code_path` is given: tfds 4.9.10 needs the `importlib_resources` backport to compute it
  for a builder in an installed package, and declares that backport only for Python < 3.9.
* `disable_shuffling=True`, so records keep the file's order (TFDS otherwise shuffles
  records by key hash when writing), and a corpus read back is the corpus that went in.

Why recipes: this module sits below `jaxgpt.data.tfds_source`, which `jaxgpt.data.records`
and `jaxgpt.data.tokens` import, so it must import without tensorflow_datasets (slow to
import; `finetune.py --help` and pretraining on a text file must not pay for it). A builder
here is therefore a *recipe*, a plain subclass of `LocalBuilder` listed in `BUILDERS`;
`register_all()` (run before any `tfds:NAME` is opened) imports tensorflow_datasets and
defines, once per recipe, the `tfds.core.GeneratorBasedBuilder` subclass that TFDS registers:
the recipe's name, module and methods. Its TFDS name is the recipe's own `name` attribute
when it sets one, else the snake_case class name, as TFDS names classes (`TheVerdict` ->
`the_verdict`). The records come from `jaxgpt.data.readers`, the reader the bundled file is
read with, so `tfds:NAME` and the bundled NAME give the same records.

A fine-tuning task adds a builder for its bundled file in the same pattern, in this module
or its own (appending it to `BUILDERS` before its data is opened):

    class SmsSpam(LocalBuilder):
        \"\"\"SMS Spam Collection v.1 (bundled): label + text.\"\"\"
        BUNDLED_NAME = "sms-spam"
        def _features(self, features):
            return {"label": features.ClassLabel(names=["ham", "spam"]), "text": features.Text()}
        def _generate_examples(self, path):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                label, text = line.split("\\t", 1)
                yield i, {"label": label, "text": text}
"""
from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any, Iterator

from jaxgpt.data import bundled as datasets
from jaxgpt.data.readers import read_file, read_json_records


class LocalBuilder:
    """Recipe of a TFDS builder whose data is a file bundled in `jaxgpt.data.bundled` (no download).

    Subclasses set `BUNDLED_NAME` (a key of `jaxgpt.data.bundled.BUNDLED`) and may override
    `_features(features)` and `_generate_examples(path)`. The default is one record per file,
    `{"text": <whole file>}` in a single `train` split. The methods run on the registered
    TFDS class (see the module docstring), whose next base is `GeneratorBasedBuilder`.
    """

    VERSION = "1.0.0"
    RELEASE_NOTES = {"1.0.0": "Bundled with jaxgpt."}
    BUNDLED_NAME: str = ""
    HOMEPAGE: str = ""

    def __init__(self, *, file_format: Any = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _features(self, features) -> dict:
        """Feature connectors by name; `features` is the `tensorflow_datasets.features` module."""
        return {"text": features.Text()}

    def _info(self):
        import tensorflow_datasets as tfds  # lazy, see the module docstring (register_all imported it)

        entry = datasets.BUNDLED[self.BUNDLED_NAME]
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip() or entry.description,
            features=tfds.features.FeaturesDict(self._features(tfds.features)),
            disable_shuffling=True,
            homepage=self.HOMEPAGE or None,
            license="see jaxgpt/data/bundled/LICENSES.md",
        )

    def _split_generators(self, dl_manager) -> dict:
        del dl_manager  # nothing to download: the data ships with the package
        return {"train": self._generate_examples(datasets.bundled_path(self.BUNDLED_NAME))}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        # Read as jaxgpt.data.text.read_text_chunks reads corpora (universal newlines), so the
        # record's tokens equal the file's tokens exactly.
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

    def _features(self, features) -> dict:
        return {"label": features.ClassLabel(names=["ham", "spam"]), "text": features.Text()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        texts, labels = read_file(path)
        for i, (text, label) in enumerate(zip(texts, labels)):
            yield i, {"label": label, "text": text}


class JsonRecordsBuilder(LocalBuilder):
    """A bundled JSON/JSONL data set whose records are objects of string fields `FIELDS`."""

    FIELDS: tuple[str, ...] = ()

    def _features(self, features) -> dict:
        return {name: features.Text() for name in self.FIELDS}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        fields = {name: name for name in self.FIELDS}
        for i, row in enumerate(read_json_records(path, fields, {})):
            yield i, row


class InstructionData(JsonRecordsBuilder):
    """1,100 Alpaca-style instructions (bundled, Apache-2.0): `instruction`, `input`, `output`."""

    BUNDLED_NAME = "instruction-data"
    HOMEPAGE = "https://github.com/rasbt/LLMs-from-scratch"
    FIELDS = ("instruction", "input", "output")


class PreferencePairs(JsonRecordsBuilder):
    """The 1,100 instructions with `chosen` and `rejected` responses (bundled, Apache-2.0)."""

    name = "preference_data"  # the TFDS name (tfds:preference_data); the class name would give preference_pairs
    BUNDLED_NAME = "preference-data"
    HOMEPAGE = "https://github.com/rasbt/LLMs-from-scratch"
    FIELDS = ("instruction", "input", "output", "chosen", "rejected")


class Gsm8kTest(JsonRecordsBuilder):
    """GSM8K test split (bundled, MIT): 1,319 `question` + `answer` (final answer after '#### ')."""

    BUNDLED_NAME = "gsm8k-test"
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    FIELDS = ("question", "answer")


# The recipes `register_all` turns into registered TFDS builders.
BUILDERS: list[type[LocalBuilder]] = [TheVerdict, SmsSpam, InstructionData, PreferencePairs, Gsm8kTest]
_REGISTERED: dict[type[LocalBuilder], type] = {}  # recipe -> its TFDS builder class


def _tfds_class(recipe: type[LocalBuilder], tfds) -> type:
    """The `GeneratorBasedBuilder` subclass of `recipe`; defining it registers it with TFDS."""
    namespace = {
        "__module__": recipe.__module__, "__qualname__": recipe.__qualname__, "__doc__": recipe.__doc__,
        "VERSION": tfds.core.Version(recipe.VERSION),
        # tfds 4.9.10's DatasetBuilder.code_path evaluates `importlib_resources.abc` for any
        # builder defined in an installed package, but declares that backport only for
        # Python < 3.9, so on 3.10+ it raises ModuleNotFoundError. Same answer, no backport.
        "code_path": tfds.core.Path(inspect.getfile(recipe)),
    }
    if recipe.__dict__.get("name"):  # TFDS reads `name` from the class's own __dict__ too
        namespace["name"] = recipe.__dict__["name"]
    return types.new_class(recipe.__name__, (recipe, tfds.core.GeneratorBasedBuilder),
                           exec_body=lambda ns: ns.update(namespace))


def register_all() -> None:
    """Define (and so register with TFDS) the builder of every recipe in `BUILDERS`, once each."""
    import tensorflow_datasets as tfds  # lazy: see the module docstring

    for recipe in BUILDERS:
        if recipe not in _REGISTERED:
            _REGISTERED[recipe] = _tfds_class(recipe, tfds)


def local_builder_class(name: str) -> type | None:
    """The registered LocalBuilder `name` (the part before any `/config` or `:version`) names."""
    import tensorflow_datasets as tfds  # lazy: see the module docstring

    register_all()
    base = name.split(":")[0].split("/")[0]
    try:
        cls = tfds.builder_cls(base)
    except Exception:  # DatasetNotFoundError, or a registered dataset with import problems
        return None
    return cls if isinstance(cls, type) and issubclass(cls, LocalBuilder) else None


def prepare_local(name: str, data_dir: str | None = None):
    """Build local dataset `name` into `data_dir` (a no-op once built); returns the builder."""
    import tensorflow_datasets as tfds  # lazy: see the module docstring

    register_all()
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
