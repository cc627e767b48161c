"""`finetune.py classify`: sequence classification with a GPT (Raschka ch. 6 and appendix E).

The LM head is replaced by a `num_classes` head (`score`, `build_model(cfg, num_classes=...)`),
and the class logits are read at each row's last real token (rows are right-padded with
`<|endoftext|>`; attention is causal, so nothing after that token, padding included, can
change them). Loss: cross-entropy on those logits, through the shared `train_step` and
the shared engine (AdamW, pmapped data parallelism, checkpoints, `--resume`); evaluation on the
train and val splits at the end of every epoch, and on all three splits at the end.

Run directory: config.yaml, labels.json (`{"labels": [...], "max_length": T}`: class id =
index), metrics.jsonl, metrics.json, loss.png, accuracy.png, checkpoints/. Metrics:
`train_loss` is the running loss of the updates (as in pretraining); `train_eval_loss`,
`train_accuracy`, `val_loss`, `val_accuracy` are evaluated with dropout off over the whole
split (each epoch end, capped by `train.eval_batches`; at the end uncapped), `test_loss` and
`test_accuracy` at the end only; plus `trainable_params`, `total_params`, timings.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxgpt.engine import is_main_process
from jaxgpt.config import ModelConfig, at_least
from jaxgpt.data.classification import (ClassifyDataConfig, encode_texts, load_classification, pad_batch,
                                         validate_data)
from jaxgpt.engine import Plot
from jaxgpt.engine.driver import train
from jaxgpt.errors import UserError
from jaxgpt.train.losses import classification_loss_fn, last_token
from jaxgpt.tasks import common, default_config
from jaxgpt.tasks.common import SplitTask, TaskConfig
from jaxgpt.io.files import atomic_write

DEFAULT_CONFIG = default_config("classify")
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class ClassifyConfig(TaskConfig):
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)



class Classify(SplitTask):
    name = "classify"
    config_class = ClassifyConfig
    split_metrics = {"correct": "accuracy"}
    plots = (Plot("loss.png", "step", ("train_loss", "train_eval_loss", "val_loss"), "loss"),
             Plot("accuracy.png", "epoch", ("train_accuracy", "val_accuracy"), "accuracy"))

    @staticmethod
    def validate_config(cfg) -> None:
        validate_data(cfg.data, cfg.model.context_length)
        at_least(cfg.data, "data", 0, "seed")

    def load_data(self) -> None:
        self.data = load_classification(self.cfg.data, self.cfg.model.context_length,
                                        tfds_data_dir=self.tfds_data_dir, tokenizer=self.tokenizer)
        saved = self.run.path / LABELS_FILE
        if self.run.resume and saved.is_file() and json.loads(saved.read_text())["labels"] != self.data.labels:
            raise UserError(f"--resume {self.run.path}: the data's labels {self.data.labels} differ from the "
                            f"run's {json.loads(saved.read_text())['labels']}")

    def model_attrs(self) -> dict:
        return {"num_classes": self.data.num_classes}

    def created(self) -> None:
        if is_main_process() and not self.run.resume:
            atomic_write(self.run.path / LABELS_FILE,
                         json.dumps({"labels": self.data.labels, "max_length": self.data.max_length}) + "\n")

    def loss_fn(self, model):
        return classification_loss_fn(model)

    def throughput(self):
        return self.throughput_of(self.data.max_length)

    def summary(self, loop, before: dict, final: dict) -> dict:
        return {**super().summary(loop, before, final),
                "examples_per_sec": loop.tokens_per_sec() / self.data.max_length,
                "labels": self.data.labels, "max_length": self.data.max_length}


# The Python entry point: finetune_classifier(cfg, out_dir=None, *, resume=False, stop_after=None) -> metrics.json summary
finetune_classifier = functools.partial(train, Classify)


# ---------------------------------------------------------------------------------------
# Prediction


def load_classifier(spec: str | Path) -> tuple[ModelConfig, Any, list[str], int]:
    """`(model_cfg, plain params, labels, max_length)` of a classify run (LoRA adapters merged),
    of a Hugging Face `*ForSequenceClassification` folder (an export of one, or the hub's) or
    hub id (downloaded once, as `--init` does), or of a PEFT classifier (SEQ_CLS) adapter on its
    base (no label names: `LABEL_i`, as transformers names them)."""
    from jaxgpt.io.hf_export import score_classes
    from jaxgpt.io.hf_load import hf_class_labels, load_hf_dir, read_json
    from jaxgpt.io.hub import local_folder
    from jaxgpt.io.peft_adapters import is_adapter_folder, load_adapter

    path = local_folder(spec)
    if is_adapter_folder(path):
        model_cfg, params = load_adapter(path)
        classes = score_classes(params)
        if classes < 2:
            what = "a reward model's (one score): use it as --reward" if classes else "a language model's"
            raise UserError(f"{path} is not a classifier's adapter: it is {what}")
        return model_cfg, params, [f"LABEL_{i}" for i in range(classes)], model_cfg.context_length
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        labels = hf_class_labels(read_json(path / "config.json"))
        if not labels or len(labels) < 2:
            what = "a reward model (one score): use `python -m jaxgpt reward`" if labels else "a language model"
            raise UserError(f"{path} is not a classifier: its config.json is {what}")
        model_cfg, params = load_hf_dir(path)
        return model_cfg, params, labels, model_cfg.context_length
    labels_file = path / LABELS_FILE
    # Checked before the config is read: another task's config.yaml fails as a ClassifyConfig, less clearly.
    if (path / "config.yaml").is_file() and not labels_file.is_file():
        raise UserError(f"{path} is not a classification run (no {LABELS_FILE}); "
                        "train one with `python finetune.py classify`")
    cfg, params = common.load_run(path, ClassifyConfig)
    meta = json.loads(labels_file.read_text())
    return cfg.model, params, list(meta["labels"]), int(meta["max_length"])


def class_labels(spec: str | Path) -> list[str] | None:
    """The class names of a classify run (`labels.json`) or of a Hugging Face classifier folder
    or hub id (`id2label`); None for anything else."""
    from jaxgpt.io.hf_load import hf_class_labels, read_json
    from jaxgpt.io.hub import local_folder

    path = local_folder(spec)
    if (path / LABELS_FILE).is_file():
        return list(json.loads((path / LABELS_FILE).read_text())["labels"])
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return hf_class_labels(read_json(path / "config.json"))
    return None


def predict(model_cfg: ModelConfig, params, labels: Sequence[str], max_length: int, texts: Sequence[str],
            batch_size: int = 32) -> list[tuple[str, float]]:
    """`(label, probability)` of the most likely class of each text (its first `max_length`
    tokens, in the model's own tokenizer)."""
    from jaxgpt.models import build_model
    from jaxgpt.text.tokenizer import tokenizer_of

    model = build_model(model_cfg, num_classes=len(labels))  # params are merged: no LoRA attribute

    @jax.jit
    def probs(params, tokens, lengths):
        logits = last_token(model.apply({"params": params}, tokens), lengths)
        return jax.nn.softmax(logits, axis=-1)

    out = []
    tokenizer = tokenizer_of(model_cfg)
    ids = encode_texts(list(texts), max_length, tokenizer)
    width = max(map(len, ids))  # rows padded to the longest text (causal: padding never changes a row's logits)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        tokens, lengths = pad_batch(chunk + [[tokenizer.eos_id]] * (batch_size - len(chunk)), width, tokenizer.pad_id)
        p = np.asarray(probs(params, tokens, lengths))[: len(chunk)]
        out.extend((labels[int(i)], float(row[i])) for row, i in zip(p, p.argmax(-1)))
    return out


RECIPE = Classify
