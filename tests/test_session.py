"""`DecodeSession`: a KV cache kept across a conversation's calls. Each call must decode what
`generate_tokens` decodes from the whole prompt (tokens equal, log-probs to float noise),
while prefilling only what the prompt adds: a longer prompt, one that leaves the cache's
path (cut back), sampling with the repetition penalty, streaming, a cache that grows, and
sliding-window layers past their window (every slot kept, not a ring)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.generation import DecodeSession, generate, generate_tokens, pad_prompts
from jaxgpt.generation import session as session_module
from jaxgpt.generation.session import _extend_jit
from tests.test_sampling import CFG, CharTokenizer, _params

_TINY = dict(vocab_size=211, context_length=64, n_layer=3, n_head=4, n_embd=32, mlp_dim=48, dropout=0.0,
             qkv_bias=False, n_kv_head=2, tie_embeddings=True)
# Gemma 3 stands for the RoPE families (Llama's attention, grouped-query heads, its ring writes);
# a window no smaller than the cache: the ring holds every slot and is cut back like a plain cache
GEMMA = ModelConfig(family="gemma3", head_size=16, sliding_window=64, sliding_window_pattern=2,
                    query_pre_attn_scalar=24, **_TINY)
N = 6


def _fresh(params, cfg, ids, **kw):
    # every prompt padded to the context's end: one compiled reference loop a sampling setting
    tokens, mask = pad_prompts([ids], max_new_tokens=N, context_length=cfg.context_length, bucket=cfg.context_length)
    return generate_tokens(params, cfg, tokens, mask, jax.random.key(1), max_new_tokens=N, **kw)


def _turn(session, ids, **kw):
    """The session's answer to `ids`, checked against a fresh `generate_tokens`; the new tokens."""
    tokens, mask = pad_prompts([ids], max_new_tokens=N, context_length=session.config.context_length)
    out = session.generate_tokens(tokens, mask, jax.random.key(1), max_new_tokens=N, **kw)
    want = _fresh(session.params, session.config, ids, **kw)
    np.testing.assert_array_equal(out["tokens"], want["tokens"])
    np.testing.assert_array_equal(out["mask"], want["mask"])
    np.testing.assert_allclose(out["logprobs"], want["logprobs"], atol=1e-4)  # float noise
    return np.asarray(out["tokens"])[0].tolist()


@pytest.mark.parametrize("cfg", [CFG, GEMMA], ids=["gpt2", "gemma3"])
def test_a_session_decodes_as_the_whole_prompt_does_and_prefills_only_what_is_new(cfg):
    session = DecodeSession(_params(cfg), cfg)
    compiled = _extend_jit._cache_size()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 10).tolist(), rng.integers(0, cfg.vocab_size, 7).tolist()
    first = _turn(session, a)
    assert session.reused == 0 and session.ids == a + first[:N - 1]  # the last token is never fed
    second = _turn(session, a + first + b)  # the next turn: the answer and a new message
    assert session.reused == len(a) + N - 1
    third = _turn(session, a[:4] + b)  # leaves the cache's path after 4 tokens: cut back there
    assert session.reused == 4 and session.ids[:4 + len(b)] == a[:4] + b
    history = a[:4] + b + third
    _turn(session, history + a, temperature=0.9, top_k=20, repetition_penalty=1.5)
    assert session.reused == len(history) - 1 and second != third
    # one program a sampling setting (greedy; sampled with the penalty): 16-token chunks, one cache size
    assert _extend_jit._cache_size() - compiled == 2


def test_a_session_streams_and_stops_as_generate_does():
    cfg = dataclasses.replace(CFG, context_length=96)
    params, tok = _params(cfg), CharTokenizer()
    session = DecodeSession(params, cfg)
    pieces = []
    history = "abc"
    for message in ["hello", "more", "x"]:
        history += message
        whole = generate(params, cfg, history, max_new_tokens=12, tokenizer=tok, prompt_bucket=96)[0]
        stop = [whole[4:6]]  # the answer ends before its fifth character
        got = generate(params, cfg, history, max_new_tokens=12, tokenizer=tok, stop=stop,
                       on_text=lambda row, text: pieces.append(text), session=session)[0]
        assert got == whole[:whole.index(stop[0])] and "".join(pieces) == got
        pieces.clear()
        history += got
    assert session.reused > 0
    with pytest.raises(ValueError, match="one prompt"):
        generate(params, cfg, ["ab", "cd"], session=session, tokenizer=tok)


def test_a_growing_conversation_grows_the_cache(monkeypatch):
    """MIN_SLOTS (256 here 16) then the next power of two; the contents move with it."""
    monkeypatch.setattr(session_module, "MIN_SLOTS", 16)
    cfg = dataclasses.replace(CFG, context_length=90)
    session = DecodeSession(_params(cfg), cfg)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, 10).tolist()
    ids += _turn(session, ids)
    assert session.cache["valid"].shape == (1, 16)
    ids += rng.integers(0, cfg.vocab_size, 12).tolist()
    ids += _turn(session, ids)
    assert session.cache["valid"].shape == (1, 64) and session.reused == 15
    ids += rng.integers(0, cfg.vocab_size, 46).tolist()
    _turn(session, ids)
    # 33 kept + the 47 new tokens padded to 64: past the context's 90 (the padding's positions
    # must not be, GPT-2's position table has 90 rows), to a multiple of 16
    assert session.cache["valid"].shape == (1, 112) and session.reused == 33


def test_sliding_window_layers_past_the_window_are_cut_back_too():
    """A window of 6 slots: `generate_tokens` keeps those layers' cache as a ring of 6, which
    could not be cut back; the session keeps every slot and masks the window, and decodes the same."""
    cfg = dataclasses.replace(GEMMA, sliding_window=6)
    session = DecodeSession(_params(cfg), cfg)
    a = list(range(3, 20))
    first = _turn(session, a)
    _turn(session, a + first + [7, 8])
    assert session.reused == len(a) + N - 1  # the last answer token is in the cache but not yet written
    assert {layer["k"].shape[1] for layer in session.cache["layers"]} == {session.cache["valid"].shape[1]}
    _turn(session, a[:9] + [50, 51])  # off the cache's path: cut back to 9 slots, written over after
    assert session.reused == 9


def test_a_session_refuses_batches_and_prompts_past_the_context():
    session = DecodeSession(_params(CFG), CFG)
    with pytest.raises(ValueError, match="one prompt"):
        session.generate_tokens(np.ones((2, 4), np.int32), np.ones((2, 4), bool), jax.random.key(0), max_new_tokens=2)
    with pytest.raises(UserError, match="context of 48"):
        session.generate_tokens(np.ones((1, 45), np.int32), np.ones((1, 45), bool), jax.random.key(0),
                                max_new_tokens=4)
