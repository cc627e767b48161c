"""`python -m jaxgpt export --init SPEC --to-hf OUTDIR [--force]`: weights to a Hugging Face folder.

SPEC is anything `--init` accepts (a jaxgpt run directory, a Hugging Face or OpenAI GPT-2
directory, or a preset such as `gpt2`). OUTDIR receives config.json and model.safetensors
(`jaxgpt.io.hf_export.export_hf`); LoRA adapters are merged first. A non-empty OUTDIR is refused
unless --force, which replaces only a previous export.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from jaxgpt.cli.common import exit_on_user_error, main_entry
from jaxgpt.io.hf_export import check_export_dir, export_hf
from jaxgpt.io.hub import ACCEPTED, resolve_init

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt export", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, metavar="SPEC", help=f"weights to export: {ACCEPTED}")
    p.add_argument("--to-hf", required=True, metavar="OUTDIR", dest="to_hf",
                   help="directory to write config.json and model.safetensors into")
    p.add_argument("--force", action="store_true",
                   help="replace OUTDIR if it holds a previous export (config.json + model.safetensors only)")
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_export_dir(args.to_hf, args.force, source=args.init)  # fail before a long load, not after
    config, params = resolve_init(args.init)
    out = export_hf(params, config, args.to_hf, force=args.force)
    print(f"wrote {out} (config.json, model.safetensors): n_layer={config.n_layer} n_head={config.n_head} "
          f"n_embd={config.n_embd} vocab_size={config.vocab_size} tied={config.tie_embeddings}")
    return 0


if __name__ == "__main__":
    main_entry(main)
