"""The command-line programs: `python -m jaxgpt COMMAND` (`jaxgpt/__main__.py`), besides the
entry points `train.py` and `finetune.py`. Each command is one module with a `main(argv)`;
`common` holds the shared flag and error plumbing, `hostmem` the entry points' re-exec with
huge pages. Imports stay light here so `--help` is fast."""
from __future__ import annotations

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenize": ("jaxgpt.cli.tokenize", "text <-> token ids; tokenize a corpus into the cache ahead of training"),
    "generate": ("jaxgpt.cli.generate", "continue prompts (or answer an instruction) with a run or pretrained weights"),
    "chat": ("jaxgpt.cli.chat", "chat with an instruction-tuned model, answers printed as they are decoded"),
    "export": ("jaxgpt.cli.export", "write weights as a Hugging Face folder (config.json + model.safetensors)"),
    "classify": ("jaxgpt.cli.classify_texts", "label texts with a `finetune.py classify` run"),
    "reward": ("jaxgpt.cli.score_responses", "score responses with a `finetune.py reward` run"),
    "evaluate": ("jaxgpt.cli.evaluate", "accuracy, pass@k, format rate, length on a verifiable task (arithmetic, gsm8k)"),
    "perplexity": ("jaxgpt.cli.perplexity", "next-token loss, perplexity and bits per byte of a model on a corpus"),
}
