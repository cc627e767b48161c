"""Generation: KV-cached decoding equals full recompute, sampling filters, eos, compilation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.generation import decode as sampling
from jaxgpt.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.models.gpt2 import GPT
from jaxgpt.models import init_params
from jaxgpt.generation.decode import generate, generate_tokens, pad_prompts, sample_logits

CFG = ModelConfig(vocab_size=128, context_length=48, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@functools.lru_cache(maxsize=None)
def _params(config: ModelConfig):
    # Scaled-up random weights: peaked, context-dependent logits (no near-ties for argmax).
    params = init_params(config, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 6.0, params)


@functools.lru_cache(maxsize=None)
def _full_logits_fn(config: ModelConfig):
    return jax.jit(lambda p, t: GPT(config).apply({"params": p}, t))


def generate_greedy_nocache(params, config, tokens, n):
    """Reference: greedy decoding by recomputing the whole sequence for every new token.

    Right-pads to the full context (causal attention: later slots do not affect earlier
    logits) so one compilation serves every length. Returns (new tokens, their log-probs).
    """
    seq, logps = list(tokens), []
    fn = _full_logits_fn(config)
    for _ in range(n):
        padded = np.zeros((1, config.context_length), np.int32)
        padded[0, : len(seq)] = seq
        logits = fn(params, jnp.asarray(padded))[0, len(seq) - 1]
        tok = int(jnp.argmax(logits))
        logps.append(float(jax.nn.log_softmax(logits)[tok]))
        seq.append(tok)
    return seq[len(tokens):], logps


def _run(prompts, n, config=CFG, key=0, **kw):
    tokens, mask = pad_prompts(prompts, max_new_tokens=n, context_length=config.context_length)
    out = generate_tokens(_params(config), config, tokens, mask, jax.random.key(key),
                          max_new_tokens=n, **kw)
    return jax.tree_util.tree_map(np.asarray, out)


class CharTokenizer:
    """ASCII characters as token ids (vocabulary 128), for string-level tests."""

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("tie", [True, False])
def test_cached_greedy_equals_recompute(tie):
    config = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    prompt = [5, 17, 99, 3, 42]
    expected, expected_lp = generate_greedy_nocache(_params(config), config, prompt, 12)
    out = _run([prompt], 12, config)
    assert out["tokens"][0].tolist() == expected
    np.testing.assert_allclose(out["logprobs"][0], expected_lp, rtol=1e-4, atol=1e-4)
    assert out["lengths"].tolist() == [12] and out["mask"].all()


def test_left_padded_batch_rows_equal_single_prompt():
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7], list(range(20, 37))]  # 3, 7 and 17 tokens
    out = _run(prompts, 10)
    assert out["tokens"].shape == (3, 10)
    for row, prompt in enumerate(prompts):
        expected, expected_lp = generate_greedy_nocache(_params(CFG), CFG, prompt, 10)
        assert out["tokens"][row].tolist() == expected, f"row {row}"
        np.testing.assert_allclose(out["logprobs"][row], expected_lp, rtol=1e-4, atol=1e-4)


def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    greedy = _run(prompts, 8, key=0)["tokens"]
    assert (greedy == _run(prompts, 8, key=123)["tokens"]).all()
    top1 = _run(prompts, 8, key=5, temperature=1.0, top_k=1)["tokens"]
    assert (top1 == greedy).all()
    tiny_p = _run(prompts, 8, key=5, temperature=1.0, top_p=1e-6)["tokens"]
    assert (tiny_p == greedy).all()


def test_seeded_sampling_reproducible_and_seeds_differ():
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    a = _run(prompts, 16, key=1, temperature=1.0)
    b = _run(prompts, 16, key=1, temperature=1.0)
    c = _run(prompts, 16, key=2, temperature=1.0)
    assert (a["tokens"] == b["tokens"]).all()
    assert (a["tokens"] != c["tokens"]).any()
    d = _run(prompts, 16, key=1, temperature=0.9, top_k=20, top_p=0.9)
    assert (d["tokens"] == _run(prompts, 16, key=1, temperature=0.9, top_k=20, top_p=0.9)["tokens"]).all()


def _sampled_set(logits, n=4000, **kw):
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return set(np.asarray(sample_logits(batch, jax.random.key(0), **kw)).tolist())


def test_top_p_and_top_k_keep_exactly_the_expected_set():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))  # sorted: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
    assert _sampled_set(logits, temperature=1.0, top_p=0.3) == {1}
    assert _sampled_set(logits, temperature=1.0, top_p=0.75) == {1, 3}
    assert _sampled_set(logits, temperature=1.0, top_p=0.85) == {1, 3, 2}
    assert _sampled_set(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}
    assert _sampled_set(logits, temperature=1.0, top_k=2) == {1, 3}
    assert _sampled_set(logits, temperature=1.0, top_k=3, top_p=0.6) == {1, 3}
    assert _sampled_set(logits, temperature=0.0, top_p=0.9) == {1}
    # Ids past vocab_limit are never drawn, even when they are the most likely.
    assert _sampled_set(np.log([0.1, 0.1, 0.1, 0.7]), temperature=1.0, vocab_limit=3) == {0, 1, 2}
    assert _sampled_set(np.log([0.1, 0.2, 0.1, 0.6]), temperature=0.0, vocab_limit=3) == {1}


def test_stops_at_eos_per_row():
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    free = _run(prompts, 10)["tokens"]
    eos = int(free[0, 3])  # row 0 emits this at step 3 (or earlier)
    first0 = free[0].tolist().index(eos)
    row1 = free[1].tolist()
    first1 = row1.index(eos) if eos in row1 else None
    out = _run(prompts, 10, eos_id=eos)
    assert out["lengths"][0] == first0 + 1
    assert out["tokens"][0, : first0 + 1].tolist() == free[0, : first0 + 1].tolist()
    assert (out["tokens"][0, first0 + 1:] == eos).all()  # pad defaults to eos
    assert out["mask"][0].tolist() == [i <= first0 for i in range(10)]
    assert (out["logprobs"][0, first0 + 1:] == 0).all()
    assert out["lengths"][1] == (10 if first1 is None else first1 + 1)
    # When every row finishes, the loop exits early; outputs stay well-formed.
    both = _run([prompts[0], prompts[0]], 10, eos_id=eos, pad_id=0)
    assert both["lengths"].tolist() == [first0 + 1] * 2
    assert (both["tokens"][:, first0 + 1:] == 0).all()


def test_stops_at_any_of_several_ids():
    """eos_id=(a, b): a row ends at whichever comes first (a chat model's eos and its template's
    end of an answer); the first id pads; `generate` drops either from the text."""
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    free = _run(prompts, 10)["tokens"]
    a, b = int(free[0, 4]), int(free[1, 2])
    stops = [min([i for i, t in enumerate(row.tolist()) if t in (a, b)]) for row in free]
    out = _run(prompts, 10, eos_id=(a, b))
    assert out["lengths"].tolist() == [s + 1 for s in stops]
    for row, s in enumerate(stops):
        assert out["tokens"][row, :s + 1].tolist() == free[row, :s + 1].tolist()
        assert (out["tokens"][row, s + 1:] == a).all()
    assert generate(_params(CFG), CFG, prompts[1:], max_new_tokens=10, eos_id=[a, b],
                    tokenizer=_IdsText())[0] == _IdsText().decode(free[1, :stops[1]])
    ends = type("Ends", (_IdsText,), {"end_ids": (a, b)})()  # a tokenizer's generation_config ends: the default
    assert generate(_params(CFG), CFG, prompts[1:], max_new_tokens=10, tokenizer=ends)[0] == ends.decode(
        free[1, :stops[1]])


class _IdsText:
    """A tokenizer of ids written as text: `decode([3, 4]) == "3,4"`."""

    vocab_size = CFG.vocab_size

    def encode(self, text):
        return [int(t) for t in text.split(",")]

    def decode(self, ids):
        return ",".join(str(int(i)) for i in ids)


def test_compiles_once_for_same_shapes():
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    _run(prompts, 6, key=0, temperature=0.7, top_p=0.9)
    before = sampling.trace_count()
    _run(prompts, 6, key=1, temperature=1.3, top_p=0.5)  # temperature, top_p values traced
    _run([[8, 9, 10, 11, 12, 13], [1]], 6, key=2, temperature=0.5, top_p=0.8)  # same bucket
    assert sampling.trace_count() == before
    _run(prompts, 6, key=0, temperature=0.7, top_k=5)  # top_k is static: one new trace
    assert sampling.trace_count() == before + 1


def test_generate_strings_with_tokenizer():
    tok = CharTokenizer()
    texts = generate(_params(CFG), CFG, ["hello", "a much longer prompt"], max_new_tokens=6,
                     tokenizer=tok, eos_id=None, stop_at_eos=False)
    for prompt, text in zip(["hello", "a much longer prompt"], texts):
        expected, _ = generate_greedy_nocache(_params(CFG), CFG, tok.encode(prompt), 6)
        assert text == tok.decode(expected)
    # Token-id prompts, and the continuation is cut before eos.
    ids = tok.encode("hello")
    expected, _ = generate_greedy_nocache(_params(CFG), CFG, ids, 6)
    cut = generate(_params(CFG), CFG, ids, max_new_tokens=6, tokenizer=tok, eos_id=expected[2])
    assert cut == [tok.decode(expected[: expected.index(expected[2])])]


def test_pad_prompts_buckets_and_left_pads():
    tokens, mask = pad_prompts([[1, 2], [3, 4, 5]], max_new_tokens=4, context_length=48)
    assert tokens.shape == (2, 16)
    assert tokens[0, -2:].tolist() == [1, 2] and mask[0].sum() == 2 and mask[0, -2:].all()
    # The bucket never pushes prompt + new tokens past the context.
    tokens, _ = pad_prompts([[1] * 20], max_new_tokens=24, context_length=48)
    assert tokens.shape == (1, 24)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "--max-new-tokens"),
    (dict(temperature=-0.5), "--temperature"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(top_k=0), "--top-k"),
    (dict(max_new_tokens=40), "exceeds the model's context of 48"),
])
def test_bad_arguments_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(_params(CFG), CFG, "a prompt of a dozen chars", tokenizer=CharTokenizer(),
                 **{"max_new_tokens": 5, **kwargs})


def test_bad_prompts_raise_user_error():
    tok = CharTokenizer()
    with pytest.raises(UserError, match="empty prompt"):
        generate(_params(CFG), CFG, ["ok", ""], max_new_tokens=5, tokenizer=tok)
    with pytest.raises(UserError, match="no prompt"):
        generate(_params(CFG), CFG, [], max_new_tokens=5, tokenizer=tok)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        generate(_params(CFG), CFG, [1, 2, 500], max_new_tokens=5, tokenizer=tok)


def test_cli(monkeypatch, tmp_path, capsys):
    from jaxgpt.cli import generate as cli

    assert cli.main(["--init", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "error:" in capsys.readouterr().err
    monkeypatch.setattr(cli, "load_init", lambda spec: (CFG, _params(CFG)))
    monkeypatch.setattr(cli, "get_tokenizer", lambda config: CharTokenizer())
    assert cli.main(["--init", "x", "--prompt", "hi", "--top-k", "0"]) == 2
    assert cli.main(["--init", "x"]) == 2
    assert "no prompt" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond\n")
    rc = cli.main(["--init", "x", "--prompt", "hi", "--prompt-file", str(prompts),
                   "--max-new-tokens", "4", "--ignore-eos"])
    assert rc == 0
    out = capsys.readouterr().out.split("\n\n")
    assert len(out) == 3 and out[0].startswith("hi") and out[2].startswith("second")
    assert len(out[0]) == len("hi") + 4
