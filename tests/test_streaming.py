"""Text as it is generated: `TextStream` (incremental detokenization, stop strings) against
whole-sequence decoding; `generate_tokens(on_token=...)` and `generate(stop=, on_text=)`
against the plain loop; `generate --stream / --stop` and `python -m jaxgpt chat` from the
command line (chat template turns, Alpaca single turns, a conversation that outgrows the
context, /reset, Ctrl-C)."""
from __future__ import annotations

import io
import os
import signal
import threading

import jax
import numpy as np
import pytest

from jaxgpt.errors import UserError
from jaxgpt.generation.decode import generate, generate_tokens, pad_prompts
from jaxgpt.generation.stream import TextStream
from jaxgpt.text.tokenizer import load_tokenizer
from tests.test_sampling import CFG, CharTokenizer, _params


def _pieces(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == stream.text
    return pieces, stream


def _trained_tokenizer(kind: str):
    """A small BPE tokenizer.json trained here: byte-level (Llama 3, Qwen3) or Metaspace
    (SentencePiece-style: its decoder drops the first token's leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if kind == "byte_level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    corpus = ["the quick brown fox jumps over the lazy dog", "naïve café déjà vu — 東京 😀 ok",
              "stop here. then go on"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    return tok


def test_pieces_add_up_to_the_whole_decoding():
    """GPT-2's BPE on random ids (characters split across tokens: U+FFFD held back until
    complete) and on text with accents, CJK and emoji; two tokenizer.json decoders."""
    gpt2 = load_tokenizer("gpt2")
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 50256, 30).tolist()
        assert "".join(_pieces(gpt2, ids)[0]) == gpt2.decode(ids)
    text = "Déjà vu: 東京 in 😀 — ok!"
    ids = gpt2.encode(text)
    pieces, _ = _pieces(gpt2, ids)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces[:-1]) and len(ids) > len([p for p in pieces if p])
    for kind in ("byte_level", "metaspace"):
        tok = _trained_tokenizer(kind)
        for line in ("the lazy fox — 東京 😀 café", "then go on. stop here"):
            ids = tok.encode(line).ids
            assert "".join(_pieces(tok, ids)[0]) == tok.decode(ids)


def test_stop_strings_cut_the_text_and_are_never_shown():
    gpt2 = load_tokenizer("gpt2")
    text = "One fish. Two fish.\n\nRed fish, blue fish."
    ids = gpt2.encode(text)
    for stop in ("\n\n", "fish,", "Two f", "sh. T", ".", "absent", "blue fish."):
        pieces, stream = _pieces(gpt2, ids, [stop, "zzz"])
        want = text.split(stop)[0]
        assert stream.text == want and stream.stopped == (stop in text)
        shown = ""
        for piece in pieces:  # no piece ever shows a stop string's start that then completes
            shown += piece
            assert shown == want[:len(shown)]
    assert _pieces(gpt2, ids, ["fish,", "One"])[1].text == ""  # the earliest of several
    with pytest.raises(UserError, match="non-empty"):
        TextStream(gpt2, ["\n", ""])


def test_on_token_sees_every_token_in_order_and_can_stop_rows():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    tokens, mask = pad_prompts(prompts, max_new_tokens=12, context_length=CFG.context_length)
    kw = dict(max_new_tokens=12, temperature=1.0)
    plain = generate_tokens(_params(CFG), CFG, tokens, mask, jax.random.key(1), **kw)
    seen = []

    def on_token(step, toks, live):
        seen.append((step, toks.copy(), live.copy()))
        return np.array([step == 4, False])  # row 0 ends after its fifth token

    out = generate_tokens(_params(CFG), CFG, tokens, mask, jax.random.key(1), on_token=on_token, **kw)
    assert [s for s, *_ in seen] == list(range(12))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in seen], 1)[1], np.asarray(plain["tokens"])[1])
    np.testing.assert_array_equal(np.asarray(out["tokens"])[0, :5], np.asarray(plain["tokens"])[0, :5])
    assert out["lengths"].tolist() == [5, 12] and not seen[5][2][0] and seen[5][2][1]
    np.testing.assert_array_equal(out["logprobs"][1], plain["logprobs"][1])


def test_generate_streams_and_stops_like_the_plain_loop():
    prompts = ["Every effort", "moves you"]
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=20, temperature=temperature, seed=2, tokenizer=CharTokenizer(), stop_at_eos=False)
        plain = generate(_params(CFG), CFG, prompts, **kw)
        pieces = {0: [], 1: []}
        streamed = generate(_params(CFG), CFG, prompts, on_text=lambda row, t: pieces[row].append(t), **kw)
        assert streamed == plain and ["".join(pieces[r]) for r in (0, 1)] == plain
        stop = plain[0][5:7]
        cut = generate(_params(CFG), CFG, prompts, stop=[stop], **kw)
        assert cut == [p.split(stop)[0] for p in plain]
    first = []  # on_text returning True ends that row where it is
    ended = generate(_params(CFG), CFG, prompts, on_text=lambda row, t: first.append(t) or row == 0, **kw)
    assert ended[0] == first[0] and ended[1] == plain[1]


def test_generate_cli_stream_and_stop(monkeypatch, capsys):
    from jaxgpt.cli import generate as cli

    monkeypatch.setattr(cli, "load_init", lambda spec: (CFG, _params(CFG)))
    monkeypatch.setattr(cli, "get_tokenizer", lambda config: CharTokenizer())
    argv = ["--init", "x", "--prompt", "hi there", "--max-new-tokens", "12", "--ignore-eos"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    stop = plain[len("hi there") + 3:len("hi there") + 5]
    assert cli.main([*argv, "--stop", stop.replace("\n", "\\n")]) == 0
    assert capsys.readouterr().out == "hi there" + plain[len("hi there"):].split(stop)[0] + "\n"
    assert cli.main([*argv, "--stream", "--prompt", "two"]) == 2
    assert "one prompt" in capsys.readouterr().err
    assert cli.main([*argv, "--stop", ""]) == 2
    assert "non-empty" in capsys.readouterr().err
    assert cli.main([*argv, "--repetition-penalty", "0"]) == 2
    assert "--repetition-penalty must be a number > 0" in capsys.readouterr().err
    assert cli.main([*argv, "--repetition-penalty", "3"]) == 0
    assert capsys.readouterr().out != plain  # transformers' parity: tests/test_weights.py


# ---------------------------------------------------------------------------------------
# python -m jaxgpt chat


def _chat_model(tmp_path, context_length=96):
    from jaxgpt.config import ModelConfig
    from jaxgpt.models import init_params
    from tests.test_chat import CHATML, chat_folder

    folder = chat_folder(tmp_path, CHATML, n_words=40)
    cfg = ModelConfig(family="llama", vocab_size=64, context_length=context_length, n_layer=1, n_head=2,
                      n_kv_head=1, n_embd=16, mlp_dim=32, dropout=0.0, tokenizer=str(folder))
    params = jax.tree_util.tree_map(lambda x: x * 8.0, init_params(cfg, jax.random.key(0)))
    return cfg, params, load_tokenizer(str(folder))


def _chat(monkeypatch, capsys, model, lines, *flags):
    from jaxgpt.cli import chat

    monkeypatch.setattr(chat, "load_init", lambda spec: model[:2])
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    rc = chat.main(["--init", "x", "--max-new-tokens", "6", *flags])
    out, err = capsys.readouterr()
    answers = [block.split("\n", 1)[1].rstrip() for block in out.split("you> ")[1:]]
    return rc, answers, err


def test_chat_sends_the_whole_conversation_through_the_template(tmp_path, monkeypatch, capsys):
    from jaxgpt.generation.session import DecodeSession

    cfg, params, tok = _chat_model(tmp_path)
    reused, turn = [], DecodeSession.generate_tokens

    def recorded(self, *args, **kwargs):  # how much of each prompt the chat's KV cache held
        out = turn(self, *args, **kwargs)
        reused.append((self.reused, int(np.asarray(args[1]).sum())))
        return out

    monkeypatch.setattr(DecodeSession, "generate_tokens", recorded)
    rc, answers, err = _chat(monkeypatch, capsys, (cfg, params), ["w1 w2", "w3", "/reset", "w3"],
                             "--system", "w9")
    assert rc == 0 and len(answers) == 4 and answers[2] == "" and "forgotten" in err
    # turn 2 prefills only what follows turn 1's prompt and answer; after /reset, the system turn is kept
    (first, n1), (second, n2), (third, _) = reused
    assert first == 0 and second > n1 and 0 < third < n1

    def ask(messages):  # transformers' apply_chat_template + greedy generate, ending at the template's turn end
        from jaxgpt.text.chat import render_chat

        prompt = render_chat(tok.chat_template, messages, add_generation_prompt=True, eos_token=tok.eos_token)
        return generate(params, cfg, [tok.encode(prompt)], max_new_tokens=6, tokenizer=tok,
                        stop=[tok.turn_end])[0].strip()

    system = [{"role": "system", "content": "w9"}]
    first = ask(system + [{"role": "user", "content": "w1 w2"}])
    second = ask(system + [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "w3"}])
    alone = ask(system + [{"role": "user", "content": "w3"}])
    assert answers[0] == first and answers[1] == second and answers[3] == alone and second != alone


def test_chat_leaves_out_old_exchanges_that_do_not_fit(tmp_path, monkeypatch, capsys):
    cfg, params, tok = _chat_model(tmp_path, context_length=40)
    from jaxgpt.cli.chat import Conversation

    conv = Conversation(tok, context_length=40, max_new_tokens=6)
    for i in range(4):
        ids, new, left_out = conv.prompt(f"w{i} w{i} w{i}")
        assert len(ids) + new <= 40 and new == 6
        conv.add(f"w{i} w{i} w{i}", "w7 w8 w9 w10")
    assert left_out >= 1 and tok.decode(ids).count("w7 w8 w9 w10") == 3 - left_out  # the answers kept
    with pytest.raises(UserError, match="no room to answer"):
        conv.prompt(" ".join(["w5"] * 40))
    rc, answers, err = _chat(monkeypatch, capsys, (cfg, params), ["w1 w1 w1 w1 w1", "w2 w2 w2 w2 w2",
                                                                  " ".join(["w5"] * 40), "w3 w3 w3 w3 w3"])
    assert rc == 0 and len(answers) == 4 and "left out" in err and "no room to answer" in err


def test_chat_without_a_template_asks_each_message_in_alpaca(monkeypatch, capsys):
    import dataclasses

    from jaxgpt.cli import chat
    from jaxgpt.text.prompts import format_prompt

    cfg = dataclasses.replace(CFG, context_length=176)  # the Alpaca prompt: ~150 characters
    monkeypatch.setattr(chat, "get_tokenizer", lambda config: CharTokenizer())
    rc, answers, err = _chat(monkeypatch, capsys, (cfg, _params(cfg)), ["Say hi", "Say hi"])
    assert rc == 0 and "Alpaca" in err and answers[0] == answers[1]
    want = generate(_params(cfg), cfg, [format_prompt("Say hi")], max_new_tokens=6, tokenizer=CharTokenizer())
    assert answers[0] == want[0].strip()
    rc, _, err = _chat(monkeypatch, capsys, (cfg, _params(cfg)), ["x"], "--system", "be brief")
    assert rc == 2 and "chat template" in err


def test_ctrl_c_ends_the_answer_not_the_chat(capsys):
    """Ctrl-C while an answer is decoded sets the event (no KeyboardInterrupt), and the
    printer's True ends the answer at the next piece; the chat goes on."""
    from jaxgpt.cli.chat import run_interruptibly
    from jaxgpt.cli.generate import Printer

    interrupt = threading.Event()
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    assert run_interruptibly(lambda: interrupt.wait(20) and "stopped", interrupt) == "stopped"
    answer = generate(_params(CFG), CFG, ["hi"], max_new_tokens=10, tokenizer=CharTokenizer(), stop_at_eos=False,
                      on_text=Printer(interrupt=interrupt))[0]
    assert len(answer) == 1 and capsys.readouterr().out == answer
    with pytest.raises(ValueError, match="boom"):
        run_interruptibly(lambda: (_ for _ in ()).throw(ValueError("boom")), threading.Event())
