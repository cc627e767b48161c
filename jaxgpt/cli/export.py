"""`python -m jaxgpt export --init SPEC --to-hf OUTDIR [--adapter] [--force]`: weights to a Hugging Face folder.

SPEC is anything `--init` accepts (a jaxgpt run directory, a Hugging Face or OpenAI GPT-2
directory, or a preset such as `gpt2`). OUTDIR receives config.json and model.safetensors
(`jaxgpt.io.hf_export.export_hf`); LoRA adapters are merged first. A language model is written
as the family's *ForCausalLM (PPO's value head left out); a classify run (with its labels) or a
reward run as its *ForSequenceClassification. With --adapter, a LoRA run's adapters alone are
written as a PEFT adapter (adapter_config.json, adapter_model.safetensors:
`jaxgpt.io.peft_adapters`) for `peft.PeftModel.from_pretrained(base, OUTDIR)`. A non-empty OUTDIR
is refused unless --force, which replaces only a previous export.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error, main_entry
from jaxgpt.io.hf_export import check_export_dir, export_hf, score_classes
from jaxgpt.io.hub import ACCEPTED, resolve_init
from jaxgpt.tasks.classify import class_labels

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt export", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, metavar="SPEC", help=f"weights to export: {ACCEPTED}")
    p.add_argument("--to-hf", required=True, metavar="OUTDIR", dest="to_hf",
                   help="directory to write config.json and model.safetensors into")
    p.add_argument("--adapter", action="store_true",
                   help="write a LoRA run's adapters alone, as a PEFT adapter folder, instead of the merged model")
    p.add_argument("--force", action="store_true",
                   help="replace OUTDIR if it holds a previous export (config.json + model.safetensors only)")
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.adapter:
        return _export_adapter(args)
    check_export_dir(args.to_hf, args.force, source=args.init)  # fail before a long load, not after
    config, params = resolve_init(args.init)
    labels = class_labels(args.init) if score_classes(params) > 1 else None
    out = export_hf(params, config, args.to_hf, force=args.force, labels=labels)
    what = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} (config.json, model.safetensors) as {what}: n_layer={config.n_layer} n_head={config.n_head} "
          f"n_embd={config.n_embd} vocab_size={config.vocab_size} tied={config.tie_embeddings}"
          + (f" labels={','.join(labels)}" if labels else ""))
    return 0


def _export_adapter(args) -> int:
    from jaxgpt.io.peft_adapters import export_adapter

    out, peft, head = export_adapter(args.init, args.to_hf, force=args.force, labels=class_labels(args.init))
    targets = peft["target_modules"]
    shown = ", ".join(targets[:8]) + (f" and {len(targets) - 8} more" if len(targets) > 8 else "")
    print(f"wrote {out} (adapter_config.json, adapter_model.safetensors) as a PEFT LoRA adapter: r={peft['r']} "
          f"lora_alpha={peft['lora_alpha']} on {shown}; base {peft['base_model_name_or_path']}")
    if head:  # a classifier's: what its base needs is not in adapter_config.json
        kwargs = ", ".join(f"{k}={v!r}" for k, v in head.items())
        print(f"a classifier's adapter (its score head saved whole): PeftModel.from_pretrained("
              f"AutoModelForSequenceClassification.from_pretrained(BASE, {kwargs}), {str(out)!r})")
    base = Path(peft["base_model_name_or_path"])
    if base.is_dir() and not (base / "config.json").is_file():  # a jaxgpt run, a PEFT adapter: not for PEFT
        print(f"the base is no Hugging Face model folder: `python -m jaxgpt export --init {base} --to-hf BASE`, "
              "then load the adapter on BASE (or set base_model_name_or_path to it)")
    return 0


if __name__ == "__main__":
    main_entry(main)
