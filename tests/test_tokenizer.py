"""Tests for tokenizer.py: the BPE trainer, the whitespace-run tokens, tiktoken serving, (de)serialisation."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import regex

import tokenizer as T

# A small real-code corpus: a few stdlib modules (always present with this Python).
_MODULES = ["textwrap", "json.decoder", "json.encoder", "fnmatch", "bisect", "shlex"]


def _stdlib_texts():
    import importlib
    return [Path(importlib.import_module(m).__file__).read_text(encoding="utf-8") for m in _MODULES]


@pytest.fixture(scope="module")
def code_texts():
    return _stdlib_texts()


@pytest.fixture(scope="module")
def enc(code_texts):
    return T.train(code_texts, 600)


TRICKY = [
    "", " ", "\n", "\t\t", "\r\n", "a\r\nb\r\n", " " * 100, "\n" * 30, "    \n  \n\t \n",
    "def f():\r\n\treturn 1\r\n", "naïve café 日本語 🎉👍🏽", "\x00\x01\x7f\x1c", "\u200b\u00a0\u3000",
    "e\u0301", "\ufeffimport os", "x = '\\n'  # comment\n", "🎉" * 10, "a" * 1000, "1234567890" * 5,
    "<|endoftext|>", "before<|endoftext|>after<|pad|>", "if x:\n        return y\n",
]


@pytest.mark.parametrize("ws", [True, False])
def test_round_trip_tricky_strings(code_texts, ws):
    e = T.train(code_texts, 400, whitespace_runs=ws)
    for s in TRICKY:
        assert e.decode(e.encode(s, allowed_special="all")) == s
        assert e.decode(e.encode_ordinary(s)) == s
    whole = "".join(code_texts)
    assert e.decode(e.encode_ordinary(whole)) == whole


def test_n_vocab_and_specials(enc):
    assert enc.n_vocab == 600
    eot, pad = enc.n_vocab - 2, enc.n_vocab - 1
    assert enc.eot_token == eot
    assert enc.encode(T.EOT, allowed_special="all") == [eot]
    assert enc.encode(T.PAD, allowed_special="all") == [pad]
    assert enc.decode([eot, pad]) == T.EOT + T.PAD
    assert enc.encode("x" + T.EOT, allowed_special={T.EOT})[-1] == eot
    assert eot not in enc.encode_ordinary(T.EOT)  # text that looks special stays text
    with pytest.raises(ValueError):
        enc.encode(T.EOT)  # tiktoken refuses unexpected specials by default


def test_whitespace_run_tokens(enc):
    for n in range(2, T.MAX_SPACE_RUN + 1):
        assert enc.encode(" " * n) == [256 + n - 2]  # explicit tokens, ranks 256..279
    assert len(enc.encode(" " * 8)) == 1  # 8 spaces of indentation: one token
    # trained on code, a line break plus 8 spaces of indentation is one learned token
    ids = enc.encode("\n        return")
    assert [enc.decode([i]) for i in ids] == ["\n        ", "return"]


def test_no_whitespace_runs_ablation(code_texts, enc):
    e = T.train(code_texts, 600, whitespace_runs=False)
    assert e.n_vocab == 600
    tokens = [e.decode_single_token_bytes(i) for i in range(e.n_vocab - 2)]
    assert not any(re.search(rb"\s\s", t) for t in tokens)  # no token holds two whitespace bytes
    assert len(e.encode(" " * 8)) == 8
    assert T.bytes_per_token(enc, code_texts) > 1.2 * T.bytes_per_token(e, code_texts)


def test_hand_checked_merges():
    # Wikipedia's example: aaabdaaabac -> ZabdZabac (Z=aa) -> ZYdZYac (Y=ab) -> XdXac (X=ZY)
    e = T.train(["aaabdaaabac"], 256 + 3 + 2, whitespace_runs=False)
    assert [e.decode_single_token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert e.encode_ordinary("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    # frequencies of unique words: ab 5x, bc 3x, abc 2x -> ab (7), then bc (3) beats (ab)c (2)
    vocab = T.train_bpe({b"ab": 5, b"bc": 3, b"abc": 2}, 3)
    assert vocab[256:] == [b"ab", b"bc", b"abc"]


def test_too_many_merges_is_a_clear_error():
    with pytest.raises(ValueError, match="merges"):
        T.train(["ab"], 256 + 2 + 2, whitespace_runs=False)
    with pytest.raises(ValueError, match="minimum"):
        T.train(["ab"], 100)


def _naive_bpe(word_counts, n_merges):
    """Reference: recount every pair from scratch before each merge (slow, obviously right)."""
    words = {w: list(w) for w in word_counts}
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(n_merges):
        counts = Counter()
        for w, syms in words.items():
            for p in zip(syms, syms[1:]):
                counts[p] += word_counts[w]
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        words = {w: T._merge_pair(s, a, b, new) for w, s in words.items()}
    return vocab


def test_incremental_counts_match_recounting(code_texts):
    counts = T.count_words(code_texts[:2], T.CODE_PATTERN_NO_WS)
    assert T.train_bpe(counts, 150) == _naive_bpe(counts, 150)


def test_training_is_deterministic(code_texts):
    a = T.to_state(T.train(code_texts, 500))
    b = T.to_state(T.train(list(reversed(code_texts)), 500))
    assert a == b


def test_tiktoken_replays_our_regex_and_merges(enc, code_texts):
    text = code_texts[0]
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab - 2)}
    pieces = regex.findall(T.CODE_PATTERN, text)
    assert "".join(pieces) == text
    per_piece = [T.rank_merge(p.encode("utf-8"), ranks) for p in pieces]
    assert [i for ids in per_piece for i in ids] == enc.encode_ordinary(text)


def test_pretokenizer_keeps_indentation_with_the_line_break():
    pieces = regex.findall(T.CODE_PATTERN, "class A:\n    def f(self, x):\n\n        return x  # c\n")
    assert pieces == ["class", " A", ":", "\n    ", "def", " f", "(self", ",", " x", "):",
                      "\n\n        ", "return", " x", " ", " #", " c", "\n"]


def test_bytes_per_token_by_hand():
    bytes_only = T.train(["abc"], 258, whitespace_runs=False)  # no merges: one token per byte
    assert T.bytes_per_token(bytes_only, ["hello", "é"]) == 1.0
    ws_only = T.train(["abc"], 282)  # the 24 space-run tokens, no merges
    assert T.bytes_per_token(ws_only, ["        x"]) == 3.0  # 7 spaces, " ", "x"


def test_save_load_and_state_round_trip(enc, tmp_path, code_texts):
    state = T.to_state(enc)
    state2 = json.loads(json.dumps(state))
    e2 = T.from_state(state2)
    T.save(enc, tmp_path / "tok.json")
    e3 = T.load(tmp_path / "tok.json")
    for e in (e2, e3):
        assert T.to_state(e) == state
        assert e.n_vocab == enc.n_vocab and e.eot_token == enc.eot_token
        assert e.encode(code_texts[1], allowed_special="all") == enc.encode(code_texts[1], allowed_special="all")
    assert T.state_hash(e3) == T.state_hash(enc)


def test_load_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for content in ["not json", "{}", json.dumps({"format": T.FORMAT, "tokens": 3})]:
        bad.write_text(content)
        with pytest.raises(SystemExit):
            T.load(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    with pytest.raises(ValueError):
        T.from_state({"format": "something else"})


def test_cli_trains_evaluates_and_reports(tmp_path, code_texts):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    (train_dir / "pkg").mkdir(parents=True)
    val_dir.mkdir()
    for i, t in enumerate(code_texts[:-1]):
        (train_dir / "pkg" / f"m{i}.py").write_text(t)
    (train_dir / "notes.txt").write_text("ignored: not a .py file")
    (val_dir / "v.py").write_text(code_texts[-1])
    out, report = tmp_path / "tok.json", tmp_path / "report.json"
    T.main(["--input", str(train_dir), "--vocab_size", "400", "--out", str(out),
            "--eval", str(val_dir), "--report", str(report), "--compare_gpt2"])
    r = json.loads(report.read_text())
    assert r["vocab_size"] == 400 == T.load(out).n_vocab
    assert r["bytes_per_token"] > r["bytes_per_token_no_ws"] > 1.0
    assert {"train_seconds", "bytes_per_token_gpt2_pattern"} <= set(r)
    with pytest.raises(SystemExit):
        T.main(["--input", str(tmp_path / "nope"), "--out", str(out)])
