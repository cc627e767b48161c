"""`python -m jaxgpt perplexity` and `jaxgpt.train.perplexity.corpus_loss` against
transformers, which jaxgpt did not write: a tiny random GPT-2 (GPT-2's 50,257-id BPE) on the
bundled corpus and a tiny Llama with a word-level `tokenizer.json` of its own, each split's
loss the mean cross-entropy over every target token of non-overlapping windows, computed
here in torch (float32: relative 1e-5); sliding windows (`--stride`) against transformers'
strided-perplexity loop, each target scored once; bits per byte over the bytes tiktoken
decodes the scored targets to. One device and four, with a padded last batch, give the same
loss; a pretraining run's own `val_loss` is what the command reports for its split. Bad
input is one line, exit code 2, and nothing written."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxgpt.cli.perplexity import main  # noqa: E402
from jaxgpt.data.windows import split_tokens  # noqa: E402
from tests.hf_gpt2 import make_hf_model  # noqa: E402
from tests.test_text import make_hf_tokenizer  # noqa: E402

T = 20  # tokens a window: 231 train and 25 val windows of the bundled corpus, neither a multiple of 8 or 3


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary, saved as transformers saves it."""
    folder = tmp_path_factory.mktemp("hf_gpt2_bpe")
    model = make_hf_model(0, vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model.save_pretrained(folder)
    return folder, model


def reference_loss(model, tokens: np.ndarray, context: int) -> tuple[float, int]:
    """(mean next-token cross-entropy, windows) of `model` over windows `tokens[i*T : i*T + T + 1]`."""
    n = (len(tokens) - context - 1) // context + 1
    rows = np.stack([tokens[i * context: i * context + context + 1] for i in range(n)]).astype(np.int64)
    total = 0.0
    with torch.no_grad():
        for lo in range(0, n, 16):
            chunk = torch.from_numpy(rows[lo: lo + 16])
            logits = model(chunk[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    return total / (n * context), n


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_gpt2_folder_matches_transformers(gpt2_folder, tmp_path, capsys):
    """The bundled corpus, split 0.9 / 0.1, windows of 20: both splits' losses are
    transformers' (GPT-2 BPE tokens through jaxgpt's offline tiktoken); then the val split on
    one device, 3 windows a batch (a padded last batch), is the same number."""
    from jaxgpt.data import load_splits
    from jaxgpt.data.bundled import bundled_path
    from jaxgpt.config import DataConfig
    from jaxgpt.io.hub import resolve_init
    from jaxgpt.parallel import DataParallel
    from jaxgpt.text.tokenizer import load_tokenizer
    from jaxgpt.train.perplexity import corpus_loss

    folder, model = gpt2_folder
    out = tmp_path / "ppl.json"
    code, printed, _ = _run(["--init", folder, "--context-length", T, "--val-ratio", 0.1, "--cache-dir", tmp_path,
                             "--out", out], capsys)
    assert code == 0
    result = json.loads(out.read_text())
    tokens = np.asarray(load_tokenizer("gpt2").encode(bundled_path("the-verdict").read_text(encoding="utf-8")))
    for name, part in zip(("train", "val"), split_tokens(tokens, 0.1)):
        want, windows = reference_loss(model, part, T)
        got = result["splits"][name]
        assert (got["windows"], got["tokens"]) == (windows, windows * T)
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
        assert f"{got['loss']:.4f}" in printed
        # bits per byte: the loss summed over the targets, per byte of the text they decode to
        n_bytes = len(load_tokenizer("gpt2").encoding.decode_bytes(part[1: 1 + windows * T].tolist()))
        assert got["bytes"] == n_bytes
        assert got["bits_per_byte"] == pytest.approx(want * windows * T / (math.log(2) * n_bytes), rel=1e-5)
    config, params = resolve_init(str(folder))
    val = load_splits(DataConfig(path="the-verdict", val_ratio=0.1, cache_dir=str(tmp_path)), T).val
    assert len(val) % 3 and len(val) % 8  # both batch sizes pad their last batch
    one = corpus_loss(config, params, val, batch_size=3, layout=DataParallel(1))
    assert one["loss"] == pytest.approx(result["splits"]["val"]["loss"], rel=1e-6)


def hf_strided_loss(model, tokens: np.ndarray, context: int, stride: int) -> tuple[float, int]:
    """transformers' "perplexity of fixed-length models" loop (labels -100 on the targets an
    earlier window scored), over the full windows only: (mean loss, targets scored)."""
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    total, count, scored_to = 0.0, 0, 0  # scored_to: tokens up to here have been targets
    with torch.no_grad():
        for begin in range(0, len(tokens) - context, stride):
            window = ids[:, begin: begin + context + 1]
            labels = window.clone()
            labels[:, : max(scored_to - begin, 1)] = -100  # (position 0 is never a target)
            n = int((labels[:, 1:] != -100).sum())
            total += model(window, labels=labels).loss.item() * n
            count, scored_to = count + n, begin + context + 1
    return total / count, count


@pytest.mark.parametrize("stride", [7, 20, 33])
def test_sliding_windows_score_each_target_once(gpt2_folder, tmp_path, capsys, stride):
    """`--stride` 7 (sliding), 20 (= the context: the default) and 33 (gaps between windows)
    give transformers' strided loss over the same windows and count the targets it scores;
    `--max-windows 5` the loss of the first five windows alone."""
    from jaxgpt.data.bundled import bundled_path
    from jaxgpt.text.tokenizer import load_tokenizer

    folder, model = gpt2_folder
    text = bundled_path("the-verdict").read_text(encoding="utf-8")[:3000]
    corpus = tmp_path / "start.txt"
    corpus.write_text(text)
    code, printed, _ = _run(["--init", folder, "--data", corpus, "--context-length", T, "--stride", stride,
                             "--batch", 4, "--cache-dir", tmp_path, "--out", tmp_path / "ppl.json"], capsys)
    assert code == 0
    got = json.loads((tmp_path / "ppl.json").read_text())["splits"]["all"]
    tokens = np.asarray(load_tokenizer("gpt2").encode(text))
    want, count = hf_strided_loss(model, tokens, T, stride)
    assert got["tokens"] == count and got["loss"] == pytest.approx(want, rel=1e-5)
    if stride <= T:  # the scored targets are tokens 1 .. count, once each
        assert got["bytes"] == len(load_tokenizer("gpt2").encoding.decode_bytes(tokens[1: 1 + count].tolist()))
    argv = ["--init", folder, "--data", corpus, "--context-length", T, "--stride", stride, "--max-windows", 5]
    code, _, _ = _run([*argv, "--batch", 4, "--cache-dir", tmp_path, "--out", tmp_path / "first.json"], capsys)
    first = json.loads((tmp_path / "first.json").read_text())["splits"]["all"]
    want, count = hf_strided_loss(model, tokens[: 4 * stride + T + 1], T, stride)  # the first 5 windows' tokens
    assert first["windows"] == 5 and first["tokens"] == count and first["loss"] == pytest.approx(want, rel=1e-5)
    assert (f"every {stride}" in printed) == (stride != T)


def test_llama_folder_with_its_own_tokenizer(tmp_path, capsys):
    """A tiny Llama saved by transformers beside a word-level `tokenizer.json`: the corpus is
    tokenized with the folder's tokenizer (read here with `tokenizers`), the whole corpus one
    split (`all`)."""
    from tokenizers import Tokenizer

    from jaxgpt.config import ModelConfig
    from jaxgpt.models import family_of

    cfg = ModelConfig(family="llama", vocab_size=211, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      mlp_dim=48, dropout=0.0, qkv_bias=False)
    torch.manual_seed(0)
    model = family_of(cfg).torch_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    make_hf_tokenizer(folder, n_words=200)
    words = np.random.default_rng(0).integers(0, 200, 1500)
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{i}" for i in words))
    code, printed, _ = _run(["--init", folder, "--data", corpus, "--context-length", 24, "--batch", 4,
                             "--cache-dir", tmp_path, "--out", tmp_path / "ppl.json"], capsys)
    assert code == 0, printed
    got = json.loads((tmp_path / "ppl.json").read_text())["splits"]
    assert list(got) == ["all"]
    tokens = np.asarray(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(corpus.read_text()).ids)
    want, windows = reference_loss(model, tokens, 24)
    assert got["all"]["windows"] == windows and got["all"]["loss"] == pytest.approx(want, rel=1e-5)
    assert "bits_per_byte" not in got["all"] and "n/a" in printed  # a word-level tokenizer: no byte count


def test_a_runs_val_loss(tmp_path, capsys):
    """`--val-ratio` and the context of a pretraining run give its metrics.json `val_loss`."""
    from jaxgpt.config import load_config
    from jaxgpt.tasks.pretrain import pretrain

    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.context_length=32", "train.max_steps=2",
            "train.eval_interval=2", "train.batch_size=4", "train.sample_tokens=0", f"data.cache_dir={tmp_path}"]
    summary = pretrain(load_config(None, tiny), tmp_path / "run")
    code, _, _ = _run(["--init", tmp_path / "run", "--val-ratio", 0.1, "--cache-dir", tmp_path,
                       "--out", tmp_path / "ppl.json"], capsys)
    assert code == 0
    got = json.loads((tmp_path / "ppl.json").read_text())["splits"]["val"]["loss"]
    assert got == pytest.approx(summary["val_loss"], rel=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(gpt2_folder, tmp_path, capsys):
    folder, model = gpt2_folder
    small = tmp_path / "hf_small_vocab"  # GPT-2's tokenizer, 257 ids in the model: a mismatch
    make_hf_model(1, vocab_size=257, n_positions=64, n_embd=32, n_layer=1, n_head=4).save_pretrained(small)
    nan = tmp_path / "hf_nan"
    broken = make_hf_model(2, vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=4)
    with torch.no_grad():
        broken.transformer.ln_f.weight[0] = float("nan")
    broken.save_pretrained(nan)
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    out = tmp_path / "ppl.json"
    window = ["--context-length", T]
    cases = {
        "do not match": ["--init", small, *window],
        "longer than the model's context (64)": ["--init", folder, "--context-length", 65],
        "--batch": ["--init", folder, "--batch", 6, *window],
        "use a smaller --context-length": ["--init", folder, "--data", short, *window],
        "no such directory": ["--init", folder, *window, "--out", tmp_path / "nowhere" / "ppl.json"],
        "not finite": ["--init", nan, *window],
    }
    for message, argv in cases.items():
        out_flag = [] if "--out" in argv else ["--out", out]
        code, printed, err = _run([*argv, "--cache-dir", tmp_path, *out_flag], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, (message, err)
        assert not out.exists() and not printed
