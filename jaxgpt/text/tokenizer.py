"""Tokenizers as objects: what data, tasks, sampling and scoring need of one, for any model.

    tok = load_tokenizer(cfg.model.tokenizer)     # "gpt2" | a folder with tokenizer.json
    tok.encode("Hello")  tok.decode(ids)  tok.encode_batch(texts)
    tok.eos_id  tok.pad_id  tok.vocab_size  tok.special_tokens  tok.chat_template  tok.token_dtype

* `GPT2Tokenizer`: OpenAI's GPT-2 BPE through tiktoken, built offline (`jaxgpt.text.gpt2_bpe`);
  `<|endoftext|>` (50256) is eos and padding; no chat template (instruction formats are Alpaca,
  `jaxgpt.text.prompts`).
* `HFTokenizer`: a model folder's `tokenizer.json` read with the `tokenizers` library, its
  special tokens and chat template from `tokenizer_config.json` (as transformers reads them).

A literal special-token string in the text (`<|endoftext|>`, `<|im_end|>`) encodes to its id,
as the chat formats need.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxgpt.errors import UserError

# What `HFTokenizer` reads from a model folder (a run and an export keep copies of these):
# generation_config.json for its end-of-turn ids (`HFTokenizer._turn_end`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")

class Tokenizer:
    """The interface: `encode`, `encode_batch`, `decode`, and the ids and template below."""

    name: str  # identifies the vocabulary (token files are cached per name)
    vocab_size: int  # ids the tokenizer can produce: 0 .. vocab_size - 1
    eos_id: int  # ends a response; generation stops on it
    pad_id: int  # fills rows (never scored)
    bos_id: int | None = None  # the begin-of-text token, if it has one (chat templates write it themselves)
    turn_end: str | None = None  # the special token the chat template ends an answer with, where it is not eos
    turn_end_id: int | None = None  # its id
    generation_ends: tuple[int, ...] = ()  # the ends generation_config.json lists (`end_ids`)
    special_tokens: dict[str, int]
    chat_template: str | None = None  # jinja2 (`jaxgpt.text.chat`); None: the Alpaca format

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def eos_token(self) -> str:
        return self.decode([self.eos_id])

    @property
    def answer_end_id(self) -> int:
        """The id a response in the model's format ends with, as its chat template writes it: the
        template's `turn_end` where it has one (Qwen3-Base: `<|im_end|>`), else eos."""
        return self.eos_id if self.turn_end_id is None else self.turn_end_id

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The ids generation ends at: eos, and every other end `generation_config.json` lists, as
        transformers' `generate` stops (Llama 3.x Instruct: `<|eot_id|>`, `<|eom_id|>`,
        `<|end_of_text|>`; Qwen3: `<|im_end|>`, `<|endoftext|>`)."""
        return tuple(dict.fromkeys((self.eos_id, *self.generation_ends)))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids an answer in the model's format ends at: `end_ids`, and `turn_end` where there is
        one (what `generate_tokens(eos_id=...)` takes: chat, rollouts, scored answers)."""
        return self.end_ids if self.turn_end_id is None else tuple(dict.fromkeys((*self.end_ids, self.turn_end_id)))

    @property
    def token_dtype(self) -> str:
        """The smallest little-endian unsigned dtype that holds every id (token files)."""
        return "<u2" if self.vocab_size <= 1 << 16 else "<u4"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE (tiktoken, offline; `jaxgpt.text.gpt2_bpe`)."""

    name = "gpt2"

    def __init__(self):
        from jaxgpt.text import gpt2_bpe

        self._bpe = gpt2_bpe
        self.vocab_size = gpt2_bpe.N_VOCAB
        self.eos_id = self.pad_id = gpt2_bpe.EOT_ID
        self.special_tokens = {gpt2_bpe.EOT: gpt2_bpe.EOT_ID}

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
        return self._bpe.encode_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._bpe.decode(ids)

    @property
    def encoding(self):
        """The tiktoken `Encoding` itself."""
        return self._bpe.get_encoding()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder: `tokenizer.json` (the `tokenizers` library) and
    `tokenizer_config.json` (special tokens: `eos_token`, `pad_token`, `bos_token`;
    `chat_template`, or a `chat_template.jinja` file beside it), as transformers reads them."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as Backend

        folder = Path(folder).expanduser()
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{folder} has no tokenizer.json; give a model folder with one, or model.tokenizer=gpt2")
        try:
            self._backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers library's own errors
            raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
        self.name = f"hf:{folder.resolve()}"
        self.folder = folder
        config = _read_json(folder / "tokenizer_config.json")
        added = {t.content: i for i, t in self._backend.get_added_tokens_decoder().items()}
        self.special_tokens = added
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        token_id = lambda key: self._id_of(config.get(key), key, path)
        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            raise UserError(f"{folder / 'tokenizer_config.json'} names no eos_token; the model cannot end a response")
        pad = token_id("pad_token")
        self.pad_id = self.eos_id if pad is None else pad
        bos = token_id("bos_token")
        self.bos_id = bos
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template
        self.bos_token = None if bos is None else self.decode([bos], skip_special=False)
        written = self._template_turn_end()
        self.eos_id = self._turn_end(folder, written) or self.eos_id
        self.turn_end_id = None if written in (None, self.eos_id) else written
        ends = _read_json(folder / "generation_config.json").get("eos_token_id")
        ends = ends if isinstance(ends, list) else [ends]
        self.generation_ends = tuple(int(i) for i in ends if isinstance(i, int) and 0 <= i < self.vocab_size)
        self.turn_end = None if self.turn_end_id is None else self.decode([written], skip_special=False)

    _MARK = "\x00response\x00"

    def _template_turn_end(self) -> int | None:
        """The first special token the chat template writes after an answer (None without a
        template or such a token)."""
        if not self.chat_template:
            return None
        from jaxgpt.text.chat import render_chat

        try:
            text = render_chat(self.chat_template, [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": self._MARK}],
                               bos_token=self.bos_token or "", eos_token=self.eos_token)
        except UserError:
            return None
        if self._MARK not in text:
            return None
        specials = set(self.special_tokens.values())
        return next((i for i in self.encode(text.split(self._MARK, 1)[1]) if i in specials), None)

    def _turn_end(self, folder: Path, written: int | None) -> int | None:
        """The token the chat template closes an assistant turn with, where it is not
        `eos_token` but `generation_config.json` lists both as ends: Gemma's instruction-tuned
        models name `<eos>` their eos and end a turn with `<end_of_turn>`, so a response (an SFT
        target, where generation stops) ends with `<end_of_turn>`, as they were trained. None
        elsewhere (Qwen3's and Llama 3's templates end a turn with their eos_token). A base
        model's template may end an answer with another token than its eos (Qwen3-Base:
        `<|im_end|>`, eos `<|endoftext|>`): that is `turn_end`, where answers in the chat format
        stop too (`chat`, `generate --instruction`, the answers scored after fine-tuning)."""
        ends = _read_json(folder / "generation_config.json").get("eos_token_id")
        ends = set(ends) if isinstance(ends, list) else {ends}
        if self.eos_id not in ends or len(ends) < 2:
            return None
        return written if written in ends and written != self.eos_id else None

    def _id_of(self, token, key: str, where: Path) -> int | None:
        if isinstance(token, dict):  # {"content": "<|im_end|>", ...}
            token = token.get("content")
        if token is None:
            return None
        i = self._backend.token_to_id(token)
        if i is None:
            raise UserError(f"{where.parent / 'tokenizer_config.json'}: {key} {token!r} is not in tokenizer.json")
        return i

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (its vocabulary and decoder: `jaxgpt.text.token_bytes`)."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone: no begin-of-text is added (a chat template writes it
        into the prompt itself, as transformers' `apply_chat_template` does)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """The tokenizer of `model.tokenizer`: `gpt2`, or a folder holding `tokenizer.json`."""
    spec = str(spec).strip()
    if spec == "gpt2":
        return GPT2Tokenizer()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UserError(f"model.tokenizer {spec!r} is neither gpt2 nor a folder with tokenizer.json")
    return HFTokenizer(path)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer: the default of every function that takes one."""
    return load_tokenizer("gpt2")


def tokenizer_of(model_cfg) -> Tokenizer:
    """The tokenizer a model config names (`model.tokenizer`)."""
    return load_tokenizer(model_cfg.tokenizer)


def newline_counts(tokenizer: Tokenizer) -> np.ndarray:
    """`[vocab_size]` int32: how many newlines each token decodes to (process supervision
    splits completions into solution lines by these)."""
    return np.array([tokenizer.decode([i]).count("\n") for i in range(tokenizer.vocab_size)], np.int32)


__all__ = ["GPT2Tokenizer", "HFTokenizer", "Tokenizer", "gpt2_tokenizer", "load_tokenizer", "newline_counts",
           "tokenizer_of"]
