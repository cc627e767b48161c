"""OpenAI's original GPT-2 release (TensorFlow): `model/wte`, `model/h0/ln_1/g|b`,
`model/h0/attn/c_attn/w` (`[1, d, 3d]`, a 1x1 convolution; the leading 1 is squeezed) and
so on, mapped by the GPT-2 family (`GPT2Family.openai_target`: to Hugging Face's names, then
its converter) and assembled as Hugging Face checkpoints are (`jaxgpt.io.hf_load.convert_tensors`).
Reading the files needs TensorFlow."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.io.hf_load import Params, Tensor, config_from_hf, convert_tensors, read_json
from jaxgpt.models import get_family


def config_from_openai(hparams: Mapping[str, Any], where: str = "hparams.json") -> ModelConfig:
    """OpenAI's hparams.json (`n_vocab`, `n_ctx`, `n_embd`, `n_head`, `n_layer`): always
    gelu_new, epsilon 1e-5, tied embeddings."""
    try:
        return config_from_hf(
            {"vocab_size": hparams["n_vocab"], "n_positions": hparams["n_ctx"], "n_embd": hparams["n_embd"],
             "n_layer": hparams["n_layer"], "n_head": hparams["n_head"]}, where)
    except KeyError as e:
        raise UserError(f"{where}: missing {e.args[0]}") from None


def load_openai_variables(names_and_shapes: Iterable[tuple[str, Any]], read: Callable[[str], Any],
                          hparams: Mapping[str, Any], source: str = "checkpoint") -> tuple[ModelConfig, Params]:
    """jaxgpt `(config, params)` from OpenAI GPT-2 variables given as `(name, shape)` pairs
    and a `read(name)` function (`tf.train.load_variable` bound to the checkpoint, or a dict
    lookup in tests). Non-parameter variables (optimizer slots etc.) must not be present."""
    config = config_from_openai(hparams)
    tensors = (Tensor(n, tuple(s), lambda n=n: read(n)) for n, s in names_and_shapes)
    return config, convert_tensors(tensors, config, get_family("gpt2").openai_target, source)


def load_openai_dir(path: str | Path) -> tuple[ModelConfig, Params]:
    """OpenAI's original release directory (hparams.json, checkpoint, model.ckpt.*)."""
    path = Path(path)
    hparams = read_json(path / "hparams.json")
    try:
        import tensorflow as tf  # noqa: F401
    except ImportError:
        raise UserError(f"{path} is an OpenAI TensorFlow checkpoint: reading it needs TensorFlow "
                        "(pip install tensorflow), or use the converted Hugging Face weights instead "
                        "(--init gpt2 or a directory with config.json and model.safetensors)") from None
    prefix = tf.train.latest_checkpoint(str(path)) or str(path / "model.ckpt")
    try:
        names = tf.train.list_variables(prefix)
    except Exception as e:
        raise UserError(f"cannot read TensorFlow checkpoint {prefix}: {e}") from None
    names = [(n, s) for n, s in names if n.startswith("model/")]  # skip e.g. a global step
    return load_openai_variables(names, lambda n: tf.train.load_variable(prefix, n), hparams, prefix)
