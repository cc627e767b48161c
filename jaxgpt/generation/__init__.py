"""Generation: samplers on logits (`samplers`), the jitted KV-cache decode loop with its
string-level API (`decode`), a KV cache kept across a conversation's calls (`session`),
streaming (`stream`) and batched greedy answers for evaluation (`responses`), for every model family.

    generate(params, cfg, ["prompt"], max_new_tokens=20, temperature=0.8, top_k=40)   -> [str]
    generate_tokens(params, cfg, tokens [b, P], mask [b, P], key, max_new_tokens=N)     -> dict of arrays
    sample_logits(logits [b, vocab], key, temperature=..., top_k=..., top_p=...)        -> [b]
    generate(params, cfg, conversation_ids, session=DecodeSession(params, cfg))        -> [str], cache kept
"""
from jaxgpt.generation.decode import generate, generate_tokens, pad_prompts
from jaxgpt.generation.responses import greedy_responses
from jaxgpt.generation.samplers import categorical_inverse_cdf, sample_logits
from jaxgpt.generation.session import DecodeSession

__all__ = ["DecodeSession", "categorical_inverse_cdf", "generate", "generate_tokens", "greedy_responses", "pad_prompts",
           "sample_logits"]
