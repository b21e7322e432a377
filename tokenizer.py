"""A byte-level BPE tokenizer for code, trained from scratch here and served by tiktoken (Codex §3.2).

Codex reused GPT-2's BPE and added tokens for runs of 2..25 spaces, because indentation costs GPT-2
one token per space; that alone gave ~30% fewer tokens on code. We train our own BPE on code
(nanochat-style: our own trainer, tiktoken for fast encoding) and keep that idea:

1. Pre-tokenization. A regex splits text into "words" that merges never cross (`CODE_PATTERN`):
   letters with one leading character (" self", ".append", "(x"), numbers, punctuation runs, and
   whitespace, where a line break and the whole indentation of the next line form one word
   ("\\n        ", then "return").
2. Whitespace-run tokens: runs of 2..25 spaces are explicit tokens (ranks 256..279) before any
   learned merge, so any run of up to 25 spaces is one token whatever the data. With
   `whitespace_runs=False` (the ablation) the pattern cuts whitespace into single characters and
   no token holds two whitespace characters: GPT-2's situation on code.
3. Training (Sennrich et al. 2016): start from the 256 bytes, repeatedly merge the most frequent
   adjacent pair of tokens. Pair counts are kept incrementally over the unique words (with their
   frequencies): a merge only revisits the words that contain the pair and updates the counts of
   the pairs it touched.
4. Serving: the tokens, in merge order, are tiktoken's `mergeable_ranks`; tiktoken encodes by
   repeatedly merging the adjacent pair whose concatenation has the lowest rank, which replays our
   merges. Specials `<|endoftext|>` and `<|pad|>` take the last two ids, so `n_vocab` is exactly
   the requested vocab size. Every byte is a token, so every string round-trips.

The stdlib has no tab characters, so there are no explicit tab-run tokens. Bytes per token with and
without the whitespace-run tokens, and against other pre-tokenizers: docs/RESULTS.md, "Tokenizer".

CLI:
    python tokenizer.py --input out/tiny/code/train --vocab_size 4096 --out out/tiny/tokenizer.json \\
        --eval out/tiny/code/val --report out/tiny/tokenizer_report.json [--compare_gpt2]
"""
import argparse
import base64
import hashlib
import heapq
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex  # installed with tiktoken; the same regex syntax as tiktoken's Rust engine
import tiktoken
from tqdm import tqdm

from common import die

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = (EOT, PAD)
NAME = "flywheel"
FORMAT = "flywheel-tokenizer-v1"
MAX_SPACE_RUN = 25  # Codex: tokens for runs of 2..25 spaces

# Pre-tokenizer pieces (the `regex` module here, Rust's fancy-regex inside tiktoken: same syntax).
# Chosen by measuring bytes/token on held-out stdlib code (see the module docstring).
_WORD = r"[^\r\n\p{L}\p{N}]?\p{L}+"  # letters with one optional leading char: " self", ".append", "(x", "_name"
_NUMBER = r" ?\p{N}+"  # a number with one optional leading space
_PUNCT = r"[^\S\r\n]?[^\s\p{L}\p{N}]+"  # a run of operators/brackets/quotes ("):", " ==", '"""')
_WS_RUNS = r"[\r\n]+[^\S\r\n]*|\s+(?!\S)|\s+"  # line break(s) + the next line's whole indentation;
#                                                  other runs leave their last space to the next word
_WS_SINGLE = r"\s"  # ablation: whitespace never merges with whitespace
CODE_PATTERN = "|".join([_WORD, _NUMBER, _PUNCT, _WS_RUNS])
CODE_PATTERN_NO_WS = "|".join([_WORD, _NUMBER, _PUNCT, _WS_SINGLE])
# GPT-2's pre-tokenizer (Radford et al. 2019), for the comparison: a standard BPE on the same files.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------- training

def count_words(texts, pattern, progress=False):
    """Split each text with the pre-tokenizer regex; return {word bytes: frequency}."""
    compiled = regex.compile(pattern)
    counts = Counter()
    for text in tqdm(texts, desc="pre-tokenize", unit="doc", disable=not progress):
        counts.update(compiled.findall(text))
    return {w.encode("utf-8"): n for w, n in counts.items()}


def whitespace_run_tokens(max_run=MAX_SPACE_RUN):
    """The explicit whitespace-run tokens: runs of 2..max_run spaces (Codex §3.2)."""
    return [b" " * n for n in range(2, max_run + 1)]


def rank_merge(piece, ranks):
    """Encode one pre-token the way tiktoken does: merge the adjacent pair whose concatenation has
    the lowest rank (leftmost on ties) until no concatenation is a token. Returns the token ids."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, where = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, where = r, i
        if best is None:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return [ranks[p] for p in parts]


def _merge_pair(symbols, a, b, new):
    """Replace every non-overlapping occurrence (left to right) of the pair (a, b) by `new`."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(word_counts, n_merges, reserved=(), progress=False):
    """Byte-level BPE with incremental pair counts. Returns the vocabulary (a list of byte strings,
    index = rank): the 256 bytes, then `reserved` tokens, then the learned merges in order.

    word_counts: {word bytes: frequency}, the unique pre-tokens. Each word is a list of token ids;
    `pair_counts[(a, b)]` is the frequency-weighted number of adjacent (a, b) in all words and
    `where[(a, b)]` the words that (may) contain it. The most frequent pair comes from a heap with
    lazy deletion (an entry is stale when its count differs from `pair_counts`); ties go to the
    smallest (a, b) ids, so training is deterministic. A merge rewrites only the words in
    `where[pair]` and applies, per word, the difference between its old and new pair multisets.
    """
    vocab = [bytes([i]) for i in range(256)] + list(reserved)
    ranks = {tok: i for i, tok in enumerate(vocab)}
    assert len(ranks) == len(vocab), "reserved tokens must be distinct multi-byte strings"
    words, freqs = [], []
    for w in sorted(word_counts):  # sorted: the result never depends on input order
        symbols = rank_merge(w, ranks) if reserved else list(w)
        if len(symbols) > 1:
            words.append(symbols)
            freqs.append(word_counts[w])
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for wi, (symbols, f) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    for _ in tqdm(range(n_merges), desc="merges", unit="merge", disable=not progress):
        while heap:  # pop the most frequent live pair
            neg, a, b = heapq.heappop(heap)
            if pair_counts.get((a, b), 0) == -neg:
                break
        else:
            raise ValueError(f"the corpus only supports {len(vocab) - 256 - len(reserved)} merges, "
                             f"{n_merges} were asked for: use more text or a smaller vocab_size")
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        changed = set()
        for wi in where.pop((a, b)):
            old = words[wi]
            merged = _merge_pair(old, a, b, new)
            if len(merged) == len(old):  # stale entry: the pair left this word earlier
                continue
            delta = Counter(zip(merged, merged[1:]))
            delta.subtract(zip(old, old[1:]))
            f = freqs[wi]
            for pair, d in delta.items():
                if d:
                    pair_counts[pair] += d * f
                    changed.add(pair)
                    if d > 0:
                        where[pair].add(wi)
            words[wi] = merged
        pair_counts.pop((a, b), None)
        changed.discard((a, b))
        for pair in changed:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, *pair))
            else:
                del pair_counts[pair]
    return vocab


def make_encoding(vocab, pattern, name=NAME):
    """A tiktoken Encoding from a vocabulary in rank order; the specials take the next ids."""
    ranks = {tok: i for i, tok in enumerate(vocab)}
    if len(ranks) != len(vocab):
        raise ValueError("duplicate tokens in the vocabulary")
    specials = {s: len(vocab) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=len(vocab) + len(specials))


def train(texts, vocab_size, whitespace_runs=True, pattern=None, max_space_run=MAX_SPACE_RUN,
          name=NAME, progress=False):
    """Train a code BPE on `texts` (an iterable of str); return a `tiktoken.Encoding` with exactly
    `vocab_size` tokens: 256 bytes, the whitespace-run tokens (if `whitespace_runs`), learned
    merges, then `<|endoftext|>` and `<|pad|>`. `pattern` overrides the pre-tokenizer regex
    (default CODE_PATTERN, or CODE_PATTERN_NO_WS without whitespace runs; GPT2_PATTERN for the
    standard-BPE comparison)."""
    if pattern is None:
        pattern = CODE_PATTERN if whitespace_runs else CODE_PATTERN_NO_WS
    reserved = whitespace_run_tokens(max_space_run) if whitespace_runs else []
    n_merges = vocab_size - 256 - len(reserved) - len(SPECIALS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum "
                         f"{256 + len(reserved) + len(SPECIALS)}")
    word_counts = count_words(texts, pattern, progress=progress)
    vocab = train_bpe(word_counts, n_merges, reserved=reserved, progress=progress)
    return make_encoding(vocab, pattern, name=name)


def special_ids(enc):
    """(end-of-text id, padding id) of a flywheel tokenizer."""
    return enc.encode_single_token(EOT), enc.encode_single_token(PAD)


def bytes_per_token(enc, texts):
    """Compression on `texts`: UTF-8 bytes per token (specials in the text are plain text)."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts))
    return n_bytes / max(1, n_tokens)


# ----------------------------------------------------------------------------- (de)serialisation

def to_state(enc):
    """A JSON-serialisable dict that rebuilds `enc` exactly: pattern, tokens in rank order (base64),
    specials. Checkpoints embed the tokenizer this way."""
    ranks = enc._mergeable_ranks  # tiktoken's own pickling (__getstate__) reads the same fields
    tokens = sorted(ranks, key=ranks.get)
    if [ranks[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("mergeable ranks are not 0..n-1")
    return {"format": FORMAT, "name": enc.name, "pattern": enc._pat_str,
            "tokens": [base64.b64encode(t).decode("ascii") for t in tokens],
            "specials": dict(sorted(enc._special_tokens.items(), key=lambda kv: kv[1]))}


def from_state(state):
    """Rebuild the tiktoken Encoding saved by `to_state`; ValueError if `state` is not one."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} tokenizer state")
    try:
        tokens = [base64.b64decode(t, validate=True) for t in state["tokens"]]
        specials = {str(k): int(v) for k, v in state["specials"].items()}
        pattern, name = str(state["pattern"]), str(state["name"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt tokenizer state: {e}") from None
    if len(set(tokens)) != len(tokens):
        raise ValueError("corrupt tokenizer state: duplicate tokens")
    if sorted(specials.values()) != list(range(len(tokens), len(tokens) + len(specials))):
        raise ValueError("corrupt tokenizer state: special ids must follow the mergeable tokens")
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(tokens)},
                             special_tokens=specials, explicit_n_vocab=len(tokens) + len(specials))


def state_hash(enc):
    """A short content hash of the tokenizer (recorded next to token files that it produced)."""
    blob = json.dumps(to_state(enc), sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def save(enc, path):
    """Write the tokenizer as one JSON file (atomically: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_state(enc), separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)


def load(path):
    """Read a tokenizer written by `save`; exits with a one-line error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        die(f"tokenizer {path} not found: train one with `python tokenizer.py --input DIR --out {path}`")
    try:
        return from_state(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        die(f"{path} is not a flywheel tokenizer file ({str(e).splitlines()[0][:200]})")


# ----------------------------------------------------------------------------- files

def python_files(paths):
    """The .py files under each path (directories walked recursively), sorted, without duplicates."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.py") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            die(f"{p} not found (expected a directory of .py files or a file)")
    return list(dict.fromkeys(files))


def read_texts(files, max_bytes=0):
    """UTF-8 texts of `files` (others skipped). With `max_bytes`, a deterministic sample spread over
    the files (ordered by a hash of the name) stopping once max_bytes are read."""
    if max_bytes:
        files = sorted(files, key=lambda f: hashlib.sha1(str(f.name).encode()).hexdigest())
    texts, total = [], 0
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")  # exact bytes: no newline translation
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes and total >= max_bytes:
            break
    return texts


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Train the byte-level code BPE (Codex §3.2) and report bytes/token.",
        epilog="example: python tokenizer.py --input out/tiny/code/train --vocab_size 4096 "
               "--out out/tiny/tokenizer.json --eval out/tiny/code/val --report out/tiny/tokenizer_report.json")
    p.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="training code: .py files or directories walked for .py files")
    p.add_argument("--vocab_size", type=int, default=4096, help="total tokens, specials included")
    p.add_argument("--out", required=True, help="where to write the tokenizer (one JSON file)")
    p.add_argument("--max_bytes", type=int, default=50_000_000,
                   help="train on a deterministic sample of about this many bytes (0: everything). "
                        "Training takes ~1 s/MB; past ~20 MB of code bytes/token barely moves")
    p.add_argument("--no_whitespace_runs", action="store_true",
                   help="train without whitespace-run tokens (the ablation) and save that one")
    p.add_argument("--eval", nargs="+", metavar="DIR_OR_FILE",
                   help="held-out code: report bytes/token with and without whitespace-run tokens")
    p.add_argument("--compare_gpt2", action="store_true",
                   help="with --eval: also train a standard BPE with GPT-2's pre-tokenizer, same size and data")
    p.add_argument("--report", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.compare_gpt2 and not args.eval:
        die("--compare_gpt2 needs --eval")

    files = python_files(args.input)
    texts = read_texts(files, args.max_bytes)
    if not texts:
        die(f"no readable .py files in {' '.join(args.input)}")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    sample = f" (a sample of {len(files)} files)" if len(texts) < len(files) else ""
    print(f"training on {len(texts)} files{sample}, {n_bytes / 1e6:.2f} MB, vocab_size {args.vocab_size}")
    ws = not args.no_whitespace_runs
    t0 = time.time()
    try:
        enc = train(texts, args.vocab_size, whitespace_runs=ws, progress=True)
    except ValueError as e:
        die(str(e))
    seconds = time.time() - t0
    save(enc, args.out)
    print(f"trained in {seconds:.1f}s -> {args.out} (n_vocab {enc.n_vocab})")

    report = {"vocab_size": enc.n_vocab, "train_seconds": round(seconds, 2), "train_bytes": n_bytes}
    if args.eval:
        held_out = read_texts(python_files(args.eval))
        if not held_out:
            die(f"no readable .py files in {' '.join(args.eval)}")
        variants = {"bytes_per_token": enc}
        print("training the ablation" + (" and the GPT-2-style BPE" if args.compare_gpt2 else ""))
        variants["bytes_per_token_no_ws" if ws else "bytes_per_token_ws"] = train(
            texts, args.vocab_size, whitespace_runs=not ws, progress=True)
        if args.compare_gpt2:
            variants["bytes_per_token_gpt2_pattern"] = train(
                texts, args.vocab_size, whitespace_runs=False, pattern=GPT2_PATTERN, progress=True)
        for key, e in variants.items():
            report[key] = round(bytes_per_token(e, held_out), 4)
            print(f"{key:>30}: {report[key]:.3f} bytes/token on {len(held_out)} held-out files")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report -> {args.report}")


if __name__ == "__main__":
    main()
