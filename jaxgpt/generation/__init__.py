"""Generation: samplers on logits (`samplers`) and the jitted KV-cache decode loop with its
string-level API (`decode`), for every model family.

    generate(params, cfg, ["prompt"], max_new_tokens=20, temperature=0.8, top_k=40)   -> [str]
    generate_tokens(params, cfg, tokens [b, P], mask [b, P], key, max_new_tokens=N)     -> dict of arrays
    sample_logits(logits [b, vocab], key, temperature=..., top_k=..., top_p=...)        -> [b]
"""
from jaxgpt.generation.decode import generate, generate_tokens, greedy_responses, pad_prompts
from jaxgpt.generation.samplers import categorical_inverse_cdf, sample_logits

__all__ = ["categorical_inverse_cdf", "generate", "generate_tokens", "greedy_responses", "pad_prompts", "sample_logits"]
