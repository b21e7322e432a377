"""The fast sampler (engine.py) against the plain one (model.generate, model.sample_token) and
against the maths: draws of both samplers follow exactly the distribution that temperature / top-k /
top-p define, the stop-string automaton agrees with searching the text, the engine's KV-cache path
gives its naive path's tokens and log-probs (rows leaving the batch, prompts prefilled once), and
the engine gives the plain generate's tokens: greedy always, sampled token for token where both
map a row's uniform numbers to a token the same way (top-k: the sorted candidates' running sums).

Why the rest of sampling is compared by distribution: for the full distribution and for a nucleus
that sure_nucleus settles without sorting, the engine inverts running sums in vocabulary order in
two levels with two uniform numbers; the plain sampler inverts the sorted probabilities' running sum
with one. The same uniforms then pick different tokens of the same distribution. And once rows
finish, the engine drops them from the batch, so it draws fewer uniform numbers per step than the
plain generate, which keeps every row to the end: the two streams part there."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import engine
import model
from engine import StopStrings, generate, sample_next
from model import GPT, GPTConfig, sample_token


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


class FakeEnc:
    """Token t < 26 is one letter; 26..96 are two- and three-byte strings, some with newlines."""

    def __init__(self, V=97):
        rng = random.Random(0)
        letters = b"abcd\n"
        self.toks = [bytes([ord("a") + t]) for t in range(26)]
        self.toks += [bytes(rng.choice(letters) for _ in range(rng.choice((2, 3)))) for _ in range(V - 26)]

    def decode_single_token_bytes(self, t):
        return self.toks[t]

    def decode(self, toks):
        return b"".join(self.toks[t] for t in toks).decode()


def target_distribution(logits, temperature, top_k=None, top_p=None):
    """The distribution sampling must follow, worked out plainly in float64."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    before = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k is not None and rank >= top_k) or (top_p is not None and rank > 0 and before >= top_p):
            break
        keep[i] = True
        before += float(p[i])
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def plain_sample(logits, generator=None, **kw):
    """model.sample_token with its uniform numbers drawn as engine.sample_next draws them."""
    uniform = torch.rand(logits.shape[0], 2, dtype=torch.float64, generator=generator)
    return sample_token(logits, uniform=uniform, **kw)


SAMPLERS = {"fast": sample_next, "plain": plain_sample}


def draw_counts(logits, n, chunk, seed, sampler=sample_next, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel(), dtype=torch.long)
    for s in range(0, n, chunk):
        rows = logits.expand(min(chunk, n - s), -1)
        tok, logp = sampler(rows, generator=g, **kw)
        counts += torch.bincount(tok, minlength=logits.numel())
        # the log-prob returned is the one under softmax(logits / T), before any truncation
        full = F.log_softmax(logits[0].double() / kw["temperature"], -1)
        assert torch.allclose(logp.double(), full[tok], atol=1e-5)
    return counts


# V = 10: one level of running sums; V = 300: two levels (blocks of 64, the last one padded), and for
# top_p = 0.99 over a flat distribution a nucleus wider than the 128 first candidates (the full sort)
CASES = [(10, 1.0, None, None), (10, 0.7, None, None), (10, 1.3, 3, None), (10, 1.0, None, 0.8),
         (10, 0.8, 5, 0.9), (300, 1.0, None, None), (300, 0.9, 50, None), (300, 1.0, None, 0.99),
         (300, 1.0, None, 0.5)]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("V,temperature,top_k,top_p", CASES)
def test_draws_follow_the_target_distribution(V, temperature, top_k, top_p, sampler):
    """Chi-square and every token's frequency within 5 standard errors of its target probability;
    tokens outside the support (truncated, or -inf) are never drawn. For the fast sampler and the
    plain one."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(V, generator=g) * (1.0 if V == 10 else 0.3)
    logits[3] = float("-inf")  # banned
    n = 200_000 if V == 10 else 60_000
    counts = draw_counts(logits[None], n, 20_000, seed=1, sampler=SAMPLERS[sampler], temperature=temperature,
                         top_k=top_k, top_p=top_p)
    assert_follows(counts, target_distribution(logits, temperature, top_k, top_p), n)


def assert_follows(counts, target, n):
    support = target > 0
    assert counts[~support].sum() == 0
    freq, p = counts[support].double() / n, target[support]
    se = (p * (1 - p) / n).sqrt()
    assert float(((freq - p).abs() / se).max()) < 5
    df = int(support.sum()) - 1
    chi2 = float(((counts[support] - n * p) ** 2 / (n * p)).sum())
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)


def test_top_p_rows_of_every_kind_in_one_batch():
    """top-p over a batch whose rows take different routes (engine.sample_next): a peaked row that
    sure_nucleus settles without sorting, one whose nucleus fits in 128 sorted candidates, one
    wider than 1024 (all 2000 sorted); each row's draws follow its own target."""
    V, n, top_p = 2000, 40_000, 0.9
    g = torch.Generator().manual_seed(7)
    peaked = torch.randn(V, generator=g) * 0.3
    peaked[:3] += torch.tensor([14.0, 13.5, 12.0])        # three tokens hold nearly all the mass
    narrow = torch.randn(V, generator=g) * 0.3
    narrow[:40] += 8.0                                 # a nucleus of ~40 tokens
    flat = torch.randn(V, generator=g) * 0.3           # a nucleus of ~1700 tokens
    rows = torch.stack([peaked, narrow, flat])
    targets = [target_distribution(r, 1.0, top_p=top_p) for r in rows]
    sizes = [int((t > 0).sum()) for t in targets]
    assert sizes[0] <= 3 and 1 < sizes[1] <= 128 and sizes[2] > 1024, sizes
    settled = engine.sure_nucleus(torch.softmax(rows, -1), torch.ones(3, 1, dtype=torch.float64), top_p)[1]
    assert settled.tolist() == [True, False, False]
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(3, V, dtype=torch.long)
    for _ in range(n // 10_000):
        tok, _ = sample_next(rows.repeat_interleave(10_000, 0), generator=gen, top_p=top_p)
        counts += torch.stack([torch.bincount(t, minlength=V) for t in tok.view(3, -1)])
    for r in range(3):
        assert_follows(counts[r], targets[r], n)


def test_inverse_cdf_never_picks_a_zero_weight():
    """Zero weights anywhere (first, inside and at the end of blocks, last) and uniforms at 0 and
    just below 1: every pick has a positive weight."""
    w = torch.rand(4, 200)
    w[:, 0] = 0
    w[:, 60:70] = 0
    w[:, 127:] = 0
    w[1, :] = 0
    w[1, 100] = 1.0  # only one token possible
    below_one = 1 - 2 ** -53
    for u in ([0.0, 0.0], [below_one, below_one], [0.5, below_one], [below_one, 0.0]):
        idx, total = engine.inverse_cdf(w, torch.tensor([u] * 4, dtype=torch.float64))
        assert (w.gather(1, idx) > 0).all()
        assert torch.allclose(total.squeeze(1), w.double().sum(1))
        assert idx[1, 0] == 100


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_greedy_and_top_p_zero_pick_the_argmax(sampler):
    sample = SAMPLERS[sampler]
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, temperature=0.0)[0], logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=0.0)[0], logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1)[0], logits.argmax(-1))


# ----------------------------------------------------------------------------- stop strings

def test_stop_automaton_agrees_with_searching_the_text():
    """For random token streams, the first token after which a stop string occurs in the bytes is
    where the automaton reaches STOPPED (overlapping stop strings, multi-byte tokens)."""
    enc = FakeEnc()
    stop = ("\nd", "abca", "cc\n\n", "b")
    table = StopStrings.build(enc, stop, 97, "cpu")
    rng = random.Random(1)
    stops_b = [s.encode() for s in stop]
    for _ in range(300):
        toks = [rng.randrange(26, 97) if rng.random() < 0.8 else rng.randrange(26) for _ in range(12)]
        state, text, stopped_at, expected_at = 0, b"", None, None
        for i, t in enumerate(toks):
            state = int(table.table[state, t])
            text += enc.decode_single_token_bytes(t)
            if stopped_at is None and state == table.STOPPED:
                stopped_at = i
            if expected_at is None and any(s in text for s in stops_b):
                expected_at = i
        assert stopped_at == expected_at, (toks, stopped_at, expected_at)


# ----------------------------------------------------------------------------- decoding paths

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [40, 41, 42, 43, 44], [60], [70, 71, 72]]
# tiny_model's greedy completions of PROMPTS end, in FakeEnc's bytes, at: a stop string (row 0, after
# 8 tokens), never (row 1), end of text (row 2), stop strings (rows 3, 4, 5, within 2 to 4 tokens)
GREEDY = dict(enc=FakeEnc(), temperature=0.0, stop=("hb", "\n\n\n", "\na\na\na"), eot_id=13)
SAMPLED = dict(enc=FakeEnc(), stop=("\nd\n", "abc"), eot_id=5, banned=(0,))


def assert_same(a, b, atol=1e-5):
    assert a.tokens == b.tokens
    assert a.finish == b.finish
    assert a.texts == b.texts
    for x, y in zip(a.logprobs, b.logprobs):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=atol)


def check_ends(gen, stop, eot_id, n):
    for toks, text, fin in zip(gen.tokens, gen.texts, gen.finish):
        assert not any(s in text for s in stop)
        assert (fin == "eot") == (toks[-1] == eot_id) and eot_id not in toks[:-1]
        assert (fin == "length") == (len(toks) == n and fin not in ("eot", "stop"))


def test_greedy_cached_equals_naive_with_rows_leaving_the_batch():
    m = tiny_model()
    runs = [generate(m, PROMPTS, 20, use_cache=use_cache, **GREEDY) for use_cache in (True, False)]
    assert_same(*runs)
    assert runs[0].finish == ["stop", "length", "eot", "stop", "stop", "stop"]
    assert [len(t) for t in runs[0].tokens][:3] == [8, 20, 1]
    check_ends(runs[0], GREEDY["stop"], 13, 20)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 20, 0.9)])
def test_sampled_cached_equals_naive_with_rows_leaving_the_batch(temperature, top_k, top_p):
    """Seeded: the same draws, so the same tokens, log-probs and ends; rows that finish leave the
    batch (compaction) in both."""
    m = tiny_model()
    runs = [generate(m, PROMPTS, 30, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(7), **SAMPLED) for use_cache in (True, False)]
    assert_same(*runs)
    assert {"stop", "eot", "length"} == set(runs[0].finish)
    check_ends(runs[0], SAMPLED["stop"], 5, 30)
    assert all(0 not in t for t in runs[0].tokens)  # banned


def test_greedy_rows_alone_equal_rows_in_a_batch():
    m = tiny_model()
    batch = generate(m, PROMPTS, 20, **GREEDY)
    for b, p in enumerate(PROMPTS):
        alone = generate(m, [p], 20, **GREEDY)
        assert alone.tokens[0] == batch.tokens[b] and alone.finish[0] == batch.finish[b]
        assert torch.allclose(torch.tensor(alone.logprobs[0]), torch.tensor(batch.logprobs[b]), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_repeated_prompts_prefilled_once_equal_naive(temperature):
    """Rows that repeat a prompt share one prefill (its KV cache copied to each of them): the same
    tokens, log-probs and ends as the naive sampler, which runs every row through the model."""
    m = tiny_model()
    prompts = [PROMPTS[i] for i in (2, 0, 2, 1, 0, 2, 3, 2)]
    kw = GREEDY if temperature == 0 else dict(temperature=temperature, **SAMPLED)
    calls = []
    hook = m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape), with_kwargs=True)
    runs = [generate(m, prompts, 25, use_cache=use_cache, generator=torch.Generator().manual_seed(3), **kw)
            for use_cache in (True, False)]
    hook.remove()
    assert_same(*runs)
    assert calls[0][0] == 4  # the prefill ran the 4 distinct prompts, not 8 rows
    if temperature == 0:  # greedy: a repeated prompt gives the same completion every time
        assert runs[0].tokens[0] == runs[0].tokens[2] == runs[0].tokens[5] == runs[0].tokens[7]
    else:
        assert len({tuple(runs[0].tokens[i]) for i in (0, 2, 5, 7)}) > 1


# ----------------------------------------------------------------------------- the engine against the plain generate

def test_fast_greedy_equals_plain_with_rows_finishing_at_different_steps():
    """Stops, end of text and the length limit at different steps, rows leaving the engine's batch,
    and repeated prompts prefilled once: the plain generate's tokens, texts and ends."""
    m = tiny_model()
    fast, plain = generate(m, PROMPTS, 20, **GREEDY), model.generate(m, PROMPTS, 20, **GREEDY)
    assert_same(fast, plain)
    assert plain.finish == ["stop", "length", "eot", "stop", "stop", "stop"]
    repeated = [PROMPTS[i] for i in (2, 0, 2, 1, 0, 2, 3, 2)]
    assert_same(generate(m, repeated, 20, **GREEDY), model.generate(m, repeated, 20, **GREEDY))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 20, None), (0.8, 20, 0.9), (1.3, 60, 0.5)])
@pytest.mark.parametrize("repeat", [False, True])
def test_fast_sampling_equals_plain_token_for_token_with_top_k(temperature, top_k, top_p, repeat):
    """With top-k both samplers pick from the sorted candidates' running sums with the same uniform
    number, and with no row finishing early both draw the same numbers each step: the same tokens
    and log-probs from the same seed, the engine's shared prefill of repeated prompts included."""
    m = tiny_model()
    prompts = [PROMPTS[i] for i in (2, 0, 2, 1, 0, 2, 3, 2)] if repeat else PROMPTS
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, banned=(0,))
    fast = generate(m, prompts, 25, generator=torch.Generator().manual_seed(5), **kw)
    plain = model.generate(m, prompts, 25, generator=torch.Generator().manual_seed(5), **kw)
    assert_same(fast, plain)
    assert all(len(t) == 25 and 0 not in t for t in fast.tokens)
    assert len({tuple(t) for t in fast.tokens}) == len(prompts)  # sampled: no two rows alike


def two_sample_chi2(a, b):
    """Chi-square of two count vectors drawn from one distribution (cells with too few counts
    pooled), and its degrees of freedom."""
    small = (a + b) < 10
    a = torch.cat([a[~small], a[small].sum()[None]]).double()
    b = torch.cat([b[~small], b[small].sum()[None]]).double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    ka, kb = (b.sum() / a.sum()).sqrt(), (a.sum() / b.sum()).sqrt()
    return float(((ka * a - kb * b) ** 2 / (a + b)).sum()), len(a) - 1


@pytest.mark.parametrize("temperature,top_p", [(0.1, None), (0.1, 0.6)])
def test_fast_sampling_follows_the_plain_distribution_where_draws_map_differently(temperature, top_p):
    """The full distribution, and top-p alone (about a tenth of the later steps' rows have a
    nucleus that sure_nucleus settles), where the engine's inverse CDF runs in vocabulary
    order: 4000 samples of 3 tokens from one prompt by each sampler, each position's token counts
    alike (two-sample chi-square), and the engine's log-probs those of a fresh forward pass."""
    m = tiny_model()
    prompts, kw = [PROMPTS[0]] * 4000, dict(temperature=temperature, top_p=top_p, banned=(0,))
    fast = generate(m, prompts, 3, generator=torch.Generator().manual_seed(1), **kw)
    plain = model.generate(m, prompts, 3, generator=torch.Generator().manual_seed(2), **kw)
    for pos in range(3):
        counts = [torch.bincount(torch.tensor([t[pos] for t in g.tokens]), minlength=97) for g in (fast, plain)]
        chi2, df = two_sample_chi2(*counts)
        assert df > 5 and chi2 < df + 5 * math.sqrt(2 * df), (pos, chi2, df)
    seqs = torch.tensor([PROMPTS[0] + t for t in fast.tokens[:50]])
    logits = m(seqs)[0][:, len(PROMPTS[0]) - 1:-1].index_fill(2, torch.tensor([0]), -math.inf)  # 0: banned
    logp = F.log_softmax(logits / temperature, -1)
    expected = logp.gather(2, seqs[:, len(PROMPTS[0]):, None]).squeeze(2)
    assert torch.allclose(torch.tensor(fast.logprobs[:50]), expected, atol=1e-4)
